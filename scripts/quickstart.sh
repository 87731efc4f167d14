#!/usr/bin/env bash
# Installs ComfyUI-Inverse into a ComfyUI and runs the invert-and-reconstruct example headless.
#   COMFYUI_PATH  your ComfyUI checkout (default ~/ComfyUI)
#   CKPT          a checkpoint in its models/checkpoints, e.g. v1-5-pruned-emaonly.safetensors
#                 (default: a generated tiny random-weight test model: it runs anywhere, makes noise)
#   IMAGE         the photo to invert (default: the bundled example)
#   OUT           where the images go (default ./out)
set -euo pipefail
pack=$(cd "$(dirname "$0")/.." && pwd)
cd "$pack"
source scripts/_deps.sh
COMFYUI_PATH=${COMFYUI_PATH:-$HOME/ComfyUI}
if [ ! -f "$COMFYUI_PATH/main.py" ]; then
  echo "quickstart: no ComfyUI at $COMFYUI_PATH; set COMFYUI_PATH to your ComfyUI folder" >&2
  exit 2
fi

# 1. install the pack into ComfyUI/custom_nodes (a link, unless it already lives there)
installed=0
for d in "$COMFYUI_PATH"/custom_nodes/*/; do
  if [ "$(cd "$d" && pwd -P)" = "$(pwd -P)" ]; then installed=1; fi
done
if [ "$installed" = 0 ]; then
  ln -sfn "$pack" "$COMFYUI_PATH/custom_nodes/ComfyUI-Inverse"
  echo "[quickstart] linked $pack into $COMFYUI_PATH/custom_nodes/ComfyUI-Inverse"
fi

# 2. dependencies: ComfyUI's and the pack's, never replacing the installed torch
pip_install_reqs "$(comfyui_reqs "$COMFYUI_PATH")" requirements.txt

# 3. run the example workflow headless
args=(workflows/api/invert_and_reconstruct.json --comfyui "$COMFYUI_PATH" --out "${OUT:-out}")
if [ -n "${CKPT:-}" ]; then
  args+=(--checkpoint "$CKPT")
else
  echo "[quickstart] no CKPT given: using the tiny random-weight test checkpoint at 256x256"
  args+=(--tiny-checkpoint --set 5.width=256 --set 5.height=256)
fi
if [ -n "${IMAGE:-}" ]; then args+=(--image "$IMAGE"); fi
exec "$PY" scripts/run_workflow.py "${args[@]}"
