"""The small protocols the methods in core/ are written against."""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor


class NoisePredictor(Protocol):
    """An epsilon-prediction model in the DDPM parameterisation.

    ``z`` is a latent ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` of shape ``[B, ...]``
    (float32), ``t`` an integer model timestep (0 .. T-1) and ``conds`` a sequence of opaque
    conditioning handles. The call returns the predicted noise for every handle, stacked
    into one tensor of shape ``[len(conds), B, ...]``; implementations evaluate all the
    handles in as few model calls as they can (one batched UNet call in the ComfyUI glue).
    Implementations must be differentiable in ``z`` (and in any tensor a handle carries)
    when called with gradients enabled.

    Optional attribute ``compute_dtype``: the dtype the model computes in (bfloat16 for Flux as
    usually loaded), where it differs from the float32 of the latents; finite differences size
    their step by it (core/inversion.py :func:`fd_step`).
    """

    def __call__(self, z: Tensor, t: int, conds: Sequence[Any]) -> Tensor: ...


# called after every step of a loop as callback(step_index, total_steps, latent);
# it may raise to cancel the loop.
StepCallback = Optional[Callable[[int, int, Tensor], None]]
