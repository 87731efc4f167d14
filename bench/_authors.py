"""What the benches that run the authors' code share (bench/flow_edit_authors.py,
rf_inversion_authors.py, flow_solvers_authors.py): diffusers' and BFL Flux's packing of 2 x 2
latent patches into tokens, and loading an authors' file with some of its imports stubbed."""
from __future__ import annotations

import importlib.util
import sys


def pack(x):
    """[B, C, H, W] -> [B, H/2 W/2, 4C] (diffusers' FluxPipeline._pack_latents; BFL's prepare)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x, H, W):
    """The inverse of :func:`pack` for a latent of H x W."""
    B, N, C4 = x.shape
    return x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, H, W)


def load(path: str, name: str, stubs: dict):
    """The module at ``path`` as ``name``, with ``stubs`` (module name -> module) in sys.modules
    while it loads; whatever those names held before is put back."""
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod
