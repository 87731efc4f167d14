"""core/flow.py on an analytic reference in flow parameterisation: the exact Tweedie denoiser of a
Gaussian prior derived in flow coordinates (x = (1 - s) x0 + s eps), mapped into DDPM coordinates,
drives the same core solvers as every other model."""
import math

import pytest
import torch

from comfyui_inverse.core import ddim, inversion, operators as ops, restoration as rs, schedule
from comfyui_inverse.core.flow import Coords, FlowPredictor, discrete_flow_sigmas, gaussian_flow_denoiser
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior
from support.core_oracles import gaussian_posterior_mean_inpaint

SHAPE = (1, 4, 8, 8)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    sig = discrete_flow_sigmas()
    mean = {"c": torch.randn(SHAPE[1:], generator=g, dtype=torch.float64) * 0.5,
            "u": torch.zeros(SHAPE[1:], dtype=torch.float64)}
    pred = FlowPredictor(gaussian_flow_denoiser(mean, 0.7), sig)
    x0 = (mean["c"][None] + 0.7 * torch.randn(SHAPE, generator=g, dtype=torch.float64)).float()
    return pred, sig, mean, x0


def _grid(sig, steps):
    ac = schedule.alphas_cumprod_from_sigmas(sig)
    return schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, len(sig), "trailing"))


def test_the_flow_derivation_and_the_ddpm_derivation_give_the_same_noise():
    """Two independent derivations of the same Gaussian prior's MMSE noise: Tweedie in flow
    coordinates mapped through Coords, and core/reference.py's eps in DDPM coordinates."""
    pred, sig, mean, x0 = _problem()
    ref = GaussianMixtureDenoiser({"c": MixturePrior.gaussian(mean["c"], 0.7)}, schedule.alphas_cumprod_from_sigmas(sig))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0, 100, 500, len(sig) - 1):
        assert torch.allclose(pred(z, t, ["c"])[0], ref(z, t, ["c"])[0].double(), atol=1e-9), t


def test_coords_round_trip_and_the_velocity_identities():
    c = Coords(flow=True)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for s in (0.02, 0.5, 0.97):
        sigma = c.ddpm_sigma(s)
        assert c.level(sigma) == pytest.approx(s, rel=1e-14)
        x = (1 - s) * x0 + s * eps
        abar = 1 / (1 + sigma ** 2)
        z = x / c.x_scale(sigma)
        assert torch.allclose(z, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, atol=1e-13)
        v = eps - x0
        assert torch.allclose(c.eps(x, x - s * v, sigma), eps, atol=1e-12)


def test_euler_inversion_error_shrinks_at_first_order():
    pred, sig, mean, x0 = _problem()
    errors = []
    for steps in (7, 14, 28, 56):
        grid = _grid(sig, steps)
        rec = ddim.ddim_sample(pred, ddim.ddim_invert(pred, x0, grid, "c").noise_latent, grid, "c")[-1]
        errors.append(ddim.reconstruction_rmse(rec, x0))
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(0.35 < r < 0.65 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_anderson_at_3_calls_per_step_is_100x_euler_inversion_at_28_steps(guidance):
    """The flow issue's goal on the analytic reference: exact solvers reach <= 1/100 of Euler
    inversion's reconstruction error at 28 steps with <= 3 model calls per step."""
    pred, sig, mean, x0 = _problem()
    grid = _grid(sig, 28)
    uncond = "u" if guidance != 1.0 else None
    euler = ddim.ddim_sample(pred, ddim.ddim_invert(pred, x0, grid, "c", uncond, guidance).noise_latent, grid, "c", uncond,
                             guidance)[-1]
    before = pred.calls
    traj = inversion.iterative_invert(pred, x0, grid, "c", uncond, guidance, "anderson",
                                      inversion.SolverConfig(iterations=2, tol=1e-7)).trajectory
    calls_per_step = (pred.calls - before) / 28
    rec = ddim.ddim_sample(pred, traj[-1], grid, "c", uncond, guidance)[-1]
    e_euler, e_anderson = ddim.reconstruction_rmse(euler, x0), ddim.reconstruction_rmse(rec, x0)
    assert calls_per_step <= 3 and e_anderson <= e_euler / 100, (e_euler, e_anderson, calls_per_step)


def test_noise_maps_reproduce_the_input_to_float_precision():
    pred, sig, mean, x0 = _problem()
    grid = _grid(sig, 20)
    res = inversion.ddpm_invert(pred, x0, grid, "c", "u", 3.5, generator=torch.Generator().manual_seed(0))
    xs, maps = res.trajectory, res.extras["noise_maps"]
    rec = inversion.ddpm_sample(pred, xs[-1], grid, maps, "c", "u", 3.5)[-1]
    assert ddim.reconstruction_rmse(rec, x0) < 1e-6


def test_restoration_on_the_flow_reference_lowers_the_residual_and_nears_the_posterior():
    pred, sig, mean, x_true = _problem(1)
    op = ops.Inpaint(ops.random_mask(8, 8, 0.5, seed=1), sigma_y=0.05)
    y = op.measure(x_true, torch.Generator().manual_seed(2))
    grid = _grid(sig, 40)
    post = gaussian_posterior_mean_inpaint(y, op.mask, mean["c"][None].float(), 0.7, 0.05)
    ident = lambda v: v  # noqa: E731
    guided, unguided = [], []
    for s in range(6):
        zT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + s))
        unguided.append(ddim.ddim_sample(pred, zT, grid, "c")[-1])
        guided.append(rs.ldps(rs.Problem(pred, ident, op, y, grid, "c", zT), rs.RestorationConfig(zeta=3.0)).latent)
    res = lambda z: float((y - op.A(z)).norm())  # noqa: E731
    assert sum(map(res, guided)) < 0.5 * sum(map(res, unguided))
    avg_g, avg_u = torch.stack(guided).mean(0), torch.stack(unguided).mean(0)
    assert ddim.reconstruction_rmse(avg_g, post) < 0.6 * ddim.reconstruction_rmse(avg_u, post)
