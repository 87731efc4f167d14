#!/usr/bin/env bash
# The test command (README, and .ci/run): installs the test dependencies without touching the
# installed torch, then runs every test. Integration tests use the ComfyUI at COMFYUI_PATH
# (default ~/ComfyUI); without one they are skipped and this script says so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_deps.sh
export COMFYUI_PATH=${COMFYUI_PATH:-$HOME/ComfyUI}

reqs=(requirements-test.txt)
if [ -f "$COMFYUI_PATH/main.py" ] && [ -f "$COMFYUI_PATH/comfy/sd.py" ]; then
  reqs+=("$(comfyui_reqs "$COMFYUI_PATH")")
  echo "[test] ComfyUI host: $COMFYUI_PATH"
else
  cat >&2 <<BANNER
##########################################################################################
#  ComfyUI NOT FOUND at $COMFYUI_PATH
#  The integration tests (real ComfyUI, tiny SD1.5 checkpoint, HTTP server, workflows)
#  will be SKIPPED; only the core tests run. To run everything, get ComfyUI and point
#  COMFYUI_PATH at it (README, "Running the tests"):
#      git clone https://github.com/comfyanonymous/ComfyUI ~/ComfyUI
#  Set COMFYUI_INVERSE_REQUIRE_HOST=1 to make a missing ComfyUI an error.
##########################################################################################
BANNER
  if [ "${COMFYUI_INVERSE_REQUIRE_HOST:-0}" = "1" ]; then exit 1; fi
fi
pip_install_reqs "${reqs[@]}"

set +e
"$PY" -m pytest -q -rs tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
