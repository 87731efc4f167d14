"""Memory-bounded differentiable decoding: gradients through a VAE decoder at 512x512 and beyond.

Posterior samplers (LDPS, PSLD, P2L, STSL) backpropagate through the decoder at every step. Autograd
keeps every activation of the decoder's forward pass until the backward pass: for an SD VAE at
512x512 that is several GiB. Two standard remedies, combinable:

- checkpointing (Chen et al. 2016): keep only the decoder's input and recompute its forward during
  the backward pass (``torch.utils.checkpoint``, non-reentrant): the peak is one decoder graph at a
  time instead of everything the objective holds;
- tiling: decode overlapping latent tiles separately and blend them with linear ramps over the
  overlap (as ComfyUI's tiled VAE decoding does); with checkpointing per tile the peak is one
  tile's graph. Tiling is exact for decoders with a receptive field inside the overlap and close
  otherwise (seams are feathered).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint

Tensor = torch.Tensor


def _maybe_checkpoint(fn: Callable[[Tensor], Tensor], z: Tensor, checkpoint: bool) -> Tensor:
    if checkpoint and torch.is_grad_enabled() and z.requires_grad:
        return torch.utils.checkpoint.checkpoint(fn, z, use_reentrant=False)
    return fn(z)


def tile_spans(n: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """Split a side of ``n`` latent pixels into the fewest equal tiles no longer than ``tile`` that
    overlap by about ``overlap``: k = ceil((n - o) / (tile - o)) tiles of length
    L = ceil((n + (k - 1) o) / k) <= tile, spread evenly from 0 to n - L. Returns (L, starts).
    Equal tiles keep the peak at one tile of at most ``tile`` whatever ``n`` is (a 64-latent
    side with tile 40 and overlap 5 becomes 2 tiles of 35, not 40 + a sliver)."""
    if n <= tile:
        return n, [0]
    overlap = max(0, min(overlap, tile - 1))
    k = -(-(n - overlap) // (tile - overlap))
    length = -(-(n + (k - 1) * overlap) // k)
    return length, [round(i * (n - length) / (k - 1)) for i in range(k)]


def _ramp(n: int, ov: int, lo_edge: bool, hi_edge: bool, like: Tensor) -> Tensor:
    w = torch.ones(n, dtype=like.dtype, device=like.device)
    if ov > 0:
        r = torch.arange(1, ov + 1, dtype=like.dtype, device=like.device) / (ov + 1)
        if not lo_edge:
            w[:ov] = torch.minimum(w[:ov], r)
        if not hi_edge:
            w[-ov:] = torch.minimum(w[-ov:], r.flip(0))
    return w


def decode_bounded(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int = 0, overlap: int = 8,
                   checkpoint: bool = True) -> Tensor:
    """decode(z) for [B, C, h, w] latents with bounded autograd memory: with ``tile`` > 0 (latent
    pixels) over the equal overlapping tiles of :func:`tile_spans` (each side at most ``tile``),
    blended linearly across ``overlap`` latent pixels, each tile checkpointed when ``checkpoint``
    (a latent that fits one tile is decoded plainly); with
    ``tile`` 0 the whole decode is checkpointed when ``checkpoint``. Outputs [B, C', s h, s w]."""
    B, _, h, w = z.shape
    if tile <= 0:
        return _maybe_checkpoint(decode, z, checkpoint)
    if h <= tile and w <= tile:
        # one tile: checkpointing it would only add the recomputation (its backward peaks like a full
        # decode), so decode plainly
        return decode(z)
    overlap = max(0, min(overlap, tile // 2))
    (len_y, ys), (len_x, xs) = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    out = weight = None
    s = None
    for y0 in ys:
        for x0 in xs:
            zt = z[..., y0:y0 + len_y, x0:x0 + len_x]
            xt = _maybe_checkpoint(decode, zt, checkpoint)
            if out is None:
                s = xt.shape[-1] // zt.shape[-1]
                out = xt.new_zeros(B, xt.shape[1], h * s, w * s)
                weight = xt.new_zeros(1, 1, h * s, w * s)
            th, tw = xt.shape[-2], xt.shape[-1]
            wy = _ramp(th, overlap * s, y0 == 0, y0 + len_y >= h, xt)
            wx = _ramp(tw, overlap * s, x0 == 0, x0 + len_x >= w, xt)
            wm = (wy[:, None] * wx[None, :])[None, None]
            region = (Ellipsis, slice(y0 * s, y0 * s + th), slice(x0 * s, x0 * s + tw))
            out[region] = out[region] + xt * wm
            weight[region] = weight[region] + wm
    return out / weight
