"""Headless throughput: a folder of 8 photos through the example workflow over 1 and 2 local
ComfyUI servers (CPU, the tiny random-weight checkpoint), with the runner's batch mode.

    python bench/headless.py            # 128 px, 30 steps per inversion/reconstruction
    python bench/headless.py --quick    # 64 px, 10 steps: a couple of minutes on 2 CPU cores

Each server count gets fresh servers (each with OMP_NUM_THREADS = cores / servers unless
--threads-per-server is given), one warm-up photo per server (model loading, excluded), then the
8 photos are timed through ComfyUI's own queues. Prints a table and, as its last line, one JSON
object: photos per minute for each server count and the 2-server / 1-server ratio. Run it with
the host's Python (scripts/provision.py prints it; `bash scripts/test.sh` creates it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)
import provision
import run_workflow

ROOT = Path(__file__).resolve().parents[1]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry",
          "retina")


def make_photos(folder: Path, size: int) -> list[Path]:
    import numpy as np
    from PIL import Image
    from skimage import data

    paths = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs: the left view
        img = Image.fromarray(np.asarray(arr)).convert("RGB").resize((size * 2, size * 2))
        img.save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def workflow(size: int, steps: int) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "invert_and_reconstruct.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = run_workflow.TINY_CKPT_NAME
        if node["class_type"] == "ImageScale":
            node["inputs"]["width"] = node["inputs"]["height"] = size
        if node["class_type"] == "InverseDDIMInversion":
            node["inputs"]["steps"] = steps
    return prompt


def measure(n: int, comfy_dir: Path, ckpt_dir: Path, prompt: dict, photos: list[Path], warm: Path, out: Path,
            threads: int) -> dict:
    servers = [run_workflow.LocalComfy(comfy_dir, ckpt_dir, True, [], env={"OMP_NUM_THREADS": str(threads)})
               for _ in range(n)]
    try:
        run_workflow.start_local_servers(servers, 300)
        urls = [s.url for s in servers]
        for u in urls:  # warm-up: one photo per server, not timed
            r = asyncio.run(run_workflow.run_batch(prompt, [warm], [u], out / f"warm-{n}", 1800))
            assert r[0].status == "ok", r[0].error
        t0 = time.perf_counter()
        results = asyncio.run(run_workflow.run_batch(prompt, photos, urls, out / f"servers-{n}", 1800))
        seconds = time.perf_counter() - t0
    finally:
        for s in servers:
            s.stop()
            shutil.rmtree(s.tmp, ignore_errors=True)
    failed = [r.name for r in results if r.status != "ok"]
    if failed:
        raise SystemExit(f"photos failed with {n} server(s): {failed}")
    per_server = {u: sum(r.server == u for r in results) for u in urls}
    return {"servers": n, "threads_per_server": threads, "seconds": round(seconds, 2),
            "photos_per_minute": round(60 * len(photos) / seconds, 3),
            "photos_per_server": sorted(per_server.values(), reverse=True),
            "mean_seconds_per_photo": round(sum(r.seconds for r in results) / len(results), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads-per-server", type=int, help="default: cores / servers")
    args = ap.parse_args()
    size = args.size or (64 if args.quick else 128)
    steps = args.steps or (10 if args.quick else 30)
    host = provision.find_host(provision=False)
    if host is None:
        raise SystemExit("no ComfyUI host: run `bash scripts/quickstart.sh` (or scripts/test.sh) first, "
                         "or set COMFYUI_PATH")
    cores = os.cpu_count() or 1
    ckpt_dir = run_workflow.tiny_checkpoint(host.path).parent
    tmp = Path(tempfile.mkdtemp(prefix="bench-headless-"))
    try:
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", size)
        warm = photos[0]
        prompt = workflow(size, steps)
        print(f"ComfyUI {host.version} at {host.path}; {len(photos)} photos at {size} px, {steps} steps; "
              f"{cores} cores", flush=True)
        rows = []
        for n in (1, 2):
            threads = args.threads_per_server or max(1, cores // n)
            row = measure(n, host.path, ckpt_dir, prompt, photos, warm, tmp, threads)
            rows.append(row)
            print(f"{n} server(s), {threads} thread(s) each: {row['seconds']:.1f} s, "
                  f"{row['photos_per_minute']:.2f} photos/min, photos per server {row['photos_per_server']}, "
                  f"{row['mean_seconds_per_photo']:.1f} s per photo on its server", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"bench": "headless", "size": size, "steps": steps, "photos": len(photos), "cores": cores,
              "comfyui": host.version, "runs": rows,
              "photos_per_minute": {str(r["servers"]): r["photos_per_minute"] for r in rows},
              "ratio_2_over_1": round(rows[1]["photos_per_minute"] / rows[0]["photos_per_minute"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
