"""The real ComfyUI host for integration tests.

The host is the one scripts/provision.py finds without provisioning anything: COMFYUI_PATH, else
~/ComfyUI, else the host provisioned earlier in the cache folder (scripts/test.sh provisions it
and exports COMFYUI_PATH). When there is none, integration tests are skipped with a loud reason;
under COMFYUI_INVERSE_REQUIRE_HOST=1 (.ci/run) a missing host, or any skipped test, is a failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

import example_checkpoints  # scripts/ (on the path as pytest runs, and through bench/_boot.py)
import provision

ROOT = Path(__file__).resolve().parents[2]

REQUIRE_HOST = os.environ.get("COMFYUI_INVERSE_REQUIRE_HOST") == "1"
try:
    _HOST = provision.find_host(os.environ, provision=False)
    _WHY = "no ComfyUI found (COMFYUI_PATH unset, no ~/ComfyUI, nothing provisioned in the cache folder)"
except provision.ProvisionError as exc:
    _HOST, _WHY = None, str(exc)
HOST_FOUND = _HOST is not None
COMFYUI_PATH = _HOST.path if _HOST else Path(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI")))
HOST_VERSION = _HOST.version if _HOST else None
HOST_SOURCE = _HOST.source if _HOST else None
MISSING_REASON = (f"{_WHY}: run the tests with `bash scripts/test.sh`, which provisions a ComfyUI, or set "
                  f"COMFYUI_PATH to a ComfyUI checkout (README: 'Running the tests')")
PACK_DIR_NAME = "ComfyUI-Inverse"
CACHE_DIR = provision.cache_dir()
TINY_CKPT_NAME = "inverse_tiny_sd15_v1.safetensors"
# the flow-model example workflows' checkpoints, and the test node that stands in for Load Checkpoint
# with them (tests/support/host_nodes: a tiny model of the family, its real text-encoder classes, a 16-channel VAE)
FLOW_CHECKPOINTS = {example_checkpoints.FLUX["name"]: "flux", example_checkpoints.SD35["name"]: "sd3"}
TINY_FLOW_LOADER = "TestTinyFlowCheckpoint"
HOST_NODES = ROOT / "tests" / "support" / "host_nodes"

_state: dict = {}


def skip_module_without_host() -> None:
    """Called at the top of an integration test module: without a host the module is skipped with
    the loud reason, or, under COMFYUI_INVERSE_REQUIRE_HOST=1, its collection fails."""
    if not HOST_FOUND:
        if REQUIRE_HOST:
            raise RuntimeError(MISSING_REASON)
        import pytest

        pytest.skip(MISSING_REASON, allow_module_level=True)


def host_nodes_env() -> dict:
    """What a ComfyUI server loading :data:`HOST_NODES` needs in its environment: tests/ and scripts/
    on its PYTHONPATH, for the test nodes' ``from support import comfy_host``."""
    paths = [str(ROOT / "tests"), str(ROOT / "scripts")]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def boot_script() -> Path:
    return ROOT / "scripts" / "comfy_boot.py"


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive lock on a file of the cache folder, so that test processes running at once
    (pytest-xdist workers, a bench beside the tests) build each cached artefact once, whole."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tiny_checkpoint() -> Path:
    """The random-weight SD1.5-format checkpoint, generated once and cached."""
    path = CACHE_DIR / "checkpoints" / TINY_CKPT_NAME
    with cache_lock(TINY_CKPT_NAME):
        if not path.is_file():
            import make_tiny_checkpoint

            make_tiny_checkpoint.main([str(path), "--comfyui", str(COMFYUI_PATH)])
    return path


def testbed_checkpoint(family: str = "sd15") -> Path:
    """A trained testbed checkpoint (scripts/testbed.py; ``family`` "sd15", or "sd3": the flow testbed),
    assembled once into the same cache folder."""
    import make_tiny_checkpoint
    import testbed

    make_tiny_checkpoint._import_comfy(str(COMFYUI_PATH))
    weights, name = testbed.FAMILIES[family]
    with cache_lock(name):
        return testbed.assemble(CACHE_DIR / "checkpoints" / name, weights)


def load_testbed(family: str = "sd15") -> dict:
    """A trained testbed as ComfyUI's loader node loads it (model, clip, vae, path), its held-out
    set (images NCHW in [0, 1], labels, colours) and its classifier. Call after start_inprocess."""
    import comfy.sd
    import torch
    import testbed

    path = testbed_checkpoint(family)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    images, labels, colours, _ = testbed.load_heldout()
    return {"model": model, "clip": clip, "vae": vae, "images": images, "labels": labels, "colours": colours,
            "classifier": testbed.load_classifier(), "path": path}


def batched_cond(clip, texts: list) -> list:
    """One CONDITIONING with its own prompt per batch item ([[cond, {"pooled_output": ...}]])."""
    import torch

    with torch.inference_mode():  # each distinct text once (a full-size CLIP-L call is seconds on a CPU)
        once = {t: clip.encode_from_tokens(clip.tokenize(t), return_pooled=True) for t in dict.fromkeys(texts)}
    enc = [once[t] for t in texts]
    return [[torch.cat([e[0] for e in enc]), {"pooled_output": torch.cat([e[1] for e in enc])}]]


def pack_link_dir() -> Path:
    """A folder holding only a link to this pack, to serve as a custom_nodes path; one per checkout, so
    that runs from two clones at once (CI beside a working tree, a bench beside the tests) never re-point
    each other's link while a process loads the pack through it."""
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]
    d = Path(tempfile.gettempdir()) / f"comfyui-inverse-nodes-{os.getuid()}-{tag}"
    with cache_lock(f"nodes-{tag}"):
        d.mkdir(exist_ok=True)
        link = d / PACK_DIR_NAME
        if link.is_symlink() and link.resolve() != ROOT:
            link.unlink()
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
    return d


def start_inprocess():
    """Import ComfyUI into this process, register the built-in nodes and this pack; returns
    the pack module as ComfyUI loaded it."""
    if "pack" in _state:
        return _state["pack"]
    if not HOST_FOUND:
        raise RuntimeError(MISSING_REASON)
    import comfy_boot

    comfy_boot.ensure_torchvision_importable()
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import utils.install_util  # noqa: F401  ComfyUI's own utils package, before any other "utils"
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import folder_paths

    ckpt = tiny_checkpoint()
    testbed_checkpoint()
    folder_paths.add_model_folder_path("checkpoints", str(ckpt.parent), is_default=True)
    out_dir = Path(tempfile.mkdtemp(prefix="comfyui-inverse-out-"))
    folder_paths.set_output_directory(str(out_dir))
    in_dir = Path(tempfile.mkdtemp(prefix="comfyui-inverse-in-"))
    for f in (ROOT / "workflows" / "input").iterdir():
        (in_dir / f.name).write_bytes(f.read_bytes())
    folder_paths.set_input_directory(str(in_dir))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(nodes.load_custom_node(str(pack_link_dir() / PACK_DIR_NAME)))
    _state["load_ok"] = ok
    if not asyncio.run(nodes.load_custom_node(str(HOST_NODES))):
        raise RuntimeError(f"the test nodes in {HOST_NODES} did not load (see the log above)")
    _state["pack"] = sys.modules[str(pack_link_dir() / PACK_DIR_NAME).replace(".", "_x_")]
    _state["out_dir"] = out_dir
    return _state["pack"]


class RecordingServer:
    """The part of PromptServer that execution.PromptExecutor talks to."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def run_prompt(prompt: dict, progress_hook=None):
    """Validate and execute an API-format prompt in-process. Returns (executor, server, outputs)."""
    start_inprocess()
    import comfy.utils
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise AssertionError(f"prompt failed validation: {valid[1]} {valid[3]}")
    server = RecordingServer()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    comfy.utils.set_progress_bar_global_hook(progress_hook)
    try:
        executor.execute(prompt, prompt_id, {}, valid[2])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return executor, server, executor.history_result["outputs"]


def workflow_family(name: str) -> str:
    """"sd" for the SD1.x/SDXL example workflows, "flux" or "sd3" for the flow-model ones (by the
    checkpoint their loader names)."""
    import json

    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    return FLOW_CHECKPOINTS.get(example_checkpoints.checkpoint_of(prompt), "sd")


def api_workflow(name: str, size: int = 64, steps: int | None = None) -> dict:
    """An API-format example workflow set up for the tiny models: every checkpoint loader gets the
    tiny SD1.5 checkpoint (a flow model's loader becomes the test node TINY_FLOW_LOADER, which returns
    a tiny model of its family), every ImageScale ``size`` pixels, and (optionally) every node with a
    ``steps`` input ``steps`` steps (FlowEdit's n_max at most one less, RF-Inversion's stop at most that) and every
    decoder inversion ``steps`` iterations. The trained
    testbed's workflows keep their checkpoint and image size."""
    import json

    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    # the trained testbed's workflows run as they are: its own checkpoint, at the size it was trained at
    testbed = any(n["inputs"].get("ckpt_name") == example_checkpoints.TESTBED["name"] for n in prompt.values())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple" and not testbed:
            if inputs["ckpt_name"] in FLOW_CHECKPOINTS:
                node["class_type"] = TINY_FLOW_LOADER
            else:
                inputs["ckpt_name"] = TINY_CKPT_NAME
        if node["class_type"] == "ImageScale" and not testbed:
            inputs["width"] = inputs["height"] = size
        if steps is not None and "steps" in inputs:
            inputs["steps"] = steps
        if steps is not None and node["class_type"] == "InverseDecoderInversion":
            inputs["iterations"] = steps
        if steps is not None and "skip_steps" in inputs:
            inputs["skip_steps"] = min(inputs["skip_steps"], steps // 3)
        if steps is not None and "n_max" in inputs:  # FlowEdit: not the first step (s = 1 on a BasicScheduler)
            inputs["n_max"] = min(inputs["n_max"], max(steps - 1, 1))
        if steps is not None and node["class_type"] == "InverseRFInversion":
            inputs["stop"] = min(inputs["stop"], steps)
        if node["class_type"] == "InverseMasaCtrl":  # the tiny UNet has 4 attention layers
            inputs["start_layer"] = min(inputs["start_layer"], 2)
            if steps is not None:
                inputs["start_step"] = min(inputs["start_step"], steps // 3)
    return prompt


def init_random(module, seed: int) -> None:
    """ComfyUI builds layers without initialising them: give every weight a scaled normal draw
    (norms the identity, biases zero, multi-dimensional float buffers a small normal draw)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))  # norms: identity
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in module.named_buffers():  # e.g. MMDiT's pos_embed, allocated uninitialised
            if b.is_floating_point() and b.dim() >= 2:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def unet_layout(channels: int, context: int, adm: int | None, depth: list, middle: int, out_depth: list,
                heads: int = -1) -> dict:
    """A UNet config in ComfyUI's format: SD1.x/SDXL block layouts at any width (attention heads of
    32 channels, or ``heads`` heads as in SD1.x's real config)."""
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": channels, "num_res_blocks": [2] * (len(depth) // 2),
           "transformer_depth": depth, "channel_mult": [1, 2, 4, 4][:len(depth) // 2],
           "transformer_depth_middle": middle, "use_linear_in_transformer": adm is not None, "context_dim": context,
           "num_head_channels": 32 if heads < 0 else -1, "num_heads": heads, "transformer_depth_output": out_depth,
           "use_temporal_attention": False, "use_temporal_resblock": False}
    if adm is not None:
        cfg.update(num_classes="sequential", adm_in_channels=adm)
    return cfg


def random_model(config_cls, unet_config: dict, seed: int, dtype=None):
    """A ModelPatcher of ComfyUI's model class for ``config_cls`` (e.g. supported_models.SDXL),
    float32 (or ``dtype``: the weights drawn in float32, then rounded), weights from
    :func:`init_random`; also returns the model config."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_random(model.diffusion_model, seed)
    if dtype is not None and dtype != torch.float32:
        model_config.set_inference_dtype(dtype, None)
        model.diffusion_model.to(dtype)
        model.diffusion_model.dtype = dtype  # what BaseModel.get_dtype reads, set at construction
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device()), model_config


def tiny_flow_model(kind: str, dtype=None):
    """A random-weight flow model built in-process by ComfyUI's own classes, and a function making
    random conditionings of the right shapes (no text encoder): "sd3" (supported_models.SD3: MMDiT
    of depth 2, hidden 128, CLIP-L/G + T5 context width 4096, pooled 2048, shift 3) or "flux"
    (supported_models.Flux: 1 double + 1 single block, hidden 128, guidance embedding; each
    conditioning carries Flux's guidance 3.5); "sd35": the "sd3" model in SD3.5 medium's layout, RMS
    norms on queries and keys and the image-only self-attention (x_block attn2) in its blocks (SD3.5
    medium: blocks 0-12 of 24; here both). ``dtype``: the weights' and compute dtype (bfloat16 as
    Flux is usually run). Call after :func:`start_inprocess`."""
    import comfy.supported_models as sm
    import torch

    if kind in ("sd3", "sd35"):
        config, unet = sm.SD3, {
            "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
            "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "pos_embed_max_size": 16, "num_patches": 256,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
            "x_block_self_attn_layers": []}
        if kind == "sd35":
            unet.update(qk_norm="rms", x_block_self_attn_layers=[0, 1])
        pooled, extra, seed = 2048, {}, 7
    elif kind == "flux":
        config, unet = sm.Flux, {
            "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}
        pooled, extra, seed = 768, {"guidance": 3.5}, 9
    else:
        raise ValueError(kind)
    with torch.inference_mode(False):
        model, _ = random_model(config, unet, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)

    def cond():
        return [[torch.randn(1, 12, 4096, generator=g),
                 {"pooled_output": torch.randn(1, pooled, generator=g), **extra}]]

    return model, cond


TINY_T5 = {"num_layers": 1, "d_ff": 64, "num_heads": 2, "d_kv": 32}  # T5-XXL's width (4096), one thin layer


def tiny_flow_checkpoint(kind: str):
    """What Load Checkpoint returns for a flow model, at test size: (MODEL, CLIP, VAE) with the tiny
    model of :func:`tiny_flow_model`, the family's real text-encoder classes and tokenizers (SD3: CLIP-L
    and CLIP-G at their real shapes, T5 left out as ComfyUI allows; Flux: CLIP-L at its real shape and
    T5-XXL's tokenizer and width with one thin layer, through ComfyUI's t5xxl_model_config option),
    random weights, and :func:`random_vae16`. Call after :func:`start_inprocess` (or in a ComfyUI)."""
    import comfy.sd
    import torch

    model, _ = tiny_flow_model(kind)
    config = model.model.model_config
    if kind == "sd3":
        present = {f"text_encoders.clip_{n}.transformer.text_model.final_layer_norm.weight": None for n in "lg"}
        target, options = config.clip_target(state_dict=present), {}
    else:
        target, options = config.clip_target(state_dict={}), {"t5xxl_model_config": dict(TINY_T5)}
    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(target, model_options=options)
        init_random(clip.cond_stage_model, 13)
    return model, clip, random_vae16()


def random_vae16(seed: int = 11):
    """ComfyUI's VAE detected from an SD3/Flux-format state dict (16 latent channels, no quant convs),
    random weights at the real architecture. Call after :func:`start_inprocess`."""
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.inference_mode(False):
        net = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
        init_random(net, seed)
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return comfy.sd.VAE(sd=sd)


def sd15_sized_model(seed: int = 0):
    """SD1.5's real UNet (ComfyUI's SD15 class: 320 channels, 8 heads, context 768; 860M parameters)
    with random float32 weights, for memory measurements. Call after :func:`start_inprocess`."""
    import comfy.supported_models as sm
    import torch

    layout = unet_layout(320, 768, None, [1, 1, 1, 1, 1, 1, 0, 0], 1, [0, 0, 0] + [1] * 9, heads=8)
    with torch.inference_mode(False):
        return random_model(sm.SD15, layout, seed)[0]
