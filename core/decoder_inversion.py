"""Decoder inversion: the latent z whose decoding D(z) best matches an image x.

Gradient-free methods (Hong et al., "Gradient-free Decoder Inversion in Latent Diffusion Models",
NeurIPS 2024; ../shared/papers/gradient-free-decoder-inversion.txt) solve T(z) = 0 with
T(z) = E(D(z)) - E(x), using only forward passes of the encoder E and decoder D:

- :func:`forward_step`: z^{k+1} = z^k - rho T(z^k)                        (eq. 8, Theorem 1: rho < 2 beta)
- :func:`inertial_km`:   y^k = z^k + alpha (z^k - z^{k-1}); z^{k+1} = y^k - 2 lambda beta T(y^k)
                         (eq. 10-11, Theorem 2, step-size condition eq. 13:
                         lambda (1 - alpha + 2 alpha^2) < (1 - alpha)^2)
- :func:`adam_forward_step`: the authors' experiments: Adam moments on g = T(z), step rho_max with a
  linear warm-up over the first tenth of the iterations and cosine decay.

The gradient-based baseline :func:`gradient_based` runs Adam on ||D(z) - x||^2 through the decoder.

E and D are any callables (e.g. a 16-bit model): the iterate stays float32 and is cast by the
callables; the gradient-free loops build no autograd graph. Every loop records, per iteration,
the residual RMS(T z) (gradient-free) and the reconstruction RMS(D(z) - x), optionally the NMSE to
a known latent, and calls ``callback(i, total)`` (progress, cancel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

Tensor = torch.Tensor
Codec = Callable[[Tensor], Tensor]
Callback = Optional[Callable[[int, int], None]]


@dataclass
class Record:
    residual: list[float] = field(default_factory=list)   # RMS of E(D(z)) - E(x) at each iterate
    recon: list[float] = field(default_factory=list)      # RMS of D(z) - x at each iterate
    nmse_db: list[float] = field(default_factory=list)    # 10 log10 ||z - z_gt||^2 / ||z_gt||^2, if z_gt given


def _rms(t: Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def nmse_db(z: Tensor, z_gt: Tensor) -> float:
    err = float((z.float() - z_gt.float()).pow(2).sum())
    return 10.0 * math.log10(max(err, 1e-30) / max(float(z_gt.float().pow(2).sum()), 1e-30))


def km_condition(alpha: float, lam: float) -> bool:
    """The step-size condition of Theorem 2 (eq. 13)."""
    return 0.0 <= alpha < 1.0 and lam > 0.0 and lam * (1.0 - alpha + 2.0 * alpha * alpha) < (1.0 - alpha) ** 2


def cosine_warmup(k: int, total: int, peak: float, warmup_frac: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup_frac`` of the iterations, then cosine decay to 0."""
    w = max(1, int(round(warmup_frac * total)))
    if k < w:
        return peak * (k + 1) / w
    return 0.5 * peak * (1.0 + math.cos(math.pi * (k - w) / max(1, total - w)))


class _Residual:
    """T(z) = E(D(z)) - E(x), recording the residual and reconstruction errors at each z."""

    def __init__(self, encode: Codec, decode: Codec, x: Tensor, record: Record, z_gt: Optional[Tensor]):
        self.encode, self.decode, self.x, self.record, self.z_gt = encode, decode, x, record, z_gt
        self.e_x = encode(x).float()

    def __call__(self, z: Tensor) -> Tensor:
        d = self.decode(z)
        t = self.encode(d).float() - self.e_x
        self.record.residual.append(_rms(t))
        self.record.recon.append(_rms(d.float() - self.x.float()))
        if self.z_gt is not None:
            self.record.nmse_db.append(nmse_db(z, self.z_gt))
        return t


def _start(encode: Codec, x: Tensor, z0: Optional[Tensor]) -> Tensor:
    return (encode(x) if z0 is None else z0).detach().float().clone()


@torch.no_grad()
def forward_step(encode: Codec, decode: Codec, x: Tensor, z0: Optional[Tensor] = None, iterations: int = 100,
                 rho: float = 0.5, callback: Callback = None, z_gt: Optional[Tensor] = None) -> tuple[Tensor, Record]:
    """Eq. 8 with a constant step: z <- z - rho (E(D(z)) - E(x)), from z = E(x)."""
    rec = Record()
    T = _Residual(encode, decode, x, rec, z_gt)
    z = _start(encode, x, z0)
    for k in range(iterations):
        z = z - rho * T(z)
        if callback is not None:
            callback(k, iterations)
    T(z)  # record the final iterate
    return z, rec


@torch.no_grad()
def inertial_km(encode: Codec, decode: Codec, x: Tensor, z0: Optional[Tensor] = None, iterations: int = 100,
                alpha: float = 0.5, lam: float = 0.2, beta: float = 1.0, callback: Callback = None,
                z_gt: Optional[Tensor] = None) -> tuple[Tensor, Record]:
    """Eq. 10-11 (inertial Krasnosel'skii-Mann): momentum alpha, step 2 lambda beta. Raises when
    (alpha, lambda) violate the step-size condition eq. 13."""
    if not km_condition(alpha, lam):
        bound = (1.0 - alpha) ** 2 / (1.0 - alpha + 2.0 * alpha * alpha) if 0 <= alpha < 1 else float("nan")
        raise ValueError(f"momentum {alpha} and lambda {lam} violate the convergence condition "
                         f"lambda (1 - alpha + 2 alpha^2) < (1 - alpha)^2 (eq. 13): lambda must be below {bound:.4g}")
    rec = Record()
    T = _Residual(encode, decode, x, rec, z_gt)
    z = _start(encode, x, z0)
    z_prev = z
    for k in range(iterations):
        y = z + alpha * (z - z_prev)
        z_prev, z = z, y - 2.0 * lam * beta * T(y)
        if callback is not None:
            callback(k, iterations)
    T(z)
    return z, rec


@torch.no_grad()
def adam_forward_step(encode: Codec, decode: Codec, x: Tensor, z0: Optional[Tensor] = None, iterations: int = 100,
                      rho_max: float = 0.01, warmup_frac: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                      eps: float = 1e-8, callback: Callback = None,
                      z_gt: Optional[Tensor] = None) -> tuple[Tensor, Record]:
    """The authors' experimental variant: Adam's first and second moments applied to g = T(z)
    instead of a gradient, with the warm-up + cosine step schedule (rho_max 0.01)."""
    rec = Record()
    T = _Residual(encode, decode, x, rec, z_gt)
    z = _start(encode, x, z0)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    b1, b2 = betas
    for k in range(iterations):
        g = T(z)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** (k + 1))
        v_hat = v / (1 - b2 ** (k + 1))
        z = z - cosine_warmup(k, iterations, rho_max, warmup_frac) * m_hat / (v_hat.sqrt() + eps)
        if callback is not None:
            callback(k, iterations)
    T(z)
    return z, rec


def gradient_based(encode: Codec, decode: Codec, x: Tensor, z0: Optional[Tensor] = None, iterations: int = 100,
                   lr: float = 0.01, callback: Callback = None, z_gt: Optional[Tensor] = None,
                   grad_context: Callable[[], ContextManager] = torch.enable_grad,
                   track_residual: bool = False) -> tuple[Tensor, Record]:
    """Baseline: Adam (lr 0.01) on ||D(z) - x||^2 with gradients through the decoder, from z = E(x).
    ``track_residual`` also records RMS(E(D(z)) - E(x)) (one more encoder pass per iteration)."""
    rec = Record()
    with torch.no_grad():
        z = _start(encode, x, z0)
        e_x = encode(x).float() if track_residual else None
    with grad_context():
        var = z.clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=lr)
        for k in range(iterations + 1):
            d = decode(var)
            loss = (d.float() - x.float()).pow(2).mean()
            rec.recon.append(float(loss.detach().sqrt()))
            if z_gt is not None:
                rec.nmse_db.append(nmse_db(var.detach(), z_gt))
            if track_residual:
                with torch.no_grad():
                    rec.residual.append(_rms(encode(d.detach()).float() - e_x))
            if k == iterations:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if callback is not None:
                callback(k, iterations)
    return var.detach(), rec


METHODS = {
    "gradient_free_adam": adam_forward_step,
    "gradient_free_fixed_point": forward_step,
    "gradient_free_momentum": inertial_km,
    "gradient_based": gradient_based,
}
