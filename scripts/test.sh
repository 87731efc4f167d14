#!/usr/bin/env bash
# The test command (README, and .ci/run). Finds or provisions the ComfyUI host and its Python
# (scripts/provision.py: COMFYUI_PATH, ~/ComfyUI, the cache, ../shared/hosts' archive, a clone),
# installs the test requirements without touching the installed torch, then runs every test.
#   COMFYUI_INVERSE_REQUIRE_HOST=1 (set by .ci/run): no host, or any skipped test, fails the run.
#   Otherwise a missing host gets a loud banner and only the core tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_PY=${PYTHON:-python3}
require=${COMFYUI_INVERSE_REQUIRE_HOST:-0}

set +e
env_lines=$("$BASE_PY" scripts/provision.py --deps test --shell)
rc=$?
set -e
if [ "$rc" -eq 0 ]; then
  eval "$env_lines"
  echo "[test] ComfyUI host: $COMFYUI_PATH (version $COMFYUI_VERSION, from $COMFYUI_HOST_SOURCE); Python: $COMFYUI_PYTHON"
elif [ "$rc" -eq 3 ] && [ "$require" != "1" ]; then
  cat >&2 <<'BANNER'
##########################################################################################
#  NO ComfyUI HOST (see the provisioning error above).
#  The integration tests (real ComfyUI, tiny SD1.5 checkpoint, HTTP server, workflows)
#  will be SKIPPED; only the core tests run. Set COMFYUI_PATH to your ComfyUI, or let
#  the scripts provision one (network or ../shared/hosts/ComfyUI-*.tar.gz).
#  CI (.ci/run, COMFYUI_INVERSE_REQUIRE_HOST=1) fails here instead.
##########################################################################################
BANNER
  env_lines=$("$BASE_PY" scripts/provision.py --deps test --no-host --shell)
  eval "$env_lines"
else
  echo "[test] cannot run the tests without a ComfyUI host (provisioning exit code $rc)" >&2
  exit 1
fi

# the frontend tests (tests/test_frontend.py) drive Debian's Chromium with Playwright for Python
# (installed above from requirements-test.txt); Playwright's own browser download cannot work offline
if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian's chromium for the frontend tests"
    apt-get install -y -q chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } ||
      echo "[test] could not install chromium: the frontend tests will be skipped (a failure under .ci/run)" >&2
  else
    echo "[test] no Chromium (set CHROMIUM, or apt-get install chromium as root): the frontend tests will be" \
         "skipped (a failure under .ci/run)" >&2
  fi
fi

# the test files spread over worker processes (pytest-xdist, one file per worker at a time, the longest
# first: tests/support/scheduling.py); COMFYUI_INVERSE_TEST_WORKERS=1 runs them in this one process
cores=$(nproc 2>/dev/null || echo 2)
workers=${COMFYUI_INVERSE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder); else parallel=(-p no:xdist); fi
echo "[test] $workers worker process(es) on $cores core(s)"

set +e
"$COMFYUI_PYTHON" -m pytest -q -rs --durations=30 "${parallel[@]}" tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
