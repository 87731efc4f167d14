"""Deterministic DDIM sampling and DDIM inversion (Song et al. 2021, "Denoising Diffusion
Implicit Models"), written as in the RNRI paper (Hong et al., ../shared/papers/rnri-...txt): the
loops of RNRI eq. (2) (sampling) and eq. (4) (inversion) over a timestep grid, both made of
core/steps.py's :func:`~.steps.ddim_step`. Eq. (4) evaluates the model at the *target* timestep t
with the *source* latent z_{t-1}, exactly as diffusers' DDIMInverseScheduler and the null-text
inversion code do.

Latents are float32 whatever the model's dtype; coefficients are computed in float64.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .protocols import NoisePredictor, StepCallback
from .result import InversionResult
from .schedule import TimestepGrid
from .steps import ddim_step, guided_eps

Tensor = torch.Tensor


def ddim_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any,
                uncond: Any = None, guidance: float = 1.0, callback: StepCallback = None) -> InversionResult:
    """DDIM inversion, RNRI eq. (4) applied for every step of ``grid`` from clean to noisy.

    Returns the family's result (method "ddim"), whose trajectory is in inversion order:
    ``[z0, z_{t_1}, ..., z_{t_N}]`` where ``t_1 < ... < t_N`` are ``grid.timesteps`` reversed (the
    clean level first).
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
    return InversionResult(traj, grid, "ddim", guidance)


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


