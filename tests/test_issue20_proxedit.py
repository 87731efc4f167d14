"""Issue 20 on the real ComfyUI with the tiny SD1.5, SD3 and Flux models of tests/support/comfy_host.py:
ProxEdit's ``t_rec`` is SD1.5's timestep equivalent (a noise level, the same on every family; Flux's
table has 10,000 levels, so "t < 400" guided only its last step), and Prox-NPI with MasaCtrl on the
base branch evaluates the source prompt once per step on the stored latent, not twice."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from support import comfy_host
from support.integration import _nodes

comfy_host.skip_module_without_host()

ARGS = dict(guidance=3.0, prox="hard", fixed_threshold=0.0, dilation=1, reconstruction_guidance=0.0,
            source_null_mix=0.0, skip_steps=0)


@pytest.fixture(scope="module")
def families(pack, loaded):
    """(model, source prompt, another prompt, latent channels) per family."""
    sd3, cond3 = comfy_host.tiny_flow_model("sd3")
    flux, condf = comfy_host.tiny_flow_model("flux")
    return {"sd15": (loaded[0], loaded[3], loaded[4], 4), "sd3": (sd3, cond3(), cond3(), 16),
            "flux": (flux, condf(), condf(), 16)}


def _modules(pack):
    return (importlib.import_module(pack.__name__ + ".nodes.editing"),
            importlib.import_module(pack.__name__ + ".core.proxedit"))


def _recording(monkeypatch, proxedit):
    """Wraps core edit_step: per step, how far z_{t-1} lies from the stored trajectory, and the level."""
    seen, step = [], proxedit.edit_step

    def wrapped(predictor, result, z, i, *a, **k):
        out = step(predictor, result, z, i, *a, **k)
        keep = result.trajectory[::-1][i + 1].to(out)
        seen.append((i, float((out - keep).abs().max() / keep.abs().max()), result.grid.alphas_cumprod[i]))
        return out

    monkeypatch.setattr(proxedit, "edit_step", wrapped)
    return seen


@pytest.mark.parametrize("family, count", [("sd15", 12), ("sd3", 8), ("flux", 7)])
def test_t_rec_400_guides_below_sds_t400_noise_level_on_every_family(pack, glue, families, monkeypatch, family,
                                                                      count):
    """28 steps, the node's default grid. Before: "t < 400" on each model's own table guided 12 of
    SD1.5's steps, 11 of SD3's (flow time s < 0.4 x shift) and 1 of Flux's (10,000 levels: s < 0.117).
    Now SD's noise level at t = 400 (abar 0.425, flow time 0.538): 12 on SD1.5 (the same steps), 8 on
    SD3 and 7 on Flux. Observed through the node: at quantile 1 the edit mask is empty, so inversion
    guidance with eta 1 puts a guided step on the stored trajectory, while sampling from another
    prompt than the inversion's leaves it on an unguided one."""
    ed, proxedit = _modules(pack)
    model, pos, other, channels = families[family]
    lat = {"samples": torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(3))}
    with torch.inference_mode():
        inv = _nodes(pack).DDIMInversion.execute(model, pos, 28, 1.0, "auto", latent=lat).args[0]
    grid = inv.grid
    seen = _recording(monkeypatch, proxedit)
    with torch.inference_mode():
        ed.ProxEdit.execute(model, inv, other, base="negative", negative=other, quantile=1.0, inversion_guidance=1.0,
                            t_rec=400, **ARGS)
    assert [i for i, _, _ in seen] == list(range(28))
    assert all(d < 1e-5 or d > 1e-4 for _, d, _ in seen), [round(d, 7) for _, d, _ in seen]
    guided = [i for i, d, _ in seen if d < 1e-5]
    assert len(guided) == count and guided == list(range(28 - count, 28)), guided
    level = proxedit.sd_equivalent_abar(400)
    assert guided == [i for i, _, ab in seen if ab > level]
    if family == "sd15":  # unchanged: exactly the model timesteps below 400
        assert guided == [i for i, t in enumerate(grid.timesteps[:-1]) if t < 400]
    else:
        s = glue.grid_sigmas(model, grid).tolist()[:-1]   # the flow times of the steps
        assert max(s[i] for i in guided) < 0.538 < min(s[i] for i in range(28) if i not in guided), s
        old = sum(t < 400 for t in grid.timesteps[:-1])
        assert old == {"sd3": 11, "flux": 1}[family]   # what the table index guided


def _count_batches(monkeypatch, glue):
    batches, call = [], glue.ComfyNoisePredictor.__call__

    def counting(self, z, t, conds):
        batches.append(len(conds))
        return call(self, z, t, conds)

    monkeypatch.setattr(glue.ComfyNoisePredictor, "__call__", counting)
    return batches


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_prox_npi_with_masactrl_evaluates_the_source_once_per_step(pack, glue, families, monkeypatch, family):
    """ProxEdit base 'source' (Prox-NPI) with MasaCtrl's base_strategy 'source': the capture call
    evaluated [source, base] with base = source, the same prompt on the same stored latent twice
    (4 evaluations per controlled step). Now [source] (3 per step), the edit unchanged: the old
    two-branch capture (forced here) gives the same latent to 1e-5 (relative), the run-to-run noise of
    the batched CPU kernels; soft thresholding, as a hard threshold can flip mask entries on that
    noise (on the toy model of tests/test_core_proxedit.py the two are bitwise equal)."""
    ed, proxedit = _modules(pack)
    model, pos, other, channels = families[family]
    lat = {"samples": torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(5))}
    steps, start = 6, 2
    with torch.inference_mode():
        inv = _nodes(pack).DDIMInversion.execute(model, pos, steps, 1.0, "auto", latent=lat).args[0]
        control = ed.MasaCtrl.execute(start, -1, "source", "source").args[0]

    def edit():
        batches = _count_batches(monkeypatch, glue)
        with torch.inference_mode():
            out = ed.ProxEdit.execute(model, inv, other, base="source", quantile=0.6, inversion_guidance=0.5, t_rec=400,
                                      attention_control=control, **{**ARGS, "prox": "soft"}).args[0]["samples"]
        monkeypatch.undo()
        return out, batches

    now, batches = edit()
    monkeypatch.setattr(proxedit, "_same_handle", lambda a, b: False)
    before, old_batches = edit()
    assert batches == [2] * start + [1, 2] * (steps - start), batches
    assert old_batches == [2] * start + [2, 2] * (steps - start), old_batches
    assert (sum(batches), sum(old_batches)) == (16, 20)   # 3 evaluations per controlled step, not 4
    rel = float((now - before).abs().max() / before.abs().max())
    assert rel < 1e-5, rel
