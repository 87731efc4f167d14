"""Memory-bounded differentiable decoding (core/tiling.py): exactness where it must hold, and the
autograd memory it saves, measured as the bytes autograd keeps for the backward pass."""
import torch

from comfyui_inverse.core.tiling import decode_bounded


def _pointwise_decoder():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 1)
    return lambda z: torch.nn.functional.interpolate(torch.tanh(conv(z)), scale_factor=8, mode="nearest")


def _conv_decoder():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(32, 3, 3, padding=1))
    return net


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
    dec = _conv_decoder()
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
