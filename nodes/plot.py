"""Plots for the nodes' IMAGE outputs (no ComfyUI import)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

Tensor = torch.Tensor


def plot_curves(curves: Mapping[str, Sequence[float]], title: str, width: int = 640, height: int = 360,
                log_y: bool = True) -> Tensor:
    """A line chart of ``curves`` against iteration as a ComfyUI IMAGE [1, H, W, 3] (drawn with PIL)."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    vals = [v for c in curves.values() for v in c if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    draw.text((left, 8), title, fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if vals:
        f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
        lo, hi = f(min(vals)), f(max(vals))
        if hi - lo < 1e-12:
            lo, hi = lo - 1, hi + 1
        n = max(len(c) for c in curves.values())
        for j, (name, c) in enumerate(curves.items()):
            pts = [(left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (f(v) - lo) / (hi - lo))
                   for i, v in enumerate(c) if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
            col = colours[j % len(colours)]
            if len(pts) > 1:
                draw.line(pts, fill=col, width=2)
            draw.text((right - 220, top + 6 + 14 * j), f"{name}: {c[0]:.3g} -> {c[-1]:.3g}", fill=col)
        draw.text((4, top), f"{(10 ** hi if log_y else hi):.3g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{(10 ** lo if log_y else lo):.3g}", fill=(0, 0, 0))
        draw.text((left, bottom + 8), "0", fill=(0, 0, 0))
        draw.text((right - 30, bottom + 8), str(n - 1), fill=(0, 0, 0))
        draw.text(((left + right) // 2 - 20, bottom + 20), "iteration", fill=(0, 0, 0))

    return torch.from_numpy(np.asarray(img).astype("float32") / 255.0)[None]
