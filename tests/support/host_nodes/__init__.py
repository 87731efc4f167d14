"""Test-only ComfyUI nodes, loaded by the tests' in-process ComfyUI (tests/support/comfy_host.py) and
by the server of the frontend tests (scripts/frontend.py); never installed with the pack. ComfyUI
loads this folder as custom nodes, by its path; the nodes import the support package, which is on
``sys.path`` in the tests' process and on the PYTHONPATH of that server (comfy_host.host_nodes_env).

TestTinyFlowCheckpoint stands in for Load Checkpoint in the flow-model example workflows, whose real
checkpoints (Flux dev, SD3.5) are far too large for a test machine: same input, same outputs, and
a tiny random-weight model of the family the checkpoint name says (comfy_host.tiny_flow_checkpoint),
built once per process.
"""
_built: dict = {}


class TestTinyFlowCheckpoint:
    DESCRIPTION = "Test stand-in for Load Checkpoint with a flow model: a tiny random-weight model of its family."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "flux1-dev-fp8.safetensors",
                                                      "tooltip": "A flow checkpoint name the tests know."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        from support import comfy_host

        if ckpt_name not in comfy_host.FLOW_CHECKPOINTS:
            raise ValueError(f"ckpt_name: {ckpt_name} is none of {sorted(comfy_host.FLOW_CHECKPOINTS)}")
        kind = comfy_host.FLOW_CHECKPOINTS[ckpt_name]
        if kind not in _built:
            _built[kind] = comfy_host.tiny_flow_checkpoint(kind)
        return _built[kind]


NODE_CLASS_MAPPINGS = {"TestTinyFlowCheckpoint": TestTinyFlowCheckpoint}
