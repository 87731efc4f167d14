"""The UI progress bar, which is also the cancel point after every step."""

from __future__ import annotations

from typing import Optional

import torch

import comfy.model_management
import comfy.utils

Tensor = torch.Tensor


class ProgressReporter:
    """ComfyUI progress bar for one or more core loops run one after the other (``total`` steps in
    all); also a cancel point after every step. ``stage(offset)`` reports a later loop's steps."""

    def __init__(self, total: int, node_id: Optional[str] = None, offset: int = 0, bar=None):
        self.bar = bar or comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.offset = offset

    def stage(self, offset: int) -> "ProgressReporter":
        return ProgressReporter(self.total, offset=offset, bar=self.bar)

    def __call__(self, step: int, total: int, z: Optional[Tensor] = None) -> None:
        self.bar.update_absolute(self.offset + step + 1, self.total)
        comfy.model_management.throw_exception_if_processing_interrupted()
