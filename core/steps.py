"""The step maths every family shares: one DDIM/DDPM step between two noise levels, Tweedie's x0,
classifier-free guidance and stored DDPM noise maps (Song et al. 2021, "Denoising Diffusion Implicit
Models", eq. 12 and 16; written as in the RNRI paper, Hong et al., ../shared/papers/rnri-...txt):

- sampling, RNRI eq. (2):  z_{t-1} = sqrt(a_{t-1}/a_t) z_t - sqrt(a_{t-1}) dpsi(a_t) eps(z_t, t)
- inversion, RNRI eq. (4): z_t ~= sqrt(a_t/a_{t-1}) z_{t-1} + sqrt(a_t) dpsi(a_t) eps(z_{t-1}, t)

with psi(a) = sqrt(1/a - 1) and dpsi(a_t) = psi(a_t) - psi(a_{t-1}). Both are the same map between
two noise levels for a given eps (:func:`ddim_step`); they differ only in where eps is evaluated.

Any model is also a rectified flow in other coordinates (core/flow.py): :func:`flow_time`,
:func:`to_flow` and :func:`velocity` give its flow time, flow latent and velocity v = eps - x0, which
FlowEdit, RF-Inversion (core/flow_edit.py), RF-Solver and FireFlow (core/flow_solvers.py) step with.

The inversion (core/inversion.py, core/ddim.py), editing (core/proxedit.py) and restoration
(core/restoration.py) families import these; none of them imports another family. Coefficients are
computed in float64 (Python floats).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .protocols import NoisePredictor

Tensor = torch.Tensor


def predicted_x0(z_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """Tweedie's estimate of the clean latent: x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    (DDIM eq. 12, "predicted x0"; the posterior mean E[z_0 | z_t] for the MMSE eps)."""
    return (z_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)


def eps_from_x0(z_t: Tensor, x0: Tensor, abar_t: float) -> Tensor:
    """Invert :func:`predicted_x0` (DDIM eq. 12 solved for eps): eps = (z_t - sqrt(a_t) x0) / sqrt(1 - a_t)."""
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


def ddpm_posterior(z: Tensor, eps: Tensor, a_t: float, a_s: float, eta: float = 1.0) -> tuple[Tensor, float]:
    """Mean and std of the DDIM/DDPM step from level t to the less noisy level s (DDIM eq. 12, 16):
    sigma = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s); mean = sqrt(a_s) x0 + sqrt(1 - a_s - sigma^2) eps."""
    sigma = eta * math.sqrt(max(1.0 - a_s, 0.0) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_s, 0.0))
    x0 = predicted_x0(z, eps, a_t)
    mean = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma * sigma, 0.0)) * eps
    return mean, sigma


def ddpm_posterior_mean(z: Tensor, x0: Tensor, a_t: float, a_s: float) -> Tensor:
    """The mean of the DDPM posterior q(z_s | z_t, x0) from level t to the less noisy level s (DDPM
    eq. 7, over a strided grid with alpha = a_t / a_s):
    sqrt(alpha) (1 - a_s) / (1 - a_t) z_t + sqrt(a_s) (1 - alpha) / (1 - a_t) x0."""
    alpha = a_t / a_s
    return (math.sqrt(alpha) * (1.0 - a_s) / (1.0 - a_t)) * z + (math.sqrt(a_s) * (1.0 - alpha) / (1.0 - a_t)) * x0


def f64(t: Tensor) -> Tensor:
    """t in float64 (on the CPU where the device has no float64, e.g. MPS)."""
    return t.cpu().double() if t.device.type == "mps" else t.double()


def apply_noise_map(mean: Tensor, sigma: float, noise_map: Tensor) -> Tensor:
    """x_s = mu_t + sigma_t z_t with a stored noise map (z_t itself where sigma_t = 0; edit-friendly
    DDPM sampling, Huberman-Spiegelglas et al. 2024 eq. 3), in float64 and back to the mean's dtype,
    so that a map from core/inversion.py's ``ddpm_invert`` gives back its level exactly."""
    m = f64(mean)
    x = m + (sigma if sigma > 0 else 1.0) * noise_map.to(m.device, torch.float64)
    return x.to(mean.device, mean.dtype)


# ------------------------------------------------------------------------------------------------
# the rectified-flow view of any model (core/flow.py): flow time, flow latent and velocity

def flow_time(abar: float) -> float:
    """The flow time s of DDPM level abar: sigma / (1 + sigma) with sigma = sqrt((1 - abar) / abar)
    (core/flow.py's Coords; abar 1 is s 0)."""
    sigma = math.sqrt(max(1.0 - abar, 0.0) / abar)
    return sigma / (1.0 + sigma)


def velocity(predictor: NoisePredictor, x: Tensor, t: int, abar: float, cond: Any, uncond: Any = None,
             guidance: float = 1.0) -> Tensor:
    """The rectified-flow velocity v = eps - x0 at flow latent ``x`` of level abar (flow time s):
    z = x sqrt(abar) / (1 - s) is the DDPM latent, eps its (classifier-free guided) noise and x0
    Tweedie's estimate (DDIM eq. 12); float32."""
    s = flow_time(abar)
    z = x * (math.sqrt(abar) / (1.0 - s))
    eps = guided_eps(predictor, z, t, cond, uncond, guidance).float()
    return eps - predicted_x0(z, eps, abar)


def to_flow(z: Tensor, abar: float) -> Tensor:
    """The flow latent x of a DDPM latent z at level abar: x = z (1 - s) / sqrt(abar)."""
    return z * ((1.0 - flow_time(abar)) / math.sqrt(abar))
