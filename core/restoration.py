"""Posterior sampling for inverse problems y = A(D(z_0)) + n with a latent diffusion prior.

So far: LDPS (latent diffusion posterior sampling, DPS of Chung et al. 2023 applied through the
decoder) and PSLD (Rout et al. 2023: LDPS plus the "gluing" term), following the algorithm
summary in ../shared/papers/NOTES.md (P2L section, steps 3 and the PSLD baseline line):

    x0_hat = Tweedie(z_t, eps(z_t))                              (predicted x0)
    z'_{t-1} = DDIM/DDPM step(z_t, eps)                          (eta = 0: DDIM, 1: DDPM)
    z_{t-1} = z'_{t-1} - zeta grad_{z_t} ||y - A D(x0_hat)||                     (LDPS)
                       - gamma grad_{z_t} ||E(A^+ y + (I - A^+ A) D(x0_hat)) - x0_hat||^2   (PSLD)

PSLD writes the gluing with A^T, which is a projection onto {x : A x = y} only when A A^T = I;
with the pseudo-inverse A^+ = A^T (A A^T)^{-1} (:func:`glue`) it is one for every operator whose
A A^T is invertible (average pooling has A A^T = I / f^2).

zeta follows DPS: the gradient of the residual norm (DPS Alg. 1's zeta' / ||y - A x0|| times the
gradient of the squared norm, up to the factor 2). Works with any noise predictor, decoder and
encoder callables and any :mod:`.operators` operator. :func:`stsl` implements STSL's Algorithm 1
(second-order Tweedie through a Hutchinson trace estimate, stochastic averaging with Adam).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ContextManager, Optional

import torch

from .ddim import predicted_x0
from .inversion import ddpm_posterior
from .operators import Operator
from .protocols import NoisePredictor, StepCallback
from .schedule import TimestepGrid

Tensor = torch.Tensor


class DivergenceError(ValueError):
    """A posterior sampler's latent left the prior's range: non-finite, or its RMS far beyond the
    unit scale of a DDPM latent. Raised instead of returning garbage."""


MAX_LATENT_RMS = 100.0


def check_diverged(z: Tensor, step: int, method: str, units: str = "a DDPM latent's is about 1") -> None:
    """Stop a sampler whose latent is non-finite or whose per-image RMS exceeds MAX_LATENT_RMS.
    The samplers call it on the latent after every step, the last one (the one they return)
    included, in the model's unit-scale coordinates; ``units`` describes the coordinates of ``z``
    where a caller checks it in others (the Restore node: the LATENT it outputs)."""
    finite = bool(torch.isfinite(z).all())
    rms = float(z.detach().float().reshape(z.shape[0], -1).pow(2).mean(1).sqrt().max()) if finite else float("nan")
    if not finite or rms > MAX_LATENT_RMS:
        what = "non-finite values" if not finite else f"an RMS of {rms:.3g} ({units})"
        raise DivergenceError(f"{method} diverged at step {step + 1}: the latent has {what}; lower the step size "
                              f"(data-consistency weight or learning rate) or use more steps.")


def step_on(opt: torch.optim.Optimizer, var: Tensor, loss: Tensor) -> None:
    """One optimiser step on ``var`` alone: the gradient of ``loss`` with respect to ``var`` only
    (``torch.autograd.grad``), so that no other leaf of the graph gains a ``.grad``; a model or
    decoder whose weights are ordinary tensors that require grad (built or patched outside
    inference mode) is left exactly as it was (``loss.backward()`` would accumulate into every
    such weight)."""
    (g,) = torch.autograd.grad(loss, var)
    var.grad = g
    opt.step()
    var.grad = None


def _guided_step(z: Tensor, eps: Tensor, a: float, a_next: float, eta: float, grad: Tensor,
                 generator: Optional[torch.Generator]) -> tuple[Tensor, float]:
    """The step LDPS, PSLD and P2L share: the DDIM (eta = 0) / DDPM step from level a to a_next,
    sqrt(a_next) x0 + sqrt(1 - a_next - sigma^2) eps + sigma n, minus the data-consistency
    gradient. Returns (z_{t-1}, sigma)."""
    mean, sigma = ddpm_posterior(z, eps, a, a_next, eta)
    if sigma > 0:
        mean = mean + sigma * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    return (mean - grad).detach(), sigma


def ldps(predictor: NoisePredictor, decode: Callable[[Tensor], Tensor], op: Operator, y: Tensor, grid: TimestepGrid,
         cond: Any, z_T: Tensor, zeta: float = 1.0, eta: float = 0.0, gamma: float = 0.0,
         encode: Optional[Callable[[Tensor], Tensor]] = None, generator: Optional[torch.Generator] = None,
         callback: StepCallback = None, grad_context: Callable[[], ContextManager] = torch.enable_grad,
         glue_iters: int = 10) -> tuple[Tensor, list[float]]:
    """LDPS (``gamma = 0``) or PSLD (``gamma > 0``, needs ``encode``; the gluing solves
    A A^T u = y - A x with ``glue_iters`` conjugate-gradient iterations). Returns the final latent
    and the measurement residual ||y - A D(x0_hat)|| per step."""
    if gamma > 0 and encode is None:
        raise ValueError("PSLD's gluing term needs the encoder")
    ts, ab = grid.timesteps, grid.alphas_cumprod
    z = z_T.detach().float()
    residuals = []
    for i in range(grid.steps):
        with grad_context():
            zz = z.detach().clone().requires_grad_(True)
            eps = predictor(zz, ts[i], [cond])[0].float()
            x0 = predicted_x0(zz, eps, ab[i])
            xd = decode(x0)
            r = (y - op.A(xd)).reshape(y.shape[0], -1).norm(dim=1)
            objective = zeta * r.sum()
            if gamma > 0:
                glued = glue(op, y, xd, glue_iters)
                objective = objective + gamma * (encode(glued) - x0).pow(2).sum()
            (grad,) = torch.autograd.grad(objective, zz)
        residuals.append(float(r.detach().mean()))
        z, _ = _guided_step(z, eps.detach(), ab[i], ab[i + 1], eta, grad.detach(), generator)
        check_diverged(z, i, "PSLD" if gamma > 0 else "LDPS")
        if callback is not None:
            callback(i, grid.steps, z)
    return z, residuals


def gaussian_posterior_mean_inpaint(y: Tensor, mask: Tensor, mean: Tensor, std: float, sigma_y: float) -> Tensor:
    """Exact E[x | y] for x ~ N(mean, std^2 I), y = M x + n, n ~ N(0, sigma_y^2) on the observed entries."""
    s2, n2 = std * std, sigma_y * sigma_y
    observed = (s2 * y + n2 * mean) / (s2 + n2)
    return torch.where(mask.bool().expand_as(y), observed, mean.expand_as(y))


def stsl(predictor: NoisePredictor, decode: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
         op: Operator, y: Tensor, grid: TimestepGrid, cond: Any, like: Tensor, K: int = 5, lam: float = 1.0,
         eta: float = 0.02, lr: float = 1e-2, lr_decay: float = 0.998, z_init: Optional[Tensor] = None,
         generator: Optional[torch.Generator] = None, callback: StepCallback = None,
         grad_context: Callable[[], ContextManager] = torch.enable_grad, N: int = 2,
         start: str = "adjoint") -> tuple[Tensor, list[float], int]:
    """STSL (Rout et al., ../shared/papers/stsl-second-order-tweedie.txt, Algorithm 1).

    Lines 1-4: forward-latent initialisation from E(A^T y) noised to the first level with the
    forward kernel. ``start`` picks the image: "adjoint" (the paper's A^T y, scaled to a
    pseudo-inverse by :func:`scaled_adjoint`: for average-pool SR the upsampled image rather than
    the 1/f^2-darkened adjoint) or "back_projection" (argmin ||y - A x||^2 + 0.01 ||x||^2, sharper
    but it amplifies the noise of a long motion blur); ``z_init`` overrides both
    (e.g. Gaussian noise for free-form inpainting, the authors' advice).
    Lines 6-12: per reverse step, K Adam updates of z_t on the surrogate loss
    lambda ||y - A D(x0_hat(z_t))||^2 + (eta / d) mean_j eps_j^T (s(z_t + eps_j) - s(z_t)), the
    Hutchinson estimate of the score Jacobian's trace averaged over ``N`` noise samples (Table 4a:
    N = 2; s = -eps_theta / sqrt(1 - abar)); z_t and the N perturbed copies go through the predictor
    in one batched call. Lines 13-14: the DDPM posterior-mean step with the refined z_t; line 13's
    x0_hat reuses the last inner evaluation's eps with the refined z_t (the same formula as line 9),
    so a step costs K batched evaluations: K T in all (250 at T = 50, K = 5, as the paper counts).
    ``like`` is an image of the clean image's shape. Returns the final latent, the residual per
    step and the number of (batched) model evaluations.
    """
    if K < 1 or N < 1:
        raise ValueError("STSL needs K >= 1 inner updates and N >= 1 noise samples")
    ts, ab = grid.timesteps, grid.alphas_cumprod
    with torch.no_grad():
        if z_init is None:
            if start == "adjoint":
                image = scaled_adjoint(op, y, like)
            elif start == "back_projection":
                image = back_project(op, y, like)
            else:
                raise ValueError(f"unknown STSL start {start!r}: adjoint or back_projection")
            z = encode(image).float()
        else:
            z = z_init.float()
        # lines 1-4 through the Gaussian transition kernel of the forward process (the text's
        # "forward process in Eq. (1) using the Gaussian transition kernel"): composed over the grid it
        # is z_T = sqrt(abar_T) z_0 + sqrt(1 - abar_T) n. (Line 3 read literally, with the model's
        # eps in place of fresh noise, multiplies the latent's scale at every step and diverges.)
        n = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = math.sqrt(ab[0]) * z + math.sqrt(1.0 - ab[0]) * n
    residuals: list[float] = []
    evaluations = 0
    for i in range(grid.steps):
        a, a_next = ab[i], ab[i + 1]
        sq = math.sqrt(1.0 - a)
        with grad_context():
            var = z.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([var], lr=lr * lr_decay ** i)
            B, d = var.shape[0], var[0].numel()
            for k in range(K):
                n = torch.randn((N,) + tuple(var.shape), generator=generator, dtype=var.dtype).to(var.device)
                e_all = predictor(torch.cat([var] + [var + n[j] for j in range(N)]), ts[i], [cond])[0].float()
                evaluations += 1
                e_z = e_all[:B]
                x0 = predicted_x0(var, e_z, a)
                fit = (y - op.A(decode(x0))).pow(2).sum()
                # eps_j^T (s(z + eps_j) - s(z)) with s = -eps_theta / sqrt(1 - a), averaged over j
                trace = sum(-(n[j] * (e_all[(j + 1) * B:(j + 2) * B] - e_z)).sum() for j in range(N)) / (N * sq)
                loss = lam * fit + (eta / d) * trace
                step_on(opt, var, loss)
        z = var.detach()
        with torch.no_grad():
            x0 = predicted_x0(z, e_z.detach(), a)  # line 13, with line 9's last evaluation
            residuals.append(float((y - op.A(decode(x0))).reshape(y.shape[0], -1).norm(dim=1).mean()))
            alpha = a / a_next
            z = (math.sqrt(alpha) * (1.0 - a_next) / (1.0 - a)) * z + (math.sqrt(a_next) * (1.0 - alpha) / (1.0 - a)) * x0
        check_diverged(z, i, "STSL")
        if callback is not None:
            callback(i, grid.steps, z)
    return z, residuals, evaluations


# ----------------------------------------------------------------------------------------------
# P2L (Chung et al., ../shared/papers/p2l-prompt-tuning-inverse.txt; the algorithm restored in NOTES.md)

def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor, iters: int = 10,
                       tol: float = 1e-10) -> Tensor:
    """Conjugate gradients for apply(x) = b with a symmetric positive-definite ``apply`` (float32;
    the whole tensor is one vector). Stops after ``iters`` iterations or when ||r||^2 < tol ||b||^2."""
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = (r * r).sum()
    stop = tol * float((b * b).sum().detach())
    for _ in range(iters):
        if float(rs.detach()) <= stop:
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum().clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def project_to_measurements(op: Operator, y: Tensor, x_ref: Tensor, lam: float, iters: int = 10) -> Tensor:
    """P2L's proximal projection (NOTES.md P2L step 4): argmin_x ||y - A x||^2 + lam ||x - x_ref||^2,
    i.e. (A^T A + lam I) x = A^T y + lam x_ref, by conjugate gradients warm-started at x_ref."""
    if lam <= 0:
        raise ValueError("the projection's lambda must be positive")
    b = op.At(y, x_ref) + lam * x_ref
    return conjugate_gradient(lambda v: op.At(op.A(v), x_ref) + lam * v, b, x_ref, iters)


def glue(op: Operator, y: Tensor, x: Tensor, iters: int = 10) -> Tensor:
    """The projection of x onto {x : A x = y}: x + A^+ (y - A x), A^+ the Moore-Penrose
    pseudo-inverse (A^T (A A^T)^{-1} where A A^T is invertible). A^+ r is the minimum-norm solution
    of A^T A d = A^T r, found by conjugate gradients from d = 0 (which stay in the range of A^T), so
    a measurement outside the range of A (noise on unobserved pixels) or a singular A A^T (a mask)
    is handled too. Exact in one iteration for average pooling (A A^T = I / f^2) and inpainting;
    blur's A A^T is ill-conditioned and ``iters`` decides how close A(result) gets to y.
    Differentiable in x."""
    d = conjugate_gradient(lambda v: op.At(op.A(v), x), op.At(y - op.A(x), x), torch.zeros_like(x), iters)
    return x + d


def scaled_adjoint(op: Operator, y: Tensor, like: Tensor) -> Tensor:
    """STSL's start E(A^T y) with A^T y "scaled to a pseudo-inverse": c A^T y with the scalar
    c = <y, A A^T y> / ||A A^T y||^2 per image that best matches the measurement (f^2 for average
    pooling, where A^T y is the upsampled image divided by f^2; about 1 for a normalised blur or a
    mask). A scalar, so the measurement noise is never amplified (unlike a deconvolution)."""
    v = op.At(y, like)
    Av = op.A(v)
    B = y.shape[0]
    c = (y.reshape(B, -1) * Av.reshape(B, -1)).sum(1) / Av.reshape(B, -1).pow(2).sum(1).clamp_min(1e-30)
    return c.reshape((B,) + (1,) * (v.dim() - 1)) * v


def back_project(op: Operator, y: Tensor, like: Tensor, lam: float = 1e-2, iters: int = 20) -> Tensor:
    """argmin_x ||y - A x||^2 + lam ||x||^2 (conjugate gradients from 0): an image in the range of
    A^T whose measurement matches y, the back-projection used to initialise STSL."""
    return project_to_measurements(op, y, torch.zeros(like.shape, dtype=y.dtype, device=y.device), lam, iters)


def p2l(predictor: NoisePredictor, decode: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
        op: Operator, y: Tensor, grid: TimestepGrid, make_cond: Callable[[Tensor], Any], embedding: Tensor,
        z_T: Tensor, rho: float = 1.0, eta: float = 0.0, prompt_steps: int = 1, prompt_lr: float = 1e-3,
        project_every: int = 4, cg_iters: int = 10, cg_lambda: float = 1e-2,
        generator: Optional[torch.Generator] = None, callback: StepCallback = None,
        grad_context: Callable[[], ContextManager] = torch.enable_grad,
        ) -> tuple[Tensor, list[float], Tensor, list[float]]:
    """P2L: posterior sampling with per-step prompt tuning and projection onto the encoder range.

    Per reverse step (NOTES.md P2L steps 1-4): (1) ``prompt_steps`` Adam steps (one optimiser for the
    whole run, so its moments carry over) on the text embedding C, handed to the predictor as
    ``make_cond(C)``, minimising ||y - A D(x0_hat(z_t, C))||^2; (2) eps and x0_hat again with the
    tuned C; (3) the DDIM (eta = 0) or DDPM step, then the LDPS data-consistency step
    z_{t-1} -= rho grad_{z_t} ||y - A D(x0_hat)||; (4) every ``project_every`` steps, x_hat =
    argmin ||y - A x||^2 + cg_lambda ||x - D(x0')||^2 by conjugate gradients, with x0' the clean
    latent of the LDPS-corrected z_{t-1} (x0_hat - grad / sqrt(abar_{t-1}): the proximal update
    comes before the projection, P2L Table 5), and E(x_hat) takes x0''s place in z_{t-1}, which
    keeps its eps and its sigma n (eta = 0.8 in the paper). Returns the final latent, the residual per step, the
    tuned embedding and the prompt loss before and after tuning at every step
    (``prompt_loss[2 i]``, ``prompt_loss[2 i + 1]``).
    """
    ts, ab = grid.timesteps, grid.alphas_cumprod
    z = z_T.detach().float()
    residuals: list[float] = []
    prompt_loss: list[float] = []
    with grad_context():  # created out of inference mode, so that autograd may track it
        C = embedding.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([C], lr=prompt_lr)
    for i in range(grid.steps):
        a, a_next = ab[i], ab[i + 1]
        with grad_context():
            zc = z.detach()
            for k in range(prompt_steps):                                        # (1) prompt tuning
                eps = predictor(zc, ts[i], [make_cond(C)])[0].float()
                loss = (y - op.A(decode(predicted_x0(zc, eps, a)))).pow(2).sum()
                if k == 0:
                    prompt_loss.append(float(loss.detach()))
                step_on(opt, C, loss)
            zz = z.detach().clone().requires_grad_(True)                         # (2) with the tuned C
            eps = predictor(zz, ts[i], [make_cond(C.detach())])[0].float()
            x0 = predicted_x0(zz, eps, a)
            r = (y - op.A(decode(x0))).reshape(y.shape[0], -1).norm(dim=1)
            (grad,) = torch.autograd.grad(rho * r.sum(), zz)
        residuals.append(float(r.detach().mean()))
        if prompt_steps > 0:
            prompt_loss.append(float(r.detach().pow(2).sum()))
        eps, x0, grad = eps.detach(), x0.detach(), grad.detach()
        z_next, _ = _guided_step(z, eps, a, a_next, eta, grad, generator)     # (3) step + LDPS
        if project_every > 0 and (i + 1) % project_every == 0 and i + 1 < grid.steps:   # (4) projection
            with torch.no_grad():
                # project the clean latent that the LDPS-corrected z_{t-1} carries (the proximal update
                # comes before the projection), then put the projected one in its place: the same eps
                # and the same sigma n stay in z_{t-1}
                x0_corr = x0 - grad / math.sqrt(a_next)
                x_hat = project_to_measurements(op, y, decode(x0_corr), cg_lambda, cg_iters)
                z_next = z_next + math.sqrt(a_next) * (encode(x_hat).float() - x0_corr)
        z = z_next.detach()
        check_diverged(z, i, "P2L")
        if callback is not None:
            callback(i, grid.steps, z)
    return z, residuals, C.detach(), prompt_loss
