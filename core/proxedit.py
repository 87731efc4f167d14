"""Proximal guidance for tuning-free real-image editing (ProxEdit: Han et al., WACV 2024;
../shared/papers/proxedit-supplement.txt and NOTES.md).

Guidance with a proximal operator on the guidance direction d = eps_tar - eps_src:

    eps = eps_src + w * prox_lambda(eps_tar - eps_src)          (supplement Alg. 2 line 6, eq. 16)

with hard thresholding (the l0 prox, d * 1[|d| > thr]) or soft thresholding (the l1 prox,
sign(d) max(|d| - thr, 0)); thr is a quantile of |d| over each image of the target branch, or a
fixed value. The edited region M = 1[|d| > thr], dilated by a (2r+1) max-pool, and its complement
drive two guidances that pull the unedited region back to the source for t < T_rec (T_rec = 400 of
Stable Diffusion's 1000 timesteps; here a noise level, abar > :func:`sd_equivalent_abar` (T_rec), so
that it means the same on every model family's grid):

- inversion guidance (main paper): z_{t-1} <- z_{t-1} - eta (1 - M) (z_{t-1} - z*_{t-1}) with the
  stored inversion trajectory z*;
- reconstruction guidance (supplement Alg. 2 lines 9-10): x0 <- x0 - eta (1 - M) (x0 - z_0).

With the source prompt as the "unconditional" branch (negative-prompt inversion) and the threshold
at its maximum, the edit is exactly the inversion's reconstruction (prox returns 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .attention_control import BASE, SOURCE, SOURCE_BASE, TARGET, AttentionController
from .protocols import NoisePredictor, StepCallback
from .result import InversionResult
from .schedule import scaled_linear_alphas_cumprod
from .steps import apply_noise_map, ddim_step, ddpm_posterior, eps_from_x0, predicted_x0

Tensor = torch.Tensor
QUANTILE_MAX_ELEMENTS = 2 ** 24


def prox_hard(d: Tensor, thr: Tensor) -> Tensor:
    """l0 proximal operator (hard thresholding): keep entries with |d| > thr."""
    return d * (d.abs() > thr)


def prox_soft(d: Tensor, thr: Tensor) -> Tensor:
    """l1 proximal operator (soft thresholding): sign(d) max(|d| - thr, 0)."""
    return torch.sign(d) * torch.clamp(d.abs() - thr, min=0.0)


#: the editing family's registry: prox name -> proximal operator; "none" is plain classifier-free guidance
PROX = {"hard": prox_hard, "soft": prox_soft}
PROX_MODES = (*PROX, "none")


def quantile_threshold(d: Tensor, q: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per image, the q-quantile of |d| (float32; above 2^24 elements per image a fixed random
    subsample is used, as torch.quantile requires). Shape [B, 1, ..., 1]."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    flat = d.detach().abs().float().reshape(d.shape[0], -1)
    if flat.shape[1] > QUANTILE_MAX_ELEMENTS:
        idx = torch.randperm(flat.shape[1], generator=generator)[:QUANTILE_MAX_ELEMENTS].to(flat.device)
        flat = flat[:, idx]
    if q >= 1.0:
        thr = flat.max(dim=1).values
    else:
        thr = torch.quantile(flat, q, dim=1)
    return thr.reshape((d.shape[0],) + (1,) * (d.ndim - 1)).to(d.dtype)


def edit_mask(d: Tensor, thr: Tensor, radius: int = 1) -> Tensor:
    """M = 1[|d| > thr], dilated spatially by a (2 radius + 1) max-pool (per channel)."""
    m = (d.abs() > thr).to(d.dtype)
    if radius > 0:
        m = F.max_pool2d(m, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return m


def slerp(alpha: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation per batch element (alpha = 0 gives a, 1 gives b): each image's
    flattened embedding gets its own angle, so batch members never mix. b may have batch 1; a 1-D
    tensor is one element."""
    if a.dim() < 2:
        return slerp(alpha, a[None], b[None])[0]
    fa = a.reshape(a.shape[0], -1).double()
    fb = b.reshape(b.shape[0], -1).double().expand_as(fa)
    cos = torch.clamp((fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1) + 1e-12), -1.0, 1.0)
    omega = torch.arccos(cos)[:, None]
    s = torch.sin(omega)
    small = omega < 1e-6
    safe_s = torch.where(small, torch.ones_like(s), s)
    curved = torch.sin((1 - alpha) * omega) / safe_s * fa + torch.sin(alpha * omega) / safe_s * fb
    out = torch.where(small, (1 - alpha) * fa + alpha * fb, curved)
    return out.reshape(a.shape).to(a.dtype)


def sd_equivalent_abar(t_rec: int) -> float:
    """The noise level (abar) of "timestep t_rec" on Stable Diffusion 1.5's 1000-level scaled-linear
    table, the table the paper's T_rec = 400 counts on: guidance applies at the levels with
    abar > this. It is the level halfway between timesteps t_rec - 1 and t_rec, so every SD-table
    timestep compares as ``t < t_rec`` did (with ComfyUI's float32 sigmas too), while any other grid
    (SD3's and Flux's flow times, whose abar is (1 - s)^2 / ((1 - s)^2 + s^2)) is compared by noise
    level: 400 -> abar 0.425, flow time s 0.538. t_rec <= 0 gives 1 (never guided), >= 1000 gives 0
    (always guided)."""
    table = scaled_linear_alphas_cumprod()
    t = int(round(float(t_rec)))
    if t <= 0:
        return 1.0
    if t >= len(table):
        return 0.0
    return 0.5 * (float(table[t - 1]) + float(table[t]))


REC_ABAR_DEFAULT = sd_equivalent_abar(400)  # the paper's T_rec = 400: abar 0.425


@dataclass
class ProxConfig:
    """guidance w; prox "hard"/"soft"/"none" (plain CFG); threshold as a quantile (``quantile``) of
    |d| or a fixed value (``fixed_threshold`` when not None); mask dilation radius; inversion and
    reconstruction guidance step sizes (0 = off) applied at the steps whose level is less noisy than
    ``rec_abar`` (abar_t > rec_abar; :func:`sd_equivalent_abar` converts SD's timestep T_rec, and 0
    guides every step, 1 none). A noise level, not a table index: a model's timestep counts on its
    own table (Flux: 10,000 levels), so "t < 400" meant a different level on every family."""

    guidance: float = 7.5
    prox: str = "hard"
    quantile: float = 0.7
    fixed_threshold: Optional[float] = None
    dilation: int = 1
    inversion_guidance: float = 0.0
    reconstruction_guidance: float = 0.0
    rec_abar: float = REC_ABAR_DEFAULT


def proximal_eps(e_src: Tensor, e_tar: Tensor, cfg: ProxConfig) -> tuple[Tensor, Tensor]:
    """eps = e_src + w prox(e_tar - e_src) and the dilated edit mask M (1 = edited)."""
    d = e_tar - e_src
    if cfg.prox == "none":
        return e_src + cfg.guidance * d, torch.ones_like(d)
    if cfg.prox not in PROX:
        raise ValueError(f"prox must be hard, soft or none, got {cfg.prox!r}")
    thr = (torch.full((d.shape[0],) + (1,) * (d.ndim - 1), float(cfg.fixed_threshold), dtype=d.dtype, device=d.device)
           if cfg.fixed_threshold is not None else quantile_threshold(d, cfg.quantile))
    return e_src + cfg.guidance * PROX[cfg.prox](d, thr), edit_mask(d, thr, cfg.dilation)


def _same_handle(a: Any, b: Any) -> bool:
    """Whether two conditioning handles name the same prompt: the same object, or equal names."""
    return a is b or (isinstance(a, str) and isinstance(b, str) and a == b)


def edit_predict(predictor: NoisePredictor, z: Tensor, z_src: Tensor, t: int, base: Any, tar: Any,
                 control: Optional[AttentionController] = None, source: Any = None,
                 step: int = 0) -> tuple[Tensor, Tensor]:
    """(eps_base, eps_tar) at the edited latent ``z``, with the attention control's source branch
    (prompt ``source`` on the stored inversion latent ``z_src``) evaluated first when the step needs
    it: one predictor call [base, tar], plus one [source (, base)] call under attention control.
    When the base branch is the source prompt itself (Prox-NPI) and MasaCtrl edits the base branch,
    [source, base] would be the same prompt on the same latent twice: the capture evaluates it once
    and its keys/values serve both branches."""
    if control is None:
        e = predictor(z, t, [base, tar])
        return e[0], e[1]
    control.begin_step(step)
    try:
        if control.active():
            conds, roles, shared = [source], [SOURCE], False
            if control.needs_source_base():
                shared = _same_handle(base, source)
                if not shared:
                    conds.append(base)
                    roles.append(SOURCE_BASE)
            control.capture(roles, base_is_source=shared)
            predictor(z_src, t, conds)
        control.inject([BASE, TARGET])
        e = predictor(z, t, [base, tar])
    finally:
        control.off()
    return e[0], e[1]


def edit_step(predictor: NoisePredictor, result: InversionResult, z: Tensor, i: int, src: Any, tar: Any,
              cfg: ProxConfig, control: Optional[AttentionController] = None, source: Any = None,
              noise: Optional[Tensor] = None) -> Tensor:
    """One edit step from level ``grid.timesteps[i]`` to the next (supplement Alg. 2 lines 4-12):
    proximal eps, reconstruction guidance on x0, the DDIM step (or, with ``noise``, the DDPM
    posterior step of eq. 16 with that noise map), inversion guidance toward the stored trajectory,
    and LocalBlend when ``control`` asks for it. Returns z_{t-1}."""
    grid = result.grid
    ab_t, ab_s, t = grid.alphas_cumprod[i], grid.alphas_cumprod[i + 1], grid.timesteps[i]
    keep = result.trajectory[::-1]  # sampling order
    source = src if source is None else source
    e_src, e_tar = edit_predict(predictor, z, keep[i].to(z), t, src, tar, control, source, i)
    eps, m = proximal_eps(e_src.float(), e_tar.float(), cfg)
    unedited = 1.0 - m
    guided = ab_t > cfg.rec_abar
    if cfg.reconstruction_guidance > 0 and guided:
        x0 = predicted_x0(z, eps, ab_t)
        x0 = x0 - cfg.reconstruction_guidance * unedited * (x0 - result.z0.to(x0))
        # Alg. 2 line 12 keeps eps and moves x0: z_{t-1} = sqrt(a') x0 + sqrt(1 - a') eps
        z_next = math.sqrt(ab_s) * x0 + math.sqrt(1.0 - ab_s) * eps
        eps_ddpm = eps_from_x0(z, x0, ab_t)
    else:
        z_next, eps_ddpm = ddim_step(z, eps, ab_t, ab_s), eps
    if noise is not None:
        mean, sigma = ddpm_posterior(z, eps_ddpm, ab_t, ab_s)
        z_next = apply_noise_map(mean, sigma, noise)
    if cfg.inversion_guidance > 0 and guided:
        z_next = z_next - cfg.inversion_guidance * unedited * (z_next - keep[i + 1].to(z))
    if control is not None:
        z_next = control.blend_latent(z_next, keep[i + 1].to(z))
    return z_next


def ddim_x0_for(z: Tensor, z_next: Tensor, abar_t: float, abar_s: float) -> Tensor:
    """The x0 whose DDIM step from z (level abar_t) lands on z_next (level abar_s > abar_t):
    z_next = sqrt(a_s) x0 + sqrt(1 - a_s) (z - sqrt(a_t) x0) / sqrt(1 - a_t), solved for x0.
    This is how a GUIDER hands any edit step to a deterministic (DDIM/Euler) sampler."""
    r = math.sqrt(1.0 - abar_s) / math.sqrt(1.0 - abar_t)
    return (z_next - r * z) / (math.sqrt(abar_s) - r * math.sqrt(abar_t))


def prox_edit(predictor: NoisePredictor, result: InversionResult, src: Any, tar: Any, cfg: ProxConfig,
              start_step: int = 0, callback: StepCallback = None,
              per_step_src: Optional[Sequence[Any]] = None,
              control: Optional[AttentionController] = None, source: Any = None) -> list[Tensor]:
    """Edit from an inversion with proximal guidance (supplement Alg. 2, with inversion guidance):
    :func:`edit_step` from ``start_step`` to the end.

    ``src`` is the branch the guidance starts from: the source prompt for negative-prompt inversion
    (Prox-NPI), the null/negative prompt otherwise (``per_step_src`` gives null-text inversion's
    per-step embeddings). Both branches go through the predictor in one call per step. DDPM
    inversions sample with their stored noise maps (eq. 16).

    ``control`` adds prompt-to-prompt / MasaCtrl attention control (supplement D): the source
    branch (prompt ``source``, default ``src``) runs on the stored inversion latent of each step
    (one more predictor call on the steps that need it) and LocalBlend pulls the latent outside
    the edited words back to the stored trajectory. Returns the sampling trajectory.
    """
    grid = result.grid
    z = result.trajectory[::-1][start_step].float()
    traj = [z]
    total = grid.steps - start_step
    maps = result.extras.get("noise_maps") if result.method == "ddpm" else None
    for i in range(start_step, grid.steps):
        s = per_step_src[i] if per_step_src is not None else src
        z = edit_step(predictor, result, z, i, s, tar, cfg, control, source, maps[i] if maps is not None else None)
        traj.append(z)
        if callback is not None:
            callback(i - start_step, total, z)
    return traj
