"""The NoisePredictor core/ is written against, over a ComfyUI MODEL (ComfyNoisePredictor: named
CONDITIONINGs through calc_cond_batch) or over a k-diffusion denoiser (KDiffusionPredictor, inside a
SAMPLER)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

import comfy.model_management
import comfy.samplers

from ...core import schedule as core_schedule
from ...core.flow import Coords
from .autograd import SavedTensorGuard, _under_functorch, adds_in_place, make_autograd_safe
from .errors import InverseInputError
from .schedule import coords_of, level_sigma, model_compute_dtype, model_sigma_table

Tensor = torch.Tensor


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


def cond_embedding(cond) -> Tensor:
    """The cross-attention embedding [B, tokens, dim] of a CONDITIONING's first entry."""
    return cond[0][0]
