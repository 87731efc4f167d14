"""Exact(er) inversion: solving DDIM's implicit inversion equation per step, and the inversions
that store extra state instead (negative-prompt, null-text, edit-friendly DDPM).

Notation of the RNRI paper (Hong et al., ../shared/papers/rnri-newton-raphson-inversion.txt):
for one inversion step from level s (latent z_s, abar a_s) to level t (abar a_t),

    f(z) = sqrt(a_t / a_s) z_s + sqrt(a_t) (psi(a_t) - psi(a_s)) eps(z, t)         (eq. 3)

and the exact inversion is the root of r(z) = z - f(z) (eq. 5). DDIM inversion (eq. 4) takes
f(z_s). Every solver below is one short function over the same contract
``solve(step, cfg, grad_context) -> (z_t, residual history, residual)``, and every inversion here
returns the family's one result type, :class:`~.result.InversionResult`. The bookkeeping they
share lives in :class:`_Track`:

- everything is per image: residuals mean|r| over each image, tolerance, early stop and the best
  iterate are decided image by image (a batch of 2 equals two runs of 1);
- the returned latent is the best iterate seen, each scored by its own residual. The DDIM estimate
  f(z_s) (free: it is z_s - r(z_s)) is the first candidate, and every solver evaluates it before it
  compares anything with it, so no step returns a latent worse than DDIM inversion's, and never
  z_s itself (no step returns its input).

Solvers (model calls per step with ``iterations = K``):
- :func:`solve_rnri`: Regularized Newton-Raphson, eq. 7-8, derivatives by autograd through the
  model, from z^0 = z_s (K forward+backward, 2 forward: z^K and the DDIM seed; with CFG each update
  is one plain batched forward, then a forward+backward per branch, so the peak is one branch's
  graph: :func:`_residual`).
- :func:`solve_rnri_jacobian_free`: the authors' public code (NewtonRaphsonInversion's
  ``inversion_step``), line for line: the model call detached, their objective and selection
  (K forward, K - 1 effective updates, the best f(z^k) returned).
- :func:`solve_fixed_point`: z <- f(z) (AIDI / ReNoise) (K + 1 forward).
- :func:`solve_gradient_descent`: gradient descent on 0.5 ||z - f(z)||^2 (ExactDPM-style).
- :func:`solve_anderson`: type-II Anderson acceleration of the fixed point (memory ``cfg.memory``),
  each secant step anchored at the best evaluated iterate (K + 1 forward).
- :func:`solve_newton_krylov`: Newton's method on r(z) = 0 from f(z_s), each linear system
  (I - J) delta = -r solved by GMRES with ``cfg.krylov`` Jacobian-vector products
  (K (krylov + 1) + 2 forward, or JVP passes through the model).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from .ddim import ddim_invert, ddim_sample
from .flow_solvers import SOLVERS as FLOW_SOLVERS, flow_invert, flow_sample
from .protocols import NoisePredictor, StepCallback
from .result import InversionResult, StepReport
from .schedule import TimestepGrid
from .steps import apply_noise_map, ddim_step, ddpm_posterior, f64, guided_eps

Tensor = torch.Tensor
GradContext = Callable[[], ContextManager]


@dataclass
class SolverConfig:
    """Per-step solver settings shared by the iterative inversions.

    ``iterations``: at most this many updates per step (RNRI: 2); ``tol``: an image's step stops
    once its mean|z - f(z)| < tol; ``lam``: RNRI's prior weight lambda (eq. 7, 0.1); ``eta``: RNRI's
    stabiliser in eq. 8; ``max_update``: clamp on one Newton update per element (guards the
    division where dF/dz_i ~ 0); ``lr``: gradient-descent step size; ``memory``: Anderson's
    history length; ``krylov``: GMRES iterations (JVPs) per Newton-Krylov update; ``jvp``:
    "autograd" (forward-mode through the model) or "finite_difference" (one model call each).
    ``z_clean``: the clean latent being inverted (the prior of :func:`solve_rnri_jacobian_free`,
    set by :func:`iterative_invert`).
    """

    iterations: int = 2
    tol: float = 1e-4
    lam: float = 0.1
    eta: float = 1e-3
    max_update: float = 0.5
    lr: float = 1.0
    memory: int = 3
    krylov: int = 3
    jvp: str = "finite_difference"
    z_clean: Optional[Tensor] = None


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
        """-sum_j log q_j(z | z_s) up to its constant, per image."""
        mean, var = self._prior()
        return ((z - mean) ** 2).flatten(1).sum(1) / (2.0 * var)

    def prior_grad(self, z: Tensor) -> Tensor:
        """The gradient of :meth:`prior_nll`, (z - mean) / var."""
        mean, var = self._prior()
        return (z - mean) / var


def per_image_residual(r: Tensor) -> Tensor:
    """mean|r| over each image: [B]."""
    return r.detach().abs().flatten(1).mean(1).float()


def _per_image(v: Tensor, like: Tensor) -> Tensor:
    """A per-image value [B] broadcast against a latent batch."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1)).to(like)


class _Track:
    """The bookkeeping every solver shares, per image.

    Seeded at k = 0 with r(z_s): the best iterate starts as the DDIM estimate f(z_s) = z_s - r(z_s).
    Until the solver evaluates f(z_s) (``offer(..., is_seed=True)``, which every solver does before
    any other iterate) its score is r(z_s), a bound that is never compared with another iterate;
    from then on every candidate is scored by its own residual. An image whose best residual falls
    below ``tol`` is done: its best iterate and its updates are frozen, so each image follows
    exactly the path it would follow alone."""

    def __init__(self, z_s: Tensor, r0: Tensor, tol: float):
        res0 = per_image_residual(r0)
        self.z = (z_s - r0).detach().clone()
        self.res = res0.clone()
        self.tol = tol
        self.seed_measured = False
        self.done = res0 < tol
        self.hist = [float(res0.mean())]

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def offer(self, z: Tensor, r: Tensor, is_seed: bool = False) -> Tensor:
        """Record iterate ``z`` with its own residual ``r``; ``is_seed`` when ``z`` is f(z_s) itself
        (its measured residual then replaces the bound). Returns the per-image residual."""
        if not (is_seed or self.seed_measured):
            raise RuntimeError("a solver compared an iterate with the DDIM seed before evaluating the seed")
        self.seed_measured = True
        res = per_image_residual(r)
        live = ~self.done
        take = live & torch.isfinite(res) & ((res < self.res) | is_seed)
        self.z[take] = z.detach()[take].to(self.z)
        self.res[take] = res[take]
        self.hist.append(float(torch.where(live, res, self.res).mean()))
        self.done = self.done | (self.res < self.tol)
        return res

    def measure_seed(self, step: "_Step") -> None:
        """Evaluate the DDIM seed f(z_s) (one forward call) and score it by its own residual."""
        with torch.no_grad():
            self.offer(self.z, self.z - step.f(self.z), is_seed=True)

    def step(self, z: Tensor, new: Tensor) -> Tensor:
        """``new`` where the image is still running, ``z`` where it is done."""
        return torch.where(_per_image(self.done, z).bool(), z, new).detach()

    def result(self) -> tuple[Tensor, list[float], float]:
        return self.z, self.hist, float(self.res.mean())


def _residual(step: _Step, z: Tensor, grad_context: GradContext) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """r(z) = z - f(z) and a function v -> (dr/dz)^T v = v - (df/dz)^T v.

    With one prompt branch (no CFG) r is computed once with its graph and the product is one
    backward pass. With CFG, f is linear in eps = sum_b w_b eps_b (w = g for the prompt, 1 - g
    for the negative), so (df/dz)^T v = sum_b w_b (df/deps)(deps_b/dz)^T v: r comes from a plain
    batched call, and each branch's product from its own forward + backward, freed before the next
    one is built. The peak autograd memory is one branch's model graph at the batch size instead of
    the joint CFG batch's two (about half), at one extra forward pass (bench/inversion.py: memory)."""
    if step.uncond is None or step.guidance == 1.0:
        with grad_context():
            zz = z.detach().clone().requires_grad_(True)
            r = zz - step.f(zz)

        def vjp(v: Tensor) -> Tensor:
            with grad_context():
                (g,) = torch.autograd.grad(r, zz, grad_outputs=v)
            return g.detach()

        return r.detach(), vjp
    with torch.no_grad():
        r = z - step.f(z)

    def vjp(v: Tensor) -> Tensor:
        out = v.clone()
        for cond, w in ((step.cond, step.guidance), (step.uncond, 1.0 - step.guidance)):
            with grad_context():
                zz = z.detach().clone().requires_grad_(True)
                eps = step.predictor(zz, step.t, [cond])[0].to(step.z_s.dtype)
                (g,) = torch.autograd.grad(ddim_step(torch.zeros_like(step.z_s), w * eps, step.a_s, step.a_t), zz,
                                           grad_outputs=v)
            out -= g.detach()
        return out

    return r, vjp


def solve_rnri(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """RNRI eq. 8, per image: z_i <- z_i - F(z) / (d (g_i + eta)), g = dF/dz by autograd through
    the model (dF/dz = (dr/dz)^T sign(r) + lambda (z - m) / v, one prompt branch per backward
    pass: :func:`_residual`), d the number of elements of one image, from z^0 = z_s (the paper's
    Fig. 2). The sign of g is kept when adding eta, and each update is clamped to ``max_update``.
    The DDIM seed f(z_s) is evaluated after the first residual (one forward call), so that the best
    iterate is chosen by each candidate's own residual."""
    z, track = step.z_s.detach().clone(), None
    d = z[0].numel()
    for k in range(cfg.iterations):
        r, vjp = _residual(step, z, grad_context)
        if track is None:
            track = _Track(step.z_s, r, cfg.tol)
            if not track.all_done:
                track.measure_seed(step)
        else:
            track.offer(z, r)
        if track.all_done:
            return track.result()
        F = r.abs().flatten(1).sum(1) + cfg.lam * step.prior_nll(z)
        g = vjp(torch.sign(r)) + cfg.lam * step.prior_grad(z)
        denom = g + cfg.eta * torch.where(g >= 0, 1.0, -1.0)
        update = (_per_image(F, z) / d) / denom
        z = track.step(z, z - update.clamp(-cfg.max_update, cfg.max_update))
    with torch.no_grad():
        r = z - step.f(z)
    if track is None:  # no iterations: DDIM inversion
        return _Track(step.z_s, r, cfg.tol).result()
    track.offer(z, r)
    return track.result()


def solve_rnri_jacobian_free(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """The authors' public RNRI code (dvirsamuel/NewtonRaphsonInversion, ``inversion_step`` of
    src/sdxl_inversion_pipeline.py), line for line, in this module's DDIM coordinates z = sqrt(a) x
    (their latents x are Euler's: x = z / sqrt(a) at every level). From their start, the previous
    latent x_s, which is z^0 = sqrt(a_t / a_s) z_s here (the prior mean, where the paper's Fig. 2
    reads z^0 = z_s), for k = 0..K-1:

    - one model call, detached: f(z^k);
    - F_k = sum_i |f(z^k) - z^k|_i / sqrt(a_t) + lambda sum_i 0.5 (f(z^k) - sqrt(a_t) z_clean)_i^2 / (1 - a_t):
      their objective, the prior centred on the clean latent and evaluated at the detached f(z^k)
      (so it adds nothing to the gradient), not the paper's q(z | z_s) at z (eq. 7);
    - the best f(z^k) by F_k / d (their ``score``) is what the step returns;
    - the update z^{k+1} = z^k - sqrt(a_t) (F_k / d) / sign(z^k - f(z^k)) (their
      ``latent - (1 / (64*64*4)) * (l / latent.grad)``, d = the elements of one image instead of
      the hard-coded 64*64*4), skipped where the sign is 0 (their code divides by zero there) and
      after the last call (their last update is computed and discarded).

    So K iterations are K model calls and K - 1 effective updates; per image, where they score
    the batch. ``eta``, ``max_update`` and ``tol`` are not used (the authors have none). The
    reported residual is that of the chosen z^k (f(f(z^k)) is never evaluated). Without
    ``cfg.z_clean`` the prior is centred on 0."""
    if cfg.iterations <= 0:
        with torch.no_grad():
            r = step.z_s - step.f(step.z_s)
        return _Track(step.z_s, r, cfg.tol).result()
    a_t = step.a_t
    z = math.sqrt(a_t / step.a_s) * step.z_s.detach()
    d = z[0].numel()
    centre = math.sqrt(a_t) * (cfg.z_clean.to(z) if cfg.z_clean is not None else torch.zeros_like(z))
    best, best_score, best_res, hist = None, None, None, []
    with torch.no_grad():
        for k in range(cfg.iterations):
            fz = step.f(z)
            r = z - fz
            res = per_image_residual(r)
            hist.append(float(res.mean()))
            F = (r.abs().flatten(1).sum(1) / math.sqrt(a_t)
                 + cfg.lam * 0.5 * ((fz - centre) ** 2).flatten(1).sum(1) / max(1.0 - a_t, 1e-12))
            score = F / d
            if best is None:
                best, best_score, best_res = fz.clone(), score.clone(), res.clone()
            else:
                take = score < best_score
                best[take], best_score[take], best_res[take] = fz[take], score[take], res[take]
            if k + 1 < cfg.iterations:
                sign = torch.sign(r)
                step_x = torch.where(sign != 0, _per_image(F / d, z) / torch.where(sign != 0, sign, 1.0), 0.0)
                z = z - math.sqrt(a_t) * step_x
    return best.detach(), hist, float(best_res.mean())


def solve_fixed_point(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Fixed-point iteration z^{k+1} = f(z^k) from z^0 = z_s (AIDI; its first update is DDIM inversion)."""
    with torch.no_grad():
        z = step.z_s.detach().clone()
        fz = step.f(z)
        track = _Track(z, z - fz, cfg.tol)
        for k in range(cfg.iterations):
            if track.all_done:
                break
            z = track.step(z, fz)
            fz = step.f(z)
            track.offer(z, z - fz, is_seed=k == 0)
    return track.result()


def solve_gradient_descent(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Gradient descent z <- z - lr * grad 0.5 ||z - f(z)||^2 = (dr/dz)^T r from z^0 = z_s
    (ExactDPM-style baseline; one prompt branch per backward pass, :func:`_residual`); the DDIM
    seed is evaluated after the first residual, as in :func:`solve_rnri`."""
    z, track = step.z_s.detach().clone(), None
    for k in range(cfg.iterations + 1):
        last = k == cfg.iterations
        if last:
            with torch.no_grad():
                r = z - step.f(z)
        else:
            r, vjp = _residual(step, z, grad_context)
        if track is None:
            track = _Track(step.z_s, r, cfg.tol)
            if not last and not track.all_done:
                track.measure_seed(step)
        else:
            track.offer(z, r)
        if last or track.all_done:
            break
        z = track.step(z, z - cfg.lr * vjp(r))
    return track.result()


def _wide(t: Tensor) -> Tensor:
    """The solvers' inner products in float64, or float32 where the device has no float64 (MPS)."""
    return t.float() if t.device.type == "mps" else t.double()


def _flat(t: Tensor) -> Tensor:
    """A latent batch as [B, D] vectors in the solvers' inner-product precision."""
    return _wide(t.reshape(t.shape[0], -1))


def _lstsq_per_image(A: Tensor, b: Tensor) -> Tensor:
    """argmin_x ||A x - b|| for a batch of small systems A [B, n, m], b [B, n]: the normal equations
    (Gram matrices on A's device), solved in float64 on the CPU with a tiny Tikhonov term so that
    dependent columns stay finite. Returns x [B, m] on A's device, in A's dtype."""
    A, b = _wide(A), _wide(b)
    AtA = (A.transpose(1, 2) @ A).cpu().double()
    Atb = (A.transpose(1, 2) @ b[..., None]).cpu().double()
    reg = 1e-10 * AtA.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
    AtA = AtA + reg[:, None, None] * torch.eye(A.shape[2], dtype=torch.float64)
    return torch.linalg.solve(AtA, Atb)[..., 0].to(A.device, A.dtype)


def solve_anderson(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Type-II Anderson acceleration of z = f(z), per image (Walker & Ni 2011, beta = 1): with
    g_k = f(z_k) - z_k and the last m differences dZ, dG of consecutive evaluated iterates and
    residuals, gamma = argmin ||g_b - dG gamma||, z_{k+1} = z_b + g_b - (dZ + dG) gamma, anchored at
    b, the image's best evaluated iterate (z_s included): the current iterate while the residual
    falls, so that this is plain Anderson then; where it grew, the secant step restarts from the
    best point with the growth's difference in its history (for an expansive linear map, |J| > 1,
    that one secant step is exact; a plain fixed-point restart would re-evaluate the same point and
    add a zero column). The first update is the fixed point z_1 = f(z_s) (DDIM inversion); K
    iterations are K + 1 model calls and K - 1 secant steps, with min(m, K - 1) columns of history."""
    with torch.no_grad():
        z = step.z_s.detach().clone()
        fz = step.f(z)
        g = fz - z
        track = _Track(z, -g, cfg.tol)
        best_z, best_g = z.clone(), g.clone()  # each image's best evaluated iterate and its f(z) - z
        best_res = per_image_residual(g)
        dZ: list[Tensor] = []
        dG: list[Tensor] = []
        z_prev, g_prev = z, g
        z = fz  # the first update is the plain fixed point (DDIM inversion)
        for k in range(cfg.iterations):
            if track.all_done:
                break
            fz = step.f(z)
            g = fz - z
            res = track.offer(z, -g, is_seed=k == 0)
            improved = torch.isfinite(res) & (res <= best_res)
            best_z[improved], best_g[improved] = z[improved], g[improved]
            best_res = torch.where(improved, res, best_res)
            if k + 1 == cfg.iterations:
                break
            dZ.append(_flat(z - z_prev))
            dG.append(_flat(g - g_prev))
            dZ, dG = dZ[-cfg.memory:], dG[-cfg.memory:]
            Zm, Gm = torch.stack(dZ, 2), torch.stack(dG, 2)  # [B, D, m]
            gamma = _lstsq_per_image(Gm, _flat(best_g))
            nxt = (_flat(best_z) + _flat(best_g) - ((Zm + Gm) @ gamma[..., None])[..., 0]).reshape(z.shape).to(z)
            z_prev, g_prev = z, g
            z = track.step(z, nxt)
    return track.result()


def fd_step(dtype: torch.dtype) -> float:
    """The relative finite-difference step for a model computing in ``dtype``: sqrt of its machine
    epsilon (3.5e-4 in float32, 3.1e-2 in float16, 8.8e-2 in bfloat16), the step that balances the
    truncation error (~h) against the rounding of f (~eps / h)."""
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else math.sqrt(torch.finfo(torch.float32).eps)


def _jvp(step: _Step, z: Tensor, fz: Tensor, v: Tensor, how: str, grad_context: GradContext) -> Tensor:
    """J v with J = df/dz at z: forward-mode autograd through the model, or a finite difference
    (f(z + h v) - f(z)) / h (one model call) with h = :func:`fd_step` of the predictor's compute
    dtype (its ``compute_dtype``, else float32) times each image's ||z|| / ||v||: a model that
    computes in bfloat16 rounds f at 8e-3 relative, so the float32 step would be mostly rounding."""
    if how == "autograd":
        with grad_context():
            jv = torch.func.jvp(step.f, (z.detach(),), (v.detach(),))[1]
        return jv.detach()
    rel = fd_step(getattr(step.predictor, "compute_dtype", None) or torch.float32)
    scale = z.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-30)
    h = _per_image(rel * scale.clamp_min(1e-3), z)
    with torch.no_grad():
        return (step.f(z + h * v) - fz) / h


def _gmres_per_image(matvec: Callable[[Tensor], Tensor], b: Tensor, m: int) -> Tensor:
    """GMRES(m) from x = 0 for a batch of independent systems A x = b (b [B, ...]); ``matvec``
    applies A to a batch. Arnoldi with per-image inner products; the small least-squares problem
    min ||beta e1 - H y|| per image."""
    B = b.shape[0]
    beta = _flat(b).norm(dim=1)
    tiny = torch.finfo(beta.dtype).tiny
    Q = [_flat(b) / beta.clamp_min(tiny)[:, None]]
    H = torch.zeros(B, m + 1, m, dtype=beta.dtype, device=b.device)
    for j in range(m):
        w = _flat(matvec(Q[j].reshape(b.shape).to(b)))
        for i in range(j + 1):
            H[:, i, j] = (Q[i] * w).sum(1)
            w = w - H[:, i, j, None] * Q[i]
        H[:, j + 1, j] = w.norm(dim=1)
        Q.append(w / H[:, j + 1, j].clamp_min(tiny)[:, None])
    e1 = torch.zeros(B, m + 1, dtype=beta.dtype, device=b.device)
    e1[:, 0] = beta
    y = _lstsq_per_image(H, e1)
    x = (torch.stack(Q[:m], 2) @ y[..., None])[..., 0]
    return x.reshape(b.shape).to(b)


def solve_newton_krylov(step: _Step, cfg: SolverConfig, grad_context: GradContext) -> tuple[Tensor, list[float], float]:
    """Newton's method on r(z) = z - f(z) = 0 from the DDIM estimate z^1 = f(z_s): each update
    solves (I - J) delta = -r(z) by GMRES with ``cfg.krylov`` Jacobian-vector products of f, then
    z <- z + delta; every new iterate is evaluated (its residual decides the best iterate)."""
    with torch.no_grad():
        z = step.z_s.detach().clone()
        fz = step.f(z)
        track = _Track(z, z - fz, cfg.tol)
        z = fz
        fz = step.f(z)
        track.offer(z, z - fz, is_seed=True)
    for k in range(cfg.iterations):
        if track.all_done:
            break
        r = z - fz
        zk, fk = z, fz
        delta = _gmres_per_image(lambda v: v - _jvp(step, zk, fk, v, cfg.jvp, grad_context), -r, cfg.krylov)
        z = track.step(z, z + delta)
        with torch.no_grad():
            fz = step.f(z)
            track.offer(z, z - fz)
    return track.result()


#: the family's registry: solver name -> solve(step, cfg, grad_context) -> (z_t, residual history, residual),
#: in the order the Exact Inversion node offers them (its options)
SOLVERS = {
    "anderson": solve_anderson,
    "newton_krylov": solve_newton_krylov,
    "fixed_point": solve_fixed_point,
    "rnri": solve_rnri,
    "rnri_jacobian_free": solve_rnri_jacobian_free,
    "gradient_descent": solve_gradient_descent,
}

#: every method :func:`invert` takes: DDIM, the implicit-step solvers and the flow solvers
METHODS = ("ddim", *SOLVERS, *FLOW_SOLVERS)

#: the solvers that need only forward model calls and beat DDIM in bench/inversion.py: the ones a
#: SAMPLER offers (RNRI and gradient descent need gradients through the model, which a GUIDER
#: cannot give; rnri_jacobian_free is often worse than DDIM)
FORWARD_SOLVERS = ("anderson", "newton_krylov", "fixed_point")


def iterative_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                     guidance: float = 1.0, method: str = "rnri", cfg: Optional[SolverConfig] = None,
                     callback: StepCallback = None, grad_context: GradContext = torch.enable_grad,
                     ) -> InversionResult:
    """Invert ``z0`` step by step, solving RNRI eq. 3 at every step with the chosen solver.
    Returns the trajectory (clean first, as :func:`ddim_invert`) with the per-step report. ``method``
    is a name in :data:`SOLVERS` (the node checks it against its options, which are those names)."""
    cfg = cfg or SolverConfig()
    if cfg.iterations < 0:
        raise ValueError("iterations must be >= 0")
    solve = SOLVERS[method]
    ts = grid.timesteps[::-1]
    ab = grid.alphas_cumprod[::-1]
    z = z0.float()
    if method == "rnri_jacobian_free" and cfg.z_clean is None:
        cfg = dataclasses.replace(cfg, z_clean=z)
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
    return InversionResult(traj, grid, method, guidance, report=report)


def invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
           guidance: float = 1.0, method: str = "ddim", cfg: Optional[SolverConfig] = None,
           callback: StepCallback = None, grad_context: GradContext = torch.enable_grad) -> InversionResult:
    """DDIM inversion (``method`` "ddim", RNRI eq. 4), :func:`iterative_invert` with a solver of
    :data:`SOLVERS`, or a second-order flow solver of :data:`FLOW_SOLVERS` (RF-Solver, FireFlow;
    core/flow_solvers.py): the one entry point of the deterministic inversions."""
    if method == "ddim":
        return ddim_invert(predictor, z0, grid, cond, uncond, guidance, callback)
    if method in FLOW_SOLVERS:
        return flow_invert(predictor, z0, grid, cond, uncond, guidance, method, callback)
    return iterative_invert(predictor, z0, grid, cond, uncond, guidance, method, cfg, callback, grad_context)


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
        up = ddim_invert(predictor, z, sub, cond, uncond, guidance).noise_latent
        z = ddim_sample(predictor, up, sub, cond, uncond, guidance)[-1]
        if callback is not None:
            callback(k, rounds, z)
    return z


# ------------------------------------------------------------------------------------------
# null-text inversion (Mokady et al. 2023, Alg. 1)

def null_text_optimize(predictor: NoisePredictor, pivot: "InversionResult | Sequence[Tensor]", grid: TimestepGrid,
                       cond: Any, null_embedding: Tensor, make_uncond: Callable[[Tensor], Any], guidance: float = 7.5,
                       inner_steps: int = 10, lr: float = 1e-2, tol: float = 1e-5,
                       callback: StepCallback = None, grad_context: GradContext = torch.enable_grad,
                       ) -> InversionResult:
    """Null-text inversion (Mokady et al. 2023, Alg. 1) on the authors' schedule
    (google/prompt-to-prompt, ``NullInversion.null_optimization``): at sampling step i (0 = the
    noisiest), a fresh Adam with learning rate ``lr * (1 - i / 100)`` optimises the unconditional
    embedding so that one guided DDIM step from the current latent lands on the pivot (the DDIM
    inversion at guidance 1); each inner iteration takes its Adam step and then stops the loop once
    the loss it measured is below ``tol + i * 2e-5``. The step is then taken with the optimised
    embedding. Gradients are taken with respect to the embedding alone (``torch.autograd.grad``),
    so a model whose weights require grad gains no ``.grad``. Returns the pivot as the trajectory
    (method "null_text"), with the per-step embeddings (sampling order) in ``extras["null_embeddings"]``
    and the last measured loss per step in ``extras["null_text_losses"]``."""
    pivot = pivot.trajectory if isinstance(pivot, InversionResult) else list(pivot)

    def result(embeddings: list[Tensor], losses: list[float]) -> InversionResult:
        return InversionResult(pivot, grid, "null_text", guidance,
                               {"null_embeddings": embeddings, "null_text_losses": losses})

    if guidance == 1.0:  # eps = eps_c: the unconditional embedding has no effect to optimise
        return result([null_embedding.detach().float().clone() for _ in range(grid.steps)], [0.0] * grid.steps)
    keep = pivot[::-1]  # sampling order: keep[0] is z_T
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
            opt = torch.optim.Adam([var], lr=lr * (1.0 - i / 100.0))
            loss_val = float("inf")
            for j in range(inner_steps):
                e_u = predictor(z, ts[i], [make_uncond(var)])[0].float()
                eps = e_u + guidance * (e_c - e_u)
                loss = ((ddim_step(z, eps, ab[i], ab[i + 1]) - target) ** 2).mean()
                (var.grad,) = torch.autograd.grad(loss, [var])
                opt.step()
                loss_val = float(loss.detach())
                if loss_val < tol + i * 2e-5:
                    break
            emb = var.detach().clone()
        with torch.no_grad():
            e_u = predictor(z, ts[i], [make_uncond(emb)])[0].float()
            z = ddim_step(z, e_u + guidance * (e_c - e_u), ab[i], ab[i + 1])
        embeddings.append(emb)
        losses.append(loss_val)
        if callback is not None:
            callback(i, grid.steps, z)
    return result(embeddings, losses)


# ------------------------------------------------------------------------------------------
# edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024; ProxEdit supplement)

def ddpm_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                guidance: float = 1.0, generator: Optional[torch.Generator] = None,
                callback: StepCallback = None) -> InversionResult:
    """Edit-friendly DDPM inversion: independent forward samples x_t = sqrt(a_t) x0 + sqrt(1-a_t) n_t
    at every level, then per step the noise map z_t = (x_s - mu_t(x_t)) / sigma_t that makes the
    DDPM step reproduce x_s exactly. Where sigma_t = 0 (the last step onto a clean level) the map is
    the plain residual x_s - mu_t. The maps are float64: sampling with them then reproduces every
    float32 level exactly, so the reconstruction is exact at any number of steps and guidance.
    Returns the levels as the trajectory (inversion order, method "ddpm") with the noise maps in
    sampling order in ``extras["noise_maps"]``."""
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
        # float64, so that mean + sigma z gives back the float32 x_s bit for bit when sampling:
        # a rounding here is amplified by the guided model at every later step
        maps.append((f64(levels[i + 1]) - f64(mean)) / (sigma if sigma > 0 else 1.0))
        if callback is not None:
            callback(i, grid.steps, levels[i + 1])
    return InversionResult(xs, grid, "ddpm", guidance, {"noise_maps": maps})


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
        x = apply_noise_map(mean, sigma, noise_maps[i])
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
    per-step optimised null embeddings for "null_text" (through ``make_uncond``), the same
    second-order solver for "rf_solver" and "fireflow" (core/flow_solvers.py), otherwise
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
    if result.method in FLOW_SOLVERS:
        return flow_sample(predictor, keep[start_step], grid, cond, uncond, guidance, result.method, callback,
                           start_step, mask, keep if mask is not None else None)
    return ddim_sample(predictor, keep[start_step], grid, cond, uncond, guidance, callback, start_step,
                       mask, keep if mask is not None else None)
