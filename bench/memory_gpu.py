"""One command for a GPU: seconds per model call and peak GPU memory, per model family, weight format and
ComfyUI VRAM mode (issue 22) -- what bench/memory.py projects from the CPU, measured.

For each of SD1.5 (512 px), SDXL (1024 px) and Flux dev's shape (1024 px, 19 + 38 blocks, 11.9B
parameters), random weights of the real shapes built by ComfyUI's own model classes:
  weights  bf16 (the model's dtype) or GGUF Q8_0 (every Linear weight as Q8_0 blocks, through
           ComfyUI-GGUF's GGMLOps and GGUFModelPatcher, as its UnetLoaderGGUF loads a file);
  vram     ComfyUI's normal mode on the whole GPU, or --lowvram on a 12 GB card (the process capped
           with torch.cuda.set_per_process_memory_fraction and ComfyUI told by --reserve-vram, so
           ComfyUI plans for 12 GB and streams the weights that do not fit);
and in each: a plain model call (a CFG batch of 2 for SD, one branch for Flux), and one gradient
through the model (what Restore, RNRI, gradient-descent and null-text inversion need per call):
seconds and peak allocated GiB, or "out of memory". Each configuration runs in its own process.

Usage (on the GPU machine; ComfyUI importable via COMFYUI_PATH; ComfyUI-GGUF unpacked, found as
tests/support/quantized.py finds it or given with --gguf-pack):
    python bench/memory_gpu.py                  # the whole matrix, JSON lines then a table
    python bench/memory_gpu.py --quick          # tiny shapes at 128 px: a smoke test, runs on a CPU too
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time

import torch

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)

FAMILIES = {"sd15": 512, "sdxl": 1024, "flux": 1024}
WEIGHTS = ("bf16", "gguf_q8_0")
VRAM = ("normal", "lowvram_12gb")


def model_config(family: str, quick: bool):
    import comfy.supported_models as sm
    from flow_gpu import flux_dev_config

    from support import comfy_host

    if family == "sd15":
        ch = 64 if quick else 320
        return sm.SD15, comfy_host.unet_layout(ch, 768, None, [1, 1, 1, 1, 1, 1, 0, 0], 1, [0, 0, 0] + [1] * 9,
                                               heads=8)
    if family == "sdxl":
        depth, mid, out = ([0, 0, 1, 1, 1, 1], 1, [0, 0, 0, 1, 1, 1, 1, 1, 1]) if quick else \
            ([0, 0, 2, 2, 10, 10], 10, [0, 0, 0, 2, 2, 2, 10, 10, 10])
        cfg = comfy_host.unet_layout(64 if quick else 320, 2048, 2816, depth, mid, out)
        cfg["num_head_channels"] = 64
        return sm.SDXL, cfg
    cfg = flux_dev_config(1, 1) if quick else flux_dev_config(19, 38)
    if quick:
        cfg.update(hidden_size=256, num_heads=2, axes_dim=[16, 56, 56])
    return sm.Flux, cfg


def _q8_0(shape, device) -> torch.Tensor:
    """Random Q8_0 blocks for a weight of ``shape`` (last dimension a multiple of 32): per block of 32,
    an fp16 scale and 32 int8 values, as GGUF stores them."""
    blocks = math.prod(shape) // 32
    scale = torch.full((blocks, 1), 1.0 / (127 * math.sqrt(shape[-1])), dtype=torch.float16, device=device)
    q = torch.randint(-127, 128, (blocks, 32), dtype=torch.int8, device=device)
    return torch.cat([scale.view(torch.uint8), q.view(torch.uint8)], dim=1).reshape(shape[0], -1)


def build(family: str, weights: str, quick: bool, gguf_pack):
    import comfy.model_management as mm
    import comfy.model_patcher
    from flow_gpu import init_random_

    config_cls, unet_config = model_config(family, quick)
    config = config_cls(unet_config)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    config.set_inference_dtype(dtype, None)
    device = mm.get_torch_device()
    if weights == "bf16":
        model = config.get_model({}, device=device)
        init_random_(model.diffusion_model, device)
        return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    import gguf

    ops_mod = importlib.import_module(gguf_pack.__name__ + ".ops")
    nodes_mod = importlib.import_module(gguf_pack.__name__ + ".nodes")
    meta = config.get_model({}, device=torch.device("meta"))
    Q = gguf.GGMLQuantizationType
    sd = {}
    for key, t in meta.diffusion_model.state_dict().items():
        if t.dim() == 2 and t.shape[-1] % 32 == 0:
            data, qtype = _q8_0(t.shape, "cpu"), Q.Q8_0
        else:
            data = torch.randn(t.shape) / math.sqrt(max(1, t[0].numel() if t.dim() > 1 else 1))
            data, qtype = (data.float(), Q.F32) if t.dim() <= 1 else (data.half(), Q.F16)
        sd[key] = ops_mod.GGMLTensor(data, tensor_type=qtype, tensor_shape=t.shape)
    # what comfy.sd.load_diffusion_model_state_dict does once it has detected the config (given here, so the
    # --quick shapes load too)
    config.custom_operations = ops_mod.GGMLOps()
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    return nodes_mod.GGUFModelPatcher.clone(patcher)


def real_conds(family: str, quick: bool):
    g = torch.Generator().manual_seed(1)
    if family == "sd15":
        c = [[torch.randn(1, 77, 768, generator=g), {}]]
        return {"c": c, "u": [[torch.randn(1, 77, 768, generator=g), {}]]}, ["c", "u"]
    if family == "sdxl":
        def one():
            return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
        return {"c": one(), "u": one()}, ["c", "u"]
    tokens = 16 if quick else 256
    return {"c": [[0.1 * torch.randn(1, tokens, 4096, generator=g),
                   {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]}, ["c"]


def emulate_card(card_gb: float) -> None:
    """ComfyUI's --lowvram on a smaller card: set before comfy.model_management is imported, with the
    process capped at ``card_gb`` and ComfyUI's --reserve-vram holding back the rest of the GPU."""
    from support import comfy_host

    sys.path.insert(0, str(comfy_host.COMFYUI_PATH))
    import comfy.cli_args

    assert "comfy.model_management" not in sys.modules
    comfy.cli_args.args.lowvram = True
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        comfy.cli_args.args.reserve_vram = max(0.0, total - card_gb)
        torch.cuda.set_per_process_memory_fraction(min(1.0, card_gb / total))


def worker(family: str, weights: str, vram: str, quick: bool, gguf_dir: str | None) -> dict:
    from flow_gpu import peak, sync

    from support import comfy_host

    if os.environ.get("COMFYUI_INVERSE_EMULATE_CARD_GB"):
        emulate_card(float(os.environ["COMFYUI_INVERSE_EMULATE_CARD_GB"]))
    pack = comfy_host.start_inprocess()
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    gguf_pack = None
    if weights.startswith("gguf"):
        from support import quantized

        if gguf_dir:
            quantized.gguf_pack_dir = lambda: __import__("pathlib").Path(gguf_dir)
        gguf_pack = quantized.load_gguf_pack()
    cuda = torch.cuda.is_available()
    size = 128 if quick else FAMILIES[family]
    out = {"family": family, "weights": weights, "vram": vram, "size": size,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    t0 = time.perf_counter()
    model = build(family, weights, quick, gguf_pack)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    conds, names = real_conds(family, quick)
    channels = 16 if family == "flux" else 4
    z0 = torch.randn(1, channels, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
    grid = glue.make_grid(model, 28)

    def run(pred):
        z = z0.to(getattr(pred, "device", z0.device))
        t = int(grid.timesteps[len(grid.timesteps) // 2])
        pred(z, t, names)  # warm-up
        sync()
        peak(reset=True)
        t1 = time.perf_counter()
        for _ in range(3):
            pred(z, t, names)
        sync()
        out["call_s"], out["call_peak_gib"] = round((time.perf_counter() - t1) / 3, 3), peak()
        peak(reset=True)
        t1 = time.perf_counter()
        try:
            with pred.autograd():
                zz = z.clone().requires_grad_(True)
                loss = pred(zz, t, names[:1]).float().pow(2).mean()
                (grad,) = torch.autograd.grad(loss, zz)
            sync()
            out["gradient_s"], out["gradient_peak_gib"] = round(time.perf_counter() - t1, 3), peak()
            out["gradient_finite"] = bool(torch.isfinite(grad).all())
        except torch.OutOfMemoryError:
            out["gradient_s"], out["gradient_peak_gib"] = None, "out of memory"

    with torch.inference_mode():
        glue.run_with_predictor(model, conds, z0.shape, run)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--gguf-pack", default=None, help="an unpacked ComfyUI-GGUF folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        family, weights, vram = args.worker.split(":")
        print(json.dumps(worker(family, weights, vram, args.quick, args.gguf_pack)), flush=True)
        return 0
    rows = []
    for family in args.families.split(","):
        for weights in WEIGHTS:
            for vram in VRAM:
                cmd = [sys.executable, __file__, "--worker", f"{family}:{weights}:{vram}"]
                cmd += ["--quick"] if args.quick else []
                cmd += ["--gguf-pack", args.gguf_pack] if args.gguf_pack else []
                env = dict(os.environ)
                if vram.startswith("lowvram"):
                    env["COMFYUI_INVERSE_EMULATE_CARD_GB"] = vram.split("_")[1][:-2]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    row = {"family": family, "weights": weights, "vram": vram, "error": proc.stderr[-1500:]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| family | weights | vram | model call (s) | peak (GiB) | gradient (s) | peak (GiB) |")
    for r in rows:
        print(f"| {r['family']} | {r['weights']} | {r['vram']} | {r.get('call_s')} | {r.get('call_peak_gib')} | "
              f"{r.get('gradient_s')} | {r.get('gradient_peak_gib', r.get('error', '')[:60])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
