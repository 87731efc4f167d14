"""Helpers of the integration tests on the real ComfyUI (tests/test_nodes_*.py, test_flow.py,
test_sdxl.py, test_issue20_*.py), under the names those tests have always called them by, and the
checks that hold for SD1.5 and, "given another model", for SDXL.

``loaded`` is the 5-tuple of the ``loaded`` fixture (support/fixtures.py): model, clip, vae,
positive, negative; ``pack`` the pack as ComfyUI loaded it.
"""
from __future__ import annotations

import glob
import importlib
from pathlib import Path

import pytest
import torch

from .core_oracles import rnri_objective


# --------------------------------------------------------------------------------------------
# an RNRI objective gradient through the glue

def rnri_probe(pack, glue, model, channels: int, guidance: float):
    """One RNRI step of a 10-step grid (level 3 to 4, prompts "c" and "u") through the glue, and a
    point z far from its root (|r| is smooth at a finite-difference scale): (make_step(pred), z,
    the generator, for more draws)."""
    inv = importlib.import_module(pack.__name__ + ".core.inversion")
    grid = glue.make_grid(model, 10)
    ts, ab = grid.timesteps[::-1], grid.alphas_cumprod[::-1]
    g = torch.Generator().manual_seed(8)
    z_s = torch.randn(1, channels, 8, 8, generator=g) * 0.5
    z = z_s + 0.5 * torch.randn(1, channels, 8, 8, generator=g)
    return (lambda pred: inv._Step(pred, z_s, ts[4], ab[3], ab[4], "c", "u", guidance)), z, g


def rnri_gradient(step, z: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """d/dz of RNRI's objective (eq. 7) at z, by autograd (inside the predictor's autograd context)."""
    zz = z.clone().requires_grad_(True)
    F, _ = rnri_objective(step, zz, lam)
    return torch.autograd.grad(F, zz)[0]


def rnri_directional_check(pack, glue, model, pos, neg, richardson: bool = False) -> tuple[float, float]:
    """RNRI's objective (eq. 7) through the glue on ``model``, guidance 3: its autograd gradient along a
    random direction d, and the central difference along d (h = 1e-3; with ``richardson``, the O(h^2)
    term cancelled with h = 5e-4 as well). Returns (analytic, finite difference)."""
    make_step, z, g = rnri_probe(pack, glue, model, 4, 3.0)
    d = torch.randn(1, 4, 8, 8, generator=g)

    def run(pred):
        step = make_step(pred)
        with pred.autograd():
            grad = rnri_gradient(step, z)
            with torch.no_grad():
                def central(h):
                    return (rnri_objective(step, z + h * d, 0.1)[0] - rnri_objective(step, z - h * d, 0.1)[0]) / (2 * h)

                fd = (4 * central(5e-4) - central(1e-3)) / 3 if richardson else central(1e-3)
        return float((grad * d).sum()), float(fd)

    with torch.inference_mode():
        return glue.run_with_predictor(model, {"c": pos, "u": neg}, z.shape, run)


# --------------------------------------------------------------------------------------------
# counting and cancelling model calls

class UNetCounter:
    """Counts forward calls of ComfyUI UNets (and the batch each call saw)."""

    def __init__(self):
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.cls = UNetModel
        self.batches: list[int] = []

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, self.cls):
                self.batches.append(int(args[0].shape[0]))

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _interrupt_after(n_calls: int, run) -> tuple[int, int]:
    """Run ``run()`` and request a cancel in the middle of its ``n_calls``-th UNet call; it must
    raise InterruptProcessingException. Returns (call at which the cancel came, total calls)."""
    import comfy.model_management

    with UNetCounter() as counter:
        fired = {}

        def hook(module, args, output):
            if isinstance(module, counter.cls) and len(counter.batches) == n_calls and not fired:
                fired["at"] = len(counter.batches)
                comfy.model_management.interrupt_current_processing(True)

        h = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
                run()
        finally:
            h.remove()
            comfy.model_management.interrupt_current_processing(False)
    assert fired, "the run made fewer model calls than the cancel point"
    return fired["at"], len(counter.batches)


def _rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------
# latents saved from a prompt run in-process (comfy_host.run_prompt)

def _tap(prompt: dict, node: str, output: int, name: str) -> None:
    prompt[f"tap_{name}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [node, output], "filename_prefix": f"taps/{name}"}}


def _latents(out_dir: Path, prefix: str) -> torch.Tensor:
    import safetensors.torch

    files = sorted(glob.glob(str(out_dir / "taps" / f"{prefix}_*.latent")))
    assert files, f"no latent saved for {prefix}"
    return safetensors.torch.load_file(files[-1])["latent_tensor"]


# --------------------------------------------------------------------------------------------
# the inversion nodes

def _nodes(pack):
    return importlib.import_module(pack.__name__ + ".nodes.inversion")


def _encode(loaded, seed=11, batch=1):
    vae = loaded[2]
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, 64, 64, 3, generator=g)
    with torch.inference_mode():
        return {"samples": vae.encode(img)}


def _invert_and_sample(pack, loaded, node, sample_guidance, **kw):
    model, clip, vae, pos, neg = loaded
    n = _nodes(pack)
    lat = kw.pop("latent", None) or _encode(loaded)
    with torch.inference_mode():
        if node != "NegativePromptInversion":
            kw["negative"] = neg
        out = getattr(n, node).execute(model, pos, latent=lat, **kw).args
        result = out[0]
        rec = n.SampleFromInversion.execute(model, pos, result, sample_guidance, 0, negative=neg).args[0]
    return lat["samples"], result, rec["samples"], out[3]


# --------------------------------------------------------------------------------------------
# the editing nodes: ProxEdit, prompt-to-prompt, the GUIDER

def _prox(pack, loaded, inversion, target, **kw):
    n = importlib.import_module(pack.__name__ + ".nodes.editing")
    args = dict(base="source", guidance=7.5, prox="hard", quantile=0.7, fixed_threshold=0.0, dilation=1,
                inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400, source_null_mix=0.0, skip_steps=0)
    args.update(kw)
    with torch.inference_mode():
        return n.ProxEdit.execute(loaded[0], inversion, target, negative=loaded[4], **args).args[0]["samples"]


def _editing(pack):
    return importlib.import_module(pack.__name__ + ".nodes.editing")


def _ac(pack):
    return importlib.import_module(pack.__name__ + ".core.attention_control")


def _p2p_node(pack, loaded, src="a photo of a cat", tar="a photo of a dog", **kw):
    args = dict(mode="replace", cross_replace=0.8, self_replace=0.5, reweight="", local_blend=False, blend_words="",
                blend_threshold=0.3, blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return _editing(pack).PromptToPrompt.execute(loaded[1], src, tar, **args).args


def _npi(pack, loaded, cond, steps=8, batch=1):
    n = _nodes(pack)
    lat = _encode(loaded, batch=batch)
    with torch.inference_mode():
        res = n.NegativePromptInversion.execute(loaded[0], cond, steps, "auto", latent=lat).args[0]
        rec = n.SampleFromInversion.execute(loaded[0], cond, res, 7.5, 0).args[0]["samples"]
    return lat["samples"], res, rec


def _guider_sample(pack, loaded, guider, res, sigmas_from=0):
    from comfy_extras import nodes_custom_sampler as cs

    sigmas = torch.tensor([float(s) for s in _sigmas_of(pack, loaded, res)])[sigmas_from:]
    with torch.inference_mode():
        noise = cs.DisableNoise().get_noise()[0]
        sampler = cs.KSamplerSelect().get_sampler("euler")[0]
        latent = {"samples": _to_comfy(pack, loaded, res, sigmas_from)}
        return cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _sigmas_of(pack, loaded, res):
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    return glue.grid_sigmas(loaded[0], res.grid)


def _to_comfy(pack, loaded, res, i):
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    ab = res.grid.alphas_cumprod[i]
    z = glue.to_start_latent(res.trajectory[::-1][i], ab, glue.coords_of(loaded[0]))
    return loaded[0].get_model_object("latent_format").process_out(z)


# --------------------------------------------------------------------------------------------
# the Restore node

def _restore_args(**kw):
    args = dict(method="stsl", steps=4, seed=0, step_size=1.0, gluing=0.1, stochasticity=0.0, stsl_inner_steps=2,
                stsl_lambda=1.0, stsl_trace_weight=0.02, stsl_lr=0.05, stsl_start="measurement", p2l_prompt_steps=1,
                p2l_prompt_lr=1e-2, p2l_project_every=2, p2l_cg_iters=10, p2l_cg_lambda=0.01,
                decoder_memory="tiled", tile_size=40)
    args.update(kw)
    return args


# --------------------------------------------------------------------------------------------
# the flow models (16-channel latents)

def _lat(seed=0, batch=1):
    return {"samples": torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))}


# --------------------------------------------------------------------------------------------
# checks that hold on SD1.5 (test_nodes_*.py) and on SDXL (test_sdxl.py): "the same checks,
# given another model"

def check_ddpm_inversion_reconstructs_exactly(pack, loaded, guidance, steps):
    """Edit-friendly DDPM inversion through the nodes reconstructs its input to 1e-5 at ``guidance``
    and ``steps`` (test_nodes_inversion.py says why it must)."""
    z0, res, rec, report = _invert_and_sample(pack, loaded, "DDPMInversion", guidance, steps=steps,
                                              guidance=guidance, spacing="auto", seed=3)
    assert res.method == "ddpm" and len(res.extras["noise_maps"]) == steps
    assert _rel(rec, z0) <= 1e-5, (guidance, steps, _rel(rec, z0))


def check_guider_reproduces_the_proxedit_node(pack, loaded):
    """The ProxEdit GUIDER in SamplerCustomAdvanced (euler) gives the ProxEdit node's edit; over DDPM
    noise maps at quantile 1 it gives back the input; a latent of another size, or sigmas off the
    inversion's grid, are clear errors."""
    control, src, tar = _p2p_node(pack, loaded)
    z0, res, rec = _npi(pack, loaded, src)
    args = dict(base="source", guidance=7.5, prox="hard", quantile=0.6, fixed_threshold=0.0, dilation=1,
                inversion_guidance=0.5, reconstruction_guidance=0.1, t_rec=1000, source_null_mix=0.0)
    node = _prox(pack, loaded, res, tar, attention_control=control, **args)
    with torch.inference_mode():
        guider = _editing(pack).ProxEditGuider.execute(loaded[0], res, tar, negative=loaded[4],
                                                       attention_control=control, **args).args[0]
    out = _guider_sample(pack, loaded, guider, res)
    assert _rel(out, node) < 1e-4
    # over an edit-friendly DDPM inversion, at quantile 1 the guider + euler reproduces the input
    z0d, ddpm, _, _ = _invert_and_sample(pack, loaded, "DDPMInversion", 1.0, steps=8, guidance=1.0, spacing="auto", seed=2)
    with torch.inference_mode():
        g2 = _editing(pack).ProxEditGuider.execute(loaded[0], ddpm, tar, negative=loaded[4],
                                                   **dict(args, quantile=1.0, inversion_guidance=0.0,
                                                          reconstruction_guidance=0.0)).args[0]
    assert _rel(_guider_sample(pack, loaded, g2, ddpm, sigmas_from=3), z0d) < 1e-4
    # a latent of another size than the inversion's is refused (it was a tensor-size error, or silently
    # accepted without inversion guidance)
    for kw in ({}, {"inversion_guidance": 0.0}):
        with torch.inference_mode():
            g3 = _editing(pack).ProxEditGuider.execute(loaded[0], res, tar, negative=loaded[4],
                                                       **dict(args, **kw)).args[0]
        with torch.inference_mode(), pytest.raises(Exception, match=r"^latent_image: SamplerCustomAdvanced gave a "
                                                                    r"latent of shape \(1, 4, 16, 16\)"):
            from comfy_extras import nodes_custom_sampler as cs
            cs.SamplerCustomAdvanced().sample(cs.DisableNoise().get_noise()[0], g3,
                                              cs.KSamplerSelect().get_sampler("euler")[0],
                                              torch.tensor([3.0, 1.0, 0.0]), {"samples": torch.zeros(1, 4, 16, 16)})
    # sigmas off the inversion's grid are a clear error
    with torch.inference_mode(), pytest.raises(Exception, match=r"^sigmas: the sampler asked for sigma"):
        from comfy_extras import nodes_custom_sampler as cs
        cs.SamplerCustomAdvanced().sample(cs.DisableNoise().get_noise()[0], guider,
                                          cs.KSamplerSelect().get_sampler("euler")[0], torch.tensor([3.0, 1.0, 0.0]),
                                          {"samples": torch.zeros(1, 4, 8, 8)})


# --------------------------------------------------------------------------------------------
# the flow-editing nodes (issue 23) on any model: tiny SD3 and Flux (test_nodes_flow_edit.py),
# SD1.5 and SDXL (test_sdxl.py)

def check_flow_edit_nodes(pack, model, source, target, negative, latent, guidance=(3.5, 6.0), steps=4):
    """FlowEdit and RF-Inversion on ``model`` (``negative`` None: a guidance-embedded model, Flux):
    the source prompt and guidance as target, or n_max 0, return the LATENT bit for bit; an edit moves it, in the
    model calls the method promises; outside a mask the LATENT is kept bit for bit; the FlowEdit
    GUIDER/SAMPLER pair gives the node's edit; RF-Inversion with eta 1 on every step returns the
    photo; the shared MODEL is untouched. Returns the node outputs by name."""
    from comfy_extras import nodes_custom_sampler as cs

    fe = importlib.import_module(pack.__name__ + ".nodes.flow_edit")
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    x = latent["samples"]
    h, w = x.shape[-2:]
    mask = torch.zeros(1, 8 * h, 8 * w)
    mask[:, :, : 4 * w] = 1.0  # the left half of the image
    g_src, g_tar = guidance
    kw = dict(negative=negative, latent=latent)
    out = {}
    with torch.inference_mode():
        run = lambda tgt, **o: fe.FlowEdit.execute(model, source, tgt, steps, g_src, o.pop("g", g_tar),  # noqa: E731
                                                   o.pop("n_max", steps - 1), 1, **kw, **o).args
        assert torch.equal(run(source, g=g_src)[0]["samples"], x)  # same prompt, same guidance
        assert torch.equal(run(target, n_max=0)[0]["samples"], x)
        edit, report = run(target)
        cfg_calls = 1 if negative is None else 1  # each evaluation batches its CFG branches into one call
        assert f"{2 * (steps - 1) * cfg_calls} model calls" in report, report
        assert torch.isfinite(edit["samples"]).all() and _rel(edit["samples"], x) > 1e-3
        masked = run(target, mask=mask, feather=1.0)[0]["samples"]
        assert torch.equal(masked[..., w // 2:], x[..., w // 2:])
        assert _rel(masked[..., : w // 2 - 1], x[..., : w // 2 - 1]) > 1e-3
        out.update(flowedit=edit["samples"], masked=masked)
        # the GUIDER/SAMPLER pair on the node's grid, its seed from RandomNoise
        guider = fe.FlowEditGuider.execute(model, source, target, g_src, g_tar, negative=negative).args[0]
        sampler = fe.FlowEditSampler.execute(steps - 1).args[0]
        sigmas = glue.grid_sigmas(model, glue.make_grid(model, steps))
        pair = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(1)[0], guider, sampler, sigmas,
                                                 latent)[0]["samples"]
        assert _rel(pair, edit["samples"]) < 1e-5, _rel(pair, edit["samples"])
        if glue.is_flow_model(model):  # a schedule from pure noise (BasicScheduler): the skipped first step is dropped
            full = cs.BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]
            assert float(full[0]) == 1.0
            out_full = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(1)[0], guider, sampler, full,
                                                         latent)[0]["samples"]
            assert torch.isfinite(out_full).all() and _rel(out_full, x) > 1e-3
            with pytest.raises(glue.InverseInputError, match=r"^sigmas: the FlowEdit Sampler would take a step from s = 1"):
                cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(1)[0], guider,
                                                  fe.FlowEditSampler.execute(steps).args[0], full, latent)
        nothing = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(1)[0], guider,
                                                    fe.FlowEditSampler.execute(0).args[0], sigmas, latent)[0]["samples"]
        assert _rel(nothing, x) < 1e-6
        with pytest.raises(glue.InverseInputError, match=r"^sampler: "):
            cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(1)[0], guider,
                                              cs.KSamplerSelect().get_sampler("euler")[0], sigmas, latent)
        with pytest.raises(glue.InverseInputError, match=r"^n_max: "):
            run(target, n_max=steps + 1)
        # RF-Inversion
        g = g_tar if negative is not None else 3.5
        rf = lambda **o: fe.RFInversion.execute(model, source, target, steps, g, o.pop("gamma", 0.5),  # noqa: E731
                                                o.pop("eta", 0.9), 2, **kw, **o).args
        rf_out, rf_report = rf(start=0, stop=2)
        assert f"{2 * steps} model calls" in rf_report, rf_report
        assert torch.isfinite(rf_out["samples"]).all() and _rel(rf_out["samples"], x) > 1e-3
        rf_masked = rf(start=0, stop=2, mask=mask, feather=1.0)[0]["samples"]
        assert torch.equal(rf_masked[..., w // 2:], x[..., w // 2:])
        assert _rel(rf(eta=1.0, start=0, stop=steps)[0]["samples"], x) < 1e-4
        out.update(rf_inversion=rf_out["samples"])
    after = model.model.diffusion_model.state_dict()
    assert not [k for k in before if not torch.equal(before[k], after[k])]
    return out
