"""Editing nodes: ProxEdit proximal guidance over any Inverse inversion."""
from __future__ import annotations

from comfy_api.latest import io

from ..core import proxedit
from ..core.result import InversionResult
from . import comfy_glue as glue
from .types import CATEGORY, Inversion

BASES = ["source", "negative"]


class ProxEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseProxEdit",
            display_name="ProxEdit (proximal guidance edit)",
            category=f"{CATEGORY}/editing",
            description=("Edits the image of an inversion toward a target prompt with proximal guidance (ProxEdit, "
                         "Han et al. 2024): eps = eps_base + w * prox(eps_target - eps_base), where hard or soft "
                         "thresholding keeps only the strongest part of the guidance, so the rest of the image "
                         "stays. base 'source' uses the inversion's own prompt (negative-prompt inversion); with the "
                         "threshold quantile at 1 the result is exactly the inversion's reconstruction. Inversion "
                         "and reconstruction guidance pull the unedited region back to the source."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model used for the inversion."),
                Inversion.Input("inversion", tooltip="Output of an Inverse inversion node (any method)."),
                io.Conditioning.Input("target", tooltip="The prompt describing the edited image."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The null/negative prompt, for base 'negative' and for source_null_mix."),
                io.Combo.Input("base", options=BASES, default="source",
                               tooltip="Branch the guidance starts from: 'source' = the inversion's prompt (Prox-NPI, "
                                       "exact reconstruction at quantile 1); 'negative' = the negative prompt (or "
                                       "null-text inversion's optimised embeddings)."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance scale w (paper: 7.5)."),
                io.Combo.Input("prox", options=["hard", "soft", "none"], default="hard",
                               tooltip="hard: l0 prox (keep entries above the threshold); soft: l1 prox (shrink by "
                                       "the threshold); none: plain classifier-free guidance."),
                io.Float.Input("quantile", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold as this quantile of |eps_target - eps_base| per image (0.6-0.75 "
                                       "typical; 1 = no edit)."),
                io.Float.Input("fixed_threshold", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="If above 0, use this fixed threshold instead of the quantile."),
                io.Int.Input("dilation", default=1, min=0, max=8, tooltip="Radius of the edit-mask dilation (max-pool)."),
                io.Float.Input("inversion_guidance", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="eta of inversion guidance: pull the unedited region to the inversion "
                                       "trajectory while t < t_rec (0 = off; 0.1-1)."),
                io.Float.Input("reconstruction_guidance", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="eta of reconstruction guidance on the predicted x0 (supplement Alg. 2; 0.1)."),
                io.Int.Input("t_rec", default=400, min=0, max=1000,
                             tooltip="Guidances act while the model timestep is below this (paper: 400 of 1000)."),
                io.Float.Input("source_null_mix", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Base 'source' only: slerp the source embedding toward the negative one by "
                                       "this amount (0 = pure negative-prompt inversion)."),
                io.Int.Input("skip_steps", default=0, min=0, max=1000,
                             tooltip="Start this many steps later (DDPM inversions: ~36% of the steps)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited latent; decode it with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, inversion, target, base, guidance, prox, quantile, fixed_threshold, dilation,
                inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, skip_steps,
                negative=None) -> io.NodeOutput:
        glue.check_diffusion_model(model)
        if not isinstance(inversion, InversionResult):
            raise glue.InverseInputError("inversion: expected the output of an Inverse inversion node.")
        if base not in BASES:
            raise glue.InverseInputError(f"base: choose one of {', '.join(BASES)}.")
        grid = inversion.grid
        if skip_steps >= grid.steps:
            raise glue.InverseInputError(f"skip_steps: must be below the inversion's {grid.steps} steps.")
        B = inversion.batch_size
        negative = negative if negative is not None else inversion.extras.get("negative_cond")
        conds = {"target": target}
        if base == "source":
            if "source_cond" not in inversion.extras:
                raise glue.InverseInputError("inversion: this inversion carries no source prompt; use base 'negative'.")
            conds["source"] = inversion.extras["source_cond"]
        else:
            if negative is None:
                raise glue.InverseInputError("negative: base 'negative' needs a negative prompt; connect one.")
            conds["negative"] = negative
        if source_null_mix > 0:
            if base != "source" or negative is None:
                raise glue.InverseInputError("source_null_mix: needs base 'source' and a negative prompt.")
            conds["negative"] = negative
        for name, c in conds.items():
            glue.check_cond_batch(c, B, name)
        cfg = proxedit.ProxConfig(guidance=guidance, prox=prox, quantile=quantile,
                                  fixed_threshold=fixed_threshold if fixed_threshold > 0 else None,
                                  dilation=dilation, inversion_guidance=inversion_guidance,
                                  reconstruction_guidance=reconstruction_guidance, t_rec=t_rec)
        progress = glue.ProgressReporter(grid.steps - skip_steps)

        def run(pred):
            result = inversion.to(pred.device)
            src = "source" if base == "source" else "negative"
            per_step = None
            if base == "source" and source_null_mix > 0:
                mixed = proxedit.slerp(source_null_mix, pred.embedding("source").float(),
                                       pred.embedding("negative").float())
                src = glue.Cond("source", context=mixed)
            if base == "negative" and inversion.method == "null_text":
                per_step = [glue.Cond("negative", context=e) for e in result.extras["null_embeddings"]]
            traj = proxedit.prox_edit(pred, result, src, "target", cfg, skip_steps, progress, per_step)
            return pred.process_latent_out(traj[-1]).cpu()

        return io.NodeOutput({"samples": glue.run_with_predictor(model, conds, inversion.z0.shape, run)})


NODES = [ProxEdit]
