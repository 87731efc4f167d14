"""Issue 20, restoration parts.

(6) The posterior samplers differentiate only with respect to their optimised variable (the latent,
P2L's embedding): a noise predictor, decoder or encoder whose weights are ordinary tensors that
require grad (a model built or patched outside inference mode) gains no ``.grad`` and keeps its
weights bit for bit. Core level on plain nn.Modules; node level through Restore on the tiny SD1.5
with every weight made to require grad.

(7) A diverged restoration never comes back as a success: every latent a method returns, the last
step's included, is checked, in the model's unit-scale coordinates (core) and in the units of the
LATENT the node outputs (node), and a large step at few steps stops every method with the
"diverged at step N" error that names the inputs to change.
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from comfyui_inverse.core import decoder_inversion as di
from comfyui_inverse.core import operators as ops
from comfyui_inverse.core import restoration as rs
from comfyui_inverse.core import schedule


# --------------------------------------------------------------------------------------------
# (6) core level: plain nn.Module predictor, decoder and encoder whose parameters require grad

class ConvPredictor(nn.Module):
    """eps(z, t, c) = conv(z) + 0.1 c: differentiable in z and in a tensor handle c (P2L's prompt)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.calls = 0

    def forward(self, z, t, conds):
        self.calls += 1
        out = []
        for c in conds:
            e = self.conv(z) * (1.0 + 1e-3 * float(t))
            if isinstance(c, torch.Tensor):
                e = e + 0.1 * c
            out.append(e)
        return torch.stack(out)


class ConvDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, z):
        return torch.tanh(self.up(z))


class ConvEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 2, stride=2)

    def forward(self, x):
        return self.down(x)


def _modules(seed=0):
    torch.manual_seed(seed)
    pred, dec, enc = ConvPredictor(), ConvDecoder(), ConvEncoder()
    mods = (pred, dec, enc)
    for m in mods:
        assert all(p.requires_grad for p in m.parameters())
    return mods


def _snapshot(mods):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]


def _assert_untouched(mods, before, what):
    for m, snap in zip(mods, before):
        grads = [n for n, p in m.named_parameters() if p.grad is not None]
        assert not grads, (what, type(m).__name__, grads)
        for k, v in m.state_dict().items():
            assert torch.equal(v, snap[k]), (what, type(m).__name__, k)


def _setup():
    ac = schedule.scaled_linear_alphas_cumprod()
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(4, steps_offset=1))
    op = ops.AvgPoolSR(2, 0.05)
    g = torch.Generator().manual_seed(1)
    y = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    zT = torch.randn(1, 4, 8, 8, generator=g)
    return grid, op, y, zT


@pytest.mark.parametrize("method", ["ldps", "psld", "stsl", "p2l"])
def test_samplers_leave_the_weights_of_grad_requiring_modules_alone(method):
    grid, op, y, zT = _setup()
    mods = _modules()
    pred, dec, enc = mods
    before = _snapshot(mods)
    if method in ("ldps", "psld"):
        out = rs.METHODS[method](rs.Problem(pred, dec, op, y, grid, "c", zT, encode=enc),
                                 rs.RestorationConfig(zeta=1.0, gamma=0.1, glue_iters=2))
        z, res = out.latent, out.residuals
    elif method == "stsl":
        out = rs.stsl(rs.Problem(pred, dec, op, y, grid, "c", encode=enc, generator=torch.Generator().manual_seed(0)),
                      rs.RestorationConfig(K=2, lr=0.05))
        z, res, nfe = out.latent, out.residuals, out.report["evaluations"]
        assert nfe == 8
    else:
        C0 = torch.zeros(1, 4, 8, 8)
        out = rs.p2l(rs.Problem(pred, dec, op, y, grid, None, zT, encode=enc, make_cond=lambda C: C, embedding=C0),
                     rs.RestorationConfig(zeta=1.0, prompt_steps=2, prompt_lr=0.05, project_every=2, cg_iters=3))
        z, res, C, losses = out.latent, out.residuals, out.report["embedding"], out.report["prompt_loss"]
        assert float((C - C0).abs().max()) > 1e-3          # the optimised variable itself did move
    assert torch.isfinite(z).all() and len(res) == 4
    _assert_untouched(mods, before, method)


def test_gradient_based_decoder_inversion_leaves_the_decoder_alone():
    mods = _modules()
    _, dec, enc = mods
    before = _snapshot(mods)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z, rec = di.gradient_based(enc, dec, x, iterations=5, lr=0.05)
    assert rec.recon[-1] < rec.recon[0]
    _assert_untouched(mods, before, "gradient_based")


# --------------------------------------------------------------------------------------------
# (7) core level: the last step's latent is checked too

def test_the_last_steps_latent_is_checked():
    """A predictor that is harmless until the last step, where it blows the latent up: the sampler
    must stop at that step instead of returning the latent."""
    grid, op, y, zT = _setup()

    def pred(z, t, conds):
        last = int(t) == int(grid.timesteps[grid.steps - 1])
        return torch.stack([(-1e4 if last else 0.1) * z for _ in conds])

    dec = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=2)  # noqa: E731
    with pytest.raises(rs.DivergenceError, match=r"^LDPS diverged at step 4: the latent has an RMS of"):
        rs.ldps(rs.Problem(pred, dec, op, y, grid, "c", zT), rs.RestorationConfig(zeta=0.0))


# --------------------------------------------------------------------------------------------
# node level, on the tiny SD1.5 of tests/support/comfy_host.py

def _host():
    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        if comfy_host.REQUIRE_HOST:
            raise RuntimeError(comfy_host.MISSING_REASON)
        pytest.skip(comfy_host.MISSING_REASON)
    return comfy_host


def _restore_args(**kw):
    """The integration tests' Restore arguments (support/integration.py), at 3 steps of LDPS unless told
    otherwise."""
    from support.integration import _restore_args as integration_args

    return integration_args(**{"method": "ldps", "steps": 3, **kw})


def _measurement(pack, size=64, seed=4):
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    clean = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        op = r.DegradationOperator.execute("sr_avgpool", 4, 9, 3.0, 0.5, 0.4, 0.05, 1).args[0]
        y = r.DegradeImage.execute(clean, op, 0).args[0]
    return r, op, y


# Settings that make each method leave the range in 3 steps on the tiny SD1.5 at 16 px (a 2x2
# latent, where one data-consistency step moves each latent pixel most). RMS of the LATENT each
# returned before the node checked its output (model-coordinate RMS in brackets, which core checks):
# LDPS at step 100 174 (32; the run), P2L without its projection the same path, STSL with
# 20 Adam steps of lr 1.0 per step 124 (23): the samplers' own check (100 in model coordinates)
# passed them all. PSLD with gluing 10 leaves at step 1 in model coordinates (172).
DIVERGING = {
    "ldps": dict(step_size=100.0),
    "psld": dict(step_size=100.0, gluing=10.0),
    "p2l": dict(step_size=100.0, p2l_project_every=0),
    "stsl": dict(stsl_lr=1.0, stsl_inner_steps=20, stsl_lambda=100.0, stsl_noise_samples=1, decoder_memory="full"),
}


@pytest.mark.parametrize("method", list(DIVERGING))
def test_restore_stops_a_diverged_run_with_the_clear_error(pack, loaded, method):
    model, _, vae, pos, _ = loaded  # the shared tiny SD1.5 (support/fixtures.py)
    r, op, y = _measurement(pack, size=16)
    with torch.inference_mode(), pytest.raises(Exception) as info:
        out = r.Restore.execute(model, vae, pos, y, op, **_restore_args(method=method, **DIVERGING[method])).args
        lat = out[1]["samples"]
        raise AssertionError(f"{method} returned a latent of RMS {float(lat.pow(2).mean().sqrt()):.4g} "
                             f"(min {float(lat.min()):.4g}, max {float(lat.max()):.4g}) as a success")
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    assert isinstance(info.value, glue.InverseInputError), info.value
    assert str(info.value).startswith(f"step_size/stsl_lr: {method.upper()} diverged at step "), str(info.value)
    assert "the latent has an RMS of" in str(info.value) and "lower the step size" in str(info.value)


def test_restore_leaves_a_grad_requiring_model_and_vae_alone(pack):
    """The tiny SD1.5 loaded outside inference mode with every UNet and VAE weight set to require
    grad (as a model patched or trained by another node may be): no method leaves a .grad on any
    weight, and the weights are bit-identical afterwards."""
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(_host().tiny_checkpoint()))[:3]
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
    nets = {"unet": model.model, "vae": vae.first_stage_model}
    for net in nets.values():
        net.requires_grad_(True)
    params = {f"{k}.{n}": p for k, net in nets.items() for n, p in net.named_parameters()}
    assert params and all(p.requires_grad and not p.is_inference() for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    r, op, y = _measurement(pack, size=32)
    for method in ("ldps", "psld", "stsl", "p2l"):
        with torch.inference_mode():
            out = r.Restore.execute(model, vae, pos, y, op, **_restore_args(method=method, steps=2)).args
        assert torch.isfinite(out[1]["samples"]).all()
        assert json.loads(out[2])["unet_calls_with_gradients"] > 0
        now = {n: p for k, net in nets.items() for n, p in ((f"{k}.{m}", q) for m, q in net.named_parameters())}
        leaked = [n for n, p in now.items() if p.grad is not None]
        assert not leaked, (method, len(leaked), leaked[:5])
        changed = [n for n, p in now.items() if not torch.equal(p.detach(), before[n])]
        assert not changed, (method, changed[:5])
