#!/usr/bin/env bash
# Starts ComfyUI's UI with ComfyUI-Inverse loaded, on the host quickstart.sh used
# (scripts/provision.py), with the trained testbed and the tiny test checkpoint listed beside your own models.
#   PORT (default 8188); extra arguments go to ComfyUI's main.py (e.g. --listen 0.0.0.0 is not
#   added for you: the UI stays on 127.0.0.1 unless you ask).
set -euo pipefail
pack=$(cd "$(dirname "$0")/.." && pwd)
cd "$pack"
eval "$("${PYTHON:-python3}" scripts/provision.py --deps run --shell)"
extra=()
for a in "$@"; do extra+=("--comfy-arg=$a"); done
exec "$COMFYUI_PYTHON" scripts/run_workflow.py --serve --comfyui "$COMFYUI_PATH" --port "${PORT:-8188}" "${extra[@]}"
