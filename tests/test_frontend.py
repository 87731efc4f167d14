"""Every UI workflow in ComfyUI's real frontend (headless Chromium, scripts/frontend.py).

Loaded through ``app.loadGraphData``: no missing node type, every widget value valid for its
widget and unchanged by the load, no lost link, the missing-models dialog names the checkpoint;
converted with the frontend's own ``app.graphToPrompt()``: equal to the API twin; laid out for
people: groups, a note, no overlapping nodes, no node smaller than the frontend needs, and the whole
graph on the canvas at the saved view, off the frontend's own panels; queued through the frontend
after shrinking it through its widgets (64 px, 3 steps): the server reports success.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest

import frontend  # scripts/
import ui_workflows  # scripts/
from support import comfy_host, workflow_runs

# the frontend this module runs (test_frontend_newest.py runs the same tests on the newest one)
VERSION = frontend.PINNED
pytestmark = [pytest.mark.skipif(not comfy_host.HOST_FOUND, reason=comfy_host.MISSING_REASON),
              pytest.mark.skipif(frontend.missing_reason(VERSION) is not None, reason=str(frontend.missing_reason(VERSION)))]

STEMS = [m[0] for m in ui_workflows.MANIFEST]
SHOTS = Path(os.environ.get("COMFYUI_INVERSE_SCREENSHOTS", Path(tempfile.gettempdir()) / "comfyui-inverse-screenshots"))


@pytest.fixture(scope="module")
def fe(request):
    comfy_host.tiny_checkpoint()
    with frontend.FrontendSession(comfy_host.COMFYUI_PATH, comfy_host.testbed_checkpoint().parent,
                                  comfy_host.ROOT / "workflows" / "input", (comfy_host.HOST_NODES,),
                                  comfy_host.host_nodes_env(), version=request.module.VERSION) as f:
        f.version = request.module.VERSION
        f.blocked = f.blocked_cells()
        f.canvas = f.canvas_rect()
        yield f


def _load(fe, stem):
    ui = json.loads(ui_workflows.ui_file(stem).read_text())
    dialogs = fe.load(ui)
    return ui, dialogs, fe.snapshot()


def test_every_api_workflow_has_a_ui_twin_and_thumbnail():
    assert sorted(STEMS) == sorted(p.stem for p in (comfy_host.ROOT / "workflows" / "api").glob("*.json"))
    ui_files = sorted((comfy_host.ROOT / "workflows").glob("*.json"))
    assert sorted(ui_workflows.ui_file(s) for s in STEMS) == ui_files
    for path in ui_files:
        assert path.with_suffix(".jpg").is_file(), f"no template thumbnail for {path.name}"


def test_template_browser_lists_the_workflows_in_reading_order(fe):
    # the server lists a pack's files in the file system's order; the pack's middleware sorts them
    # (nodes/comfy/server.py) and the frontend shows them as listed (the first cards, lazily drawn)
    ui_files = sorted(p.stem for p in (comfy_host.ROOT / "workflows").glob("*.json"))
    shown = [t for t in fe.template_titles(comfy_host.PACK_DIR_NAME) if t in set(ui_files)]
    shown = [t for i, t in enumerate(shown) if t not in shown[:i]]
    assert len(shown) >= 12 and shown == ui_files[:len(shown)], shown


def check_loaded_as_saved(snap: dict, ui: dict) -> dict:
    """The graph the frontend loaded is the file's: every node type known to the frontend, every node
    and link kept, every widget value what the file says. Returns the loaded nodes by id."""
    nodes = {n["id"]: n for n in snap["nodes"]}
    assert [n["type"] for n in snap["nodes"] if not n["registered"]] == []
    assert {i: n["type"] for i, n in nodes.items()} == {n["id"]: n["type"] for n in ui["nodes"]}
    kept = {(l["id"], l["origin_id"], l["origin_slot"], l["target_id"], l["target_slot"]) for l in snap["links"]}
    assert kept == {tuple(l[:5]) for l in ui["links"]}
    for n in snap["nodes"]:
        for i in n["inputs"]:
            assert i["link"] is None or any(l["id"] == i["link"] and l["target_id"] == n["id"] for l in snap["links"])
    for saved in ui["nodes"]:
        n = nodes[saved["id"]]
        values = [w["value"] for w in n["widgets"] if w["name"] not in frontend.DISPLAY_ONLY]
        assert values == saved.get("widgets_values", []), f"node {n['id']} {n['title']}: the frontend changed its widgets"
    return nodes


@pytest.mark.parametrize("stem", STEMS)
def test_ui_workflow_loads_converts_and_reads_clearly(fe, stem):
    ui, dialogs, snap = _load(fe, stem)
    api = json.loads((comfy_host.ROOT / "workflows" / "api" / f"{stem}.json").read_text())
    nodes = check_loaded_as_saved(snap, ui)
    # widget values valid for each widget
    for saved in ui["nodes"]:
        n = nodes[saved["id"]]
        for w in n["widgets"]:
            if w["name"] in frontend.NOT_VALUES:
                continue
            where = f"node {n['id']} ({n['title']}) widget {w['name']} = {w['value']!r}"
            assert w["value"] is not None, where
            if w["values"] is not None and w["value"] not in w["values"]:
                assert w["name"] == "ckpt_name" and w["value"] in ui_workflows.CHECKPOINTS, where
            if isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool):
                assert math.isfinite(w["value"]), where
                assert w["min"] is None or w["value"] >= w["min"], where
                assert w["max"] is None or w["value"] <= w["max"], where
    # a downloadable checkpoint, which this server lacks: the missing-models dialog names it (with its
    # download); the trained testbed, which the scripts assemble locally, is listed and nothing is missing
    checkpoint = ui_workflows.checkpoint_of(api)
    if "url" in ui_workflows.CHECKPOINTS[checkpoint]:
        assert any(checkpoint in d for d in dialogs), dialogs
    else:
        assert not any(checkpoint in d for d in dialogs), dialogs
    # the frontend's own conversion is the API twin
    assert fe.queued_prompt() == ui_workflows.normalise_api(api)
    # groups per stage and a note
    assert len(snap["groups"]) >= 3
    assert [n for n in snap["nodes"] if n["type"] == "Note"], "no note"
    # no node smaller than the frontend needs, none overlapping another, each inside a group
    boxes = {n["id"]: n["bounding"] for n in snap["nodes"]}
    for n in snap["nodes"]:
        assert n["size"][0] >= n["min_size"][0] - 0.5 and n["size"][1] >= n["min_size"][1] - 0.5, n["title"]
        x, y, w, h = n["bounding"]
        assert any(gx <= x and gy <= y and x + w <= gx + gw and y + h <= gy + gh
                   for gx, gy, gw, gh in (g["bounding"] for g in snap["groups"])), f"{n['title']} is in no group"
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            ax, ay, aw, ah = boxes[a]
            bx, by, bw, bh = boxes[b]
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), \
                f"{nodes[a]['title']} overlaps {nodes[b]['title']}"
    # the saved view shows everything on the canvas, off the frontend's panels
    rects = [n["bounding"] for n in snap["nodes"]] + [g["bounding"] for g in snap["groups"]]
    assert ui_workflows.fits(rects, snap["scale"], snap["offset"], fe.canvas, fe.blocked, frontend.BLOCK_STEP), \
        f"part of the graph is off screen or under a panel at the saved view (scale {snap['scale']})"
    (SHOTS / fe.version).mkdir(parents=True, exist_ok=True)
    fe.screenshot(SHOTS / fe.version / f"{stem}.png")


def _set_shrunk(fe, stem) -> dict:
    """Shrinks the loaded graph through its widgets (tiny checkpoint, 64 px, 3 steps; a flow model's
    loader swapped for the tests' stand-in) and returns the API prompt that should come out."""
    shrunk = ui_workflows.normalise_api(comfy_host.api_workflow(stem, size=64, steps=3))
    current = fe.queued_prompt()
    for nid, node in shrunk.items():
        if current[nid]["class_type"] != node["class_type"]:
            fe.replace_node(int(nid), node["class_type"])
    current = fe.queued_prompt()
    changes = {}
    for nid, node in shrunk.items():
        for name, value in node["inputs"].items():
            if not isinstance(value, list) and current[nid]["inputs"].get(name) != value:
                changes.setdefault(nid, {})[name] = value
    fe.set_widgets(changes)
    return shrunk


# Queued through the frontend (support/workflow_runs.py): every node type of the pack and every kind of
# graph, every model family. Every workflow's conversion is checked against its API twin above, and every
# API twin runs once in the suite, so queueing the rest would run the same prompts again.
QUEUED = workflow_runs.FRONTEND
# ComfyUI's own image plumbing, used only by restore_compare_methods (which runs on SDXL in test_sdxl.py)
NOT_QUEUED = {"ImageBatch"}


def test_the_queued_workflows_cover_every_node_type_and_family():
    def types(stem):
        return {n["class_type"] for n in comfy_host.api_workflow(stem, size=64, steps=3).values()}

    assert set(QUEUED) <= set(STEMS)
    assert {comfy_host.workflow_family(s) for s in QUEUED} == {comfy_host.workflow_family(s) for s in STEMS}
    everything = set().union(*(types(s) for s in STEMS))
    assert everything - set().union(*(types(s) for s in QUEUED)) == NOT_QUEUED


@pytest.mark.parametrize("stem", QUEUED)
def test_ui_workflow_queues_through_the_frontend(fe, stem):
    check_queues(fe, stem)


def check_queues(fe, stem):
    """Loads, shrinks and queues a workflow through the frontend: the server runs it and every Save
    Image node saves images."""
    _load(fe, stem)
    shrunk = _set_shrunk(fe, stem)
    assert fe.queued_prompt() == shrunk
    entry = fe.queue(timeout=400)
    status = entry["status"]
    assert status.get("status_str") == "success" and status.get("completed"), json.dumps(status)[:3000]
    saves = [k for k, v in shrunk.items() if v["class_type"] == "SaveImage"]
    assert saves and all(entry["outputs"].get(k, {}).get("images") for k in saves), entry["outputs"].keys()
