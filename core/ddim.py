"""Deterministic DDIM sampling and DDIM inversion (Song et al. 2021, "Denoising Diffusion
Implicit Models"), written as in the RNRI paper (Hong et al., ../shared/papers/rnri-...txt):

- sampling, RNRI eq. (2):  z_{t-1} = sqrt(a_{t-1}/a_t) z_t - sqrt(a_{t-1}) dpsi(a_t) eps(z_t, t)
- inversion, RNRI eq. (4): z_t ~= sqrt(a_t/a_{t-1}) z_{t-1} + sqrt(a_t) dpsi(a_t) eps(z_{t-1}, t)

with psi(a) = sqrt(1/a - 1) and dpsi(a_t) = psi(a_t) - psi(a_{t-1}). Both are the same map
between two noise levels for a given eps (:func:`ddim_step`); they differ only in where eps is
evaluated. Eq. (4) evaluates the model at the *target* timestep t with the *source* latent
z_{t-1}, exactly as diffusers' DDIMInverseScheduler and the null-text inversion code do.

Latents are float32 whatever the model's dtype; coefficients are computed in float64.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .protocols import NoisePredictor, StepCallback
from .schedule import TimestepGrid

Tensor = torch.Tensor


def predicted_x0(z_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """Tweedie's estimate of the clean latent: x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    (DDIM eq. 12, "predicted x0"; the posterior mean E[z_0 | z_t] for the MMSE eps)."""
    return (z_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)


def eps_from_x0(z_t: Tensor, x0: Tensor, abar_t: float) -> Tensor:
    """Invert :func:`predicted_x0`: eps = (z_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
    return (z_t - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)


def ddim_step(z: Tensor, eps: Tensor, abar_from: float, abar_to: float) -> Tensor:
    """Move ``z`` from level ``abar_from`` to ``abar_to`` along eps (DDIM eq. 12 with eta = 0;
    RNRI eq. 2 downwards, eq. 4 upwards):

        z_to = sqrt(a_to / a_from) z + sqrt(a_to) (psi(a_to) - psi(a_from)) eps
             = sqrt(a_to) x0(z, eps) + sqrt(1 - a_to) eps.
    """
    def psi(a: float) -> float:
        return math.sqrt(1.0 / a - 1.0)

    scale = math.sqrt(abar_to / abar_from)
    coef = math.sqrt(abar_to) * (psi(abar_to) - psi(abar_from))
    return scale * z + coef * eps


def guided_eps(predictor: NoisePredictor, z: Tensor, t: int, cond: Any, uncond: Any = None,
               guidance: float = 1.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u).

    Both branches go to the predictor in one call; with ``w == 1`` or no ``uncond`` only the
    conditional branch is evaluated.
    """
    if uncond is None or guidance == 1.0:
        return predictor(z, t, [cond])[0]
    e_c, e_u = predictor(z, t, [cond, uncond])
    return e_u + guidance * (e_c - e_u)


def ddim_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any,
                uncond: Any = None, guidance: float = 1.0, callback: StepCallback = None) -> list[Tensor]:
    """DDIM inversion, RNRI eq. (4) applied for every step of ``grid`` from clean to noisy.

    Returns the trajectory in inversion order: ``[z0, z_{t_1}, ..., z_{t_N}]`` where
    ``t_1 < ... < t_N`` are ``grid.timesteps`` reversed (the clean level first).
    """
    ts = grid.timesteps[::-1]
    ab = grid.alphas_cumprod[::-1]
    z = z0.float()
    traj = [z]
    for i in range(1, len(ts)):
        eps = guided_eps(predictor, z, ts[i], cond, uncond, guidance)
        z = ddim_step(z, eps.float(), ab[i - 1], ab[i])
        traj.append(z)
        if callback is not None:
            callback(i - 1, grid.steps, z)
    return traj


def ddim_sample(predictor: NoisePredictor, z_T: Tensor, grid: TimestepGrid, cond: Any,
                uncond: Any = None, guidance: float = 1.0, callback: StepCallback = None,
                start_step: int = 0, mask: Optional[Tensor] = None,
                keep: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Deterministic DDIM sampling, RNRI eq. (2) for every step of ``grid`` (noisy to clean).

    ``start_step`` skips the first levels (``z_T`` is then the latent at level ``start_step``).
    With a ``mask`` (1 = regenerate, broadcastable to the latent) and ``keep`` (the latents of
    every level in sampling order, e.g. an inversion trajectory reversed), the region where the
    mask is 0 is replaced after every step by the kept latent of that level, as in
    blended/known-region sampling. ``uncond`` may be a list with one handle per step (null-text
    inversion's per-step embeddings). Returns the trajectory in sampling order, ending clean.
    """
    if mask is not None and (keep is None or len(keep) != len(grid.timesteps)):
        raise ValueError("a mask needs the latents to keep at every level of the grid")
    ts, ab = grid.timesteps, grid.alphas_cumprod
    z = z_T.float()
    traj = [z]
    total = grid.steps - start_step
    for i in range(start_step, grid.steps):
        u = uncond[i] if isinstance(uncond, list) else uncond
        eps = guided_eps(predictor, z, ts[i], cond, u, guidance)
        z = ddim_step(z, eps.float(), ab[i], ab[i + 1])
        if mask is not None:
            z = mask * z + (1.0 - mask) * keep[i + 1].to(z)
        traj.append(z)
        if callback is not None:
            callback(i - start_step, total, z)
    return traj


def reconstruction_rmse(a: Tensor, b: Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))


