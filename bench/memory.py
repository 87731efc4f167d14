"""Peak memory of each node at real sizes (issue 22): what a user can plan a GPU with.

Each node runs in a fresh process (support/peak_memory.py's FRESH_ENV, so freed memory goes back to
the system and the resident size follows what is alive) on SD1.5's real UNet (ComfyUI's SD15 class,
860M random float32 weights) with the SD VAE's and CLIP-L's real architectures (the tiny checkpoint's,
random weights), at 512 x 512 px, guidance 7.5, for 2 steps (a node's peak is one step's: the
trajectory it keeps is a few latents). Measured: the peak resident-memory growth over the loaded
models (the node's working memory, float32, CPU), the seconds, the model calls.

The 16-bit projection: a GPU user runs the weights and activations in fp16/bf16, so the working
memory halves (every large buffer is an activation or a saved tensor of the model's compute dtype;
the pack's float32 latents and iterates are under 1 MB at 512 px), and the weights are SD1.5's in
fp16 (UNet 1.72 GB, CLIP-L 0.25 GB, VAE 0.17 GB). needed = weights + working / 2, against 8, 12, 16 and
24 GB cards less 1 GB for the CUDA context and ComfyUI. ComfyUI's low-VRAM mode can stream the
weights instead (bench/memory_gpu.py measures both on a GPU).

SDXL (``--family sdxl``): SDXL's real UNet (2.6B random float32 weights, 10.3 GB) with conditionings of
its shapes; at 512 px it fits a 24 GB machine. At 1024 px a GPU's working memory is at most 4x the
512 px CPU measurement: activations grow with the pixel count, and the CPU's materialised attention
matrices, which grow with its square, are what a GPU's fused attention does not keep (an upper
bound, until bench/memory_gpu.py measures it on a GPU). The decoder inversions need only the VAE,
so they are measured at 1024 px directly (``--size 1024``).

Usage (ComfyUI importable: COMFYUI_PATH=...):
    python bench/memory.py                 # every node, SD1.5 at 512 px (about 25 minutes on 2 cores)
    python bench/memory.py --nodes ddim_inversion,restore_ldps --size 256
    python bench/memory.py --family sdxl --nodes ddim_inversion,exact_rnri,null_text,restore_ldps
    python bench/memory.py --nodes decoder_inversion_gradient_free,decoder_inversion_gradient_based --size 1024
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time

import torch

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)

WEIGHTS_FP16_GB = {"sd15": 1.72 + 0.25 + 0.17, "sdxl": 5.14 + 1.64 + 0.17}  # UNet + text encoders + VAE
CARDS_GB = (8, 12, 16, 24)
OVERHEAD_GB = 1.0
STEPS = 2
G = 7.5

# node -> (module, class, arguments after (model, positive) as the node's execute takes them)
INVERSIONS = {
    "ddim_inversion": ("DDIMInversion", dict(steps=STEPS, guidance=G, spacing="auto")),
    "exact_anderson": ("ExactInversion", dict(steps=STEPS, guidance=G, spacing="auto", method="anderson", iterations=2,
                                              tolerance=0.0, lambda_prior=0.1, adjust_rounds=0)),
    "exact_newton_krylov": ("ExactInversion", dict(steps=STEPS, guidance=G, spacing="auto", method="newton_krylov",
                                                   iterations=1, tolerance=0.0, lambda_prior=0.1, adjust_rounds=0)),
    "exact_rnri": ("ExactInversion", dict(steps=STEPS, guidance=G, spacing="auto", method="rnri", iterations=1,
                                          tolerance=0.0, lambda_prior=0.1, adjust_rounds=0)),
    "null_text": ("NullTextInversion", dict(steps=STEPS, guidance=G, spacing="auto", inner_steps=2, learning_rate=0.01,
                                            tolerance=0.0)),
    "negative_prompt_inversion": ("NegativePromptInversion", dict(steps=STEPS, spacing="auto")),
    "ddpm_inversion": ("DDPMInversion", dict(steps=STEPS, guidance=G, spacing="auto", seed=0)),
    "exact_fireflow": ("ExactInversion", dict(steps=STEPS, guidance=G, spacing="auto", method="fireflow", iterations=2,
                                              tolerance=0.0, lambda_prior=0.1, adjust_rounds=0)),
}
EDITS = ("proxedit", "proxedit_p2p_masactrl")
FLOW_EDITS = ("flowedit", "rf_inversion")
RESTORES = ("restore_ldps", "restore_psld", "restore_stsl", "restore_p2l")
DECODER = ("decoder_inversion_gradient_free", "decoder_inversion_gradient_based")
NODES = tuple(INVERSIONS) + EDITS + FLOW_EDITS + RESTORES + DECODER


def _setup(size: int, family: str = "sd15"):
    from support import comfy_host

    pack = comfy_host.start_inprocess()
    import comfy.sd

    with torch.inference_mode():
        _, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        tar = clip.encode_from_tokens_scheduled(clip.tokenize("a painting of an astronaut"))
    if family == "sd15":
        model = comfy_host.sd15_sized_model()
    else:  # SDXL's real UNet (2.6B parameters, random float32 weights) and its conditioning's shapes
        import comfy.supported_models as sm
        from memory_gpu import model_config

        with torch.inference_mode(False):
            model = comfy_host.random_model(sm.SDXL, model_config("sdxl", False)[1], 0)[0]
        g = torch.Generator().manual_seed(1)
        pos, neg, tar = ([[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
                         for _ in range(3))
    img = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    return pack, model, clip, vae, pos, neg, tar, img


def _node(pack, module: str):
    return importlib.import_module(f"{pack.__name__}.nodes.{module}")


def _run(name: str, size: int, family: str = "sd15"):
    """A closure running the node ``name`` once, and the UNet/decoder call counts it reports."""
    pack, model, clip, vae, pos, neg, tar, img = _setup(size, family)
    inv, ed, rs = _node(pack, "inversion"), _node(pack, "editing"), _node(pack, "restoration")
    with torch.inference_mode():
        lat = {"samples": vae.encode(img)}
    if name in INVERSIONS:
        cls, kw = INVERSIONS[name]
        if cls != "NegativePromptInversion":
            kw = dict(kw, negative=neg)
        return lambda: getattr(inv, cls).execute(model, pos, latent=lat, **kw).args
    if name in EDITS:
        with torch.inference_mode():
            res = inv.NegativePromptInversion.execute(model, pos, STEPS, "auto", latent=lat).args[0]
            control = None
            if name == "proxedit_p2p_masactrl":
                control, _, tar = ed.PromptToPrompt.execute(clip, "a photograph of an astronaut",
                                                            "a painting of an astronaut", "replace", 0.8, 0.5, "",
                                                            False, "", 0.3, 0.2).args
                control = ed.MasaCtrl.execute(0, 10, "source", "source", attention_control=control).args[0]
        return lambda: ed.ProxEdit.execute(model, res, tar, "source", G, "hard", 0.7, 0.0, 1, 0.0, 0.0, 400, 0.0, 0,
                                           negative=neg, attention_control=control).args
    if name in FLOW_EDITS:
        fe = _node(pack, "flow_edit")
        if name == "flowedit":
            return lambda: fe.FlowEdit.execute(model, pos, tar, STEPS, 3.5, 13.5, STEPS, 0, negative=neg, latent=lat).args
        return lambda: fe.RFInversion.execute(model, pos, tar, STEPS, G, 0.5, 0.9, 0, start=0, stop=1, negative=neg,
                                              latent=lat).args
    if name in RESTORES:
        with torch.inference_mode():
            op = rs.DegradationOperator.execute("sr_avgpool", 4, 61, 3.0, 0.5, 0.4, 0.05, 0).args[0]
            y = rs.DegradeImage.execute(img, op, 0).args[0]
        args = dict(method=name.split("_", 1)[1], steps=STEPS, seed=0, step_size=1.0, gluing=0.1, stochasticity=0.0,
                    stsl_inner_steps=5, stsl_lambda=1.0, stsl_trace_weight=0.02, stsl_lr=0.01,
                    stsl_start="measurement", p2l_prompt_steps=1, p2l_prompt_lr=1e-3, p2l_project_every=4,
                    p2l_cg_iters=10, p2l_cg_lambda=0.01, decoder_memory="tiled", tile_size=40)
        return lambda: rs.Restore.execute(model, vae, pos, y, op, **args).args
    di = _node(pack, "decoder_inversion")
    method = "gradient_free_adam" if name.endswith("gradient_free") else "gradient_based"
    return lambda: di.DecoderInversion.execute(img, vae, method, STEPS, 0.05 if "free" in method else 0.01, 0.3,
                                               "auto").args


def worker(name: str, size: int, family: str = "sd15") -> dict:
    from support.peak_memory import Peak

    run = _run(name, size, family)
    t0 = time.perf_counter()
    with Peak() as peak, torch.inference_mode():
        out = run()
    finite = all(bool(torch.isfinite(o["samples"] if isinstance(o, dict) else o).all())
                 for o in out if isinstance(o, (dict, torch.Tensor)) and (not isinstance(o, dict) or "samples" in o))
    return {"node": name, "family": family, "size": size, "working_mb_fp32": peak.mb, "seconds": round(time.perf_counter() - t0, 1),
            "finite": finite}


def project(row: dict) -> dict:
    need = WEIGHTS_FP16_GB[row["family"]] + row["working_mb_fp32"] / 2 / 1024
    return dict(row, needed_gb_16bit=round(need, 2),
                fits={f"{c} GB": need + OVERHEAD_GB <= c for c in CARDS_GB})


def main(argv=None) -> int:
    from support.peak_memory import FRESH_ENV

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default=",".join(NODES))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--family", choices=sorted(WEIGHTS_FP16_GB), default="sd15",
                    help="sdxl: SDXL's real UNet with random weights (10.3 GB in float32; 512 px fits 24 GB)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.family)), flush=True)
        return 0
    rows = []
    for name in args.nodes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--size", str(args.size),
                               "--family", args.family],
                              capture_output=True, text=True, env=FRESH_ENV)
        if proc.returncode:
            print(f"[memory] {name} failed:\n{proc.stderr[-3000:]}", flush=True)
            return 1
        row = project(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| node | working memory, fp32 (MB) | seconds (CPU) | needed in 16 bit (GB) | "
          + " | ".join(f"{c} GB" for c in CARDS_GB) + " |")
    for r in rows:
        print(f"| {r['node']} | {r['working_mb_fp32']:.0f} | {r['seconds']} | {r['needed_gb_16bit']} | "
              + " | ".join("yes" if v else "no" for v in r["fits"].values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
