"""Host provisioning (scripts/provision.py) and CI's refusal to skip: fast, no ComfyUI needed."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import provision

ROOT = Path(__file__).resolve().parents[1]


def fake_comfyui(path: Path, version: str = "0.3.64") -> Path:
    for f in ("main.py", "execution.py", "nodes.py", "comfy/sd.py"):
        (path / f).parent.mkdir(parents=True, exist_ok=True)
        (path / f).write_text("# fake\n")
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    (path / "requirements.txt").write_text("torch\ntorchsde\ntorchvision\ntorchaudio\nnumpy>=1.25.0\n"
                                           "torch>=2.0 ; sys_platform == 'linux'\n")
    return path


def fake_archive(tmp: Path, version: str = "0.3.64") -> Path:
    src = fake_comfyui(tmp / "src" / "ComfyUI", version)
    archive = tmp / f"ComfyUI-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="ComfyUI")
    return archive


@pytest.fixture
def env(tmp_path):
    """A clean environment: an empty HOME, a cache inside it, no archive, no network."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "PATH": os.environ["PATH"], "COMFYUI_INVERSE_ARCHIVE": "none",
            "COMFYUI_INVERSE_OFFLINE": "1"}


def test_comfyui_path_wins_and_is_checked(env, tmp_path):
    fake_comfyui(Path(env["HOME"]) / "ComfyUI", "0.3.1")
    mine = fake_comfyui(tmp_path / "mine", "0.3.99")
    host = provision.find_host({**env, "COMFYUI_PATH": str(mine)})
    assert (host.path, host.source, host.version) == (mine.resolve(), "COMFYUI_PATH", "0.3.99")

    not_comfy = tmp_path / "photos"
    not_comfy.mkdir()
    (not_comfy / "main.py").write_text("")
    with pytest.raises(provision.ProvisionError) as e:
        provision.find_host({**env, "COMFYUI_PATH": str(not_comfy)})
    assert e.value.code == provision.EXIT_BAD_HOST
    assert "not a ComfyUI folder" in str(e.value) and str(not_comfy) in str(e.value)
    assert "COMFYUI_PATH" in str(e.value)
    with pytest.raises(provision.ProvisionError, match="does not exist"):
        provision.find_host({**env, "COMFYUI_PATH": str(tmp_path / "nowhere")})


def test_home_folder_comes_before_the_cache(env):
    provisioned = fake_comfyui(provision.provisioned_path(env))
    (provisioned / provision.HOST_MARKER).write_text("x")
    home_host = fake_comfyui(Path(env["HOME"]) / "ComfyUI", "0.3.50")
    host = provision.find_host(env)
    assert (host.path, host.source, host.version) == (home_host.resolve(), "home", "0.3.50")


def test_a_home_folder_that_is_not_comfyui_is_refused(env):
    (Path(env["HOME"]) / "ComfyUI").mkdir()
    with pytest.raises(provision.ProvisionError, match="not a ComfyUI folder") as e:
        provision.find_host(env)
    assert e.value.code == provision.EXIT_BAD_HOST


def test_the_cache_is_used_only_when_complete(env):
    cached = fake_comfyui(provision.provisioned_path(env))
    assert str(cached).startswith(env["HOME"])  # the cache folder is under HOME, outside the repo
    assert provision.find_host(env, provision=False) is None  # no marker: a half-made host
    (cached / provision.HOST_MARKER).write_text("x")
    host = provision.find_host(env, provision=False)
    assert host.source == "cache" and host.path == cached.resolve()


def test_the_archive_is_unpacked_once_into_the_cache(env, tmp_path):
    archive = fake_archive(tmp_path)
    env = {**env, "COMFYUI_INVERSE_ARCHIVE": str(archive)}
    assert provision.find_host(env, provision=False) is None
    host = provision.find_host(env)
    assert host.source == "archive" and host.version == "0.3.64"
    assert host.path == provision.provisioned_path(env).resolve()
    assert (host.path / provision.HOST_MARKER).is_file()
    assert not any(p.name.startswith(".partial-") for p in host.path.parent.iterdir())
    again = provision.find_host(env)
    assert again.source == "cache" and again.path == host.path


def test_the_shared_archive_is_found_beside_the_project(env, tmp_path):
    shared = tmp_path / "shared"
    (shared / "hosts").mkdir(parents=True)
    archive = fake_archive(tmp_path)
    archive.rename(shared / "hosts" / archive.name)
    env = {k: v for k, v in env.items() if k != "COMFYUI_INVERSE_ARCHIVE"}
    assert shared / "hosts" / archive.name in provision.archive_candidates({**env, "COMFYUI_INVERSE_SHARED": str(shared)})
    assert provision.find_host({**env, "COMFYUI_INVERSE_SHARED": str(shared)}).source == "archive"


def test_nothing_to_provision_says_what_to_do(env):
    with pytest.raises(provision.ProvisionError) as e:
        provision.find_host(env)
    msg = str(e.value)
    assert e.value.code == provision.EXIT_NO_HOST
    assert "COMFYUI_PATH" in msg and "git clone" in msg and "ComfyUI-0.3.64.tar.gz" in msg
    assert "COMFYUI_INVERSE_OFFLINE" in msg


def test_comfyui_requirements_keep_the_installed_torch(env, tmp_path):
    host = fake_comfyui(tmp_path / "c")
    lines = provision.comfyui_requirements(host, env).read_text().split()
    assert "torch" not in lines and "torchaudio" not in lines and not any(l.startswith("torch>") for l in lines)
    assert {"torchsde", "torchvision", "numpy>=1.25.0", "requests"} <= set(lines)


def test_a_users_comfyui_keeps_its_own_python(tmp_path):
    host = fake_comfyui(tmp_path / "ComfyUI")
    py = host / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    assert provision.user_python(host)[0] == str(py)


def _clean_env(tmp_path) -> dict:
    keep = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("PATH", "LANG", "SSL_CERT_FILE")}
    return {**keep, "HOME": str(tmp_path / "home"), "COMFYUI_INVERSE_ARCHIVE": "none", "COMFYUI_INVERSE_OFFLINE": "1",
            "PYTHON": getattr(sys, "_base_executable", sys.executable)}


def test_ci_run_fails_without_a_host(tmp_path):
    (tmp_path / "home").mkdir()
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=_clean_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "no ComfyUI host could be found or provisioned" in r.stderr
    assert "core tests run" not in r.stderr  # CI never falls back to a skip


def test_ci_mode_turns_any_skip_into_a_failure(tmp_path):
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_a():\n    pass\n\n"
                                        "def test_b():\n    pytest.skip('no host')\n")
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "scripts")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "support.ci_guard", "-p", "no:cacheprovider", str(tmp_path)]
    local = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                           env={**base, "COMFYUI_INVERSE_REQUIRE_HOST": "0"})
    assert local.returncode == 0, local.stdout
    ci = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                        env={**base, "COMFYUI_INVERSE_REQUIRE_HOST": "1"})
    assert ci.returncode == 1 and "skipped under COMFYUI_INVERSE_REQUIRE_HOST=1" in ci.stdout, ci.stdout


def test_ci_mode_fails_an_integration_module_without_a_host(tmp_path):
    env = {**os.environ, "COMFYUI_INVERSE_REQUIRE_HOST": "1", "COMFYUI_PATH": str(tmp_path / "no-comfyui")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                        str(ROOT / "tests" / "test_nodes_inversion.py")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "does not exist" in r.stdout, r.stdout[-2000:]
