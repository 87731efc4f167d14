"""Run an API-format ComfyUI workflow headless and save its outputs.

Either starts ComfyUI from a checkout on 127.0.0.1 (``--comfyui``, default $COMFYUI_PATH, else the
host scripts/provision.py finds) with this pack loaded, or talks to running servers
(``--server http://host:port``, repeatable). Shows progress, writes every output image to ``--out``
and exits non-zero with a clear message when anything fails (0 success, 1 execution error, 2 bad
workflow or set-up, 130 interrupted).

With ``--photos`` (folders and/or files) the workflow runs once per photo: every image loader
gets that photo. The photos are handed out one at a time to each server (``--server`` URLs and/or
``--local-servers N`` started here); each server schedules its own work through its queue
(/prompt, websocket progress, /history). A photo whose server dies is handed to another server; a
photo that fails (a broken file, an execution error) is reported and the rest go on. Outputs land
in ``--out/<photo name>/`` named after the photo, with summary.json and summary.csv (photo,
server, seconds, status, attempts, node reports); the exit code is 1 if any photo failed.

Examples:
  python scripts/run_workflow.py workflows/api/invert_and_reconstruct.json \\
      --checkpoint v1-5-pruned-emaonly.safetensors --image my_photo.jpg
  python scripts/run_workflow.py workflows/api/invert_and_reconstruct.json --tiny-checkpoint \\
      --set 5.width=128 --set 5.height=128
  python scripts/run_workflow.py WORKFLOW.json --server http://127.0.0.1:8188
  python scripts/run_workflow.py workflows/api/invert_and_reconstruct.json --photos ~/photos \\
      --server http://gpu1:8188 --server http://gpu2:8188 --out results
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provision  # noqa: E402  (same folder; standard library only)

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-Inverse"
CACHE_DIR = provision.cache_dir()
PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
TINY_CKPT_NAME = "inverse_tiny_sd15_v1.safetensors"
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}


class RunError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class ServerLost(RunError):
    """The server went away (connection refused or dropped): the work can go to another one."""

    def __init__(self, url: str, why: str):
        super().__init__(f"lost the server {url}: {why}", 1)
        self.url = url


def log(msg: str) -> None:
    print(f"[run_workflow] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# the workflow

def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"workflow {path} does not exist", 2) from None
    except json.JSONDecodeError as exc:
        raise RunError(f"workflow {path} is not valid JSON: {exc}", 2) from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise RunError(f"{path} is a UI-format workflow; export it with 'Export (API)' in ComfyUI or use "
                       f"its twin in workflows/api/", 2)
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise RunError(f"{path} is not an API-format workflow (a mapping of node id -> {{class_type, inputs}})", 2)
    return data


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(prompt: dict, sets: list[str], checkpoint: str | None, image_name: str | None) -> None:
    for item in sets:
        key, sep, value = item.partition("=")
        node_id, dot, name = key.partition(".")
        if not sep or not dot:
            raise RunError(f"--set {item!r}: use NODE_ID.INPUT=VALUE, e.g. --set 7.steps=20", 2)
        if node_id not in prompt:
            raise RunError(f"--set {item!r}: the workflow has no node {node_id!r} (it has {', '.join(prompt)})", 2)
        prompt[node_id]["inputs"][name] = parse_value(value)
    for node in prompt.values():
        if checkpoint and node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = checkpoint
        if image_name and node["class_type"] in IMAGE_LOADERS:
            node["inputs"]["image"] = image_name


# ---------------------------------------------------------------------------------------------
# the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack_installed_in(comfy_dir: Path) -> bool:
    nodes_dir = comfy_dir / "custom_nodes"
    if not nodes_dir.is_dir():
        return False
    return any(p.resolve() == ROOT for p in nodes_dir.iterdir() if p.is_dir())


def tiny_checkpoint(comfy_dir: Path) -> Path:
    path = CACHE_DIR / "checkpoints" / TINY_CKPT_NAME
    if not path.is_file():
        log(f"generating the tiny random-weight test checkpoint in {path.parent} (once)")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(path),
                        "--comfyui", str(comfy_dir)], check=True)
    return path


def testbed_checkpoint(comfy_dir: Path) -> Path:
    """The trained testbed checkpoint (scripts/testbed.py), assembled into the same cache folder once
    for the committed weights (again when they change)."""
    import testbed

    path = CACHE_DIR / "checkpoints" / testbed.CKPT_NAME
    if not testbed.is_assembled(path):
        log(f"assembling the trained testbed checkpoint in {path.parent} (once)")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "testbed.py"), str(path), "--comfyui", str(comfy_dir)],
                       check=True)
    return path


def default_comfyui() -> str:
    """$COMFYUI_PATH, else the host scripts/provision.py finds without provisioning, else ~/ComfyUI."""
    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    try:
        host = provision.find_host(provision=False)
    except provision.ProvisionError:
        host = None
    return str(host.path) if host else "~/ComfyUI"


class LocalComfy:
    """A ComfyUI started from a checkout on 127.0.0.1, stopped on exit. With ``scratch`` its
    input/output/temp/user folders are a temporary folder's (headless runs); without, ComfyUI's
    own (the UI)."""

    def __init__(self, comfy_dir: Path, extra_checkpoints: Path | None, cpu: bool | None, extra_args: list[str],
                 port: int | None = None, scratch: bool = True, env: dict | None = None, extra_nodes: tuple = ()):
        if not (comfy_dir / "main.py").is_file():
            raise RunError(f"no ComfyUI at {comfy_dir}: pass --comfyui PATH, set COMFYUI_PATH, or use "
                           f"--server URL for a running ComfyUI", 2)
        self.dir = comfy_dir
        self.tmp = Path(tempfile.mkdtemp(prefix="comfyui-inverse-run-"))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        yaml = ["comfyui_inverse:"]
        links = [] if pack_installed_in(comfy_dir) else [(PACK_DIR_NAME, ROOT)]
        links += [(Path(d).name, Path(d)) for d in extra_nodes]  # more node folders (the tests' stand-ins)
        if links:
            nodes_dir = self.tmp / "custom_nodes"
            nodes_dir.mkdir()
            for name, target in links:
                (nodes_dir / name).symlink_to(target, target_is_directory=True)
            yaml.append(f"  custom_nodes: {nodes_dir}")
        if extra_checkpoints is not None:
            yaml.append(f"  checkpoints: {extra_checkpoints}")
        (self.tmp / "extra_model_paths.yaml").write_text("\n".join(yaml) + "\n")
        if cpu is None:
            import torch

            cpu = not (torch.cuda.is_available() or getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        self.cmd = [sys.executable, str(ROOT / "scripts" / "comfy_boot.py"), str(comfy_dir),
                    "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                    "--extra-model-paths-config", str(self.tmp / "extra_model_paths.yaml")]
        if scratch:
            for sub in ("output", "input", "temp", "user"):
                (self.tmp / sub).mkdir()
            self.cmd += ["--output-directory", str(self.tmp / "output"), "--input-directory", str(self.tmp / "input"),
                         "--temp-directory", str(self.tmp / "temp"), "--user-directory", str(self.tmp / "user"),
                         "--database-url", "sqlite:///:memory:"]
        if cpu:
            self.cmd.append("--cpu")
        self.cmd += extra_args
        self.log_path = self.tmp / "comfyui.log"
        self.proc = None

    def start(self, timeout: float) -> None:
        log(f"starting ComfyUI from {self.dir} on {self.url} (log: {self.log_path})")
        self.log_file = open(self.log_path, "w")
        env = None if self.env is None else {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=str(self.tmp),
                                     env=env)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()


def start_local_servers(servers: list, timeout: float) -> None:
    """Starts local ComfyUIs and blocks until every one answers (for tests and benches)."""
    for s in servers:
        s.start(timeout)

    async def ready():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(wait_ready(session, s.url, s, timeout) for s in servers))

    asyncio.run(ready())


# ---------------------------------------------------------------------------------------------
# talking to it

async def wait_ready(session, url: str, local: LocalComfy | None, timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if local is not None and local.exited():
            raise RunError(f"ComfyUI exited during start-up (code {local.proc.returncode}). Its log ends:\n"
                           f"{local.log_tail()}", 2)
        try:
            async with session.get(f"{url}/system_stats") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise RunError(f"ComfyUI at {url} did not answer within {timeout:.0f} s" +
                   (f"; its log ends:\n{local.log_tail()}" if local else ""), 2)


async def check_nodes(session, url: str, prompt: dict, local: LocalComfy | None) -> None:
    async with session.get(f"{url}/object_info") as r:
        info = await r.json()
    missing = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in info})
    if missing:
        hint = ""
        if any(m.startswith("Inverse") for m in missing):
            hint = (" The ComfyUI-Inverse nodes did not load: install the pack into ComfyUI/custom_nodes "
                    "(see README) and check the server log for an import error.")
        raise RunError(f"the server {url} does not know the node types {', '.join(missing)}.{hint}" +
                       (f"\nServer log ends:\n{local.log_tail()}" if local else ""), 2)


async def upload_image(session, url: str, path: Path, name: str | None = None) -> str:
    if not path.is_file():
        raise RunError(f"--image {path}: no such file", 2)
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", path.read_bytes(), filename=name or path.name, content_type="application/octet-stream")
    form.add_field("overwrite", "true")
    async with session.post(f"{url}/upload/image", data=form) as r:
        if r.status != 200:
            raise RunError(f"uploading {path} failed: HTTP {r.status} {await r.text()}", 2)
        body = await r.json()
    return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]


def format_node_errors(body: dict, prompt: dict) -> str:
    lines = [str(body.get("error", {}).get("message", "the workflow was rejected"))]
    details = body.get("error", {}).get("details")
    if details:
        lines.append(str(details))
    for node_id, err in (body.get("node_errors") or {}).items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title", err.get("class_type", ""))
        for e in err.get("errors", []):
            lines.append(f"  node {node_id} ({title}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


async def run_prompt(session, url: str, prompt: dict, timeout: float, say=None, on_queued=None) -> dict:
    """Queue ``prompt`` on ``url``, follow it over the websocket and return its history entry.
    ``say(line)`` gets the progress lines (default: print them); ``on_queued(prompt_id)`` is called
    once the server accepted the prompt."""
    say = say or (lambda line: print(line, flush=True))
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    async with session.ws_connect(ws_url, heartbeat=30) as ws:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
            body = await r.json()
            if r.status != 200:
                raise RunError(format_node_errors(body, prompt), 2)
        prompt_id = body["prompt_id"]
        say(f"[run_workflow] queued prompt {prompt_id}")
        if on_queued is not None:
            on_queued(prompt_id)
        titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
        deadline = time.monotonic() + timeout
        last_line = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(f"the workflow did not finish within {timeout:.0f} s", 1)
            try:
                msg = await ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                raise RunError(f"the workflow did not finish within {timeout:.0f} s", 1) from None
            if msg.type != 1:  # aiohttp.WSMsgType.TEXT; binary frames are previews
                if msg.type in (8, 256, 257, 258):  # CLOSE, CLOSING, CLOSED, ERROR
                    raise ServerLost(url, "it closed the connection while running the workflow")
                continue
            data = json.loads(msg.data)
            kind, d = data.get("type"), data.get("data", {})
            if d.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "executing" and d.get("node") is not None:
                node = d["node"]
                say(f"[run_workflow] node {node}: {titles.get(node, node)}")
            elif kind == "progress":
                line = f"  step {d['value']}/{d['max']}"
                if line != last_line and (d["value"] == d["max"] or d["value"] % max(1, d["max"] // 10) == 0):
                    say(line)
                    last_line = line
            elif kind == "execution_error":
                raise RunError(f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                               f"{d.get('exception_type')}: {d.get('exception_message')}", 1)
            elif kind == "execution_interrupted":
                raise RunError(f"the run was interrupted at node {d.get('node_id')} ({d.get('node_type')})", 130)
            elif kind == "execution_success" or (kind == "executing" and d.get("node") is None
                                                 and d.get("prompt_id") == prompt_id):
                break
    # the server stores the history just after it reports success: wait for it
    for _ in range(120):
        async with session.get(f"{url}/history/{prompt_id}") as r:
            entry = (await r.json()).get(prompt_id)
        if entry and entry.get("status", {}).get("completed", entry.get("outputs") is not None):
            return entry
        await asyncio.sleep(0.25)
    raise RunError(f"the server reported success but kept no history for prompt {prompt_id}", 1)


def node_reports(history: dict) -> list[str]:
    """The text the workflow's nodes showed (e.g. a Preview Any of an inversion's report)."""
    return [str(t) for outputs in (history.get("outputs") or {}).values() for t in outputs.get("text", [])]


async def download_outputs(session, url: str, history: dict, out_dir: Path) -> list[Path]:
    saved = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for node_id, outputs in (history.get("outputs") or {}).items():
        for item in outputs.get("images", []):
            if item.get("type") != "output":
                continue
            params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": "output"}
            async with session.get(f"{url}/view", params=params) as r:
                if r.status != 200:
                    raise RunError(f"could not fetch output {item['filename']}: HTTP {r.status}", 1)
                target = out_dir / item.get("subfolder", "") / item["filename"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(await r.read())
                saved.append(target)
    return saved


def connection_errors() -> tuple:
    import aiohttp

    return (aiohttp.ClientConnectionError, ConnectionError)


# ---------------------------------------------------------------------------------------------
# a folder of photos over several servers

def collect_photos(paths: list[str]) -> list[Path]:
    """Image files from folders (sorted, not recursive) and files given directly, each once."""
    photos: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            photos += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        elif p.is_file():
            photos.append(p)
        else:
            raise RunError(f"--photos {p}: no such file or folder", 2)
    photos = list(dict.fromkeys(p.resolve() for p in photos))
    if not photos:
        raise RunError(f"--photos {' '.join(paths)}: no image files ({', '.join(sorted(PHOTO_SUFFIXES))})", 2)
    return photos


def photo_names(photos: list[Path]) -> dict[Path, str]:
    """A distinct, file-system-safe name per photo (its stem; the suffix too where stems clash)."""
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in photos:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem) or "photo"
        name, i = base, 1
        if name in used:
            name = f"{base}_{p.suffix.lstrip('.').lower()}"
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        names[p] = name
    return names


def prompt_for_photo(template: dict, image_name: str, photo_name: str) -> dict:
    """The workflow for one photo: every image loader reads it, every saved file is named after it."""
    prompt = copy.deepcopy(template)
    for node in prompt.values():
        if node["class_type"] in IMAGE_LOADERS:
            node["inputs"]["image"] = image_name
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            head, _, tail = prefix.rpartition("/")
            node["inputs"]["filename_prefix"] = f"{head + '/' if head else ''}{photo_name}_{tail}"
    return prompt


@dataclass
class PhotoResult:
    photo: Path
    name: str
    status: str = "pending"  # ok, failed
    server: str = ""
    seconds: float = 0.0
    attempts: int = 0
    servers_tried: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    error: str = ""

    def row(self) -> dict:
        return {"photo": str(self.photo), "name": self.name, "server": self.server, "seconds": round(self.seconds, 2),
                "status": self.status, "attempts": self.attempts, "servers_tried": self.servers_tried,
                "outputs": [str(o) for o in self.outputs], "reports": self.reports, "error": self.error}


async def run_batch(template: dict, photos: list[Path], urls: list[str], out_dir: Path, timeout: float,
                    on_event=None, max_attempts: int | None = None) -> list[PhotoResult]:
    """Run ``template`` once per photo over the servers at ``urls``: each server takes the next
    photo when it has finished its last one; a photo whose server is lost goes back to the others
    (at most ``max_attempts`` servers, default all of them); a failing photo is recorded, the rest
    go on. ``on_event(kind, url, result)`` sees "start", "queued", "done", "failed" and "lost"."""
    import aiohttp

    names = photo_names(photos)
    results = {p: PhotoResult(p, names[p]) for p in photos}
    waiting = deque(photos)
    unresolved = len(photos)
    max_attempts = max_attempts or len(urls)
    event = on_event or (lambda kind, url, result: None)
    lost_errors = connection_errors()

    async def worker(session, url: str) -> None:
        nonlocal unresolved
        while unresolved:
            if not waiting:  # another server may still lose its photo: stay available
                await asyncio.sleep(0.1)
                continue
            photo = waiting.popleft()
            res = results[photo]
            res.attempts += 1
            res.servers_tried.append(url)
            t0 = time.monotonic()
            event("start", url, res)
            try:
                image = await upload_image(session, url, photo, name=f"{res.name}{photo.suffix.lower()}")
                prompt = prompt_for_photo(template, image, res.name)
                history = await run_prompt(session, url, prompt, timeout, say=lambda line: None,
                                           on_queued=lambda prompt_id: event("queued", url, res))
                res.outputs = await download_outputs(session, url, history, out_dir / res.name)
                res.reports = node_reports(history)
                res.status, res.error = "ok", ""
            except (ServerLost, *lost_errors) as exc:
                res.error = str(exc) if isinstance(exc, ServerLost) else f"lost the server {url}: {exc!r}"
                event("lost", url, res)
                if res.attempts < max_attempts:
                    waiting.appendleft(photo)
                else:
                    res.status = "failed"
                    unresolved -= 1
                return  # this server is gone: the others finish the work
            except RunError as exc:
                res.status, res.error = "failed", str(exc)
            res.server, res.seconds = url, time.monotonic() - t0
            unresolved -= 1
            event("done" if res.status == "ok" else "failed", url, res)

    timeout_cfg = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout_cfg) as session:
        await asyncio.gather(*(worker(session, u) for u in urls))
    for res in results.values():
        if res.status == "pending":
            res.status = "failed"
            res.error = res.error or "every server was lost before this photo could run"
    return [results[p] for p in photos]


def write_summary(results: list[PhotoResult], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "server", "seconds", "status", "attempts", "outputs", "reports", "error"])
        for r in rows:
            w.writerow([r["photo"], r["server"], r["seconds"], r["status"], r["attempts"], len(r["outputs"]),
                        " | ".join(r["reports"]), r["error"]])
    width = max(len(r.name) for r in results)
    print(f"{'photo':<{width}}  {'server':<24}  {'seconds':>7}  {'status':<6}  tries  report / error")
    for r in results:
        note = r.error if r.status != "ok" else (" | ".join(r.reports) or f"{len(r.outputs)} image(s)")
        print(f"{r.name:<{width}}  {r.server or '-':<24}  {r.seconds:7.1f}  {r.status:<6}  {r.attempts:>5}  "
              f"{note[:100]}")


# ---------------------------------------------------------------------------------------------
# the command line

def start_servers(args, comfy_dir: Path, extra_ckpt_dir: Path | None, count: int) -> list[LocalComfy]:
    env = {"OMP_NUM_THREADS": str(args.threads_per_server)} if args.threads_per_server else None
    servers = [LocalComfy(comfy_dir, extra_ckpt_dir, True if args.cpu else None, args.comfy_arg, env=env)
               for _ in range(count)]
    for s in servers:
        s.start(args.startup_timeout)
    return servers


async def main_async(args) -> int:
    import aiohttp

    prompt = load_workflow(Path(args.workflow))
    comfy_dir = Path(os.path.expanduser(args.comfyui)).resolve()
    checkpoint = args.checkpoint
    extra_ckpt_dir = None
    n_local = args.local_servers if args.local_servers is not None else (0 if args.server else 1)
    if args.tiny_checkpoint and args.testbed:
        raise RunError("use either --tiny-checkpoint or --testbed, not both", 2)
    if args.tiny_checkpoint or args.testbed:
        flag = "--tiny-checkpoint" if args.tiny_checkpoint else "--testbed"
        if n_local == 0:
            raise RunError(f"{flag} needs a locally started ComfyUI (leave out --server, or add "
                           "--local-servers N)", 2)
        made = (tiny_checkpoint if args.tiny_checkpoint else testbed_checkpoint)(comfy_dir)
        extra_ckpt_dir, checkpoint = made.parent, made.name
    photos = collect_photos(args.photos) if args.photos else None
    if photos is not None and args.image:
        raise RunError("use either --image (one photo) or --photos (a batch), not both", 2)
    locals_ = start_servers(args, comfy_dir, extra_ckpt_dir, n_local)
    urls = [u.rstrip("/") for u in args.server] + [s.url for s in locals_]
    try:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            by_url = {s.url: s for s in locals_}
            ready = await asyncio.gather(*(wait_ready(session, u, by_url.get(u), args.startup_timeout) for u in urls),
                                         return_exceptions=True)
            for url, r in zip(list(urls), ready):
                if isinstance(r, BaseException):
                    if photos is None or len(urls) == 1:
                        raise r
                    log(f"leaving out {url}: {r}")  # a batch goes on with the servers that answer
                    urls.remove(url)
            apply_overrides(prompt, args.set, checkpoint, None)
            for url in urls:
                await check_nodes(session, url, prompt, by_url.get(url))
            if photos is None:
                return await run_single(session, urls[0], by_url.get(urls[0]), prompt, args)
        return await run_photos(prompt, photos, urls, args)
    except RunError as exc:
        if exc.code == 1:
            for s in locals_:
                print(f"ComfyUI log ({s.url}) ends:\n{s.log_tail(25)}", file=sys.stderr)
        raise
    finally:
        for s in locals_:
            s.stop()
            if not args.keep_temp:
                shutil.rmtree(s.tmp, ignore_errors=True)


async def run_single(session, url: str, local: LocalComfy | None, prompt: dict, args) -> int:
    image_name = await upload_image(session, url, Path(args.image)) if args.image else None
    for node in prompt.values():
        if node["class_type"] in IMAGE_LOADERS:
            own = ROOT / "workflows" / "input" / str(node["inputs"].get("image", ""))
            if image_name is not None:
                node["inputs"]["image"] = image_name
            elif own.is_file():  # the example workflows' own input images travel with them
                node["inputs"]["image"] = await upload_image(session, url, own)
    t0 = time.monotonic()
    history = await run_prompt(session, url, prompt, args.timeout)
    for text in node_reports(history):
        log(f"a node says: {text}")
    saved = await download_outputs(session, url, history, Path(args.out))
    log(f"finished in {time.monotonic() - t0:.1f} s; {len(saved)} output file(s) in {args.out}:")
    for p in saved:
        print(f"  {p}")
    if not saved:
        raise RunError("the workflow ran but produced no output images (does it end in SaveImage?)", 1)
    return 0


async def run_photos(prompt: dict, photos: list[Path], urls: list[str], args) -> int:
    def on_event(kind, url, res):
        if kind == "queued":
            return
        if kind == "start":
            log(f"{res.name}: started on {url} (attempt {res.attempts})")
        elif kind == "lost":
            log(f"{res.name}: {res.error}; handing it to another server")
        else:
            log(f"{res.name}: {kind} on {url} in {res.seconds:.1f} s" + (f": {res.error}" if res.error else ""))

    out = Path(args.out)
    log(f"{len(photos)} photo(s) over {len(urls)} server(s): {', '.join(urls)}")
    t0 = time.monotonic()
    results = await run_batch(prompt, photos, urls, out, args.timeout, on_event)
    write_summary(results, out)
    failed = [r for r in results if r.status != "ok"]
    log(f"{len(results) - len(failed)}/{len(results)} photo(s) done in {time.monotonic() - t0:.1f} s; "
        f"summary in {out / 'summary.csv'}")
    return 1 if failed else 0


def serve(args) -> int:
    """Start ComfyUI's UI with the pack loaded and the testbed and tiny checkpoints listed; wait for Ctrl-C."""
    comfy_dir = Path(os.path.expanduser(args.comfyui)).resolve()
    tiny_checkpoint(comfy_dir)
    local = LocalComfy(comfy_dir, testbed_checkpoint(comfy_dir).parent, True if args.cpu else None, args.comfy_arg,
                       port=args.port, scratch=False)
    log(f"ComfyUI {provision.comfyui_version(comfy_dir)} from {comfy_dir} with ComfyUI-Inverse: open {local.url} "
        f"(Ctrl-C stops it)")
    try:
        return subprocess.call(local.cmd, cwd=str(comfy_dir))
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(local.tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", nargs="?", help="API-format workflow JSON (e.g. workflows/api/invert_and_reconstruct.json)")
    ap.add_argument("--comfyui", default=default_comfyui(),
                    help="ComfyUI checkout to start (default: $COMFYUI_PATH, else the provisioned host, else ~/ComfyUI)")
    ap.add_argument("--server", action="append", default=[], metavar="URL",
                    help="URL of a running ComfyUI instead of starting one; repeatable (photos are spread over them)")
    ap.add_argument("--local-servers", type=int, metavar="N",
                    help="start N ComfyUIs here (default 1 without --server, else 0)")
    ap.add_argument("--photos", nargs="+", metavar="PATH",
                    help="run the workflow once per photo: folders (their image files) and/or files")
    ap.add_argument("--checkpoint", help="set ckpt_name of every CheckpointLoaderSimple node")
    ap.add_argument("--testbed", action="store_true",
                    help="use the small trained testbed checkpoint (Fashion-MNIST items at 48 px; assembled once "
                         "into the cache folder from tests/data): real pictures on any machine")
    ap.add_argument("--tiny-checkpoint", action="store_true",
                    help="use a generated random-weight SD1.5-format checkpoint (no download; output is noise)")
    ap.add_argument("--image", help="upload this image and use it in every LoadImage node")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override a node input (JSON value or string); repeatable")
    ap.add_argument("--out", default="out", help="folder for the output images (default: ./out)")
    ap.add_argument("--cpu", action="store_true", help="start ComfyUI with --cpu (default: only without a GPU)")
    ap.add_argument("--threads-per-server", type=int, help="OMP_NUM_THREADS for each started ComfyUI")
    ap.add_argument("--comfy-arg", action="append", default=[], help="extra argument for ComfyUI's main.py")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one run of the workflow may take")
    ap.add_argument("--startup-timeout", type=float, default=180, help="seconds ComfyUI may take to start")
    ap.add_argument("--keep-temp", action="store_true", help="keep the started servers' temp folders and logs")
    ap.add_argument("--serve", action="store_true",
                    help="no workflow: start ComfyUI's UI with the pack and the testbed and tiny checkpoints, "
                         "until Ctrl-C")
    ap.add_argument("--port", type=int, default=8188, help="port for --serve (default 8188)")
    args = ap.parse_args(argv)
    try:
        if args.serve:
            return serve(args)
        if not args.workflow:
            raise RunError("give an API-format workflow (e.g. workflows/api/invert_and_reconstruct.json)", 2)
        return asyncio.run(main_async(args))
    except RunError as exc:
        print(f"[run_workflow] error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("[run_workflow] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
