"""pytest plugin: the host in the header, and no silent skips in CI.

Under COMFYUI_INVERSE_REQUIRE_HOST=1 (set by .ci/run) a skipped test or a skipped module makes the
run fail: CI must never land a change whose integration tests did not execute. Loaded by
tests/conftest.py; usable alone with ``-p support.ci_guard`` (tests/ and scripts/ on the path).
"""
from __future__ import annotations

import os

REQUIRED = os.environ.get("COMFYUI_INVERSE_REQUIRE_HOST") == "1"
_skipped: list[str] = []


def pytest_report_header(config):
    try:
        from support import comfy_host
    except Exception as exc:  # a broken host module shows up in collection too
        return [f"ComfyUI host: unknown ({exc})"]
    if comfy_host.HOST_FOUND:
        return [f"ComfyUI host: {comfy_host.COMFYUI_PATH} (version {comfy_host.HOST_VERSION}, "
                f"from {comfy_host.HOST_SOURCE}); skips are failures: {REQUIRED}"]
    return [f"ComfyUI host: NONE ({comfy_host.MISSING_REASON}); skips are failures: {REQUIRED}"]


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:
        _skipped.append(report.nodeid or "a module")


def pytest_sessionfinish(session, exitstatus):
    if REQUIRED and _skipped and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if REQUIRED and _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) or module(s) were skipped under COMFYUI_INVERSE_REQUIRE_HOST=1 "
            f"(CI must execute every test): {', '.join(_skipped[:10])}", red=True, bold=True)
