"""SDXL through the real ComfyUI: a random-weight model built at test time by ComfyUI's own SDXL
classes (comfy.supported_models.SDXL -> comfy.model_base.SDXL, ADM size/pooled conditioning, SDXL
latent format) with SDXL's block layout (transformer depths 0/0/2/2/10/10, 10 in the middle: 70
attention layers) at narrow channels, and SDXL's real text encoders (CLIP-L and OpenCLIP bigG at
their real shapes, random weights) -- built once per test session, in memory.

Every SD example workflow runs end to end on it (its checkpoint loader replaced by a test node that
returns this model), and the exactness checks of the SD1.5 integration tests hold on it: DDPM
reconstruction, ProxEdit at quantile 1, GUIDER = node, MasaCtrl's default layer from the model.
"""
from __future__ import annotations

import json

import pytest
import torch
import ui_workflows

from support import comfy_host, workflow_runs

comfy_host.skip_module_without_host()

# the same checks as the SD1.5 tests (test_nodes_*.py), given another model
from support.integration import (_encode, check_flow_edit_nodes)  # noqa: E402
from support.integration import (_invert_and_sample, _prox, _rel, check_ddpm_inversion_reconstructs_exactly,  # noqa: E402
                                 check_guider_reproduces_the_proxedit_node)

LOADER = "InverseTestTinySDXL"


_init_random, _unet_layout, _build_model = comfy_host.init_random, comfy_host.unet_layout, comfy_host.random_model


@pytest.fixture(scope="module")
def sdxl(pack):
    import comfy.sd
    import comfy.supported_models as sm
    import nodes

    unet = _unet_layout(64, 2048, 2816, [0, 0, 2, 2, 10, 10], 10, [0, 0, 0, 2, 2, 2, 10, 10, 10])
    with torch.inference_mode(False):
        model, model_config = _build_model(sm.SDXL, unet, 5)
        clip = comfy.sd.CLIP(model_config.clip_target())
        _init_random(clip.cond_stage_model, 6)
    vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[2]
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    class TinySDXL:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self, ckpt_name):
            return model, clip, vae

    nodes.NODE_CLASS_MAPPINGS[LOADER] = TinySDXL
    yield model, clip, vae, pos, neg
    nodes.NODE_CLASS_MAPPINGS.pop(LOADER, None)


def test_the_model_is_sdxl_to_comfyui(pack, glue, sdxl):
    import comfy.latent_formats
    import comfy.model_base

    model, clip, vae, pos, neg = sdxl
    assert type(model.model) is comfy.model_base.SDXL
    assert isinstance(model.get_model_object("latent_format"), comfy.latent_formats.SDXL)
    assert pos[0][0].shape[-1] == 2048 and pos[0][1]["pooled_output"].shape == (1, 1280)
    assert sum(p.numel() for p in clip.cond_stage_model.parameters()) > 800e6  # CLIP-L + bigG, real shapes
    layers = glue.attention_layers(model)
    assert len(layers) == 70 and [b for b, _, _ in layers].index("output") == 34
    # the prediction depends on the prompt (cross-attention and pooled vector), as an edit needs
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eps = glue.run_with_predictor(model, {"positive": pos, "negative": neg}, z.shape,
                                      lambda pred: pred(z, 601, ["positive", "negative"]))
    gap = float((eps[0] - eps[1]).abs().mean() / eps[1].abs().mean())
    assert gap > 1e-2, gap


def test_masactrl_default_layer_comes_from_the_model(pack, glue, sdxl):
    """-1 = first decoder layer + a third of the decoder: SDXL 34 + 12 = 46; SD1.x's real layout
    (16 layers, decoder 7-15) gives the paper's 10."""
    import comfy.supported_models as sm

    assert glue.masactrl_start_layer(glue.attention_layers(sdxl[0])) == 46
    sd15_layout = _unet_layout(32, 768, None, [1, 1, 1, 1, 1, 1, 0, 0], 1, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    with torch.inference_mode(False):
        model, _ = _build_model(sm.SD15, sd15_layout, 1)
    layers = glue.attention_layers(model)
    assert len(layers) == 16 and glue.masactrl_start_layer(layers) == 10


SD_WORKFLOWS = [m[0] for m in ui_workflows.MANIFEST if comfy_host.workflow_family(m[0]) == "sd"]
# Every node and every model-dependent code path of the SD workflows, once on SDXL (support/workflow_runs.py
# says which). The other SD workflows differ from these only in widget values whose maths is model-agnostic
# (operators, forward-only solvers); they run on SD1.5 in test_workflows.py or through the frontend.
SDXL_WORKFLOWS = workflow_runs.SDXL


def test_the_sdxl_workflows_cover_every_node_and_method_of_the_sd_workflows():
    def uses(stem):
        api = comfy_host.api_workflow(stem, size=64, steps=3)
        return {(n["class_type"], str(n["inputs"].get("method", ""))) for n in api.values()
                if n["class_type"] != "CheckpointLoaderSimple"}

    assert set(SDXL_WORKFLOWS) <= set(SD_WORKFLOWS)
    covered = set().union(*(uses(s) for s in SDXL_WORKFLOWS))
    missing = {u for s in SD_WORKFLOWS for u in uses(s) if u not in covered}
    # forward-only exact solvers run inside decoder_inversion_then_inversion (fixed point) on SDXL
    assert missing <= {("InverseExactInversion", "gradient_descent"), ("InverseExactInversion", "anderson")}, missing


@pytest.mark.parametrize("stem", SDXL_WORKFLOWS)
def test_example_workflow_runs_on_sdxl(pack, sdxl, stem):
    prompt = comfy_host.api_workflow(stem, size=64, steps=3)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = LOADER
    executor, server, outputs = comfy_host.run_prompt(prompt)
    events = [e for e, _ in executor.status_messages]
    assert "execution_success" in events, [d for e, d in executor.status_messages if e == "execution_error"]
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert saves and all(k in outputs and outputs[k]["images"] for k in saves)
    for node_id, out in outputs.items():  # reports (PreviewAny) name no NaN
        for text in out.get("text", []) or []:
            assert "nan" not in json.dumps(text).lower(), (node_id, text)


@pytest.mark.parametrize("guidance,steps", [(7.5, 20), (1.0, 4)])
def test_ddpm_inversion_reconstructs_exactly_on_sdxl(pack, sdxl, guidance, steps):
    check_ddpm_inversion_reconstructs_exactly(pack, sdxl, guidance, steps)


def test_proxedit_at_maximum_threshold_is_the_exact_reconstruction_on_sdxl(pack, sdxl):
    model, clip, vae, pos, neg = sdxl
    with torch.inference_mode():
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a red sports car"))
    z0, npi, rec, _ = _invert_and_sample(pack, sdxl, "NegativePromptInversion", 7.5, steps=12, spacing="auto")
    assert _rel(_prox(pack, sdxl, npi, target, quantile=1.0), rec) < 1e-6
    assert _rel(_prox(pack, sdxl, npi, target, quantile=0.5), rec) > 1e-3
    # over DDPM noise maps: the input itself, to 3e-4 here (1e-5 on SD1.5): the edit evaluates
    # [base, target] in one batch where the guidance-1 inversion evaluated the prompt alone, and the
    # UNet's float32 rounding depends on the batch; 70 attention layers carry more of it
    z0, ddpm, _, _ = _invert_and_sample(pack, sdxl, "DDPMInversion", 1.0, steps=12, guidance=1.0,
                                        spacing="auto", seed=1)
    assert _rel(_prox(pack, sdxl, ddpm, target, quantile=1.0), z0) < 3e-4


def test_guider_reproduces_the_proxedit_node_on_sdxl(pack, sdxl):
    check_guider_reproduces_the_proxedit_node(pack, sdxl)


def test_flow_edit_nodes_on_sdxl(pack, sdxl):
    """FlowEdit (node and GUIDER/SAMPLER pair) and RF-Inversion on SDXL through the flow view of its
    noise prediction (issue 23): the same checks as on SD3, Flux and SD1.5 (test_nodes_flow_edit.py)."""
    model, clip, vae, pos, neg = sdxl
    with torch.inference_mode():
        tar = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of a red robot"))
    check_flow_edit_nodes(pack, model, pos, tar, neg, _encode(sdxl, 13), guidance=(3.5, 7.5))
