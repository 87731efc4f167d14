"""The analytic and toy models the core tests share (no ComfyUI).

- :func:`mixture_reference`: a Gaussian-mixture prior per prompt whose exact noise predictor is known
  (core/reference.py), SD's scaled-linear schedule and a latent near one of its modes.
- :func:`toy_inversion`: the toy attention model (core/reference.py), which calls the attention
  controller as the ComfyUI glue does, and the DDIM inversion of a random latent under it.
- :func:`conv_decoder`: a small convolutional decoder (x8), for the tiled decoding's memory.
"""
from __future__ import annotations

import torch

import support

support.load_pack()

from comfyui_inverse.core import ddim, schedule  # noqa: E402
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior, ToyAttentionModel  # noqa: E402
from comfyui_inverse.core.result import InversionResult  # noqa: E402

TOKENS = 8  # context tokens of the toy attention model's prompts


def mixture_reference(shape=(2, 4, 8, 8), seed=0, components=3):
    g = torch.Generator().manual_seed(seed)
    ac = schedule.scaled_linear_alphas_cumprod()
    prior_c = MixturePrior(torch.randn((3,) + shape[1:], generator=g, dtype=torch.float64) * 0.8,
                           torch.tensor([0.5, 0.7, 0.6], dtype=torch.float64),
                           torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    centre = prior_c.means[1]
    if components == 1:
        prior_c = MixturePrior.gaussian(centre, 0.7)
    prior_u = MixturePrior(torch.zeros((1,) + shape[1:], dtype=torch.float64),
                           torch.tensor([1.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    model = GaussianMixtureDenoiser({"c": prior_c, "u": prior_u}, ac)
    z0 = centre[None].expand(shape).float() + 0.5 * torch.randn(shape, generator=g)
    return model, ac, z0


def toy_inversion(steps=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = {k: torch.randn(TOKENS, 12, generator=g) for k in ("src", "tar", "null")}
    ctx["same"] = ctx["src"].clone()
    model = ToyAttentionModel(ctx)
    acp = schedule.scaled_linear_alphas_cumprod()
    grid = schedule.TimestepGrid.from_schedule(acp, schedule.timestep_spacing(steps, steps_offset=1))
    z0 = torch.randn(2, 4, 8, 8, generator=g) * 0.5
    traj = ddim.ddim_invert(model, z0, grid, "src").trajectory
    return model, InversionResult(traj, grid, "npi", 1.0), z0


def conv_decoder():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=2),
                              torch.nn.Conv2d(32, 3, 3, padding=1))
    return net
