"""Degradation operators (core/operators.py): adjointness, sizes, batches, masks, kernels, errors."""
import pytest
import torch

from comfyui_inverse.core import operators as ops
from support.core_oracles import Compose


def _linear_ops(H=64, W=64):
    return {
        "sr_avgpool_x4": ops.AvgPoolSR(4),
        "sr_avgpool_x8": ops.AvgPoolSR(8),
        "sr_bicubic_x4": ops.BicubicSR(4),
        "gaussian_blur": ops.Blur(ops.gaussian_kernel(61, 3.0), "gaussian_blur"),
        "motion_blur": ops.Blur(ops.motion_kernel(61, 0.5, seed=3), "motion_blur"),
        "inpaint_random": ops.Inpaint(ops.random_mask(H, W, 0.5, seed=1)),
        "inpaint_box": ops.Inpaint(ops.box_mask(H, W, 0.4)),
        "inpaint_freeform": ops.Inpaint(ops.freeform_mask(H, W, seed=2)),
        "denoise": ops.GaussianNoise(0.05),
        "blur_then_sr": Compose([ops.Blur(ops.gaussian_kernel(9, 1.0)), ops.AvgPoolSR(4)]),
    }


@pytest.mark.parametrize("name", list(_linear_ops()))
def test_adjointness(name):
    op = _linear_ops()[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    Ax = op.A(x)
    y = torch.randn(Ax.shape, generator=g, dtype=torch.float64)
    lhs = float((Ax * y).sum())
    rhs = float((x * op.At(y, x)).sum())
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize("name", ["gaussian_blur", "motion_blur", "inpaint_random", "denoise"])
def test_odd_sizes_and_batches(name):
    H, W = 37, 53
    op = _linear_ops(H, W)[name]
    x = torch.rand(3, 3, H, W) * 2 - 1
    y = op.A(x)
    assert y.shape == x.shape
    for b in range(3):  # batch items are independent
        assert torch.allclose(op.A(x[b:b + 1]), y[b:b + 1], atol=1e-6)


def test_kernels():
    k = ops.gaussian_kernel(61, 3.0)
    assert k.shape == (61, 61) and float(k.sum()) == pytest.approx(1.0) and float(k[30, 30]) == float(k.max())
    m1, m2 = ops.motion_kernel(61, 0.5, seed=7), ops.motion_kernel(61, 0.5, seed=7)
    assert torch.equal(m1, m2) and not torch.equal(m1, ops.motion_kernel(61, 0.5, seed=8))
    assert float(m1.sum()) == pytest.approx(1.0, abs=1e-5) and float((m1 > 0).float().mean()) < 0.2
    straight = ops.motion_kernel(61, 0.0, seed=7)
    assert float((straight > 0).float().sum()) < float((ops.motion_kernel(61, 1.0, seed=7) > 0).float().sum())


def test_masks_have_the_stated_damage():
    assert float(1 - ops.random_mask(128, 128, 0.4, seed=0).mean()) == pytest.approx(0.4, abs=0.02)
    assert float(1 - ops.box_mask(100, 100, 0.5).mean()) == pytest.approx(0.25, abs=0.01)
    ff = 1 - float(ops.freeform_mask(128, 128, (0.1, 0.2), seed=0).mean())
    assert 0.1 <= ff <= 0.3


def test_noise_models():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 128, 128)
    y = ops.GaussianNoise(0.05).measure(x, g)
    assert float(y.std()) == pytest.approx(0.05, rel=0.05)
    sp = ops.SaltPepper(0.02).measure(x, g)
    hit = (sp.abs() == 1).all(dim=1).float().mean()
    assert float(hit) == pytest.approx(0.02, abs=0.005)


def test_clear_errors():
    with pytest.raises(ops.OperatorError, match=r"^image: the image is 30x30, which the scale factor 4"):
        ops.AvgPoolSR(4).A(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ops.OperatorError, match=r"^mask: the mask is 32x32 but the image is 64x64"):
        ops.Inpaint(torch.ones(32, 32)).A(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ops.OperatorError, match=r"^intensity"):
        ops.motion_kernel(61, 1.5)
