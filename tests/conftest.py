"""Shared test set-up.

pytest puts tests/ and scripts/ on ``sys.path`` (pyproject.toml: ``pythonpath``), so the helpers are
the package ``support`` (tests/support) and the scripts import by name. The pack is imported as the
package ``comfyui_inverse`` (whatever its folder is called), so that its relative imports work and
its ``nodes`` package never shadows ComfyUI's ``nodes.py``. The ComfyUI host for integration tests
is found as tests/support/comfy_host.py says; support/ci_guard.py names it in the header and, in
CI, turns any skip into a failure; support/fixtures.py holds the shared fixtures.
"""
import pytest

pytest.register_assert_rewrite("support")  # the shared checks in support/ report like test code

import support  # noqa: E402

support.load_pack()

pytest_plugins = ["support.ci_guard", "support.fixtures", "support.scheduling"]
