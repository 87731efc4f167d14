"""Exact(er) inversion: solving DDIM's implicit inversion equation per step, and the inversions
that store extra state instead (negative-prompt, null-text, edit-friendly DDPM).

Notation of the RNRI paper (Hong et al., ../shared/papers/rnri-newton-raphson-inversion.txt):
for one inversion step from level s (latent z_s, abar a_s) to level t (abar a_t),

    f(z) = sqrt(a_t / a_s) z_s + sqrt(a_t) (psi(a_t) - psi(a_s)) eps(z, t)         (eq. 3)

and the exact inversion is the root of r(z) = z - f(z) (eq. 5). DDIM inversion (eq. 4) takes
f(z_s). The solvers below start from z^0 = z_s (eq. 8) and stop early once the mean absolute
residual mean|r| drops below ``tol``; every step reports the residual of the latent it returns.

- :func:`solve_rnri`: Regularized Newton-Raphson, eq. 7-8, derivatives by autograd through the model.
- :func:`solve_rnri` with ``jacobian_free=True``: the authors' public code, where the model call
  is detached, so dF/dz = -sign(f(z) - z) + the prior term (no backward pass through the model).
- :func:`solve_fixed_point`: z <- f(z) (AIDI / ReNoise).
- :func:`solve_gradient_descent`: gradient descent on 0.5 ||z - f(z)||^2 (ExactDPM-style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from .ddim import ddim_invert, ddim_sample, ddim_step, guided_eps, predicted_x0
from .protocols import NoisePredictor, StepCallback
from .result import InversionResult
from .schedule import TimestepGrid

Tensor = torch.Tensor
GradContext = Callable[[], ContextManager]


@dataclass
class SolverConfig:
    """Per-step solver settings shared by the iterative inversions.

    ``iterations``: at most this many updates per step (RNRI: 2); ``tol``: stop a step once
    mean|z - f(z)| < tol; ``lam``: RNRI's prior weight lambda (eq. 7, 0.1); ``eta``: RNRI's
    stabiliser in eq. 8; ``max_update``: clamp on one Newton update per element (guards the
    division where dF/dz_i ~ 0); ``lr``: gradient-descent step size.
    """

    iterations: int = 2
    tol: float = 1e-4
    lam: float = 0.1
    eta: float = 1e-3
    max_update: float = 0.5
    lr: float = 1.0
    jacobian_free: bool = False


@dataclass
class StepReport:
    residuals: list[float] = field(default_factory=list)   # mean|z - f(z)| of the returned latent, per step
    # (solvers return the best iterate they saw, so this is the minimum of each step's history)
    iterations: list[int] = field(default_factory=list)    # updates made per step
    history: list[list[float]] = field(default_factory=list)  # residual after every update, per step


class _Step:
    """One inversion step's implicit map f (RNRI eq. 3)."""

    def __init__(self, predictor, z_s, t, a_s, a_t, cond, uncond, guidance):
        self.predictor, self.z_s, self.t, self.a_s, self.a_t = predictor, z_s, t, a_s, a_t
        self.cond, self.uncond, self.guidance = cond, uncond, guidance

    def f(self, z: Tensor) -> Tensor:
        eps = guided_eps(self.predictor, z, self.t, self.cond, self.uncond, self.guidance)
        return ddim_step(self.z_s, eps.to(self.z_s.dtype), self.a_s, self.a_t)

    def _prior(self) -> tuple[Tensor, float]:
        """Mean and variance of the forward transition q(z | z_s) from level s to level t,
        N(sqrt(a_t/a_s) z_s, (1 - a_t/a_s) I) (RNRI eq. 1 over a strided grid)."""
        ratio = self.a_t / self.a_s
        return math.sqrt(ratio) * self.z_s, max(1.0 - ratio, 1e-12)

    def prior_nll(self, z: Tensor) -> Tensor:
        """-sum_j log q_j(z | z_s) up to its constant."""
        mean, var = self._prior()
        return ((z - mean) ** 2).sum() / (2.0 * var)

    def prior_grad(self, z: Tensor) -> Tensor:
        """The gradient of :meth:`prior_nll`, (z - mean) / var."""
        mean, var = self._prior()
        return (z - mean) / var


def rnri_objective(step: _Step, z: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """F(z) = ||z - f(z)||_1 + lambda * (-sum log q(z | z_s)) (RNRI eq. 7); returns (F, r)."""
    r = z - step.f(z)
    return r.abs().sum() + lam * step.prior_nll(z), r


def _mean_abs(r: Tensor) -> float:
    return float(r.detach().abs().mean())


def _keep_best(best, res: float, z: Tensor):
    """Solvers return the iterate with the lowest residual seen (a diverging iteration, e.g.
    fixed-point at high guidance on few steps, then stops at its best point)."""
    if best is None or res < best[0] or not math.isfinite(best[0]):
        return (res, z.detach().clone())
    return best


def solve_rnri(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """RNRI eq. 8: z_i <- z_i - F(z) / (d (g_i + eta)), g = dF/dz, from z^0 = z_s.

    With ``cfg.jacobian_free`` the model's Jacobian is dropped and the step returns f(z^K) as the
    authors' public code does: g = sign(r) + lambda (z - m) / v, no backward pass through the
    model; the residual of the returned f(z^K) costs one more model call.
    The sign of g is kept when adding eta, and each update is clamped to ``max_update``.
    """
    z = step.z_s.detach().clone()
    d = z.numel()
    hist, best = [], None
    for k in range(cfg.iterations + 1):
        last = k == cfg.iterations
        if cfg.jacobian_free or last:
            with torch.no_grad():
                r = z - step.f(z)
                res = _mean_abs(r)
                F = r.abs().sum() + cfg.lam * step.prior_nll(z)
                g = torch.sign(r) + cfg.lam * step.prior_grad(z)
        else:
            with grad_context():
                zz = z.detach().clone().requires_grad_(True)
                F, r = rnri_objective(step, zz, cfg.lam)
                res = _mean_abs(r)
                if res >= cfg.tol:
                    (g,) = torch.autograd.grad(F, zz)
            F = F.detach()
        hist.append(res)
        best = _keep_best(best, res, z)
        if res < cfg.tol:
            break
        if last:
            if cfg.jacobian_free:  # the authors' code returns f(z^K): one more fixed-point update
                with torch.no_grad():
                    fz = (z - r).detach()
                    res2 = _mean_abs(fz - step.f(fz))
                hist.append(res2)
                best = _keep_best(best, res2, fz)
            break
        g = g.detach()
        denom = g + cfg.eta * torch.where(g >= 0, 1.0, -1.0)
        update = (F / d) / denom
        z = (z - update.clamp(-cfg.max_update, cfg.max_update)).detach()
    return best[1], hist, best[0]


def solve_fixed_point(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Fixed-point iteration z^{k+1} = f(z^k) from z^0 = z_s (AIDI; its first update is DDIM inversion)."""
    z = step.z_s.detach().clone()
    hist, best = [], None
    with torch.no_grad():
        for k in range(cfg.iterations + 1):
            fz = step.f(z)
            res = _mean_abs(z - fz)
            hist.append(res)
            best = _keep_best(best, res, z)
            if res < cfg.tol or k == cfg.iterations:
                break
            z = fz
    return best[1], hist, best[0]


def solve_gradient_descent(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Gradient descent z <- z - lr * grad 0.5 ||z - f(z)||^2 from z^0 = z_s (ExactDPM-style baseline)."""
    z = step.z_s.detach().clone()
    hist, best = [], None
    for k in range(cfg.iterations + 1):
        last = k == cfg.iterations
        with grad_context():
            zz = z.detach().clone().requires_grad_(not last)
            r = zz - step.f(zz)
            res = _mean_abs(r)
            if not last and res >= cfg.tol:
                (g,) = torch.autograd.grad(0.5 * (r ** 2).sum(), zz)
        hist.append(res)
        best = _keep_best(best, res, z)
        if res < cfg.tol or last:
            break
        z = (z - cfg.lr * g.detach()).detach()
    return best[1], hist, best[0]


SOLVERS = {
    "rnri": solve_rnri,
    "fixed_point": solve_fixed_point,
    "gradient_descent": solve_gradient_descent,
}


def iterative_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                     guidance: float = 1.0, method: str = "rnri", cfg: Optional[SolverConfig] = None,
                     callback: StepCallback = None, grad_context: GradContext = torch.enable_grad,
                     ) -> tuple[list[Tensor], StepReport]:
    """Invert ``z0`` step by step, solving RNRI eq. 3 at every step with the chosen solver.
    Returns the trajectory (clean first, as :func:`ddim_invert`) and the per-step report."""
    if method not in SOLVERS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(SOLVERS)}")
    cfg = cfg or SolverConfig()
    if cfg.iterations < 0:
        raise ValueError("iterations must be >= 0")
    solve = SOLVERS[method]
    ts = grid.timesteps[::-1]
    ab = grid.alphas_cumprod[::-1]
    z = z0.float()
    traj, report = [z], StepReport()
    for i in range(1, len(ts)):
        step = _Step(predictor, z, ts[i], ab[i - 1], ab[i], cond, uncond, guidance)
        z, hist, res = solve(step, cfg, grad_context)
        traj.append(z)
        report.residuals.append(res)
        report.iterations.append(len(hist) - 1)
        report.history.append(hist)
        if callback is not None:
            callback(i - 1, grid.steps, z)
    return traj, report


def prompt_aware_adjust(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                        guidance: float = 1.0, rounds: int = 2, depth: int = 2,
                        callback: StepCallback = None) -> Tensor:
    """RNRI sec. 4.2: a few fixed-point rounds z0 <- h(z0), where h noises z0 ``depth`` steps up the
    grid (DDIM inversion) and denoises them again with the prompt (DDIM sampling)."""
    if rounds <= 0:
        return z0
    depth = max(1, min(depth, grid.steps))
    sub = TimestepGrid(grid.timesteps[-(depth + 1):], grid.alphas_cumprod[-(depth + 1):])
    z = z0.float()
    for k in range(rounds):
        up = ddim_invert(predictor, z, sub, cond, uncond, guidance)[-1]
        z = ddim_sample(predictor, up, sub, cond, uncond, guidance)[-1]
        if callback is not None:
            callback(k, rounds, z)
    return z


# ------------------------------------------------------------------------------------------
# null-text inversion (Mokady et al. 2023, Alg. 1)

def null_text_optimize(predictor: NoisePredictor, pivot: Sequence[Tensor], grid: TimestepGrid, cond: Any,
                       null_embedding: Tensor, make_uncond: Callable[[Tensor], Any], guidance: float = 7.5,
                       inner_steps: int = 10, lr: float = 1e-2, tol: float = 1e-5,
                       callback: StepCallback = None, grad_context: GradContext = torch.enable_grad,
                       ) -> tuple[list[Tensor], list[float]]:
    """Per sampling step, optimise the unconditional embedding with Adam so that one guided
    DDIM step from the current latent lands on the pivot (the DDIM inversion at guidance 1),
    then take that step with the optimised embedding. Early stop per step when the loss falls
    below ``tol + j * 2e-5`` (the authors' schedule). Returns the per-step embeddings (sampling
    order) and the final per-step losses."""
    if guidance == 1.0:  # eps = eps_c: the unconditional embedding has no effect to optimise
        return [null_embedding.detach().float().clone() for _ in range(grid.steps)], [0.0] * grid.steps
    keep = list(pivot)[::-1]  # sampling order: keep[0] is z_T
    ts, ab = grid.timesteps, grid.alphas_cumprod
    z = keep[0].float()
    emb = null_embedding.detach().float().clone()
    embeddings, losses = [], []
    for i in range(grid.steps):
        target = keep[i + 1]
        with grad_context():
            with torch.no_grad():
                e_c = predictor(z, ts[i], [cond])[0].float()
            var = emb.clone().requires_grad_(True)
            opt = torch.optim.Adam([var], lr=lr)
            loss_val = float("inf")
            for j in range(inner_steps):
                e_u = predictor(z, ts[i], [make_uncond(var)])[0].float()
                eps = e_u + guidance * (e_c - e_u)
                loss = ((ddim_step(z, eps, ab[i], ab[i + 1]) - target) ** 2).mean()
                loss_val = float(loss.detach())
                if loss_val < tol + j * 2e-5:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
            emb = var.detach().clone()
        with torch.no_grad():
            e_u = predictor(z, ts[i], [make_uncond(emb)])[0].float()
            z = ddim_step(z, e_u + guidance * (e_c - e_u), ab[i], ab[i + 1])
        embeddings.append(emb)
        losses.append(loss_val)
        if callback is not None:
            callback(i, grid.steps, z)
    return embeddings, losses


# ------------------------------------------------------------------------------------------
# edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024; ProxEdit supplement)

def ddpm_posterior(z: Tensor, eps: Tensor, a_t: float, a_s: float, eta: float = 1.0) -> tuple[Tensor, float]:
    """Mean and std of the DDIM/DDPM step from level t to the less noisy level s (DDIM eq. 12, 16):
    sigma = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s); mean = sqrt(a_s) x0 + sqrt(1 - a_s - sigma^2) eps."""
    sigma = eta * math.sqrt(max(1.0 - a_s, 0.0) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_s, 0.0))
    x0 = predicted_x0(z, eps, a_t)
    mean = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0)) * eps
    return mean, sigma


def ddpm_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                guidance: float = 1.0, generator: Optional[torch.Generator] = None,
                callback: StepCallback = None) -> tuple[list[Tensor], list[Tensor]]:
    """Edit-friendly DDPM inversion: independent forward samples x_t = sqrt(a_t) x0 + sqrt(1-a_t) n_t
    at every level, then per step the noise map z_t = (x_s - mu_t(x_t)) / sigma_t that makes the
    DDPM step reproduce x_s exactly. Where sigma_t = 0 (the last step onto a clean level) the map is
    the plain residual x_s - mu_t. Returns (levels in inversion order, noise maps in sampling order)."""
    ts, ab = grid.timesteps, grid.alphas_cumprod
    z0 = z0.float()
    rev_ab = ab[::-1]
    xs = [z0]
    for a in rev_ab[1:]:
        n = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(z0.device)
        xs.append(math.sqrt(a) * z0 + math.sqrt(1.0 - a) * n)
    levels = xs[::-1]  # sampling order
    maps = []
    for i in range(grid.steps):
        eps = guided_eps(predictor, levels[i], ts[i], cond, uncond, guidance).float()
        mean, sigma = ddpm_posterior(levels[i], eps, ab[i], ab[i + 1])
        maps.append((levels[i + 1] - mean) / (sigma if sigma > 0 else 1.0))
        if callback is not None:
            callback(i, grid.steps, levels[i + 1])
    return xs, maps


def ddpm_sample(predictor: NoisePredictor, x_start: Tensor, grid: TimestepGrid, noise_maps: Sequence[Tensor],
                cond: Any, uncond: Any = None, guidance: float = 1.0, start_step: int = 0,
                callback: StepCallback = None, mask: Optional[Tensor] = None,
                keep: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """DDPM sampling with stored noise maps: x_s = mu_t(x_t) + sigma_t z_t (exact reconstruction with
    the inversion's prompt and guidance)."""
    ts, ab = grid.timesteps, grid.alphas_cumprod
    x = x_start.float()
    traj = [x]
    for i in range(start_step, grid.steps):
        eps = guided_eps(predictor, x, ts[i], cond, uncond, guidance).float()
        mean, sigma = ddpm_posterior(x, eps, ab[i], ab[i + 1])
        x = mean + (sigma if sigma > 0 else 1.0) * noise_maps[i].to(x)
        if mask is not None:
            x = mask * x + (1.0 - mask) * keep[i + 1].to(x)
        traj.append(x)
        if callback is not None:
            callback(i - start_step, grid.steps - start_step, x)
    return traj


# ------------------------------------------------------------------------------------------
# one entry point for sampling from any inversion result

def sample_from_inversion(predictor: NoisePredictor, result: InversionResult, cond: Any, uncond: Any = None,
                          guidance: float = 1.0, start_step: int = 0, callback: StepCallback = None,
                          mask: Optional[Tensor] = None, make_uncond: Optional[Callable[[Tensor], Any]] = None,
                          ) -> list[Tensor]:
    """Sample from an inversion the way its method requires: DDPM noise maps for "ddpm", the
    per-step optimised null embeddings for "null_text" (through ``make_uncond``), otherwise
    deterministic DDIM. With a mask, the region where it is 0 keeps the inversion's latents."""
    keep = result.trajectory[::-1]
    grid = result.grid
    if result.method == "ddpm":
        return ddpm_sample(predictor, keep[start_step], grid, result.extras["noise_maps"], cond, uncond, guidance,
                           start_step, callback, mask, keep if mask is not None else None)
    if result.method == "null_text":
        if make_uncond is None:
            raise ValueError("null-text results need make_uncond to turn embeddings into conditionings")
        per_step = [make_uncond(e) for e in result.extras["null_embeddings"]]
        return ddim_sample(predictor, keep[start_step], grid, cond, per_step, guidance, callback, start_step,
                           mask, keep if mask is not None else None)
    return ddim_sample(predictor, keep[start_step], grid, cond, uncond, guidance, callback, start_step,
                       mask, keep if mask is not None else None)
