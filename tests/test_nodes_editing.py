"""The editing nodes (nodes/editing.py) on the real ComfyUI with the tiny SD1.5: ProxEdit (issue 5,
proximal guidance), prompt-to-prompt and MasaCtrl attention control, and the ProxEdit GUIDER in
ComfyUI's own SamplerCustomAdvanced."""
from __future__ import annotations

import importlib

import pytest
import torch

from support import comfy_host
from support.integration import (UNetCounter, _ac, _editing, _encode, _interrupt_after, _invert_and_sample, _nodes,
                                 _npi, _p2p_node, _prox, _rel, check_guider_reproduces_the_proxedit_node)

comfy_host.skip_module_without_host()


# --------------------------------------------------------------------------------------------
# ProxEdit through ComfyUI (issue 5, proximal guidance part)

@pytest.mark.parametrize("prox", ["hard", "soft"])
def test_proxedit_at_maximum_threshold_is_the_exact_reconstruction(pack, loaded, prox):
    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a red sports car"))
    # negative-prompt inversion: the edit at quantile 1 is the inversion's own reconstruction
    z0, npi, rec, _ = _invert_and_sample(pack, loaded, "NegativePromptInversion", 7.5, steps=12, spacing="auto")
    edit = _prox(pack, loaded, npi, target, prox=prox, quantile=1.0)
    assert _rel(edit, rec) < 1e-6
    assert _rel(_prox(pack, loaded, npi, target, prox=prox, quantile=0.5), rec) > 1e-3
    # over edit-friendly DDPM inversion it reproduces the input itself
    z0, ddpm, _, _ = _invert_and_sample(pack, loaded, "DDPMInversion", 1.0, steps=12, guidance=1.0, spacing="auto", seed=1)
    assert _rel(_prox(pack, loaded, ddpm, target, prox=prox, quantile=1.0), z0) < 1e-5
    # over the exact solvers (guidance 1, base = the source prompt): their own reconstruction
    for method in ("anderson", "newton_krylov"):
        z0, res, rec, _ = _invert_and_sample(pack, loaded, "ExactInversion", 1.0, steps=12, guidance=1.0,
                                             spacing="auto", method=method, iterations=2, tolerance=1e-4,
                                             lambda_prior=0.1, adjust_rounds=0)
        # 1e-5, not 1e-6: the edit evaluates [base, target] in one batch, the guidance-1 reconstruction
        # the prompt alone, and the UNet's float32 rounding depends on the batch
        assert _rel(_prox(pack, loaded, res, target, prox=prox, quantile=1.0), rec) < 1e-5, method


def test_proxedit_costs_what_a_cfg_run_costs(pack, loaded):
    """Both need two branches per step: count UNet calls and the batch each saw."""
    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        target = clip.encode_from_tokens_scheduled(clip.tokenize("a red sports car"))
    z0, npi, _, _ = _invert_and_sample(pack, loaded, "NegativePromptInversion", 1.0, steps=10, spacing="auto")
    n = _nodes(pack)
    with UNetCounter() as cfg_run:
        with torch.inference_mode():
            n.SampleFromInversion.execute(model, target, npi, 7.5, 0, negative=neg)
    with UNetCounter() as prox_run:
        _prox(pack, loaded, npi, target, inversion_guidance=0.5, reconstruction_guidance=0.1, t_rec=1000)
    assert sum(prox_run.batches) <= 1.1 * sum(cfg_run.batches)
    assert len(prox_run.batches) == 10


def test_proxedit_errors_are_clear(pack, loaded):
    model, clip, vae, pos, neg = loaded
    z0, ddim_res, _, _ = _invert_and_sample(pack, loaded, "DDIMInversion", 1.0, steps=4, guidance=1.0, spacing="auto")
    n = importlib.import_module(pack.__name__ + ".nodes.editing")
    with torch.inference_mode(), pytest.raises(Exception, match=r"^skip_steps: "):
        n.ProxEdit.execute(model, ddim_res, pos, "source", 7.5, "hard", 0.7, 0.0, 1, 0.0, 0.0, 400, 0.0, 4)
    with torch.inference_mode(), pytest.raises(Exception, match=r"^base: "):
        n.ProxEdit.execute(model, ddim_res, pos, "null", 7.5, "hard", 0.7, 0.0, 1, 0.0, 0.0, 400, 0.0, 0)


# --------------------------------------------------------------------------------------------
# attention control and the GUIDER (issue 5, second part)

@pytest.mark.parametrize("scale", ["1e30", "nan", "inf", "-25"])
def test_prompt_to_prompt_refuses_non_finite_or_huge_reweight_scales(pack, loaded, scale):
    with pytest.raises(Exception, match=r"^reweight: the scale of 'cat' is .*finite scale between -20 and 20"):
        _p2p_node(pack, loaded, "a photo of a cat", "a photo of a cat", mode="reweight", reweight=f"cat:{scale}")


def test_attention_hooks_change_only_the_conditional_target_branch(pack, glue, loaded):
    model, clip, vae, pos, neg = loaded
    ac = _ac(pack)
    proxedit = importlib.import_module(pack.__name__ + ".core.proxedit")
    control, src, tar = _p2p_node(pack, loaded)
    control = control.combine(ac.AttentionControl(masactrl=ac.MutualSelfAttention(0, 0, base_strategy="none")))
    options_before = repr(model.model_options)
    ctl = ac.AttentionController(control, 10)
    patched = glue.with_attention_control(model, ctl)
    g = torch.Generator().manual_seed(0)
    z_src = torch.randn(2, 4, 16, 16, generator=g)
    z = z_src + 0.5 * torch.randn(2, 4, 16, 16, generator=g)

    def run(pred):
        plain = pred(z, 601, ["source", "target"])
        same = pred(z_src, 601, ["source", "source"])
        with UNetCounter() as counter:
            e_base, e_tar = proxedit.edit_predict(pred, z, z_src, 601, "source", "target", ctl, "source", step=0)
        # the target prompt on the source latent with the source's own attention: the source prediction
        _, e_same = proxedit.edit_predict(pred, z_src, z_src, 601, "source", "source", ctl, "source", step=0)
        return plain, same, e_base, e_tar, e_same, counter.batches

    with torch.inference_mode():
        plain, same, e_base, e_tar, e_same, batches = glue.run_with_predictor(
            patched, {"source": src, "target": tar}, z.shape, run)
        unpatched = glue.run_with_predictor(model, {"source": src}, z.shape, lambda p: p(z, 601, ["source"]))
    assert _rel(e_base, plain[0]) < 1e-5          # the base (unconditional) branch is untouched
    assert _rel(e_tar, plain[1]) > 1e-3           # the target branch is edited
    assert _rel(e_same, same[1]) < 1e-4
    assert batches == [2, 4]                      # capture call (source, batch 2), then [base, target]
    assert ctl.edited_calls > 0 and ctl.mode == "off"
    assert repr(model.model_options) == options_before   # the shared MODEL is not patched
    assert _rel(unpatched[0], plain[0]) < 1e-5


def test_prompt_to_prompt_node_errors_are_clear(pack, loaded):
    with pytest.raises(Exception, match=r"^target_prompt: Replace \(word swap\) needs prompts with the same number of "
                                        r"tokens: the source has 5, the target 6"):
        _p2p_node(pack, loaded, "a photo of a cat", "a photo of a fluffy cat")
    control, _, _ = _p2p_node(pack, loaded, "a photo of a cat", "a photo of a fluffy cat", mode="refine",
                              local_blend=True, reweight="fluffy:2")
    assert float(control.p2p.equalizer.max()) == 2.0 and int(control.p2p.blend_target.sum()) == 1
    with pytest.raises(Exception, match=r"^reweight: 'zebra' is not in the target prompt"):
        _p2p_node(pack, loaded, reweight="zebra:2")
    with pytest.raises(Exception, match=r"^reweight: expected 'word:scale'"):
        _p2p_node(pack, loaded, reweight="dog")
    with pytest.raises(Exception, match=r"^blend_words: the prompts do not differ"):
        _p2p_node(pack, loaded, tar="a photo of a cat", local_blend=True)


def test_proxedit_with_attention_control_keeps_exact_reconstruction_and_edits(pack, loaded):
    """Attention control edits only the target branch, so at quantile 1 the edit is still the NPI
    reconstruction; below it, P2P and MasaCtrl change the edit. Prompt mismatches are clear errors."""
    ac = _ac(pack)
    control, src, tar = _p2p_node(pack, loaded, local_blend=False)
    z0, res, rec = _npi(pack, loaded, src, batch=2)
    # base_strategy "none": with MasaCtrl's default "source" the base branch attends to the stored
    # inversion latents, which DDIM inversion's reconstruction does not follow exactly
    masa = ac.AttentionControl(masactrl=ac.MutualSelfAttention(2, 2, "source", base_strategy="none"))
    with UNetCounter() as counter:
        kept = _prox(pack, loaded, res, tar, quantile=1.0, attention_control=control.combine(masa))
    assert _rel(kept, rec) < 1e-6
    assert len(counter.batches) == 16 and counter.batches[:2] == [2, 4]   # capture + inject on every step
    free = _prox(pack, loaded, res, tar, quantile=0.5)
    p2p = _prox(pack, loaded, res, tar, quantile=0.5, attention_control=control)
    masa_only = _prox(pack, loaded, res, tar, quantile=0.5, attention_control=masa)
    assert _rel(p2p, free) > 1e-3 and _rel(masa_only, free) > 1e-3
    with pytest.raises(Exception, match=r"^attention_control: it was built for other prompts than the 'target' input"):
        _prox(pack, loaded, res, loaded[3], attention_control=control)
    with pytest.raises(Exception, match=r"^attention_control: MasaCtrl start_layer 10 is past this model's 4"):
        _prox(pack, loaded, res, tar, attention_control=ac.AttentionControl(masactrl=ac.MutualSelfAttention()))


def test_local_blend_keeps_the_source_outside_the_edited_words(pack, loaded):
    control, src, tar = _p2p_node(pack, loaded, local_blend=True, blend_start=0.0, blend_threshold=0.9999)
    control.p2p.blend_dilation = 0     # its 8x8 latents are too small for the 3x3 max-pool
    z0, res, rec = _npi(pack, loaded, src)
    with torch.inference_mode():
        lat = _prox(pack, loaded, res, tar, quantile=0.3, attention_control=control)
        z_src = res.z0
    ms = loaded[0].get_model_object("latent_format")
    z_edit = ms.process_in(lat)
    same = ((z_edit - z_src).abs() < 1e-5).float().mean()
    # the random model's word maps are nearly flat (hence the threshold near 1): a few latent pixels
    # change, all others keep the stored trajectory's z_0 exactly
    assert 0.5 < float(same) < 1.0


def test_guider_reproduces_the_proxedit_node(pack, loaded):
    check_guider_reproduces_the_proxedit_node(pack, loaded)


def test_cancel_inside_an_attention_controlled_edit(pack, loaded):
    control, src, tar = _p2p_node(pack, loaded)
    z0, res, rec = _npi(pack, loaded, src, steps=10)
    at, total = _interrupt_after(5, lambda: _prox(pack, loaded, res, tar, attention_control=control))
    assert total - at <= 1


def test_few_step_lcm_and_50_step_edits_with_attention_control(pack, loaded):
    """The same controls work on a 4-step LCM model and a 50-step model, with a batch of 2: the
    schedules are fractions of the steps, and at quantile 1 the edit is still the reconstruction."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    ac = _ac(pack)
    control, src, tar = _p2p_node(pack, loaded, local_blend=True, blend_threshold=0.9999)
    control = control.combine(ac.AttentionControl(masactrl=ac.MutualSelfAttention(1, 2)))
    n = _nodes(pack)
    lat = _encode(loaded, batch=2)
    with torch.inference_mode():
        lcm = ModelSamplingDiscrete().patch(loaded[0], "lcm", False)[0]
    for model, steps in ((lcm, 4), (loaded[0], 50)):
        with torch.inference_mode():
            res = n.NegativePromptInversion.execute(model, src, steps, "auto", latent=lat).args[0]
            rec = n.SampleFromInversion.execute(model, src, res, 1.0, 0).args[0]["samples"]
            ed = _editing(pack)
            args = dict(base="source", guidance=7.5, prox="hard", fixed_threshold=0.0, dilation=1, inversion_guidance=0.0,
                        reconstruction_guidance=0.0, t_rec=400, source_null_mix=0.0, skip_steps=0)
            p2p_only = ac.AttentionControl(p2p=control.p2p, source_context=control.source_context,
                                           target_context=control.target_context)
            kept = ed.ProxEdit.execute(model, res, tar, quantile=1.0, attention_control=p2p_only, **args).args[0]["samples"]
            edit = ed.ProxEdit.execute(model, res, tar, quantile=0.6, attention_control=control, **args).args[0]["samples"]
        assert res.grid.steps == steps and edit.shape == rec.shape == (2, 4, 8, 8)
        assert torch.isfinite(edit).all() and _rel(edit, rec) > 1e-3
        # at quantile 1 only LocalBlend moves the reconstruction: outside its mask the last step keeps
        # the stored z_0 (the input latent) exactly
        outside = float(((kept - lat["samples"]).abs() < 1e-4 * rec.abs().max()).float().mean())
        assert 0.5 < outside < 1.0
