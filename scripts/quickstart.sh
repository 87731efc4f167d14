#!/usr/bin/env bash
# Installs ComfyUI-Inverse into a ComfyUI and runs the invert-and-reconstruct example headless.
#   COMFYUI_PATH   your ComfyUI (default ~/ComfyUI; with neither, one is provisioned in the cache
#                  folder from ../shared/hosts or a clone of the pinned release: scripts/provision.py)
#   COMFYUI_PYTHON the Python that runs your ComfyUI (default: detected)
#   CKPT           a checkpoint in its models/checkpoints, e.g. v1-5-pruned-emaonly.safetensors: runs
#                  workflows/api/invert_and_reconstruct.json on IMAGE (default: the bundled photo).
#                  Without CKPT: the small trained testbed checkpoint (scripts/testbed.py, from tests/data;
#                  runs anywhere in a minute or two) inverts a held-out "red sneaker" and edits it to a
#                  blue one (workflows/api/testbed_invert_and_edit.json)
#   IMAGE          the image to invert
#   OUT            where the images go (default ./out)
set -euo pipefail
pack=$(cd "$(dirname "$0")/.." && pwd)
cd "$pack"

# 1. the host and its Python, with ComfyUI's and the pack's requirements (torch never replaced)
eval "$("${PYTHON:-python3}" scripts/provision.py --deps run --shell)"
echo "[quickstart] ComfyUI $COMFYUI_VERSION at $COMFYUI_PATH (from $COMFYUI_HOST_SOURCE); Python: $COMFYUI_PYTHON"

# 2. install the pack into ComfyUI/custom_nodes (a link, unless it already lives there)
installed=0
for d in "$COMFYUI_PATH"/custom_nodes/*/; do
  if [ -d "$d" ] && [ "$(cd "$d" && pwd -P)" = "$(pwd -P)" ]; then installed=1; fi
done
if [ "$installed" = 0 ]; then
  ln -sfn "$pack" "$COMFYUI_PATH/custom_nodes/ComfyUI-Inverse"
  echo "[quickstart] linked $pack into $COMFYUI_PATH/custom_nodes/ComfyUI-Inverse"
fi

# 3. run the example workflow headless
out=${OUT:-out}
if [ -n "${CKPT:-}" ]; then
  args=(workflows/api/invert_and_reconstruct.json --checkpoint "$CKPT")
else
  echo "[quickstart] no CKPT given: the trained testbed checkpoint (48 px Fashion-MNIST items) inverts a" \
       "held-out red sneaker and edits it to blue"
  args=(workflows/api/testbed_invert_and_edit.json --testbed)
fi
args+=(--comfyui "$COMFYUI_PATH" --out "$out")
if [ -n "${IMAGE:-}" ]; then args+=(--image "$IMAGE"); fi
"$COMFYUI_PYTHON" scripts/run_workflow.py "${args[@]}"
echo "[quickstart] done: the images are in $(cd "$out" && pwd)"
echo "[quickstart] to open ComfyUI's UI with the pack loaded: bash scripts/ui.sh   (then http://127.0.0.1:8188)"
