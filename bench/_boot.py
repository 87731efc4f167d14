"""The benches' one bootstrap: ``import _boot`` first in every bench/*.py (run as ``python bench/<x>.py``,
which puts bench/ on the path).

It puts scripts/ and tests/ on ``sys.path``, as pytest does for the tests (pyproject.toml's
``pythonpath``), so that the scripts import by name (provision, testbed, run_workflow, comfy_boot) and
the tests' helpers as the package ``support`` (comfy_host, testbed_runs, peak_memory, taef2), and it
imports the pack as the package ``comfyui_inverse`` (support.load_pack). The repository root itself is
never put on the path: the pack's ``nodes`` package would shadow ComfyUI's ``nodes.py``.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _folder in (ROOT / "scripts", ROOT / "tests"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import support  # noqa: E402

support.load_pack()
