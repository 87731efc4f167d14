"""Inversion nodes: DDIM inversion, DDIM sampling from an inversion, the inversion SAMPLER."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import ddim
from ..core.result import InversionResult
from ..core.schedule import SPACINGS
from . import comfy_glue as glue
from .types import CATEGORY, Inversion

SPACING_OPTIONS = ["auto", *SPACINGS]

_SPACING_TIP = ("Which timesteps the steps use. auto: 'lcm' for LCM models, else 'leading' (Stable "
                "Diffusion's DDIM default, steps_offset 1). 'trailing' suits Turbo and zero-SNR models.")


def _latent_from_inputs(latent, image, vae) -> torch.Tensor:
    if latent is not None and image is not None:
        raise glue.InverseInputError("latent/image: connect either a LATENT or an IMAGE with a VAE, not both.")
    if latent is not None:
        return glue.latent_batch(latent)
    if image is None:
        raise glue.InverseInputError("latent/image: nothing to invert; connect a LATENT (e.g. from VAE Encode) "
                                     "or an IMAGE together with a VAE.")
    if vae is None:
        raise glue.InverseInputError("vae: an IMAGE input needs a VAE to encode it; connect the checkpoint's VAE.")
    return glue.encode_image(vae, image)


def _guidance_conds(positive, negative, guidance: float):
    """The named conditionings a guided run needs, and the name of the unconditional branch
    (None at guidance 1, where only the conditional branch is evaluated)."""
    if guidance == 1.0:
        return {"positive": positive}, None
    if negative is None:
        raise glue.InverseInputError("negative: guidance other than 1 needs a negative conditioning; "
                                     "connect one or set guidance to 1.")
    return {"positive": positive, "negative": negative}, "negative"


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDDIMInversion",
            display_name="DDIM Inversion",
            category=f"{CATEGORY}/inversion",
            description=("Finds the noise that regenerates an image: runs DDIM backwards (Song et al. 2021; "
                         "RNRI paper eq. 4) from the image's latent to the noisiest step. Outputs the whole "
                         "trajectory for the Inverse sampling and editing nodes, plus the noise latent and "
                         "SIGMAS for SamplerCustomAdvanced with DisableNoise and the ddim/euler sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL, LCM, Turbo)."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image being inverted."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative/unconditional prompt; used only when guidance is not 1."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The latent of the image to invert (e.g. from VAE Encode). Or connect image + vae."),
                io.Image.Input("image", optional=True, tooltip="The image to invert, encoded with the vae input."),
                io.Vae.Input("vae", optional=True, tooltip="VAE used to encode the image input."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Number of DDIM steps; 50 for SD models, 2-8 for LCM/Turbo."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale during inversion. 1 (the default) inverts "
                                       "most faithfully; larger values make plain DDIM inversion inexact."),
                io.Combo.Input("spacing", options=SPACING_OPTIONS, default="auto", tooltip=_SPACING_TIP),
            ],
            outputs=[
                Inversion.Output(display_name="inversion", tooltip="The inversion trajectory and its timesteps."),
                io.Latent.Output(display_name="noise_latent",
                                 tooltip="The inverted noise, in ComfyUI's convention (sample it with add_noise off)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The sigmas of the inversion's steps."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, steps, guidance, spacing, negative=None, latent=None, image=None,
                vae=None) -> io.NodeOutput:
        glue.check_diffusion_model(model)
        conds, uncond = _guidance_conds(positive, negative, guidance)
        samples = _latent_from_inputs(latent, image, vae)
        grid = glue.make_grid(model, steps, spacing)
        progress = glue.ProgressReporter(grid.steps)

        def run(pred):
            z0 = pred.process_latent_in(samples.to(pred.device))
            traj = ddim.ddim_invert(pred, z0, grid, "positive", uncond, guidance, callback=progress)
            return [z.detach().float().cpu() for z in traj], pred.calls

        traj, calls = glue.run_with_predictor(model, conds, samples.shape, run)
        result = InversionResult(traj, grid, method="ddim", guidance=guidance, extras={"model_calls": calls})
        noise = glue.to_comfy_latent(result.noise_latent, grid.alphas_cumprod[0])
        out_latent = {"samples": model.model.process_latent_out(noise)}
        return io.NodeOutput(result, out_latent, glue.grid_sigmas(grid))


class DDIMSampleFromInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDDIMSample",
            display_name="DDIM Sample from Inversion",
            category=f"{CATEGORY}/inversion",
            description=("Runs deterministic DDIM sampling (RNRI paper eq. 2) from an inversion's noise on the "
                         "inversion's own timesteps. With the inversion's prompt and guidance it reconstructs "
                         "the image; with another prompt it edits it. A mask limits the change to a region."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model used for the inversion."),
                io.Conditioning.Input("positive", tooltip="Prompt to sample with (the inversion's prompt reconstructs)."),
                Inversion.Input("inversion", tooltip="Output of an Inverse inversion node."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative/unconditional prompt; used only when guidance is not 1."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; use the inversion's scale to reconstruct."),
                io.Int.Input("skip_steps", default=0, min=0, max=1000,
                             tooltip="Start this many steps later, from the inversion's latent at that step "
                                     "(keeps more of the original image)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where to regenerate (white). Elsewhere every step keeps the inversion's latent."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent; decode it with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, inversion, guidance, skip_steps, negative=None, mask=None) -> io.NodeOutput:
        glue.check_diffusion_model(model)
        if not isinstance(inversion, InversionResult):
            raise glue.InverseInputError("inversion: expected the output of an Inverse inversion node.")
        grid = inversion.grid
        if skip_steps >= grid.steps:
            raise glue.InverseInputError(f"skip_steps: must be below the inversion's {grid.steps} steps.")
        conds, uncond = _guidance_conds(positive, negative, guidance)
        shape = inversion.z0.shape
        latent_mask = glue.latent_mask(mask, shape, "mask") if mask is not None else None
        progress = glue.ProgressReporter(grid.steps - skip_steps)

        def run(pred):
            keep = [z.to(pred.device) for z in inversion.trajectory[::-1]]
            m = latent_mask.to(pred.device) if latent_mask is not None else None
            traj = ddim.ddim_sample(pred, keep[skip_steps], grid, "positive", uncond, guidance,
                                    callback=progress, start_step=skip_steps, mask=m,
                                    keep=keep if m is not None else None)
            return pred.process_latent_out(traj[-1]).cpu()

        return io.NodeOutput({"samples": glue.run_with_predictor(model, conds, shape, run)})


def _invert_with_sampler(predictor, z0, grid, callback):
    return ddim.ddim_invert(predictor, z0, grid, None, callback=callback)


class DDIMInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseSamplerDDIMInversion",
            display_name="DDIM Inversion Sampler",
            category=f"{CATEGORY}/inversion",
            description=("A SAMPLER for SamplerCustomAdvanced that inverts instead of denoising: it runs DDIM "
                         "backwards from the input latent over the SIGMAS (either order; they must reach 0) using "
                         "the connected GUIDER's prediction, and returns the noise latent. Use it with "
                         "DisableNoise; sample the result back with the ddim or euler sampler on the same sigmas."),
            inputs=[],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(glue.make_inversion_sampler(_invert_with_sampler))


NODES = [DDIMInversion, DDIMSampleFromInversion, DDIMInversionSampler]
