"""Decoder inversion node: the latent whose decoding best matches an image."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..core import decoder_inversion as di
from . import comfy as glue
from .plot import plot_curves
from .schema import advanced, decoder_memory_inputs
from .types import CATEGORY

DI_METHODS = list(di.METHODS)


class DecoderInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDecoderInversion",
            display_name="Decoder Inversion",
            category=f"{CATEGORY}/vae",
            description=("Finds the latent whose VAE decoding best matches the image, improving on VAE Encode. "
                         "Gradient-free methods (Hong et al. 2024) iterate z <- z - step (E(D(z)) - E(x)) with "
                         "encoder and decoder forward passes only: little memory, any precision. gradient_based "
                         "runs Adam on ||D(z) - x||^2 through the decoder (the usual baseline). Outputs the "
                         "latent, a plot of the convergence and the per-iteration numbers."),
            inputs=[
                io.Image.Input("image", tooltip="The image to invert."),
                io.Vae.Input("vae", tooltip="The VAE whose decoder is inverted."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Starting latent (default: the VAE's encoding of the image)."),
                io.Combo.Input("method", options=DI_METHODS, default="gradient_free_adam",
                               tooltip="gradient_free_adam: the authors' Adam-moment variant as their code runs it "
                                       "(smhongok/dec-inv decoder_inv_nograd): step warm-up over the first tenth and "
                                       "cosine decay over min(iterations, 100) iterations, held at its last value from "
                                       "80% of those on (so 200 iterations = their 100-iteration schedule, then 120 at "
                                       "a constant step); Adam eps 1e-4 when the VAE runs in 16 bit, 1e-8 in fp32. "
                                       "Kept different: the latent is float32 in every precision. "
                                       "gradient_free_fixed_point: eq. 8 with a constant step; gradient_free_momentum: "
                                       "inertial KM (eq. 10-11); gradient_based: Adam through the decoder."),
                io.Int.Input("iterations", default=100, min=1, max=2000, tooltip="Number of iterations (paper: 100)."),
                io.Float.Input("step_size", default=0.01, min=1e-5, max=2.0, step=0.001, round=1e-5,
                               tooltip="gradient_free_adam: peak step (paper 0.01); fixed point: rho (the authors' "
                                       "0.01 creeps without drift; 0.2-0.5 gain most within 20 iterations, then "
                                       "drift); "
                                       "momentum: lambda, step 2*lambda (must satisfy eq. 13 with the momentum); "
                                       "gradient_based: Adam learning rate (0.01)."),
                advanced(io.Float.Input("momentum", default=0.3, min=0.0, max=0.99, step=0.01,
                                        tooltip="Momentum alpha of gradient_free_momentum.")),
                advanced(io.Combo.Input("precision", options=["auto", *glue.VAE_PRECISIONS], default="auto",
                                        tooltip="auto: the VAE's own dtype through ComfyUI's VAE (tiles when memory "
                                                "runs out); fp16/bf16/fp32: a private copy of the VAE in that "
                                                "precision. The latent is always float32.")),
            ] + decoder_memory_inputs(
                glue.DECODER_MEMORY, 64,
                "gradient_based only (the gradient-free methods keep no graph): autograd memory of the decoder. "
                "tiled: images larger than tile_size decode as the fewest equal overlapping tiles, one at a time, "
                "recomputed in the backward pass, so the peak is one tile's (an SD VAE at 1024 px: about a seventh of "
                "full; the seams are feathered, so the objective is the tiled decoder's, while the reported error is "
                "the whole decoder's); images within one tile decode whole, exactly. full: the whole decoder's graph "
                "(SD VAE, 16 bit: about 3 GB at 512 px, 12 GB at 1024 px). checkpoint: the whole decoder, recomputed "
                "in the backward pass.",
                "Largest tile side in latent pixels for decoder_memory tiled (64 = 512 px with an SD VAE: 512 px "
                "images decode whole, 1024 px ones as 3 x 3 tiles of 384 px)."),
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The inverted latent."),
                io.Image.Output(display_name="convergence_plot", tooltip="Residual and reconstruction error per iteration."),
                io.String.Output(display_name="record", tooltip="The per-iteration numbers as JSON."),
            ],
        )

    @classmethod
    def execute(cls, image, vae, method, iterations, step_size, momentum, precision, latent=None,
                decoder_memory="tiled", tile_size=64) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        if method == "gradient_free_momentum" and not di.km_condition(momentum, step_size):
            raise glue.InverseInputError(
                f"step_size/momentum: lambda {step_size} with momentum {momentum} breaks the convergence condition "
                f"lambda (1 - a + 2 a^2) < (1 - a)^2 (paper eq. 13); lower step_size below "
                f"{(1 - momentum) ** 2 / (1 - momentum + 2 * momentum ** 2):.4g}.")
        glue.check_image(image, "image", vae)
        codec = glue.VaeCodec(vae, precision, decoder_memory, tile_size)
        x = codec.crop(image)
        z0 = None
        if latent is not None:
            z0 = glue.latent_batch(latent, "latent")
            expected = codec.encode(x[:1]).shape[1:]
            if tuple(z0.shape[1:]) != tuple(expected) or z0.shape[0] not in (1, x.shape[0]):
                raise glue.InverseInputError(f"latent: shape {tuple(z0.shape)} does not fit the image's latent "
                                             f"{(x.shape[0],) + tuple(expected)}; encode this image with this VAE.")
            z0 = z0.expand(x.shape[0], *z0.shape[1:]).float()
        problem = di.Problem(codec.encode, codec.decode, x, z0, decode_differentiable=codec.decode_differentiable,
                             grad_context=codec.autograd, callback=glue.ProgressReporter(iterations))
        cfg = di.DecoderInversionConfig(iterations, step_size, momentum, adam_eps=di.adam_eps(codec.dtype))
        result = di.METHODS[method](problem, cfg)
        z, rec = result.latent, result.record
        curves = {"reconstruction RMS": rec.recon}
        if rec.residual:
            curves["residual RMS(E(D(z)) - E(x))"] = rec.residual
        plot = plot_curves(curves, f"decoder inversion: {method}, {iterations} iterations, {precision}")
        record = json.dumps({"method": method, "iterations": iterations, "precision": precision,
                             "decoder_memory": decoder_memory if method == "gradient_based" else None,
                             "reconstruction_rms": rec.recon, "residual_rms": rec.residual})
        return io.NodeOutput({"samples": z.detach().cpu().float()}, plot, record)


NODES = [DecoderInversion]
