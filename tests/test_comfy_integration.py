"""Integration tests on the real ComfyUI (the host tests/comfy_host.py finds) with a tiny
random-weight checkpoint that ComfyUI detects as SD1.5."""
from __future__ import annotations

import glob
import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

import comfy_host

if not comfy_host.HOST_FOUND:
    if comfy_host.REQUIRE_HOST:
        raise RuntimeError(comfy_host.MISSING_REASON)
    pytest.skip(comfy_host.MISSING_REASON, allow_module_level=True)

WORKFLOWS = sorted((comfy_host.ROOT / "workflows" / "api").glob("*.json"))
MAIN_WORKFLOW = comfy_host.ROOT / "workflows" / "api" / "invert_and_reconstruct.json"  # the README's example


@pytest.fixture(scope="module")
def pack():
    return comfy_host.start_inprocess()


@pytest.fixture(scope="module")
def glue(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy_glue")


@pytest.fixture(scope="module")
def core(pack):
    return importlib.import_module(pack.__name__ + ".core.ddim")


@pytest.fixture(scope="module")
def loaded(pack):
    """The tiny checkpoint loaded the way ComfyUI's loader node does (under inference mode)."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, vae, pos, neg


class UNetCounter:
    """Counts forward calls of ComfyUI UNets (and the batch each call saw)."""

    def __init__(self):
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.cls = UNetModel
        self.batches: list[int] = []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.cls):
                self.batches.append(int(args[0].shape[0]))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _interrupt_after(n_calls: int, run) -> tuple[int, int]:
    """Run ``run()`` and request a cancel in the middle of its ``n_calls``-th UNet call; it must
    raise InterruptProcessingException. Returns (call at which the cancel came, total calls)."""
    import comfy.model_management

    with UNetCounter() as counter:
        fired = {}

        def hook(module, args, output):
            if isinstance(module, counter.cls) and len(counter.batches) == n_calls and not fired:
                fired["at"] = len(counter.batches)
                comfy.model_management.interrupt_current_processing(True)

        h = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
                run()
        finally:
            h.remove()
            comfy.model_management.interrupt_current_processing(False)
    assert fired, "the run made fewer model calls than the cancel point"
    return fired["at"], len(counter.batches)


def _latents(out_dir: Path, prefix: str) -> torch.Tensor:
    import safetensors.torch

    files = sorted(glob.glob(str(out_dir / "taps" / f"{prefix}_*.latent")))
    assert files, f"no latent saved for {prefix}"
    return safetensors.torch.load_file(files[-1])["latent_tensor"]


def _tap(prompt: dict, node: str, output: int, name: str) -> None:
    prompt[f"tap_{name}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [node, output], "filename_prefix": f"taps/{name}"}}


def _rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------
# registration and schemas

def test_pack_registers_with_no_import_error(pack):
    import nodes

    assert comfy_host._state["load_ok"] is True
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(comfy_host.PACK_DIR_NAME)}
    assert {"InverseDDIMInversion", "InverseExactInversion", "InverseNegativePromptInversion", "InverseNullTextInversion", "InverseDDPMInversion", "InverseSampleFromInversion", "InverseSamplerDDIMInversion"} <= set(ours)


def test_every_node_schema_has_description_and_tooltips(pack):
    import nodes

    ours = [v for v in nodes.NODE_CLASS_MAPPINGS.values()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(comfy_host.PACK_DIR_NAME)]
    assert ours
    for cls in ours:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("Inverse"), schema.node_id
        assert schema.category.split("/")[0] == "Inverse"
        assert schema.display_name and len(schema.description) > 40, schema.node_id
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{schema.node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{schema.node_id} output {o.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["description"] == schema.description
        for i in schema.inputs:  # the frontend randomizes seeds unless told they have a control value
            if "seed" in i.id:
                assert getattr(i, "control_after_generate", None), f"{schema.node_id}.{i.id}"


def test_ui_workflows_keep_their_seeds_fixed(pack):
    import nodes

    import ui_workflows

    for path in sorted((comfy_host.ROOT / "workflows").glob("*.json")):
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] in ui_workflows.VIRTUAL_TYPES:
                continue
            cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
            spec = cls.INPUT_TYPES()
            names = [k for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                     if isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            vals, j = n.get("widgets_values") or [], 0
            for name in names:
                if j >= len(vals):
                    break
                opts = spec.get("required", {}).get(name, spec.get("optional", {}).get(name, (None, {})))
                opts = opts[1] if len(opts) > 1 and isinstance(opts[1], dict) else {}
                j += 1
                if opts.get("control_after_generate"):
                    assert vals[j] == "fixed", f"{path.name}: {n['type']}.{name} is saved as {vals[j]!r}"
                    j += 1
                if opts.get("image_upload"):
                    j += 1


# --------------------------------------------------------------------------------------------
# the glue

def test_glue_eps_equals_the_unets_own_prediction(glue, loaded):
    model, clip, vae, pos, neg = loaded
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = 601

    def run(pred):
        with UNetCounter() as counter:
            eps = pred(z, t, ["positive", "negative"])
        return eps, counter.batches

    with torch.inference_mode():
        eps, batches = glue.run_with_predictor(model, {"positive": pos, "negative": neg}, z.shape, run)
        unet = model.model.diffusion_model
        ts = torch.full((2,), float(t))
        ref_c = unet(z, ts, context=pos[0][0].expand(2, -1, -1))
        ref_u = unet(z, ts, context=neg[0][0].expand(2, -1, -1))
    assert batches == [4], "cond and uncond must go through the UNet in one batched call"
    assert eps.shape == (2, 2, 4, 8, 8)
    assert torch.allclose(eps[0], ref_c, atol=2e-5, rtol=1e-4)
    assert torch.allclose(eps[1], ref_u, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(eps[0], eps[1], atol=1e-4)


def test_glue_handles_v_prediction_models(glue, loaded):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        vmodel = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = 300
        eps = glue.run_with_predictor(vmodel, {"positive": pos}, z.shape, lambda p: p(z, t, ["positive"])[0])
        v = model.model.diffusion_model(z, torch.tensor([float(t)]), context=pos[0][0])
    abar = float(glue.model_alphas_cumprod(vmodel)[t])
    expected = math.sqrt(abar) * v + math.sqrt(1 - abar) * z
    assert torch.allclose(eps, expected, atol=3e-5, rtol=1e-4)
    assert model.get_model_object("model_sampling") is not vmodel.get_model_object("model_sampling")


def test_schedule_and_grid_match_comfyui(glue, loaded):
    import comfy.samplers

    model = loaded[0]
    ms = model.get_model_object("model_sampling")
    ac = glue.model_alphas_cumprod(model)
    sd = importlib.import_module(glue.__name__.rsplit(".", 2)[0] + ".core.schedule")
    assert torch.allclose(ac, sd.scaled_linear_alphas_cumprod(), atol=1e-6)
    grid = glue.make_grid(model, 10, "leading")
    assert grid.timesteps[:-1] == tuple(range(901, 0, -100))
    # sigmas we hand to ComfyUI map back to exactly our timesteps
    sig = glue.grid_sigmas(model, grid)
    assert [int(ms.timestep(s[None]).item()) for s in sig[:-1]] == list(grid.timesteps[:-1])
    back = glue.grid_from_sigmas(model, sig)
    assert back.timesteps == grid.timesteps
    # ComfyUI's own ddim_uniform sigmas are understood too
    cs = comfy.samplers.calculate_sigmas(ms, "ddim_uniform", 10)
    assert glue.grid_from_sigmas(model, cs).steps == 10


def test_autograd_through_the_glue_inside_inference_mode(glue, loaded):
    """Gradients w.r.t. latent and text embedding under a node's inference mode, with inference
    weights, checked against central finite differences."""
    model, clip, vae, pos, neg = loaded
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    w = torch.randn(1, 4, 8, 8, generator=g)
    d = torch.randn(1, 4, 8, 8, generator=g)
    t = 400

    def run(pred):
        ctx0 = pred.embedding("positive").clone()
        dc = torch.randn(ctx0.shape, generator=g)
        with torch.no_grad():
            before = pred(z, t, ["positive"])[0]
        assert any(p.is_inference() for p in unet.parameters()), "test must start from inference weights"
        param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
        with pred.autograd():
            zz = z.clone().requires_grad_(True)
            ctx = ctx0.clone().requires_grad_(True)
            eps = pred(zz, t, [glue.Cond("positive", context=ctx)])[0]
            gz, gc = torch.autograd.grad((eps * w).sum(), [zz, ctx])
            assert not any(p.is_inference() for p in unet.parameters())
            assert sum(p.numel() * p.element_size() for p in unet.parameters()) == param_bytes
            with torch.no_grad():
                f = lambda zv, cv: float((pred(zv, t, [glue.Cond("positive", context=cv)])[0] * w).sum())
                h = 1e-2
                fd_z = (f(z + h * d, ctx0) - f(z - h * d, ctx0)) / (2 * h)
                fd_c = (f(z, ctx0 + h * dc) - f(z, ctx0 - h * dc)) / (2 * h)
                after = pred(z, t, ["positive"])[0]
        return gz, gc, dc, fd_z, fd_c, before, after

    with torch.inference_mode():
        gz, gc, dc, fd_z, fd_c, before, after = glue.run_with_predictor(model, {"positive": pos}, z.shape, run)
    assert torch.isfinite(gz).all() and torch.isfinite(gc).all()
    assert float(gz.abs().sum()) > 0 and float(gc.abs().sum()) > 0
    assert float((gz * d).sum()) == pytest.approx(fd_z, rel=2e-2, abs=1e-4)
    assert float((gc * dc).sum()) == pytest.approx(fd_c, rel=2e-2, abs=1e-4)
    assert torch.equal(before, after), "converting inference weights must not change the model's output"


def test_reconstruction_error_shrinks_with_steps(glue, core, loaded):
    model, clip, vae, pos, neg = loaded
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    errs = []
    with torch.inference_mode():
        for steps in (10, 40, 160):
            grid = glue.make_grid(model, steps)

            def run(pred):
                traj = core.ddim_invert(pred, z, grid, "positive")
                return core.ddim_sample(pred, traj[-1], grid, "positive")[-1]

            rec = glue.run_with_predictor(model, {"positive": pos}, z.shape, run)
            errs.append(_rel(rec, z))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[1] and errs[2] < 0.05, errs


# --------------------------------------------------------------------------------------------
# workflows in-process

@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_api_workflow_runs_in_process(path):
    prompt = comfy_host.api_workflow(path.stem, size=64, steps=6)
    executor, server, outputs = comfy_host.run_prompt(prompt)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success, errors
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert saves and all(k in outputs and outputs[k]["images"] for k in saves)


def _custom_sampler(**inputs) -> dict:
    """A SamplerCustomAdvanced node for the main example workflow, on its DisableNoise (13) and
    CFGGuider (12) unless told otherwise."""
    return {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["13", 0], "guider": ["12", 0], **inputs}}


def test_invert_and_reconstruct_workflow_numbers():
    """Our sampler and ComfyUI's own ddim sampler agree, and both reconstruct the latent."""
    prompt = comfy_host.api_workflow("invert_and_reconstruct", size=64, steps=40)
    _tap(prompt, "6", 0, "z0")
    _tap(prompt, "8", 0, "ours")
    _tap(prompt, "14", 0, "comfy")
    _tap(prompt, "7", 1, "noise")
    prompt["20"] = {"class_type": "InverseSamplerDDIMInversion", "inputs": {}}
    prompt["21"] = _custom_sampler(sampler=["20", 0], sigmas=["7", 2], latent_image=["6", 0])
    _tap(prompt, "21", 0, "noise_via_sampler")
    executor, server, outputs = comfy_host.run_prompt(prompt)
    assert executor.success
    out = comfy_host._state["out_dir"]
    z0, ours, comfy_rec = _latents(out, "z0"), _latents(out, "ours"), _latents(out, "comfy")
    assert _rel(ours, comfy_rec) < 1e-4
    # a random-weight UNet is no denoiser, so DDIM inversion is far from exact here (the step
    # convergence is tested above); the reconstruction is still much closer than the noise
    assert _rel(ours, z0) < 0.6
    noise, noise2 = _latents(out, "noise"), _latents(out, "noise_via_sampler")
    assert _rel(noise2, noise) < 1e-4, "the SAMPLER must invert exactly like the node"
    assert _rel(noise, z0) > 1.0  # the noise latent is not the image


def test_exact_solvers_as_a_sampler_match_the_exact_inversion_node():
    """The SAMPLER path of the Anderson solver over a CFG GUIDER at guidance 1 inverts exactly like the
    Exact Inversion node, and its reconstruction with ComfyUI's own ddim sampler beats DDIM's."""
    prompt = comfy_host.api_workflow("invert_and_reconstruct", size=64, steps=10)
    _tap(prompt, "6", 0, "z0")
    _tap(prompt, "14", 0, "ddim_rec")
    prompt["30"] = {"class_type": "InverseExactInversion",
                    "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["6", 0],
                               "steps": 10, "guidance": 1.0, "spacing": "auto", "method": "anderson",
                               "iterations": 2, "tolerance": 1e-4, "lambda_prior": 0.1, "adjust_rounds": 0}}
    _tap(prompt, "30", 1, "noise_node")
    prompt["31"] = {"class_type": "InverseSamplerDDIMInversion",
                    "inputs": {"method": "anderson", "iterations": 2, "tolerance": 1e-4}}
    prompt["32"] = _custom_sampler(sampler=["31", 0], sigmas=["30", 2], latent_image=["6", 0])
    _tap(prompt, "32", 0, "noise_sampler")
    prompt["33"] = _custom_sampler(sampler=["11", 0], sigmas=["30", 2], latent_image=["32", 0])
    _tap(prompt, "33", 0, "anderson_rec")
    executor, server, outputs = comfy_host.run_prompt(prompt)
    assert executor.success
    out = comfy_host._state["out_dir"]
    z0 = _latents(out, "z0")
    assert _rel(_latents(out, "noise_sampler"), _latents(out, "noise_node")) < 1e-4
    assert _rel(_latents(out, "anderson_rec"), z0) < 0.5 * _rel(_latents(out, "ddim_rec"), z0)


def test_batches_and_masks_are_honoured(glue, core, loaded):
    """A batch of two inverts like two single runs; with a mask, sampling with another prompt
    leaves the unmasked region of every step on the inversion trajectory."""
    prompt = comfy_host.api_workflow("invert_and_reconstruct", size=64, steps=8)
    prompt["4b"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["5", 0], "amount": 2}}
    prompt["4c"] = {"class_type": "ImageInvert", "inputs": {"image": ["5", 0]}}
    prompt["4d"] = {"class_type": "ImageBatch", "inputs": {"image1": ["5", 0], "image2": ["4c", 0]}}
    prompt["6"]["inputs"]["pixels"] = ["4d", 0]
    prompt["30"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    prompt["31"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    prompt["32"] = {"class_type": "MaskComposite",
                    "inputs": {"destination": ["30", 0], "source": ["31", 0], "x": 0, "y": 0, "operation": "add"}}
    prompt["33"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red sports car", "clip": ["1", 1]}}
    prompt["34"] = {"class_type": "InverseSampleFromInversion",
                    "inputs": {"model": ["1", 0], "positive": ["33", 0], "inversion": ["7", 0], "negative": ["3", 0],
                               "guidance": 1.0, "skip_steps": 0, "mask": ["32", 0]}}
    prompt["35"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["4c", 0], "vae": ["1", 2]}}
    prompt["36"] = {"class_type": "InverseDDIMInversion",
                    "inputs": {"model": ["1", 0], "positive": ["2", 0], "latent": ["35", 0],
                               "steps": 8, "guidance": 1.0, "spacing": "auto"}}
    _tap(prompt, "6", 0, "bz0")
    _tap(prompt, "7", 1, "bnoise")
    _tap(prompt, "36", 1, "single_noise")
    _tap(prompt, "34", 0, "masked")
    _tap(prompt, "8", 0, "brec")
    executor, server, outputs = comfy_host.run_prompt(prompt)
    assert executor.success, [d for e, d in executor.status_messages if e == "execution_error"]
    out = comfy_host._state["out_dir"]
    z0, noise, single = _latents(out, "bz0"), _latents(out, "bnoise"), _latents(out, "single_noise")
    masked, rec = _latents(out, "masked"), _latents(out, "brec")
    assert z0.shape[0] == 2 and noise.shape[0] == 2
    assert _rel(noise[1:], single) < 1e-5
    # left half (mask 1) regenerated with another prompt, right half kept exactly
    assert torch.allclose(masked[..., 4:], z0[..., 4:], atol=1e-6, rtol=1e-6)
    assert _rel(masked[..., :4], rec[..., :4]) > 1e-3


def test_bad_inputs_get_clear_errors(pack, glue, loaded):
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    inv = importlib.import_module(pack.__name__ + ".nodes.inversion")
    model, clip, vae, pos, neg = loaded
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        edm = ModelSamplingContinuousEDM().patch(model, "eps", 120.0, 0.002)[0]
        with pytest.raises(glue.InverseInputError, match=r"^model: .*or a flow-matching model .*continuous-time"):
            inv.DDIMInversion.execute(edm, pos, 10, 1.0, "auto", latent=lat)
        with pytest.raises(glue.InverseInputError, match=r"^steps"):
            inv.DDIMInversion.execute(model, pos, 0, 1.0, "auto", latent=lat)
        with pytest.raises(glue.InverseInputError, match=r"^vae: "):
            inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto", image=torch.zeros(1, 64, 64, 3))
        with pytest.raises(glue.InverseInputError, match=r"^negative: "):
            inv.DDIMInversion.execute(model, pos, 4, 7.5, "auto", latent=lat)
        with pytest.raises(glue.InverseInputError, match=r"^latent/image: "):
            inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto")
        with pytest.raises(glue.InverseInputError, match=r"^spacing: "):
            from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
            lcm = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
            inv.DDIMInversion.execute(lcm, pos, 4, 1.0, "trailing", latent=lat)
        with pytest.raises(glue.InverseInputError, match=r"^mask: "):
            glue.latent_mask(torch.ones(3, 64, 64), (2, 4, 8, 8))


def test_bad_numbers_and_shapes_are_refused_before_any_work(pack, glue, loaded):
    """Non-finite latents and images, a latent of another model family, an image smaller than the
    VAE's cell: each a clear error naming the input, before any model call (the review's raw
    UnboundLocalError, the conv error on a 1x1 image and the silent all-NaN successes)."""
    inv = _nodes(pack)
    di = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    model, clip, vae, pos, neg = loaded
    nan, inf = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    nan[0, 0, 0, 0], inf[0, 1, 2, 3] = float("nan"), float("inf")
    exact = dict(method="rnri", iterations=2, tolerance=1e-4, lambda_prior=0.1, adjust_rounds=0)
    with torch.inference_mode(), UNetCounter() as counter:
        for bad in (nan, inf):
            lat = {"samples": bad}
            with pytest.raises(glue.InverseInputError, match=r"^latent: contains NaN or infinite values"):
                inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto", latent=lat)
            for method in ("rnri", "gradient_descent", "anderson"):
                with pytest.raises(glue.InverseInputError, match=r"^latent: contains NaN"):
                    inv.ExactInversion.execute(model, pos, 4, 1.0, "auto", latent=lat, **dict(exact, method=method))
            with pytest.raises(glue.InverseInputError, match=r"^latent: contains NaN"):
                inv.NullTextInversion.execute(model, pos, 4, 7.5, "auto", 2, 0.01, 1e-5, negative=neg, latent=lat)
            with pytest.raises(glue.InverseInputError, match=r"^latent: contains NaN"):
                di.DecoderInversion.execute(torch.rand(1, 64, 64, 3), vae, "gradient_free_adam", 2, 0.01, 0.3, "auto",
                                            latent=lat)
        with pytest.raises(glue.InverseInputError, match=r"^latent: the latent has 16 channels but this model works "
                                                         r"on 4-channel latents"):
            inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto", latent={"samples": torch.zeros(1, 16, 8, 8)})
        with pytest.raises(glue.InverseInputError, match=r"^image: the image is 1x1 pixels, smaller than the VAE's"):
            inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto", image=torch.rand(1, 1, 1, 3), vae=vae)
        bad_img = torch.rand(1, 64, 64, 3)
        bad_img[0, 3, 3, 0] = float("nan")
        with pytest.raises(glue.InverseInputError, match=r"^image: contains NaN"):
            di.DecoderInversion.execute(bad_img, vae, "gradient_free_adam", 2, 0.01, 0.3, "auto")
        with pytest.raises(glue.InverseInputError, match=r"^image: contains NaN"):
            inv.DDIMInversion.execute(model, pos, 4, 1.0, "auto", image=bad_img, vae=vae)
    assert counter.batches == []  # refused before any model call


@pytest.mark.parametrize("scale", ["1e30", "nan", "inf", "-25"])
def test_prompt_to_prompt_refuses_non_finite_or_huge_reweight_scales(pack, loaded, scale):
    with pytest.raises(Exception, match=r"^reweight: the scale of 'cat' is .*finite scale between -20 and 20"):
        _p2p_node(pack, loaded, "a photo of a cat", "a photo of a cat", mode="reweight", reweight=f"cat:{scale}")


def test_lcm_model_inverts_on_the_lcm_grid(pack, glue, core, loaded):
    """An LCM model: the grid is LCM's, and eps is the one implied by ComfyUI's LCM denoiser
    (boundary-condition scalings included) at every grid timestep."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        lcm = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
        grid = glue.make_grid(lcm, 4)
        assert grid.timesteps[:-1] == (999, 759, 499, 259)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5

        def run(pred):
            traj = core.ddim_invert(pred, z, grid, "positive")
            rec = core.ddim_sample(pred, traj[-1], grid, "positive")[-1]
            diffs = []
            for t in grid.timesteps[:-1]:
                sigma = float(pred.sigma_table[t])
                x = z * math.sqrt(1 + sigma ** 2)
                den = pred.inner_model.apply_model(x, torch.tensor([sigma]), c_crossattn=pos[0][0])
                diffs.append(float(((x - den) / sigma - pred(z, t, ["positive"])[0]).abs().max()))
            return rec, diffs

        rec, diffs = glue.run_with_predictor(lcm, {"positive": pos}, z.shape, run)
    assert max(diffs) < 1e-4, diffs
    assert torch.isfinite(rec).all()


def test_cancel_stops_within_one_model_call():
    import comfy.model_management

    prompt = comfy_host.api_workflow("invert_and_reconstruct", size=64, steps=30)
    state = {"interrupted_at": None}

    with UNetCounter() as counter:
        def hook(value, total, preview=None, node_id=None):
            if value == 3 and state["interrupted_at"] is None and total == 30:
                state["interrupted_at"] = len(counter.batches)
                comfy.model_management.interrupt_current_processing(True)

        executor, server, outputs = comfy_host.run_prompt(prompt, progress_hook=hook)
    events = [e for e, d in executor.status_messages]
    assert "execution_interrupted" in events and "execution_success" not in events
    assert state["interrupted_at"] is not None
    assert len(counter.batches) - state["interrupted_at"] <= 1


# --------------------------------------------------------------------------------------------
# through the HTTP server, with the headless runner

@pytest.fixture(scope="module")
def server():
    import sys

    sys.path.insert(0, str(comfy_host.ROOT / "scripts"))
    import run_workflow

    local = run_workflow.LocalComfy(comfy_host.COMFYUI_PATH, comfy_host.tiny_checkpoint().parent, True, [])
    run_workflow.start_local_servers([local], 120)
    yield local
    local.stop()


def _runner(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(comfy_host.ROOT / "scripts" / "run_workflow.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_runner_runs_example_workflow_over_http(server, tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", comfy_host.TINY_CKPT_NAME,
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.steps=5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 3
    assert "step 5/5" in r.stdout


def test_runner_reports_failures_clearly(server, tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", "missing.safetensors",
                "--out", str(tmp_path))
    assert r.returncode == 2 and "missing.safetensors" in r.stderr
    r = _runner(str(MAIN_WORKFLOW), "--server", server.url, "--checkpoint", comfy_host.TINY_CKPT_NAME,
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.guidance=3.0",
                "--set", '7.negative=null', "--out", str(tmp_path))
    assert r.returncode in (1, 2) and "negative" in r.stderr, r.stderr
    import ui_workflows

    ui = ui_workflows.ui_file(MAIN_WORKFLOW.stem)
    r = _runner(str(ui), "--server", server.url)
    assert r.returncode == 2 and "UI-format" in r.stderr


def test_ui_workflows_are_served_as_templates(server):
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/workflow_templates") as r:
        templates = json.load(r)
    ours = templates.get(comfy_host.PACK_DIR_NAME, [])
    ui_files = sorted(p.stem for p in (comfy_host.ROOT / "workflows").glob("*.json"))
    assert sorted(set(ours)) == ui_files and ui_files
    for name in ours:  # the template browser's card thumbnails
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{comfy_host.PACK_DIR_NAME}/"
                                    f"{urllib.parse.quote(name)}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 1000
    with urllib.request.urlopen(f"{server.url}/object_info/InverseDDIMInversion") as r:
        info = json.load(r)["InverseDDIMInversion"]
    assert info["category"].startswith("Inverse")


def test_runner_starts_comfyui_itself(tmp_path):
    r = _runner(str(MAIN_WORKFLOW), "--comfyui", str(comfy_host.COMFYUI_PATH), "--tiny-checkpoint",
                "--set", "5.width=64", "--set", "5.height=64", "--set", "7.steps=4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len(list(tmp_path.rglob("*.png"))) == 3


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_ui_workflow_is_the_twin_of_the_api_workflow(pack, path):
    """Every API workflow has a UI-format twin that queues exactly the same prompt."""
    import nodes
    import ui_workflows

    ui_path = ui_workflows.ui_file(path.stem)
    assert ui_path.is_file(), f"missing UI twin {ui_path} (run python tests/ui_workflows.py)"
    ui = json.loads(ui_path.read_text())
    api = json.loads(path.read_text())
    assert ui_workflows.ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS) == ui_workflows.normalise_api(api)
    linked = {l[0] for l in ui["links"]}
    for n in ui["nodes"]:
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS or n["type"] in ui_workflows.VIRTUAL_TYPES
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in linked


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_predict_and_differentiate(glue, loaded, dtype):
    """16-bit weights (cast per layer where the device needs it): eps stays float32 and close
    to the float32 model's, and gradients are finite."""
    import comfy.sd

    model32, clip, vae, pos, neg = loaded
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))

    def run(pred):
        eps = pred(z, 500, ["positive"])[0]
        with pred.autograd():
            zz = z.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pred(zz, 500, ["positive"])[0].square().sum(), zz)
        return eps, g

    with torch.inference_mode():
        model16 = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()), output_vae=False,
                                                        output_clip=False, model_options={"dtype": dtype})[0]
        assert next(model16.model.diffusion_model.parameters()).dtype == dtype
        eps16, g16 = glue.run_with_predictor(model16, {"positive": pos}, z.shape, run)
        eps32, g32 = glue.run_with_predictor(model32, {"positive": pos}, z.shape, run)
    assert eps16.dtype == torch.float32 and torch.isfinite(g16).all()
    assert _rel(eps16, eps32) < 0.05 and _rel(g16, g32) < 0.1


# --------------------------------------------------------------------------------------------
# the inversion methods through the real ComfyUI (issue 3)

def _nodes(pack):
    return importlib.import_module(pack.__name__ + ".nodes.inversion")


def _encode(loaded, seed=11, batch=1):
    vae = loaded[2]
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, 64, 64, 3, generator=g)
    with torch.inference_mode():
        return {"samples": vae.encode(img)}


def _invert_and_sample(pack, loaded, node, sample_guidance, **kw):
    model, clip, vae, pos, neg = loaded
    n = _nodes(pack)
    lat = kw.pop("latent", None) or _encode(loaded)
    with torch.inference_mode():
        if node != "NegativePromptInversion":
            kw["negative"] = neg
        out = getattr(n, node).execute(model, pos, latent=lat, **kw).args
        result = out[0]
        rec = n.SampleFromInversion.execute(model, pos, result, sample_guidance, 0, negative=neg).args[0]
    return lat["samples"], result, rec["samples"], out[3]


@pytest.mark.parametrize("guidance,steps", [(3.5, 50), (7.5, 50), (1.0, 4)])
def test_ddpm_inversion_reconstructs_exactly_through_comfyui(pack, loaded, guidance, steps):
    """Exact by construction, so exact at any steps and guidance (review defect 10: float32 rounding
    of mean + sigma z compounded through the guided model to 1.8e-3 at 50 steps)."""
    z0, res, rec, report = _invert_and_sample(pack, loaded, "DDPMInversion", guidance, steps=steps,
                                              guidance=guidance, spacing="auto", seed=3)
    assert res.method == "ddpm" and len(res.extras["noise_maps"]) == steps
    assert _rel(rec, z0) <= 1e-5, (guidance, steps, _rel(rec, z0))


def test_negative_prompt_inversion_reconstructs_at_any_guidance(pack, loaded):
    z0, res, rec75, _ = _invert_and_sample(pack, loaded, "NegativePromptInversion", 7.5, steps=20, spacing="auto")
    with torch.inference_mode():
        rec1 = _nodes(pack).SampleFromInversion.execute(loaded[0], loaded[3], res, 1.0, 0).args[0]["samples"]
    # the unconditional branch is the source prompt, so guidance cannot move the result
    assert _rel(rec75, rec1) < 1e-5
    # and it is DDIM inversion at guidance 1 followed by DDIM sampling at guidance 1
    z0b, _, ddim_rec, _ = _invert_and_sample(pack, loaded, "DDIMInversion", 1.0, steps=20, guidance=1.0,
                                             spacing="auto")
    assert _rel(rec75, ddim_rec) < 1e-5


def test_null_text_inversion_beats_plain_guided_reconstruction(pack, loaded):
    z0, res, rec, report = _invert_and_sample(pack, loaded, "NullTextInversion", 7.5, steps=10, guidance=7.5,
                                              spacing="auto", inner_steps=20, learning_rate=0.05, tolerance=1e-5)
    z0b, ddim_res, plain, _ = _invert_and_sample(pack, loaded, "DDIMInversion", 7.5,
                                                 steps=10, guidance=1.0, spacing="auto")
    assert len(res.extras["null_embeddings"]) == 10 and res.extras["grad_calls"] > 0
    emb0 = loaded[4][0][0]
    assert float((res.extras["null_embeddings"][-1] - emb0).abs().max()) > 0  # the embedding was optimised
    assert _rel(rec, z0) < 0.5 * _rel(plain, z0b), (_rel(rec, z0), _rel(plain, z0b))
    assert "null-text loss" in report


@pytest.mark.parametrize("method", ["rnri", "rnri_jacobian_free", "fixed_point", "gradient_descent"])
def test_exact_inversions_lower_the_residual_through_comfyui(pack, loaded, method):
    iters = 2 if method.startswith("rnri") else 6
    z0, res, rec, report = _invert_and_sample(pack, loaded, "ExactInversion", 1.0, steps=10, guidance=1.0,
                                              spacing="auto", method=method, iterations=iters, tolerance=1e-5,
                                              lambda_prior=0.1, adjust_rounds=0)
    hist = res.extras["history"]
    assert len(res.extras["residuals"]) == 10 and "residual" in report
    # steps end below where they started (z^0 = z_s, whose residual is DDIM's step size) and the
    # reported residual is that of the returned latent, the best iterate of each step
    assert sum(res.extras["residuals"]) < 0.8 * sum(h[0] for h in hist)
    assert all(r == min(h) for r, h in zip(res.extras["residuals"], hist))
    if method == "rnri":
        assert res.extras["grad_calls"] > 0
    if method == "fixed_point":
        z0b, _, ddim_rec, _ = _invert_and_sample(pack, loaded, "DDIMInversion", 1.0, steps=10, guidance=1.0,
                                                 spacing="auto")
        assert _rel(rec, z0) < 0.5 * _rel(ddim_rec, z0b)


def test_cancel_inside_newton_and_null_text_loops(pack, loaded):
    """An interrupt raised in the middle of a step's inner loop stops before the next model call."""
    n = _nodes(pack)
    model, clip, vae, pos, neg = loaded
    lat = _encode(loaded)
    runs = {
        "rnri": lambda: n.ExactInversion.execute(model, pos, 10, 1.0, "auto", "rnri", 5, 0.0, 0.1, 0, latent=lat),
        "null_text": lambda: n.NullTextInversion.execute(model, pos, 10, 7.5, "auto", 50, 0.01, 0.0,
                                                         negative=neg, latent=lat),
    }
    for name, run in runs.items():
        at, total = _interrupt_after(13, run)
        assert total - at <= 1, name


def test_mismatched_conditioning_batch_is_a_clear_error(pack, loaded):
    model, clip, vae, pos, neg = loaded
    two = [[torch.cat([pos[0][0]] * 2), dict(pos[0][1])]]
    with torch.inference_mode(), pytest.raises(Exception, match=r"^positive: the conditioning has a batch of 2"):
        _nodes(pack).DDIMInversion.execute(model, two, 4, 1.0, "auto", latent=_encode(loaded, batch=3))


def test_rnri_objective_gradient_through_comfyui_matches_finite_differences(pack, glue, loaded):
    inv = importlib.import_module(pack.__name__ + ".core.inversion")
    model, clip, vae, pos, neg = loaded
    grid = glue.make_grid(model, 10)
    ts, ab = grid.timesteps[::-1], grid.alphas_cumprod[::-1]
    g = torch.Generator().manual_seed(8)
    z_s = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    z = z_s + 0.5 * torch.randn(1, 4, 8, 8, generator=g)  # far from the root: |r| is smooth at the FD scale
    d = torch.randn(1, 4, 8, 8, generator=g)

    def run(pred):
        step = inv._Step(pred, z_s, ts[4], ab[3], ab[4], "c", "u", 3.0)
        with pred.autograd():
            zz = z.clone().requires_grad_(True)
            F, _ = inv.rnri_objective(step, zz, 0.1)
            (grad,) = torch.autograd.grad(F, zz)
            with torch.no_grad():
                h = 1e-3
                fd = (inv.rnri_objective(step, z + h * d, 0.1)[0] - inv.rnri_objective(step, z - h * d, 0.1)[0]) / (2 * h)
        return float((grad * d).sum()), float(fd)

    with torch.inference_mode():
        analytic, fd = glue.run_with_predictor(model, {"c": pos, "u": neg}, z.shape, run)
    assert analytic == pytest.approx(fd, rel=2e-2)


# --------------------------------------------------------------------------------------------
# decoder inversion through a ComfyUI VAE (issue 4)

@pytest.mark.parametrize("method,step,precision", [
    ("gradient_free_adam", 0.05, "auto"), ("gradient_free_fixed_point", 0.2, "auto"),
    ("gradient_free_momentum", 0.1, "auto"), ("gradient_based", 0.01, "auto"),
    ("gradient_free_fixed_point", 0.2, "bf16")])
def test_decoder_inversion_node_with_a_comfyui_vae(pack, loaded, method, step, precision):
    n = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    vae = loaded[2]
    img = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(12))
    params = list(vae.first_stage_model.parameters())
    before = (params[0].dtype, params[0].detach().clone())
    with torch.inference_mode():
        lat, plot, record = n.DecoderInversion.execute(img, vae, method, 12, step, 0.3, precision).args
    rec = json.loads(record)
    assert lat["samples"].shape == (2, 4, 8, 8) and lat["samples"].dtype == torch.float32
    assert plot.shape == (1, 360, 640, 3) and float(plot.min()) < 0.5  # something was drawn
    # each method lowers what it drives (the random-weight VAE has no meaningful image quality;
    # the PSNR gains are measured on the trained TAEF2 in test_core_decoder_inversion.py)
    if method == "gradient_based":
        assert rec["reconstruction_rms"][-1] < rec["reconstruction_rms"][0], rec["reconstruction_rms"]
    else:
        assert rec["residual_rms"][-1] < rec["residual_rms"][0], rec["residual_rms"]
    assert params[0].dtype == before[0] and torch.equal(params[0].detach(), before[1]), "the shared VAE changed"


def test_decoder_inversion_errors_are_clear(pack, loaded):
    n = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    vae = loaded[2]
    img = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        with pytest.raises(Exception, match=r"^step_size/momentum: "):
            n.DecoderInversion.execute(img, vae, "gradient_free_momentum", 2, 0.3, 0.5, "auto")
        with pytest.raises(Exception, match=r"^latent: shape"):
            n.DecoderInversion.execute(img, vae, "gradient_free_adam", 2, 0.01, 0.3, "auto",
                                       latent={"samples": torch.zeros(1, 4, 16, 16)})


# --------------------------------------------------------------------------------------------
# ProxEdit through ComfyUI (issue 5, proximal guidance part)

def _prox(pack, loaded, inversion, target, **kw):
    n = importlib.import_module(pack.__name__ + ".nodes.editing")
    args = dict(base="source", guidance=7.5, prox="hard", quantile=0.7, fixed_threshold=0.0, dilation=1,
                inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400, source_null_mix=0.0, skip_steps=0)
    args.update(kw)
    with torch.inference_mode():
        return n.ProxEdit.execute(loaded[0], inversion, target, negative=loaded[4], **args).args[0]["samples"]


@pytest.mark.parametrize("prox", ["hard", "soft"])
def test_proxedit_at_maximum_threshold_is_the_exact_reconstruction(pack, loaded, prox):
    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a red sports car"))
    # negative-prompt inversion: the edit at quantile 1 is the inversion's own reconstruction
    z0, npi, rec, _ = _invert_and_sample(pack, loaded, "NegativePromptInversion", 7.5, steps=12, spacing="auto")
    edit = _prox(pack, loaded, npi, target, prox=prox, quantile=1.0)
    assert _rel(edit, rec) < 1e-6
    assert _rel(_prox(pack, loaded, npi, target, prox=prox, quantile=0.5), rec) > 1e-3
    # over edit-friendly DDPM inversion it reproduces the input itself
    z0, ddpm, _, _ = _invert_and_sample(pack, loaded, "DDPMInversion", 1.0, steps=12, guidance=1.0, spacing="auto", seed=1)
    assert _rel(_prox(pack, loaded, ddpm, target, prox=prox, quantile=1.0), z0) < 1e-5
    # over the exact solvers (guidance 1, base = the source prompt): their own reconstruction
    for method in ("anderson", "newton_krylov"):
        z0, res, rec, _ = _invert_and_sample(pack, loaded, "ExactInversion", 1.0, steps=12, guidance=1.0,
                                             spacing="auto", method=method, iterations=2, tolerance=1e-4,
                                             lambda_prior=0.1, adjust_rounds=0)
        # 1e-5, not 1e-6: the edit evaluates [base, target] in one batch, the guidance-1 reconstruction
        # the prompt alone, and the UNet's float32 rounding depends on the batch
        assert _rel(_prox(pack, loaded, res, target, prox=prox, quantile=1.0), rec) < 1e-5, method


def test_proxedit_costs_what_a_cfg_run_costs(pack, loaded):
    """Both need two branches per step: count UNet calls and the batch each saw."""
    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a red sports car"))
    z0, npi, _, _ = _invert_and_sample(pack, loaded, "NegativePromptInversion", 1.0, steps=10, spacing="auto")
    n = _nodes(pack)
    with UNetCounter() as cfg_run:
        with torch.inference_mode():
            n.SampleFromInversion.execute(model, target, npi, 7.5, 0, negative=neg)
    with UNetCounter() as prox_run:
        _prox(pack, loaded, npi, target, inversion_guidance=0.5, reconstruction_guidance=0.1, t_rec=1000)
    assert sum(prox_run.batches) <= 1.1 * sum(cfg_run.batches)
    assert len(prox_run.batches) == 10


def test_proxedit_errors_are_clear(pack, loaded):
    model, clip, vae, pos, neg = loaded
    z0, ddim_res, _, _ = _invert_and_sample(pack, loaded, "DDIMInversion", 1.0, steps=4, guidance=1.0, spacing="auto")
    n = importlib.import_module(pack.__name__ + ".nodes.editing")
    with torch.inference_mode(), pytest.raises(Exception, match=r"^skip_steps: "):
        n.ProxEdit.execute(model, ddim_res, pos, "source", 7.5, "hard", 0.7, 0.0, 1, 0.0, 0.0, 400, 0.0, 4)
    with torch.inference_mode(), pytest.raises(Exception, match=r"^base: "):
        n.ProxEdit.execute(model, ddim_res, pos, "null", 7.5, "hard", 0.7, 0.0, 1, 0.0, 0.0, 400, 0.0, 0)


# --------------------------------------------------------------------------------------------
# degradation operators as nodes (issue 6, first part)

def test_degradation_nodes_on_comfyui_images(pack):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    img = torch.rand(2, 56, 72, 3, generator=torch.Generator().manual_seed(3))
    base = dict(scale_factor=4, kernel_size=61, blur_sigma=3.0, motion_intensity=0.5, mask_amount=0.4,
                sigma_y=0.0, seed=1)
    for kind in r.KINDS:
        kw = dict(base)
        if kind == "inpaint_mask":
            kw["mask"] = (torch.rand(56, 72) > 0.5).float()
        if kind == "salt_pepper":
            kw["mask_amount"] = 0.02
        op = r.DegradationOperator.execute(kind, **kw).args[0]
        y, view = r.DegradeImage.execute(img, op, 0).args
        assert y.shape[0] == 2 and y.shape[-1] == 3 and view.ndim == 4 and view.shape[-1] == 3, kind
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        if kind.startswith("sr_"):
            assert y.shape[1:3] == (14, 18)
        else:
            assert y.shape == img.shape
        if kind == "inpaint_mask":  # known pixels untouched, missing ones zeroed (0 in [-1, 1] is grey)
            m = kw["mask"].bool()
            assert torch.allclose(y[:, ~m], img[:, ~m], atol=1e-6) and torch.allclose(y[:, m], torch.full_like(y[:, m], 0.5))
    with pytest.raises(Exception, match=r"^image: the image is 70x56, which the scale factor 4"):
        r.DegradeImage.execute(img[:, :, :70], r.DegradationOperator.execute("sr_avgpool", **base).args[0], 0)
    with pytest.raises(Exception, match=r"^mask: the mask is 10x10"):
        op = r.DegradationOperator.execute("inpaint_mask", **dict(base, mask=torch.ones(10, 10))).args[0]
        r.DegradeImage.execute(img, op, 0)
    with pytest.raises(Exception, match=r"^mask: kind inpaint_mask needs a MASK"):
        r.DegradationOperator.execute("inpaint_mask", **base)


# --------------------------------------------------------------------------------------------
# attention control and the GUIDER (issue 5, second part)

def _editing(pack):
    return importlib.import_module(pack.__name__ + ".nodes.editing")


def _ac(pack):
    return importlib.import_module(pack.__name__ + ".core.attention_control")


def _p2p_node(pack, loaded, src="a photo of a cat", tar="a photo of a dog", **kw):
    args = dict(mode="replace", cross_replace=0.8, self_replace=0.5, reweight="", local_blend=False, blend_words="",
                blend_threshold=0.3, blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return _editing(pack).PromptToPrompt.execute(loaded[1], src, tar, **args).args


def test_attention_hooks_change_only_the_conditional_target_branch(pack, glue, loaded):
    model, clip, vae, pos, neg = loaded
    ac = _ac(pack)
    proxedit = importlib.import_module(pack.__name__ + ".core.proxedit")
    control, src, tar = _p2p_node(pack, loaded)
    control = control.combine(ac.AttentionControl(masactrl=ac.MutualSelfAttention(0, 0, base_strategy="none")))
    options_before = repr(model.model_options)
    ctl = ac.AttentionController(control, 10)
    patched = glue.with_attention_control(model, ctl)
    g = torch.Generator().manual_seed(0)
    z_src = torch.randn(2, 4, 16, 16, generator=g)
    z = z_src + 0.5 * torch.randn(2, 4, 16, 16, generator=g)

    def run(pred):
        plain = pred(z, 601, ["source", "target"])
        same = pred(z_src, 601, ["source", "source"])
        with UNetCounter() as counter:
            e_base, e_tar = proxedit.edit_predict(pred, z, z_src, 601, "source", "target", ctl, "source", step=0)
        # the target prompt on the source latent with the source's own attention: the source prediction
        _, e_same = proxedit.edit_predict(pred, z_src, z_src, 601, "source", "source", ctl, "source", step=0)
        return plain, same, e_base, e_tar, e_same, counter.batches

    with torch.inference_mode():
        plain, same, e_base, e_tar, e_same, batches = glue.run_with_predictor(
            patched, {"source": src, "target": tar}, z.shape, run)
        unpatched = glue.run_with_predictor(model, {"source": src}, z.shape, lambda p: p(z, 601, ["source"]))
    assert _rel(e_base, plain[0]) < 1e-5          # the base (unconditional) branch is untouched
    assert _rel(e_tar, plain[1]) > 1e-3           # the target branch is edited
    assert _rel(e_same, same[1]) < 1e-4
    assert batches == [2, 4]                      # capture call (source, batch 2), then [base, target]
    assert ctl.edited_calls > 0 and ctl.mode == "off"
    assert repr(model.model_options) == options_before   # the shared MODEL is not patched
    assert _rel(unpatched[0], plain[0]) < 1e-5


def test_prompt_to_prompt_node_errors_are_clear(pack, loaded):
    with pytest.raises(Exception, match=r"^target_prompt: Replace \(word swap\) needs prompts with the same number of "
                                        r"tokens: the source has 5, the target 6"):
        _p2p_node(pack, loaded, "a photo of a cat", "a photo of a fluffy cat")
    control, _, _ = _p2p_node(pack, loaded, "a photo of a cat", "a photo of a fluffy cat", mode="refine",
                              local_blend=True, reweight="fluffy:2")
    assert float(control.p2p.equalizer.max()) == 2.0 and int(control.p2p.blend_target.sum()) == 1
    with pytest.raises(Exception, match=r"^reweight: 'zebra' is not in the target prompt"):
        _p2p_node(pack, loaded, reweight="zebra:2")
    with pytest.raises(Exception, match=r"^reweight: expected 'word:scale'"):
        _p2p_node(pack, loaded, reweight="dog")
    with pytest.raises(Exception, match=r"^blend_words: the prompts do not differ"):
        _p2p_node(pack, loaded, tar="a photo of a cat", local_blend=True)


def _npi(pack, loaded, cond, steps=8, batch=1):
    n = _nodes(pack)
    lat = _encode(loaded, batch=batch)
    with torch.inference_mode():
        res = n.NegativePromptInversion.execute(loaded[0], cond, steps, "auto", latent=lat).args[0]
        rec = n.SampleFromInversion.execute(loaded[0], cond, res, 7.5, 0).args[0]["samples"]
    return lat["samples"], res, rec


def test_proxedit_with_attention_control_keeps_exact_reconstruction_and_edits(pack, loaded):
    """Attention control edits only the target branch, so at quantile 1 the edit is still the NPI
    reconstruction; below it, P2P and MasaCtrl change the edit. Prompt mismatches are clear errors."""
    ac = _ac(pack)
    control, src, tar = _p2p_node(pack, loaded, local_blend=False)
    z0, res, rec = _npi(pack, loaded, src, batch=2)
    # base_strategy "none": with MasaCtrl's default "source" the base branch attends to the stored
    # inversion latents, which DDIM inversion's reconstruction does not follow exactly
    masa = ac.AttentionControl(masactrl=ac.MutualSelfAttention(2, 2, "source", base_strategy="none"))
    with UNetCounter() as counter:
        kept = _prox(pack, loaded, res, tar, quantile=1.0, attention_control=control.combine(masa))
    assert _rel(kept, rec) < 1e-6
    assert len(counter.batches) == 16 and counter.batches[:2] == [2, 4]   # capture + inject on every step
    free = _prox(pack, loaded, res, tar, quantile=0.5)
    p2p = _prox(pack, loaded, res, tar, quantile=0.5, attention_control=control)
    masa_only = _prox(pack, loaded, res, tar, quantile=0.5, attention_control=masa)
    assert _rel(p2p, free) > 1e-3 and _rel(masa_only, free) > 1e-3
    with pytest.raises(Exception, match=r"^attention_control: it was built for other prompts than the 'target' input"):
        _prox(pack, loaded, res, loaded[3], attention_control=control)
    with pytest.raises(Exception, match=r"^attention_control: MasaCtrl start_layer 10 is past this model's 4"):
        _prox(pack, loaded, res, tar, attention_control=ac.AttentionControl(masactrl=ac.MutualSelfAttention()))


def test_local_blend_keeps_the_source_outside_the_edited_words(pack, loaded):
    control, src, tar = _p2p_node(pack, loaded, local_blend=True, blend_start=0.0, blend_threshold=0.9999)
    control.p2p.blend_dilation = 0     # its 8x8 latents are too small for the 3x3 max-pool
    z0, res, rec = _npi(pack, loaded, src)
    with torch.inference_mode():
        lat = _prox(pack, loaded, res, tar, quantile=0.3, attention_control=control)
        z_src = res.z0
    ms = loaded[0].get_model_object("latent_format")
    z_edit = ms.process_in(lat)
    same = ((z_edit - z_src).abs() < 1e-5).float().mean()
    # the random model's word maps are nearly flat (hence the threshold near 1): a few latent pixels
    # change, all others keep the stored trajectory's z_0 exactly
    assert 0.5 < float(same) < 1.0


def _guider_sample(pack, loaded, guider, res, sigmas_from=0):
    from comfy_extras import nodes_custom_sampler as cs

    sigmas = torch.tensor([float(s) for s in _sigmas_of(pack, loaded, res)])[sigmas_from:]
    with torch.inference_mode():
        noise = cs.DisableNoise().get_noise()[0]
        sampler = cs.KSamplerSelect().get_sampler("euler")[0]
        latent = {"samples": _to_comfy(pack, loaded, res, sigmas_from)}
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _sigmas_of(pack, loaded, res):
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy_glue")
    return glue.grid_sigmas(loaded[0], res.grid)


def _to_comfy(pack, loaded, res, i):
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy_glue")
    ab = res.grid.alphas_cumprod[i]
    z = glue.to_start_latent(res.trajectory[::-1][i], ab, glue.coords_of(loaded[0]))
    return loaded[0].get_model_object("latent_format").process_out(z)


def test_guider_reproduces_the_proxedit_node(pack, loaded):
    control, src, tar = _p2p_node(pack, loaded)
    z0, res, rec = _npi(pack, loaded, src)
    args = dict(base="source", guidance=7.5, prox="hard", quantile=0.6, fixed_threshold=0.0, dilation=1,
                inversion_guidance=0.5, reconstruction_guidance=0.1, t_rec=1000, source_null_mix=0.0)
    node = _prox(pack, loaded, res, tar, attention_control=control, **args)
    with torch.inference_mode():
        guider = _editing(pack).ProxEditGuider.execute(loaded[0], res, tar, negative=loaded[4],
                                                       attention_control=control, **args).args[0]
    out = _guider_sample(pack, loaded, guider, res)
    assert _rel(out, node) < 1e-4
    # over an edit-friendly DDPM inversion, at quantile 1 the guider + euler reproduces the input
    z0d, ddpm, _, _ = _invert_and_sample(pack, loaded, "DDPMInversion", 1.0, steps=8, guidance=1.0, spacing="auto", seed=2)
    with torch.inference_mode():
        g2 = _editing(pack).ProxEditGuider.execute(loaded[0], ddpm, tar, negative=loaded[4],
                                                   **dict(args, quantile=1.0, inversion_guidance=0.0,
                                                          reconstruction_guidance=0.0)).args[0]
    assert _rel(_guider_sample(pack, loaded, g2, ddpm, sigmas_from=3), z0d) < 1e-4
    # a latent of another size than the inversion's is refused (it was a tensor-size error, or silently
    # accepted without inversion guidance)
    for kw in ({}, {"inversion_guidance": 0.0}):
        with torch.inference_mode():
            g3 = _editing(pack).ProxEditGuider.execute(loaded[0], res, tar, negative=loaded[4],
                                                       **dict(args, **kw)).args[0]
        with torch.inference_mode(), pytest.raises(Exception, match=r"^latent_image: SamplerCustomAdvanced gave a "
                                                                    r"latent of shape \(1, 4, 16, 16\)"):
            from comfy_extras import nodes_custom_sampler as cs
            cs.SamplerCustomAdvanced().sample(cs.DisableNoise().get_noise()[0], g3,
                                              cs.KSamplerSelect().get_sampler("euler")[0],
                                              torch.tensor([3.0, 1.0, 0.0]), {"samples": torch.zeros(1, 4, 16, 16)})
    # sigmas off the inversion's grid are a clear error
    with torch.inference_mode(), pytest.raises(Exception, match=r"^sigmas: the sampler asked for sigma"):
        from comfy_extras import nodes_custom_sampler as cs
        cs.SamplerCustomAdvanced().sample(cs.DisableNoise().get_noise()[0], guider,
                                          cs.KSamplerSelect().get_sampler("euler")[0], torch.tensor([3.0, 1.0, 0.0]),
                                          {"samples": torch.zeros(1, 4, 8, 8)})


def test_cancel_inside_an_attention_controlled_edit(pack, loaded):
    control, src, tar = _p2p_node(pack, loaded)
    z0, res, rec = _npi(pack, loaded, src, steps=10)
    at, total = _interrupt_after(5, lambda: _prox(pack, loaded, res, tar, attention_control=control))
    assert total - at <= 1


def test_few_step_lcm_and_50_step_edits_with_attention_control(pack, loaded):
    """The same controls work on a 4-step LCM model and a 50-step model, with a batch of 2: the
    schedules are fractions of the steps, and at quantile 1 the edit is still the reconstruction."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    ac = _ac(pack)
    control, src, tar = _p2p_node(pack, loaded, local_blend=True, blend_threshold=0.9999)
    control = control.combine(ac.AttentionControl(masactrl=ac.MutualSelfAttention(1, 2)))
    n = _nodes(pack)
    lat = _encode(loaded, batch=2)
    with torch.inference_mode():
        lcm = ModelSamplingDiscrete().patch(loaded[0], "lcm", False)[0]
    for model, steps in ((lcm, 4), (loaded[0], 50)):
        with torch.inference_mode():
            res = n.NegativePromptInversion.execute(model, src, steps, "auto", latent=lat).args[0]
            rec = n.SampleFromInversion.execute(model, src, res, 1.0, 0).args[0]["samples"]
            ed = _editing(pack)
            args = dict(base="source", guidance=7.5, prox="hard", fixed_threshold=0.0, dilation=1, inversion_guidance=0.0,
                        reconstruction_guidance=0.0, t_rec=400, source_null_mix=0.0, skip_steps=0)
            p2p_only = ac.AttentionControl(p2p=control.p2p, source_context=control.source_context,
                                           target_context=control.target_context)
            kept = ed.ProxEdit.execute(model, res, tar, quantile=1.0, attention_control=p2p_only, **args).args[0]["samples"]
            edit = ed.ProxEdit.execute(model, res, tar, quantile=0.6, attention_control=control, **args).args[0]["samples"]
        assert res.grid.steps == steps and edit.shape == rec.shape == (2, 4, 8, 8)
        assert torch.isfinite(edit).all() and _rel(edit, rec) > 1e-3
        # at quantile 1 only LocalBlend moves the reconstruction: outside its mask the last step keeps
        # the stored z_0 (the input latent) exactly
        outside = float(((kept - lat["samples"]).abs() < 1e-4 * rec.abs().max()).float().mean())
        assert 0.5 < outside < 1.0


# --------------------------------------------------------------------------------------------
# restoration through ComfyUI (issue 6)

def _restore_args(**kw):
    args = dict(method="stsl", steps=4, seed=0, step_size=1.0, gluing=0.1, stochasticity=0.0, stsl_inner_steps=2,
                stsl_lambda=1.0, stsl_trace_weight=0.02, stsl_lr=0.05, stsl_start="measurement", p2l_prompt_steps=1,
                p2l_prompt_lr=1e-2, p2l_project_every=2, p2l_cg_iters=10, p2l_cg_lambda=0.01,
                decoder_memory="tiled", tile_size=40)
    args.update(kw)
    return args


def _operator(pack, kind="sr_avgpool", **kw):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    base = dict(scale_factor=4, kernel_size=9, blur_sigma=3.0, motion_intensity=0.5, mask_amount=0.4, sigma_y=0.05,
                seed=1)
    base.update(kw)
    with torch.inference_mode():
        return r, r.DegradationOperator.execute(kind, **base).args[0]


def _restore(pack, loaded, y, op, **kw):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    with torch.inference_mode():
        out = r.Restore.execute(loaded[0], loaded[2], loaded[3], y, op, **_restore_args(**kw)).args
    return out[0], out[1]["samples"], json.loads(out[2])


@pytest.mark.parametrize("kind", ["sr_avgpool", "gaussian_blur", "inpaint_box"])
def test_restore_methods_lower_the_measurement_residual(pack, loaded, kind):
    r, op = _operator(pack, kind)
    clean = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        y = r.DegradeImage.execute(clean, op, 0).args[0]
    _, _, unguided = _restore(pack, loaded, y, op, method="ldps", step_size=0.0)
    # P2L without its projection here: the random VAE's encoder is no inverse of its decoder (the
    # projection is tested on the reference in test_core_restoration.py)
    for method, kw in (("ldps", {"step_size": 3.0}), ("psld", {"step_size": 3.0}), ("stsl", {}),
                       ("p2l", {"step_size": 3.0, "p2l_project_every": 0})):
        image, latent, rep = _restore(pack, loaded, y, op, method=method, **kw)
        assert image.shape == clean.shape and latent.shape == (1, 4, 8, 8)
        assert rep["residual"] < unguided["residual"], (kind, method, rep["residual"], unguided["residual"])
        calls = {"ldps": 4, "psld": 4, "stsl": 4 * 2, "p2l": 4 * 2}[method]  # STSL: K = 2 batched calls per step
        assert rep["unet_calls"] == calls, (method, rep["unet_calls"])
        if method == "stsl":
            assert rep["nfe_as_the_paper_counts"] == calls


def test_restore_stops_with_a_clear_message_when_it_diverges(pack, loaded, monkeypatch):
    """The samplers' divergence check (a real divergence is in test_core_restoration.py) reaches the
    user as a clear error: here every latent counts as diverged."""
    r, op = _operator(pack, "sr_avgpool")
    rs = importlib.import_module(pack.__name__ + ".core.restoration")
    monkeypatch.setattr(rs, "MAX_LATENT_RMS", 1e-6)
    y = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(6))
    for method in ("ldps", "psld", "stsl", "p2l"):
        with pytest.raises(Exception, match=r"^step_size/stsl_lr: (LDPS|PSLD|STSL|P2L) diverged at step 1: the "
                                            r"latent has an RMS of"):
            _restore(pack, loaded, y, op, method=method)
    monkeypatch.undo()
    y_nan = y.clone()
    y_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception, match=r"^measurement: contains NaN"):
        _restore(pack, loaded, y_nan, op, method="ldps")


def test_restore_p2l_tunes_the_prompt_and_decoder_memory_modes_agree(pack, loaded):
    r, op = _operator(pack, "sr_avgpool")
    y = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(6))
    _, _, rep = _restore(pack, loaded, y, op, method="p2l", p2l_prompt_steps=2, p2l_prompt_lr=0.05)
    assert rep["embedding_change"] > 1e-4
    before, after = rep["prompt_loss_first_step"]
    assert after < before
    imgs = {m: _restore(pack, loaded, y, op, method="ldps", steps=3, decoder_memory=m, tile_size=16)[0]
            for m in ("full", "checkpoint", "tiled")}
    assert _rel(imgs["checkpoint"], imgs["full"]) < 1e-5
    assert _rel(imgs["tiled"], imgs["full"]) < 1e-5   # the 8x8 latent fits in one 16-pixel tile


def test_restore_decoder_defaults_decode_512px_in_bounded_tiles_and_output_whole(pack, glue, loaded):
    """The Restore node's defaults (tiled, tile_size 40) at 512 px: every decoder call of a gradient
    sees a tile of at most 40 latent pixels a side (2 x 2 tiles of 35, each run forward and again
    in the backward pass), the gradient is finite, and the output image is ComfyUI's whole decode."""
    model, clip, vae = loaded[:3]
    with torch.inference_mode():
        codec = glue.LatentCodec(vae, model)
        seen, decode_raw = [], codec._decode_raw
        codec._decode_raw = lambda raw: seen.append(tuple(raw.shape[-2:])) or decode_raw(raw)
        z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
        with codec.autograd():
            zz = z.clone().requires_grad_(True)
            x = codec.decode(zz)
            (g,) = torch.autograd.grad(x.pow(2).mean(), zz)
        assert x.shape == (1, 3, 512, 512) and seen == [(35, 35)] * 8, seen
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0
        out = codec.decode_output(z)
        ref = vae.decode(model.get_model_object("latent_format").process_out(z))
    assert torch.equal(out, ref)


def test_restore_bad_inputs_get_clear_errors(pack, loaded):
    r, op = _operator(pack, "sr_avgpool")
    with pytest.raises(Exception, match=r"^measurement: the restored image would be 68x68; the VAE needs multiples of 8"):
        _restore(pack, loaded, torch.rand(1, 17, 17, 3), op)
    with torch.inference_mode():
        r2 = importlib.import_module(pack.__name__ + ".nodes.restoration")
        masked = r2.DegradationOperator.execute("inpaint_mask", 4, 9, 3.0, 0.5, 0.4, 0.0, 1,
                                                mask=torch.ones(10, 10)).args[0]
    with pytest.raises(Exception, match=r"^mask: the mask is 10x10 but the image is 64x64"):
        _restore(pack, loaded, torch.rand(1, 64, 64, 3), masked)
    with pytest.raises(Exception, match=r"^operator: connect a Degradation Operator"):
        _restore(pack, loaded, torch.rand(1, 64, 64, 3), "not an operator")
    with pytest.raises(Exception, match=r"^positive: the conditioning has a batch of 2"):
        two = [[torch.cat([loaded[3][0][0]] * 2), dict(loaded[3][0][1])]]
        rr = importlib.import_module(pack.__name__ + ".nodes.restoration")
        with torch.inference_mode():
            rr.Restore.execute(loaded[0], loaded[2], two, torch.rand(3, 16, 16, 3), op, **_restore_args())


@pytest.mark.parametrize("method", ["stsl", "p2l"])
def test_cancel_inside_the_restoration_inner_loops(pack, loaded, method):
    r, op = _operator(pack, "gaussian_blur")
    y = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    # the cancel comes during the 2nd model call of the 2nd step's inner loop
    at, total = _interrupt_after(5, lambda: _restore(pack, loaded, y, op, method=method, stsl_inner_steps=3,
                                                     p2l_prompt_steps=3))
    assert total - at <= 1

# --------------------------------------------------------------------------------------------
# fuzz: bad input over every node ends in a clear error or a finite result

def _fuzz_cases():
    """(name, fn(ctx)) over every node; ctx holds the loaded model, a good latent, an inversion, ..."""
    nan = float("nan")
    inf = float("inf")

    def lat(fill=None, shape=(1, 4, 8, 8)):
        z = torch.zeros(shape)
        if fill is not None:
            z.view(-1)[0] = fill
        return {"samples": z}

    def ddim(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", latent=c["lat"])
        a.update(kw)
        return c["n"].DDIMInversion.execute(c["model"], a.pop("positive", c["pos"]), **a)

    def exact(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", method="anderson", iterations=2, tolerance=1e-4,
                 lambda_prior=0.1, adjust_rounds=0, latent=c["lat"])
        a.update(kw)
        return c["n"].ExactInversion.execute(c["model"], c["pos"], **a)

    def npi(c, **kw):
        a = dict(steps=4, spacing="auto", latent=c["lat"])
        a.update(kw)
        return c["n"].NegativePromptInversion.execute(c["model"], c["pos"], **a)

    def null(c, **kw):
        a = dict(steps=3, guidance=7.5, spacing="auto", inner_steps=2, learning_rate=0.01, tolerance=1e-5,
                 negative=c["neg"], latent=c["lat"])
        a.update(kw)
        return c["n"].NullTextInversion.execute(c["model"], c["pos"], **a)

    def ddpm(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", seed=0, latent=c["lat"])
        a.update(kw)
        return c["n"].DDPMInversion.execute(c["model"], c["pos"], **a)

    def sample(c, **kw):
        a = dict(inversion=c["res"], guidance=7.5, skip_steps=0)
        a.update(kw)
        return c["n"].SampleFromInversion.execute(c["model"], c["pos"], **a)

    def prox(c, **kw):
        a = dict(inversion=c["res"], target=c["neg"], base="source", guidance=7.5, prox="hard", quantile=0.7,
                 fixed_threshold=0.0, dilation=1, inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400,
                 source_null_mix=0.0, skip_steps=0, negative=c["neg"])
        a.update(kw)
        return c["e"].ProxEdit.execute(c["model"], **a)

    def guider(c, **kw):
        a = dict(inversion=c["res"], target=c["neg"], base="source", guidance=7.5, prox="hard", quantile=0.7,
                 fixed_threshold=0.0, dilation=1, inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400,
                 source_null_mix=0.0, negative=c["neg"])
        a.update(kw)
        return c["e"].ProxEditGuider.execute(c["model"], **a)

    def p2p(c, **kw):
        a = dict(source_prompt="a photo of a cat", target_prompt="a photo of a dog", mode="replace",
                 cross_replace=0.8, self_replace=0.5, reweight="", local_blend=False, blend_words="",
                 blend_threshold=0.3, blend_start=0.2)
        a.update(kw)
        return c["e"].PromptToPrompt.execute(c["clip"], **a)

    def masa(c, **kw):
        a = dict(start_step=4, start_layer=2, strategy="source", base_strategy="source")
        a.update(kw)
        return c["e"].MasaCtrl.execute(**a)

    def dinv(c, image=None, **kw):
        a = dict(method="gradient_free_adam", iterations=2, step_size=0.01, momentum=0.3, precision="auto")
        a.update(kw)
        return c["d"].DecoderInversion.execute(torch.rand(1, 64, 64, 3) if image is None else image, c["vae"], **a)

    def op(c, **kw):
        a = dict(kind="sr_avgpool", scale_factor=4, kernel_size=9, blur_sigma=3.0, motion_intensity=0.5,
                 mask_amount=0.4, sigma_y=0.05, seed=1)
        a.update(kw)
        return c["r"].DegradationOperator.execute(**a)

    def degrade(c, image=None, **kw):
        return c["r"].DegradeImage.execute(torch.rand(1, 64, 64, 3) if image is None else image, c["op"], 0)

    def restore(c, measurement=None, **kw):
        y = torch.rand(1, 16, 16, 3) if measurement is None else measurement
        return c["r"].Restore.execute(c["model"], c["vae"], c["pos"], y, c["op"], **_restore_args(**dict(kw)))

    img = lambda H, W, fill=None: (lambda t: (t.view(-1).__setitem__(0, fill), t)[1] if fill is not None else t)(
        torch.rand(1, H, W, 3))  # noqa: E731
    return [
        ("ddim nan latent", lambda c: ddim(c, latent=lat(nan))), ("ddim inf latent", lambda c: ddim(c, latent=lat(inf))),
        ("ddim 16ch latent", lambda c: ddim(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("ddim 5d latent", lambda c: ddim(c, latent=lat(shape=(1, 4, 2, 8, 8)))),
        ("ddim 1x1 image", lambda c: ddim(c, latent=None, image=img(1, 1), vae=c["vae"])),
        ("ddim nan image", lambda c: ddim(c, latent=None, image=img(64, 64, nan), vae=c["vae"])),
        ("ddim steps 0", lambda c: ddim(c, steps=0)), ("ddim guidance nan", lambda c: ddim(c, guidance=nan)),
        ("ddim guidance inf", lambda c: ddim(c, guidance=inf, negative=c["neg"])),
        ("ddim no negative", lambda c: ddim(c, guidance=7.5)),
        ("ddim cond batch", lambda c: ddim(c, latent=lat(shape=(2, 4, 8, 8)), positive=c["pos3"])),
        ("exact nan latent", lambda c: exact(c, latent=lat(nan))),
        ("rnri inf latent", lambda c: exact(c, method="rnri", latent=lat(inf))),
        ("gd nan latent", lambda c: exact(c, method="gradient_descent", latent=lat(nan))),
        ("exact lambda inf", lambda c: exact(c, method="rnri", lambda_prior=inf)),
        ("exact tolerance nan", lambda c: exact(c, tolerance=nan)),
        ("exact iterations -1", lambda c: exact(c, iterations=-1)), ("exact krylov 0", lambda c: exact(c, krylov=0)),
        ("exact bad method", lambda c: exact(c, method="newton")),
        ("npi nan latent", lambda c: npi(c, latent=lat(nan))), ("npi 16ch", lambda c: npi(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("npi 4x4 image", lambda c: npi(c, latent=None, image=img(4, 4), vae=c["vae"])),
        ("null nan latent", lambda c: null(c, latent=lat(nan))), ("null lr nan", lambda c: null(c, learning_rate=nan)),
        ("null lr huge", lambda c: null(c, learning_rate=1e9)), ("null no negative", lambda c: null(c, negative=None)),
        ("ddpm inf latent", lambda c: ddpm(c, latent=lat(inf))), ("ddpm steps 0", lambda c: ddpm(c, steps=0)),
        ("ddpm 16ch", lambda c: ddpm(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("sample guidance nan", lambda c: sample(c, guidance=nan)), ("sample skip too far", lambda c: sample(c, skip_steps=99)),
        ("sample mask batch", lambda c: sample(c, mask=torch.ones(3, 64, 64))),
        ("sample mask nan", lambda c: sample(c, mask=torch.full((1, 64, 64), nan))),
        ("prox quantile nan", lambda c: prox(c, quantile=nan)), ("prox quantile 1.5", lambda c: prox(c, quantile=1.5)),
        ("prox threshold -1", lambda c: prox(c, fixed_threshold=-1.0)), ("prox guidance inf", lambda c: prox(c, guidance=inf)),
        ("prox inversion guidance nan", lambda c: prox(c, inversion_guidance=nan)),
        ("prox t_rec -5", lambda c: prox(c, t_rec=-5)), ("prox mix nan", lambda c: prox(c, source_null_mix=nan)),
        ("prox bad prox", lambda c: prox(c, prox="l7")), ("guider guidance nan", lambda c: guider(c, guidance=nan)),
        ("guider quantile -1", lambda c: guider(c, quantile=-1.0)),
        ("p2p reweight nan", lambda c: p2p(c, mode="reweight", reweight="dog:nan")),
        ("p2p cross nan", lambda c: p2p(c, cross_replace=nan)), ("p2p blend threshold nan", lambda c: p2p(c, blend_threshold=nan)),
        ("p2p empty target", lambda c: p2p(c, target_prompt="")), ("p2p blend word missing", lambda c: p2p(c, local_blend=True, blend_words="zebra")),
        ("p2p bad mode", lambda c: p2p(c, mode="swap")),
        ("masa start -1", lambda c: masa(c, start_step=-1)), ("masa bad strategy", lambda c: masa(c, strategy="all")),
        ("dinv step nan", lambda c: dinv(c, step_size=nan)), ("dinv iterations 0", lambda c: dinv(c, iterations=0)),
        ("dinv momentum 1", lambda c: dinv(c, method="gradient_free_momentum", momentum=1.0)),
        ("dinv inf latent", lambda c: dinv(c, latent=lat(inf))), ("dinv 2x2 image", lambda c: dinv(c, image=img(2, 2))),
        ("op scale 0", lambda c: op(c, scale_factor=0)), ("op kernel even", lambda c: op(c, kind="gaussian_blur", kernel_size=8)),
        ("op sigma nan", lambda c: op(c, sigma_y=nan)), ("op mask amount 2", lambda c: op(c, kind="inpaint_random", mask_amount=2.0)),
        ("op blur sigma 0", lambda c: op(c, kind="gaussian_blur", blur_sigma=0.0)),
        ("degrade nan image", lambda c: degrade(c, image=img(64, 64, nan))), ("degrade 1x1 image", lambda c: degrade(c, image=img(1, 1))),
        ("restore nan measurement", lambda c: restore(c, measurement=img(16, 16, nan))),
        ("restore step nan", lambda c: restore(c, step_size=nan)), ("restore lr inf", lambda c: restore(c, stsl_lr=inf)),
        ("restore steps 0", lambda c: restore(c, steps=0)), ("restore wrong size", lambda c: restore(c, measurement=img(15, 17))),
        ("restore gluing nan", lambda c: restore(c, method="psld", gluing=nan)),
        ("restore bad method", lambda c: restore(c, method="dps3")),
    ]


def _outcome(run) -> str:
    """'clear' (an error whose message starts with the input it names), 'ok' (every output tensor
    finite) or what went wrong: 'raw: <type>: <message>' or 'nan in the output'."""
    import comfy.model_management

    try:
        with torch.inference_mode():
            out = run()
    except comfy.model_management.InterruptProcessingException:
        raise
    except Exception as exc:  # noqa: BLE001  (the point is to see any exception)
        msg = str(exc)
        import re

        return "clear" if re.match(r"^[a-z_/0-9]+( \([^)]*\))?: ", msg) else f"raw: {type(exc).__name__}: {msg[:200]}"
    tensors = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
    walk(getattr(out, "args", out))
    return "ok" if all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.is_floating_point()) \
        else "nan in the output"


def test_fuzz_bad_input_over_every_node_ends_clearly(pack, loaded):
    """65 bad inputs over all 15 nodes: each ends in a clear error naming an input, or in a finite
    result; never a raw exception from inside, never a silent NaN."""
    model, clip, vae, pos, neg = loaded
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    with torch.inference_mode():
        one = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        pos3 = [[one[0][0].expand(3, *one[0][0].shape[1:]).clone(), dict(one[0][1])]]  # a batch of 3 prompts
        op = r.DegradationOperator.execute("sr_avgpool", 4, 9, 3.0, 0.5, 0.4, 0.05, 1).args[0]
    _, res, _ = _npi(pack, loaded, pos, steps=4)
    ctx = {"model": model, "clip": clip, "vae": vae, "pos": pos, "neg": neg, "pos3": pos3, "res": res, "op": op,
           "lat": _encode(loaded), "n": _nodes(pack), "e": _editing(pack), "r": r,
           "d": importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")}
    cases = _fuzz_cases()
    assert len(cases) >= 60 and len({type(c) for c in ctx.values()}) > 5
    bad = {name: o for name, fn in cases if (o := _outcome(lambda: fn(ctx))) not in ("clear", "ok")}
    assert not bad, "\n".join(f"{k} -> {v}" for k, v in bad.items())
