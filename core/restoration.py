"""Posterior sampling for inverse problems y = A(D(z_0)) + n with a latent diffusion prior.

So far: LDPS (latent diffusion posterior sampling, DPS of Chung et al. 2023 applied through the
decoder) and PSLD (Rout et al. 2023: LDPS plus the "gluing" term), following the algorithm
summary in ../shared/papers/NOTES.md (P2L section, steps 3 and the PSLD baseline line):

    x0_hat = Tweedie(z_t, eps(z_t))                              (predicted x0)
    z'_{t-1} = DDIM/DDPM step(z_t, eps)                          (eta = 0: DDIM, 1: DDPM)
    z_{t-1} = z'_{t-1} - zeta grad_{z_t} ||y - A D(x0_hat)||                     (LDPS)
                       - gamma grad_{z_t} ||E(A^+ y + (I - A^+ A) D(x0_hat)) - x0_hat||     (PSLD)

PSLD writes the gluing with A^T, which is a projection onto {x : A x = y} only when A A^T = I;
with the pseudo-inverse A^+ = A^T (A A^T)^{-1} (:func:`glue`) it is one for every operator whose
A A^T is invertible (average pooling has A A^T = I / f^2). Both norms are plain, not squared, as in
NOTES.md and the PSLD authors' code (``torch.linalg.norm`` of each error): a squared gluing term grows
with the glued image's error, which on an ill-conditioned blur carries the amplified measurement noise,
and diverged on the trained testbed's Gaussian deblurring at the paper's gamma 0.1 (bench/README.md).

zeta follows DPS: the gradient of the residual norm (DPS Alg. 1's zeta' / ||y - A x0|| times the
gradient of the squared norm, up to the factor 2). Works with any noise predictor, decoder and
encoder callables and any :mod:`.operators` operator. :func:`stsl` implements STSL's Algorithm 1
(second-order Tweedie through a Hutchinson trace estimate, stochastic averaging with Adam), :func:`p2l`
P2L's prompt tuning and projection.

The family's contract: every method in :data:`METHODS` is ``method(problem, cfg) -> RestorationResult``,
with the inverse problem and its run-time hooks in a :class:`Problem` and the settings of every method
(the papers' values by default) in one :class:`RestorationConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch

from .operators import Operator
from .protocols import NoisePredictor, StepCallback
from .schedule import TimestepGrid
from .steps import ddpm_posterior, ddpm_posterior_mean, predicted_x0

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


@dataclass
class Problem:
    """An inverse problem y = A(D(z_0)) + n and the hooks of one run of a posterior sampler.

    ``predictor`` the noise predictor, ``decode``/``encode`` the VAE (``encode``: PSLD's gluing,
    STSL's start, P2L's projection), ``op`` the degradation operator, ``y`` the measurement, ``grid``
    the sampling timesteps, ``cond`` the prompt handle. ``z_T``: the starting noise latent (LDPS,
    PSLD, P2L; STSL's "gaussian" start draws one of its shape). P2L tunes the prompt: ``embedding``
    is where it starts and ``make_cond(C)`` the handle of a tuned embedding C. ``generator`` draws
    every random number, ``callback(i, steps, z)`` follows each step, ``grad_context`` wraps every
    autograd pass (the ComfyUI glue's model and VAE autograd guards)."""

    predictor: NoisePredictor
    decode: Callable[[Tensor], Tensor]
    op: Operator
    y: Tensor
    grid: TimestepGrid
    cond: Any
    z_T: Optional[Tensor] = None
    encode: Optional[Callable[[Tensor], Tensor]] = None
    make_cond: Optional[Callable[[Tensor], Any]] = None
    embedding: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None
    callback: StepCallback = None
    grad_context: Callable[[], ContextManager] = torch.enable_grad

    def like(self) -> Tensor:
        """A zero image of the restored image's shape (the operator's input)."""
        return torch.zeros(self.op.x_shape(tuple(self.y.shape)), dtype=self.y.dtype, device=self.y.device)

    def start(self, method: str) -> Tensor:
        """The starting noise latent z_T, float32, detached."""
        if self.z_T is None:
            raise ValueError(f"{method} starts from a noise latent: give the problem its z_T")
        return self.z_T.detach().float()

    def step_done(self, i: int, z: Tensor) -> None:
        """Report step ``i``'s latent to the callback (progress, cancel, the node's divergence check)."""
        if self.callback is not None:
            self.callback(i, self.grid.steps, z)


@dataclass
class RestorationConfig:
    """The settings of every posterior sampler, at the papers' values; each method reads its own
    (one config for the family, as core/inversion.py's SolverConfig).

    LDPS, PSLD, P2L: ``zeta`` the data-consistency step on the residual norm (DPS: 1; P2L's rho) and
    ``eta`` DDIM's eta of the step (0 deterministic, 1 DDPM; P2L paper: 0.8). PSLD: ``gamma`` the
    weight of the gluing term (0.1), solved with ``glue_iters`` conjugate-gradient iterations.
    STSL (Algorithm 1): ``K`` Adam updates per step (5), ``lam`` the measurement weight (1),
    ``trace_weight`` the Hutchinson trace term's eta (0.02), ``lr`` the Adam learning rate (0.01)
    decaying by ``lr_decay`` per step (0.998), ``N`` noise samples per trace estimate (Table 4a: 2),
    ``start`` one of :data:`STSL_STARTS`. P2L: ``prompt_steps`` Adam steps on the embedding per
    sampling step (1), ``prompt_lr`` (1e-3), ``project_every`` steps between projections (4, 0 =
    never), ``cg_iters`` (10) and ``cg_lambda`` (0.01) of the projection."""

    zeta: float = 1.0
    eta: float = 0.0
    gamma: float = 0.1
    glue_iters: int = 10
    K: int = 5
    lam: float = 1.0
    trace_weight: float = 0.02
    lr: float = 1e-2
    lr_decay: float = 0.998
    N: int = 2
    start: str = "adjoint"
    prompt_steps: int = 1
    prompt_lr: float = 1e-3
    project_every: int = 4
    cg_iters: int = 10
    cg_lambda: float = 1e-2


@dataclass
class RestorationResult:
    """What every posterior sampler returns: the final latent z_0 (the model's coordinates), the
    measurement residual ||y - A D(x0_hat)|| per step, and a report of method-specific numbers
    (STSL: ``evaluations``, the batched model evaluations as the paper counts them; P2L: the tuned
    ``embedding`` and ``prompt_loss``, the data loss before and after tuning at every step,
    ``prompt_loss[2 i]`` and ``prompt_loss[2 i + 1]``)."""

    latent: Tensor
    residuals: list[float]
    report: dict[str, Any] = field(default_factory=dict)


def _posterior_sampling(p: Problem, cfg: RestorationConfig, gamma: float) -> RestorationResult:
    """LDPS (``gamma = 0``) or PSLD (``gamma > 0``, needs ``p.encode``; the gluing solves
    A A^T u = y - A x with ``cfg.glue_iters`` conjugate-gradient iterations): the module docstring's
    z_{t-1} = z'_{t-1} - zeta grad ||y - A D(x0_hat)|| - gamma grad ||E(glue(D(x0_hat))) - x0_hat||, each
    norm per image."""
    if gamma > 0 and p.encode is None:
        raise ValueError("PSLD's gluing term needs the encoder")
    ts, ab = p.grid.timesteps, p.grid.alphas_cumprod
    z = p.start("PSLD" if gamma > 0 else "LDPS")
    residuals = []
    for i in range(p.grid.steps):
        with p.grad_context():
            zz = z.detach().clone().requires_grad_(True)
            eps = p.predictor(zz, ts[i], [p.cond])[0].float()
            x0 = predicted_x0(zz, eps, ab[i])
            xd = p.decode(x0)
            r = p.op.residual(p.y, xd)
            objective = cfg.zeta * r.sum()
            if gamma > 0:
                glued = glue(p.op, p.y, xd, cfg.glue_iters)
                objective = objective + gamma * (p.encode(glued) - x0).flatten(1).norm(dim=1).sum()
            (grad,) = torch.autograd.grad(objective, zz)
        residuals.append(float(r.detach().mean()))
        z, _ = _guided_step(z, eps.detach(), ab[i], ab[i + 1], cfg.eta, grad.detach(), p.generator)
        check_diverged(z, i, "PSLD" if gamma > 0 else "LDPS")
        p.step_done(i, z)
    return RestorationResult(z, residuals)


def ldps(problem: Problem, cfg: Optional[RestorationConfig] = None) -> RestorationResult:
    """LDPS: DPS (Chung et al. 2023) through the decoder, zeta = ``cfg.zeta`` (``cfg.gamma`` unused)."""
    return _posterior_sampling(problem, cfg or RestorationConfig(), 0.0)


def psld(problem: Problem, cfg: Optional[RestorationConfig] = None) -> RestorationResult:
    """PSLD (Rout et al. 2023): LDPS plus the gluing term of weight ``cfg.gamma`` (0 gives LDPS)."""
    cfg = cfg or RestorationConfig()
    return _posterior_sampling(problem, cfg, cfg.gamma)


STSL_STARTS = ("adjoint", "back_projection", "gaussian")


def _stsl_start(p: Problem, cfg: RestorationConfig) -> Tensor:
    """STSL Algorithm 1 lines 1-4: the start image's latent (``cfg.start``: "adjoint" = E(A^T y) with A^T y
    scaled to a pseudo-inverse, :func:`scaled_adjoint`; "back_projection" = E(:func:`back_project`);
    "gaussian" = Gaussian noise of ``p.z_T``'s shape, the authors' advice for free-form inpainting)
    noised to the first level through the Gaussian transition kernel of the forward process (the
    text's "forward process in Eq. (1) using the Gaussian transition kernel"): composed over the grid
    it is z_T = sqrt(abar_T) z_0 + sqrt(1 - abar_T) n. (Line 3 read literally, with the model's eps in
    place of fresh noise, multiplies the latent's scale at every step and diverges.)"""
    if cfg.start not in STSL_STARTS:
        raise ValueError(f"unknown STSL start {cfg.start!r}: {', '.join(STSL_STARTS)}")
    a0 = p.grid.alphas_cumprod[0]
    with torch.no_grad():
        if cfg.start == "gaussian":
            shape = p.start("STSL's gaussian start").shape
            z = torch.randn(shape, generator=p.generator, dtype=torch.float32).to(p.z_T.device)
        else:
            image = (scaled_adjoint if cfg.start == "adjoint" else back_project)(p.op, p.y, p.like())
            z = p.encode(image).float()
        n = torch.randn(z.shape, generator=p.generator, dtype=z.dtype).to(z.device)
        return math.sqrt(a0) * z + math.sqrt(1.0 - a0) * n


def _stsl_refine(p: Problem, cfg: RestorationConfig, z: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """STSL Algorithm 1 lines 6-12 at step i: ``cfg.K`` Adam updates of z_t on the surrogate loss
    lambda ||y - A D(x0_hat(z_t))||^2 + (eta / d) mean_j eps_j^T (s(z_t + eps_j) - s(z_t)), the
    Hutchinson estimate of the score Jacobian's trace over ``cfg.N`` noise samples (s = -eps_theta /
    sqrt(1 - abar)); z_t and the N perturbed copies go through the predictor in one batched call.
    Returns the refined z_t and the eps of z_t from the last inner evaluation."""
    t, a = p.grid.timesteps[i], p.grid.alphas_cumprod[i]
    sq = math.sqrt(1.0 - a)
    with p.grad_context():
        var = z.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=cfg.lr * cfg.lr_decay ** i)
        B, d = var.shape[0], var[0].numel()
        for k in range(cfg.K):
            n = torch.randn((cfg.N,) + tuple(var.shape), generator=p.generator, dtype=var.dtype).to(var.device)
            e_all = p.predictor(torch.cat([var] + [var + n[j] for j in range(cfg.N)]), t, [p.cond])[0].float()
            e_z = e_all[:B]
            x0 = predicted_x0(var, e_z, a)
            fit = (p.y - p.op.A(p.decode(x0))).pow(2).sum()
            # eps_j^T (s(z + eps_j) - s(z)) with s = -eps_theta / sqrt(1 - a), averaged over j
            trace = sum(-(n[j] * (e_all[(j + 1) * B:(j + 2) * B] - e_z)).sum() for j in range(cfg.N)) / (cfg.N * sq)
            loss = cfg.lam * fit + (cfg.trace_weight / d) * trace
            step_on(opt, var, loss)
    return var.detach(), e_z.detach()


def stsl(problem: Problem, cfg: Optional[RestorationConfig] = None) -> RestorationResult:
    """STSL (Rout et al., ../shared/papers/stsl-second-order-tweedie.txt, Algorithm 1): lines 1-4 in
    :func:`_stsl_start`, lines 6-12 (K Adam refinements of z_t per step) in :func:`_stsl_refine`, then
    lines 13-14: the DDPM posterior-mean step with the refined z_t; line 13's x0_hat reuses the last
    inner evaluation's eps with the refined z_t (the same formula as line 9), so a step costs K
    batched evaluations: K T in all (250 at T = 50, K = 5, as the paper counts; the report's
    ``evaluations``)."""
    p, cfg = problem, cfg or RestorationConfig()
    if cfg.K < 1 or cfg.N < 1:
        raise ValueError("STSL needs K >= 1 inner updates and N >= 1 noise samples")
    ab = p.grid.alphas_cumprod
    z = _stsl_start(p, cfg)
    residuals: list[float] = []
    for i in range(p.grid.steps):
        z, e_z = _stsl_refine(p, cfg, z, i)
        with torch.no_grad():
            x0 = predicted_x0(z, e_z, ab[i])  # line 13, with line 9's last evaluation
            residuals.append(float(p.op.residual(p.y, p.decode(x0)).mean()))
            z = ddpm_posterior_mean(z, x0, ab[i], ab[i + 1])  # line 14
        check_diverged(z, i, "STSL")
        p.step_done(i, z)
    return RestorationResult(z, residuals, {"evaluations": cfg.K * p.grid.steps})


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


def _p2l_guidance(p: Problem, cfg: RestorationConfig, z: Tensor, i: int, C: Tensor, opt: torch.optim.Optimizer,
                  prompt_loss: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """P2L steps (1)-(2) at sampling step i: ``cfg.prompt_steps`` Adam steps on the embedding C
    minimising ||y - A D(x0_hat(z_t, C))||^2 (the loss before them goes to ``prompt_loss``), then eps
    and x0_hat again with the tuned C and the gradient of zeta ||y - A D(x0_hat)|| with respect to z_t.
    Returns (eps, x0_hat, that gradient, the residual per image)."""
    t, a = p.grid.timesteps[i], p.grid.alphas_cumprod[i]
    with p.grad_context():
        zc = z.detach()
        for k in range(cfg.prompt_steps):                                        # (1) prompt tuning
            eps = p.predictor(zc, t, [p.make_cond(C)])[0].float()
            loss = (p.y - p.op.A(p.decode(predicted_x0(zc, eps, a)))).pow(2).sum()
            if k == 0:
                prompt_loss.append(float(loss.detach()))
            step_on(opt, C, loss)
        zz = z.detach().clone().requires_grad_(True)                             # (2) with the tuned C
        eps = p.predictor(zz, t, [p.make_cond(C.detach())])[0].float()
        x0 = predicted_x0(zz, eps, a)
        r = p.op.residual(p.y, p.decode(x0))
        (grad,) = torch.autograd.grad(cfg.zeta * r.sum(), zz)
    return eps.detach(), x0.detach(), grad.detach(), r.detach()


def _p2l_project(p: Problem, cfg: RestorationConfig, z_next: Tensor, x0: Tensor, grad: Tensor,
                 a_next: float) -> Tensor:
    """P2L step (4): project the clean latent that the LDPS-corrected z_{t-1} carries (x0_hat -
    grad / sqrt(abar_{t-1}): the proximal update comes before the projection, P2L Table 5) onto the
    measurements, x_hat = argmin ||y - A x||^2 + cg_lambda ||x - D(x0')||^2, and put E(x_hat) in its
    place: the same eps and the same sigma n stay in z_{t-1}."""
    with torch.no_grad():
        x0_corr = x0 - grad / math.sqrt(a_next)
        x_hat = project_to_measurements(p.op, p.y, p.decode(x0_corr), cfg.cg_lambda, cfg.cg_iters)
        return z_next + math.sqrt(a_next) * (p.encode(x_hat).float() - x0_corr)


def p2l(problem: Problem, cfg: Optional[RestorationConfig] = None) -> RestorationResult:
    """P2L: posterior sampling with per-step prompt tuning and projection onto the encoder range.

    Per reverse step (NOTES.md P2L steps 1-4): (1)-(2) :func:`_p2l_guidance` (one optimiser for the
    whole run, so its moments carry over; the embedding goes to the predictor as
    ``problem.make_cond(C)``); (3) the DDIM (eta = 0) or DDPM step, then the LDPS data-consistency
    step z_{t-1} -= rho grad_{z_t} ||y - A D(x0_hat)|| (rho = ``cfg.zeta``); (4) every
    ``cfg.project_every`` steps, :func:`_p2l_project` (eta = 0.8 in the paper). The report holds the
    tuned ``embedding`` and the ``prompt_loss`` before and after tuning at every step."""
    p, cfg = problem, cfg or RestorationConfig()
    if p.make_cond is None or p.embedding is None:
        raise ValueError("P2L tunes the prompt: give the problem its embedding and make_cond")
    ab = p.grid.alphas_cumprod
    z = p.start("P2L")
    residuals: list[float] = []
    prompt_loss: list[float] = []
    with p.grad_context():  # created out of inference mode, so that autograd may track it
        C = p.embedding.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([C], lr=cfg.prompt_lr)
    for i in range(p.grid.steps):
        eps, x0, grad, r = _p2l_guidance(p, cfg, z, i, C, opt, prompt_loss)
        residuals.append(float(r.mean()))
        if cfg.prompt_steps > 0:
            prompt_loss.append(float(r.pow(2).sum()))
        z_next, _ = _guided_step(z, eps, ab[i], ab[i + 1], cfg.eta, grad, p.generator)   # (3) step + LDPS
        if cfg.project_every > 0 and (i + 1) % cfg.project_every == 0 and i + 1 < p.grid.steps:   # (4)
            z_next = _p2l_project(p, cfg, z_next, x0, grad, ab[i + 1])
        z = z_next.detach()
        check_diverged(z, i, "P2L")
        p.step_done(i, z)
    return RestorationResult(z, residuals, {"embedding": C.detach(), "prompt_loss": prompt_loss})


#: the family's registry: method name -> method(problem, cfg) -> RestorationResult (the Restore node's options)
METHODS = {"stsl": stsl, "ldps": ldps, "psld": psld, "p2l": p2l}
