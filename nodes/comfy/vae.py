"""VAE coding: VaeCodec (the VAE's own encoder/decoder, for decoder inversion) and LatentCodec
(differentiable decoding in the diffusion model's latent units, for the posterior samplers)."""

from __future__ import annotations

import contextlib
import copy

import torch

import comfy.model_management

from ...core.tiling import decode_bounded
from .autograd import make_autograd_safe
from .errors import InverseInputError

Tensor = torch.Tensor


VAE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


DECODER_MEMORY = ("tiled", "checkpoint", "full")


def check_decoder_memory(memory: str) -> None:
    if memory not in DECODER_MEMORY:
        raise InverseInputError(f"decoder_memory: choose one of {', '.join(DECODER_MEMORY)}.")


def decode_with_memory(decode, z: Tensor, memory: str, tile: int) -> Tensor:
    """``decode(z)`` with the autograd memory of ``memory`` (core/tiling.py's decode_bounded): tiles
    of at most ``tile`` latent pixels feathered over an eighth of the tile for "tiled", the whole
    decoder recomputed in the backward pass for "checkpoint", everything kept for "full"."""
    tile = tile if memory == "tiled" else 0
    return decode_bounded(decode, z, tile=tile, overlap=max(1, tile // 8), checkpoint=memory != "full")


class VaeCodec:
    """Encoder and decoder callables over ComfyUI IMAGE tensors ([B, H, W, C] in [0, 1]) and raw
    VAE latents (a LATENT's "samples"), for core/decoder_inversion.py.

    precision "auto" uses ComfyUI's own ``VAE.encode``/``VAE.decode`` (the VAE's dtype, batching,
    and ComfyUI's automatic fallback to tiled coding when memory runs out). An explicit precision
    runs a private copy of the VAE's network in that dtype (the shared VAE is never changed).
    ``decode_differentiable`` is the unclamped decoder for gradient-based inversion, to be called
    inside ``autograd()``.
    """

    def __init__(self, vae, precision: str = "auto", memory: str = "full", tile: int = 64):
        if precision != "auto" and precision not in VAE_PRECISIONS:
            raise InverseInputError(f"precision: choose auto, {', '.join(VAE_PRECISIONS)}.")
        check_decoder_memory(memory)
        self.vae = vae
        self.precision = precision
        self.memory, self.tile = memory, int(tile)
        comfy.model_management.load_models_gpu([vae.patcher])
        self.device = vae.device
        self.dtype = vae.vae_dtype if precision == "auto" else VAE_PRECISIONS[precision]
        net = vae.first_stage_model
        if self.dtype != vae.vae_dtype:
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
        """The decoder with bounded autograd memory (core/tiling.py's decode_bounded, as LatentCodec):
        "tiled" decodes tiles of at most ``tile`` latent pixels one at a time, each recomputed in the
        backward pass; a latent within one tile decodes plainly, exactly."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = decode_with_memory(lambda zt: self.net.decode(zt.to(self.device, self.dtype)).float(), z, self.memory,
                                 self.tile)
        return ((out + 1.0) / 2.0).movedim(1, -1).to(z.device)

    @contextlib.contextmanager
    def autograd(self):
        with torch.inference_mode(False), torch.enable_grad():
            make_autograd_safe(self.net)
            yield


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
        check_decoder_memory(memory)
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

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.calls += 1
        raw = self.latent_format.process_out(z.float())
        return decode_with_memory(self._decode_raw, raw, self.memory, self.tile).to(z.device)

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
