"""Decoder inversion (core/decoder_inversion.py) on the real trained TAEF2 autoencoder and photos."""
import math

import pytest
import torch

import taef2
from comfyui_inverse.core import decoder_inversion as di

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


def test_cosine_warmup_schedule():
    vals = [di.cosine_warmup(k, 100, 0.01) for k in range(100)]
    assert vals[9] == pytest.approx(0.01) and vals[0] == pytest.approx(0.001)
    assert max(vals) == pytest.approx(0.01) and vals[-1] < 1e-5
    assert all(b <= a for a, b in zip(vals[10:], vals[11:]))
