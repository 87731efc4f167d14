"""test_frontend.py's browser tests on the newest frontend (scripts/frontend.py's NEWEST, served with
ComfyUI's --front-end-root from the cache folder, where scripts/provision.py installs it): what users
who update their frontend see. A file of its own so that the two frontends run on two workers."""
from __future__ import annotations

import json

import pytest

import frontend  # scripts/
import ui_workflows  # scripts/
from support import comfy_host
from support import workflow_runs
# the same browser tests (the fixture ``fe`` reads this module's VERSION); the queue test is this
# module's own: every model family and kind of graph here, every node type on the pinned frontend
from test_frontend import (STEMS, check_loaded_as_saved, check_queues, fe,  # noqa: F401
                           test_template_browser_lists_the_workflows_in_reading_order,
                           test_ui_workflow_loads_converts_and_reads_clearly)

VERSION = frontend.NEWEST
pytestmark = [pytest.mark.skipif(not comfy_host.HOST_FOUND, reason=comfy_host.MISSING_REASON),
              pytest.mark.skipif(frontend.missing_reason(VERSION) is not None, reason=str(frontend.missing_reason(VERSION)))]


def test_the_newest_frontend_queues_every_family():
    assert set(workflow_runs.FRONTEND_NEWEST) <= set(STEMS)
    assert ({comfy_host.workflow_family(s) for s in workflow_runs.FRONTEND_NEWEST}
            == {comfy_host.workflow_family(s) for s in STEMS})
    assert any(ui_workflows.checkpoint_of(json.loads((comfy_host.ROOT / "workflows" / "api" / f"{s}.json").read_text()))
               == ui_workflows.TESTBED["name"] for s in workflow_runs.FRONTEND_NEWEST)


@pytest.mark.parametrize("stem", workflow_runs.FRONTEND_NEWEST)
def test_ui_workflow_queues_through_the_newest_frontend(fe, stem):
    check_queues(fe, stem)


def test_ui_workflows_load_with_vue_nodes(fe):
    """With "Nodes 2.0" on (Comfy.VueNodes.Enabled: nodes drawn as Vue components), every workflow
    loads with the same node types, widget values and links, every node drawn as a Vue node. (The
    pinned 1.27.10 has the setting as an early preview that keeps the previous graph's Vue nodes on
    screen, so this runs on the newest frontend only.)"""
    fe.set_setting("Comfy.VueNodes.Enabled", True)
    try:
        for stem in STEMS:
            ui = json.loads(ui_workflows.ui_file(stem).read_text())
            fe.load(ui)
            fe.page.wait_for_timeout(400)
            assert fe.vue_node_count() == len(ui["nodes"]), stem
            check_loaded_as_saved(fe.snapshot(), ui)
    finally:
        fe.set_setting("Comfy.VueNodes.Enabled", False)
