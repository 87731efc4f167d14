"""Editing nodes: ProxEdit proximal guidance over any Inverse inversion, with prompt-to-prompt and
MasaCtrl attention control; as a node and as a GUIDER for SamplerCustomAdvanced."""
from __future__ import annotations

import dataclasses
import math

import torch
from comfy_api.latest import io

from ..core import attention_control as ac
from ..core import proxedit
from ..core.result import InversionResult
from . import comfy as glue
from .schema import advanced
from .types import CATEGORY, AttentionControl, Inversion

SUB = f"{CATEGORY}/editing"
BASES = ["source", "negative"]


# ----------------------------------------------------------------------------------------------
# attention control nodes

MAX_REWEIGHT = 20.0  # attention maps scaled beyond this saturate the softmax'd weights into one token


def _parse_weights(text: str) -> list[tuple[str, float]]:
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        word, sep, value = part.rpartition(":")
        try:
            if not sep or not word.strip():
                raise ValueError
            scale = float(value)
        except ValueError:
            raise glue.InverseInputError(f"reweight: expected 'word:scale' pairs separated by commas, got {part!r}.")
        if not math.isfinite(scale) or abs(scale) > MAX_REWEIGHT:
            raise glue.InverseInputError(f"reweight: the scale of {word.strip()!r} is {value.strip()}; use a finite "
                                         f"scale between -{MAX_REWEIGHT:g} and {MAX_REWEIGHT:g} (prompt-to-prompt uses "
                                         f"about -2 to 5).")
        out.append((word.strip(), scale))
    return out


def _token_weights(length: int, positions: list[int], value: float = 1.0) -> torch.Tensor:
    w = torch.zeros(length)
    w[positions] = value
    return w


class PromptToPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InversePromptToPrompt",
            display_name="Prompt-to-Prompt (attention control)",
            category=SUB,
            description=("Prompt-to-prompt cross-attention control (Hertz et al. 2023) for ProxEdit: encodes the source "
                         "and target prompts and tells the edit how the target's attention maps come from the "
                         "source's. replace: word swap (equal token counts); refine: added/changed words keep their "
                         "own maps, aligned words take the source's; reweight: scale chosen words. LocalBlend keeps "
                         "everything outside the edited words' attention region from the source. Connect 'source' "
                         "to the inversion and 'target' to the edit."),
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (its tokenizer maps the words)."),
                io.String.Input("source_prompt", multiline=True, default="a photograph of an astronaut",
                                tooltip="Prompt describing the input image (use it for the inversion)."),
                io.String.Input("target_prompt", multiline=True, default="a painting of an astronaut",
                                tooltip="Prompt describing the edited image."),
                io.Combo.Input("mode", options=list(ac.P2P_MODES), default="replace",
                               tooltip="replace: word swap with the same number of tokens; refine: token alignment "
                                       "(adding words); reweight: the source maps scaled by 'reweight'."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps (from the start) whose cross-attention comes from the source "
                                       "(paper: 0.4-0.8)."),
                io.Float.Input("self_replace", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps whose self-attention maps (32x32 and smaller) come from the "
                                       "source; keeps the layout (paper: 0.2-0.6)."),
                io.String.Input("reweight", default="",
                                tooltip="Words of the target prompt to amplify or weaken, as 'word:scale, ...' (e.g. "
                                        "'snowy:3'); any mode. Scales must be finite, between -20 and 20."),
                io.Boolean.Input("local_blend", default=False,
                                 tooltip="LocalBlend: outside the attention region of the blend words keep the source "
                                         "latent exactly."),
                io.String.Input("blend_words", default="",
                                tooltip="Words (comma-separated, in either prompt) whose region may change; empty = the "
                                        "words that differ between the prompts."),
                advanced(io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                                        tooltip="LocalBlend threshold on the normalised word maps (paper: 0.3).")),
                advanced(io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.05,
                                        tooltip="Share of the steps after which LocalBlend starts (P2P code: 0.2).")),
            ],
            outputs=[AttentionControl.Output(display_name="attention_control",
                                             tooltip="Connect to ProxEdit or the ProxEdit guider (or a MasaCtrl node)."),
                     io.Conditioning.Output(display_name="source", tooltip="The encoded source prompt: invert with it."),
                     io.Conditioning.Output(display_name="target", tooltip="The encoded target prompt: edit toward it.")],
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompt, mode, cross_replace, self_replace, reweight, local_blend,
                blend_words, blend_threshold, blend_start) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        if clip is None:
            raise glue.InverseInputError("clip: connect the checkpoint's CLIP.")
        src_ids, length = glue.prompt_tokens(clip, source_prompt, "source_prompt")
        tar_ids, _ = glue.prompt_tokens(clip, target_prompt, "target_prompt")
        try:
            if mode == "replace":
                mapper, alphas = ac.replace_mapping(src_ids, tar_ids, length)
            else:
                if mode == "reweight" and len(src_ids) == len(tar_ids):
                    mapper, alphas = ac.replace_mapping(src_ids, tar_ids, length)
                else:
                    mapper, alphas = ac.refine_mapping(src_ids, tar_ids, length)
        except ac.TokenMappingError as e:
            raise glue.InverseInputError(f"target_prompt: {e}")
        equalizer = None
        weights = _parse_weights(reweight)
        if mode == "reweight" and not weights:
            raise glue.InverseInputError("reweight: mode 'reweight' needs words to scale, e.g. 'snowy:3'.")
        if weights:
            equalizer = torch.ones(length)
            for word, scale in weights:
                pos = ac.token_positions(tar_ids, glue.word_tokens(clip, word))
                if not pos:
                    raise glue.InverseInputError(f"reweight: {word!r} is not in the target prompt.")
                equalizer[pos] = scale
        blend_src = blend_tar = None
        if local_blend:
            words = [w.strip() for w in blend_words.split(",") if w.strip()]
            if words:
                ps, pt = [], []
                for w in words:
                    ids = glue.word_tokens(clip, w)
                    s, t = ac.token_positions(src_ids, ids), ac.token_positions(tar_ids, ids)
                    if not s and not t:
                        raise glue.InverseInputError(f"blend_words: {w!r} is in neither prompt.")
                    ps += s
                    pt += t
            else:
                ps, pt = ac.changed_positions(src_ids, tar_ids)
                if not ps and not pt:
                    raise glue.InverseInputError("blend_words: the prompts do not differ; name the words whose region "
                                                 "may change.")
            # a word present in only one prompt still marks its region through that prompt's maps
            blend_src, blend_tar = _token_weights(length, ps), _token_weights(length, pt)
        p2p = ac.PromptToPrompt(mode, mapper, alphas, equalizer, (0.0, cross_replace), (0.0, self_replace),
                                blend_source=blend_src, blend_target=blend_tar, blend_threshold=blend_threshold,
                                blend_start=blend_start)
        source = clip.encode_from_tokens_scheduled(clip.tokenize(source_prompt))
        target = clip.encode_from_tokens_scheduled(clip.tokenize(target_prompt))
        control = ac.AttentionControl(p2p=p2p, source_context=glue.cond_embedding(source).detach().cpu(),
                                      target_context=glue.cond_embedding(target).detach().cpu())
        return io.NodeOutput(control, source, target)


class MasaCtrl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseMasaCtrl",
            display_name="MasaCtrl (mutual self-attention)",
            category=SUB,
            description=("MasaCtrl mutual self-attention control (Cao et al. 2023) for ProxEdit (ProxMasaCtrl): from a "
                         "start step and layer on, the edited image's self-attention queries read the source image's "
                         "keys and values, so pose and layout can change while appearance and identity stay. Chain "
                         "after Prompt-to-Prompt to combine both in one edit, or edit twice for texture then pose. "
                         "On SD3 and Flux (joint prompt-image attention) the edited image keeps its own prompt "
                         "tokens and reads the source image's keys and values, as the flow-editing papers share "
                         "features in the later blocks."),
            inputs=[
                io.Int.Input("start_step", default=4, min=0, max=1000,
                             tooltip="First sampling step with mutual self-attention (paper: 4 of 50; 0-1 for "
                                     "few-step LCM/Turbo models)."),
                advanced(io.Int.Input("start_layer", default=-1, min=-1, max=200,
                                      tooltip="First self-attention layer in forward order. -1 = from the model: its "
                                              "first decoder layer plus a third of its decoder layers, which is the "
                                              "paper's 10 of SD1.x/2.x's 16 (decoder 7-15) and 46 of SDXL's 70 "
                                              "(decoder 34-69; MasaCtrl's SDXL examples use 44-64). On SD3/Flux: the "
                                              "first transformer block, -1 = the later half (Flux: 28 of its 19 double "
                                              "+ 38 single blocks; SD3.5 medium: 12 of 24).")),
                io.Combo.Input("strategy", options=list(ac.MASA_STRATEGIES), default="source",
                               tooltip="What the target branch's queries attend to: source keys/values (paper default), "
                                       "both branches' (joint) or its own (none)."),
                advanced(io.Combo.Input("base_strategy", options=list(ac.MASA_STRATEGIES), default="source",
                                        tooltip="The same for the base (unconditional) branch. Default 'source', as "
                                                "MasaCtrl's code (both CFG halves) and ProxEdit supplement E (alpha = "
                                                "1 with 'source' for both noises); the supplement finds 'joint' or "
                                                "'none' occasionally better there; 'none' leaves the base branch "
                                                "untouched (one model evaluation less).")),
                AttentionControl.Input("attention_control", optional=True,
                                       tooltip="A Prompt-to-Prompt control to combine with (cross-attention from it, "
                                               "self-attention from MasaCtrl once active)."),
            ],
            outputs=[AttentionControl.Output(display_name="attention_control",
                                             tooltip="Connect to ProxEdit or the ProxEdit guider.")],
        )

    @classmethod
    def execute(cls, start_step, start_layer, strategy, base_strategy, attention_control=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        control = ac.AttentionControl(masactrl=ac.MutualSelfAttention(start_step, start_layer, strategy, base_strategy))
        if attention_control is not None:
            control = control.combine(attention_control)
        return io.NodeOutput(control)


# ----------------------------------------------------------------------------------------------
# ProxEdit: shared inputs, checks and handles

def _prox_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The diffusion model used for the inversion."),
        Inversion.Input("inversion", tooltip="Output of an Inverse inversion node (any method)."),
        io.Conditioning.Input("target", tooltip="The prompt describing the edited image."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="The null/negative prompt, for base 'negative' and for source_null_mix."),
        io.Combo.Input("base", options=BASES, default="source",
                       tooltip="Branch the guidance starts from: 'source' = the inversion's prompt (Prox-NPI, exact "
                               "reconstruction at quantile 1); 'negative' = the negative prompt (or null-text "
                               "inversion's optimised embeddings)."),
        io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Guidance scale w (paper: 7.5)."),
        io.Combo.Input("prox", options=list(proxedit.PROX_MODES), default="hard",
                       tooltip="hard: l0 prox (keep entries above the threshold); soft: l1 prox (shrink by the "
                               "threshold); none: plain classifier-free guidance."),
        io.Float.Input("quantile", default=0.7, min=0.0, max=1.0, step=0.01,
                       tooltip="Threshold as this quantile of |eps_target - eps_base| per image (0.6-0.75 typical; "
                               "1 = no edit)."),
        advanced(io.Float.Input("fixed_threshold", default=0.0, min=0.0, max=10.0, step=0.01,
                                tooltip="If above 0, use this fixed threshold instead of the quantile.")),
        advanced(io.Int.Input("dilation", default=1, min=0, max=8,
                              tooltip="Radius of the edit-mask dilation (max-pool).")),
        advanced(io.Float.Input("inversion_guidance", default=0.0, min=0.0, max=1.0, step=0.01,
                                tooltip="eta of inversion guidance: pull the unedited region to the inversion "
                                        "trajectory while the noise level is below t_rec's (0 = off; 0.1-1).")),
        advanced(io.Float.Input("reconstruction_guidance", default=0.0, min=0.0, max=1.0, step=0.01,
                                tooltip="eta of reconstruction guidance on the predicted x0 while the noise level is "
                                        "below t_rec's (supplement Alg. 2; 0.1).")),
        advanced(io.Int.Input("t_rec", default=400, min=0, max=1000,
                              tooltip="SD1.5 timestep equivalent (of SD's 1000) below whose noise level the inversion "
                                      "and reconstruction guidances act. 400 (paper): guided while the noise level is "
                                      "below SD's t=400, abar 0.42; the same level on every family, flow time s~0.54 "
                                      "on SD3/Flux (not their own timestep: Flux counts 10,000). 0 = never, 1000 = "
                                      "every step.")),
        advanced(io.Float.Input("source_null_mix", default=0.0, min=0.0, max=1.0, step=0.01,
                                tooltip="Base 'source' only: slerp the source embedding toward the negative one by "
                                        "this amount (0 = pure negative-prompt inversion).")),
        AttentionControl.Input("attention_control", optional=True,
                               tooltip="Prompt-to-Prompt and/or MasaCtrl control; the source branch then runs on the "
                                       "inversion's stored latents (one more model call per controlled step)."),
    ]


class _Edit:
    """Validated edit settings: the model to run (patched clone under attention control), the named
    conditionings, the prox config, the controller, and the per-step base handles."""

    def __init__(self, model, inversion, target, negative, base, guidance, prox, quantile, fixed_threshold, dilation,
                 inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, attention_control):
        glue.check_diffusion_model(model)
        if not isinstance(inversion, InversionResult):
            raise glue.InverseInputError("inversion: expected the output of an Inverse inversion node.")
        if base not in BASES:
            raise glue.InverseInputError(f"base: choose one of {', '.join(BASES)}.")
        self.base, self.mix = base, source_null_mix
        B = inversion.batch_size
        negative = negative if negative is not None else inversion.extras.get("negative_cond")
        source = inversion.extras.get("source_cond")
        conds = {"target": target}
        if base == "source":
            if source is None:
                raise glue.InverseInputError("inversion: this inversion carries no source prompt; use base 'negative'.")
            conds["source"] = source
        else:
            if negative is None:
                raise glue.InverseInputError("negative: base 'negative' needs a negative prompt; connect one.")
            conds["negative"] = negative
        if source_null_mix > 0:
            if base != "source" or negative is None:
                raise glue.InverseInputError("source_null_mix: needs base 'source' and a negative prompt.")
            conds["negative"] = negative
        self.controller = None
        self.model = model
        if attention_control is not None:
            if source is None:
                raise glue.InverseInputError("attention_control: the inversion carries no source prompt for the "
                                             "source branch; invert with a prompt.")
            conds["source"] = source
            self._check_prompts(attention_control, source, target)
            self.controller = ac.AttentionController(self._fit_control(model, attention_control), inversion.grid.steps)
            self.model = glue.with_attention_control(model, self.controller)
        for name, c in conds.items():
            glue.check_cond_batch(c, B, name)
        self.conds = conds
        self.cfg = proxedit.ProxConfig(guidance=guidance, prox=prox, quantile=quantile,
                                       fixed_threshold=fixed_threshold if fixed_threshold > 0 else None,
                                       dilation=dilation, inversion_guidance=inversion_guidance,
                                       reconstruction_guidance=reconstruction_guidance,
                                       rec_abar=proxedit.sd_equivalent_abar(t_rec))

    @staticmethod
    def _fit_control(model, attention_control):
        """The attention control fitted to the model: prompt-to-prompt refused on SD3/Flux, MasaCtrl's
        start_layer -1 resolved from the model's layers and checked against them."""
        layers = glue.attention_layers(model)
        if attention_control.p2p is not None and glue.dit_blocks(model) is not None:
            raise glue.InverseInputError(
                "attention_control: prompt-to-prompt edits a UNet's cross-attention maps; SD3 and Flux have no "
                "cross-attention (prompt and image share one attention). Connect MasaCtrl alone (it shares the "
                "source image's keys and values in the later blocks), or disconnect attention_control: "
                "ProxEdit's proximal guidance alone works on it.")
        masa = attention_control.masactrl
        if masa is not None and masa.start_layer < 0:
            masa = dataclasses.replace(masa, start_layer=glue.masactrl_start_layer(layers))
            attention_control = dataclasses.replace(attention_control, masactrl=masa)
        if masa is not None and masa.start_layer >= len(layers):
            raise glue.InverseInputError(f"attention_control: MasaCtrl start_layer {masa.start_layer} is past this "
                                         f"model's {len(layers)} attention layers (0-{len(layers) - 1}).")
        return attention_control

    @staticmethod
    def _check_prompts(control, source, target) -> None:
        for name, want, cond in (("source", control.source_context, source), ("target", control.target_context, target)):
            if want is None:
                continue
            have = glue.cond_embedding(cond).detach().cpu().float()
            if have.shape != want.shape or not torch.allclose(have, want.float(), atol=1e-4, rtol=1e-3):
                where = "the inversion's prompt" if name == "source" else "the 'target' input"
                raise glue.InverseInputError(
                    f"attention_control: it was built for other prompts than {where}; connect the Prompt-to-Prompt "
                    f"node's '{name}' output there.")

    def handles(self, pred, result: InversionResult):
        """(base handle, per-step base handles or None, source handle)."""
        src = "source" if self.base == "source" else "negative"
        per_step = None
        if self.base == "source" and self.mix > 0:
            mixed = proxedit.slerp(self.mix, pred.embedding("source").float(), pred.embedding("negative").float())
            src = glue.Cond("source", context=mixed)
        if self.base == "negative" and result.method == "null_text":
            layout = result.extras["null_layout"]
            per_step = [layout.cond("negative", e) for e in result.extras["null_embeddings"]]
        return src, per_step, "source"


class ProxEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseProxEdit",
            display_name="ProxEdit (proximal guidance edit)",
            category=SUB,
            description=("Edits the image of an inversion toward a target prompt with proximal guidance (ProxEdit, "
                         "Han et al. 2024): eps = eps_base + w * prox(eps_target - eps_base), where hard or soft "
                         "thresholding keeps only the strongest part of the guidance, so the rest of the image "
                         "stays. base 'source' uses the inversion's own prompt (negative-prompt inversion); with the "
                         "threshold quantile at 1 the result is exactly the inversion's reconstruction. Inversion "
                         "and reconstruction guidance pull the unedited region back to the source; an attention "
                         "control input adds prompt-to-prompt and/or MasaCtrl."),
            inputs=_prox_inputs() + [
                io.Int.Input("skip_steps", default=0, min=0, max=1000,
                             tooltip="Start this many steps later (DDPM inversions: ~36% of the steps)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited latent; decode it with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, inversion, target, base, guidance, prox, quantile, fixed_threshold, dilation,
                inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, skip_steps,
                negative=None, attention_control=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        edit = _Edit(model, inversion, target, negative, base, guidance, prox, quantile, fixed_threshold, dilation,
                     inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, attention_control)
        grid = inversion.grid
        if skip_steps >= grid.steps:
            raise glue.InverseInputError(f"skip_steps: must be below the inversion's {grid.steps} steps.")
        progress = glue.ProgressReporter(grid.steps - skip_steps)

        def run(pred):
            result = inversion.to(pred.device)
            src, per_step, source = edit.handles(pred, result)
            traj = proxedit.prox_edit(pred, result, src, "target", edit.cfg, skip_steps, progress, per_step,
                                      control=edit.controller, source=source)
            return pred.process_latent_out(traj[-1]).cpu()

        return io.NodeOutput({"samples": glue.run_with_predictor(edit.model, edit.conds, inversion.z0.shape, run)})


class ProxEditGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseProxEditGuider",
            display_name="ProxEdit Guider",
            category=SUB,
            description=("ProxEdit as a GUIDER for SamplerCustomAdvanced: every model evaluation runs one ProxEdit step "
                         "(proximal guidance, attention control, inversion/reconstruction guidance, LocalBlend, DDPM "
                         "noise maps) and returns the prediction that lands a DDIM/Euler step exactly on it. Connect "
                         "the inversion's sigmas (or a split of them) and noise latent, DisableNoise, and the 'euler' "
                         "or 'ddim' sampler to reproduce the ProxEdit node; other samplers use the same predictions."),
            inputs=_prox_inputs(),
            outputs=[io.Guider.Output(display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, inversion, target, base, guidance, prox, quantile, fixed_threshold, dilation,
                inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, negative=None,
                attention_control=None) -> io.NodeOutput:
        glue.check_widgets(cls, locals())
        edit = _Edit(model, inversion, target, negative, base, guidance, prox, quantile, fixed_threshold, dilation,
                     inversion_guidance, reconstruction_guidance, t_rec, source_null_mix, attention_control)
        maps = inversion.extras.get("noise_maps") if inversion.method == "ddpm" else None
        handles = []  # built once, at the first model evaluation (they need the device copy)

        def step(pred, result, z, i):
            if not handles:
                handles.extend(edit.handles(pred, result))
            src, per_step, source = handles
            s = per_step[i] if per_step is not None else src
            noise = result.extras["noise_maps"][i] if maps is not None else None
            return proxedit.edit_step(pred, result, z, i, s, "target", edit.cfg, edit.controller, source, noise)

        return io.NodeOutput(glue.EditGuider(edit.model, edit.conds, inversion, step))


NODES = [ProxEdit, ProxEditGuider, PromptToPrompt, MasaCtrl]
