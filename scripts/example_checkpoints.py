"""The checkpoints the example workflows (workflows/api/*.json) load, with their downloads.

Plain data, standard library only: read by the workflow generator (scripts/ui_workflows.py: the
notes, the frontend's missing-models metadata) and by the tests' host (tests/support/comfy_host.py:
which tiny model stands in for which checkpoint), neither importing the other.
"""
from __future__ import annotations

SD15 = {"name": "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors"}
FLUX = {"name": "flux1-dev-fp8.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors"}
SD35 = {"name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
               "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"}
# the pack's trained testbed (scripts/testbed.py): assembled locally from tests/data, no download
TESTBED = {"name": "inverse_testbed_sd15_v1.safetensors", "directory": "checkpoints"}
CHECKPOINTS = {m["name"]: m for m in (SD15, FLUX, SD35, TESTBED)}  # what the loaders name, with its download


def checkpoint_of(prompt: dict) -> str:
    """The checkpoint an example workflow loads (one per workflow)."""
    names = {n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"}
    if len(names) != 1 or not names <= set(CHECKPOINTS):
        raise ValueError(f"an example workflow loads one checkpoint of {sorted(CHECKPOINTS)}, not {sorted(names)}")
    return names.pop()
