"""Decoder inversion (core/decoder_inversion.py) on the real trained TAEF2 autoencoder and photos."""
import math

import pytest
import torch

from comfyui_inverse.core import decoder_inversion as di
from support import taef2

if not taef2.available():
    raise RuntimeError(f"TAEF2 weights missing at {taef2.ASSETS}: ../shared must sit beside the project")


@pytest.fixture(scope="module")
def ae():
    return taef2.load()


def psnr(rms):
    return 20 * math.log10(1 / rms)


def test_forward_step_residual_decreases_monotonically_under_the_step_condition(ae):
    enc, dec = ae
    x = taef2.photo("coffee", 128)
    z, rec = di.forward_step(enc, dec, x, iterations=25, rho=0.2)
    assert len(rec.residual) == 26
    assert all(b <= a for a, b in zip(rec.residual, rec.residual[1:])), rec.residual
    assert rec.residual[-1] < 0.5 * rec.residual[0]


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_gradient_free_beats_the_encoder_on_real_photos(ae, name):
    enc, dec = ae
    x = taef2.photo(name, 128)
    for fn, kw in ((di.forward_step, dict(rho=0.2)), (di.adam_forward_step, dict(rho_max=0.01)),
                   (di.inertial_km, dict(alpha=0.3, lam=0.1))):
        z, rec = fn(enc, dec, x, iterations=25, **kw)
        assert psnr(rec.recon[-1]) > psnr(rec.recon[0]) + 1.0, (fn.__name__, psnr(rec.recon[0]), psnr(rec.recon[-1]))
        with torch.no_grad():
            assert float((dec(z) - x).pow(2).mean().sqrt()) == pytest.approx(rec.recon[-1], rel=1e-4)


def test_gradient_free_builds_no_autograd_graph(ae):
    enc, dec = ae
    x = taef2.photo("coffee", 64)
    seen = []

    def decode(z):
        seen.append(torch.is_grad_enabled() or z.requires_grad)
        return dec(z)

    for fn in (di.forward_step, di.inertial_km, di.adam_forward_step):
        z, _ = fn(enc, decode, x, iterations=3)
        assert z.grad_fn is None and not z.requires_grad
    assert seen and not any(seen)


def test_momentum_checks_the_step_size_condition(ae):
    enc, dec = ae
    assert di.km_condition(0.5, 0.2) and not di.km_condition(0.5, 0.3)
    with pytest.raises(ValueError, match=r"lambda must be below 0.25"):
        di.inertial_km(enc, dec, taef2.photo("coffee", 64), iterations=1, alpha=0.5, lam=0.3)


def test_gradient_based_baseline_lowers_the_reconstruction_error(ae):
    enc, dec = ae
    x = taef2.photo("coffee", 64)
    z, rec = di.gradient_based(enc, dec, x, iterations=15, lr=0.01)
    assert rec.recon[-1] < rec.recon[0]


def test_known_latent_protocol_reports_nmse(ae):
    enc, dec = ae
    with torch.no_grad():
        z_gt = enc(taef2.photo("astronaut", 64))
        x = dec(z_gt)
    z, rec = di.adam_forward_step(enc, dec, x, iterations=20, z_gt=z_gt)
    assert len(rec.nmse_db) == 21 and min(rec.nmse_db) < rec.nmse_db[0]


def test_sixteen_bit_models_work_with_a_float32_iterate(ae):
    enc16, dec16 = taef2.load(torch.bfloat16)
    x = taef2.photo("coffee", 64)
    z, rec = di.forward_step(lambda i: enc16(i.bfloat16()), lambda v: dec16(v.bfloat16()), x, iterations=8, rho=0.2)
    assert z.dtype == torch.float32 and math.isfinite(rec.recon[-1])
    assert rec.recon[-1] < rec.recon[0]


def test_the_authors_step_schedule():
    """smhongok/dec-inv decoder_inv_nograd: warm-up n // 10 and cosine over n = min(N, 100), the step
    held from 0.8 n on; longer runs keep the 100-iteration schedule and then a constant step."""
    vals = di.authors_schedule(100, 0.01)
    assert vals[9] == pytest.approx(0.01) and vals[0] == pytest.approx(0.001)
    assert max(vals) == pytest.approx(0.01)
    assert all(b <= a for a, b in zip(vals[10:], vals[11:]))
    held = 0.005 * (1 + math.cos(math.pi * 69 / 90))          # the step at i = 79
    assert vals[79] == pytest.approx(held) and all(v == vals[79] for v in vals[80:])
    long = di.authors_schedule(200, 0.01)
    assert long[:100] == vals and all(v == vals[79] for v in long[100:])
    assert di.authors_schedule(7, 0.01)[0] == pytest.approx(0.01)     # 7 // 10 = 0: no warm-up
    assert di.adam_eps(torch.float16) == di.adam_eps(torch.bfloat16) == 1e-4 and di.adam_eps(torch.float32) == 1e-8


# ---------------------------------------------------------------------------------------------
# The authors' loop, line for line from smhongok/dec-inv src/stable_diffusion/inverse_stable_diffusion.py
# (decoder_inv_nograd with adam=True, LR_scheduling=True, and get_lr_cosine_with_warmup), with
# self.get_image_latents / self.decode_image replaced by the encoder and decoder callables.

def _get_lr_cosine_with_warmup(i, num_steps=100, num_warmup_steps=10, lr_max=0.01):
    assert i >= 0 and i < num_steps
    if i < num_warmup_steps:
        lr = (i + 1) / num_warmup_steps * lr_max
    else:
        lr = lr_max * (1 + math.cos(math.pi * (i - num_warmup_steps) / (num_steps - num_warmup_steps))) / 2
    return lr


def _authors_decoder_inv_nograd(encode, decode, x, num_steps=100, num_warmup_steps=None, lr=0.01, half=False):
    if num_steps > 100:
        num_steps_cutoff = 100
    else:
        num_steps_cutoff = num_steps
    if num_warmup_steps is None:
        num_warmup_steps = num_steps_cutoff // 10
    beta1, beta2 = 0.9, 0.999
    eps = 1e-4 if half else 1e-8           # their half branch (float=False) and float branch
    m, v = 0, 0
    z0 = encode(x).float()
    z = z0.clone().float()
    for i in range(num_steps):
        Dz = decode(z)
        EDz = encode(Dz)
        grad = EDz - z0
        if i < 0.8 * num_steps_cutoff:
            lr_now = _get_lr_cosine_with_warmup(i, num_steps=num_steps_cutoff, num_warmup_steps=num_warmup_steps,
                                                lr_max=lr)
            lr_min = lr_now
        else:
            lr_now = lr_min
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * (grad**2)
        m_corr = m / (1 - beta1**(i + 1))
        v_corr = v / (1 - beta2**(i + 1))
        z -= lr_now * m_corr / (torch.sqrt(v_corr) + eps)
    return z


def _small_codec(seed=0):
    """A small random conv autoencoder whose E(D(.)) is close to the identity (so the iteration
    converges and the schedule matters), float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 2, 2, generator=g) * 0.5                 # decoder: 4 -> 3 channels, x2
    w_enc = w + 0.05 * torch.randn(w.shape, generator=g)          # encoder: close to its adjoint

    def decode(z):
        return torch.tanh(torch.nn.functional.conv_transpose2d(z, w, stride=2))

    def encode(x):
        return torch.nn.functional.conv2d(x, w_enc, stride=2) / 1.2

    return encode, decode


@pytest.mark.parametrize("iterations", [7, 20, 100, 200])
@pytest.mark.parametrize("half", [False, True])
def test_adam_variant_is_the_authors_loop(iterations, half):
    """The pack's gradient_free_adam equals the authors' decoder_inv_nograd re-implemented above:
    their schedule (warm-up N // 10 and cosine capped at 100 iterations, the step held from 80% of
    them on) and their eps (1e-4 in their 16-bit branch; run here on float32 codecs so that only
    the eps differs between the branches)."""
    encode, decode = _small_codec()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = _authors_decoder_inv_nograd(encode, decode, x, num_steps=iterations, lr=0.01, half=half)
    got, rec = di.adam_forward_step(encode, decode, x, iterations=iterations, rho_max=0.01,
                                    eps=di.adam_eps(torch.float16 if half else torch.float32))
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-6 * scale, (float((got - want).abs().max()), scale)
    assert float((got - encode(x)).abs().max()) > 1e-3 * scale          # it did move
