"""DDIM sampling and inversion in core/, against diffusers and an analytic reference model."""
import math

import pytest
import torch

from comfyui_inverse.core import ddim, schedule
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior, gaussian_flow
from comfyui_inverse.core.steps import ddim_step, eps_from_x0, guided_eps, predicted_x0
from support.core_models import mixture_reference

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def test_alphas_cumprod_match_diffusers():
    ref = diffusers.DDIMScheduler(**SD).alphas_cumprod.double()
    ours = schedule.scaled_linear_alphas_cumprod()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)  # diffusers accumulates them in float32
    lin = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2).alphas_cumprod
    assert torch.allclose(schedule.linear_alphas_cumprod(), lin.double(), atol=1e-6)


# (leading, offset 1, 1000 steps) is left out: diffusers itself yields the out-of-range timestep 1000
@pytest.mark.parametrize("spacing,offset,steps", [
    (sp, off, n) for sp, off in [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)]
    for n in (1, 4, 10, 50, 1000) if not (off and n == 1000)])
def test_timestep_spacing_matches_diffusers(spacing, offset, steps):
    sch = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(steps)
    ours = schedule.timestep_spacing(steps, spacing=spacing, steps_offset=offset)
    assert ours == sch.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_grid_matches_diffusers(steps):
    sch = diffusers.LCMScheduler(**SD)
    sch.set_timesteps(steps)
    assert schedule.timestep_spacing(steps, spacing="lcm") == sch.timesteps.tolist()


def test_bad_steps_are_rejected():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        schedule.timestep_spacing(0)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        schedule.timestep_spacing(4, spacing="karras")


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_loop_matches_diffusers_ddim(set_alpha_to_one, guidance):
    model, ac, z0 = mixture_reference()
    steps = 10
    sch = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    sch.set_timesteps(steps)
    zT = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    z = zT.clone()
    for t in sch.timesteps:
        eps = guided_eps(model, z, int(t), "c", "u", guidance)
        z = sch.step(eps, t, z).prev_sample
    final = float(sch.final_alpha_cumprod)
    grid = schedule.TimestepGrid.from_schedule(ac, sch.timesteps.tolist(), final_alpha_cumprod=final)
    ours = ddim.ddim_sample(model, zT, grid, "c", "u", guidance)[-1]
    assert ddim.reconstruction_rmse(ours, z) < 2e-5


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_loop_matches_diffusers_ddim_inverse(set_alpha_to_one, spacing):
    model, ac, z0 = mixture_reference()
    steps = 10
    sch = diffusers.DDIMInverseScheduler(**SD, steps_offset=1 if spacing == "leading" else 0,
                                         set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                                         clip_sample=False)
    sch.set_timesteps(steps)
    z = z0.clone()
    for t in sch.timesteps:
        z = sch.step(model(z, int(t), ["c"])[0], t, z).prev_sample
    init = float(sch.initial_alpha_cumprod)
    grid = schedule.TimestepGrid.from_schedule(ac, sch.timesteps.flip(0).tolist(), final_alpha_cumprod=init)
    traj = ddim.ddim_invert(model, z0, grid, "c").trajectory
    assert len(traj) == steps + 1
    assert ddim.reconstruction_rmse(traj[-1], z) < 2e-5


def test_single_step_matches_formula_and_is_its_own_inverse():
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    a_t, a_s = 0.3, 0.8
    down = ddim_step(z, eps, a_t, a_s)
    x0 = predicted_x0(z, eps, a_t)
    assert torch.allclose(down, math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps, atol=1e-6)
    assert torch.allclose(ddim_step(down, eps, a_s, a_t), z, atol=1e-5)
    assert torch.allclose(eps_from_x0(z, x0, a_t), eps, atol=1e-5)


def test_reference_denoiser_is_the_exact_score():
    """eps* = -sqrt(1-a) grad log p_t, checked by autograd on the mixture density."""
    model, ac, z0 = mixture_reference(shape=(1, 2, 2, 2))
    prior = model.priors["c"]
    a = float(ac[400])
    z = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mu = prior.means.reshape(3, -1)
    v = a * prior.stds ** 2 + 1 - a
    d = z.reshape(1, -1) - math.sqrt(a) * mu
    logp = torch.logsumexp(torch.log(prior.weights) - 0.5 * 8 * torch.log(v)
                           - 0.5 * (d ** 2).sum(-1) / v, dim=0)
    (grad,) = torch.autograd.grad(logp, z)
    assert torch.allclose(model.eps(z.detach(), a, prior), -math.sqrt(1 - a) * grad, atol=1e-10)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_converges_to_exact_flow_as_steps_grow(spacing):
    """On a Gaussian prior the ODE solution is closed-form; DDIM's error is first order."""
    ac = schedule.scaled_linear_alphas_cumprod()
    mean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    prior = MixturePrior.gaussian(mean[0], 0.6)
    model = GaussianMixtureDenoiser({"c": prior}, ac)
    z0 = mean + 0.6 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = []
    for steps in (5, 20, 80):
        grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, spacing=spacing))
        zT = ddim.ddim_invert(model, z0, grid, "c").noise_latent
        exact = gaussian_flow(z0, 1.0, grid.alphas_cumprod[0], mean, 0.6)
        errors.append(ddim.reconstruction_rmse(zT, exact) / float(exact.std()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] > 2.5  # first order: x4 steps -> ~x4 smaller
    assert errors[2] < 0.03


@pytest.mark.parametrize("guidance,components", [(1.0, 3), (1.0, 1), (2.5, 1)])
def test_invert_then_sample_reconstructs_within_discretisation_error(guidance, components):
    """Guided flows of multi-modal priors amplify errors near mode boundaries (a property of
    CFG, not of the solver), so guidance is tested on a unimodal conditional prior."""
    model, ac, z0 = mixture_reference(components=components)
    errs = []
    for steps in (10, 50, 250):
        grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, steps_offset=1))
        traj = ddim.ddim_invert(model, z0, grid, "c", "u", guidance).trajectory
        rec = ddim.ddim_sample(model, traj[-1], grid, "c", "u", guidance)[-1]
        errs.append(ddim.reconstruction_rmse(rec, z0) / float(z0.std()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.02, errs


def test_guidance_one_makes_one_branch_call():
    model, ac, z0 = mixture_reference()
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(5))
    ddim.ddim_invert(model, z0, grid, "c", "u", 1.0)
    assert (model.calls, model.evaluations) == (5, 5)
    ddim.ddim_sample(model, z0, grid, "c", "u", 7.5)
    assert (model.calls, model.evaluations) == (10, 15)


def test_callback_can_cancel_the_loop():
    model, ac, z0 = mixture_reference()
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(10))

    class Cancelled(Exception):
        pass

    def cb(i, total, z):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        ddim.ddim_invert(model, z0, grid, "c", callback=cb)
    assert model.calls == 3


def test_grid_validation():
    with pytest.raises(ValueError, match="noisy to clean"):
        schedule.TimestepGrid((1, 500, -1), (0.9, 0.3, 1.0))
    g = schedule.TimestepGrid.from_schedule(schedule.scaled_linear_alphas_cumprod(), [999, 499])
    assert g.steps == 2 and g.timesteps[-1] == schedule.CLEAN and g.sigmas()[-1] == 0
