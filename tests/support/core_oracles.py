"""Closed forms, objectives and compositions the core tests and benches check against; they lived in
core/ but nothing in the pack uses them (issue 21).

- :func:`rnri_objective`: RNRI's objective F (eq. 7) for one inversion step of core/inversion.py.
- :func:`gaussian_posterior_mean_inpaint`: the exact posterior mean of inpainting under a Gaussian prior.
- :class:`Compose`: a chain of core/operators.py operators, as one operator.
"""
from __future__ import annotations

from typing import Sequence

import torch

import support

support.load_pack()

from comfyui_inverse.core.operators import Operator  # noqa: E402

Tensor = torch.Tensor


def rnri_objective(step, z: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """F(z) = ||z - f(z)||_1 + lambda * (-sum log q(z | z_s)) (RNRI eq. 7), one value per image, for a
    core/inversion.py ``_Step``; returns (F [B], r = z - f(z))."""
    r = z - step.f(z)
    return r.abs().flatten(1).sum(1) + lam * step.prior_nll(z), r


def gaussian_posterior_mean_inpaint(y: Tensor, mask: Tensor, mean: Tensor, std: float, sigma_y: float) -> Tensor:
    """Exact E[x | y] for x ~ N(mean, std^2 I), y = M x + n, n ~ N(0, sigma_y^2) on the observed entries."""
    s2, n2 = std * std, sigma_y * sigma_y
    observed = (s2 * y + n2 * mean) / (s2 + n2)
    return torch.where(mask.bool().expand_as(y), observed, mean.expand_as(y))


class Compose(Operator):
    """A = A_n o ... o A_1 (the first operator is applied first); noise of the last one."""

    def __init__(self, ops: Sequence[Operator]):
        self.ops = list(ops)
        self.name = "+".join(o.name for o in self.ops)
        self.sigma_y = self.ops[-1].sigma_y if self.ops else 0.0

    def A(self, x):
        for o in self.ops:
            x = o.A(x)
        return x

    def At(self, y, like):
        likes = [like]
        for o in self.ops[:-1]:
            likes.append(o.A(likes[-1]))
        for o, lk in zip(reversed(self.ops), reversed(likes)):
            y = o.At(y, lk)
        return y

    def noise(self, y, generator=None):
        return self.ops[-1].noise(y, generator) if self.ops else y

    def x_shape(self, y_shape):
        for o in reversed(self.ops):
            y_shape = o.x_shape(y_shape)
        return tuple(y_shape)
