"""Find (or provision) the ComfyUI host and the Python that runs it; install what it needs.

Shared by the README's two commands (scripts/quickstart.sh, scripts/test.sh) and scripts/ui.sh.
Standard library only: it runs on a bare ``python3`` before anything is installed.

The host, first match wins:
  1. ``COMFYUI_PATH`` when set (a folder that is not ComfyUI is refused, never skipped);
  2. ``~/ComfyUI`` when it exists (likewise refused when it is not ComfyUI);
  3. a host this script provisioned earlier in the cache folder;
  4. the ComfyUI source archive at ``../shared/hosts/ComfyUI-*.tar.gz`` (or
     ``COMFYUI_INVERSE_ARCHIVE``), unpacked into the cache folder (machines without internet, CI);
  5. ``git clone`` of ComfyUI's pinned release tag into the cache folder, when the network allows
     (``COMFYUI_INVERSE_OFFLINE=1`` forbids it);
  6. otherwise an error that says what to do (exit code 3).

The Python: ``COMFYUI_PYTHON`` when set; for a user's own ComfyUI (1, 2) the one that runs it
(a running ComfyUI's interpreter, else a venv inside or beside the checkout, else this python3);
for a provisioned host (3-5) an isolated venv in the cache folder, given torch
(``COMFYUI_INVERSE_TORCH``, default ``torch==2.13.0``: whatever build the package index has for
this machine) only when it has none. Requirements are installed under a constraint that pins
the installed torch, so no install ever replaces it.

The cache folder is ``COMFYUI_INVERSE_CACHE`` (default ``$XDG_CACHE_HOME/comfyui-inverse`` or
``~/.cache/comfyui-inverse``), outside the repository. Nothing of ComfyUI is ever written into
the repository.

Usage:
  python3 scripts/provision.py [--deps none|run|test] [--shell] [--no-host]
``--shell`` prints ``export NAME=VALUE`` lines for bash's ``eval``: COMFYUI_PATH, COMFYUI_PYTHON,
COMFYUI_VERSION, COMFYUI_HOST_SOURCE. Everything else goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED_VERSION = "0.3.64"
PINNED_TAG = f"v{PINNED_VERSION}"
CLONE_URL = "https://github.com/comfyanonymous/ComfyUI"
DEFAULT_TORCH = "torch==2.13.0"
HOST_MARKER = ".comfyui-inverse-host"  # written last: a half-unpacked host is never used
EXIT_NO_HOST = 3
EXIT_BAD_HOST = 2


class ProvisionError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Host:
    path: Path
    source: str  # COMFYUI_PATH, home, cache, archive, clone
    version: str


def log(msg: str) -> None:
    print(f"[provision] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the host

def cache_dir(env=os.environ) -> Path:
    if env.get("COMFYUI_INVERSE_CACHE"):
        return Path(os.path.expanduser(env["COMFYUI_INVERSE_CACHE"]))
    base = env.get("XDG_CACHE_HOME") or os.path.join(home_dir(env), ".cache")
    return Path(base) / "comfyui-inverse"


def home_dir(env=os.environ) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def is_comfyui(path: Path) -> bool:
    return all((path / f).is_file() for f in ("main.py", "execution.py", "nodes.py", "comfy/sd.py"))


def comfyui_version(path: Path) -> str:
    for name, pattern in (("comfyui_version.py", r'__version__\s*=\s*"([^"]+)"'),
                          ("pyproject.toml", r'^version\s*=\s*"([^"]+)"')):
        try:
            m = re.search(pattern, (path / name).read_text(), re.M)
        except OSError:
            continue
        if m:
            return m.group(1)
    return "unknown"


def _checked(path: Path, source: str, how: str) -> Host:
    if not path.is_dir():
        raise ProvisionError(f"{how} is {path}, which does not exist. Point COMFYUI_PATH at the folder that holds "
                             f"ComfyUI's main.py, or unset it to let the scripts provision a ComfyUI.", EXIT_BAD_HOST)
    if not is_comfyui(path):
        raise ProvisionError(f"{how} is {path}, which is not a ComfyUI folder (it lacks main.py, execution.py, "
                             f"nodes.py or comfy/sd.py). Point COMFYUI_PATH at the folder that holds ComfyUI's "
                             f"main.py, or move that folder away to let the scripts provision a ComfyUI.",
                             EXIT_BAD_HOST)
    return Host(path.resolve(), source, comfyui_version(path))


def provisioned_path(env=os.environ) -> Path:
    return cache_dir(env) / "hosts" / f"ComfyUI-{PINNED_VERSION}"


def archive_candidates(env=os.environ) -> list[Path]:
    if "COMFYUI_INVERSE_ARCHIVE" in env:  # explicit; "" or "none" means no archive
        value = env["COMFYUI_INVERSE_ARCHIVE"]
        return [] if value in ("", "none") else [Path(os.path.expanduser(value))]
    shared = [Path(env["COMFYUI_INVERSE_SHARED"])] if env.get("COMFYUI_INVERSE_SHARED") else []
    shared.append(ROOT.parent / "shared")
    found = []
    for s in shared:
        found += sorted((s / "hosts").glob(f"ComfyUI-{PINNED_VERSION}.tar.gz"))
        found += sorted((s / "hosts").glob("ComfyUI-*.tar.gz"))
    return list(dict.fromkeys(found))


def _install_tree(target: Path, fill) -> None:
    """Build a host in a temporary sibling folder with ``fill(tmp) -> folder``, then move it in
    place and write the marker, so an interrupted provisioning leaves nothing half-made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        built = fill(tmp)
        if not is_comfyui(built):
            raise ProvisionError(f"what was unpacked into {built} is not a ComfyUI folder")
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
        (target / HOST_MARKER).write_text(f"{PINNED_VERSION}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack_archive(archive: Path, target: Path) -> None:
    def fill(tmp: Path) -> Path:
        with tarfile.open(archive) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(tmp, filter="data")
            else:
                for member in tar.getmembers():
                    if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                        raise ProvisionError(f"{archive} holds an unsafe path {member.name!r}")
                tar.extractall(tmp)
        tops = [p for p in tmp.iterdir() if p.is_dir()]
        return tops[0] if len(tops) == 1 else tmp

    log(f"unpacking {archive} into {target}")
    _install_tree(target, fill)


def clone_release(target: Path, env=os.environ) -> None:
    def fill(tmp: Path) -> Path:
        dest = tmp / "ComfyUI"
        r = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", PINNED_TAG, CLONE_URL, str(dest)],
                           capture_output=True, text=True, timeout=600,
                           env={**env, "GIT_TERMINAL_PROMPT": "0"})
        if r.returncode != 0:
            raise ProvisionError(f"git clone of {CLONE_URL} ({PINNED_TAG}) failed: {r.stderr.strip()[-400:]}",
                                 EXIT_NO_HOST)
        return dest

    if shutil.which("git") is None:
        raise ProvisionError("git is not installed, so ComfyUI cannot be cloned", EXIT_NO_HOST)
    log(f"cloning ComfyUI {PINNED_TAG} from {CLONE_URL} into {target}")
    _install_tree(target, fill)


def find_host(env=os.environ, provision: bool = True) -> Host | None:
    """The host by the order in this module's docstring. With ``provision=False`` nothing is
    unpacked or cloned and None means "no host yet"; with ``provision=True`` a missing host is a
    ProvisionError (code EXIT_NO_HOST) saying what to do."""
    if env.get("COMFYUI_PATH"):
        return _checked(Path(os.path.expanduser(env["COMFYUI_PATH"])), "COMFYUI_PATH", "COMFYUI_PATH")
    home_host = Path(home_dir(env)) / "ComfyUI"
    if home_host.exists():
        return _checked(home_host, "home", "~/ComfyUI")
    cached = provisioned_path(env)
    if (cached / HOST_MARKER).is_file() and is_comfyui(cached):
        return Host(cached.resolve(), "cache", comfyui_version(cached))
    if not provision:
        return None
    tried = []
    for archive in archive_candidates(env):
        if archive.is_file():
            unpack_archive(archive, cached)
            return Host(cached.resolve(), "archive", comfyui_version(cached))
        tried.append(f"no archive at {archive}")
    if env.get("COMFYUI_INVERSE_OFFLINE") == "1":
        tried.append("cloning is off (COMFYUI_INVERSE_OFFLINE=1)")
    else:
        try:
            clone_release(cached, env)
            return Host(cached.resolve(), "clone", comfyui_version(cached))
        except (ProvisionError, subprocess.TimeoutExpired) as exc:
            tried.append(str(exc))
    raise ProvisionError(
        "no ComfyUI host could be found or provisioned (" + "; ".join(tried or ["nothing to try"]) + ").\n"
        f"Do one of: set COMFYUI_PATH to your ComfyUI folder; or clone ComfyUI into ~/ComfyUI "
        f"(git clone --branch {PINNED_TAG} {CLONE_URL} ~/ComfyUI); or put ComfyUI's source archive at "
        f"../shared/hosts/ComfyUI-{PINNED_VERSION}.tar.gz (or set COMFYUI_INVERSE_ARCHIVE to it).", EXIT_NO_HOST)


# ---------------------------------------------------------------------------------------------
# the Python that runs it

def _running_python(host: Path) -> str | None:
    """The interpreter of a ComfyUI already running from ``host`` (Linux /proc), if any."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    main_py = str(host / "main.py")
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(pid_dir / "cwd")
            exe = os.readlink(pid_dir / "exe")
        except OSError:
            continue
        for a in argv[1:3]:
            a = a.decode(errors="replace")
            if a.endswith("main.py") and os.path.normpath(os.path.join(cwd, a)) == main_py:
                return exe
    return None


def user_python(host: Path, env=os.environ) -> tuple[str, str]:
    """(interpreter, how it was found) for a user's own ComfyUI."""
    running = _running_python(host)
    if running:
        return running, "the Python of the running ComfyUI"
    for cand in (host / "venv" / "bin" / "python", host / ".venv" / "bin" / "python",
                 host.parent / "venv" / "bin" / "python", host.parent / "python_embeded" / "python.exe",
                 host / "venv" / "Scripts" / "python.exe"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand), f"the venv at {cand.parent.parent}"
    return sys.executable, "this python3 (no venv found beside the checkout; set COMFYUI_PYTHON to choose)"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def torch_version(python: str) -> str | None:
    r = _run([python, "-c", "import torch; print(torch.__version__)"])
    return r.stdout.strip() if r.returncode == 0 else None


def pip_install(python: str, args: list[str]) -> None:
    cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    r = _run(cmd)
    # pip repeats one warning per package for an index folder the machine's config names but lacks
    noise = re.compile(r"^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$")
    shown = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and not noise.match(l)]
    if shown:
        print("\n".join(shown[-60:]), file=sys.stderr)
    if r.returncode != 0:
        raise ProvisionError(f"pip install failed ({' '.join(shlex.quote(c) for c in cmd)})")


def ensure_torch(python: str, env=os.environ) -> str:
    v = torch_version(python)
    if v is None:
        spec = env.get("COMFYUI_INVERSE_TORCH", DEFAULT_TORCH)
        log(f"{python} has no torch: installing {spec}")
        pip_install(python, [spec])
        v = torch_version(python)
        if v is None:
            raise ProvisionError(f"torch still does not import in {python} after installing {spec}")
    return v


def cache_venv(env=os.environ) -> str:
    """The isolated venv for provisioned hosts (created on first use)."""
    d = cache_dir(env) / f"venv-py{sys.version_info.major}.{sys.version_info.minor}"
    py = d / "bin" / "python"
    if not py.is_file():
        log(f"creating an isolated Python environment in {d}")
        r = _run([sys.executable, "-m", "venv", str(d)])
        if r.returncode != 0:
            raise ProvisionError(f"could not create a venv in {d}: {r.stderr.strip()}")
    return str(py)


def comfyui_requirements(host: Path, env=os.environ) -> Path:
    """ComfyUI's requirements without torch (pinned separately) and torchaudio (no CPU build for
    every torch; only its audio nodes need it), plus requests, which it imports."""
    out = cache_dir(env) / "comfyui-requirements.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [l for l in (host / "requirements.txt").read_text().splitlines()
             if not re.match(r"^\s*(torch|torchaudio)\s*($|[<>=~!;#\[])", l)]
    out.write_text("\n".join(lines + ["requests"]) + "\n")
    return out


def install_requirements(python: str, reqs: list[Path], env=os.environ) -> None:
    """Install requirement files under a constraint that pins the installed torch; once per
    (interpreter, torch, file contents)."""
    v = ensure_torch(python, env)
    cache = cache_dir(env)
    cache.mkdir(parents=True, exist_ok=True)
    constraint = cache / "constraints.txt"
    constraint.write_text(f"torch=={v.split('+')[0]}\n")
    key = hashlib.sha1("\0".join([python, v] + [r.read_text() for r in reqs]).encode()).hexdigest()[:16]
    stamp = cache / "stamps" / f"deps-{key}"
    if stamp.is_file():
        return
    log(f"installing {', '.join(r.name for r in reqs)} into {python} (torch kept at {v})")
    pip_install(python, ["-c", str(constraint)] + [a for r in reqs for a in ("-r", str(r))])
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()


def frontend_dir(version: str, env=os.environ) -> Path:
    """Where ``install_frontend`` puts comfyui-frontend-package ``version`` (pip's --target layout)."""
    return cache_dir(env) / "frontends" / version


def install_frontend(python: str, version: str, env=os.environ) -> Path:
    """comfyui-frontend-package ``version`` (static files only, no dependencies) unpacked into the
    cache folder, for ComfyUI's --front-end-root: the browser tests run the newest one beside the
    pinned one. Nothing is installed into the Python."""
    target = frontend_dir(version, env)
    if (target / "comfyui_frontend_package" / "static" / "index.html").is_file():
        return target
    log(f"installing comfyui-frontend-package {version} into {target} (for the browser tests)")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pip_install(python, ["--no-deps", "--target", str(tmp), f"comfyui-frontend-package=={version}"])
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def provision(deps: str = "run", want_host: bool = True, env=os.environ) -> tuple[Host | None, str]:
    """(host or None, python) with ``deps`` installed: none, run (ComfyUI's requirements and the
    pack's), test (those and the test requirements)."""
    host = find_host(env) if want_host else None
    if env.get("COMFYUI_PYTHON"):
        python, how = env["COMFYUI_PYTHON"], "COMFYUI_PYTHON"
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ProvisionError(f"COMFYUI_PYTHON={python} is not an executable file", EXIT_BAD_HOST)
    elif host is None:
        python, how = sys.executable, "this python3 (no host)"
    elif host.source in ("COMFYUI_PATH", "home"):
        python, how = user_python(host.path, env)
    else:
        python, how = cache_venv(env), "the isolated venv in the cache folder"
    log(f"Python: {python} ({how})")
    reqs: list[Path] = []
    if deps in ("run", "test") and host is not None:
        reqs += [comfyui_requirements(host.path, env), ROOT / "requirements.txt"]
    if deps == "test":
        reqs.append(ROOT / "requirements-test.txt")
    if reqs:
        install_requirements(python, reqs, env)
    elif deps != "none":
        ensure_torch(python, env)
    if deps == "test" and host is not None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import frontend  # scripts/: which frontends the browser tests run

        try:
            install_frontend(python, frontend.NEWEST, env)
        except ProvisionError as exc:  # offline: every other test still runs; test_frontend_newest says why it cannot
            log(f"warning: {exc}; the newest-frontend browser tests cannot run")
    return host, python


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deps", choices=("none", "run", "test"), default="run")
    ap.add_argument("--shell", action="store_true", help="print export lines for bash's eval")
    ap.add_argument("--no-host", action="store_true", help="only the Python and its deps (core tests)")
    args = ap.parse_args(argv)
    try:
        host, python = provision(args.deps, not args.no_host)
    except ProvisionError as exc:
        print(f"[provision] error: {exc}", file=sys.stderr)
        return exc.code
    values = {"COMFYUI_PYTHON": python}
    if host is not None:
        log(f"ComfyUI {host.version} at {host.path} (source: {host.source})")
        values.update(COMFYUI_PATH=str(host.path), COMFYUI_VERSION=host.version, COMFYUI_HOST_SOURCE=host.source)
    if args.shell:
        for k, v in values.items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
