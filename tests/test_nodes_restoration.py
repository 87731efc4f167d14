"""The restoration nodes (nodes/restoration.py) on the real ComfyUI with the tiny SD1.5: the
degradation operators on ComfyUI images (issue 6, first part) and Restore (issue 6): every method
lowers the measurement residual, divergence and bad inputs are clear errors, the decoder's memory
modes agree, cancelling stops inside the inner loops."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from support import comfy_host
from support.integration import _interrupt_after, _rel, _restore_args

comfy_host.skip_module_without_host()


# --------------------------------------------------------------------------------------------
# degradation operators as nodes (issue 6, first part)

def test_degradation_nodes_on_comfyui_images(pack):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    img = torch.rand(2, 56, 72, 3, generator=torch.Generator().manual_seed(3))
    base = dict(scale_factor=4, kernel_size=61, blur_sigma=3.0, motion_intensity=0.5, mask_amount=0.4,
                sigma_y=0.0, seed=1)
    for kind in r.KINDS:
        kw = dict(base)
        if kind == "inpaint_mask":
            kw["mask"] = (torch.rand(56, 72) > 0.5).float()
        if kind == "salt_pepper":
            kw["mask_amount"] = 0.02
        op = r.DegradationOperator.execute(kind, **kw).args[0]
        y, view = r.DegradeImage.execute(img, op, 0).args
        assert y.shape[0] == 2 and y.shape[-1] == 3 and view.ndim == 4 and view.shape[-1] == 3, kind
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        if kind.startswith("sr_"):
            assert y.shape[1:3] == (14, 18)
        else:
            assert y.shape == img.shape
        if kind == "inpaint_mask":  # known pixels untouched, missing ones zeroed (0 in [-1, 1] is grey)
            m = kw["mask"].bool()
            assert torch.allclose(y[:, ~m], img[:, ~m], atol=1e-6) and torch.allclose(y[:, m], torch.full_like(y[:, m], 0.5))
    with pytest.raises(Exception, match=r"^image: the image is 70x56, which the scale factor 4"):
        r.DegradeImage.execute(img[:, :, :70], r.DegradationOperator.execute("sr_avgpool", **base).args[0], 0)
    with pytest.raises(Exception, match=r"^mask: the mask is 10x10"):
        op = r.DegradationOperator.execute("inpaint_mask", **dict(base, mask=torch.ones(10, 10))).args[0]
        r.DegradeImage.execute(img, op, 0)
    with pytest.raises(Exception, match=r"^mask: kind inpaint_mask needs a MASK"):
        r.DegradationOperator.execute("inpaint_mask", **base)


# --------------------------------------------------------------------------------------------
# restoration through ComfyUI (issue 6)

def _operator(pack, kind="sr_avgpool", **kw):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    base = dict(scale_factor=4, kernel_size=9, blur_sigma=3.0, motion_intensity=0.5, mask_amount=0.4, sigma_y=0.05,
                seed=1)
    base.update(kw)
    with torch.inference_mode():
        return r, r.DegradationOperator.execute(kind, **base).args[0]


def _restore(pack, loaded, y, op, **kw):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    with torch.inference_mode():
        out = r.Restore.execute(loaded[0], loaded[2], loaded[3], y, op, **_restore_args(**kw)).args
    return out[0], out[1]["samples"], json.loads(out[2])


@pytest.mark.parametrize("kind", ["sr_avgpool", "gaussian_blur", "inpaint_box"])
def test_restore_methods_lower_the_measurement_residual(pack, loaded, kind):
    r, op = _operator(pack, kind)
    clean = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        y = r.DegradeImage.execute(clean, op, 0).args[0]
    _, _, unguided = _restore(pack, loaded, y, op, method="ldps", step_size=0.0)
    # P2L without its projection here: the random VAE's encoder is no inverse of its decoder (the
    # projection is tested on the reference in test_core_restoration.py)
    for method, kw in (("ldps", {"step_size": 3.0}), ("psld", {"step_size": 3.0}), ("stsl", {}),
                       ("p2l", {"step_size": 3.0, "p2l_project_every": 0})):
        image, latent, rep = _restore(pack, loaded, y, op, method=method, **kw)
        assert image.shape == clean.shape and latent.shape == (1, 4, 8, 8)
        assert rep["residual"] < unguided["residual"], (kind, method, rep["residual"], unguided["residual"])
        calls = {"ldps": 4, "psld": 4, "stsl": 4 * 2, "p2l": 4 * 2}[method]  # STSL: K = 2 batched calls per step
        assert rep["unet_calls"] == calls, (method, rep["unet_calls"])
        if method == "stsl":
            assert rep["nfe_as_the_paper_counts"] == calls


def test_restore_stops_with_a_clear_message_when_it_diverges(pack, loaded, monkeypatch):
    """The samplers' divergence check (a real divergence is in test_core_restoration.py) reaches the
    user as a clear error: here every latent counts as diverged."""
    r, op = _operator(pack, "sr_avgpool")
    rs = importlib.import_module(pack.__name__ + ".core.restoration")
    monkeypatch.setattr(rs, "MAX_LATENT_RMS", 1e-6)
    y = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(6))
    for method in ("ldps", "psld", "stsl", "p2l"):
        with pytest.raises(Exception, match=r"^step_size/stsl_lr: (LDPS|PSLD|STSL|P2L) diverged at step 1: the "
                                            r"latent has an RMS of"):
            _restore(pack, loaded, y, op, method=method)
    monkeypatch.undo()
    y_nan = y.clone()
    y_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(Exception, match=r"^measurement: contains NaN"):
        _restore(pack, loaded, y_nan, op, method="ldps")


def test_restore_p2l_tunes_the_prompt_and_decoder_memory_modes_agree(pack, loaded):
    r, op = _operator(pack, "sr_avgpool")
    y = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(6))
    _, _, rep = _restore(pack, loaded, y, op, method="p2l", p2l_prompt_steps=2, p2l_prompt_lr=0.05)
    assert rep["embedding_change"] > 1e-4
    before, after = rep["prompt_loss_first_step"]
    assert after < before
    imgs = {m: _restore(pack, loaded, y, op, method="ldps", steps=3, decoder_memory=m, tile_size=16)[0]
            for m in ("full", "checkpoint", "tiled")}
    assert _rel(imgs["checkpoint"], imgs["full"]) < 1e-5
    assert _rel(imgs["tiled"], imgs["full"]) < 1e-5   # the 8x8 latent fits in one 16-pixel tile


def test_restore_decoder_defaults_decode_large_images_in_bounded_tiles_and_output_whole(pack, glue, loaded):
    """The Restore node's defaults (tiled, tile_size 40) above 320 px, at 336 px (42 latent pixels, the
    smallest size the default splits in 2 x 2 tiles; a 512 px image splits the same way in tiles of
    35): every decoder call of a gradient sees a tile of at most 40 latent pixels a side (2 x 2 tiles
    of 24, each run forward and again in the backward pass), the gradient is finite, and the output
    image is ComfyUI's whole decode."""
    model, clip, vae = loaded[:3]
    with torch.inference_mode():
        codec = glue.LatentCodec(vae, model)
        seen, decode_raw = [], codec._decode_raw
        codec._decode_raw = lambda raw: seen.append(tuple(raw.shape[-2:])) or decode_raw(raw)
        z = torch.randn(1, 4, 42, 42, generator=torch.Generator().manual_seed(3))
        with codec.autograd():
            zz = z.clone().requires_grad_(True)
            x = codec.decode(zz)
            (g,) = torch.autograd.grad(x.pow(2).mean(), zz)
        assert x.shape == (1, 3, 336, 336) and seen == [(24, 24)] * 8, seen
        assert torch.isfinite(g).all() and float(g.abs().max()) > 0
        out = codec.decode_output(z)
        ref = vae.decode(model.get_model_object("latent_format").process_out(z))
    assert torch.equal(out, ref)


def test_restore_bad_inputs_get_clear_errors(pack, loaded):
    r, op = _operator(pack, "sr_avgpool")
    with pytest.raises(Exception, match=r"^measurement: the restored image would be 68x68; the VAE needs multiples of 8"):
        _restore(pack, loaded, torch.rand(1, 17, 17, 3), op)
    with torch.inference_mode():
        r2 = importlib.import_module(pack.__name__ + ".nodes.restoration")
        masked = r2.DegradationOperator.execute("inpaint_mask", 4, 9, 3.0, 0.5, 0.4, 0.0, 1,
                                                mask=torch.ones(10, 10)).args[0]
    with pytest.raises(Exception, match=r"^mask: the mask is 10x10 but the image is 64x64"):
        _restore(pack, loaded, torch.rand(1, 64, 64, 3), masked)
    with pytest.raises(Exception, match=r"^operator: connect a Degradation Operator"):
        _restore(pack, loaded, torch.rand(1, 64, 64, 3), "not an operator")
    with pytest.raises(Exception, match=r"^positive: the conditioning has a batch of 2"):
        two = [[torch.cat([loaded[3][0][0]] * 2), dict(loaded[3][0][1])]]
        rr = importlib.import_module(pack.__name__ + ".nodes.restoration")
        with torch.inference_mode():
            rr.Restore.execute(loaded[0], loaded[2], two, torch.rand(3, 16, 16, 3), op, **_restore_args())


@pytest.mark.parametrize("method", ["stsl", "p2l"])
def test_cancel_inside_the_restoration_inner_loops(pack, loaded, method):
    r, op = _operator(pack, "gaussian_blur")
    y = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    # the cancel comes during the 2nd model call of the 2nd step's inner loop
    at, total = _interrupt_after(5, lambda: _restore(pack, loaded, y, op, method=method, stsl_inner_steps=3,
                                                     p2l_prompt_steps=3))
    assert total - at <= 1
