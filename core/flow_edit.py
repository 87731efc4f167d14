"""Inversion-free flow editing: FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based
Editing Using Pre-Trained Flow Models", Algorithm 1; the authors' code fallenshock/FlowEdit,
FlowEdit_utils.py).

FlowEdit integrates an ODE on the difference of the target and source velocities, each evaluated on
a noised copy of the source, so that the edited latent never passes through pure noise:

    x_src_t = (1 - t) x_src + t n,          n ~ N(0, I), fresh at every step and sample
    x_tar_t = x_src_t + (x_edit - x_src)
    V_delta = mean over n_avg draws of  v(x_tar_t, t, c_tar) - v(x_src_t, t, c_src)
    x_edit <- x_edit + (t_next - t) V_delta                  (starting from x_edit = x_src)

over the last ``n_max`` steps of the grid; the last ``n_min`` of those are plain sampling of the
target from x_edit noised once (x_tar = x_edit + (x_src_t - x_src), then Euler on v(., c_tar)).
``x_tar_t`` is written x_src_t + (x_edit - x_src), not the authors' x_edit + x_src_t - x_src: the
same number, but exactly x_src_t while x_edit is x_src, so an edit whose target prompt is the
source prompt returns the source bit for bit.

Any DDPM/epsilon model is a rectified flow in other coordinates (core/flow.py): at flow time
s = sigma / (1 + sigma) the flow latent is x = z sqrt(1 + sigma^2) / (1 + sigma) and the velocity is
v = eps - x0. :func:`velocity` evaluates a :class:`~.protocols.NoisePredictor`
there, so FlowEdit runs on SD1.x/SDXL as on SD3 and Flux (the paper's derivation holds for any flow).

A mask (1 = edit, 0 = keep; fractional values feather the edge) blends every step with the source
path at the same level, so outside it the result is the source exactly.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .protocols import NoisePredictor, StepCallback
from .schedule import TimestepGrid
from .steps import flow_time, to_flow, velocity  # noqa: F401  (to_flow: this family's API)

Tensor = torch.Tensor


def feather_mask(mask: Tensor, radius: float) -> Tensor:
    """A mask [B, 1, h, w] feathered inward over about ``radius`` latent pixels: the smaller of the
    mask and its Gaussian blur (std radius / 2), so it stays exactly 0 wherever the mask is 0 (the
    source is kept there bit for bit) and ramps up from the edge inside it."""
    if radius <= 0:
        return mask
    std = radius / 2.0
    k = int(math.ceil(3 * std))
    w = torch.exp(-0.5 * (torch.arange(-k, k + 1, dtype=torch.float32, device=mask.device) / std) ** 2)
    w = w / w.sum()
    m = mask.float()
    pad = torch.nn.functional.pad(m, (k, k, k, k), mode="replicate")
    blur = torch.nn.functional.conv2d(pad, w.view(1, 1, 1, -1))
    blur = torch.nn.functional.conv2d(blur, w.view(1, 1, -1, 1))
    return torch.minimum(m, blur)


def _blend(x: Tensor, keep: Tensor, mask: Optional[Tensor]) -> Tensor:
    """x inside the mask, ``keep`` outside (keep + m (x - keep): exactly keep where m is 0)."""
    return x if mask is None else keep + mask * (x - keep)


def flowedit(predictor: NoisePredictor, x_src: Tensor, grid: TimestepGrid, src: Any, tar: Any, uncond: Any = None,
             src_guidance: float = 1.0, tar_guidance: float = 1.0, n_max: Optional[int] = None, n_min: int = 0,
             n_avg: int = 1, generator: Optional[torch.Generator] = None, mask: Optional[Tensor] = None,
             callback: StepCallback = None) -> Tensor:
    """FlowEdit (Algorithm 1) over the sampling ``grid`` (noisy to clean) from the clean source
    latent ``x_src`` [B, ...]: the edited clean latent. ``n_max`` (default: every step) is the
    number of last steps that edit, ``n_min`` of which are plain target sampling; ``n_avg`` noise
    draws per step. Model calls: 2 n_avg per FlowEdit step (each with its CFG batch), 1 per sampling
    step. ``mask`` broadcasts over x_src (1 edits, 0 keeps the source)."""
    T = grid.steps
    n_max = T if n_max is None else int(n_max)
    if not 0 <= n_min <= n_max <= T:
        raise ValueError(f"FlowEdit needs 0 <= n_min <= n_max <= steps ({n_min}, {n_max}, {T})")
    if n_avg < 1:
        raise ValueError("n_avg must be at least 1")
    x_src = x_src.float()
    x_edit = x_src.clone()
    x_tar = noise = None
    for i in range(T):
        t, a, a_next = grid.timesteps[i], grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1]
        s, s_next = flow_time(a), flow_time(a_next)
        if T - i > n_max:
            continue
        if T - i > n_min:  # the FlowEdit ODE on the velocity difference
            delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                n = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(x_src.device)
                xs = (1.0 - s) * x_src + s * n
                xt = xs + (x_edit - x_src)
                delta += (velocity(predictor, xt, t, a, tar, uncond, tar_guidance)
                          - velocity(predictor, xs, t, a, src, uncond, src_guidance)) / n_avg
            x_edit = _blend(x_edit + (s_next - s) * delta, x_src, mask)
            out = x_edit
        else:  # the last n_min steps: sample the target from x_edit noised once
            if x_tar is None:
                noise = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(x_src.device)
                x_tar = x_edit + (((1.0 - s) * x_src + s * noise) - x_src)
            x_tar = x_tar + (s_next - s) * velocity(predictor, x_tar, t, a, tar, uncond, tar_guidance)
            x_tar = _blend(x_tar, (1.0 - s_next) * x_src + s_next * noise, mask)
            out = x_tar
        if callback is not None:
            callback(i, T, out)
    return x_edit if x_tar is None else x_tar


# ------------------------------------------------------------------------------------------------
# RF-Inversion (Rout et al., ICLR 2025, "Semantic Image Inversion and Editing using Rectified
# Stochastic Differential Equations"): controlled ODEs (the authors' diffusers community pipeline
# pipeline_flux_rf_inversion.py; defaults gamma 0.5, eta 0.9 over the first quarter of the steps)


def rf_invert(predictor: NoisePredictor, x0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
              guidance: float = 1.0, gamma: float = 0.5, y1: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None, callback: StepCallback = None,
              return_path: bool = False) -> "Tensor | list[Tensor]":
    """The controlled forward ODE (RF-Inversion eq. 8, Algorithm 1) from the clean latent x0 up the
    grid (clean to noisy): u_hat = v + gamma ((y1 - x) / (1 - s) - v), x <- x + (s_next - s) u_hat,
    where (y1 - x) / (1 - s) is the straight-line velocity toward the noise sample y1 (drawn from
    ``generator`` unless given). v is evaluated as DDIM inversion does (the current latent, the next
    level's timestep), so gamma 0 is DDIM (= Euler) inversion, and gamma 1 lands on the straight line
    (1 - s) x0 + s y1. Returns the latent at the grid's noisiest level (flow coordinates), or with
    ``return_path`` the latent at every level, clean first (what :func:`rf_sample` keeps outside a mask)."""
    ts, ab = grid.timesteps[::-1], grid.alphas_cumprod[::-1]
    x = x0.float()
    if y1 is None:
        y1 = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    path = [x]
    for i in range(1, len(ts)):
        s, s_next = flow_time(ab[i - 1]), flow_time(ab[i])
        v = velocity(predictor, x, ts[i], ab[i - 1], cond, uncond, guidance)
        u = v + gamma * ((y1 - x) / (1.0 - s) - v) if gamma else v
        x = x + (s_next - s) * u
        path.append(x)
        if callback is not None:
            callback(i - 1, grid.steps, x)
    return path if return_path else x


def rf_eta_schedule(steps: int, eta: float, start: int, stop: int) -> list[float]:
    """eta at each sampling step: ``eta`` for start <= i < stop, 0 elsewhere (the pipeline's
    start_timestep/stop_timestep times the steps)."""
    return [eta if start <= i < stop else 0.0 for i in range(steps)]


def rf_sample(predictor: NoisePredictor, x_T: Tensor, grid: TimestepGrid, y0: Tensor, cond: Any, uncond: Any = None,
              guidance: float = 1.0, eta: Any = 0.9, start: int = 0, stop: Optional[int] = None,
              callback: StepCallback = None, mask: Optional[Tensor] = None,
              keep: Optional[list] = None) -> Tensor:
    """The controlled reverse ODE (RF-Inversion eq. 15, Algorithm 2) down the grid from x_T:
    v_hat = v + eta_i ((x - y0) / s - v), x <- x + (s_next - s) v_hat, where (x - y0) / s is the
    straight-line velocity from the reference image latent y0 (its guidance pulls the sample toward
    y0's structure while the target prompt drives v). eta_i is ``eta`` on steps [start, stop)
    (default stop: a quarter of the steps, as the authors' 7 of 28) or a per-step list. eta 0 is
    DDIM (= Euler) sampling; eta 1 on every step returns y0 exactly. With a ``mask`` (1 = edit,
    0 = keep) every step is blended with ``keep`` (the flow latents of every level in sampling order,
    e.g. :func:`rf_invert`'s path reversed), so where the mask is 0 the result is keep[-1] exactly."""
    T = grid.steps
    if mask is not None and (keep is None or len(keep) != T + 1):
        raise ValueError("a mask needs the latents to keep at every level of the grid")
    if isinstance(eta, (int, float)):
        eta = rf_eta_schedule(T, float(eta), start, T // 4 if stop is None else stop)
    x = x_T.float()
    for i in range(T):
        a = grid.alphas_cumprod[i]
        s, s_next = flow_time(a), flow_time(grid.alphas_cumprod[i + 1])
        v = velocity(predictor, x, grid.timesteps[i], a, cond, uncond, guidance)
        if eta[i]:
            v = v + eta[i] * ((x - y0) / s - v)
        x = x + (s_next - s) * v
        if mask is not None:
            x = _blend(x, keep[i + 1].to(x), mask)
        if callback is not None:
            callback(i, T, x)
    return x
