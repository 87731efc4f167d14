"""Analytic reference denoisers whose exact eps is known.

For a Gaussian-mixture prior z_0 ~ sum_k w_k N(mu_k, s_k^2 I) the noisy marginal at level abar is
p_t = sum_k w_k N(sqrt(abar) mu_k, v_k I) with v_k = abar s_k^2 + 1 - abar, and the MMSE noise
prediction is eps*(z) = -sqrt(1 - abar) grad log p_t(z) (Tweedie; Vincent 2011, Song et al. 2021)

    eps*(z) = sqrt(1 - abar) sum_k r_k(z) (z - sqrt(abar) mu_k) / v_k,

with r_k(z) the posterior responsibilities. With one component the probability-flow ODE is solved
in closed form (:func:`gaussian_flow`), which gives DDIM's exact continuous-time answer.
These serve the tests and benchmarks as a stand-in for a UNet: they implement
:class:`~.protocols.NoisePredictor`, are differentiable and count their calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import torch

from .schedule import level_abar

Tensor = torch.Tensor


@dataclass
class MixturePrior:
    means: Tensor    # [K, *shape]
    stds: Tensor     # [K]
    weights: Tensor  # [K], summing to one

    @classmethod
    def gaussian(cls, mean: Tensor, std: float) -> "MixturePrior":
        return cls(mean[None].double(), torch.tensor([float(std)], dtype=torch.float64),
                   torch.ones(1, dtype=torch.float64))


class GaussianMixtureDenoiser:
    """Exact eps for a Gaussian-mixture latent prior, one prior per conditioning handle.

    ``alphas_cumprod`` maps a model timestep to abar (a :class:`~.schedule.Level` carries its own). Conditioning handles are dictionary keys;
    a handle may also be a :class:`MixturePrior` itself (so that a test can differentiate
    with respect to a prior mean, the analogue of a text embedding).
    """

    def __init__(self, priors: Mapping[Hashable, MixturePrior], alphas_cumprod: Tensor):
        self.priors = dict(priors)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.calls = 0          # predictor calls (the analogue of batched UNet calls)
        self.evaluations = 0    # conditioning branches evaluated

    def _prior(self, cond: Any) -> MixturePrior:
        return cond if isinstance(cond, MixturePrior) else self.priors[cond]

    def eps(self, z: Tensor, abar: float, prior: MixturePrior) -> Tensor:
        zz = z.double()
        B = zz.shape[0]
        flat = zz.reshape(B, -1)
        mu = prior.means.reshape(prior.means.shape[0], -1).to(flat)
        v = abar * prior.stds.to(flat) ** 2 + (1.0 - abar)                    # [K]
        diff = flat[:, None, :] - math.sqrt(abar) * mu[None]                  # [B, K, D]
        D = flat.shape[1]
        logits = (torch.log(prior.weights.to(flat))[None] - 0.5 * D * torch.log(v)[None]
                  - 0.5 * (diff ** 2).sum(-1) / v[None])                      # [B, K]
        r = torch.softmax(logits, dim=1)
        eps = math.sqrt(1.0 - abar) * (r[:, :, None] * diff / v[None, :, None]).sum(1)
        return eps.reshape(zz.shape).to(z.dtype)

    def __call__(self, z: Tensor, t: int, conds: Sequence[Any]) -> Tensor:
        self.calls += 1
        self.evaluations += len(conds)
        abar = level_abar(t, self.alphas_cumprod)
        return torch.stack([self.eps(z, abar, self._prior(c)) for c in conds])


def gaussian_flow(z: Tensor, abar_from: float, abar_to: float, mean: Tensor, std: float) -> Tensor:
    """Exact probability-flow ODE map between two levels for a Gaussian prior N(mean, std^2 I):
    the standardised variable (z - sqrt(a) mean) / sqrt(a std^2 + 1 - a) is conserved."""
    zz = z.double()
    m = mean.double()
    u = (zz - math.sqrt(abar_from) * m) / math.sqrt(abar_from * std ** 2 + 1.0 - abar_from)
    return math.sqrt(abar_to) * m + math.sqrt(abar_to * std ** 2 + 1.0 - abar_to) * u


class ToyAttentionModel:
    """A tiny random-weight eps predictor with the attention layout of an SD UNet block (self-
    attention, cross-attention to a prompt context, self-attention again), whose attention layers
    call an :class:`~.attention_control.AttentionController` like the ComfyUI glue does. Handles are
    keys of ``contexts`` ([tokens, dim] each). It exists to test attention control exactly."""

    def __init__(self, contexts: Mapping[Hashable, Tensor], channels: int = 4, dim: int = 16, heads: int = 2,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ctx_dim = next(iter(contexts.values())).shape[-1]

        def w(a, b):
            return torch.randn(a, b, generator=g) / math.sqrt(a)

        self.contexts = dict(contexts)
        self.heads = heads
        self.w_in, self.w_out = w(channels, dim), w(dim, channels) * 0.5
        self.self_w = [[w(dim, dim) for _ in range(4)] for _ in range(2)]
        self.cross_w = [w(dim, dim), w(ctx_dim, dim), w(ctx_dim, dim), w(dim, dim)]
        self.controller = None
        self.calls = 0

    def _attend(self, kind, key, layer, q, k, v, n):
        from .attention_control import sdpa
        if self.controller is None:
            return sdpa(q, k, v, self.heads)
        roles = [self.controller.roles[j] if j < len(self.controller.roles) else None for j in range(n)]
        return self.controller.attend(kind, key, layer, q, k, v, self.heads, roles, self.latent_hw)

    def __call__(self, z: Tensor, t: int, conds: Sequence[Any]) -> Tensor:
        self.calls += 1
        n, B, C, H, W = len(conds), z.shape[0], z.shape[1], z.shape[2], z.shape[3]
        self.latent_hw = (H, W)
        x = z.float().repeat(n, 1, 1, 1).flatten(2).transpose(1, 2)             # [nB, HW, C]
        h = x @ self.w_in + 0.01 * float(t)
        ctx = torch.cat([self.contexts[c].float()[None].expand(B, -1, -1) for c in conds])
        for layer, (wq, wk, wv, wo) in enumerate(self.self_w):
            h = h + self._attend("self", f"self{layer}", layer, h @ wq, h @ wk, h @ wv, n) @ wo
            if layer == 0:
                wq2, wk2, wv2, wo2 = self.cross_w
                h = h + self._attend("cross", "cross0", layer, h @ wq2, ctx @ wk2, ctx @ wv2, n) @ wo2
        eps = (h @ self.w_out).transpose(1, 2).reshape(n, B, C, H, W)
        return eps
