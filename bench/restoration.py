"""Restoration benchmark: LDPS, PSLD, P2L and STSL on three protocols.

    python bench/restoration.py            # full (about 15 minutes on 2 CPU cores)
    python bench/restoration.py --quick    # under a minute (43 s on 2 CPU cores)

(c) closed form: a Gaussian latent prior N(m, s^2 I) with an identity decoder and a linear operator
    (random inpainting, x4 average-pool SR, Gaussian blur): the exact posterior mean is known (a
    conjugate-gradient solve of (A^T A / sy^2 + I / s^2) x = A^T y / sy^2 + m / s^2). Reports each
    method's distance to it (single samples and the average over seeds), LDPS at the same number
    of model calls as STSL, and how many calls PSLD and P2L need to reach STSL's consistency.
(b) real photos: scikit-image photos through the trained TAEF2 autoencoder (32-channel latents),
    with an analytic Gaussian latent prior fitted to the TAEF2 latents of *other* photos (whose exact
    denoiser is known): PSNR against the clean photo for x4 SR, Gaussian and motion deblurring
    (61x61) and box inpainting.
(m) decoder memory: one gradient through the TAEF2 decoder at 512 and 1024 px, full / checkpointed /
    tiled (core/tiling.py): bytes autograd keeps and peak RSS growth.
(a) plumbing: the Restore node through the real ComfyUI glue with the tiny random-weight SD1.5
    checkpoint: cost and consistency (its images mean nothing).
(f) fidelity fixes: PSLD on protocol (c)'s x4 SR with the pseudo-inverse gluing against the old
    A^T y + (I - A^T A) x (reproduced here only), the gluing step's own ||A(glued) - y|| / ||y||,
    STSL's model evaluations per step against the paper's count (K), and the noise each STSL
    start carries for a 61-px motion blur.

For every run: measurement consistency ||y - A(x_hat)|| / (sigma_y sqrt(m)) (1 = the noise level),
PSNR, model calls, seconds and peak memory (RSS growth sampled every 5 ms; CUDA peak when on a
GPU). Last line: one JSON object with every number.
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
from support.core_oracles import gaussian_posterior_mean_inpaint
from support.peak_memory import FRESH_ENV, Peak


def _pack():
    from comfyui_inverse.core import operators as ops, restoration as rs, schedule
    from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior
    return ops, rs, schedule, GaussianMixtureDenoiser, MixturePrior


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, z, t, conds):
        self.calls += 1
        return self.inner(z, t, conds)


def consistency(op, y, x) -> float:
    return op.consistency(y, x)["consistency"]


def psnr(x, clean) -> float:  # images in [-1, 1]
    mse = float(((x.clamp(-1, 1) - clean) / 2).pow(2).mean())
    return round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)


def run(method, model, decode, encode, op, y, grid, like, seed, mean=None, std=None, **kw):
    """One posterior sample; returns (latent, stats)."""
    ops, rs, schedule, GMD, MP = _pack()
    g = torch.Generator().manual_seed(seed)
    zT = torch.randn(like_latent_shape(like, encode), generator=g)
    pred = Counting(model)
    t0 = time.perf_counter()
    with Peak() as peak:
        if method not in rs.METHODS:
            raise ValueError(method)
        problem = rs.Problem(pred, decode, op, y, grid, "c", zT, encode=encode, generator=g)
        cfg = rs.RestorationConfig(zeta=kw.get("zeta", 1.0), gamma=0.1, lr=kw.get("lr", 0.01),
                                   start=kw.get("start", "adjoint"), prompt_steps=1, prompt_lr=1e-2,
                                   project_every=4, cg_lambda=0.01)
        if method == "p2l":
            problem.make_cond = kw.get("make_cond") or (lambda C: MP.gaussian(C, std))
            problem.embedding = mean.float()
        z = rs.METHODS[method](problem, cfg).latent
    return z, {"model_calls": pred.calls, "seconds": round(time.perf_counter() - t0, 2), "peak_mb": peak.mb}


_SHAPES = {}


def like_latent_shape(like, encode):
    key = (tuple(like.shape), id(encode))
    if key not in _SHAPES:
        with torch.no_grad():
            _SHAPES[key] = tuple(encode(like).shape)
    return _SHAPES[key]


def grid_for(steps):
    ops, rs, schedule, GMD, MP = _pack()
    ac = schedule.scaled_linear_alphas_cumprod()
    return ac, schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, steps_offset=1))


def calls_to_reach(target, curve):
    """Fewest calls in ``curve`` [(calls, consistency)] whose consistency is at most ``target``."""
    ok = [c for c, v in curve if v <= target]
    return min(ok) if ok else None


# ------------------------------------------------------------------------------------------------
def gaussian_problem(quick: bool):
    """Protocol (c)'s setting: a Gaussian latent prior N(mean, 0.7^2 I) on 4x16x16 latents, its exact
    denoiser, a true latent drawn from it, sigma_y 0.05, and the grid and seeds of the mode.
    Returns (steps, seeds, generator, shape, mean, s, sy, x_true, grid, model)."""
    ops, rs, schedule, GMD, MP = _pack()
    steps, seeds = (20, [0]) if quick else (50, [0, 1, 2])
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 16, 16)
    mean = torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.5
    s, sy = 0.7, 0.05
    x_true = (mean[None] + s * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    ac, grid = grid_for(steps)
    return steps, seeds, g, shape, mean, s, sy, x_true, grid, GMD({"c": MP.gaussian(mean, s)}, ac)


def protocol_f(quick: bool) -> dict:
    ops, rs, schedule, GMD, MP = _pack()
    steps, seeds, g, shape, mean, s, sy, x_true, grid, model = gaussian_problem(quick)
    ident = lambda v: v  # noqa: E731
    op = ops.AvgPoolSR(4, sy)
    y = op.measure(x_true, torch.Generator().manual_seed(7))
    x = (mean[None] + s * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    rel = lambda v: float((op.A(v) - y).norm() / y.norm())  # noqa: E731
    out = {"glue_step_residual": {"no_gluing": round(rel(x), 4),
                                  "old_AT_formula": round(rel(op.At(y, x) + x - op.At(op.A(x), x)), 4),
                                  "pseudo_inverse": round(rel(rs.glue(op, y, x)), 6)}}
    new_glue = rs.glue
    psld = {}
    for label, fn in (("pseudo_inverse", new_glue),
                      ("old_AT_formula", lambda op_, y_, x_, iters=10: op_.At(y_, x_) + x_ - op_.At(op_.A(x_), x_))):
        rs.glue = fn
        try:
            zs = [run("psld", model, ident, ident, op, y, grid, x_true, 100 + sd)[0] for sd in seeds]
        finally:
            rs.glue = new_glue
        psld[label] = round(sum(consistency(op, y, z) for z in zs) / len(zs), 3)
    out["psld_sr_x4_consistency"] = psld
    z, st = run("stsl", model, ident, ident, op, y, grid, x_true, 100)
    out["stsl_evaluations_per_step"] = {"measured": st["model_calls"] / steps, "paper_K": 5,
                                        "total": st["model_calls"], "paper_total_at_50_steps": 250}
    blur = ops.Blur(ops.motion_kernel(61, 0.5, seed=3))
    like = torch.zeros(1, 3, 128, 128)
    n = 0.05 * torch.randn(blur.A(like).shape, generator=g)
    rms = lambda t: round(float(t.pow(2).mean().sqrt()), 4)  # noqa: E731
    out["stsl_start_noise_motion_blur_61"] = {"sigma_y": 0.05, "adjoint_scaled": rms(rs.scaled_adjoint(blur, n, like)),
                                             "back_projection": rms(rs.back_project(blur, n, like))}
    print("(f) " + json.dumps(out), flush=True)
    return out


def protocol_c(quick: bool) -> dict:
    ops, rs, schedule, GMD, MP = _pack()
    steps, seeds, g, shape, mean, s, sy, x_true, grid, model = gaussian_problem(quick)
    ident = lambda v: v  # noqa: E731
    operators = {"inpaint_random_50": ops.Inpaint(ops.random_mask(16, 16, 0.5, seed=1), sigma_y=sy),
                 "sr_avgpool_x4": ops.AvgPoolSR(4, sy),
                 "gaussian_blur_9": ops.Blur(ops.gaussian_kernel(9, 2.0), "gaussian_blur", sy)}
    out = {}
    for name, op in operators.items():
        y = op.measure(x_true, torch.Generator().manual_seed(7))
        m = mean[None].float()
        post = rs.conjugate_gradient(lambda v: op.At(op.A(v), m) / sy ** 2 + v / s ** 2,
                                     op.At(y, m) / sy ** 2 + m / s ** 2, m, iters=500, tol=1e-14)
        res = {}
        for method in ("ldps", "psld", "p2l", "stsl"):
            zs, stats = [], None
            for sd in seeds:
                z, st = run(method, model, ident, ident, op, y, grid, x_true, 100 + sd, mean=mean, std=s)
                zs.append(z)
                stats = st
            avg = torch.stack(zs).mean(0)
            res[method] = {"rmse_to_posterior_mean": round(sum(float((z - post).pow(2).mean().sqrt()) for z in zs) / len(zs), 4),
                           "rmse_of_seed_average": round(float((avg - post).pow(2).mean().sqrt()), 4),
                           "consistency": round(sum(consistency(op, y, z) for z in zs) / len(zs), 3), **stats}
        # LDPS with as many model calls as STSL
        eq_steps = res["stsl"]["model_calls"]
        _, grid_eq = grid_for(eq_steps)
        zs = [run("ldps", model, ident, ident, op, y, grid_eq, x_true, 100 + sd)[0] for sd in seeds]
        res["ldps_equal_calls"] = {"steps": eq_steps, "model_calls": eq_steps,
                                   "rmse_to_posterior_mean": round(sum(float((z - post).pow(2).mean().sqrt()) for z in zs) / len(zs), 4),
                                   "consistency": round(sum(consistency(op, y, z) for z in zs) / len(zs), 3)}
        # calls PSLD and P2L need to reach STSL's consistency
        for method in ("psld", "p2l"):
            curve = []
            for st in ((25, 50, 100) if quick else (25, 50, 100, 200, 400)):
                _, gr = grid_for(st)
                z, stt = run(method, model, ident, ident, op, y, gr, x_true, 100, mean=mean, std=s)
                curve.append((stt["model_calls"], round(consistency(op, y, z), 3)))
            need = calls_to_reach(res["stsl"]["consistency"], curve)
            res[f"{method}_calls_vs_consistency"] = curve
            res[f"{method}_calls_to_reach_stsl_over_stsl_calls"] = (round(need / res["stsl"]["model_calls"], 2)
                                                                    if need else f"> {curve[-1][0] / res['stsl']['model_calls']:.2f}")
        res["posterior_mean_consistency"] = round(consistency(op, y, post), 3)
        out[name] = res
        print(f"(c) {name}: " + json.dumps(res), flush=True)
    return out


def protocol_b(quick: bool) -> dict:
    from support import taef2

    ops, rs, schedule, GMD, MP = _pack()
    if not taef2.available():
        return {"skipped": "TAEF2 weights not found (../shared/assets/taef2)"}
    size = 64 if quick else 128
    steps = 10 if quick else 50
    enc, dec = taef2.load()
    decode = lambda z: dec(z) * 2.0 - 1.0  # noqa: E731   (TAEF2 works on [0, 1] images)
    encode = lambda x: enc((x + 1.0) / 2.0)  # noqa: E731
    train = ["coffee", "chelsea", "rocket", "immunohistochemistry", "retina"]
    with torch.no_grad():
        lat = [encode(taef2.photo(n, size) * 2 - 1) for n in train]
        lat = torch.cat(lat + [z.flip(-1) for z in lat])
    mean = lat.mean(0).double()
    std = float((lat.double() - mean).pow(2).mean().sqrt())
    ac, grid = grid_for(steps)
    model = GMD({"c": MP.gaussian(mean, std)}, ac)
    clean = taef2.photo("astronaut", size) * 2 - 1
    operators = {"sr_avgpool_x4": ops.AvgPoolSR(4, 0.05),
                 "gaussian_blur_61": ops.Blur(ops.gaussian_kernel(61, 3.0), "gaussian_blur", 0.05),
                 "motion_blur_61": ops.Blur(ops.motion_kernel(61, 0.5, seed=0), "motion_blur", 0.05),
                 "inpaint_box": ops.LazyMaskInpaint("box", sigma_y=0.05)}
    if quick:
        operators = {k: operators[k] for k in ("sr_avgpool_x4", "gaussian_blur_61")}
    out = {"prior": {"train_photos": train, "latent_std": round(std, 3), "size": size, "steps": steps}}
    with torch.no_grad():
        out["prior"]["encoder_decoder_psnr"] = psnr(decode(encode(clean)), clean)
    for name, op in operators.items():
        y = op.measure(clean, torch.Generator().manual_seed(7))
        res = {}
        with torch.no_grad():
            res["baseline_E(back_projection)"] = {"psnr": psnr(decode(encode(rs.back_project(op, y, clean))), clean)}
        for method in ("ldps", "psld", "p2l", "stsl"):
            z, st = run(method, model, decode, encode, op, y, grid, clean, 100, mean=mean, std=std)
            with torch.no_grad():
                x = decode(z)
            res[method] = {"psnr": psnr(x, clean), "consistency": round(consistency(op, y, x), 3), **st}
        out[name] = res
        print(f"(b) {name}: " + json.dumps(res), flush=True)
    return out


MEMORY_MODES = {"tiled_40": {"tile": 40, "overlap": 5}, "tiled_32": {"tile": 32, "overlap": 4},
                "tiled_16": {"tile": 16, "overlap": 2}, "checkpoint": {"tile": 0},
                "full": {"tile": 0, "checkpoint": False}}


def memory_worker(size: int, mode: str) -> dict:
    """One gradient through the TAEF2 decoder in this (fresh) process, after one unmeasured run
    of the same (first calls build oneDNN primitives that stay): peak RSS growth, the bytes
    autograd keeps between forward and backward, seconds of the measured run."""
    from support import taef2
    from support.peak_memory import SavedTensors

    _pack()
    from comfyui_inverse.core.tiling import decode_bounded

    _, dec = taef2.load()
    z = torch.randn(1, 32, size // 8, size // 8).requires_grad_(True)

    def once():
        with SavedTensors() as saved:
            x = decode_bounded(dec, z, **MEMORY_MODES[mode])
            kept = saved.live
        x.pow(2).mean().backward()
        return kept

    once()
    t0 = time.perf_counter()
    with Peak() as peak:
        kept = once()
    return {"autograd_saved_mb": round(kept / 2 ** 20, 1), "peak_rss_growth_mb": peak.mb,
            "seconds": round(time.perf_counter() - t0, 2)}


def decoder_memory(quick: bool) -> dict:
    """Memory of one gradient through the TAEF2 decoder at 512 and 1024 px for full / checkpointed /
    tiled decoding (tiled_40 is the Restore node's default), each in a fresh process: peak RSS
    growth over the loaded model, bytes autograd keeps between forward and backward."""
    import subprocess

    from support import taef2

    if not taef2.available():
        return {"skipped": "TAEF2 weights not found"}
    out = {}
    for size in ((512,) if quick else (512, 1024)):
        res = {}
        for mode in (("tiled_40", "full") if quick else list(MEMORY_MODES)):
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", f"{size}:{mode}"], capture_output=True,
                                  text=True, check=True, env=FRESH_ENV)
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        for mode in res:
            res[mode]["peak_vs_full"] = round(res[mode]["peak_rss_growth_mb"] / res["full"]["peak_rss_growth_mb"], 2)
        out[f"{size}px"] = res
        print(f"decoder memory {size}px: " + json.dumps(res), flush=True)
    return out


def protocol_a(quick: bool) -> dict:
    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        return {"skipped": comfy_host.MISSING_REASON}
    pack = comfy_host.start_inprocess()
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    steps = 3 if quick else 20
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a high quality photograph"))
    from support import taef2
    clean = taef2.photo("astronaut", 64).movedim(1, -1)
    kinds = ["sr_avgpool"] if quick else ["sr_avgpool", "gaussian_blur", "motion_blur", "inpaint_box"]
    batches: list[int] = []

    def hook(module, a, o):
        if isinstance(module, UNetModel):
            batches.append(int(a[0].shape[0]))

    h = torch.nn.modules.module.register_module_forward_hook(hook)
    out = {"steps": steps}
    try:
        for kind in kinds:
            with torch.inference_mode():
                op = r.DegradationOperator.execute(kind, 4, 61, 3.0, 0.5, 0.4, 0.05, 0).args[0]
                y = r.DegradeImage.execute(clean, op, 0).args[0]
            res = {}
            for method in ("ldps", "psld", "p2l", "stsl"):
                batches.clear()
                t0 = time.perf_counter()
                with Peak() as peak, torch.inference_mode():
                    img, _, rep = r.Restore.execute(model, vae, pos, y, op, method, steps, 0, 1.0, 0.1, 0.0, 5, 1.0, 0.02,
                                                    0.01, "measurement", 1, 1e-3, 4, 10, 0.01, "tiled", 40).args
                rep = json.loads(rep)
                res[method] = {"consistency": round(rep["consistency"], 3), "unet_calls": len(batches),
                               "unet_batch_elements": sum(batches), "seconds": round(time.perf_counter() - t0, 2),
                               "peak_mb": peak.mb, "psnr_meaningless_random_weights": psnr(img.movedim(-1, 1) * 2 - 1,
                                                                                           clean.movedim(-1, 1) * 2 - 1)}
            out[kind] = res
            print(f"(a) {kind}: " + json.dumps(res), flush=True)
    finally:
        h.remove()
    return out


def restore_memory_worker(decoder_memory: str, steps: int) -> dict:
    """In this (fresh) process: the Restore node (LDPS, x4 SR of a 128 px measurement into 512 px)
    with SD1.5's real UNet (ComfyUI's SD15 class, 860M random weights, float32) and the SD VAE's
    real architecture (the tiny checkpoint's VAE, random weights): peak RSS growth over the loaded
    models, seconds, the decoder's share."""
    from support import comfy_host

    pack = comfy_host.start_inprocess()
    import comfy.sd

    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    model = comfy_host.sd15_sized_model()
    with torch.inference_mode():
        vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[2]
        pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        op = r.DegradationOperator.execute("sr_avgpool", 4, 9, 3.0, 0.5, 0.4, 0.05, 1).args[0]
        y = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    with Peak() as peak, torch.inference_mode():
        img, _, rep = r.Restore.execute(model, vae, pos, y, op, "ldps", steps, 0, 1.0, 0.1, 0.0, 5, 1.0, 0.02, 0.01,
                                        "measurement", 1, 1e-3, 4, 10, 0.01, decoder_memory, 40).args
    rep = json.loads(rep)
    return {"peak_rss_growth_mb": peak.mb, "seconds": round(time.perf_counter() - t0, 1), "image": list(img.shape),
            "finite": bool(torch.isfinite(img).all()), "unet_calls": rep["unet_calls"],
            "decoder_calls": rep["decoder_calls"]}


def protocol_r(quick: bool) -> dict:
    """(r) The Restore node at 512 px with real-size SD1.5 parts, decoder_memory full vs the default
    tiled (40), each in a fresh process."""
    import subprocess

    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        return {"skipped": comfy_host.MISSING_REASON}
    steps = 1 if quick else 2
    res = {}
    for mode in ("full", "tiled", "checkpoint"):
        proc = subprocess.run([sys.executable, __file__, "--restore-worker", f"{mode}:{steps}"], capture_output=True,
                              text=True, env=FRESH_ENV)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in res:
        res[mode]["peak_vs_full"] = round(res[mode]["peak_rss_growth_mb"] / res["full"]["peak_rss_growth_mb"], 2)
    print("(r) Restore at 512 px, SD1.5 sizes: " + json.dumps(res), flush=True)
    return res


def protocol_l(quick: bool) -> dict:
    """(l) flow models. First protocol (c)'s Gaussian problem with the prior's exact denoiser derived
    in flow parameterisation (core/flow.py) on SD3's shift-3 levels, next to the DDPM-parameterised
    reference on SD1.5's schedule: distance to the exact posterior mean and consistency per method.
    Then the Restore node's plumbing on the tiny random-weight SD3 and Flux with a 16-channel VAE
    (x4 SR of a 64 px photo): consistency, UNet calls, seconds (random weights: no image quality)."""
    ops, rs, schedule, GMD, MP = _pack()
    from comfyui_inverse.core.flow import FlowPredictor, discrete_flow_sigmas, gaussian_flow_denoiser

    steps, seeds, g, shape, mean, s, sy, x_true, grid_ddpm, ddpm_model = gaussian_problem(quick)
    sig = discrete_flow_sigmas()
    flow_model = FlowPredictor(gaussian_flow_denoiser(mean, s), sig)
    flow_model.evaluations = 0
    grid_flow = schedule.TimestepGrid.from_schedule(schedule.alphas_cumprod_from_sigmas(sig),
                                                    schedule.timestep_spacing(steps, len(sig), "trailing"))
    ident = lambda v: v  # noqa: E731
    op = ops.Inpaint(ops.random_mask(16, 16, 0.5, seed=1), sigma_y=sy)
    y = op.measure(x_true, torch.Generator().manual_seed(7))
    post = gaussian_posterior_mean_inpaint(y, op.mask, mean[None].float(), s, sy)
    out = {"closed_form_inpaint_random_50": {}}
    for label, model, grid, make_cond in (("ddpm_reference_sd15_schedule", ddpm_model, grid_ddpm, None),
                                          ("flow_reference_sd3_levels", flow_model, grid_flow, lambda C: C)):
        res = {}
        for method in ("ldps", "psld", "p2l", "stsl"):
            zs = [run(method, model, ident, ident, op, y, grid, x_true, 100 + sd, mean=mean, std=s,
                      make_cond=make_cond)[0] for sd in seeds]
            res[method] = {"rmse_to_posterior_mean": round(sum(float((z - post).pow(2).mean().sqrt()) for z in zs)
                                                           / len(zs), 4),
                           "consistency": round(sum(consistency(op, y, z) for z in zs) / len(zs), 3)}
        out["closed_form_inpaint_random_50"][label] = res
        print(f"(l) {label}: " + json.dumps(res), flush=True)
    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        return out
    pack = comfy_host.start_inprocess()
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    vae = comfy_host.random_vae16()
    from support import taef2
    clean = taef2.photo("astronaut", 64).movedim(1, -1)
    n_steps = 3 if quick else 10
    for kind in ("sd3", "flux"):
        model, cond = comfy_host.tiny_flow_model(kind)
        pos = cond()
        res = {}
        with torch.inference_mode():
            op_n = r.DegradationOperator.execute("sr_avgpool", 4, 9, 3.0, 0.5, 0.4, 0.05, 1).args[0]
            yy = r.DegradeImage.execute(clean, op_n, 0).args[0]
            for method, step in (("unguided", 0.0), ("ldps", 1.0), ("psld", 1.0), ("p2l", 1.0), ("stsl", 1.0)):
                t0 = time.perf_counter()
                _, _, rep = r.Restore.execute(model, vae, pos, yy, op_n, "ldps" if method == "unguided" else method,
                                              n_steps, 0, step, 0.1, 0.0, 5, 1.0, 0.02, 0.01, "measurement", 1, 1e-3,
                                              4, 10, 0.01, "tiled", 40).args
                rep = json.loads(rep)
                res[method] = {"consistency": round(rep["consistency"], 3), "unet_calls": rep["unet_calls"],
                               "seconds": round(time.perf_counter() - t0, 2)}
        out[f"tiny_{kind}_sr_x4"] = res
        print(f"(l) tiny {kind}, x4 SR, {n_steps} steps: " + json.dumps(res), flush=True)
    return out


TESTBED_KINDS = ("sr_avgpool", "gaussian_blur", "motion_blur", "inpaint_box")
TESTBED_METHODS = {"ldps": {"step_size": 1.0}, "psld": {"step_size": 1.0, "gluing": 0.1}, "p2l": {"step_size": 1.0},
                   "stsl": {}}


def protocol_t(quick: bool, count: int = 0, kinds=TESTBED_KINDS, methods=None) -> dict:
    """(t) the trained testbed: LDPS, PSLD, P2L and STSL through the Restore node on the first
    ``count`` held-out images (each with its own prompt), x4 SR, Gaussian and motion deblur, box
    inpainting (sigma_y 0.02); PSNR and SSIM against the clean image, measurement consistency
    (||y - A(x)|| / (sigma_y sqrt(m)): 1 is the noise level), model calls, seconds; the unguided
    sample and the degraded input (bicubic back to 48 px) as the bars to beat."""
    import torch.nn.functional as F
    from skimage.metrics import structural_similarity

    from support.testbed_runs import Testbed, nchw, psnr as psnr_b

    count = count or (8 if quick else 100)
    steps = 20 if quick else 50
    bed = Testbed()
    idx = list(range(count))
    clean = bed.images[idx]
    pos = bed.cond(bed.prompts(idx))

    def ssim(x):
        return round(float(sum(structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                                                     channel_axis=2, data_range=1.0) for a, b in zip(x, clean))
                           / len(x)), 4)

    out = {"images": count, "steps": steps}
    for kind in kinds:
        op = bed.operator(kind)
        y = bed.degrade(clean, op)
        row = {}
        deg = nchw(y)
        if deg.shape[-1] != clean.shape[-1]:
            deg = F.interpolate(deg, size=clean.shape[-2:], mode="bicubic")
        deg = deg.clamp(0, 1)
        row["degraded"] = {"psnr": round(float(psnr_b(deg, clean).mean()), 2), "ssim": ssim(deg)}
        for method, kw in [("unguided", {"method": "ldps", "step_size": 0.0})] + \
                [(m, {"method": m, **k}) for m, k in TESTBED_METHODS.items()]:
            if methods and method not in methods:
                continue
            t0 = time.perf_counter()
            try:
                image, rep = bed.restore(y, op, pos, steps=steps, **kw)
            except Exception as exc:  # the node's own error (e.g. a divergence it caught) is a result: record it
                if type(exc).__name__ != "InverseInputError":
                    raise
                row[method] = {"error": str(exc), "seconds": round(time.perf_counter() - t0, 1)}
                print(f"(t) {kind:13s} {method:8s} FAILED ({row[method]['seconds']} s): {exc}", flush=True)
                continue
            secs = time.perf_counter() - t0
            cons = rep.get("consistency")
            row[method] = {"psnr": round(float(psnr_b(image, clean).mean()), 2), "ssim": ssim(image),
                           "consistency": cons, "unet_calls": rep.get("unet_calls"), "seconds": round(secs, 1)}
            print(f"(t) {kind:13s} {method:8s} PSNR {row[method]['psnr']:6.2f} dB  SSIM {row[method]['ssim']:.4f}  "
                  f"consistency {cons}  calls {rep.get('unet_calls')}  {secs:6.1f} s", flush=True)
        print(f"(t) {kind:13s} degraded PSNR {row['degraded']['psnr']:6.2f} dB  SSIM {row['degraded']['ssim']:.4f}",
              flush=True)
        out[kind] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute")
    ap.add_argument("--protocols", default="fcbma", help="f (fidelity fixes), c, b, a, m (decoder memory) and r "
                                                         "(Restore's memory at 512 px with SD1.5 sizes, ~10 minutes), "
                                                         "l (flow models: analytic flow reference, tiny SD3/Flux), "
                                                         "t (the trained testbed; --testbed N images)")
    ap.add_argument("--testbed", type=int, default=0, metavar="N", help="protocol t: N held-out images (100)")
    ap.add_argument("--methods", default="", help="protocol t: a comma list of unguided, " + ", ".join(TESTBED_METHODS)
                    + " (default: all)")
    ap.add_argument("--kinds", default=",".join(TESTBED_KINDS),
                    help="protocol t: a comma list of degradations (default: all of " + ", ".join(TESTBED_KINDS) + ")")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--restore-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.restore_worker:
        mode, steps = args.restore_worker.split(":")
        print(json.dumps(restore_memory_worker(mode, int(steps))))
        return
    if args.memory_worker:
        size, mode = args.memory_worker.split(":")
        print(json.dumps(memory_worker(int(size), mode)))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in TESTBED_KINDS for k in kinds):
        ap.error(f"--kinds: one of {', '.join(TESTBED_KINDS)}, comma-separated; got {args.kinds!r}")
    results = {"quick": args.quick}
    t0 = time.perf_counter()
    for p, fn in (("f", protocol_f), ("c", protocol_c), ("b", protocol_b), ("m", decoder_memory), ("a", protocol_a),
                  ("r", protocol_r), ("l", protocol_l), ("t", lambda q: protocol_t(q, args.testbed, kinds, [m for m in args.methods.split(",") if m]))):
        if p in args.protocols:
            results[p] = fn(args.quick)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
