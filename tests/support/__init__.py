"""What the tests share, as a package (``support``), and what the benches borrow from them.

- :func:`load_pack`: the pack imported as the package ``comfyui_inverse``.
- ``comfy_host``: the real ComfyUI host (found as scripts/provision.py finds it), ComfyUI in this
  process, example workflows set up for the tiny models, the tiny random-weight models themselves.
- ``fixtures``: the shared pytest fixtures (``pack``, ``glue``, ``core``, ``loaded``, ``sd3``,
  ``flux``), a plugin that tests/conftest.py registers.
- ``ci_guard``: a pytest plugin, the host in the header and, in CI, no silent skips.
- ``integration``: the helpers of the integration tests and the checks SD1.5 and SDXL share.
- ``core_models``: the analytic and toy models the core tests share.
- ``core_oracles``: closed forms, objectives and an operator chain the core tests check against
  (test-only code that left core/).
- ``testbed_runs``: the nodes on the trained testbed, for its tests and the benches.
- ``peak_memory``, ``taef2``: memory measurements; the trained TAEF2 autoencoder.
- ``host_nodes``: test-only ComfyUI nodes (a folder ComfyUI loads as custom nodes).

tests/ and scripts/ are on ``sys.path`` as pytest runs (pyproject.toml's ``pythonpath``), so this is
``import support`` and scripts/ modules (provision, testbed, run_workflow, ui_workflows...) import by
name; bench/_boot.py does the same for the benches. The repository root itself is never put on
``sys.path``: the pack's ``nodes`` package would shadow ComfyUI's ``nodes.py``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_inverse"


def load_pack():
    """The pack, imported once as the package ``comfyui_inverse`` (whatever its folder is called),
    so that its relative imports work and its ``nodes`` package never shadows ComfyUI's ``nodes.py``."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
