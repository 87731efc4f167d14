"""Second-order flow ODE solvers for inversion and sampling: RF-Solver (Wang et al. 2024, "Taming
Rectified Flow for Inversion and Editing", eq. 8-9; the authors' code wangjiangshan0725/RF-Solver-Edit,
sampling.py ``denoise``) and FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow
for Image Semantic Editing", Algorithm 1; its code, sampling.py ``denoise_fireflow``).

Both integrate the flow ODE dx/ds = v(x, s) (any model is a flow in other coordinates: core/flow.py,
core/steps.py :func:`~.steps.velocity`) between the levels of a grid with the explicit midpoint
rule. One step from flow time s to s' = s + h (h > 0 inverts, h < 0 samples):

    x_mid = x + (h / 2) v_0,     v_mid = v(x_mid, s + h / 2),     x' = x + h v_mid

RF-Solver writes it as a second-order Taylor step, x' = x + h v_0 + (h^2 / 2) (v_mid - v_0) / (h / 2),
which is the same number. Its v_0 is v(x, s): 2 model calls per step. FireFlow takes as v_0 the
previous step's v_mid (a derivative at a nearby point, so still second order) and calls the model
once per step, plus once at the first step: N + 1 calls for N steps.

The midpoint s + h / 2 lies between two grid levels: it is evaluated as a
:class:`~.schedule.Level` carrying its own DDPM sigma (the predictors evaluate the model there).
A model predicts nothing at the clean level (its eps is undefined at sigma 0), so where a step
starts clean (the first step of an inversion) v_0 is evaluated as DDIM inversion evaluates it: the
clean latent at the next level's timestep (core/ddim.py). The steps are otherwise those of the
authors' code, which evaluates Flux at s = 0 directly.

Latents are returned in DDPM coordinates, as every inversion in core/ returns them, so an
:class:`~.result.InversionResult` of method "rf_solver" or "fireflow" plugs into everything that
takes one; :func:`~.inversion.sample_from_inversion` samples it back with the same solver.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .protocols import NoisePredictor, StepCallback
from .result import InversionResult
from .schedule import CLEAN, Level, TimestepGrid
from .steps import flow_time, to_flow, velocity

Tensor = torch.Tensor

#: the solvers and whether v_0 reuses the previous midpoint velocity
SOLVERS = {"rf_solver": False, "fireflow": True}


def calls(method: str, steps: int) -> int:
    """Model calls (each with its CFG batch) of ``steps`` steps: 2 per step for RF-Solver, one per
    step plus one for FireFlow."""
    return 2 * steps if not SOLVERS[method] else steps + 1


def midpoint_level(t: int, t_next: int, s_mid: float) -> tuple[Level, float]:
    """The level at flow time ``s_mid`` between grid timesteps t and t_next: a :class:`Level` on
    the timestep halfway between them (nominal; the predictor evaluates its sigma) and its abar."""
    sigma = s_mid / (1.0 - s_mid)
    nominal = int(round((max(int(t), 0) + max(int(t_next), 0)) / 2))
    return Level(nominal, sigma), 1.0 / (1.0 + sigma * sigma)


def _to_ddpm(x: Tensor, abar: float) -> Tensor:
    """The DDPM latent z = x sqrt(abar) / (1 - s) of flow latent x at level abar."""
    return x * (math.sqrt(abar) / (1.0 - flow_time(abar)))


def midpoint_march(predictor: NoisePredictor, z: Tensor, timesteps: Sequence[int], abars: Sequence[float],
                   cond: Any, uncond: Any = None, guidance: float = 1.0, method: str = "rf_solver",
                   callback: StepCallback = None, total: Optional[int] = None, mask: Optional[Tensor] = None,
                   keep: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """The midpoint rule (module docstring) from DDPM latent ``z`` at level 0 of ``timesteps`` /
    ``abars`` (the levels in the order walked, either direction) to the last level; returns the
    DDPM latent at every level. ``method``: "rf_solver" (v_0 = v(x, s)) or "fireflow" (v_0 = the
    previous step's v_mid). With a ``mask`` (1 = solve, 0 = keep), after every step the region where
    it is 0 is set to ``keep[i]``, the DDPM latent to keep at level i (as DDIM sampling with a mask)."""
    if method not in SOLVERS:
        raise ValueError(f"unknown flow solver {method!r}; choose one of {', '.join(SOLVERS)}")
    reuse = SOLVERS[method]
    total = len(timesteps) - 1 if total is None else total
    x = to_flow(z.float(), abars[0])
    out = [z.float()]
    v_prev = None
    for i in range(len(timesteps) - 1):
        a, a_next = abars[i], abars[i + 1]
        s, s_next = flow_time(a), flow_time(a_next)
        h = s_next - s
        if v_prev is None:
            t0 = timesteps[i + 1] if timesteps[i] == CLEAN else timesteps[i]  # clean: DDIM inversion's convention
            v0 = velocity(predictor, x, t0, a, cond, uncond, guidance)
        else:
            v0 = v_prev
        level, a_mid = midpoint_level(timesteps[i], timesteps[i + 1], s + h / 2.0)
        v_mid = velocity(predictor, x + (h / 2.0) * v0, level, a_mid, cond, uncond, guidance)
        x = x + h * v_mid
        z_next = _to_ddpm(x, a_next)
        if mask is not None:
            z_next = mask * z_next + (1.0 - mask) * keep[i + 1].to(z_next)
            x = to_flow(z_next, a_next)
        out.append(z_next)
        v_prev = v_mid if reuse else None
        if callback is not None:
            callback(i, total, z_next)
    return out


def flow_invert(predictor: NoisePredictor, z0: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                guidance: float = 1.0, method: str = "fireflow", callback: StepCallback = None) -> InversionResult:
    """Inversion with RF-Solver or FireFlow (clean to noisy over ``grid``): the family's result,
    trajectory clean first (as :func:`~.ddim.ddim_invert`), method ``method``."""
    traj = midpoint_march(predictor, z0, grid.timesteps[::-1], grid.alphas_cumprod[::-1], cond, uncond, guidance,
                          method, callback, grid.steps)
    return InversionResult(traj, grid, method, guidance)


def flow_sample(predictor: NoisePredictor, z_T: Tensor, grid: TimestepGrid, cond: Any, uncond: Any = None,
                guidance: float = 1.0, method: str = "fireflow", callback: StepCallback = None, start_step: int = 0,
                mask: Optional[Tensor] = None, keep: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Sampling with RF-Solver or FireFlow (noisy to clean), from ``z_T`` at level ``start_step``;
    the trajectory in sampling order (as :func:`~.ddim.ddim_sample`, whose mask and keep it takes)."""
    if mask is not None and (keep is None or len(keep) != len(grid.timesteps)):
        raise ValueError("a mask needs the latents to keep at every level of the grid")
    return midpoint_march(predictor, z_T, grid.timesteps[start_step:], grid.alphas_cumprod[start_step:], cond, uncond,
                          guidance, method, callback, grid.steps - start_step, mask,
                          None if keep is None else list(keep)[start_step:])
