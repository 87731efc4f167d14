"""Flow-native editing nodes over core/flow_edit.py: FlowEdit (a node, and a GUIDER/SAMPLER pair for
SamplerCustomAdvanced) and RF-Inversion, on any model (SD3/SD3.5 and Flux natively; SD1.x/SDXL
through the flow view of their noise prediction), with masks."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import flow_edit as fe
from . import comfy as glue
from .inversion import _latent_from_inputs
from .schema import advanced
from .types import CATEGORY

SUB = f"{CATEGORY}/flow editing"


def _model_and_prompts() -> list[io.Input]:
    """FlowEdit's model and prompt sockets (the node and the GUIDER)."""
    return [io.Model.Input("model", tooltip="Any model: SD3/SD3.5 and Flux natively, SD1.x/SDXL through the flow "
                                            "view of their noise prediction."),
            io.Conditioning.Input("source", tooltip="A prompt describing the photo."),
            io.Conditioning.Input("target", tooltip="The same prompt with the edit (e.g. 'cat' -> 'tiger')."),
            io.Conditioning.Input("negative", optional=True,
                                  tooltip="Empty prompt for classifier-free guidance (SD3, SD1.x, SDXL); not used "
                                          "by Flux dev, whose guidance is embedded.")]


def _image_inputs() -> list[io.Input]:
    return [io.Latent.Input("latent", optional=True, tooltip="The photo's latent (VAE Encode), or connect image + vae."),
            io.Image.Input("image", optional=True, tooltip="The photo, encoded with the vae input (instead of latent)."),
            io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE, to encode the image input.")]


def _mask_inputs() -> list[io.Input]:
    return [io.Mask.Input("mask", optional=True,
                          tooltip="Where to edit (1) and where to keep the photo (0): outside the mask the result is "
                                  "the photo's latent exactly. Without a mask the whole image is edited."),
            advanced(io.Float.Input("feather", default=2.0, min=0.0, max=32.0, step=0.5,
                                    tooltip="Blend the edit in over about this many latent pixels (8 image pixels "
                                            "each) inside the mask's edge; 0: a hard edge."))]


def _conds(model, source, target, negative, src_guidance: float, tar_guidance: float):
    """The named conditionings and the guidance scales core/ applies. A guidance-embedded model
    (Flux dev) gets each scale as its embedded guidance (as FluxGuidance sets it; the authors'
    FLUX FlowEdit) and no CFG batch; any other model gets classifier-free guidance with the
    negative prompt."""
    if glue.guidance_embedded(model):
        return ({"source": glue.with_guidance(source, src_guidance), "target": glue.with_guidance(target, tar_guidance)},
                None, 1.0, 1.0)
    if negative is None:
        if src_guidance != 1.0 or tar_guidance != 1.0:
            raise glue.InverseInputError(
                "negative: guidance other than 1 needs a negative conditioning on this model (it has no guidance "
                "embedding); connect a CLIP Text Encode with empty text, or set both guidance scales to 1.")
        return {"source": source, "target": target}, None, 1.0, 1.0
    return {"source": source, "target": target, "negative": negative}, "negative", src_guidance, tar_guidance


def _flowedit_settings_inputs() -> list[io.Input]:
    return [
        io.Float.Input("source_guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                       tooltip="Guidance of the source velocity (paper: SD3 3.5 with CFG; Flux 1.5, as its embedded "
                               "guidance)."),
        io.Float.Input("target_guidance", default=13.5, min=0.0, max=30.0, step=0.1,
                       tooltip="Guidance of the target velocity (paper: SD3 13.5; Flux 5.5). Higher: a stronger "
                               "edit."),
        io.Int.Input("n_max", default=33, min=0, max=1000,
                     tooltip="How many of the last steps edit (paper: SD3 33 of 50; Flux 24 of 28). Fewer: closer to "
                             "the photo; more: freer to change its layout. 0 returns the photo."),
        advanced(io.Int.Input("n_min", default=0, min=0, max=1000,
                              tooltip="Of those, how many last steps are plain sampling of the target prompt from "
                                      "the edit noised once (paper: 0): finer detail, less faithful.")),
        advanced(io.Int.Input("n_avg", default=1, min=1, max=16,
                              tooltip="Noise draws averaged per step (paper: 1). Each costs two model calls.")),
    ]


def _check_n(n_max: int, n_min: int, steps: int) -> None:
    if n_max > steps:
        raise glue.InverseInputError(f"n_max: {n_max} is more than the {steps} steps; at most the number of steps.")
    if n_min > n_max:
        raise glue.InverseInputError(f"n_min: {n_min} is more than n_max ({n_max}); n_min counts the last of the "
                                     f"n_max editing steps.")


def _as_latent(model, samples, x, out):
    """The LATENT of the edited model-space latent ``out`` of ``samples`` (model space: ``x``), written
    as samples + (out - x) in LATENT space (process_latent_out is affine), so that wherever the
    edit kept the model-space latent bit for bit (outside a mask, an unchanged prompt) the output is
    the input LATENT bit for bit, not its round trip through the latent scale and shift."""
    return samples + (glue.to_latent_output(model, out) - glue.to_latent_output(model, x)).cpu()


def _prepared_mask(mask, shape, feather: float):
    if mask is None:
        return None
    return fe.feather_mask(glue.latent_mask(mask, shape), feather)


class FlowEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseFlowEdit",
            display_name="FlowEdit",
            category=SUB,
            description=("FlowEdit (Kulikov et al. 2024, Algorithm 1): inversion-free editing. Over the last n_max "
                         "steps it integrates the difference of the target and source velocities, each taken on a "
                         "freshly noised copy of the photo, so the edit never passes through pure noise. The target "
                         "prompt equal to the source returns the photo exactly. Model calls: 2 x n_avg per editing "
                         "step (with their CFG batch). Defaults are the paper's SD3 settings; for Flux use 28 steps, "
                         "n_max 24 and guidance 1.5 / 5.5 (workflow 'FlowEdit on Flux')."),
            inputs=[
                *_model_and_prompts(),
                *_image_inputs(),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Steps of the model's own schedule (paper: SD3 50; Flux 28)."),
                *_flowedit_settings_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise drawn at every step."),
                *_mask_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited latent (VAE Decode it)."),
                     io.String.Output(display_name="report", tooltip="Steps, model calls and settings used.")],
        )

    @classmethod
    def execute(cls, model, source, target, steps, source_guidance, target_guidance, n_max, seed, n_min=0, n_avg=1,
                negative=None, latent=None, image=None, vae=None, mask=None, feather=2.0) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        glue.check_diffusion_model(model)
        samples = _latent_from_inputs(latent, image, vae, model)
        _check_n(n_max, n_min, steps)
        conds, uncond, gs, gt = _conds(model, source, target, negative, source_guidance, target_guidance)
        for name, c in conds.items():
            glue.check_cond_batch(c, samples.shape[0], name)
        grid = glue.make_grid(model, steps)
        m = _prepared_mask(mask, samples.shape, feather)
        progress = glue.ProgressReporter(n_max)
        first = steps - n_max

        def run(pred):
            x = pred.process_latent_in(samples.to(pred.device))
            out = fe.flowedit(pred, x, grid, "source", "target", uncond, gs, gt, n_max, n_min, n_avg,
                              torch.Generator().manual_seed(int(seed)), None if m is None else m.to(x.device),
                              callback=lambda i, total, z: progress(i - first, total, z))
            return _as_latent(model, samples, x, out), pred.calls

        out, calls = glue.run_with_predictor(model, conds, samples.shape, run, seed=int(seed))
        report = (f"flowedit: {n_max} of {steps} steps edit ({n_min} plain target steps), n_avg {n_avg}, "
                  f"guidance {source_guidance:g} -> {target_guidance:g}"
                  f"{' (embedded)' if glue.guidance_embedded(model) else ''}; {calls} model calls"
                  f"{'; masked' if m is not None else ''}")
        return io.NodeOutput({"samples": out}, report)


class FlowEditGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseFlowEditGuider",
            display_name="FlowEdit Guider",
            category=SUB,
            description=("FlowEdit as a GUIDER for SamplerCustomAdvanced, with the FlowEdit Sampler: the source, "
                         "target and negative prompts and their guidance. Connect the photo's latent as "
                         "latent_image (SetLatentNoiseMask on it restricts the edit to the mask), a scheduler's "
                         "SIGMAS (BasicScheduler: the paper's steps) and RandomNoise (its seed draws FlowEdit's "
                         "noise). Gives the FlowEdit node's result for the same settings."),
            inputs=[
                *_model_and_prompts(),
                *_flowedit_settings_inputs()[:2],
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, source, target, source_guidance, target_guidance, negative=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        glue.check_diffusion_model(model)
        conds, uncond, gs, gt = _conds(model, source, target, negative, source_guidance, target_guidance)
        return io.NodeOutput(glue.NamedCondGuider(model, conds, "FlowEdit",
                                                  {"uncond": uncond, "source_guidance": gs, "target_guidance": gt}))


class FlowEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseFlowEditSampler",
            display_name="FlowEdit Sampler",
            category=SUB,
            description=("FlowEdit's ODE as a SAMPLER for SamplerCustomAdvanced, with the FlowEdit Guider: over the "
                         "last n_max of the SIGMAS' steps it edits the latent_image (the photo), inside its noise "
                         "mask if it has one."),
            inputs=[*_flowedit_settings_inputs()[2:],
                    advanced(io.Float.Input("feather", default=2.0, min=0.0, max=32.0, step=0.5,
                                            tooltip="Blend the edit in over about this many latent pixels inside the "
                                                    "noise mask's edge; 0: a hard edge."))],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, n_max, n_min=0, n_avg=1, feather=2.0) -> io.NodeOutput:
        glue.check_widgets(cls, locals())

        def first_step(steps):  # the steps before the last n_max do nothing: they are not gridded at all
            _check_n(n_max, n_min, steps)
            return steps - n_max

        def run(pred, settings, x, grid, mask, seed, callback):
            if n_max == 0:  # nothing edits: the photo
                return x
            return fe.flowedit(pred, x, grid, "source", "target", settings["uncond"], settings["source_guidance"],
                               settings["target_guidance"], grid.steps, n_min, n_avg, torch.Generator().manual_seed(seed),
                               None if mask is None else fe.feather_mask(mask, feather), callback=callback)

        return io.NodeOutput(glue.make_guider_sampler("FlowEdit", run, first_step))


class RFInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseRFInversion",
            display_name="RF-Inversion Edit",
            category=SUB,
            description=("RF-Inversion (Rout et al., ICLR 2025): inverts the photo with the controlled forward ODE "
                         "(gamma pulls it toward a fixed noise sample, eq. 8), then samples the target prompt with "
                         "the controlled reverse ODE (eta pulls it toward the photo's structure over the steps "
                         "[start, stop), eq. 15): stylisation and semantic edits that keep the layout. Model calls: "
                         "2 x steps. gamma 0 and eta 0 are plain Euler (DDIM) inversion and sampling."),
            inputs=[
                io.Model.Input("model", tooltip="Any model: Flux and SD3/SD3.5 natively, SD1.x/SDXL through the flow "
                                                "view of their noise prediction."),
                io.Conditioning.Input("source", tooltip="The prompt the photo is inverted with (the authors use an "
                                                        "empty prompt)."),
                io.Conditioning.Input("target", tooltip="What to make of the photo (e.g. 'a watercolour painting of "
                                                        "a cat')."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Empty prompt for classifier-free guidance of the target (SD models); "
                                              "not used by Flux dev."),
                *_image_inputs(),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Steps each way (paper: 28)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance of the target sampling (paper: 3.5, Flux's embedded guidance; with "
                                       "CFG on SD models about 5). Inversion runs without guidance (Flux: embedded "
                                       "0, as the authors)."),
                io.Float.Input("gamma", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Controller strength of the inversion (paper: 0.5). 0: Euler inversion; 1: the "
                                       "straight line to the noise sample (most editable, least faithful)."),
                io.Float.Input("eta", default=0.9, min=0.0, max=1.0, step=0.05,
                               tooltip="Controller strength of the sampling toward the photo (paper: 0.9). Higher "
                                       "keeps more of the photo's structure; 0 ignores it."),
                advanced(io.Int.Input("start", default=0, min=0, max=1000,
                                      tooltip="First sampling step with eta (paper: 0).")),
                advanced(io.Int.Input("stop", default=7, min=0, max=1000,
                                      tooltip="Sampling steps before this one use eta (paper: 7 of 28, a quarter).")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise sample the inversion is pulled toward."),
                *_mask_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited latent (VAE Decode it)."),
                     io.String.Output(display_name="report", tooltip="Steps, model calls and settings used.")],
        )

    @classmethod
    def execute(cls, model, source, target, steps, guidance, gamma, eta, seed, start=0, stop=7, negative=None,
                latent=None, image=None, vae=None, mask=None, feather=2.0) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        glue.check_diffusion_model(model)
        samples = _latent_from_inputs(latent, image, vae, model)
        if stop > steps or start > stop:
            raise glue.InverseInputError(f"start/stop: need start <= stop <= steps ({start}, {stop}, {steps}).")
        embedded = glue.guidance_embedded(model)
        # the inversion runs on the source without guidance (Flux dev: embedded 0, as the authors do)
        conds, uncond, _, g = _conds(model, source, target, negative, 0.0 if embedded else 1.0, guidance)
        for name, c in conds.items():
            glue.check_cond_batch(c, samples.shape[0], name)
        grid = glue.make_grid(model, steps)
        m = _prepared_mask(mask, samples.shape, feather)
        progress = glue.ProgressReporter(2 * steps)
        second = progress.stage(steps)

        def run(pred):
            x0 = pred.process_latent_in(samples.to(pred.device))
            gen = torch.Generator().manual_seed(int(seed))
            path = fe.rf_invert(pred, x0, grid, "source", gamma=gamma, generator=gen, callback=progress,
                                return_path=True)
            out = fe.rf_sample(pred, path[-1], grid, x0, "target", uncond, g, eta, start, stop, callback=second,
                               mask=None if m is None else m.to(x0.device), keep=path[::-1] if m is not None else None)
            return _as_latent(model, samples, x0, out), pred.calls

        out, calls = glue.run_with_predictor(model, conds, samples.shape, run, seed=int(seed))
        report = (f"rf_inversion: {steps} steps each way, gamma {gamma:g}, eta {eta:g} on steps [{start}, {stop}), "
                  f"guidance {guidance:g}{' (embedded)' if embedded else ''}; {calls} model calls"
                  f"{'; masked' if m is not None else ''}")
        return io.NodeOutput({"samples": out}, report)


NODES = [FlowEdit, FlowEditGuider, FlowEditSampler, RFInversion]
