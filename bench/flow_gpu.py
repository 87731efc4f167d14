"""What the Flux workflows (22-25) cost at their default size, on a GPU.

A random-weight Flux dev -- ComfyUI's own Flux class at Flux dev's real shape: 19 double and 38
single blocks, hidden size 3072, 24 heads, guidance embedding; 11.9B parameters -- in bfloat16 on
the GPU, run through the glue as the nodes run it, at 1024 x 1024 px (4096 image tokens) with a
prompt of 256 T5 tokens (what ComfyUI's Flux text encoder gives a short prompt):

- Euler inversion (the DDIM Inversion node) and exact inversion (Anderson, the Exact Inversion
  node's default), 28 steps: seconds and model calls;
- one gradient through the model (what Restore computes per model call, LDPS/PSLD/STSL/P2L, and
  RNRI/gradient-descent inversion per update): seconds and peak GPU memory; the VAE decoder's share
  is bounded by Restore's tiling (bench/restoration.py --protocols r) and not included;
- the peak GPU memory of a plain model call, for comparison.

Random weights make no image; every cost (shapes, kernels, memory) is the real model's.

Usage (ComfyUI importable: COMFYUI_PATH=... ; a CUDA GPU: the bf16 weights alone are 24 GB):
    python bench/flow_gpu.py [--size 1024] [--steps 28]
    python bench/flow_gpu.py --quick   # 2 + 2 blocks at 256 px: a smoke test, runs on a CPU too
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import torch

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)


def flux_dev_config(double: int, single: int) -> dict:
    """Flux dev's diffusion-model config as ComfyUI detects it from the checkpoint."""
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": double,
            "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}


def sync() -> None:
    """Waits for the GPU's queued work (nothing on a CPU), so a timer sees the whole of it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak(reset: bool = False):
    """The peak allocated GPU memory in GiB since the last reset (None on a CPU)."""
    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)


def init_random_(net: torch.nn.Module, device) -> None:
    """Random weights of a real model's shapes, drawn on ``device``: every matrix N(0, 1 / fan-in),
    norm scales 1, biases 0."""
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() <= 1:
                p.fill_(1.0 if name.endswith(("scale", "weight")) else 0.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)


def build(double: int, single: int, dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    device = mm.get_torch_device()
    config = sm.Flux(flux_dev_config(double, single))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    init_random_(model.diffusion_model, device)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device()), params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import comfy_boot

    comfy_boot.ensure_torchvision_importable()
    sys.path.insert(0, os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI")))
    import utils.install_util  # noqa: F401  ComfyUI's own utils package, before any other "utils"
    import comfy.cli_args

    cuda = torch.cuda.is_available()
    if not cuda:
        comfy.cli_args.args.cpu = True

    glue = importlib.import_module("comfyui_inverse.nodes.comfy")
    ddim = importlib.import_module("comfyui_inverse.core.ddim")
    inv = importlib.import_module("comfyui_inverse.core.inversion")
    double, single, size, steps = (2, 2, 256, 4) if args.quick else (19, 38, args.size, args.steps)
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model, params = build(double, single, dtype)
    built = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    cond = [[0.1 * torch.randn(1, 256, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                           "guidance": 2.0}]]
    z0 = torch.randn(1, 16, size // 8, size // 8, generator=g)
    grid = glue.make_grid(model, steps)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "parameters": params,
           "double_blocks": double, "single_blocks": single, "size": size, "steps": steps, "build_s": round(built, 1)}

    def run(pred):
        dev = pred.device if hasattr(pred, "device") else z0.device
        z = z0.to(dev)
        t = int(grid.timesteps[len(grid.timesteps) // 2])
        pred(z, t, ["c"])  # warm-up
        sync()
        peak(reset=True)
        t1 = time.perf_counter()
        for _ in range(3):
            pred(z, t, ["c"])
        sync()
        out["call_s"] = round((time.perf_counter() - t1) / 3, 3)
        out["call_peak_gib"] = peak()

        peak(reset=True)
        t1 = time.perf_counter()
        with pred.autograd():
            zz = z.clone().requires_grad_(True)
            loss = pred(zz, t, ["c"]).float().pow(2).mean()
            (grad,) = torch.autograd.grad(loss, zz)
        sync()
        out["gradient_s"] = round(time.perf_counter() - t1, 3)
        out["gradient_peak_gib"] = peak()
        out["gradient_finite"] = bool(torch.isfinite(grad).all())

        calls = pred.calls
        t1 = time.perf_counter()
        traj = ddim.ddim_invert(pred, z, grid, "c").trajectory
        sync()
        out["euler_inversion_s"], out["euler_inversion_calls"] = round(time.perf_counter() - t1, 2), pred.calls - calls
        calls = pred.calls
        t1 = time.perf_counter()
        inv.iterative_invert(pred, z, grid, "c", None, 1.0, "anderson", inv.SolverConfig(iterations=2, tol=1e-4))
        sync()
        out["anderson_inversion_s"], out["anderson_inversion_calls"] = (round(time.perf_counter() - t1, 2),
                                                                        pred.calls - calls)
        out["noise_finite"] = bool(torch.isfinite(traj[-1]).all())

    with torch.inference_mode():
        glue.run_with_predictor(model, {"c": cond}, z0.shape, run)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
