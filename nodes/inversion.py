"""Inversion nodes: DDIM, exact (RNRI / fixed-point / gradient descent), negative-prompt,
null-text and edit-friendly DDPM inversion; sampling from any inversion; the inversion SAMPLER.

Every inversion node outputs the same INVERSE_INVERSION socket plus the noise latent, the SIGMAS
of its steps (for SamplerCustomAdvanced) and a one-line text report.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import flow_solvers
from ..core import inversion as inv
from ..core.result import InversionResult
from ..core.schedule import SPACINGS
from . import comfy as glue
from .schema import advanced
from .types import CATEGORY, Inversion

SPACING_OPTIONS = ["auto", *SPACINGS]
SUB = f"{CATEGORY}/inversion"

_SPACING_TIP = ("Which timesteps the steps use. auto: 'lcm' for LCM models, else 'leading' (Stable "
                "Diffusion's DDIM default, steps_offset 1). 'trailing' suits Turbo and zero-SNR models.")


# ---------------------------------------------------------------------------------------------
# shared inputs and outputs

def _source_inputs(steps_default: int = 50, guidance_default: float = 1.0, negative_tip: str = None) -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model: SD1.x, SD2.x, SDXL, LCM, Turbo, or a flow model (SD3/SD3.5, Flux)."),
        io.Conditioning.Input("positive", tooltip="The prompt describing the image being inverted."),
        io.Conditioning.Input("negative", optional=True, tooltip=negative_tip or
                              "Negative/unconditional prompt; used only when guidance is not 1."),
        io.Latent.Input("latent", optional=True,
                        tooltip="The latent of the image to invert (e.g. from VAE Encode). Or connect image + vae."),
        io.Image.Input("image", optional=True, tooltip="The image to invert, encoded with the vae input."),
        io.Vae.Input("vae", optional=True, tooltip="VAE used to encode the image input."),
        io.Int.Input("steps", default=steps_default, min=1, max=1000,
                     tooltip="Number of steps; 50 for SD models, 28 for Flux and SD3.5, 2-8 for LCM/Turbo."),
        io.Float.Input("guidance", default=guidance_default, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale the inversion is made for; sample with the same "
                               "scale to reconstruct."),
        advanced(io.Combo.Input("spacing", options=SPACING_OPTIONS, default="auto", tooltip=_SPACING_TIP)),
    ]


def _result_outputs() -> list:
    return [
        Inversion.Output(display_name="inversion", tooltip="The inversion: trajectory, timesteps, method state."),
        io.Latent.Output(display_name="noise_latent",
                         tooltip="The inverted noise, in ComfyUI's convention (sample it with add_noise off)."),
        io.Sigmas.Output(display_name="sigmas", tooltip="The sigmas of the inversion's steps."),
        io.String.Output(display_name="report", tooltip="Method, steps, model calls and per-step residuals."),
    ]


def _latent_from_inputs(latent, image, vae, model) -> torch.Tensor:
    if latent is not None and image is not None:
        raise glue.InverseInputError("latent/image: connect either a LATENT or an IMAGE with a VAE, not both.")
    if latent is not None:
        return glue.latent_batch(latent, "latent", model)
    if image is None:
        raise glue.InverseInputError("latent/image: nothing to invert; connect a LATENT (e.g. from VAE Encode) "
                                     "or an IMAGE together with a VAE.")
    if vae is None:
        raise glue.InverseInputError("vae: an IMAGE input needs a VAE to encode it; connect the checkpoint's VAE.")
    samples = glue.encode_image(vae, image)
    glue.check_latent_for_model(samples, model, "vae")
    return samples


def _guidance_conds(positive, negative, guidance: float):
    """The named conditionings a guided run needs, and the name of the unconditional branch
    (None at guidance 1, where only the conditional branch is evaluated)."""
    if guidance == 1.0:
        return {"positive": positive}, None
    if negative is None:
        raise glue.InverseInputError("negative: guidance other than 1 needs a negative conditioning; "
                                     "connect one or set guidance to 1.")
    return {"positive": positive, "negative": negative}, "negative"


class _Source:
    """Validated inputs of an inversion node."""

    def __init__(self, model, positive, negative, latent, image, vae, steps, guidance, spacing):
        glue.check_diffusion_model(model)
        self.model = model
        self.samples = _latent_from_inputs(latent, image, vae, model)
        self.conds, self.uncond = _guidance_conds(positive, negative, guidance)
        for name, c in self.conds.items():
            glue.check_cond_batch(c, self.samples.shape[0], name)
        self.grid = glue.make_grid(model, steps, spacing)
        self.guidance = guidance
        self.progress = glue.ProgressReporter(self.grid.steps)

    def two_stage_progress(self):
        """Progress for a node that runs two loops of ``steps`` steps each."""
        self.progress = glue.ProgressReporter(2 * self.grid.steps)
        return self.progress, self.progress.stage(self.grid.steps)

    def run(self, fn, extra_conds=None):
        """fn(pred, z0) -> value, with z0 the model-space latent on the model's device."""
        conds = dict(self.conds, **(extra_conds or {}))
        return glue.run_with_predictor(
            self.model, conds, self.samples.shape,
            lambda pred: fn(pred, pred.process_latent_in(self.samples.to(pred.device))))


def _report(result: InversionResult) -> str:
    e = result.extras
    parts = [f"{result.method}: {result.grid.steps} steps, guidance {result.guidance:g}",
             f"{e.get('model_calls', 0)} model calls"]
    if e.get("grad_calls"):
        parts.append(f"{e['grad_calls']} with gradients")
    res = result.report.residuals
    if res:
        parts.append(f"residual mean|z - f(z)| per step: mean {sum(res) / len(res):.2e}, max {max(res):.2e}, "
                     f"below 1e-4 on {sum(r < 1e-4 for r in res)}/{len(res)} steps")
    if e.get("null_text_losses"):
        parts.append(f"null-text loss max {max(e['null_text_losses']):.2e}")
    return "; ".join(parts)


def _outputs(model, result: InversionResult, positive=None, negative=None) -> io.NodeOutput:
    """The node outputs; the inversion keeps its prompts (editing nodes start from them)."""
    if positive is not None:
        result.extras.setdefault("source_cond", positive)
    if negative is not None:
        result.extras.setdefault("negative_cond", negative)
    noise = glue.to_start_latent(result.noise_latent, result.grid.alphas_cumprod[0], glue.coords_of(model))
    return io.NodeOutput(result, {"samples": glue.to_latent_output(model, noise)},
                         glue.grid_sigmas(model, result.grid), _report(result))


def _finish(result: InversionResult, pred, **extras) -> InversionResult:
    """The core result on the CPU, with the model calls it took and the node's extras."""
    result = result.to("cpu")
    result.extras.update(model_calls=pred.calls, grad_calls=pred.grad_calls, **extras)
    return result


# ---------------------------------------------------------------------------------------------
# inversion nodes

class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDDIMInversion",
            display_name="DDIM Inversion",
            category=SUB,
            description=("Finds the noise that regenerates an image: runs DDIM backwards (Song et al. 2021; "
                         "RNRI paper eq. 4) from the image's latent to the noisiest step. Outputs the whole "
                         "trajectory for the Inverse sampling and editing nodes, plus the noise latent and "
                         "SIGMAS for SamplerCustomAdvanced with DisableNoise and the ddim/euler sampler."),
            inputs=_source_inputs(),
            outputs=_result_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, steps, guidance, spacing, negative=None, latent=None, image=None,
                vae=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        src = _Source(model, positive, negative, latent, image, vae, steps, guidance, spacing)

        def run(pred, z0):
            return _finish(inv.invert(pred, z0, src.grid, "positive", src.uncond, guidance, callback=src.progress),
                           pred)

        return _outputs(model, src.run(run), positive, negative)


EXACT_METHODS = [*inv.SOLVERS, *inv.FLOW_SOLVERS]


class ExactInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseExactInversion",
            display_name="Exact Inversion (Anderson / Newton-Krylov / RNRI / FireFlow / RF-Solver)",
            category=SUB,
            description=("Inverts by solving DDIM's implicit inversion equation z = f(z) at every step instead "
                         "of approximating it (RNRI paper eq. 3). anderson (default, the most accurate per model "
                         "call in bench/inversion.py): Anderson-accelerated fixed point; newton_krylov: Newton "
                         "steps solved with GMRES on Jacobian-vector products; fixed_point: AIDI/ReNoise; rnri: "
                         "Regularized Newton-Raphson as the paper writes it (eq. 7-8, gradients through the model; it helps "
                         "at few steps, but at 50 its iterates never beat the DDIM estimate, so it returns DDIM's answer); "
                         "rnri_jacobian_free: the authors' public code line for line (no backward pass, the best "
                         "f(z^k) by their score; often worse than DDIM, and the most sensitive to the weights: on a "
                         "Q8_0 copy of a model its result moves 2.4x as far as DDIM's or anderson's); gradient_descent: ExactDPM-style. "
                         "Per image, each step stops early once the residual is below the tolerance and returns "
                         "its best iterate, never worse than DDIM inversion's; the report lists the residuals. "
                         "fireflow (Deng et al. 2024; steps + 1 model calls) and rf_solver (Wang et al. 2024; 2 calls "
                         "per step) are second-order flow ODE solvers instead (the explicit midpoint rule in flow "
                         "time, on any model): they do not solve DDIM's equation, and Sample from Inversion samples "
                         "their results back with the same solver (iterations, tolerance, lambda_prior and krylov "
                         "are not used)."),
            inputs=_source_inputs() + [
                io.Combo.Input("method", options=EXACT_METHODS, default="anderson",
                               tooltip="Solver for each step's implicit equation (see the description)."),
                advanced(io.Int.Input("iterations", default=2, min=0, max=100,
                                      tooltip="Most updates per step. Model calls per step: iterations + 1 (anderson: "
                                              "the DDIM estimate, then iterations - 1 secant steps; fixed_point); "
                                              "rnri_jacobian_free: iterations (the authors' n_iters, 2); rnri and "
                                              "gradient_descent: iterations forward and backward passes (one CFG branch "
                                              "at a time, so memory stays that of one branch's graph) plus 2 forward; "
                                              "newton_krylov: 2 + iterations x (krylov + 1). Not used by fireflow "
                                              "(steps + 1 calls in all) and rf_solver (2 per step).")),
                advanced(io.Float.Input("tolerance", default=1e-4, min=0.0, max=1.0, step=1e-5, round=1e-6,
                                        tooltip="Stop an image's step once its mean|z - f(z)| is below this (not used "
                                                "by rnri_jacobian_free, as in the authors' code).")),
                advanced(io.Float.Input("lambda_prior", default=0.1, min=0.0, max=10.0, step=0.01,
                                        tooltip="RNRI's weight of the Gaussian prior (eq. 7; paper: 0.1). rnri: q(z | "
                                                "z_s) at z, with its gradient (the paper); rnri_jacobian_free: centred "
                                                "on the clean latent, read at the detached f(z) (the authors' code). "
                                                "Used by these two only.")),
                advanced(io.Int.Input("adjust_rounds", default=0, min=0, max=10,
                                      tooltip="Prompt-aware adjustment (RNRI sec. 4.2): rounds of noising 2 steps and "
                                              "denoising them with the prompt before inverting; 2 helps at high "
                                              "guidance.")),
                advanced(io.Int.Input("krylov", default=3, min=1, max=20, optional=True,
                                      tooltip="newton_krylov only: GMRES iterations (Jacobian-vector products) per "
                                              "update.")),
            ],
            outputs=_result_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, steps, guidance, spacing, method, iterations, tolerance, lambda_prior,
                adjust_rounds, negative=None, latent=None, image=None, vae=None, krylov=3) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        src = _Source(model, positive, negative, latent, image, vae, steps, guidance, spacing)
        cfg = inv.SolverConfig(iterations=iterations, tol=tolerance, lam=lambda_prior, krylov=krylov)

        def run(pred, z0):
            z0 = inv.prompt_aware_adjust(pred, z0, src.grid, "positive", src.uncond, guidance, rounds=adjust_rounds)
            result = inv.invert(pred, z0, src.grid, "positive", src.uncond, guidance, method, cfg,
                                callback=src.progress, grad_context=pred.autograd)
            return _finish(result, pred, adjust_rounds=adjust_rounds)

        return _outputs(model, src.run(run), positive, negative)


class NegativePromptInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseNegativePromptInversion",
            display_name="Negative-Prompt Inversion",
            category=SUB,
            description=("Negative-prompt inversion (Miyake et al. 2023): DDIM inversion with the source prompt at "
                         "guidance 1; when sampling or editing, the unconditional branch uses the source prompt "
                         "instead of the empty prompt, which keeps the reconstruction at any guidance scale "
                         "without any optimisation."),
            inputs=[i for i in _source_inputs() if i.id not in ("negative", "guidance")],
            outputs=_result_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, steps, spacing, latent=None, image=None, vae=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        src = _Source(model, positive, None, latent, image, vae, steps, 1.0, spacing)

        def run(pred, z0):
            result = _finish(inv.invert(pred, z0, src.grid, "positive", callback=src.progress), pred)
            result.method = "npi"
            return result

        return _outputs(model, src.run(run), positive)


class NullTextInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseNullTextInversion",
            display_name="Null-Text Inversion",
            category=SUB,
            description=("Null-text inversion (Mokady et al. 2023): DDIM inversion at guidance 1 gives a pivot "
                         "trajectory; then, step by step, the unconditional (negative) embedding is optimised "
                         "with Adam so that guided sampling follows the pivot (with its pooled vector on SDXL, "
                         "SD3 and Flux, which read it in every block). The per-step embeddings are stored "
                         "and used by Sample from Inversion, which then reconstructs at the chosen guidance. "
                         "Memory (README, measured): SD1.5 at 512 px fits 8 GB; SDXL at 1024 px needs up to about "
                         "15 GB in 16 bit (an upper bound): on a 12 GB card run ComfyUI with --lowvram or use 768 px."),
            inputs=_source_inputs(guidance_default=7.5, negative_tip=(
                "The unconditional prompt whose embedding is optimised (usually empty text).")) + [
                advanced(io.Int.Input("inner_steps", default=10, min=1, max=200,
                                      tooltip="Most Adam iterations per step (paper: 10).")),
                advanced(io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=1e-4, round=1e-5,
                                        tooltip="Adam learning rate at the first step (paper: 0.01); at diffusion step "
                                                "i it is this x (1 - i/100), the authors' schedule.")),
                advanced(io.Float.Input("tolerance", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
                                        tooltip="Early stop of step i once the loss is below this + i x 2e-5 (the "
                                                "authors' schedule; i counts diffusion steps from the noisiest).")),
            ],
            outputs=_result_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, steps, guidance, spacing, inner_steps, learning_rate, tolerance,
                negative=None, latent=None, image=None, vae=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        if negative is None:
            raise glue.InverseInputError("negative: null-text inversion optimises the negative embedding; connect a "
                                         "CLIP Text Encode with empty text.")
        src = _Source(model, positive, negative, latent, image, vae, steps, 1.0, spacing)
        B = src.samples.shape[0]
        first, second = src.two_stage_progress()

        def run(pred, z0):
            pivot = inv.invert(pred, z0, src.grid, "positive", callback=first)
            null = pred.embedding("negative").float()
            null = null.expand(B, *null.shape[1:]).clone() if null.shape[0] == 1 else null.clone()
            # where the model reads a pooled vector (SDXL, SD3, Flux) it carries the negative prompt
            # to every block: optimise it with the token embedding
            null, layout = glue.PromptLayout.pack(null, pred.pooled("negative"))
            result = inv.null_text_optimize(
                pred, pivot, src.grid, "positive", null, lambda e: layout.cond("negative", e), guidance,
                inner_steps=inner_steps, lr=learning_rate, tol=tolerance, callback=second,
                grad_context=pred.autograd)
            return _finish(result, pred, null_layout=layout, negative_cond=negative)

        return _outputs(model, src.run(run, {"negative": negative}), positive, negative)


class DDPMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDDPMInversion",
            display_name="Edit-Friendly DDPM Inversion",
            category=SUB,
            description=("Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): independent noisy "
                         "versions of the image at every step, and per step the noise map that makes DDPM "
                         "sampling land exactly on the next one. Sampling with the stored maps reproduces the "
                         "image to float precision; for edits, skip the first ~36% of the steps."),
            inputs=_source_inputs() + [
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the forward noise."),
            ],
            outputs=_result_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, steps, guidance, spacing, seed, negative=None, latent=None, image=None,
                vae=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        src = _Source(model, positive, negative, latent, image, vae, steps, guidance, spacing)

        def run(pred, z0):
            gen = torch.Generator().manual_seed(int(seed))
            result = inv.ddpm_invert(pred, z0, src.grid, "positive", src.uncond, guidance, gen, callback=src.progress)
            return _finish(result, pred, seed=int(seed))  # the maps stay float64

        return _outputs(model, src.run(run), positive, negative)


# ---------------------------------------------------------------------------------------------
# sampling from an inversion

class SampleFromInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseSampleFromInversion",
            display_name="Sample from Inversion",
            category=SUB,
            description=("Samples from any Inverse inversion on its own timesteps the way its method requires: "
                         "deterministic DDIM (RNRI paper eq. 2) for DDIM/exact inversions; the source prompt as "
                         "the unconditional branch for negative-prompt inversion; the stored per-step embeddings "
                         "for null-text; the stored noise maps for DDPM. With the inversion's prompt and guidance "
                         "it reconstructs the image; with another prompt it edits it. A mask limits the change."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model used for the inversion."),
                io.Conditioning.Input("positive", tooltip="Prompt to sample with (the inversion's prompt reconstructs)."),
                Inversion.Input("inversion", tooltip="Output of an Inverse inversion node."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt when guidance is not 1 (not needed for negative-prompt "
                                              "and null-text inversions, which bring their own)."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; use the inversion's scale to reconstruct."),
                io.Int.Input("skip_steps", default=0, min=0, max=1000,
                             tooltip="Start this many steps later, from the inversion's latent at that step "
                                     "(keeps more of the original; ~36% of the steps for DDPM edits)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where to regenerate (white). Elsewhere every step keeps the inversion's latent."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent; decode it with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, inversion, guidance, skip_steps, negative=None, mask=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        glue.check_diffusion_model(model)
        if not isinstance(inversion, InversionResult):
            raise glue.InverseInputError("inversion: expected the output of an Inverse inversion node.")
        grid = inversion.grid
        if skip_steps >= grid.steps:
            raise glue.InverseInputError(f"skip_steps: must be below the inversion's {grid.steps} steps.")
        if inversion.method == "npi":
            negative = inversion.extras["source_cond"]
        elif inversion.method == "null_text":
            negative = inversion.extras["negative_cond"]
        conds, uncond = _guidance_conds(positive, negative, guidance)
        shape = inversion.z0.shape
        for name, c in conds.items():
            glue.check_cond_batch(c, shape[0], name)
        latent_mask = glue.latent_mask(mask, shape, "mask") if mask is not None else None
        progress = glue.ProgressReporter(grid.steps - skip_steps)
        make_uncond = None
        if inversion.method == "null_text":
            if uncond is None:  # guidance 1 ignores the unconditional branch entirely
                conds["negative"] = negative
            layout = inversion.extras["null_layout"]
            make_uncond = lambda e: layout.cond("negative", e)  # noqa: E731
            uncond = "negative"

        def run(pred):
            result = inversion.to(pred.device)
            m = latent_mask.to(pred.device) if latent_mask is not None else None
            traj = inv.sample_from_inversion(pred, result, "positive", uncond, guidance, skip_steps, progress, m,
                                             make_uncond)
            return pred.process_latent_out(traj[-1]).cpu()

        return io.NodeOutput({"samples": glue.run_with_predictor(model, conds, shape, run)})


#: DDIM inversion, the solvers of inv.SOLVERS that need only forward calls (RNRI and gradient
#: descent need gradients through the GUIDER, which a SAMPLER cannot ask for) and the flow solvers
SAMPLER_METHODS = ["ddim", *inv.FORWARD_SOLVERS, *inv.FLOW_SOLVERS]


def _sampler_inversion(method: str, iterations: int, tolerance: float, krylov: int):
    """The inversion loop the SAMPLER runs over the GUIDER's prediction: DDIM, or one of the exact
    solvers that need only forward calls (RNRI and gradient descent need gradients through the
    GUIDER, which a SAMPLER cannot ask for)."""
    cfg = inv.SolverConfig(iterations=iterations, tol=tolerance, krylov=krylov)

    def invert(predictor, z0, grid, callback):
        return inv.invert(predictor, z0, grid, None, method=method, cfg=cfg, callback=callback).trajectory

    return invert


class DDIMInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseSamplerDDIMInversion",
            display_name="Inversion Sampler (DDIM / Anderson / Newton-Krylov / FireFlow)",
            category=SUB,
            description=("A SAMPLER for SamplerCustomAdvanced that inverts instead of denoising: it runs the "
                         "inversion backwards from the input latent over the SIGMAS (either order; they must reach "
                         "0) using the connected GUIDER's prediction, and returns the noise latent. method ddim is "
                         "DDIM inversion; anderson, newton_krylov and fixed_point solve each step's implicit "
                         "equation exactly (as the Exact Inversion node); fireflow and rf_solver are second-order flow "
                         "solvers. Use it with DisableNoise; sample the result back on the same sigmas with the ddim "
                         "or euler sampler, or, after fireflow or rf_solver, with the Flow Solver Sampler and the same "
                         "method."),
            inputs=[
                io.Combo.Input("method", options=SAMPLER_METHODS, default="ddim", optional=True,
                               tooltip="ddim: one model call per step; anderson (3 calls per step at 2 "
                                       "iterations): far closer reconstructions; newton_krylov: more calls, most "
                                       "robust at few steps and high guidance; fireflow (steps + 1 calls) and "
                                       "rf_solver (2 per step): second order, sample back with the Flow Solver "
                                       "Sampler."),
                advanced(io.Int.Input("iterations", default=2, min=0, max=100, optional=True,
                                      tooltip="Exact solvers: most updates per step (model calls per step: iterations + "
                                              "1; newton_krylov: 2 + iterations x (krylov + 1)).")),
                advanced(io.Float.Input("tolerance", default=1e-4, min=0.0, max=1.0, step=1e-5, round=1e-6,
                                        optional=True,
                                        tooltip="Exact solvers: stop an image's step once mean|z - f(z)| is below this.")),
                advanced(io.Int.Input("krylov", default=3, min=1, max=20, optional=True,
                                      tooltip="newton_krylov only: GMRES iterations (Jacobian-vector products) per "
                                              "update.")),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, method="ddim", iterations=2, tolerance=1e-4, krylov=3) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        return io.NodeOutput(glue.make_inversion_sampler(_sampler_inversion(method, iterations, tolerance, krylov)))


class FlowSolverSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseSamplerFlowSolver",
            display_name="Flow Solver Sampler (FireFlow / RF-Solver)",
            category=SUB,
            description=("A SAMPLER for SamplerCustomAdvanced (or SamplerCustom) that samples with a second-order "
                         "flow ODE solver: FireFlow (Deng et al. 2024; one model call per step plus one) or "
                         "RF-Solver (Wang et al. 2024; two per step), the explicit midpoint rule in flow time, on "
                         "any model (SD1.x/SDXL through the flow view of their noise prediction). It samples back "
                         "what the Inversion Sampler inverted with the same method. The SIGMAS must end at 0."),
            inputs=[
                io.Combo.Input("method", options=list(inv.FLOW_SOLVERS), default="fireflow",
                               tooltip="fireflow: reuses the previous step's midpoint velocity (steps + 1 model "
                                       "calls); rf_solver: evaluates it afresh (2 calls per step)."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, method="fireflow") -> io.NodeOutput:
        glue.check_widgets(cls, locals())

        def sample(predictor, z_T, grid, callback):
            return flow_solvers.flow_sample(predictor, z_T, grid, None, method=method, callback=callback)

        return io.NodeOutput(glue.make_solver_sampler(sample))


NODES = [DDIMInversion, ExactInversion, NegativePromptInversion, NullTextInversion, DDPMInversion,
         SampleFromInversion, DDIMInversionSampler, FlowSolverSampler]
