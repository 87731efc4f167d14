"""Input checks shared by the nodes: widget values against the schema, latents, images, masks and
conditioning batches; each failure is an InverseInputError naming the input and the fix."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from comfy_api.latest import io

from .errors import InverseInputError
from .vae import vae_downscale

Tensor = torch.Tensor


def check_widgets(node_cls, values: Mapping[str, Any]) -> None:
    """The widget values of a node call, checked against ``node_cls``'s schema before any work:
    every INT/FLOAT a finite number within min/max, every COMBO one of its options. ComfyUI's own
    prompt validation lets NaN through (NaN < min is false) and a node called directly gets none."""

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
    """The channels of the model's latents (its latent_format, as patches see it), or None if it has none."""
    try:
        fmt = model.get_model_object("latent_format")
    except (AttributeError, KeyError, TypeError):
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
