"""The DDPM noise schedule and the timestep grids samplers walk.

Notation follows DDPM (Ho et al. 2020) and DDIM (Song et al. 2021): ``abar_t`` is the
cumulative product of ``1 - beta_s`` for s <= t (``alphas_cumprod``; the RNRI paper writes
it alpha_t). ComfyUI's k-diffusion "sigma" is ``sigma_t = sqrt((1 - abar_t) / abar_t)``,
so ``abar_t = 1 / (1 + sigma_t^2)`` and a ComfyUI latent ``x`` equals ``z_t * sqrt(1 + sigma_t^2)``.

All schedule arithmetic is done in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor

#: the level index used for the clean image (sigma = 0) at the end of a sampling grid
CLEAN = -1

SPACINGS = ("leading", "trailing", "linspace", "lcm")


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled_linear" schedule: betas linear in sqrt space (LDM, Rombach et al. 2022)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                          beta_end: float = 2e-2) -> Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020, sec. 4)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_sigmas(sigmas: Tensor) -> Tensor:
    """Map k-diffusion sigmas to ``abar = 1 / (1 + sigma^2)``."""
    sigmas = sigmas.to(torch.float64)
    return 1.0 / (1.0 + sigmas * sigmas)


def timestep_spacing(steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                     steps_offset: int = 0, original_steps: int = 50) -> list[int]:
    """Model timesteps of an N-step sampler, in sampling (descending) order.

    - ``leading``: ``k * (T // N) + offset`` (DDIM paper, diffusers' default for SD with offset 1);
    - ``trailing``: ``round(T - k * T / N) - 1`` (Lin et al. 2024, "Common diffusion noise schedules
      and sample steps are flawed", table 2), used by Turbo and zero-SNR models;
    - ``linspace``: ``round(linspace(0, T - 1, N))``;
    - ``lcm``: the latent-consistency grid: the ``original_steps`` skipping-step timesteps
      ``(k + 1) * T // original_steps - 1`` (Luo et al. 2023, sec. 4.3), of which N are taken evenly.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    T = num_train_timesteps
    if spacing == "leading":
        if steps > T:
            raise ValueError(f"steps ({steps}) cannot exceed the {T} training timesteps")
        ratio = T // steps
        ts = [k * ratio + steps_offset for k in range(steps)]
    elif spacing == "trailing":
        ts = [int(round(T - k * T / steps)) - 1 for k in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [int(round(v)) for v in torch.linspace(0, T - 1, steps, dtype=torch.float64).tolist()]
    elif spacing == "lcm":
        if steps > original_steps:
            raise ValueError(f"an LCM grid has at most {original_steps} steps, got {steps}")
        c = T // original_steps
        origin = [(k + 1) * c - 1 for k in range(original_steps)][::-1]
        idx = [int(math.floor(k * original_steps / steps)) for k in range(steps)]
        return [origin[i] for i in idx]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    ts = sorted(set(min(max(t, 0), T - 1) for t in ts), reverse=True)
    if len(ts) != steps:
        raise ValueError(f"{steps} steps do not fit {T} timesteps with {spacing!r} spacing")
    return ts


class Level(int):
    """A model timestep ``t`` (an int, as the :class:`~.protocols.NoisePredictor` protocol takes it;
    arithmetic on it gives plain ints) that carries the exact DDPM ``sigma`` the model is to be
    evaluated at. Predictors evaluate a Level at its ``sigma`` (:func:`level_abar`), whatever their
    own table holds at index ``t``; so a solver can call the model between two grid levels (the
    midpoint of RF-Solver and FireFlow, core/flow_solvers.py) and a grid can carry levels that are
    on no table (a SIGMAS input; the ComfyUI glue's grids are made of Levels)."""

    sigma: float

    def __new__(cls, t: int, sigma: float):
        level = super().__new__(cls, int(t))
        level.sigma = float(sigma)
        return level

    def __reduce__(self):
        return Level, (int(self), self.sigma)


def level_sigma(t, sigma_table) -> float:
    """The DDPM sigma a predictor evaluates timestep ``t`` at: a :class:`Level`'s own, else (a plain
    int) ``sigma_table[t]``."""
    sigma = getattr(t, "sigma", None)
    return float(sigma) if sigma is not None else float(sigma_table[int(t)])


def level_abar(t, alphas_cumprod) -> float:
    """The abar a predictor evaluates timestep ``t`` at: 1 / (1 + sigma^2) for a :class:`Level`,
    else ``alphas_cumprod[t]``."""
    return 1.0 / (1.0 + t.sigma ** 2) if isinstance(t, Level) else float(alphas_cumprod[int(t)])


@dataclass(frozen=True)
class TimestepGrid:
    """The levels a deterministic sampler visits, in sampling order.

    ``timesteps[i]`` is the model timestep of level i and ``alphas_cumprod[i]`` its abar. The
    last level is the clean latent: timestep :data:`CLEAN` and abar ``final_alpha_cumprod``
    (1.0, i.e. sigma = 0, as ComfyUI's samplers end; diffusers' ``set_alpha_to_one=False``
    uses abar_0 instead). Inversion walks the same levels backwards.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]

    def __post_init__(self):
        if len(self.timesteps) != len(self.alphas_cumprod) or len(self.timesteps) < 2:
            raise ValueError("a grid needs at least two levels with one abar each")
        a = self.alphas_cumprod
        if any(not (0.0 < v <= 1.0) for v in a):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if any(a[i] > a[i + 1] for i in range(len(a) - 1)):
            raise ValueError("a sampling grid must go from noisy to clean (abar non-decreasing)")

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    @classmethod
    def from_schedule(cls, alphas_cumprod: Tensor, timesteps: Sequence[int],
                      final_alpha_cumprod: float = 1.0) -> "TimestepGrid":
        """Grid of the given model timesteps (descending) under a DDPM schedule, ending clean."""
        ac = alphas_cumprod.to(torch.float64)
        ts = [int(t) for t in timesteps]
        return cls(tuple(ts) + (CLEAN,), tuple(float(ac[t]) for t in ts) + (float(final_alpha_cumprod),))

    def sigmas(self) -> Tensor:
        """The grid as k-diffusion sigmas (float64), ending with 0 for an abar of 1."""
        a = torch.tensor(self.alphas_cumprod, dtype=torch.float64)
        return ((1.0 - a) / a).sqrt()
