"""The Decoder Inversion node (nodes/decoder_inversion.py) through a ComfyUI VAE (issue 4): every
method lowers what it drives and leaves the shared VAE alone; bad inputs are clear errors."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from support import comfy_host

comfy_host.skip_module_without_host()


@pytest.mark.parametrize("method,step,precision", [
    ("gradient_free_adam", 0.05, "auto"), ("gradient_free_fixed_point", 0.2, "auto"),
    ("gradient_free_momentum", 0.1, "auto"), ("gradient_based", 0.01, "auto"),
    ("gradient_free_fixed_point", 0.1, "bf16")])
def test_decoder_inversion_node_with_a_comfyui_vae(pack, loaded, method, step, precision):
    n = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    vae = loaded[2]
    # bf16 convolutions have no fast CPU kernel (7 s per decode + encode here): one image, 4 iterations
    # (the residual 0.619 -> 0.559); float32 on a batch of two, 12 iterations
    batch, iterations = (1, 4) if precision == "bf16" else (2, 12)
    img = torch.rand(batch, 64, 64, 3, generator=torch.Generator().manual_seed(12))
    params = list(vae.first_stage_model.parameters())
    before = (params[0].dtype, params[0].detach().clone())
    with torch.inference_mode():
        lat, plot, record = n.DecoderInversion.execute(img, vae, method, iterations, step, 0.3, precision).args
    rec = json.loads(record)
    assert lat["samples"].shape == (batch, 4, 8, 8) and lat["samples"].dtype == torch.float32
    assert plot.shape == (1, 360, 640, 3) and float(plot.min()) < 0.5  # something was drawn
    # each method lowers what it drives (the random-weight VAE has no meaningful image quality;
    # the PSNR gains are measured on the trained TAEF2 in test_core_decoder_inversion.py)
    if method == "gradient_based":
        assert rec["reconstruction_rms"][-1] < rec["reconstruction_rms"][0], rec["reconstruction_rms"]
    else:
        assert rec["residual_rms"][-1] < rec["residual_rms"][0], rec["residual_rms"]
    assert params[0].dtype == before[0] and torch.equal(params[0].detach(), before[1]), "the shared VAE changed"


def test_decoder_inversion_errors_are_clear(pack, loaded):
    n = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    vae = loaded[2]
    img = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        with pytest.raises(Exception, match=r"^step_size/momentum: "):
            n.DecoderInversion.execute(img, vae, "gradient_free_momentum", 2, 0.3, 0.5, "auto")
        with pytest.raises(Exception, match=r"^latent: shape"):
            n.DecoderInversion.execute(img, vae, "gradient_free_adam", 2, 0.01, 0.3, "auto",
                                       latent={"samples": torch.zeros(1, 4, 16, 16)})


def test_gradient_based_decoder_memory_modes(pack, loaded):
    """decoder_memory (issue 22): an image within one tile decodes whole, so "tiled" is "full" to the
    bit; a larger one decodes as tiles whose gradient still drives the whole decoder's error down,
    close to the untiled run's."""
    n = importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")
    vae = loaded[2]

    def run(size, memory, tile):
        img = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(5))
        with torch.inference_mode():
            lat, _, record = n.DecoderInversion.execute(img, vae, "gradient_based", 2, 0.01, 0.3, "auto",
                                                        decoder_memory=memory, tile_size=tile).args
        return lat["samples"], json.loads(record)["reconstruction_rms"]

    whole, rec_whole = run(64, "full", 16)
    tiled, rec_tiled = run(64, "tiled", 16)  # 8 x 8 latent pixels: one tile
    assert torch.equal(whole, tiled) and rec_whole == rec_tiled
    full, rec_full = run(136, "full", 16)
    tiles, rec_tiles = run(136, "tiled", 16)  # 17 x 17 latent pixels: 2 x 2 tiles of 10
    assert not torch.equal(full, tiles)
    assert rec_tiles[-1] < rec_tiles[0] and rec_full[-1] < rec_full[0], (rec_tiles, rec_full)
    gain_tiles, gain_full = rec_tiles[0] - rec_tiles[-1], rec_full[0] - rec_full[-1]
    assert gain_tiles > 0.5 * gain_full, (rec_tiles, rec_full)
    with torch.inference_mode(), pytest.raises(Exception, match=r"^decoder_memory: "):
        n.DecoderInversion.execute(torch.rand(1, 64, 64, 3), vae, "gradient_based", 1, 0.01, 0.3, "auto",
                                   decoder_memory="paged")
