"""The headless runner over a folder of photos and several real ComfyUI servers."""
from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import run_workflow  # scripts/
from support import comfy_host

comfy_host.skip_module_without_host()

GOOD = ("astronaut", "chelsea", "coffee", "rocket")


def _workflow() -> dict:
    prompt = comfy_host.api_workflow("invert_and_reconstruct", size=64, steps=6)
    prompt["7"]["inputs"]["steps"] = 6
    return prompt


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    for name in GOOD:
        Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize((96, 96)).save(d / f"{name}.png")
    (d / "broken.png").write_bytes(b"this is not an image\n" * 10)
    (d / "notes.txt").write_text("not a photo: ignored")
    return d


@pytest.fixture(scope="module")
def two_servers():
    ckpt_dir = comfy_host.tiny_checkpoint().parent
    servers = [run_workflow.LocalComfy(comfy_host.COMFYUI_PATH, ckpt_dir, True, [], env={"OMP_NUM_THREADS": "1"})
               for _ in range(2)]
    run_workflow.start_local_servers(servers, 180)
    yield servers
    for s in servers:
        s.stop()


def test_runner_cli_over_a_folder_reports_a_bad_photo_and_a_dead_server(two_servers, photos, tmp_path):
    alive = two_servers[0].url
    dead = f"http://127.0.0.1:{run_workflow.free_port()}"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(_workflow()))
    r = subprocess.run([sys.executable, str(comfy_host.ROOT / "scripts" / "run_workflow.py"), str(wf),
                        "--photos", str(photos / "astronaut.png"), str(photos / "broken.png"),
                        "--server", alive, "--server", dead, "--startup-timeout", "3", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr  # one photo failed
    assert f"leaving out {dead}" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    status = {row["photo"].rsplit("/", 1)[-1]: row for row in rows}
    assert status["astronaut.png"]["status"] == "ok" and status["astronaut.png"]["server"] == alive
    assert status["broken.png"]["status"] == "failed" and "LoadImage" in status["broken.png"]["error"]
    assert len(list((tmp_path / "out" / "astronaut").rglob("astronaut_*.png"))) == 3


def test_photos_spread_over_two_servers_survive_a_killed_server(two_servers, photos, tmp_path):
    a, b = two_servers
    killed = {}

    def on_event(kind, url, res):
        # kill server b while it holds a queued good photo: that photo must finish on a
        if kind == "queued" and url == b.url and res.name != "broken" and not killed:
            killed["photo"] = res.name
            b.proc.kill()

    found = run_workflow.collect_photos([str(photos)])
    assert sorted(p.name for p in found) == sorted([f"{n}.png" for n in GOOD] + ["broken.png"])
    results = asyncio.run(run_workflow.run_batch(_workflow(), found, [a.url, b.url], tmp_path, 600, on_event))
    run_workflow.write_summary(results, tmp_path)
    by_name = {r.name: r for r in results}
    assert killed, "server b never got a good photo before the others were done"

    # the killed server's photo was finished on the other one
    moved = by_name[killed["photo"]]
    assert moved.status == "ok" and moved.server == a.url and moved.servers_tried == [b.url, a.url]
    # every good photo processed once, its outputs named after it; the bad one reported
    for name in GOOD:
        r = by_name[name]
        assert r.status == "ok", r.error
        files = sorted((tmp_path / name).rglob("*.png"))
        assert len(files) == 3 and all(f.name.startswith(f"{name}_") for f in files), files
        assert sorted(map(str, files)) == sorted(map(str, r.outputs))
    assert by_name["broken"].status == "failed" and "LoadImage" in by_name["broken"].error
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(row["name"] for row in summary) == sorted([*GOOD, "broken"])
    assert all(row["seconds"] > 0 for row in summary if row["status"] == "ok")
