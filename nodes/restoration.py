"""Restoration nodes: degradation operators and degrading an image (the solvers come next)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core import operators as ops
from . import comfy_glue as glue
from .types import CATEGORY, Operator

KINDS = ["sr_avgpool", "sr_bicubic", "gaussian_blur", "motion_blur", "inpaint_random", "inpaint_box",
         "inpaint_freeform", "inpaint_mask", "salt_pepper", "gaussian_noise"]


def to_signed(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in [0, 1] -> [B, C, H, W] in [-1, 1]."""
    return image[..., :3].movedim(-1, 1).float() * 2.0 - 1.0


def to_image(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1.0) / 2.0).movedim(1, -1)


class DegradationOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDegradationOperator",
            display_name="Degradation Operator",
            category=f"{CATEGORY}/restoration",
            description=("Describes how an image was degraded, y = A(x) + noise, for the restoration solvers and "
                         "for Degrade Image: super-resolution (average pooling or bicubic), Gaussian or motion blur "
                         "(61x61 kernels as in the papers), inpainting (random, box, free-form or your MASK), "
                         "salt-and-pepper or Gaussian noise."),
            inputs=[
                io.Combo.Input("kind", options=KINDS, default="sr_avgpool", tooltip="The degradation."),
                io.Int.Input("scale_factor", default=4, min=2, max=16, tooltip="Super-resolution factor (4 or 8)."),
                io.Int.Input("kernel_size", default=61, min=3, max=255, step=2, tooltip="Blur kernel size (odd; papers: 61)."),
                io.Float.Input("blur_sigma", default=3.0, min=0.1, max=50.0, step=0.1, tooltip="Gaussian blur sigma (3)."),
                io.Float.Input("motion_intensity", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Motion blur: 0 = straight streak, 1 = tangled shake (papers: 0.5)."),
                io.Float.Input("mask_amount", default=0.4, min=0.0, max=0.95, step=0.01,
                               tooltip="Random inpainting: share of pixels dropped (0.4-0.7); box: side as a "
                                       "share of the image (0.5); salt-and-pepper: share of pixels (0.02)."),
                io.Float.Input("sigma_y", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Measurement noise std in [-1, 1] units (0.01 or 0.05)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the motion kernel and generated masks."),
                io.Mask.Input("mask", optional=True, tooltip="inpaint_mask: the known pixels are where the mask is 0 "
                                                             "(white = missing, as ComfyUI's inpainting masks)."),
            ],
            outputs=[Operator.Output(display_name="operator", tooltip="Connect to Degrade Image or a restoration node.")],
        )

    @classmethod
    def execute(cls, kind, scale_factor, kernel_size, blur_sigma, motion_intensity, mask_amount, sigma_y, seed,
                mask=None) -> io.NodeOutput:
        try:
            if kind == "sr_avgpool":
                op = ops.AvgPoolSR(scale_factor, sigma_y)
            elif kind == "sr_bicubic":
                op = ops.BicubicSR(scale_factor, sigma_y)
            elif kind == "gaussian_blur":
                op = ops.Blur(ops.gaussian_kernel(kernel_size, blur_sigma), "gaussian_blur", sigma_y)
            elif kind == "motion_blur":
                op = ops.Blur(ops.motion_kernel(kernel_size, motion_intensity, seed), "motion_blur", sigma_y)
            elif kind in ("inpaint_random", "inpaint_box", "inpaint_freeform"):
                op = ops.LazyMaskInpaint(kind.split("_")[1], seed, drop=mask_amount, box=mask_amount, sigma_y=sigma_y)
            elif kind == "inpaint_mask":
                if mask is None:
                    raise glue.InverseInputError("mask: kind inpaint_mask needs a MASK (white = missing pixels).")
                op = ops.Inpaint(1.0 - mask.float(), "inpaint_mask", sigma_y)
            elif kind == "salt_pepper":
                op = ops.SaltPepper(mask_amount if mask_amount > 0 else 0.02)
            elif kind == "gaussian_noise":
                op = ops.GaussianNoise(sigma_y)
            else:
                raise glue.InverseInputError(f"kind: choose one of {', '.join(KINDS)}.")
        except ops.OperatorError as exc:
            raise glue.InverseInputError(str(exc)) from None
        return io.NodeOutput(op)


class DegradeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InverseDegradeImage",
            display_name="Degrade Image",
            category=f"{CATEGORY}/restoration",
            description=("Applies a degradation operator and its measurement noise to a clean image, to make test "
                         "inputs and benchmarks: y = A(x) + noise. Super-resolution returns the small image. Also "
                         "shows the operator (its blur kernel or inpainting mask) as an image."),
            inputs=[
                io.Image.Input("image", tooltip="The clean image."),
                Operator.Input("operator", tooltip="Output of Degradation Operator."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the measurement noise."),
            ],
            outputs=[
                io.Image.Output(display_name="degraded", tooltip="The measurement y (small for super-resolution)."),
                io.Image.Output(display_name="operator_view", tooltip="The blur kernel or inpainting mask, "
                                                                      "or A^T y for other operators."),
            ],
        )

    @classmethod
    def execute(cls, image, operator, seed) -> io.NodeOutput:
        if not isinstance(operator, ops.Operator):
            raise glue.InverseInputError("operator: connect a Degradation Operator node.")
        x = to_signed(image)
        try:
            y = operator.measure(x, torch.Generator().manual_seed(int(seed)))
        except ops.OperatorError as exc:
            raise glue.InverseInputError(str(exc)) from None
        if isinstance(operator, ops.Blur):
            k = operator.kernel
            view = (k / k.max())[None, :, :, None].expand(1, *k.shape, 3)
        elif isinstance(operator, ops.Inpaint):
            view = operator._m(x)[:, :1].movedim(1, -1).expand(-1, -1, -1, 3)
        else:
            view = to_image(operator.At(operator.A(x), x))
        return io.NodeOutput(to_image(y), view.float().contiguous())


NODES = [DegradationOperator, DegradeImage]
