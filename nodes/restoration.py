"""Restoration nodes: degradation operators, degrading an image, and posterior-sampling restoration
(LDPS, PSLD, P2L, STSL) with the user's own latent diffusion model."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..core import operators as ops
from ..core import restoration as rs
from . import comfy as glue
from .schema import advanced, decoder_memory_inputs
from .types import CATEGORY, Operator



def _inpaint_mask(w) -> ops.Operator:
    if w.mask is None:
        raise glue.InverseInputError("mask: kind inpaint_mask needs a MASK (white = missing pixels).")
    return ops.Inpaint(1.0 - w.mask.float(), "inpaint_mask", w.sigma_y)


def _lazy_mask(kind: str):
    return lambda w: ops.LazyMaskInpaint(kind, w.seed, drop=w.mask_amount, box=w.mask_amount, sigma_y=w.sigma_y)


#: kind -> the operator it builds from Degradation Operator's widget values (its options, in their order)
OPERATORS = {
    "sr_avgpool": lambda w: ops.AvgPoolSR(w.scale_factor, w.sigma_y),
    "sr_bicubic": lambda w: ops.BicubicSR(w.scale_factor, w.sigma_y),
    "gaussian_blur": lambda w: ops.Blur(ops.gaussian_kernel(w.kernel_size, w.blur_sigma), "gaussian_blur", w.sigma_y),
    "motion_blur": lambda w: ops.Blur(ops.motion_kernel(w.kernel_size, w.motion_intensity, w.seed), "motion_blur",
                                      w.sigma_y),
    "inpaint_random": _lazy_mask("random"),
    "inpaint_box": _lazy_mask("box"),
    "inpaint_freeform": _lazy_mask("freeform"),
    "inpaint_mask": _inpaint_mask,
    "salt_pepper": lambda w: ops.SaltPepper(w.mask_amount if w.mask_amount > 0 else 0.02),
    "gaussian_noise": lambda w: ops.GaussianNoise(w.sigma_y),
}
KINDS = list(OPERATORS)


def to_signed(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [B, C, H, W] in [-1, 1]."""
    return image[..., :3].movedim(-1, 1).float() * 2.0 - 1.0


def to_image(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1.0) / 2.0).movedim(1, -1)


class DegradationOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDegradationOperator",
            display_name="Degradation Operator",
            category=f"{CATEGORY}/restoration",
            description=("Describes how an image was degraded, y = A(x) + noise, for the restoration solvers and "
                         "for Degrade Image: super-resolution (average pooling or bicubic), Gaussian or motion blur "
                         "(61x61 kernels as in the papers), inpainting (random, box, free-form or your MASK), "
                         "salt-and-pepper or Gaussian noise."),
            inputs=[
                io.Combo.Input("kind", options=KINDS, default="sr_avgpool", tooltip="The degradation."),
                io.Int.Input("scale_factor", default=4, min=2, max=16, tooltip="Super-resolution factor (4 or 8)."),
                advanced(io.Int.Input("kernel_size", default=61, min=3, max=255, step=2,
                                      tooltip="Blur kernel size (odd; papers: 61).")),
                io.Float.Input("blur_sigma", default=3.0, min=0.1, max=50.0, step=0.1, tooltip="Gaussian blur sigma (3)."),
                io.Float.Input("motion_intensity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Motion blur: 0 = straight streak, 1 = tangled shake (papers: 0.5)."),
                io.Float.Input("mask_amount", default=0.4, min=0.0, max=0.95, step=0.01,
                               tooltip="Random inpainting: share of pixels dropped (0.4-0.7); box: side as a "
                                       "share of the image (0.5); salt-and-pepper: share of pixels (0.02)."),
                io.Float.Input("sigma_y", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Measurement noise std in [-1, 1] units (0.01 or 0.05)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the motion kernel and generated masks (the example workflows keep it "
                                     "fixed, so every run degrades the same way)."),
                io.Mask.Input("mask", optional=True, tooltip="inpaint_mask: the known pixels are where the mask is 0 "
                                                             "(white = missing, as ComfyUI's inpainting masks)."),
            ],
            outputs=[Operator.Output(display_name="operator", tooltip="Connect to Degrade Image or a restoration node.")],
        )

    @classmethod
    def execute(cls, kind, scale_factor, kernel_size, blur_sigma, motion_intensity, mask_amount, sigma_y, seed,
                mask=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        try:
            op = OPERATORS[kind](SimpleNamespace(**locals()))
        except ops.OperatorError as exc:
            raise glue.InverseInputError(str(exc)) from None
        return io.NodeOutput(op)


class DegradeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDegradeImage",
            display_name="Degrade Image",
            category=f"{CATEGORY}/restoration",
            description=("Applies a degradation operator and its measurement noise to a clean image, to make test "
                         "inputs and benchmarks: y = A(x) + noise. Super-resolution returns the small image. Also "
                         "shows the operator (its blur kernel or inpainting mask) as an image."),
            inputs=[
                io.Image.Input("image", tooltip="The clean image."),
                Operator.Input("operator", tooltip="Output of Degradation Operator."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the measurement noise (fixed in the example workflows)."),
            ],
            outputs=[
                io.Image.Output(display_name="degraded", tooltip="The measurement y (small for super-resolution)."),
                io.Image.Output(display_name="operator_view", tooltip="The blur kernel or inpainting mask, "
                                                                      "or A^T y for other operators."),
            ],
        )

    @classmethod
    def execute(cls, image, operator, seed) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        if not isinstance(operator, ops.Operator):
            raise glue.InverseInputError("operator: connect a Degradation Operator node.")
        x = to_signed(glue.check_image(image, "image"))
        try:
            y = operator.measure(x, torch.Generator().manual_seed(int(seed)))
        except ops.OperatorError as exc:
            raise glue.InverseInputError(str(exc)) from None
        view = operator.view(x).movedim(1, -1)
        return io.NodeOutput(to_image(y), view.float().contiguous())


METHODS = list(rs.METHODS)
#: the stsl_start options -> core's RestorationConfig.start
STSL_STARTS = {"measurement": "adjoint", "back_projection": "back_projection", "gaussian": "gaussian"}


def _problem_inputs() -> list:
    """The problem, the method and the inputs LDPS, PSLD and P2L share."""
    return [
        io.Model.Input("model", tooltip="The diffusion model: SD1.x, SD2.x, SDXL, or a flow model (SD3/SD3.5, Flux)."),
        io.Vae.Input("vae", tooltip="The checkpoint's VAE (its decoder is differentiated)."),
        io.Conditioning.Input("positive", tooltip="A prompt, e.g. 'a high quality photo' (P2L tunes it)."),
        io.Image.Input("measurement", tooltip="The degraded image y (small for super-resolution)."),
        Operator.Input("operator", tooltip="The Degradation Operator that produced y (same settings)."),
        io.Combo.Input("method", options=METHODS, default="stsl", tooltip="The posterior sampler."),
        io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (STSL paper: 50)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the starting noise and of every random draw."),
        io.Float.Input("step_size", default=1.0, min=0.0, max=100.0, step=0.01,
                       tooltip="LDPS/PSLD/P2L: data-consistency step zeta (DPS: 1.0, on the residual norm)."),
        advanced(io.Float.Input("gluing", default=0.1, min=0.0, max=10.0, step=0.01,
                                tooltip="PSLD: weight gamma of the gluing term (paper: 0.1).")),
        advanced(io.Float.Input("stochasticity", default=0.0, min=0.0, max=1.0, step=0.05,
                                tooltip="LDPS/PSLD/P2L: DDIM eta (0 deterministic, 1 DDPM; P2L paper: 0.8).")),
    ]


def _stsl_inputs() -> list:
    """STSL's settings (Algorithm 1), the paper's values by default."""
    return [
        advanced(io.Int.Input("stsl_inner_steps", default=5, min=1, max=50,
                              tooltip="STSL: Adam updates K per step (paper: 5).")),
        advanced(io.Float.Input("stsl_lambda", default=1.0, min=0.0, max=100.0, step=0.01,
                                tooltip="STSL: weight lambda of the measurement loss (paper: 1).")),
        advanced(io.Float.Input("stsl_trace_weight", default=0.02, min=0.0, max=10.0, step=0.001,
                                tooltip="STSL: weight eta of the Hutchinson trace term (paper: 0.02).")),
        advanced(io.Float.Input("stsl_lr", default=0.01, min=1e-5, max=1.0, step=1e-4,
                                tooltip="STSL: Adam learning rate, decaying by 0.998 per step (paper: 0.01).")),
        advanced(io.Combo.Input("stsl_start", options=list(STSL_STARTS),
                                default="measurement",
                                tooltip="STSL: measurement = the paper's E(A^T y), A^T y scaled to a pseudo-inverse, "
                                        "noised forward; back_projection = E(argmin ||y - Ax||^2 + 0.01||x||^2) "
                                        "(sharper, but it amplifies the noise of a long motion blur ~3x); gaussian = "
                                        "Gaussian noise (the authors' advice for free-form inpainting).")),
    ]


def _p2l_inputs() -> list:
    """P2L's prompt tuning and projection."""
    return [
        advanced(io.Int.Input("p2l_prompt_steps", default=1, min=0, max=20,
                              tooltip="P2L: Adam steps on the text embedding (and the pooled vector on SDXL, SD3, "
                                      "Flux) per sampling step (1-5).")),
        advanced(io.Float.Input("p2l_prompt_lr", default=1e-3, min=1e-6, max=1.0, step=1e-5,
                                tooltip="P2L: learning rate of the prompt tuning (1e-4 .. 1e-3).")),
        advanced(io.Int.Input("p2l_project_every", default=4, min=0, max=100,
                              tooltip="P2L: project onto the measurements every this many steps (0 = never; 3-5).")),
        advanced(io.Int.Input("p2l_cg_iters", default=10, min=1, max=200,
                              tooltip="P2L: conjugate-gradient iterations of the projection (10).")),
        advanced(io.Float.Input("p2l_cg_lambda", default=0.01, min=1e-6, max=10.0, step=1e-4,
                                tooltip="P2L: proximal weight of the projection (small: trust the measurement).")),
    ]


def _decoder_inputs() -> list:
    """How the decoder's autograd memory is bounded."""
    return decoder_memory_inputs(
        glue.DECODER_MEMORY, 40,
        "Autograd memory of the decoder: tiled (the image is cut into the fewest equal overlapping tiles no larger "
        "than tile_size, decoded one at a time and recomputed in the backward pass, so the peak is that of one tile "
        "whatever the image size), checkpoint (recompute the whole decoder in the backward pass: holds less between "
        "steps but peaks like full), full (fastest, most memory). The output image is always decoded whole, as VAE "
        "Decode does.",
        "Largest tile side in latent pixels for decoder_memory 'tiled' (40 = 320 px: a 512x512 image decodes as 4 "
        "tiles of 280 px, about a third of the memory of a whole decode; images up to 320 px decode whole). Seams are "
        "feathered over an eighth of the tile.")


def _restore_inputs() -> list:
    """Restore's inputs in their saved-workflow order: stsl_noise_samples came last, after the others."""
    return _problem_inputs() + _stsl_inputs() + _p2l_inputs() + _decoder_inputs() + [
        advanced(io.Int.Input("stsl_noise_samples", default=2, min=1, max=8, optional=True,
                              tooltip="STSL: noise samples N averaged in each Hutchinson trace estimate, evaluated in "
                                      "one batched model call (paper: 2).")),
    ]


class Restore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseRestore",
            display_name="Restore (posterior sampling)",
            category=f"{CATEGORY}/restoration",
            description=("Restores a degraded photo y = A(x) + noise with your own latent diffusion checkpoint, no "
                         "training: super-resolution, deblurring, inpainting, denoising, as described by a Degradation "
                         "Operator. Methods: STSL (second-order Tweedie, Rout et al.: 5 Adam refinements per step, "
                         "fewest model calls), LDPS (latent DPS), PSLD (LDPS + gluing term) and P2L (per-step prompt "
                         "tuning + projection onto the measurements). Gradients flow through the VAE decoder; "
                         "decoder_memory bounds their memory at 512x512 and above. Memory (README, measured): SD1.5 "
                         "at 512 px fits 8 GB with every method; SDXL at 1024 px needs up to about 19 GB in 16 bit "
                         "(LDPS; an upper bound): on 12-16 GB cards run ComfyUI with --lowvram, or restore at 768 px."),
            inputs=_restore_inputs(),
            outputs=[io.Image.Output(display_name="image", tooltip="The restored image."),
                     io.Latent.Output(display_name="latent", tooltip="Its latent."),
                     io.String.Output(display_name="report",
                                      tooltip="JSON: model calls, the measurement residual per step, consistency.")],
        )

    @classmethod
    def execute(cls, model, vae, positive, measurement, operator, method, steps, seed, step_size, gluing, stochasticity,
                stsl_inner_steps, stsl_lambda, stsl_trace_weight, stsl_lr, stsl_start, p2l_prompt_steps, p2l_prompt_lr,
                p2l_project_every, p2l_cg_iters, p2l_cg_lambda, decoder_memory, tile_size,
                stsl_noise_samples=2) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        glue.check_diffusion_model(model)
        if not isinstance(operator, ops.Operator):
            raise glue.InverseInputError("operator: connect a Degradation Operator node.")
        if vae is None:
            raise glue.InverseInputError("vae: connect the checkpoint's VAE.")
        y = to_signed(glue.check_image(measurement, "measurement"))
        B = y.shape[0]
        glue.check_cond_batch(positive, B, "positive")
        try:
            x_shape = operator.image_shape(tuple(y.shape))
        except ops.OperatorError as exc:
            raise glue.InverseInputError(str(exc)) from None
        f = glue.vae_downscale(vae)
        H, W = x_shape[-2:]
        if H % f or W % f:
            raise glue.InverseInputError(f"measurement: the restored image would be {W}x{H}; the VAE needs multiples of "
                                         f"{f}. Resize the input to e.g. {W - W % f}x{H - H % f} (times the SR factor).")
        cfg = rs.RestorationConfig(
            zeta=step_size, eta=stochasticity, gamma=gluing, K=stsl_inner_steps, lam=stsl_lambda,
            trace_weight=stsl_trace_weight, lr=stsl_lr, N=stsl_noise_samples, start=STSL_STARTS[stsl_start],
            prompt_steps=p2l_prompt_steps, prompt_lr=p2l_prompt_lr, project_every=p2l_project_every,
            cg_iters=p2l_cg_iters, cg_lambda=p2l_cg_lambda)
        grid = glue.make_grid(model, steps)
        gen = torch.Generator().manual_seed(int(seed))
        z_T = torch.randn((B, glue.model_latent_channels(model), H // f, W // f), generator=gen)
        codec = lambda: glue.LatentCodec(vae, model, decoder_memory, tile_size)  # noqa: E731 (made in the run)
        restore = _Restoration(method, cfg, operator, y, grid, z_T, gen, codec)
        try:
            latent, image, report = glue.run_with_predictor(model, {"positive": positive}, z_T.shape, restore,
                                                            seed=int(seed))
        except rs.DivergenceError as exc:
            raise glue.InverseInputError(f"step_size/stsl_lr: {exc}") from None
        return io.NodeOutput(image.float().contiguous(), {"samples": latent}, json.dumps(report))


def _change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b.to(a)).norm() / b.norm().clamp_min(1e-12))


def _prepare_stsl(pred, problem: rs.Problem):
    """STSL's report entry."""
    return lambda result: {"nfe_as_the_paper_counts": result.report["evaluations"]}


def _prepare_p2l(pred, problem: rs.Problem):
    """P2L tunes the prompt: its embedding, and where the model reads a pooled vector in every block
    (SDXL, SD3, Flux) that vector too; the report says how far they moved."""
    emb, layout = glue.PromptLayout.pack(pred.embedding("positive").float(), pred.pooled("positive"))
    problem.embedding, problem.make_cond = emb, lambda C: layout.cond("positive", C)

    def report(result: rs.RestorationResult) -> dict:
        tuned, T = result.report["embedding"], layout.tokens
        return {"embedding_change": _change(tuned[:, :T], emb[:, :T]),
                "pooled_change": _change(tuned[:, T], emb[:, T]) if layout.pooled else None,
                "prompt_loss_first_step": result.report["prompt_loss"][:2]}

    return report


#: per method, what the node adds to the problem before the run; returns the method's report entries
METHOD_PREPARE = {"stsl": _prepare_stsl, "p2l": _prepare_p2l}


def _prepare_nothing(pred, problem):
    return lambda result: {}


class _Restoration:
    """One Restore run on the predictor of glue.run_with_predictor: returns (LATENT samples, IMAGE, report)."""

    def __init__(self, method, cfg, operator, y, grid, z_T, gen, make_codec):
        self.method, self.cfg, self.operator, self.y, self.grid = method, cfg, operator, y, grid
        self.z_T, self.gen, self.make_codec = z_T, gen, make_codec
        self.progress = glue.ProgressReporter(grid.steps)

    def output_check(self, pred):
        """Every latent a step produces, the last one (the one returned) included, is checked in the
        units of the LATENT this node outputs too (core checks the model's unit-scale coordinates):
        SD1.5's latent format divides by 0.18215, so a latent that core still passes (RMS 50 there)
        would come back with an RMS of 275."""
        name = self.method.upper()
        unit = torch.randn((1, self.z_T.shape[1], 64, 64), generator=torch.Generator().manual_seed(0)).to(pred.device)
        typical = float(pred.process_latent_out(unit).pow(2).mean().sqrt())  # SD1.5: 5.5
        units = f"in the output LATENT's units, where a prior latent's is about {typical:.2g}"
        return lambda z, step: rs.check_diverged(pred.process_latent_out(z), step, name, units=units)

    def __call__(self, pred):
        codec = self.make_codec()
        yy, z0 = self.y.to(pred.device), self.z_T.to(pred.device)

        @contextlib.contextmanager
        def grad_context():
            with pred.autograd(), codec.autograd():
                yield

        check_output = self.output_check(pred)

        def callback(i, total, z):
            check_output(z, i)
            self.progress(i, total, z)

        problem = rs.Problem(pred, codec.decode, self.operator, yy, self.grid, "positive", z0, encode=codec.encode,
                             generator=self.gen, callback=callback, grad_context=grad_context)
        extra = METHOD_PREPARE.get(self.method, _prepare_nothing)(pred, problem)
        result = rs.METHODS[self.method](problem, self.cfg)
        z = result.latent
        check_output(z, self.grid.steps - 1)  # the returned latent, whatever a method's callbacks saw
        with torch.no_grad():
            x_hat = to_signed(codec.decode_output(z)).to(yy.device)
            consistency = self.operator.consistency(yy, x_hat)
        report = {"method": self.method, "steps": self.grid.steps, "unet_calls": pred.calls,
                  "unet_calls_with_gradients": pred.grad_calls, "decoder_calls": codec.calls,
                  **consistency, "residual_per_step": result.residuals, **extra(result)}
        return pred.process_latent_out(z).cpu(), to_image(x_hat.cpu()), report


NODES = [DegradationOperator, DegradeImage, Restore]
