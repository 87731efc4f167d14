"""Posterior samplers (core/restoration.py) on a Gaussian prior with a linear operator, where the
true posterior is known."""
import pytest
import torch

from comfyui_inverse.core import ddim, operators as ops, restoration as rs, schedule
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior
from support.core_oracles import gaussian_posterior_mean_inpaint


def _problem(op_name="inpaint"):
    ac = schedule.scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 16, 16, generator=g, dtype=torch.float64) * 0.5
    model = GaussianMixtureDenoiser({"c": MixturePrior.gaussian(mean, 0.7)}, ac)
    x_true = (mean[None] + 0.7 * torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)).float()
    op = ops.Inpaint(ops.random_mask(16, 16, 0.5, seed=1), sigma_y=0.05) if op_name == "inpaint" else ops.AvgPoolSR(4, 0.05)
    y = op.measure(x_true, g)
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(50, steps_offset=1))
    return model, op, y, grid, mean


def _residual(op, y, z):
    return float((y - op.A(z)).norm())


@pytest.mark.parametrize("op_name", ["inpaint", "sr"])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_guided_sampling_lowers_the_measurement_residual(op_name, gamma):
    model, op, y, grid, mean = _problem(op_name)
    ident = lambda v: v  # noqa: E731
    unguided, guided = [], []
    for s in range(3):
        zT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(100 + s))
        unguided.append(_residual(op, y, ddim.ddim_sample(model, zT, grid, "c")[-1]))
        out = rs.psld(rs.Problem(model, ident, op, y, grid, "c", zT, encode=ident),
                      rs.RestorationConfig(zeta=3.0, gamma=gamma))
        z, res = out.latent, out.residuals
        guided.append(_residual(op, y, z))
        assert len(res) == 50 and res[-1] < res[0]
    assert sum(guided) < 0.25 * sum(unguided), (guided, unguided)


def test_ldps_approaches_the_true_posterior_mean():
    model, op, y, grid, mean = _problem("inpaint")
    post = gaussian_posterior_mean_inpaint(y, op.mask, mean[None].float(), 0.7, 0.05)
    zs = [rs.ldps(rs.Problem(model, lambda v: v, op, y, grid, "c",
                             torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(200 + s))),
                  rs.RestorationConfig(zeta=3.0)).latent
          for s in range(6)]
    avg = torch.stack(zs).mean(0)
    unguided = torch.stack([ddim.ddim_sample(model, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(200 + s)),
                                             grid, "c")[-1] for s in range(6)]).mean(0)
    assert ddim.reconstruction_rmse(avg, post) < 0.6 * ddim.reconstruction_rmse(unguided, post)


def test_psld_needs_the_encoder():
    model, op, y, grid, mean = _problem()
    with pytest.raises(ValueError, match="encoder"):
        rs.psld(rs.Problem(model, lambda v: v, op, y, grid, "c", torch.zeros(1, 4, 16, 16)),
                rs.RestorationConfig(gamma=0.1))


def test_stsl_lands_closer_to_the_posterior_mean_than_ldps():
    """STSL (Alg. 1, defaults K = 5, lambda = 1, eta = 0.02, lr 1e-2 decaying) against LDPS on the
    same problem: lower measurement residual than an unguided sample and a smaller distance to the
    exact posterior mean than LDPS."""
    model, op, y, grid, mean = _problem("inpaint")
    post = gaussian_posterior_mean_inpaint(y, op.mask, mean[None].float(), 0.7, 0.05)
    ident = lambda v: v  # noqa: E731
    model.calls = 0
    out = rs.stsl(rs.Problem(model, ident, op, y, grid, "c", encode=ident,
                             generator=torch.Generator().manual_seed(0)))
    z, res, nfe = out.latent, out.residuals, out.report["evaluations"]
    # review defect 4: K = 5 batched evaluations per step, 250 at 50 steps as the paper counts, each
    # with z and N = 2 perturbed copies
    assert model.calls == 50 * 5 == nfe and model.evaluations == 250 and len(res) == 50 and res[-1] < res[0]
    unguided = ddim.ddim_sample(model, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), grid, "c")[-1]
    assert _residual(op, y, z) < 0.5 * _residual(op, y, unguided)
    zT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    zl = rs.ldps(rs.Problem(model, ident, op, y, grid, "c", zT), rs.RestorationConfig(zeta=3.0)).latent
    assert ddim.reconstruction_rmse(z, post) < 0.5 * ddim.reconstruction_rmse(zl, post)


def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=g, dtype=torch.float64)
    x = rs.conjugate_gradient(lambda v: a @ v, b, torch.zeros(30, dtype=torch.float64), iters=60)
    assert float((x - torch.linalg.solve(a, b)).norm() / torch.linalg.solve(a, b).norm()) < 1e-6


@pytest.mark.parametrize("op_name", ["inpaint", "sr"])
def test_projection_is_the_proximal_solution(op_name):
    model, op, y, grid, mean = _problem(op_name)
    x_ref = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    lam = 0.3
    x = rs.project_to_measurements(op, y, x_ref, lam, iters=30)
    if op_name == "inpaint":  # elementwise closed form (M y + lam x_ref) / (M + lam)
        m = op.mask.expand_as(x_ref)
        want = (m * op.At(y, x_ref) + lam * x_ref) / (m + lam)
        assert float((x - want).abs().max()) < 1e-5
    # the optimality condition A^T (A x - y) + lam (x - x_ref) = 0
    grad = op.At(op.A(x) - y, x_ref) + lam * (x - x_ref)
    assert float(grad.norm()) < 1e-4 * float(op.At(y, x_ref).norm())


def test_p2l_tunes_the_embedding_and_lowers_the_data_loss():
    """The prompt is the analogue of a prior mean here: the reference denoiser's prior is N(C, 0.7^2),
    so tuning C moves the predicted x0 toward the measurements."""
    model, op, y, grid, mean = _problem("sr")
    ident = lambda v: v  # noqa: E731
    C0 = torch.zeros_like(mean).float()
    make = lambda C: MixturePrior.gaussian(C, 0.7)  # noqa: E731
    model.calls = 0
    zT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = rs.p2l(rs.Problem(model, ident, op, y, grid, None, zT, encode=ident, make_cond=make, embedding=C0),
                 rs.RestorationConfig(zeta=1.0, prompt_steps=2, prompt_lr=0.05, project_every=4, cg_lambda=0.1))
    z, res, C, losses = out.latent, out.residuals, out.report["embedding"], out.report["prompt_loss"]
    assert model.calls == 50 * 3 and len(res) == 50
    assert float((C - C0).abs().max()) > 1e-2                         # the embedding changed
    before, after = losses[0::2], losses[1::2]
    assert sum(a < b for a, b in zip(after, before)) >= 0.9 * len(before)   # tuning lowers the data loss
    unguided = ddim.ddim_sample(model, zT, grid, make(C0))[-1]
    assert _residual(op, y, z) < 0.25 * _residual(op, y, unguided)


def _glue_ops(H=32, W=32):
    return {
        "sr_avgpool_x4": (ops.AvgPoolSR(4), 1e-5),
        "inpaint_random": (ops.Inpaint(ops.random_mask(H, W, 0.5, seed=1)), 1e-5),
        "inpaint_box": (ops.Inpaint(ops.box_mask(H, W, 0.4)), 1e-5),
        "sr_bicubic_x4": (ops.BicubicSR(4), 1e-3),
    }


@pytest.mark.parametrize("name", list(_glue_ops()))
def test_psld_gluing_is_a_projection_onto_the_measurements(name):
    """Review defect 3: A^T y + (I - A^T A) x is a projection only when A A^T = I; the
    pseudo-inverse gluing lands on A x = y for every operator with A A^T invertible."""
    op, tol = _glue_ops()[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = op.A(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64))
    glued = rs.glue(op, y, x, iters=50)
    assert float((op.A(glued) - y).norm() / y.norm()) < tol
    again = rs.glue(op, y, glued, iters=50)  # a projection: idempotent
    assert float((again - glued).norm() / glued.norm()) < 10 * tol
    if name == "sr_avgpool_x4":
        old = op.At(y, x) + x - op.At(op.A(x), x)
        assert float((op.A(old) - y).norm() / y.norm()) > 0.5  # what the old formula left


def test_psld_gluing_closes_most_of_a_blur_residual():
    """Blur's A A^T is nearly singular (the kernel's spectrum vanishes at high frequencies): no
    exact projection, but the conjugate-gradient gluing removes most of the residual."""
    op = ops.Blur(ops.gaussian_kernel(9, 1.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = op.A(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64))
    before = float((op.A(x) - y).norm())
    after = float((op.A(rs.glue(op, y, x, iters=50)) - y).norm())
    assert after < 0.2 * before, (before, after)


def test_p2l_projection_keeps_the_ldps_correction_and_the_sampler_noise():
    """Review defect 5: a projection that changes nothing (a huge proximal weight, identity
    coders) must leave the run as it is: the LDPS-corrected latent is what gets projected, and
    the re-noised z_{t-1} keeps its eps and its sigma n (eta = 0.8, the paper's setting)."""
    model, op, y, grid, mean = _problem("sr")
    ident = lambda v: v  # noqa: E731
    make = lambda C: MixturePrior.gaussian(C, 0.7)  # noqa: E731
    zT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))

    def run(project_every):
        problem = rs.Problem(model, ident, op, y, grid, None, zT, encode=ident, make_cond=make,
                             embedding=torch.zeros_like(mean).float(), generator=torch.Generator().manual_seed(9))
        return rs.p2l(problem, rs.RestorationConfig(zeta=1.0, eta=0.8, prompt_steps=0, project_every=project_every,
                                                    cg_lambda=1e9, cg_iters=2)).latent

    plain, projected = run(0), run(1)
    assert float((projected - plain).norm() / plain.norm()) < 1e-4


def test_stsl_start_is_the_adjoint_scaled_to_a_pseudo_inverse_without_amplifying_noise():
    """STSL's E(A^T y) start: for average pooling the scaled adjoint is the upsampled image (A^+ y);
    for a 61-px motion blur it keeps the measurement noise at its level, where the regularised
    back-projection amplifies it (review defect 4)."""
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(1, 3, 64, 64)
    sr = ops.AvgPoolSR(4)
    y = torch.randn(1, 3, 16, 16, generator=g)
    assert torch.allclose(rs.scaled_adjoint(sr, y, like), torch.nn.functional.interpolate(y, scale_factor=4), atol=1e-5)
    blur = ops.Blur(ops.motion_kernel(61, 0.5, seed=3))
    n = 0.05 * torch.randn(blur.A(like).shape, generator=g)
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    assert rms(rs.scaled_adjoint(blur, n, like)) <= 0.05 < 0.5 * rms(rs.back_project(blur, n, like))


def test_samplers_stop_when_the_latent_diverges():
    model, op, y, grid, mean = _problem("sr")
    ident = lambda v: v  # noqa: E731
    zT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(rs.DivergenceError, match=r"^LDPS diverged at step \d+"):
        rs.ldps(rs.Problem(model, ident, op, y, grid, "c", zT), rs.RestorationConfig(zeta=1e9))
    with pytest.raises(rs.DivergenceError, match=r"non-finite"):
        rs.check_diverged(torch.full((1, 4, 2, 2), float("nan")), 0, "X")
    rs.check_diverged(torch.randn(2, 4, 8, 8), 0, "X")  # a unit-scale latent passes
