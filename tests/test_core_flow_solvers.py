"""RF-Solver and FireFlow (core/flow_solvers.py, issue 23) on the analytic Gaussian flow, whose
probability-flow map between any two levels is known in closed form (core/reference.py
``gaussian_flow``): both invert and sample at second order (doubling the steps cuts the error about
4x; DDIM, i.e. Euler, about 2x), with 2 N and N + 1 model calls."""
from __future__ import annotations

import pytest
import torch

from comfyui_inverse.core import flow_solvers as fs
from comfyui_inverse.core import inversion, schedule, steps
from comfyui_inverse.core.ddim import ddim_invert, ddim_sample
from comfyui_inverse.core.flow import FlowPredictor, discrete_flow_sigmas, gaussian_flow_denoiser
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior, gaussian_flow

STD = 0.6


def _setup(n):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(1, 4, 6, 6, generator=g)
    x_src = m + STD * torch.randn(1, 4, 6, 6, generator=g)
    sig = discrete_flow_sigmas()
    pred = FlowPredictor(gaussian_flow_denoiser({"c": m}, STD), sig)
    grid = schedule.TimestepGrid.from_schedule(schedule.alphas_cumprod_from_sigmas(sig),
                                               schedule.timestep_spacing(n, len(sig), "trailing"))
    return pred, grid, m, x_src


def _errors(method, n):
    """Max error, in flow coordinates, of inverting x_src to the noisiest level and of sampling the
    exact noisy latent back, against the closed form; and the model calls of each."""
    pred, grid, m, x_src = _setup(n)
    a_T = grid.alphas_cumprod[0]
    exact_T = gaussian_flow(x_src, 1.0, a_T, m, STD)
    if method == "ddim":
        z_T = ddim_invert(pred, x_src, grid, "c").noise_latent
        inv_calls = pred.calls
        back = ddim_sample(pred, exact_T.float(), grid, "c")[-1]
    else:
        z_T = fs.flow_invert(pred, x_src, grid, "c", method=method).noise_latent
        inv_calls = pred.calls
        back = fs.flow_sample(pred, exact_T.float(), grid, "c", method=method)[-1]
    e_inv = float((steps.to_flow(z_T.double(), a_T) - steps.to_flow(exact_T, a_T)).abs().max())
    e_smp = float((back.double() - gaussian_flow(exact_T, a_T, 1.0, m, STD)).abs().max())
    return e_inv, e_smp, inv_calls, pred.calls - inv_calls


@pytest.mark.parametrize("method", ["rf_solver", "fireflow"])
def test_second_order_inversion_and_sampling_on_the_gaussian_flow(method):
    runs = {n: _errors(method, n) for n in (14, 28, 56)}
    ddim = {n: _errors("ddim", n) for n in (14, 28)}
    for k in (0, 1):  # inversion, sampling
        e = [runs[n][k] for n in (14, 28, 56)]
        assert e[0] / e[1] > 3.5 and e[1] / e[2] > 3.5, (method, k, e)  # second order (DDIM: ~1.9x)
        assert 1.6 < ddim[14][k] / ddim[28][k] < 2.3, ddim
        assert e[1] < ddim[28][k] / 50, (method, k, e, ddim)
    for n, (_, _, inv_calls, smp_calls) in runs.items():
        assert inv_calls == smp_calls == fs.calls(method, n) == (2 * n if method == "rf_solver" else n + 1)


def test_inversion_results_sample_back_with_their_own_solver_and_keep_the_masked_out_region():
    pred, grid, m, x_src = _setup(10)
    res = inversion.invert(pred, x_src, grid, "c", method="fireflow")
    assert res.method == "fireflow" and len(res.trajectory) == 11
    rec = inversion.sample_from_inversion(pred, res, "c")
    assert torch.equal(rec[-1], fs.flow_sample(pred, res.noise_latent, grid, "c", method="fireflow")[-1])
    ddim_rec = ddim_sample(pred, ddim_invert(pred, x_src, grid, "c").noise_latent, grid, "c")[-1]
    assert float((rec[-1] - x_src).abs().max()) < float((ddim_rec - x_src).abs().max()) / 5
    # a mask keeps the inversion's latents where it is 0, bit for bit, and solves where it is 1
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    other = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    g2 = FlowPredictor(gaussian_flow_denoiser({"c": m, "d": other}, STD), pred.sigmas)
    out = inversion.sample_from_inversion(g2, res, "d", mask=mask, start_step=3)
    assert len(out) == 8
    assert torch.equal(out[-1][..., 3:], res.trajectory[0][..., 3:])
    assert float((out[-1][..., :3] - x_src[..., :3]).abs().mean()) > 0.2
    with pytest.raises(ValueError, match="unknown flow solver"):
        fs.flow_invert(pred, x_src, grid, "c", method="heun")


def test_a_level_is_evaluated_at_its_own_sigma():
    ac = schedule.scaled_linear_alphas_cumprod()
    prior = MixturePrior.gaussian(torch.zeros(1, 2, 2), 0.5)
    den = GaussianMixtureDenoiser({"c": prior}, ac)
    z = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    level, abar = fs.midpoint_level(500, 400, 0.7)
    assert int(level) == 450 and abs(level.sigma - 0.7 / 0.3) < 1e-12 and abs(abar - 1 / (1 + (0.7 / 0.3) ** 2)) < 1e-12
    assert torch.allclose(den(z, level, ["c"])[0], den.eps(z, abar, prior))
    assert not torch.allclose(den(z, level, ["c"])[0], den(z, 450, ["c"])[0])
    assert torch.equal(den(z, schedule.Level(450, float(((1 - ac[450]) / ac[450]).sqrt())), ["c"]),
                       den(z, 450, ["c"]))
