"""Schedules: a ComfyUI MODEL's sampling table as core/'s TimestepGrid, SIGMAS in both directions,
and the latent conventions (DDPM latent z vs ComfyUI's x; flow models through core.flow.Coords).
See the package docstring for the sigma-space and flow-coordinate derivations."""

from __future__ import annotations

import math
from typing import Any

import torch

import comfy.model_sampling

from ...core import schedule as core_schedule
from ...core.flow import Coords
from ...core.schedule import TimestepGrid, level_sigma  # noqa: F401  (re-exported for the glue)
from .errors import InverseInputError, PureNoiseStartError

Tensor = torch.Tensor


def model_sampling_of(model) -> Any:
    return model.get_model_object("model_sampling")


FLOW_MAX_S = 0.99  # the highest flow time a grid uses: sigma = s / (1 - s) = 99, abar ~ 1e-4


def is_flow_model(model) -> bool:
    """A flow-matching model: ComfyUI's CONST prediction over a discrete-flow (SD3/SD3.5, AuraFlow,
    HiDream, ...) or Flux-style schedule."""
    ms = model_sampling_of(model)
    return isinstance(ms, comfy.model_sampling.CONST) and isinstance(
        ms, (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.ModelSamplingFlux))


def guidance_embedded(model) -> bool:
    """A model that reads its guidance scale as an input (Flux dev's guidance embedding, set by
    FluxGuidance as the conditioning's ``guidance``) instead of classifier-free guidance."""
    params = getattr(getattr(model.model, "diffusion_model", None), "params", None)
    return bool(getattr(params, "guidance_embed", False))


def with_guidance(cond, guidance: float):
    """A CONDITIONING with its embedded guidance scale set (what FluxGuidance does)."""
    import node_helpers

    return node_helpers.conditioning_set_values(cond, {"guidance": float(guidance)})


def check_diffusion_model(model, input_name: str = "model") -> None:
    """Reject models that are neither discrete-time epsilon/v-prediction diffusion models nor
    flow-matching models with a discrete-flow or Flux schedule."""
    ms = model_sampling_of(model)
    if is_flow_model(model):
        return
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        kind = type(ms).__name__
        raise InverseInputError(
            f"{input_name}: this node needs a diffusion model with epsilon or v prediction (SD1.x, SD2.x, SDXL and "
            f"their LCM/Turbo variants) or a flow-matching model (SD3/SD3.5, Flux); the connected model samples "
            f"with {kind} (a continuous-time model such as EDM or Stable Cascade). Connect one of those instead.")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, (comfy.model_sampling.X0,)):
        raise InverseInputError(
            f"{input_name}: unsupported prediction type {type(ms).__name__}; use an epsilon- or "
            f"v-prediction model or a flow-matching one.")
    if float(getattr(ms, "sigma_data", 1.0)) != 1.0:
        raise InverseInputError(f"{input_name}: models with sigma_data != 1 are not supported.")


def coords_of(model) -> Coords:
    return Coords(flow=is_flow_model(model))


def is_lcm_model(model) -> bool:
    ms = model_sampling_of(model)
    return hasattr(ms, "original_timesteps") and hasattr(ms, "skip_steps")


def model_timesteps(model) -> int:
    ms = model_sampling_of(model)
    return int(getattr(ms, "num_timesteps", len(ms.sigmas)))


def comfy_sigma_table(model) -> Tensor:
    """ComfyUI's sigma for every model timestep t = 0..T-1 (float32, as ComfyUI holds them; the
    flow time s for flow models)."""
    ms = model_sampling_of(model)
    T = model_timesteps(model)
    if len(ms.sigmas) == T:
        return ms.sigmas.detach().float().cpu().clone()
    with torch.inference_mode(False):
        return ms.sigma(torch.arange(T, dtype=torch.float32, device=ms.sigmas.device)).float().cpu()


def model_compute_dtype(model) -> torch.dtype:
    """The dtype the diffusion model computes in: ComfyUI's manual-cast dtype where the weights are
    stored in another (fp8, GGUF), else the weights' dtype; 8-bit storage without a cast computes
    in bfloat16. Finite differences size their step by it (core/inversion.py fd_step)."""
    inner = getattr(model, "model", model)
    dt = getattr(inner, "manual_cast_dtype", None)
    if dt is None and hasattr(inner, "get_dtype"):
        dt = inner.get_dtype()
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        return torch.float32
    return torch.bfloat16 if dt.itemsize == 1 else dt


def model_sigma_table(model) -> Tensor:
    """The DDPM sigma_t = sqrt((1 - abar_t) / abar_t) for every model timestep t = 0..T-1: ComfyUI's
    sigmas for discrete models, s / (1 - s) (float64 arithmetic; inf at s = 1) for flow models."""
    table = comfy_sigma_table(model)
    if not is_flow_model(model):
        return table
    s = table.double()
    return s / (1.0 - s)


def usable_timesteps(model) -> int:
    """How many of the model's timesteps a grid may use: all, or for flow models those with
    s <= FLOW_MAX_S (a prefix: the table ascends)."""
    T = model_timesteps(model)
    if not is_flow_model(model):
        return T
    return int((comfy_sigma_table(model) <= FLOW_MAX_S).sum())


def model_alphas_cumprod(model) -> Tensor:
    """abar_t for every model timestep (float64); exact at every timestep ComfyUI can represent."""
    return core_schedule.alphas_cumprod_from_sigmas(model_sigma_table(model))


def default_spacing(model) -> str:
    """LCM's own 50 timesteps; trailing for flow models (ComfyUI's simple schedule, from the top
    level); Stable Diffusion's leading otherwise."""
    if is_lcm_model(model):
        return "lcm"
    return "trailing" if is_flow_model(model) else "leading"


def make_grid(model, steps: int, spacing: str = "auto") -> TimestepGrid:
    """An N-step grid on the model's schedule. "leading" uses Stable Diffusion's steps_offset 1."""
    if steps < 1:
        raise InverseInputError(f"steps: must be at least 1, got {steps}.")
    if spacing == "auto":
        spacing = default_spacing(model)
    T = usable_timesteps(model)
    if is_lcm_model(model) and spacing != "lcm":
        raise InverseInputError(
            f"spacing: an LCM model only knows the 50 LCM timesteps; choose 'lcm' or 'auto' instead of '{spacing}'.")
    try:
        ts = core_schedule.timestep_spacing(steps, T, spacing, steps_offset=1 if spacing == "leading" else 0)
    except ValueError as exc:
        raise InverseInputError(f"steps/spacing: {exc}") from None
    table = model_sigma_table(model)
    ac = model_alphas_cumprod(model)
    return TimestepGrid(tuple(GridLevel(t, float(table[t])) for t in ts) + (core_schedule.CLEAN,),
                        tuple(float(ac[t]) for t in ts) + (1.0,))


#: a grid's timestep: the model timestep ``t`` (an int) carrying the grid's exact level ``sigma``, the
#: DDPM sigma whose abar = 1 / (1 + sigma^2) the grid steps with (core/schedule.py's Level). The
#: predictors evaluate the model at ``sigma`` (core/schedule.py's ``level_sigma``), so the level a model is called
#: at is always the level the step is taken at, whatever the model's own table holds at index ``t``
#: (another shift) and whether or not ``sigma`` is on that table at all (a SIGMAS input).
GridLevel = core_schedule.Level


def grid_from_sigmas(model, sigmas: Tensor) -> TimestepGrid:
    """The grid of a SIGMAS input (either order) at exactly its levels (ComfyUI's sigmas; the flow
    time s for flow models), each a :class:`GridLevel` on the model timestep ComfyUI maps it to (the
    nearest of the table's for a flow model); a final 0 means the clean level."""
    s = [float(v) for v in sigmas.flatten().tolist()]
    if len(s) < 2:
        raise InverseInputError("sigmas: need at least two sigmas (one step).")
    if s[0] < s[-1]:
        s = s[::-1]
    ms = model_sampling_of(model)
    flow = is_flow_model(model)
    coords = coords_of(model)
    levels, top = comfy_sigma_table(model).double(), usable_timesteps(model) - 1
    ts, ab = [], []
    for v in s:
        if v <= 0.0:
            ts.append(core_schedule.CLEAN)
            ab.append(1.0)
            continue
        if flow:
            if v > FLOW_MAX_S + 1e-6:
                raise PureNoiseStartError(
                    f"sigmas: this flow model's schedule starts at {v:.4g}; a latent at s = 1 is pure noise (ComfyUI "
                    f"starts a sampler from (1 - s) x the latent, which is 0 there), so inversion stops at s <= "
                    f"{FLOW_MAX_S}. Drop the first sigma with SplitSigmas (step 1), or use the inversion node's "
                    f"sigmas output.")
            t = min(int((levels - v).abs().argmin()), top)
        else:
            t = int(ms.timestep(torch.tensor([v], device=ms.sigmas.device)).item())
        sigma = coords.ddpm_sigma(v)
        ts.append(GridLevel(t, sigma))
        ab.append(1.0 / (1.0 + sigma ** 2))
    if ts[-1] != core_schedule.CLEAN:
        raise InverseInputError("sigmas: the schedule must end at sigma 0 (the clean image); "
                                "use a full schedule from BasicScheduler or split it with SplitSigmas first.")
    try:
        return TimestepGrid(tuple(ts), tuple(ab))
    except ValueError as exc:
        raise InverseInputError(f"sigmas: {exc}") from None


def grid_level_sigmas(grid: TimestepGrid) -> list[float]:
    """The DDPM sigma of every level of ``grid`` (float64, ending with 0): a :class:`GridLevel`'s own,
    else the one of its abar."""
    out = []
    for t, v in zip(grid.timesteps, grid.sigmas().tolist()):
        out.append(t.sigma if isinstance(t, GridLevel) and t != core_schedule.CLEAN else float(v))
    return out


def grid_sigmas(model, grid: TimestepGrid) -> Tensor:
    """SIGMAS for ComfyUI's samplers (float32, descending, ending at 0): the grid's levels in
    ComfyUI's sigmas (flow time s for flow models)."""
    coords = coords_of(model)
    return torch.tensor([coords.level(v) for v in grid_level_sigmas(grid)], dtype=torch.float64).float()


def abar_sigma(abar: float) -> float:
    return math.sqrt((1.0 - abar) / abar)


def to_comfy_latent(z: Tensor, abar: float, coords: Coords = Coords(False)) -> Tensor:
    """DDPM latent -> ComfyUI's latent at the same level (x = z / sqrt(abar) for discrete models)."""
    return z * coords.x_scale(abar_sigma(abar))


def from_comfy_latent(x: Tensor, abar: float, coords: Coords = Coords(False)) -> Tensor:
    return x / coords.x_scale(abar_sigma(abar))


def to_start_latent(z: Tensor, abar: float, coords: Coords = Coords(False)) -> Tensor:
    """DDPM latent -> the LATENT a ComfyUI sampler starts from at this level with noise disabled:
    samplers begin at ``model_sampling.noise_scaling(sigma, 0, latent)``, which is the latent
    itself for discrete models and (1 - s) latent for flow models, so the latter is divided by
    (1 - s)."""
    x = to_comfy_latent(z, abar, coords)
    if coords.flow:
        x = x / (1.0 - coords.level(abar_sigma(abar)))
    return x


def to_latent_output(model, z: Tensor) -> Tensor:
    """A ComfyUI-space latent as the LATENT a node outputs (the model's process_latent_out: SD3/Flux
    shift and scale)."""
    return model.model.process_latent_out(z)
