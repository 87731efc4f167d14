"""The one module that touches ComfyUI internals.

It turns a ComfyUI MODEL plus CONDITIONINGs into the :class:`core.protocols.NoisePredictor`
the methods in core/ are written against, and back: timestep grids to SIGMAS, latents to the
LATENT convention, core loops to a SAMPLER.

Sigma space. ComfyUI's discrete-time models are k-diffusion models: a latent ``x`` at noise level
``sigma`` is ``x = z_t * sqrt(1 + sigma^2)`` where ``z_t`` is the DDPM latent and
``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model returns the denoised ``x0`` and
``eps = (x - x0) / sigma``. Grids made from a step count take the model's own ``model_sampling``
table, so that ComfyUI maps them back to exactly the integer timestep we mean. This holds for
epsilon and v-prediction models alike (ComfyUI's denoised output already accounts for the
parameterisation) and for LCM's distilled sampling table.

Levels. A grid's timesteps are :class:`GridLevel` objects: the model timestep (an int, as core/ and the
NoisePredictor protocol use it) carrying the grid's exact level, the DDPM sigma its abar belongs to.
The predictors evaluate the model at that level, never at the table entry of the timestep index,
so a model is never evaluated at one level and stepped at another: SIGMAS off the table reach the
model exactly as given (as ComfyUI's samplers keep them; flow time is continuous), and a MODEL
patched to another shift than the inversion's (ModelSamplingSD3, ModelSamplingFlux at another
resolution) is evaluated at the inversion's levels, which for a flow model is the same network at
the same flow time.

Flow-matching models (SD3/SD3.5's discrete flow, Flux; ComfyUI's CONST prediction): a latent
``x = (1 - s) x0 + s eps`` at flow time ``s`` with the model predicting v = eps - x0 is the DDPM
family in other coordinates: ``x / (1 - s) = x0 + sigma eps`` with ``sigma = s / (1 - s)``, so
``abar = 1 / (1 + sigma^2)`` and ``z = x sqrt(abar) / (1 - s) = x (1 + sigma) / sqrt(1 + sigma^2)``;
Tweedie's x0 is ComfyUI's denoised ``x - s v`` and ``eps = (x - (1 - s) x0) / s``. A DDIM step in
those coordinates is exactly an Euler step of the flow ODE (tests/test_flow.py derives and checks
each identity against ComfyUI's model_sampling). core/flow.py's ``Coords`` holds the two mappings;
core/ keeps one set of solvers. Pure noise (s = 1) has abar = 0, where the eps parameterisation cannot give x0,
so flow grids stop at s <= :data:`FLOW_MAX_S` (a SIGMAS input starting at 1.0 is refused with the fix).

Model loading, patches, hooks, ControlNets and area/mask conditioning all go through ComfyUI's own
``CFGGuider.sample`` machinery: the predictor lives inside a SAMPLER that the guider runs, and
every call goes through ``comfy.samplers.calc_cond_batch``, which batches the conditionings into
as few UNet calls as memory allows.

Autograd. Nodes run under ``torch.inference_mode()`` and loaded weights are inference tensors,
which autograd refuses to save for backward. :meth:`ComfyNoisePredictor.autograd` leaves inference
mode, enables gradients and converts the diffusion model's inference-tensor parameters and
buffers, one at a time and in place, into ordinary tensors with the same values (peak extra
memory: the largest single tensor, not a second copy of the model). Values, devices, dtypes and
patches are unchanged, so this does not alter what the shared model computes.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils

from ..core import schedule as core_schedule
from ..core.flow import Coords
from ..core.schedule import TimestepGrid

Tensor = torch.Tensor


class InverseInputError(ValueError):
    """Bad node input: the message names the input and the fix."""


# ----------------------------------------------------------------------------------------------
# model checks and schedules

def model_sampling_of(model) -> Any:
    return model.get_model_object("model_sampling")


FLOW_MAX_S = 0.99  # the highest flow time a grid uses: sigma = s / (1 - s) = 99, abar ~ 1e-4


def is_flow_model(model) -> bool:
    """A flow-matching model: ComfyUI's CONST prediction over a discrete-flow (SD3/SD3.5, AuraFlow,
    HiDream, ...) or Flux-style schedule."""
    ms = model_sampling_of(model)
    return isinstance(ms, comfy.model_sampling.CONST) and isinstance(
        ms, (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.ModelSamplingFlux))


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


class GridLevel(int):
    """A grid's timestep: the model timestep ``t`` (an int, as core/ and the NoisePredictor protocol
    use it; arithmetic on it gives plain ints) that carries the grid's exact level ``sigma``, the
    DDPM sigma whose abar = 1 / (1 + sigma^2) the grid steps with. The predictors evaluate the model
    at ``sigma`` (:func:`level_sigma`), so the level a model is called at is always the level the
    step is taken at, whatever the model's own table holds at index ``t`` (another shift) and
    whether or not ``sigma`` is on that table at all (a SIGMAS input)."""

    sigma: float

    def __new__(cls, t: int, sigma: float):
        level = super().__new__(cls, int(t))
        level.sigma = float(sigma)
        return level

    def __reduce__(self):
        return GridLevel, (int(self), self.sigma)


def level_sigma(t, table: Tensor) -> float:
    """The DDPM sigma a predictor evaluates timestep ``t`` at: a :class:`GridLevel`'s own level, else
    (a plain int) the model's table at ``t``."""
    sigma = getattr(t, "sigma", None)
    return float(sigma) if sigma is not None else float(table[int(t)])


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
                raise InverseInputError(
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
        sigma = getattr(t, "sigma", None)
        out.append(float(sigma) if sigma is not None and t != core_schedule.CLEAN else float(v))
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


# ----------------------------------------------------------------------------------------------
# the noise predictor

@dataclass(eq=False)
class Cond:
    """A conditioning handle for :class:`ComfyNoisePredictor`: the name of one of the
    CONDITIONINGs given to :func:`run_with_predictor`, optionally with its cross-attention
    embedding replaced by ``context`` (``[1 or B, tokens, dim]``; e.g. an optimised null-text
    embedding, differentiable) and its pooled vector by ``pooled`` (``[1 or B, width]``: the first
    ``width`` entries of the model's ``y`` input, which SDXL, SD3 and Flux feed to every block)."""

    name: str
    context: Optional[Tensor] = None
    pooled: Optional[Tensor] = None


@dataclass(frozen=True)
class PromptLayout:
    """How a tuned prompt variable (null-text inversion's null embedding, P2L's prompt) packs a
    cross-attention embedding [B, L, D] and, where the model has one, a pooled vector [B, P]
    (P <= D) into one tensor [B, L + 1, D] (the pooled vector zero-padded as an extra row), so that
    core/'s optimiser sees one tensor."""

    tokens: int
    pooled: int = 0

    @staticmethod
    def pack(context: Tensor, pooled: Optional[Tensor]) -> tuple[Tensor, "PromptLayout"]:
        if pooled is None:
            return context, PromptLayout(context.shape[1])
        B, L, D = context.shape
        if pooled.shape[-1] > D:
            return context, PromptLayout(L)
        row = torch.zeros(B, 1, D, dtype=context.dtype, device=context.device)
        row[:, 0, :pooled.shape[-1]] = pooled.to(context).expand(B, -1)
        return torch.cat([context, row], 1), PromptLayout(L, pooled.shape[-1])

    def cond(self, name: str, packed: Tensor) -> "Cond":
        packed = packed.to(torch.float32)
        if not self.pooled:
            return Cond(name, context=packed)
        return Cond(name, context=packed[:, :self.tokens], pooled=packed[:, self.tokens, :self.pooled])


class ComfyNoisePredictor:
    """eps(z_t, t, conds) through ComfyUI: one batched ``calc_cond_batch`` call per invocation.

    Conditioning handles are names (str) or :class:`Cond` objects. Every call first checks for a
    user cancel (``comfy.model_management.throw_exception_if_processing_interrupted``), so a
    cancel stops a run within one model call.
    """

    def __init__(self, guider, model_options: dict, on_call: Optional[Callable[[], None]] = None):
        self.guider = guider
        self.inner_model = guider.inner_model
        self.conds = guider.conds
        self.model_options = model_options
        self.device = guider.model_patcher.load_device
        self.sigma_table = model_sigma_table(guider.model_patcher)
        self.compute_dtype = model_compute_dtype(guider.model_patcher)
        self.coords = coords_of(guider.model_patcher)
        self.alphas_cumprod = core_schedule.alphas_cumprod_from_sigmas(self.sigma_table)
        self.calls = 0          # batched model calls
        self.grad_calls = 0     # of which made with gradients (each followed by a backward pass)
        self.saved_copies = 0   # saved tensors copied before an in-place write (SavedTensorGuard)
        self.saved_copy_bytes = 0
        self._guard_saved = False
        self._on_call = on_call

    # latent format (e.g. SD's 0.18215 scale) ------------------------------------------------
    def process_latent_in(self, samples: Tensor) -> Tensor:
        return self.inner_model.process_latent_in(samples.float())

    def process_latent_out(self, z: Tensor) -> Tensor:
        return self.inner_model.process_latent_out(z.float())

    def embedding(self, name: str) -> Tensor:
        """The cross-attention embedding of conditioning ``name`` (its first entry)."""
        return self.guider.original_conds[name][0]["cross_attn"]

    def pooled(self, name: str) -> Optional[Tensor]:
        """The pooled vector of conditioning ``name`` (its first entry) where the model reads one in
        its ``y`` input (SDXL, SD3, Flux), else None."""
        pooled = self.guider.original_conds[name][0].get("pooled_output")
        processed = self.conds.get(name) or [{}]
        if not isinstance(pooled, Tensor) or "y" not in processed[0].get("model_conds", {}):
            return None
        return pooled

    # the protocol ---------------------------------------------------------------------------
    def __call__(self, z: Tensor, t: int, conds: Sequence[Any]) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = level_sigma(t, self.sigma_table)
        x = z.to(self.device, torch.float32) * self.coords.x_scale(sigma)
        sigmas = torch.full((x.shape[0],), self.coords.level(sigma), device=self.device, dtype=torch.float32)
        handles = [c if isinstance(c, Cond) else Cond(str(c)) for c in conds]
        missing = [h.name for h in handles if h.name not in self.conds]
        if missing:
            raise KeyError(f"unknown conditioning {missing}; have {sorted(self.conds)}")
        cond_lists = [self.conds[h.name] for h in handles]
        options = self.model_options
        overrides = {i: h for i, h in enumerate(handles) if h.context is not None or h.pooled is not None}
        if overrides:
            options = self._with_overrides(options, overrides)
        guard = self._saved_guard()
        with guard if guard is not None else contextlib.nullcontext():
            denoised = comfy.samplers.calc_cond_batch(self.inner_model, cond_lists, x, sigmas, options)
        if guard is not None:
            self.saved_copies += guard.copies
            self.saved_copy_bytes += guard.copied_bytes
        self.calls += 1
        tensors = [t for h in overrides.values() for t in (h.context, h.pooled) if t is not None]
        if torch.is_grad_enabled() and (z.requires_grad or any(t.requires_grad for t in tensors)):
            self.grad_calls += 1
        if self._on_call is not None:
            self._on_call()
        return torch.stack([self.coords.eps(x, d.float(), sigma) for d in denoised])

    def _with_overrides(self, options: dict, overrides: Mapping[int, "Cond"]) -> dict:
        previous = options.get("model_function_wrapper")

        def replace(c: dict, key: str, index, pick) -> None:
            chunks = c[key].chunk(len(index))
            c[key] = torch.cat([pick(overrides[i], chunk) if i in overrides else chunk for i, chunk in zip(index, chunks)])

        def context(h: "Cond", chunk: Tensor) -> Tensor:
            if h.context is None:
                return chunk
            ctx = h.context.to(chunk.device, torch.float32)
            if ctx.shape[-2:] != chunk.shape[-2:]:
                raise InverseInputError(
                    f"embedding override has shape {tuple(ctx.shape)}, the conditioning has "
                    f"{tuple(chunk.shape)}; keep the token count and width of the prompt.")
            return ctx.expand(chunk.shape[0], -1, -1) if ctx.shape[0] == 1 else ctx

        def pooled(h: "Cond", chunk: Tensor) -> Tensor:
            if h.pooled is None:
                return chunk
            p = h.pooled.to(chunk.device, torch.float32)
            p = p.expand(chunk.shape[0], -1) if p.shape[0] == 1 else p
            return torch.cat([p.to(chunk.dtype), chunk[:, p.shape[-1]:]], -1)

        def wrapper(apply_model, args):
            c = dict(args["c"])
            index = args["cond_or_uncond"]
            if any(i in overrides for i in index):
                if "c_crossattn" in c:
                    replace(c, "c_crossattn", index, context)
                if "y" in c and c["y"] is not None:
                    replace(c, "y", index, pooled)
            if previous is not None:
                return previous(apply_model, dict(args, c=c))
            return apply_model(args["input"], args["timestep"], **c)

        return dict(options, model_function_wrapper=wrapper)

    @contextlib.contextmanager
    def autograd(self):
        """Run the enclosed calls with gradients, out of inference mode (see module docstring).
        Models whose forward adds in place into tensors autograd has saved (ComfyUI's Flux blocks:
        ``x += gate * out``) run each model call that records gradients under a
        :class:`SavedTensorGuard`, which copies a saved tensor only when such an add is about to
        overwrite it: the gradients of the same computation written out of place
        (tests/test_flow.py), without copies of the weights (tests/test_issue20_glue.py). Only the
        model calls are guarded, not the rest of the enclosed code (e.g. a VAE decoder)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            make_autograd_safe(self.inner_model)
            before = self._guard_saved
            self._guard_saved = adds_in_place(self.inner_model)
            stack.callback(setattr, self, "_guard_saved", before)
            yield self

    def _saved_guard(self):
        """A :class:`SavedTensorGuard` for one model call, where it needs one: a model that adds in
        place, called inside :meth:`autograd` with gradients recorded (not under a torch.func
        transform, which saves nothing for a backward pass)."""
        if not (self._guard_saved and torch.is_grad_enabled()) or _under_functorch():
            return None
        return SavedTensorGuard()


IN_PLACE_MODULES = ("comfy.ldm.flux.", "comfy.ldm.chroma.", "comfy.ldm.chroma_radiance.")


def adds_in_place(inner_model) -> bool:
    """Whether the diffusion model's forward modifies saved activations in place (the Flux family)."""
    dm = getattr(inner_model, "diffusion_model", None)
    return dm is not None and type(dm).__module__.startswith(IN_PLACE_MODULES)


def _under_functorch() -> bool:
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:
        return False


def _version(t: Tensor) -> Optional[int]:
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference tensors keep no version counter
        return None


def _storage_key(t: Tensor) -> Optional[tuple]:
    try:
        if t.numel() == 0:
            return None
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


class _Saved:
    """What autograd holds for one saved tensor under a :class:`SavedTensorGuard`: the tensor itself
    (detached: the same memory and version counter, no reference back to the graph) and its version
    when saved, or the copy made before an in-place write."""

    __slots__ = ("tensor", "version", "copy", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.detach()
        self.version = _version(tensor)
        self.copy: Optional[Tensor] = None


# in-place operations by name: Tensor methods and torch functions ending in "_" (add_, addcmul_,
# copy_, ...), the augmented assignments and item assignment; plus inplace=True and out= arguments
_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                               "__ilshift__", "__irshift__"})


def _written(func, args, kwargs) -> list:
    name = getattr(func, "__name__", "") or ""
    targets = []
    if ((name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
            or kwargs.get("inplace") is True) and args and isinstance(args[0], Tensor):
        targets.append(args[0])
    out = kwargs.get("out")
    if out is not None:
        targets += [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
    return targets


class _WriteWatch(torch.overrides.TorchFunctionMode):
    def __init__(self, guard: "SavedTensorGuard"):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.guard.live:
            for t in _written(func, args, kwargs):
                self.guard.before_write(t)
        return func(*args, **kwargs)


class SavedTensorGuard:
    """Copy on write for the tensors autograd saves during one model call, for models whose forward
    adds in place into tensors it saved (ComfyUI's Flux family: ``x += gate * out``).

    A saved tensor is kept as it is, uncopied, until an in-place operation (seen through a
    TorchFunctionMode: ``add_``, ``+=``, item assignment, ``inplace=True``, ``out=``) is about to write
    into its memory; only then is it copied, so the backward pass sees the values the forward used, as
    if the model were written out of place, with a bit-identical gradient. The weights every linear
    layer saves are never written, so never copied (nor GGUF weights, whose clone() returns
    themselves, nor weights ComfyUI's cast_to passes through). A saved tensor that something the guard
    did not see wrote into (its version counter moved) stops the backward pass with an error rather
    than a wrong gradient. ``copies`` and ``copied_bytes`` count the copies."""

    def __init__(self):
        self.live: dict = {}  # storage -> weak references to the _Saved entries that read it
        self.copies = 0
        self.copied_bytes = 0
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> "SavedTensorGuard":
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        stack.enter_context(_WriteWatch(self))
        self._stack = stack
        return self

    def __exit__(self, *exc):
        try:
            return self._stack.__exit__(*exc)
        finally:
            self._stack = None
            self.live.clear()  # writes after the call are not seen: the version check covers them

    def _pack(self, t: Tensor) -> _Saved:
        entry = _Saved(t)
        key = _storage_key(t)
        if key is not None:
            self.live.setdefault(key, []).append(weakref.ref(entry))
        return entry

    @staticmethod
    def _unpack(entry: _Saved) -> Tensor:
        if entry.copy is not None:
            return entry.copy
        if entry.version is not None and _version(entry.tensor) != entry.version:
            raise RuntimeError(
                "a tensor saved for the backward pass was modified in place by an operation the glue's "
                "SavedTensorGuard did not see (nodes/comfy_glue.py); the gradient would be wrong.")
        return entry.tensor

    def before_write(self, t: Tensor) -> None:
        refs = self.live.pop(_storage_key(t), None)
        for ref in refs or ():
            entry = ref()
            if entry is None or entry.copy is not None:
                continue
            if entry.version is not None and _version(entry.tensor) != entry.version:
                continue  # already written unseen: the backward pass will stop at it
            with torch.no_grad():
                entry.copy = entry.tensor.clone()
            self.copies += 1
            self.copied_bytes += entry.copy.numel() * entry.copy.element_size()


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace inference-tensor parameters and buffers of ``module`` in place by ordinary tensors
    with the same values, one tensor at a time. Returns how many were converted."""
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    converted += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    converted += 1
    return converted


# ----------------------------------------------------------------------------------------------
# running core code inside ComfyUI's sampling machinery

class _PredictorGuider(comfy.samplers.CFGGuider):
    def set_named_conds(self, conds: Mapping[str, Any]) -> None:
        self.inner_set_conds(dict(conds))


class _CallSampler(comfy.samplers.Sampler):
    """A SAMPLER whose 'sampling' is an arbitrary function of the noise predictor."""

    def __init__(self, fn: Callable[[ComfyNoisePredictor], Any], on_call=None):
        self.fn = fn
        self.on_call = on_call
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        predictor = ComfyNoisePredictor(model_wrap, extra_args["model_options"], self.on_call)
        self.result = self.fn(predictor)
        return latent_image


def run_with_predictor(model, conds: Mapping[str, Any], latent_shape: Sequence[int],
                       fn: Callable[[ComfyNoisePredictor], Any], seed: int = 0) -> Any:
    """Load ``model`` the way ComfyUI's samplers do, process ``conds`` (a name -> CONDITIONING
    mapping) for latents of ``latent_shape`` and call ``fn(predictor)``; returns its result."""
    for name, c in conds.items():
        if c is None or len(c) == 0:
            raise InverseInputError(f"{name}: empty CONDITIONING; connect a CLIP Text Encode node.")
    guider = _PredictorGuider(model)
    guider.set_named_conds(conds)
    sampler = _CallSampler(fn)
    zeros = torch.zeros(tuple(latent_shape), dtype=torch.float32)
    sigmas = torch.tensor([float(model_sampling_of(model).sigma_max), 0.0])
    guider.sample(zeros, zeros, sampler, sigmas, disable_pbar=True, seed=seed)
    return sampler.result


class ProgressReporter:
    """ComfyUI progress bar for one or more core loops run one after the other (``total`` steps in
    all); also a cancel point after every step. ``stage(offset)`` reports a later loop's steps."""

    def __init__(self, total: int, node_id: Optional[str] = None, offset: int = 0, bar=None):
        self.bar = bar or comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.offset = offset

    def stage(self, offset: int) -> "ProgressReporter":
        return ProgressReporter(self.total, offset=offset, bar=self.bar)

    def __call__(self, step: int, total: int, z: Optional[Tensor] = None) -> None:
        self.bar.update_absolute(self.offset + step + 1, self.total)
        comfy.model_management.throw_exception_if_processing_interrupted()


def check_widgets(node_cls, values: Mapping[str, Any]) -> None:
    """The widget values of a node call, checked against ``node_cls``'s schema before any work:
    every INT/FLOAT a finite number within min/max, every COMBO one of its options. ComfyUI's own
    prompt validation lets NaN through (NaN < min is false) and a node called directly gets none."""
    from comfy_api.latest import io

    # define_schema, not GET_SCHEMA: ComfyUI runs nodes through a locked clone class that refuses
    # GET_SCHEMA's caching; a schema is a handful of small objects
    kinds = (io.Int.Input, io.Float.Input, io.Combo.Input)
    for inp in [i for i in node_cls.define_schema().inputs if isinstance(i, kinds)]:
        v = values.get(inp.id)
        if v is None:
            continue
        if isinstance(inp, io.Combo.Input):
            if inp.options and v not in inp.options:
                raise InverseInputError(f"{inp.id}: {v!r} is not one of {', '.join(map(str, inp.options))}.")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InverseInputError(f"{inp.id}: expected a number, got {type(v).__name__}.")
        if not math.isfinite(v):
            raise InverseInputError(f"{inp.id}: must be a finite number, got {v}.")
        lo, hi = inp.min, inp.max
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = " to ".join("any" if b is None else f"{b:g}" for b in (lo, hi))
            raise InverseInputError(f"{inp.id}: {v:g} is outside the allowed range {allowed}.")


def check_finite(t: Tensor, input_name: str) -> None:
    """NaN or infinite values in an input are refused before any work starts."""
    if not bool(torch.isfinite(t).all()):
        raise InverseInputError(f"{input_name}: contains NaN or infinite values; check the node that produced it "
                                f"(e.g. a VAE in half precision that overflowed) and run it again.")


def model_latent_channels(model) -> Optional[int]:
    fmt = getattr(getattr(model, "model", None), "latent_format", None)
    return getattr(fmt, "latent_channels", None)


def check_latent_for_model(samples: Tensor, model, input_name: str) -> None:
    """The latent's channel count must be the model's (an SDXL/SD3/Flux latent cannot go to SD1.5)."""
    want = model_latent_channels(model)
    if want is not None and samples.shape[1] != want:
        raise InverseInputError(f"{input_name}: the latent has {samples.shape[1]} channels but this model works on "
                                f"{want}-channel latents; encode the image with this checkpoint's own VAE.")


def latent_batch(latent: dict, input_name: str = "latent", model=None) -> Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise InverseInputError(f"{input_name}: expected an image LATENT of shape [B, C, H, W]; "
                                f"video or audio latents are not supported.")
    check_finite(samples, input_name)
    if model is not None:
        check_latent_for_model(samples, model, input_name)
    return samples


def check_image(image: Tensor, input_name: str = "image", vae=None) -> Tensor:
    """An IMAGE [B, H, W, C] with finite values and, where a VAE will encode it, at least one latent
    pixel's worth of pixels in each direction."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 1:
        raise InverseInputError(f"{input_name}: expected an IMAGE of shape [B, H, W, C].")
    check_finite(image, input_name)
    if vae is not None:
        f = vae_downscale(vae)
        H, W = int(image.shape[1]), int(image.shape[2])
        if H < f or W < f:
            raise InverseInputError(f"{input_name}: the image is {W}x{H} pixels, smaller than the VAE's {f}x{f}-pixel "
                                    f"latent cell; scale it up (e.g. ImageScale to {8 * f}x{8 * f} or more).")
    return image


def encode_image(vae, image: Tensor, input_name: str = "image") -> Tensor:
    check_image(image, input_name, vae)
    samples = vae.encode(image[:, :, :, :3])
    check_finite(samples, f"{input_name} (encoded by the VAE)")
    return samples


# ----------------------------------------------------------------------------------------------
# the DDIM-inversion SAMPLER for SamplerCustomAdvanced

class KDiffusionPredictor:
    """A NoisePredictor over a k-diffusion denoiser (what a SAMPLER receives: the guider's
    CFG-combined prediction). It has a single conditioning handle, ``None``."""

    def __init__(self, denoiser, extra_args: dict, sigma_table: Tensor, coords: Coords = Coords(False),
                 compute_dtype: torch.dtype = torch.float32):
        self.denoiser = denoiser
        self.extra_args = extra_args
        self.sigma_table = sigma_table
        self.coords = coords
        self.compute_dtype = compute_dtype

    def __call__(self, z: Tensor, t: int, conds: Sequence[Any]) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = level_sigma(t, self.sigma_table)
        x = z * self.coords.x_scale(sigma)
        s = torch.full((x.shape[0],), self.coords.level(sigma), device=x.device, dtype=x.dtype)
        denoised = self.denoiser(x, s, **self.extra_args)
        eps = self.coords.eps(x, denoised.float(), sigma)
        return eps.unsqueeze(0).expand(len(conds), *eps.shape)


def make_inversion_sampler(invert: Callable) -> comfy.samplers.KSAMPLER:
    """A KSAMPLER that runs ``invert(predictor, z0, grid, callback)`` (a core inversion loop) over
    the connected SIGMAS, in either order, starting from the latent (the noise input is ignored;
    use DisableNoise). It returns the noisy latent at the largest sigma, in ComfyUI's convention."""

    class _InversionKSampler(comfy.samplers.KSAMPLER):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            patcher = model_wrap.model_patcher
            check_diffusion_model(patcher)
            grid = grid_from_sigmas(patcher, sigmas)
            coords = coords_of(patcher)
            predictor = KDiffusionPredictor(model_wrap, extra_args, model_sigma_table(patcher), coords,
                                            model_compute_dtype(patcher))
            z0 = latent_image.float() if latent_image is not None else torch.zeros_like(noise)

            def cb(i, total, z):  # SamplerCustomAdvanced's callback drives the progress bar
                if callback is not None:
                    x = to_comfy_latent(z, grid.alphas_cumprod[::-1][i + 1], coords)
                    callback(i, x, x, total)

            traj = invert(predictor, z0, grid, cb)
            return to_start_latent(traj[-1], grid.alphas_cumprod[0], coords)

    return _InversionKSampler(None)


def latent_mask(mask: Tensor, latent_shape: Sequence[int], input_name: str = "mask") -> Tensor:
    """A ComfyUI MASK ([H, W] or [B, H, W], 1 = selected) resized to a latent's [B, 1, h, w]."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise InverseInputError(f"{input_name}: expected a MASK of shape [H, W] or [B, H, W], got {tuple(mask.shape)}.")
    check_finite(mask, input_name)
    B = latent_shape[0]
    if mask.shape[0] not in (1, B):
        raise InverseInputError(f"{input_name}: the mask batch ({mask.shape[0]}) must be 1 or the latent batch ({B}).")
    m = torch.nn.functional.interpolate(mask[:, None].float(), size=tuple(latent_shape[-2:]), mode="bilinear",
                                        align_corners=False)
    return m.expand(B, 1, *latent_shape[-2:]).clamp(0.0, 1.0)


def check_cond_batch(cond, batch: int, input_name: str) -> None:
    """A CONDITIONING's batch must be 1 (shared) or the latent batch."""
    for entry in cond:
        n = int(entry[0].shape[0]) if isinstance(entry[0], torch.Tensor) else 1
        if n not in (1, batch):
            raise InverseInputError(
                f"{input_name}: the conditioning has a batch of {n} but the latent has {batch}; encode one prompt "
                f"(batch 1, shared by all images) or exactly one per image.")


# ----------------------------------------------------------------------------------------------
# VAE encoder/decoder for decoder inversion

VAE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class VaeCodec:
    """Encoder and decoder callables over ComfyUI IMAGE tensors ([B, H, W, C] in [0, 1]) and raw
    VAE latents (a LATENT's "samples"), for core/decoder_inversion.py.

    precision "auto" uses ComfyUI's own ``VAE.encode``/``VAE.decode`` (the VAE's dtype, batching,
    and ComfyUI's automatic fallback to tiled coding when memory runs out). An explicit precision
    runs a private copy of the VAE's network in that dtype (the shared VAE is never changed).
    ``decode_differentiable`` is the unclamped decoder for gradient-based inversion, to be called
    inside ``autograd()``.
    """

    def __init__(self, vae, precision: str = "auto"):
        if precision != "auto" and precision not in VAE_PRECISIONS:
            raise InverseInputError(f"precision: choose auto, {', '.join(VAE_PRECISIONS)}.")
        self.vae = vae
        self.precision = precision
        comfy.model_management.load_models_gpu([vae.patcher])
        self.device = vae.device
        self.dtype = vae.vae_dtype if precision == "auto" else VAE_PRECISIONS[precision]
        net = vae.first_stage_model
        if self.dtype != vae.vae_dtype:
            import copy

            net = copy.deepcopy(net).to(self.dtype)
        self.net = net

    def crop(self, image: Tensor) -> Tensor:
        return self.vae.vae_encode_crop_pixels(image[..., :3])

    def encode(self, image: Tensor) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.precision == "auto":
            return self.vae.encode(image)
        x = self.vae.process_input(image.movedim(-1, 1)).to(self.device, self.dtype)
        return self.net.encode(x).float()

    def decode(self, z: Tensor) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.precision == "auto":
            return self.vae.decode(z).to(z.device)
        return self.vae.process_output(self.net.decode(z.to(self.device, self.dtype)).float()).movedim(1, -1)

    def decode_differentiable(self, z: Tensor) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = self.net.decode(z.to(self.device, self.dtype)).float()
        return ((out + 1.0) / 2.0).movedim(1, -1)

    @contextlib.contextmanager
    def autograd(self):
        with torch.inference_mode(False), torch.enable_grad():
            make_autograd_safe(self.net)
            yield


def plot_curves(curves: Mapping[str, Sequence[float]], title: str, width: int = 640, height: int = 360,
                log_y: bool = True) -> Tensor:
    """A line chart of ``curves`` against iteration as a ComfyUI IMAGE [1, H, W, 3] (drawn with PIL)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    vals = [v for c in curves.values() for v in c if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if vals:
        f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
        lo, hi = f(min(vals)), f(max(vals))
        if hi - lo < 1e-12:
            lo, hi = lo - 1, hi + 1
        n = max(len(c) for c in curves.values())
        for j, (name, c) in enumerate(curves.items()):
            pts = [(left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (f(v) - lo) / (hi - lo))
                   for i, v in enumerate(c) if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
            col = colours[j % len(colours)]
            if len(pts) > 1:
                draw.line(pts, fill=col, width=2)
            draw.text((right - 220, top + 6 + 14 * j), f"{name}: {c[0]:.3g} -> {c[-1]:.3g}", fill=col)
        draw.text((4, top), f"{(10 ** hi if log_y else hi):.3g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{(10 ** lo if log_y else lo):.3g}", fill=(0, 0, 0))
        draw.text((left, bottom + 8), "0", fill=(0, 0, 0))
        draw.text((right - 30, bottom + 8), str(n - 1), fill=(0, 0, 0))
        draw.text(((left + right) // 2 - 20, bottom + 20), "iteration", fill=(0, 0, 0))
    import numpy as np

    return torch.from_numpy(np.asarray(img).astype("float32") / 255.0)[None]


# ----------------------------------------------------------------------------------------------
# attention control: prompt tokens and attention replace patches

def prompt_tokens(clip, text: str, input_name: str) -> tuple[list[int], int]:
    """The token ids of ``text``'s words (no BOS/EOS/padding) and the context length the model
    attends to, from the CLIP's own tokenizer ("l" for SD1.x/SDXL, else its first tokenizer)."""
    tokens = clip.tokenize(text, return_word_ids=True)
    key = "l" if "l" in tokens else sorted(tokens)[0]
    chunks = tokens[key]
    if len(chunks) != 1:
        raise InverseInputError(f"{input_name}: the prompt is longer than one 75-token chunk; attention control "
                                f"needs a prompt of at most 75 tokens.")
    ids = [int(t[0]) for t in chunks[0] if len(t) > 2 and t[2] > 0]
    return ids, len(chunks[0])


def word_tokens(clip, word: str) -> list[int]:
    return prompt_tokens(clip, word, "words")[0]


def dit_blocks(model) -> list[tuple[str, int]] | None:
    """A joint-attention transformer's blocks in forward order as ComfyUI's "dit" patch keys: Flux's
    ("double_block", i) then ("single_block", i), MM-DiT's (SD3) ("double_block", i); None for
    other models."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    dm = getattr(model.model, "diffusion_model", None)
    if isinstance(dm, Flux):
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])
    if isinstance(dm, MMDiT):
        return [("double_block", i) for i in range(len(dm.joint_blocks))]
    return None


def attention_layers(model) -> list[tuple]:
    """The attention layers attention control acts on, in forward order, as ComfyUI's patch keys:
    a UNet's transformer layers (block, id, index), or a joint-attention transformer's blocks
    (:func:`dit_blocks`)."""
    dm = getattr(model.model, "diffusion_model", None)
    blocks = dit_blocks(model)
    if blocks is not None:
        return blocks
    if dm is None or not hasattr(dm, "input_blocks") or not hasattr(dm, "output_blocks"):
        raise InverseInputError("attention_control: prompt-to-prompt and MasaCtrl control a UNet's attention "
                                "(SD1.x, SD2.x, SDXL) or the joint attention of SD3's and Flux's blocks; this model "
                                "has neither. Disconnect attention_control: ProxEdit's proximal guidance alone works "
                                "on it.")
    keys = []
    stages = (("input", list(dm.input_blocks)), ("middle", [dm.middle_block] if dm.middle_block is not None else []),
              ("output", list(dm.output_blocks)))
    for name, blocks in stages:
        for i, block in enumerate(blocks):
            for m in block.modules():
                if hasattr(m, "transformer_blocks"):
                    keys += [(name, i, j) for j in range(len(m.transformer_blocks))]
    if not keys:
        raise InverseInputError("model: this UNet has no attention layers to control.")
    return keys


def masactrl_start_layer(layers: list[tuple]) -> int:
    """MasaCtrl's default start layer (:func:`attention_layers`): for a UNet its first decoder
    (output-block) layer plus a third of its decoder layers -- the paper's 10 for SD1.x/2.x (16
    layers, decoder 7-15), 46 for SDXL (70 layers, decoder 34-69); for a transformer the later half
    of its blocks (Flux: 28 of 57, single blocks 9-37; the flow-editing papers share the source's
    features in Flux's later single blocks; SD3.5 medium: 12 of 24)."""
    if layers and len(layers[0]) == 2:
        return len(layers) // 2
    decoder = [n for n, (block, _i, _j) in enumerate(layers) if block == "output"]
    if not decoder:
        return 0
    return decoder[0] + round(len(decoder) / 3)


def with_attention_control(model, controller):
    """A clone of ``model`` whose self- and cross-attention layers run through ``controller``
    (:class:`core.attention_control.AttentionController`); the shared model is not changed.
    The chunk roles come from ``extra_options["cond_or_uncond"]`` (indices into the conditioning
    list of the current call), so the order in which ComfyUI batches the chunks does not matter."""
    import comfy.ldm.modules.attention as attention

    layers = attention_layers(model)
    if len(layers[0]) == 2:
        return _with_joint_attention_control(model, controller, layers)
    order = {key: n for n, key in enumerate(layers)}
    clone = model.clone()

    def make_patch(kind):
        def patch(q, k, v, extra_options):
            block = extra_options.get("block")
            key = (block[0], block[1], extra_options.get("block_index", 0))
            roles = _roles(controller, extra_options)
            shape = extra_options.get("original_shape")
            precision = extra_options.get("attn_precision")
            controller.attention = lambda q_, k_, v_, h: attention.optimized_attention(q_, k_, v_, h, attn_precision=precision)
            return controller.attend(kind, key, order.get(key, -1), q, k, v, extra_options["n_heads"], roles,
                                     tuple(shape[-2:]) if shape else None)
        return patch

    self_patch, cross_patch = make_patch("self"), make_patch("cross")
    for name, i in sorted({(b, i) for b, i, _ in layers}):
        clone.set_model_attn1_replace(self_patch, name, i)
        clone.set_model_attn2_replace(cross_patch, name, i)
    return clone


def _roles(controller, transformer_options) -> list:
    index = (transformer_options or {}).get("cond_or_uncond") or [0]
    return [controller.roles[j] if j < len(controller.roles) else None for j in index]


def image_self_attention_blocks(model) -> set:
    """The blocks (:func:`dit_blocks` keys) of an MM-DiT that also run an image-only self-attention
    (SD3.5's ``x_block.attn2``: blocks 0-12 of SD3.5 medium), after the block's joint attention."""
    dm = getattr(model.model, "diffusion_model", None)
    return {("double_block", i) for i, b in enumerate(getattr(dm, "joint_blocks", None) or [])
            if getattr(getattr(b, "x_block", None), "x_block_self_attn", False)}


def _with_joint_attention_control(model, controller, blocks):
    """:func:`with_attention_control` for a joint-attention transformer (Flux, MM-DiT): a "dit" block
    patch on every block records where the image tokens sit in its joint sequence (the prompt's
    first, the image's after them; Flux's double blocks may flip the two), and an
    ``optimized_attention_override`` sends that block's joint attention through the controller
    (:meth:`core.attention_control.AttentionController.attend_joint`), and SD3.5's image-only
    self-attention of the same block too (all its tokens are image tokens; the controller keeps its
    keys/values apart from the joint attention's), so MasaCtrl acts on every self-attention of the
    image in the blocks it controls. An attention mask of the whole batch (Flux's ``attention_mask``
    conditioning) reaches each chunk's attention as that chunk's rows. Every other attention call,
    and every call outside an edit, goes to the attention it would have used (an earlier override
    included). The shared model is not changed."""
    dm = model.model.diffusion_model
    order = {key: n for n, key in enumerate(blocks)}
    image_only = image_self_attention_blocks(model)
    clone = model.clone()
    state: dict = {}

    def block_patch(key):
        def patch(args, extra):
            n_img = args["img"].shape[1]
            if key[0] == "single_block":  # Flux: one sequence, the prompt's tokens first
                n_txt = state.get("n_txt", 0)
                image, length = slice(n_txt, n_img), n_img
            else:
                n_txt = args["txt"].shape[1]
                state["n_txt"] = n_txt
                blocks_list = getattr(dm, "double_blocks", None)
                flipped = blocks_list is not None and getattr(blocks_list[key[1]], "flipped_img_txt", False)
                image = slice(0, n_img) if flipped else slice(n_txt, n_txt + n_img)
                length = n_txt + n_img
            state["block"] = (key, image, length)
            try:
                return extra["original_block"](args)
            finally:
                state.pop("block", None)
        return patch

    earlier = clone.model_options.get("transformer_options", {}).get("optimized_attention_override")

    def override(func, q, k, v, *rest, **kwargs):
        def run(q_, k_, v_, kw):  # the attention this call would have run (heads etc. in rest / kw)
            if earlier is not None:
                return earlier(func, q_, k_, v_, *rest, **kw)
            return func(q_, k_, v_, *rest, **kw)

        def plain(q_, k_, v_):
            return run(q_, k_, v_, kwargs)

        block = state.get("block")
        token_dim = 2 if kwargs.get("skip_reshape") else 1  # Flux: [B, heads, L, d]; MM-DiT: [B, L, heads d]
        if block is None:
            return plain(q, k, v)
        key, image, length = block
        tokens = q.shape[token_dim]
        if tokens == length:
            name = key
        elif key in image_only and tokens == image.stop - image.start:  # SD3.5: the image-only self-attention
            name, image = (*key, "image"), slice(0, tokens)
        else:
            return plain(q, k, v)
        masa = controller.masa
        mask = kwargs.get("mask")
        if mask is not None and masa is not None and "joint" in (masa.strategy, masa.base_strategy):
            # "source" keeps every token where it is (a mask still fits); "joint" appends tokens
            raise InverseInputError("attention_control: MasaCtrl's 'joint' strategy adds the source's image tokens "
                                    "to a masked attention; choose strategy 'source' with attention masks.")
        roles = _roles(controller, kwargs.get("transformer_options"))
        chunk_attention = None
        if isinstance(mask, Tensor) and mask.ndim >= 3 and len(roles) > 1 and mask.shape[0] == q.shape[0]:
            masks = mask.chunk(len(roles))  # the whole batch's mask: each chunk attends with its own rows

            def chunk_attention(j):
                return lambda q_, k_, v_: run(q_, k_, v_, dict(kwargs, mask=masks[j]))
        controller.attention = plain
        return controller.attend_joint(name, order[key], q, k, v, roles, image, token_dim, chunk_attention)

    for key in blocks:
        clone.set_model_patch_replace(block_patch(key), "dit", key[0], key[1])
    # after the block patches: each of them replaces the clone's transformer_options with a copy
    clone.model_options["transformer_options"] = {**clone.model_options.get("transformer_options", {}),
                                                  "optimized_attention_override": override}
    return clone


# ----------------------------------------------------------------------------------------------
# a GUIDER that runs one core edit step per model evaluation

class EditGuider(comfy.samplers.CFGGuider):
    """GUIDER for SamplerCustomAdvanced over an inversion. ``step(predictor, result, z, i)`` returns
    the edited z_{t-1} from z_t at grid step i (core.proxedit.edit_step); the guider returns the
    denoised prediction whose DDIM/Euler step lands exactly there (core.proxedit.ddim_x0_for), so a
    deterministic one-call-per-step sampler reproduces the core loop. The sigmas must be levels of
    the inversion's grid (its SIGMAS output, possibly split)."""

    def __init__(self, model, conds: Mapping[str, Any], result, step: Callable):
        super().__init__(model)
        self.inner_set_conds(dict(conds))
        self.result = result
        self.step = step
        self._device_result = None
        self.coords = coords_of(model)
        # the inversion's own levels (its SIGMAS output), whatever this model's table holds
        self._levels = [float(v) for v in grid_sigmas(model, result.grid)[:-1]]

    def _grid_index(self, sigma: float) -> int:
        grid = self.result.grid
        for i, s in enumerate(self._levels):
            if abs(s - sigma) <= 1e-4 * max(s, 1e-6):
                return i
        raise InverseInputError(
            f"sigmas: the sampler asked for sigma {sigma:.5g}, which is not a level of the inversion's "
            f"{grid.steps}-step grid; connect the inversion node's sigmas output (SplitSigmas to skip steps) "
            f"and a one-evaluation-per-step sampler such as euler or ddim.")

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        from ..core.proxedit import ddim_x0_for

        want = tuple(self.result.z0.shape)
        if tuple(x.shape) != want:
            raise InverseInputError(
                f"latent_image: SamplerCustomAdvanced gave a latent of shape {tuple(x.shape)} but the inversion is "
                f"{want}; connect the inversion's noise_latent (or a latent of the inverted image's size and batch).")
        predictor = ComfyNoisePredictor(self, model_options)
        if self._device_result is None:
            self._device_result = self.result.to(predictor.device)
        sigma = float(timestep.flatten()[0])
        i = self._grid_index(sigma)
        ab = self.result.grid.alphas_cumprod
        z = x.float() / self.coords.x_scale(self.coords.ddpm_sigma(sigma))
        z_next = self.step(predictor, self._device_result, z, i)
        return ddim_x0_for(z, z_next, ab[i], ab[i + 1]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# differentiable VAE coding in the diffusion model's latent space (posterior samplers)

DECODER_MEMORY = ("tiled", "checkpoint", "full")


def vae_downscale(vae) -> int:
    """Pixels per latent pixel of ``vae`` (8 for SD VAEs; 8 where ComfyUI gives no single number)."""
    ratio = getattr(vae, "downscale_ratio", 8)
    return int(ratio) if isinstance(ratio, (int, float)) else 8


class LatentCodec:
    """decode: model-space latent (after the latent format) -> image [B, 3, H, W] in [-1, 1];
    encode: the reverse. Both differentiable inside ``autograd()``; float32 in and out, the VAE
    runs in its own dtype. ``memory`` bounds the decoder's autograd memory (core/tiling.py):
    "tiled" decodes the fewest equal overlapping tiles of at most ``tile`` latent pixels a side
    one at a time, each checkpointed (the peak is one tile's graph; a latent within one tile
    decodes plainly), "checkpoint" recomputes the whole decoder in the backward pass (holds
    nothing between forward and backward, but the recomputation peaks like "full"), "full" keeps
    every activation. :meth:`decode_output` gives the final image through ComfyUI's own decode."""

    def __init__(self, vae, model, memory: str = "tiled", tile: int = 40):
        if memory not in DECODER_MEMORY:
            raise InverseInputError(f"decoder_memory: choose one of {', '.join(DECODER_MEMORY)}.")
        self.vae = vae
        self.latent_format = model.get_model_object("latent_format")
        self.memory, self.tile = memory, int(tile)
        comfy.model_management.load_models_gpu([vae.patcher])
        self.net = vae.first_stage_model
        self.device, self.dtype = vae.device, vae.vae_dtype
        self.calls = 0

    def _decode_raw(self, raw: Tensor) -> Tensor:
        return self.net.decode(raw.to(self.device, self.dtype)).float()

    def decode(self, z: Tensor) -> Tensor:
        from ..core.tiling import decode_bounded

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.calls += 1
        raw = self.latent_format.process_out(z.float())
        tile = self.tile if self.memory == "tiled" else 0
        return decode_bounded(self._decode_raw, raw, tile=tile, overlap=max(1, tile // 8),
                              checkpoint=self.memory != "full").to(z.device)

    def decode_output(self, z: Tensor) -> Tensor:
        """The final image exactly as ComfyUI's VAE Decode makes it (whole, with ComfyUI's own
        memory management and clamping, no tiles of ours): a ComfyUI IMAGE [B, H, W, C]."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        return self.vae.decode(self.latent_format.process_out(z.float()))

    def encode(self, x: Tensor) -> Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raw = self.net.encode(x.to(self.device, self.dtype)).float()
        return self.latent_format.process_in(raw).to(x.device)

    @contextlib.contextmanager
    def autograd(self):
        with torch.inference_mode(False), torch.enable_grad():
            make_autograd_safe(self.net)
            yield
