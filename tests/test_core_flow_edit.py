"""FlowEdit (core/flow_edit.py, issue 23) against closed forms on analytic Gaussian flows.

For x0 ~ N(m, std^2 I) the rectified flow x_s = (1 - s) x0 + s n has the affine velocity
v(x) = A_s (x - (1 - s) m) - m with A_s = r_s' / r_s, r_s = sqrt((1 - s)^2 std^2 + s^2). With source
and target sharing std, FlowEdit's velocity difference at x_edit = x_src + d is, whatever the noise
draw, V_delta = A_s d - (1 + (1 - s) A_s)(m_tar - m_src); its ODE dd/ds = V_delta from d(s0) = 0 ends
at d(0) = k (m_tar - m_src) with k = 1 - (1 - s0) std / r_{s0} (k = 1 from pure noise)."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_inverse.core import flow_edit as fe
from comfyui_inverse.core import schedule
from comfyui_inverse.core.flow import FlowPredictor, discrete_flow_sigmas, gaussian_flow_denoiser

STD = 0.6


def _setup(steps, means=None):
    g = torch.Generator().manual_seed(0)
    means = means or {"src": torch.randn(1, 4, 6, 6, generator=g), "tar": torch.randn(1, 4, 6, 6, generator=g)}
    sig = discrete_flow_sigmas()
    pred = FlowPredictor(gaussian_flow_denoiser(means, STD), sig)
    ac = schedule.alphas_cumprod_from_sigmas(sig)
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, len(sig), "trailing"))
    x_src = means["src"] + STD * torch.randn(1, 4, 6, 6, generator=g)
    return pred, grid, means, x_src


def _r(s):
    return math.sqrt((1 - s) ** 2 * STD ** 2 + s ** 2)


def _A(s):
    return (-(1 - s) * STD ** 2 + s) / _r(s) ** 2


def test_velocity_is_the_gaussian_flow_field():
    pred, grid, means, x = _setup(10)
    for i in (0, 4, 9):
        a = grid.alphas_cumprod[i]
        s = fe.flow_time(a)
        v = fe.velocity(pred, x, grid.timesteps[i], a, "src")
        exact = _A(s) * (x - (1 - s) * means["src"]) - means["src"]
        # float32: z = x / (1 - s) amplifies roundoff ~100x at s = 0.99
        assert torch.allclose(v, exact, atol=1e-4, rtol=1e-4), (s, float((v - exact).abs().max()))


def test_velocity_difference_matches_the_closed_form_whatever_the_noise():
    pred, grid, means, x_src = _setup(10)
    d = 0.3 * torch.randn(x_src.shape, generator=torch.Generator().manual_seed(3))
    dm = means["tar"] - means["src"]
    for i in (1, 5, 8):
        a = grid.alphas_cumprod[i]
        s = fe.flow_time(a)
        exact = _A(s) * d - (1 + (1 - s) * _A(s)) * dm
        for seed in (0, 1):
            n = torch.randn(x_src.shape, generator=torch.Generator().manual_seed(seed))
            xs = (1 - s) * x_src + s * n
            got = fe.velocity(pred, xs + d, grid.timesteps[i], a, "tar") - fe.velocity(pred, xs, grid.timesteps[i], a, "src")
            assert torch.allclose(got, exact, atol=2e-5, rtol=1e-4), (s, float((got - exact).abs().max()))


def test_flowedit_converges_to_the_closed_form_at_first_order():
    errors = []
    for steps in (10, 20, 40):
        pred, grid, means, x_src = _setup(steps)
        s0 = fe.flow_time(grid.alphas_cumprod[0])
        k = 1 - (1 - s0) * STD / _r(s0)
        out = fe.flowedit(pred, x_src, grid, "src", "tar", generator=torch.Generator().manual_seed(0))
        errors.append(float((out - (x_src + k * (means["tar"] - means["src"]))).abs().max()))
    assert errors[-1] < 0.02, errors
    assert 1.6 < errors[0] / errors[1] < 2.5 and 1.6 < errors[1] / errors[2] < 2.5, errors


def test_same_prompt_or_no_editing_step_returns_the_source_exactly():
    pred, grid, means, x_src = _setup(8)
    out = fe.flowedit(pred, x_src, grid, "src", "src", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x_src)
    out = fe.flowedit(pred, x_src, grid, "src", "tar", n_max=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x_src)
    moved = fe.flowedit(pred, x_src, grid, "src", "tar", n_max=6, generator=torch.Generator().manual_seed(0))
    assert float((moved - x_src).abs().mean()) > 0.1


def test_mask_keeps_the_source_outside_bit_for_bit():
    pred, grid, means, x_src = _setup(8)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    mask[..., 3] = 0.5  # a feathered column
    for n_min in (0, 3):
        free = fe.flowedit(pred, x_src, grid, "src", "tar", n_min=n_min, generator=torch.Generator().manual_seed(0))
        out = fe.flowedit(pred, x_src, grid, "src", "tar", n_min=n_min, generator=torch.Generator().manual_seed(0),
                          mask=mask)
        assert torch.equal(out[..., 4:], x_src[..., 4:])
        # the Gaussian flow acts pixel by pixel: inside the mask the edit is the unmasked one
        assert torch.allclose(out[..., :3], free[..., :3], atol=1e-6)
        assert float((out[..., :3] - x_src[..., :3]).abs().mean()) > 0.1


def test_model_calls_and_bad_arguments():
    pred, grid, means, x_src = _setup(8)
    pred.calls = 0
    fe.flowedit(pred, x_src, grid, "src", "tar", n_max=6, n_min=2, n_avg=2, generator=torch.Generator().manual_seed(0))
    assert pred.calls == 4 * 2 * 2 + 2
    with pytest.raises(ValueError, match="n_min <= n_max"):
        fe.flowedit(pred, x_src, grid, "src", "tar", n_max=9)


def test_rf_inversion_gamma_zero_is_ddim_inversion_and_gamma_moves_toward_the_noise():
    from comfyui_inverse.core.ddim import ddim_invert

    pred, grid, means, x_src = _setup(10)
    y1 = torch.randn(x_src.shape, generator=torch.Generator().manual_seed(7))
    ddim = ddim_invert(pred, x_src, grid, "src").trajectory[-1]
    x0 = fe.rf_invert(pred, x_src, grid, "src", gamma=0.0, y1=y1)
    assert torch.allclose(x0, fe.to_flow(ddim, grid.alphas_cumprod[0]), atol=1e-5, rtol=1e-5)
    dist = [float((fe.rf_invert(pred, x_src, grid, "src", gamma=g, y1=y1) - y1).norm()) for g in (0.0, 0.3, 0.6, 1.0)]
    assert dist == sorted(dist, reverse=True) and dist[0] > 2 * dist[-1], dist
    s_T = fe.flow_time(grid.alphas_cumprod[0])  # gamma 1: the straight line to y1, exactly (Euler is exact there)
    line = fe.rf_invert(pred, x_src, grid, "src", gamma=1.0, y1=y1)
    assert torch.allclose(line, (1 - s_T) * x_src + s_T * y1, atol=1e-5)


def test_rf_sampling_eta_zero_is_ddim_and_eta_one_returns_the_reference():
    from comfyui_inverse.core.ddim import ddim_sample

    pred, grid, means, x_src = _setup(10)
    a_T = grid.alphas_cumprod[0]
    x_T = fe.to_flow(torch.randn(x_src.shape, generator=torch.Generator().manual_seed(2)) / math.sqrt(a_T), a_T)
    z_T = x_T * math.sqrt(a_T) / (1 - fe.flow_time(a_T))
    plain = fe.rf_sample(pred, x_T, grid, x_src, "tar", eta=0.0)
    assert torch.allclose(plain, ddim_sample(pred, z_T, grid, "tar")[-1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(fe.rf_sample(pred, x_T, grid, x_src, "tar", eta=1.0, stop=10), x_src, atol=1e-5)
    # eta over the first quarter pulls the target sample toward the reference's structure
    guided = fe.rf_sample(pred, x_T, grid, x_src, "tar", eta=0.9)
    assert float((guided - x_src).norm()) < float((plain - x_src).norm())
    assert fe.rf_eta_schedule(8, 0.9, 0, 2) == [0.9, 0.9, 0, 0, 0, 0, 0, 0]
