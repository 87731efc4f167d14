"""Proximal guidance (core/proxedit.py) against closed forms and its defining properties."""
import pytest
import torch

from comfyui_inverse.core import ddim, inversion, proxedit, schedule
from comfyui_inverse.core.result import InversionResult

from test_core_ddim import _reference


def test_prox_operators_match_their_closed_forms():
    d = torch.tensor([[-3.0, -1.0, -0.2, 0.0, 0.5, 2.0]])
    thr = torch.tensor([[1.0]])
    assert torch.equal(proxedit.prox_hard(d, thr), torch.tensor([[-3.0, 0.0, 0.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(proxedit.prox_soft(d, thr), torch.tensor([[-2.0, 0.0, 0.0, 0.0, 0.0, 1.0]]))
    # the l1 prox is argmin_x 0.5 (x - d)^2 + thr |x|; the l0 prox argmin 0.5 (x - d)^2 + thr^2/2 [x != 0]
    xs = torch.cat([torch.linspace(-4, 4, 80001), torch.zeros(1)])[:, None]
    for j in range(d.shape[1]):
        l1 = 0.5 * (xs - d[0, j]) ** 2 + xs.abs()
        assert float(xs[l1.argmin()]) == pytest.approx(float(proxedit.prox_soft(d, thr)[0, j]), abs=1e-3)
        l0 = 0.5 * (xs - d[0, j]) ** 2 + 0.5 * (xs != 0)
        if abs(abs(float(d[0, j])) - 1.0) > 1e-6:
            assert float(xs[l0.argmin()]) == pytest.approx(float(proxedit.prox_hard(d, thr)[0, j]), abs=1e-3)


def test_quantile_threshold_is_per_image_and_keeps_the_right_share():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 4, 16, 16, generator=g) * torch.tensor([1.0, 10.0])[:, None, None, None]
    thr = proxedit.quantile_threshold(d, 0.7)
    assert thr.shape == (2, 1, 1, 1) and float(thr[1]) == pytest.approx(10 * float(thr[0]), rel=0.3)
    kept = (proxedit.prox_hard(d, thr) != 0).float().mean(dim=(1, 2, 3))
    assert torch.allclose(kept, torch.tensor([0.3, 0.3]), atol=0.01)
    assert torch.equal(proxedit.prox_hard(d, proxedit.quantile_threshold(d, 1.0)), torch.zeros_like(d))


def test_edit_mask_dilation():
    d = torch.zeros(1, 1, 7, 7)
    d[0, 0, 3, 3] = 5.0
    m = proxedit.edit_mask(d, torch.tensor(1.0), radius=1)
    assert int(m.sum()) == 9 and float(m[0, 0, 2:5, 2:5].min()) == 1.0
    assert int(proxedit.edit_mask(d, torch.tensor(1.0), radius=0).sum()) == 1


def test_slerp_endpoints_and_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(proxedit.slerp(0.0, a, b), a) and torch.allclose(proxedit.slerp(1.0, a, b), b)
    assert float(proxedit.slerp(0.5, a, b).norm()) == pytest.approx(1.0, abs=1e-6)


def test_slerp_is_per_image():
    """Review defect 2: one angle over the whole flattened batch coupled the images."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    both = proxedit.slerp(0.3, a, b)
    for i in range(2):
        assert torch.allclose(both[i:i + 1], proxedit.slerp(0.3, a[i:i + 1], b[i:i + 1]), atol=1e-6)
    assert torch.allclose(proxedit.slerp(0.3, a, b[:1]), torch.cat([proxedit.slerp(0.3, a[i:i + 1], b[:1])
                                                                      for i in range(2)]), atol=1e-6)


def _setup(steps=20):
    model, ac, z0 = _reference(components=1)
    from comfyui_inverse.core.reference import MixturePrior

    shift = torch.randn(model.priors["c"].means[0].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model.priors["t"] = MixturePrior.gaussian(model.priors["c"].means[0] + 0.8 * shift, 0.7)  # the "target prompt"
    grid = schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, steps_offset=1))
    return model, grid, z0


@pytest.mark.parametrize("prox", ["hard", "soft"])
def test_threshold_at_maximum_reproduces_the_npi_reconstruction_exactly(prox):
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c")
    res = InversionResult(traj, grid, "npi", 1.0)
    rec = ddim.ddim_sample(model, traj[-1], grid, "c")[-1]
    cfg = proxedit.ProxConfig(guidance=7.5, prox=prox, quantile=1.0)
    edit = proxedit.prox_edit(model, res, "c", "t", cfg)[-1]
    assert torch.equal(edit, rec)
    # a real edit (lower quantile) moves away from it
    edit2 = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(guidance=7.5, prox=prox, quantile=0.5))[-1]
    assert ddim.reconstruction_rmse(edit2, rec) > 1e-3


def test_threshold_at_maximum_over_ddpm_inversion_reconstructs_the_input():
    model, grid, z0 = _setup()
    xs, maps = inversion.ddpm_invert(model, z0, grid, "c", generator=torch.Generator().manual_seed(0))
    res = InversionResult(xs, grid, "ddpm", 1.0, {"noise_maps": maps})
    edit = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(quantile=1.0))[-1]
    assert ddim.reconstruction_rmse(edit, z0) < 1e-5


def test_share_of_changed_latent_grows_as_the_quantile_falls():
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c")
    res = InversionResult(traj, grid, "npi", 1.0)
    rec = ddim.ddim_sample(model, traj[-1], grid, "c")[-1]
    shares = []
    for q in (0.95, 0.8, 0.5):
        e = proxedit.prox_edit(model, res, "c", "t", proxedit.ProxConfig(quantile=q, dilation=0))[-1]
        shares.append(float(((e - rec).abs() > 1e-3).float().mean()))
    assert shares[0] < shares[1] < shares[2]


def test_inversion_guidance_pulls_the_unedited_region_to_the_trajectory():
    model, grid, z0 = _setup()
    traj = ddim.ddim_invert(model, z0, grid, "c")
    res = InversionResult(traj, grid, "ddim", 1.0)
    base = proxedit.ProxConfig(guidance=7.5, quantile=0.8, t_rec=1000)
    free = proxedit.prox_edit(model, res, "u", "t", base)[-1]
    pulled = proxedit.prox_edit(model, res, "u", "t", proxedit.ProxConfig(**{**base.__dict__, "inversion_guidance": 1.0}))[-1]
    recg = proxedit.prox_edit(model, res, "u", "t", proxedit.ProxConfig(**{**base.__dict__, "reconstruction_guidance": 0.5}))[-1]
    assert ddim.reconstruction_rmse(pulled, z0) < ddim.reconstruction_rmse(free, z0)
    assert ddim.reconstruction_rmse(recg, z0) < ddim.reconstruction_rmse(free, z0)


def test_one_predictor_call_per_step():
    model, grid, z0 = _setup(10)
    traj = ddim.ddim_invert(model, z0, grid, "c")
    model.calls = model.evaluations = 0
    proxedit.prox_edit(model, InversionResult(traj, grid, "npi", 1.0), "c", "t", proxedit.ProxConfig())
    assert (model.calls, model.evaluations) == (10, 20)
