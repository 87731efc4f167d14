"""TAEF2, the trained tiny autoencoder in ../shared/assets/taef2 (MIT, see its LICENSE), as plain
torch modules built from the architecture in ../shared/README.md. Used by tests and benchmarks
to measure decoder inversion on real photographs. Images in [0, 1]; latents 32 x H/8 x W/8."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("COMFYUI_INVERSE_SHARED", ROOT.parent / "shared")) / "assets" / "taef2"


def conv(c_in, c_out, stride=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    def __init__(self, c: int, mid: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(c, c), nn.ReLU(), conv(c, c), nn.ReLU(), conv(c, c))
        self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                  nn.Conv2d(4 * c, c, 1, bias=False)) if mid else None

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def encoder(latent: int = 32, mid: bool = True) -> nn.Sequential:
    """TAEF2's encoder; with ``latent=4, mid=False`` it is TAESD's (ComfyUI's comfy/taesd/taesd.py,
    same parameter names), which the trained testbed's VAE uses."""
    return nn.Sequential(conv(3, 64), Block(64), conv(64, 64, 2, False), Block(64), Block(64), Block(64),
                         conv(64, 64, 2, False), Block(64), Block(64), Block(64), conv(64, 64, 2, False),
                         Block(64, mid), Block(64, mid), Block(64, mid), conv(64, latent))


def decoder(latent: int = 32, mid: bool = True) -> nn.Sequential:
    up = lambda: nn.Upsample(scale_factor=2)  # noqa: E731
    return nn.Sequential(Clamp(), conv(latent, 64), nn.ReLU(), Block(64, mid), Block(64, mid), Block(64, mid),
                         up(), conv(64, 64, bias=False), Block(64), Block(64), Block(64),
                         up(), conv(64, 64, bias=False), Block(64), Block(64), Block(64),
                         up(), conv(64, 64, bias=False), Block(64), conv(64, 3))


def available() -> bool:
    return (ASSETS / "taef2_encoder.safetensors").is_file() and (ASSETS / "taef2_decoder.safetensors").is_file()


def load(dtype=torch.float32, device="cpu"):
    """(encoder, decoder) with the trained weights, in eval mode, without gradients."""
    from safetensors.torch import load_file

    enc, dec = encoder(), decoder()
    enc.load_state_dict(load_file(str(ASSETS / "taef2_encoder.safetensors")))
    dec.load_state_dict(load_file(str(ASSETS / "taef2_decoder.safetensors")))
    out = []
    for m in (enc, dec):
        m.eval().requires_grad_(False)
        out.append(m.to(device=device, dtype=dtype))
    return tuple(out)


def load_testbed(dtype=torch.float32, device="cpu"):
    """(encoder, decoder) of the trained testbed's TAESD-format VAE (tests/data/testbed_weights.safetensors),
    images in [0, 1], raw latents (before vae_scale/vae_shift), in eval mode, without gradients."""
    from safetensors.torch import load_file

    sd = load_file(str(ROOT / "tests" / "data" / "testbed_weights.safetensors"))
    out = []
    for m, prefix in ((encoder(4, False), "first_stage_model.taesd_encoder."),
                      (decoder(4, False), "first_stage_model.taesd_decoder.")):
        m.load_state_dict({k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)})
        m.eval().requires_grad_(False)
        out.append(m.to(device=device, dtype=dtype))
    return tuple(out)


def photo(name: str = "astronaut", size: int = 256) -> torch.Tensor:
    """A colour photo bundled with scikit-image, [1, 3, size, size] in [0, 1]."""
    import numpy as np
    from PIL import Image
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(arr).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255.0
