"""Flow matching as DDPM in other coordinates (the mapping every flow model goes through).

A rectified-flow latent at flow time s in [0, 1] is x = (1 - s) x0 + s eps and the model predicts
the velocity v = eps - x0 (SD3, Flux; ComfyUI's CONST prediction, whose "sigma" is s). Dividing by
(1 - s) gives x / (1 - s) = x0 + sigma eps with

    sigma = s / (1 - s),    abar = 1 / (1 + sigma^2),    z = x sqrt(abar) / (1 - s),

and z = sqrt(abar) x0 + sqrt(1 - abar) eps is a DDPM latent. Tweedie's x0 is x - s v (ComfyUI's
denoised) and eps = x + (1 - s) v = (x - (1 - s) x0) / s. A DDIM step between two levels in these
coordinates is exactly an Euler step of dx/ds = v (tests/test_flow.py checks each identity against
ComfyUI's own model_sampling), so core/ keeps one set of solvers for both families.

:class:`Coords` also covers the discrete-time (k-diffusion) case, where ComfyUI's sigma is the
DDPM sigma and x = z sqrt(1 + sigma^2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import level_sigma

Tensor = torch.Tensor


@dataclass(frozen=True)
class Coords:
    """A model family's latent x at its own noise level <-> the DDPM latent z at
    sigma = sqrt((1 - abar) / abar). ``flow``: rectified flow (level = flow time s); otherwise
    k-diffusion (level = sigma)."""

    flow: bool

    def level(self, sigma: float) -> float:
        """The model's own level (ComfyUI's sigma) of DDPM level ``sigma`` (0 stays 0)."""
        return sigma / (1.0 + sigma) if self.flow else sigma

    def ddpm_sigma(self, level: float) -> float:
        return level / (1.0 - level) if self.flow else level

    def x_scale(self, sigma: float) -> float:
        """x = z * x_scale(sigma): sqrt(1 + sigma^2), divided by 1 + sigma = 1 / (1 - s) for a flow."""
        scale = math.sqrt(1.0 + sigma * sigma)
        return scale / (1.0 + sigma) if self.flow else scale

    def eps(self, x: Tensor, x0: Tensor, sigma: float) -> Tensor:
        """The DDPM noise of latent x given Tweedie's x0 at DDPM level ``sigma``:
        (x - (1 - s) x0) / s for a flow, (x - x0) / sigma otherwise."""
        if self.flow:
            s = sigma / (1.0 + sigma)
            return (x - (1.0 - s) * x0) / s
        return (x - x0) / sigma


class FlowPredictor:
    """A :class:`~.protocols.NoisePredictor` (DDPM coordinates) over a flow model given as its
    Tweedie denoiser ``denoise(x, s, cond) -> x0`` (x0 = x - s v), on the DDPM sigma table
    ``sigmas`` (one per integer timestep; a :class:`~.schedule.Level` carries its own sigma)."""

    def __init__(self, denoise, sigmas: Tensor):
        self.denoise, self.sigmas = denoise, sigmas.double()
        self.coords = Coords(flow=True)
        self.calls = 0

    def __call__(self, z: Tensor, t: int, conds) -> Tensor:
        self.calls += 1
        sigma = level_sigma(t, self.sigmas)
        x = z * self.coords.x_scale(sigma)
        s = self.coords.level(sigma)
        return torch.stack([self.coords.eps(x, self.denoise(x, s, c), sigma) for c in conds])


def discrete_flow_sigmas(shift: float = 3.0, T: int = 1000, max_s: float = 0.99) -> Tensor:
    """SD3's discrete-flow levels (ComfyUI's ModelSamplingDiscreteFlow: s = shift u / (1 + (shift - 1) u),
    u = t / T for t = 1..T) up to s <= ``max_s`` (as the glue caps them), as DDPM sigmas s / (1 - s),
    float64: the schedule of the analytic flow references."""
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    s = shift * u / (1 + (shift - 1) * u)
    s = s[s <= max_s]
    return s / (1 - s)


def gaussian_flow_denoiser(mean: Tensor, std: float):
    """The exact Tweedie denoiser of the flow x = (1 - s) x0 + s eps with x0 ~ N(mean, std^2 I),
    derived in flow coordinates: E[x0 | x] = mean + std^2 (1 - s) (x - (1 - s) mean) /
    ((1 - s)^2 std^2 + s^2). ``mean`` is looked up by the conditioning handle when a dict; a
    handle that is itself a tensor is the mean (a differentiable "prompt", as P2L tunes)."""

    def denoise(x: Tensor, s: float, cond) -> Tensor:
        m = cond if isinstance(cond, Tensor) else (mean[cond] if isinstance(mean, dict) else mean)
        m = m.to(x)
        var = (1.0 - s) ** 2 * std ** 2 + s ** 2
        return m + std ** 2 * (1.0 - s) * (x - (1.0 - s) * m) / var

    return denoise
