"""Schema helpers of the pack's nodes."""
from __future__ import annotations

from typing import TypeVar

from comfy_api.latest import io

InputT = TypeVar("InputT", bound=io.Input)


def advanced(inp: InputT) -> InputT:
    """``inp`` marked as an advanced input: method-specific or expert, folded away by ComfyUI's
    frontend until the user asks for it; its default stays the paper's. Where the installed ComfyUI
    has V3's ``advanced`` inputs (the attribute its ``io.Input`` sets from ``advanced=True``) that is
    set; older ones, as 0.3.64, get the same ``"advanced": true`` entry in the input's options
    through its ``extra_dict``. Neither changes the order of the node's widgets, so saved workflows
    keep every widget value in place."""
    if hasattr(inp, "advanced"):
        inp.advanced = True
    else:
        inp.extra_dict = {**(inp.extra_dict or {}), "advanced": True}
    return inp


def decoder_memory_inputs(options: list[str], tile_default: int, memory_tip: str, tile_tip: str) -> list[io.Input]:
    """The advanced ``decoder_memory`` (``options``: tiled first, the default) and ``tile_size``
    inputs of the nodes that back-propagate through a VAE decoder (Restore, Decoder Inversion)."""
    return [advanced(io.Combo.Input("decoder_memory", options=list(options), default="tiled", tooltip=memory_tip)),
            advanced(io.Int.Input("tile_size", default=tile_default, min=16, max=256, step=8, tooltip=tile_tip))]
