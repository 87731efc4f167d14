"""The ComfyUI glue (nodes/comfy/) on the real ComfyUI with the tiny SD1.5: the predictor against the
UNet's own output (eps, v-prediction, LCM), the schedule and grid against ComfyUI's, autograd inside
inference mode, 16-bit weights, and DDIM's reconstruction error shrinking with the steps."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from support import comfy_host
from support.integration import UNetCounter, _rel

comfy_host.skip_module_without_host()


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
                traj = core.ddim_invert(pred, z, grid, "positive").trajectory
                return core.ddim_sample(pred, traj[-1], grid, "positive")[-1]

            rec = glue.run_with_predictor(model, {"positive": pos}, z.shape, run)
            errs.append(_rel(rec, z))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[1] and errs[2] < 0.05, errs


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
            traj = core.ddim_invert(pred, z, grid, "positive").trajectory
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
