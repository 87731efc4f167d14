"""Run an API-format ComfyUI workflow headless and save its outputs.

Either starts a ComfyUI from a checkout on 127.0.0.1 (``--comfyui``, default $COMFYUI_PATH or
~/ComfyUI) with this pack loaded, or talks to a running server (``--server http://host:port``).
Shows progress, writes every output image to ``--out`` and exits non-zero with a clear message
when anything fails (0 success, 1 execution error, 2 bad workflow or set-up, 130 interrupted).

Examples:
  python scripts/run_workflow.py workflows/api/invert_and_reconstruct.json \\
      --checkpoint v1-5-pruned-emaonly.safetensors --image my_photo.jpg
  python scripts/run_workflow.py workflows/api/invert_and_reconstruct.json --tiny-checkpoint \\
      --set 5.width=128 --set 5.height=128
  python scripts/run_workflow.py WORKFLOW.json --server http://127.0.0.1:8188
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-Inverse"
CACHE_DIR = Path(os.path.expanduser(os.environ.get("COMFYUI_INVERSE_CACHE", "~/.cache/comfyui-inverse")))
TINY_CKPT_NAME = "inverse_tiny_sd15_v1.safetensors"
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}


class RunError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


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


class LocalComfy:
    """A ComfyUI started from a checkout on 127.0.0.1, stopped on exit."""

    def __init__(self, comfy_dir: Path, extra_checkpoints: Path | None, cpu: bool | None, extra_args: list[str]):
        if not (comfy_dir / "main.py").is_file():
            raise RunError(f"no ComfyUI at {comfy_dir}: pass --comfyui PATH, set COMFYUI_PATH, or use "
                           f"--server URL for a running ComfyUI", 2)
        self.dir = comfy_dir
        self.tmp = Path(tempfile.mkdtemp(prefix="comfyui-inverse-run-"))
        for sub in ("output", "input", "temp", "user"):
            (self.tmp / sub).mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        yaml = ["comfyui_inverse:"]
        if not pack_installed_in(comfy_dir):
            nodes_dir = self.tmp / "custom_nodes"
            nodes_dir.mkdir()
            (nodes_dir / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
            yaml.append(f"  custom_nodes: {nodes_dir}")
        if extra_checkpoints is not None:
            yaml.append(f"  checkpoints: {extra_checkpoints}")
        (self.tmp / "extra_model_paths.yaml").write_text("\n".join(yaml) + "\n")
        if cpu is None:
            import torch

            cpu = not (torch.cuda.is_available() or getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        self.cmd = [sys.executable, str(ROOT / "scripts" / "comfy_boot.py"), str(comfy_dir),
                    "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                    "--extra-model-paths-config", str(self.tmp / "extra_model_paths.yaml"),
                    "--output-directory", str(self.tmp / "output"), "--input-directory", str(self.tmp / "input"),
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
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=str(self.tmp))

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
        raise RunError(f"the server does not know the node types {', '.join(missing)}.{hint}" +
                       (f"\nServer log ends:\n{local.log_tail()}" if local else ""), 2)


async def upload_image(session, url: str, path: Path) -> str:
    import aiohttp

    if not path.is_file():
        raise RunError(f"--image {path}: no such file", 2)
    form = aiohttp.FormData()
    form.add_field("image", path.read_bytes(), filename=path.name, content_type="application/octet-stream")
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


async def run_prompt(session, url: str, prompt: dict, timeout: float) -> dict:
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    async with session.ws_connect(ws_url, heartbeat=30) as ws:
        async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
            body = await r.json()
            if r.status != 200:
                raise RunError(format_node_errors(body, prompt), 2)
        prompt_id = body["prompt_id"]
        log(f"queued prompt {prompt_id}")
        titles = {k: v.get("_meta", {}).get("title", v["class_type"]) for k, v in prompt.items()}
        deadline = time.monotonic() + timeout
        last_line = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(f"the workflow did not finish within {timeout:.0f} s", 1)
            msg = await ws.receive(timeout=remaining)
            if msg.type != 1:  # aiohttp.WSMsgType.TEXT; binary frames are previews
                if msg.type in (8, 256, 257, 258):  # CLOSE, CLOSING, CLOSED, ERROR
                    raise RunError("the server closed the connection", 1)
                continue
            data = json.loads(msg.data)
            kind, d = data.get("type"), data.get("data", {})
            if d.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "executing" and d.get("node") is not None:
                node = d["node"]
                log(f"node {node}: {titles.get(node, node)}")
            elif kind == "progress":
                line = f"  step {d['value']}/{d['max']}"
                if line != last_line and (d["value"] == d["max"] or d["value"] % max(1, d["max"] // 10) == 0):
                    print(line, flush=True)
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


async def download_outputs(session, url: str, history: dict, out_dir: Path) -> list[Path]:
    saved = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for node_id, outputs in (history.get("outputs") or {}).items():
        for text in outputs.get("text", []):
            log(f"node {node_id} says: {text}")
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


async def main_async(args) -> int:
    import aiohttp

    prompt = load_workflow(Path(args.workflow))
    local = None
    comfy_dir = Path(os.path.expanduser(args.comfyui)).resolve()
    checkpoint = args.checkpoint
    extra_ckpt_dir = None
    if args.tiny_checkpoint:
        if args.server:
            raise RunError("--tiny-checkpoint needs a locally started ComfyUI (leave out --server)", 2)
        extra_ckpt_dir = tiny_checkpoint(comfy_dir).parent
        checkpoint = TINY_CKPT_NAME
    if args.server:
        url = args.server.rstrip("/")
    else:
        local = LocalComfy(comfy_dir, extra_ckpt_dir, True if args.cpu else None, args.comfy_arg)
        url = local.url
    try:
        if local:
            local.start(args.startup_timeout)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, url, local, args.startup_timeout)
            image_name = await upload_image(session, url, Path(args.image)) if args.image else None
            if image_name is None and any(n["class_type"] in IMAGE_LOADERS for n in prompt.values()):
                # the example workflows' own input images travel with them
                for node in prompt.values():
                    if node["class_type"] in IMAGE_LOADERS:
                        own = ROOT / "workflows" / "input" / str(node["inputs"].get("image", ""))
                        if own.is_file():
                            node["inputs"]["image"] = await upload_image(session, url, own)
            apply_overrides(prompt, args.set, checkpoint, image_name)
            await check_nodes(session, url, prompt, local)
            t0 = time.monotonic()
            history = await run_prompt(session, url, prompt, args.timeout)
            saved = await download_outputs(session, url, history, Path(args.out))
        log(f"finished in {time.monotonic() - t0:.1f} s; {len(saved)} output file(s) in {args.out}:")
        for p in saved:
            print(f"  {p}")
        if not saved:
            raise RunError("the workflow ran but produced no output images (does it end in SaveImage?)", 1)
        return 0
    except RunError as exc:
        if local is not None and exc.code == 1:
            print(f"ComfyUI log ends:\n{local.log_tail(25)}", file=sys.stderr)
        raise
    finally:
        if local is not None:
            local.stop()
            if not args.keep_temp:
                shutil.rmtree(local.tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/invert_and_reconstruct.json)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "~/ComfyUI"),
                    help="ComfyUI checkout to start (default: $COMFYUI_PATH or ~/ComfyUI)")
    ap.add_argument("--server", help="URL of an already running ComfyUI instead of starting one")
    ap.add_argument("--checkpoint", help="set ckpt_name of every CheckpointLoaderSimple node")
    ap.add_argument("--tiny-checkpoint", action="store_true",
                    help="use a generated random-weight SD1.5-format checkpoint (no download; output is noise)")
    ap.add_argument("--image", help="upload this image and use it in every LoadImage node")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override a node input (JSON value or string); repeatable")
    ap.add_argument("--out", default="out", help="folder for the output images (default: ./out)")
    ap.add_argument("--cpu", action="store_true", help="start ComfyUI with --cpu (default: only without a GPU)")
    ap.add_argument("--comfy-arg", action="append", default=[], help="extra argument for ComfyUI's main.py")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds the run may take")
    ap.add_argument("--startup-timeout", type=float, default=180, help="seconds ComfyUI may take to start")
    ap.add_argument("--keep-temp", action="store_true", help="keep the started server's temp folder and log")
    args = ap.parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except RunError as exc:
        print(f"[run_workflow] error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("[run_workflow] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
