"""Shared test set-up.

The pack is imported as the package ``comfyui_inverse`` (whatever its folder is called), so
that its relative imports work and its ``nodes`` package never shadows ComfyUI's ``nodes.py``.
The ComfyUI host for integration tests is found as tests/comfy_host.py says; tests/ci_guard.py
names it in the header and, in CI, turns any skip into a failure.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_inverse"


def _load_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


_load_pack()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))

pytest_plugins = ["ci_guard"]
