"""The example workflows (workflows/api/*.json and their UI twins, workflows/*.json) on the real ComfyUI
with the tiny SD1.5: each one runs once in the suite (in-process here, unless it runs on SDXL or
through the frontend: support/workflow_runs.py), keeps its seeds fixed, and is the twin of its API
workflow; through the HTTP server, the headless runner (scripts/run_workflow.py) runs them, reports
failures clearly and starts ComfyUI itself, and the UI workflows are served as templates."""
from __future__ import annotations

import json

import pytest

from support import comfy_host, workflow_runs

comfy_host.skip_module_without_host()

WORKFLOWS = sorted((comfy_host.ROOT / "workflows" / "api").glob("*.json"))
MAIN_WORKFLOW = comfy_host.ROOT / "workflows" / "api" / "invert_and_reconstruct.json"  # the README's example


# --------------------------------------------------------------------------------------------
# the workflows in-process

def test_ui_workflows_keep_their_seeds_fixed(pack):
    import nodes

    import ui_workflows

    for path in sorted((comfy_host.ROOT / "workflows").glob("*.json")):
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] in ui_workflows.VIRTUAL_TYPES:
                continue
            cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
            spec = cls.INPUT_TYPES()
            names = [k for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                     if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            vals, j = n.get("widgets_values") or [], 0
            for name in names:
                if j >= len(vals):
                    break
                opts = spec.get("required", {}).get(name, spec.get("optional", {}).get(name, (None, {})))
                opts = opts[1] if len(opts) > 1 and isinstance(opts[1], dict) else {}
                j += 1
                if opts.get("control_after_generate"):
                    assert vals[j] == "fixed", f"{path.name}: {n['type']}.{name} is saved as {vals[j]!r}"
                    j += 1
                if opts.get("image_upload"):
                    j += 1


def test_every_example_workflow_runs_somewhere():
    runs = set(workflow_runs.IN_PROCESS) | set(workflow_runs.SDXL) | set(workflow_runs.FRONTEND)
    assert sorted(runs) == sorted(p.stem for p in WORKFLOWS)


@pytest.mark.parametrize("stem", workflow_runs.IN_PROCESS)
def test_example_api_workflow_runs_in_process(stem):
    prompt = comfy_host.api_workflow(stem, size=64, steps=3)  # as the frontend queues them
    executor, server, outputs = comfy_host.run_prompt(prompt)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success, errors
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert saves and all(k in outputs and outputs[k]["images"] for k in saves)


# --------------------------------------------------------------------------------------------
# through the HTTP server, with the headless runner

@pytest.fixture(scope="module")
def server():
    import run_workflow

    local = run_workflow.LocalComfy(comfy_host.COMFYUI_PATH, comfy_host.tiny_checkpoint().parent, True, [])
    run_workflow.start_local_servers([local], 120)
    yield local
    local.stop()


def _runner(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(comfy_host.ROOT / "scripts" / "run_workflow.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_runner_runs_example_workflow_over_http(server, tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", comfy_host.TINY_CKPT_NAME,
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.steps=5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 3
    assert "step 5/5" in r.stdout


def test_runner_reports_failures_clearly(server, tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", "missing.safetensors",
                "--out", str(tmp_path))
    assert r.returncode == 2 and "missing.safetensors" in r.stderr
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", comfy_host.TINY_CKPT_NAME,
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.guidance=3.0",
                "--set", '7.negative=null', "--out", str(tmp_path))
    assert r.returncode in (1, 2) and "negative" in r.stderr, r.stderr
    import ui_workflows

    ui = ui_workflows.ui_file(MAIN_WORKFLOW.stem)
    r = _runner(str(ui), "--server", server.url)
    assert r.returncode == 2 and "UI-format" in r.stderr


def test_ui_workflows_are_served_as_templates(server):
    import urllib.parse
    import urllib.request

    ui_files = sorted(p.stem for p in (comfy_host.ROOT / "workflows").glob("*.json"))
    for route in ("/workflow_templates", "/api/workflow_templates"):
        with urllib.request.urlopen(f"{server.url}{route}") as r:
            templates = json.load(r)
        # in reading order (the files are numbered), not the file system's: newer frontends list them as served
        ours = templates.get(comfy_host.PACK_DIR_NAME, [])
        assert ours == ui_files and ui_files, route
    for name in ours:  # the template browser's card thumbnails
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{comfy_host.PACK_DIR_NAME}/"
                                    f"{urllib.parse.quote(name)}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 1000
    with urllib.request.urlopen(f"{server.url}/object_info/InverseDDIMInversion") as r:
        info = json.load(r)["InverseDDIMInversion"]
    assert info["category"].startswith("Inverse")


def test_runner_starts_comfyui_itself(tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--comfyui", str(comfy_host.COMFYUI_PATH), "--tiny-checkpoint",
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.steps=4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len(list(tmp_path.rglob("*.png"))) == 3


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_ui_workflow_is_the_twin_of_the_api_workflow(pack, path):
    """Every API workflow has a UI-format twin that queues exactly the same prompt."""
    import nodes
    import ui_workflows

    ui_path = ui_workflows.ui_file(path.stem)
    assert ui_path.is_file(), f"missing UI twin {ui_path} (run python scripts/ui_workflows.py)"
    ui = json.loads(ui_path.read_text())
    api = json.loads(path.read_text())
    assert ui_workflows.ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS) == ui_workflows.normalise_api(api)
    linked = {l[0] for l in ui["links"]}
    for n in ui["nodes"]:
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS or n["type"] in ui_workflows.VIRTUAL_TYPES
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in linked
