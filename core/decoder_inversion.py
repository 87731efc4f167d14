"""Decoder inversion: the latent z whose decoding D(z) best matches an image x.

Gradient-free methods (Hong et al., "Gradient-free Decoder Inversion in Latent Diffusion Models",
NeurIPS 2024; ../shared/papers/gradient-free-decoder-inversion.txt) solve T(z) = 0 with
T(z) = E(D(z)) - E(x), using only forward passes of the encoder E and decoder D:

- :func:`forward_step`: z^{k+1} = z^k - rho T(z^k)                        (eq. 8, Theorem 1: rho < 2 beta)
- :func:`inertial_km`:   y^k = z^k + alpha (z^k - z^{k-1}); z^{k+1} = y^k - 2 lambda beta T(y^k)
                         (eq. 10-11, Theorem 2, step-size condition eq. 13:
                         lambda (1 - alpha + 2 alpha^2) < (1 - alpha)^2)
- :func:`adam_forward_step`: the authors' experiments (their code, smhongok/dec-inv
  ``decoder_inv_nograd`` with ``adam=True``): Adam moments on g = T(z) with the step schedule of
  :func:`authors_schedule` (linear warm-up, cosine decay over at most 100 iterations, held from 80%
  of them on) and Adam's eps 1e-8 in float32, 1e-4 in 16 bit.

The gradient-based baseline :func:`gradient_based` runs Adam on ||D(z) - x||^2 through the decoder.

E and D are any callables (e.g. a 16-bit model): the iterate stays float32 and is cast by the
callables; the gradient-free loops build no autograd graph. Every loop records, per iteration,
the residual RMS(T z) (gradient-free) and the reconstruction RMS(D(z) - x), optionally the NMSE to
a known latent, and calls ``callback(i, total)`` (progress, cancel).

The family's contract: every method in :data:`METHODS` is ``method(problem, cfg) ->
DecoderInversionResult``, with the image and the codecs in a :class:`Problem` and the settings in one
:class:`DecoderInversionConfig`.
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


def cosine_warmup(k: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup`` iterations, then cosine decay toward 0 at
    ``total`` (the authors' ``get_lr_cosine_with_warmup``; ``warmup`` may be 0)."""
    if k < warmup:
        return peak * (k + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (k - warmup) / (total - warmup)))


SCHEDULE_CAP = 100       # the authors' num_steps_cutoff: warm-up and cosine span at most 100 iterations
SCHEDULE_HOLD = 0.8      # from 80% of those on, the step is held at its last value


def authors_schedule(iterations: int, peak: float, warmup: Optional[int] = None) -> list[float]:
    """The step of each iteration in the authors' code (``decoder_inv_nograd`` with LR_scheduling):
    over n = min(iterations, 100) iterations, a linear warm-up over ``warmup`` = n // 10 of them
    (none below 10 iterations) and a cosine decay that would reach 0 at n; from iteration 0.8 n on,
    the step stays at its last value before 0.8 n (0.128 peak at n = 100), for every remaining
    iteration: a longer run is the 100-iteration schedule followed by a constant step, not a
    stretched schedule."""
    n = min(iterations, SCHEDULE_CAP)
    w = n // 10 if warmup is None else warmup
    steps: list[float] = []
    held = peak
    for i in range(iterations):
        if i < SCHEDULE_HOLD * n:
            held = cosine_warmup(i, n, peak, w)
        steps.append(held)
    return steps


def adam_eps(dtype: torch.dtype) -> float:
    """Adam's eps in the authors' code: 1e-4 when the VAE runs in 16 bit (their half-precision
    branch; also used here for bfloat16, which they do not run), 1e-8 in float32."""
    return 1e-4 if dtype in (torch.float16, torch.bfloat16) else 1e-8


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
    """Eq. 8 with a constant step: z <- z - rho (E(D(z)) - E(x)), from z = E(x).

    The default rho 0.5 is not the 0.01 of the authors' non-Adam branch (``z -= lr * grad`` in
    ``decoder_inv_nograd`` with adam=False): there 0.01 is the one ``lr`` argument the function
    shares with its Adam branch, whose peak step it is, and their experiments all run the Adam branch
    (their scripts pass --adam). Theorem 1 allows any rho < 2 beta; where E(D(z)) is close to z
    (beta about 1) rho 0.5 removes about half the residual per iteration, 0.01 about 1%. Measured on
    TAEF2 (coffee, 80 px, known latent; encoder alone: NMSE -12.1 dB, PSNR 29.6 dB): rho 0.5 gives
    PSNR 40.3 dB at 5 iterations and 41.3 dB at 20, then drifts (NMSE -10.6 dB at 20, +3.0 dB at
    100); rho 0.01 creeps without drift (PSNR 31.0 dB at 20, 35.7 dB and NMSE -13.9 dB at 100). So
    0.5 is for a few iterations (20 or fewer) and small steps for long runs; the node's step_size
    default, 0.01, is the authors' value."""
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
                      rho_max: float = 0.01, warmup: Optional[int] = None, betas: tuple[float, float] = (0.9, 0.999),
                      eps: float = 1e-8, callback: Callback = None,
                      z_gt: Optional[Tensor] = None) -> tuple[Tensor, Record]:
    """The authors' experimental variant, as their code runs it (``decoder_inv_nograd``, adam=True,
    LR_scheduling=True): Adam's first and second moments applied to g = T(z) instead of a gradient,
    z <- z - step_k m_hat / (sqrt(v_hat) + eps), step_k from :func:`authors_schedule` (peak
    ``rho_max`` 0.01, warm-up ``warmup`` = min(iterations, 100) // 10). ``eps``: theirs is 1e-8 in
    float32 and 1e-4 in 16 bit (:func:`adam_eps`). Differences kept: the iterate is float32 whatever
    the codec's precision (their half-precision branch keeps a half iterate), ``z0`` may start it
    elsewhere than E(x), and every iterate's errors are recorded."""
    rec = Record()
    T = _Residual(encode, decode, x, rec, z_gt)
    z = _start(encode, x, z0)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    b1, b2 = betas
    schedule = authors_schedule(iterations, rho_max, warmup)
    for k in range(iterations):
        g = T(z)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g ** 2)
        m_hat = m / (1 - b1 ** (k + 1))
        v_hat = v / (1 - b2 ** (k + 1))
        z = z - schedule[k] * m_hat / (v_hat.sqrt() + eps)
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
            # the gradient with respect to z alone: a decoder whose weights require grad gains no .grad
            (var.grad,) = torch.autograd.grad(loss, var)
            opt.step()
            if callback is not None:
                callback(k, iterations)
    return var.detach(), rec


@dataclass
class Problem:
    """The image ``x`` to invert and the codecs: ``encode``/``decode`` (forward passes only),
    ``decode_differentiable`` the decoder :func:`gradient_based` differentiates (default ``decode``)
    under ``grad_context``; ``z0`` the start (default E(x)), ``callback(i, total)`` after every
    iteration, ``z_gt`` a known latent to record the NMSE to."""

    encode: Codec
    decode: Codec
    x: Tensor
    z0: Optional[Tensor] = None
    decode_differentiable: Optional[Codec] = None
    grad_context: Callable[[], ContextManager] = torch.enable_grad
    callback: Callback = None
    z_gt: Optional[Tensor] = None


@dataclass
class DecoderInversionConfig:
    """``iterations``; ``step_size``, each method's step: the peak step rho_max of
    :func:`adam_forward_step` (the authors' 0.01), rho of :func:`forward_step`, lambda of
    :func:`inertial_km` (the step is 2 lambda), Adam's learning rate in :func:`gradient_based` (0.01);
    ``momentum``: alpha of :func:`inertial_km`; ``adam_eps``: Adam's eps of :func:`adam_forward_step`
    (:func:`adam_eps` of the VAE's dtype)."""

    iterations: int = 100
    step_size: float = 0.01
    momentum: float = 0.3
    adam_eps: float = 1e-8


@dataclass
class DecoderInversionResult:
    """The inverted latent (float32) and the per-iteration record."""

    latent: Tensor
    record: Record


def _adam(p: Problem, cfg: DecoderInversionConfig) -> DecoderInversionResult:
    """The authors' Adam-moment variant (:func:`adam_forward_step`), peak step ``cfg.step_size``."""
    return DecoderInversionResult(*adam_forward_step(p.encode, p.decode, p.x, p.z0, cfg.iterations,
                                                     rho_max=cfg.step_size, eps=cfg.adam_eps, callback=p.callback,
                                                     z_gt=p.z_gt))


def _fixed_point(p: Problem, cfg: DecoderInversionConfig) -> DecoderInversionResult:
    """Eq. 8 (:func:`forward_step`), rho = ``cfg.step_size``."""
    return DecoderInversionResult(*forward_step(p.encode, p.decode, p.x, p.z0, cfg.iterations, rho=cfg.step_size,
                                                callback=p.callback, z_gt=p.z_gt))


def _momentum(p: Problem, cfg: DecoderInversionConfig) -> DecoderInversionResult:
    """Eq. 10-11 (:func:`inertial_km`), alpha = ``cfg.momentum``, lambda = ``cfg.step_size``."""
    return DecoderInversionResult(*inertial_km(p.encode, p.decode, p.x, p.z0, cfg.iterations, alpha=cfg.momentum,
                                               lam=cfg.step_size, callback=p.callback, z_gt=p.z_gt))


def _gradient_based(p: Problem, cfg: DecoderInversionConfig) -> DecoderInversionResult:
    """The gradient-based baseline (:func:`gradient_based`), Adam's learning rate ``cfg.step_size``."""
    return DecoderInversionResult(*gradient_based(p.encode, p.decode_differentiable or p.decode, p.x, p.z0,
                                                  cfg.iterations, lr=cfg.step_size, callback=p.callback, z_gt=p.z_gt,
                                                  grad_context=p.grad_context))


#: the family's registry: method name -> method(problem, cfg) -> DecoderInversionResult (the node's options)
METHODS = {
    "gradient_free_adam": _adam,
    "gradient_free_fixed_point": _fixed_point,
    "gradient_free_momentum": _momentum,
    "gradient_based": _gradient_based,
}
