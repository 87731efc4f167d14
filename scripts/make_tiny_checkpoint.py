"""Write a tiny random-weight checkpoint that ComfyUI detects as Stable Diffusion 1.5.

For tests and demos on machines without model downloads: a one-level UNet (model_channels 320,
context_dim 768, one res block, one transformer; ~19M parameters), a full-size CLIP-L text
encoder and a full-size SD VAE, all with seeded random weights, saved as fp16 safetensors in
the original LDM key layout. The images it makes are noise; what it exercises is every code
path a real SD1.5 checkpoint takes through ComfyUI.

Usage: python make_tiny_checkpoint.py OUT.safetensors [--comfyui PATH] [--seed N]
Needs ComfyUI importable (pass --comfyui or set COMFYUI_PATH; default ~/ComfyUI).
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def _import_comfy(comfy_path: str):
    comfy_path = os.path.abspath(os.path.expanduser(comfy_path))
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "sd.py")):
        sys.exit(f"make_tiny_checkpoint: no ComfyUI at {comfy_path}; pass --comfyui or set COMFYUI_PATH")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy_boot
    import torch
    import comfy.cli_args

    comfy_boot.ensure_torchvision_importable()  # comfy.sd imports torchvision

    if not torch.cuda.is_available():  # ComfyUI's default device probe assumes CUDA
        comfy.cli_args.args.cpu = True


def _init_(module, generator) -> None:
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def build_state_dict(seed: int = 0):
    import torch
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    g = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                     use_linear_in_transformer=False, operations=ops, dtype=torch.float32, device="cpu")
    _init_(unet, g)
    with torch.no_grad():  # a small output layer keeps eps O(1) like a trained model's
        unet.out[-1].weight.mul_(0.1)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _init_(clip, g)
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _init_(vae, g)

    sd = {}
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = v
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            sd["cond_stage_model." + k] = v
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "~/ComfyUI"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    _import_comfy(args.comfyui)
    from safetensors.torch import save_file

    sd = build_state_dict(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file(sd, tmp, metadata={"comfyui_inverse": "tiny random-weight SD1.5 test checkpoint"})
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
