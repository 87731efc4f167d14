"""Memory-bounded differentiable decoding (core/tiling.py): exactness where it must hold, and the
autograd memory it saves, measured as the bytes autograd keeps for the backward pass."""
import torch

import json
import subprocess
import sys
from pathlib import Path

from comfyui_inverse.core.tiling import decode_bounded, tile_spans
from support.core_models import conv_decoder


def _pointwise_decoder():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 1)
    return lambda z: torch.nn.functional.interpolate(torch.tanh(conv(z)), scale_factor=8, mode="nearest")


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_tiled_checkpointed_decode_is_exact_for_a_pointwise_decoder_with_equal_gradients():
    dec = _pointwise_decoder()
    z = torch.randn(2, 4, 20, 27, requires_grad=True)
    full = dec(z)
    (g_full,) = torch.autograd.grad(full.pow(2).sum(), z)
    tiled = decode_bounded(dec, z, tile=8, overlap=3)
    (g_tiled,) = torch.autograd.grad(tiled.pow(2).sum(), z)
    assert tiled.shape == full.shape
    assert torch.allclose(tiled, full, atol=1e-6) and torch.allclose(g_tiled, g_full, rtol=1e-4, atol=1e-4)


def test_checkpointing_keeps_values_and_gradients_and_saves_autograd_memory():
    dec = conv_decoder()
    z = torch.randn(1, 4, 32, 32, requires_grad=True)
    full, full_bytes = _saved_bytes(lambda: dec(z))
    (g_full,) = torch.autograd.grad(full.pow(2).sum(), z)
    ckpt, ckpt_bytes = _saved_bytes(lambda: decode_bounded(dec, z, tile=0))
    (g_ckpt,) = torch.autograd.grad(ckpt.pow(2).sum(), z)
    assert torch.allclose(ckpt, full, atol=1e-6) and torch.allclose(g_ckpt, g_full, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.05 * full_bytes, (ckpt_bytes, full_bytes)
    # tiles with an overlap wider than the receptive field: close to the full decode
    tiled = decode_bounded(dec, z, tile=16, overlap=8)
    assert float((tiled - full).detach().abs().max()) < 0.05 * float(full.detach().abs().max())


def test_tile_spans_are_the_fewest_equal_tiles_within_the_bound():
    for tile, overlap in ((40, 5), (16, 2), (64, 8), (24, 0)):
        for n in range(1, 300):
            length, starts = tile_spans(n, tile, overlap)
            k = len(starts)
            assert length <= tile and starts[0] == 0 and starts[-1] + length == n
            assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))  # overlap >= requested
            assert k == 1 or (k - 1) * tile - (k - 2) * overlap < n  # one tile fewer could not cover n
    assert tile_spans(64, 40, 5) == (35, [0, 29])  # the Restore node's default at 512 px: 2 x 2 tiles


_PEAK = """
import json, sys
import torch
from support.core_models import conv_decoder
from support.peak_memory import Peak
from comfyui_inverse.core.tiling import decode_bounded
dec, tile = conv_decoder(), int(sys.argv[1])
z = torch.randn(1, 4, 64, 64, requires_grad=True)
def once():
    x = decode_bounded(dec, z, tile=tile, overlap=max(1, tile // 8), checkpoint=tile > 0)
    x.pow(2).mean().backward()
once()
with Peak() as peak:
    once()
print(json.dumps(peak.mb))
"""


def _peak_growth_mb(tile: int) -> float:
    from support.peak_memory import FRESH_ENV

    # run in tests/, where the support package imports (and loads the pack) with no path set-up
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tile)], capture_output=True, text=True,
                          env=FRESH_ENV, check=True, cwd=Path(__file__).parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_tiles_bound_the_decoder_memory_of_a_512px_gradient():
    """Peak memory of one gradient through a convolutional decoder at 512 px, each in a fresh
    process (resident-size growth, second run): the default 40-latent tiles take about a third of
    the whole decode's (measured 51 vs 151 MB)."""
    whole, tiled = _peak_growth_mb(0), _peak_growth_mb(40)
    assert whole > 50 and tiled < 0.6 * whole, (tiled, whole)
