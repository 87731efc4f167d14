"""Train the SD3-format flow testbed (scripts/testbed.py ``SD3``, issue 23): VAE -> latents -> context -> MMDiT -> export.

The same recoloured Fashion-MNIST data, prompts and held-out items as the SD1.5 testbed
(scripts/train_testbed.py), trained a second time as a flow model that ComfyUI loads through its SD3
path:
- **VAE**: TAESD's architecture with 16 latent channels (SD3's), warm-started from the SD1.5 testbed's
  trained 4-channel VAE (committed in tests/data): every 64-channel block is copied, the first four
  latent channels copy its latent convolutions and the other twelve start at zero in the decoder, so
  training starts from its round trip and improves on it.
- **MMDiT**: ComfyUI's own class (depth 4, patch 2: 3 x 3 image tokens beside CLIP-L's 77), trained with
  the rectified-flow objective of SD3 (Esser et al. 2024, eq. 1-3: x_t = (1 - t) x_0 + t eps, the
  network predicts v = eps - x_0; t drawn from the logit-normal(0, 1) of section 3.1, a quarter of the
  draws uniform so the ends of the path are trained too), 10% of the prompts dropped to "" for
  classifier-free guidance; AdamW, EMA. The context is CLIP-L's penultimate layer as ComfyUI's SD3 text
  encoder gives it (77 x 4096, zero beyond 768): training multiplies only the 768 live columns.
- **Report**: VAE round-trip PSNR on the 128 held-out images; class-conditional samples (every prompt x 2
  seeds, Euler on SD3's shift-3 schedule, 50 steps, CFG 5) read by the SD1.5 testbed's classifier (the
  images are the same kind) and by the measured colour.

Each stage saves its state under --state (default: the cache folder's testbed_sd3/) and resumes from it.
Usage: python scripts/train_testbed_sd3.py [--stages vae,latents,context,model,export] [--vae-steps N]
           [--model-steps N] [--comfyui PATH] [--state DIR] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import testbed as tb  # noqa: E402
import train_testbed as sd15  # noqa: E402  (the shared loop, losses and helpers)
from train_testbed import log, psnr, _load, _save  # noqa: E402

STAGES = ("vae", "latents", "context", "model", "export")
C = tb.SD3_LATENT_CHANNELS
SHIFT = 3.0  # supported_models.SD3's sampling shift, which ComfyUI applies to this checkpoint


def _warm_start_from_sd15(model) -> None:
    """Copy the SD1.5 testbed's trained VAE into the 16-channel one: the encoder's last convolution
    gives latent channels 0-3 (4-15 keep their fresh initialisation), the decoder's first reads
    channels 0-3 (its weights for 4-15 start at zero): the round trip starts equal to the 4-channel one."""
    import torch
    from safetensors.torch import load_file

    src = {k[len("first_stage_model."):]: v.float() for k, v in load_file(str(tb.WEIGHTS)).items()
           if k.startswith("first_stage_model.taesd_")}
    own = model.state_dict()
    with torch.no_grad():
        for k, v in src.items():
            if own[k].shape == v.shape:
                own[k].copy_(v)
            elif k.startswith("taesd_encoder."):  # 64 -> 16 latent channels: weight / bias rows
                own[k][:v.shape[0]].copy_(v)
            else:  # decoder's first convolution: 16 -> 64, columns
                own[k].zero_()
                own[k][:, :v.shape[1]].copy_(v)
    log(f"warm start: {len(src)} tensors from the SD1.5 testbed's 4-channel VAE")


def stage_vae(state: Path, steps: int, batch: int = 32) -> None:
    import torch

    path = state / "vae.pt"
    ck = _load(path) or {}
    if ck.get("step", 0) >= steps:
        return
    torch.manual_seed(0)
    model = tb.taesd(C)
    if ck:
        model.load_state_dict(ck["model"])
    else:
        _warm_start_from_sd15(model)
    params = list(model.taesd_encoder.parameters()) + list(model.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.0)
    if ck:
        opt.load_state_dict(ck["opt"])
    hold = tb.load_heldout()[0][:64]
    sd15._fit("vae16", path, opt, ck.get("step", 0), steps, 400_000, batch,
              lr_at=lambda s: 4e-4 * min(1.0, (s + 1) / 25) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))),
              loss_fn=lambda x, g: sd15._vae_loss(model, x, g), held_psnr=lambda: sd15._held_psnr(model, hold),
              snapshot=lambda s: {"model": model.state_dict(), "opt": opt.state_dict(), "step": s})


def stage_context(state: Path) -> None:
    """Every prompt through ComfyUI's SD3 text encoder as it loads from the assembled checkpoint's
    layout (CLIP-L only): a stand-in checkpoint with an untrained MMDiT and VAE is loaded by
    comfy.sd.load_checkpoint_guess_config, exactly as Load Checkpoint will load the real one."""
    import torch
    import comfy.sd
    from safetensors.torch import save_file

    path = state / "context.pt"
    if path.is_file():
        return
    stub = state / "clip_stub.safetensors"
    import make_tiny_checkpoint

    sd = {"model.diffusion_model." + k: v for k, v in tb.mmdit().state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in tb.taesd(C).state_dict().items()})
    sd.update({tb.CLIP_L_SD3_PREFIX + k[len("cond_stage_model."):]: v
               for k, v in make_tiny_checkpoint.build_state_dict(tb.CLIP_SEED).items()
               if k.startswith("cond_stage_model.")})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(stub))
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(stub), output_vae=False, output_clip=True)[:4]
    stub.unlink()
    ctx, pooled = [], []
    for p in tb.all_prompts():
        cond, pool = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        ctx.append(cond.float())
        pooled.append(pool.float())
    ctx, pooled = torch.cat(ctx), torch.cat(pooled)
    assert ctx.shape[1:] == (77, 4096) and pooled.shape[1] == 2048, (ctx.shape, pooled.shape)
    assert ctx[..., tb.CLIP_L_WIDTH:].abs().max() == 0 and pooled[:, tb.CLIP_L_WIDTH:].abs().max() == 0
    flat = torch.nn.functional.normalize(ctx.flatten(1), dim=1)
    log(f"SD3 context {tuple(ctx.shape)}, pooled {tuple(pooled.shape)}; cosine between prompts: max "
        f"{(flat @ flat.T).fill_diagonal_(-1).max():.4f}")
    _save({"context": ctx[..., :tb.CLIP_L_WIDTH].contiguous(), "pooled": pooled[:, :tb.CLIP_L_WIDTH].contiguous(),
           "prompts": tb.all_prompts()}, path)


def _live_context(model) -> None:
    """Training only: the context embedder multiplies CLIP-L's 768 live columns (the rest of ComfyUI's
    4096-wide context is zero), which is the same product at a sixth of the cost."""
    import torch.nn.functional as F

    lin = model.context_embedder
    lin.forward = lambda c: F.linear(c, lin.weight[:, :c.shape[-1]], lin.bias)


def _pad(ctx, pooled):
    import torch.nn.functional as F

    return ctx, F.pad(pooled, (0, 2048 - pooled.shape[-1]))


def sample_t(n: int, g):
    """SD3's logit-normal(0, 1) t (section 3.1), a quarter of the draws uniform in (0, 1)."""
    import torch

    t = torch.sigmoid(torch.randn(n, generator=g))
    u = torch.rand(n, generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.25, u, t).clamp(1e-4, 1 - 1e-4)


def stage_model(state: Path, steps: int, batch: int = 64, lr: float = 4e-4) -> None:
    """Rectified flow (Esser et al. 2024, eq. 1-3) in the model's latent space: z0 = (raw latent -
    mean) / std, which export folds into vae_scale / vae_shift so that ComfyUI's SD3 latent format gives
    the model exactly z0."""
    import torch

    path = state / "model.pt"
    ck = _load(path) or {}
    if ck.get("step", 0) >= steps:
        return
    lat = _load(state / "latents.pt")
    cx = _load(state / "context.pt")
    ctx, pooled = _pad(cx["context"], cx["pooled"])
    z0 = (lat["raw"].float() - lat["mean"]) / lat["std"]
    prompt_idx = lat["labels"] * len(tb.COLOURS) + lat["colours"]
    empty = len(ctx) - 1
    torch.manual_seed(0)
    model = tb.mmdit()
    if ck:
        model.load_state_dict(ck["model"])
    _live_context(model)
    ema = {k: v.clone() for k, v in (ck.get("ema") or model.state_dict()).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if ck:
        opt.load_state_dict(ck["opt"])
    step = ck.get("step", 0)
    g = torch.Generator()
    t0, first, run_loss = time.time(), step, 0.0
    model.train()
    while step < steps:
        g.manual_seed(500_000 + step)  # resuming changes nothing
        idx = torch.randint(0, len(z0), (batch,), generator=g)
        x0 = z0[idx]
        p = prompt_idx[idx].clone()
        p[torch.rand(batch, generator=g) < 0.1] = empty
        t = sample_t(batch, g)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = (model(xt, t * 1000, context=ctx[p], y=pooled[p]) - (eps - x0)).pow(2).mean()
        step += 1
        run_loss = sd15.optimise(model, opt, ema, loss, step, steps, run_loss, "mmdit", (t0, first), path)


def shifted_sigmas(steps: int, shift: float = SHIFT):
    """ComfyUI's ModelSamplingDiscreteFlow schedule: t evenly from 1 to 0, sigma = shift t / (1 + (shift - 1) t)."""
    import torch

    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def stage_report(state: Path, seeds: int = 2, weights: Path = tb.SD3_WEIGHTS) -> dict:
    """The quality bars on held-out data from the exported weights (pure torch): VAE round-trip PSNR;
    class-conditional samples (Euler, 50 steps of SD3's shift-3 schedule, CFG 5) read by the classifier."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(weights))
    vae, net = tb.taesd(C), tb.mmdit()
    vae.load_state_dict({k[len("first_stage_model."):]: v.float() for k, v in sd.items()
                         if k.startswith("first_stage_model.")})
    net.load_state_dict({k[len("model.diffusion_model."):]: v.float() for k, v in sd.items()
                         if k.startswith("model.diffusion_model.")})
    vae.eval(), net.eval()
    _live_context(net)
    clf = tb.load_classifier()
    images = tb.load_heldout()[0]
    cx = _load(state / "context.pt")
    ctx, pooled = _pad(cx["context"], cx["pooled"])
    scale, shift = tb.SD3_LATENT_FORMAT
    out = {}
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(images * 2 - 1)).add(1).div(2).clamp(0, 1)
        out["vae_psnr_db"] = round(float(psnr(round_trip, images).mean()), 2)
        sig = shifted_sigmas(50)
        cls_ok = col_ok = n = 0
        for seed in range(seeds):
            pairs = [(c, k) for c in range(len(tb.CLASSES)) for k in range(len(tb.COLOURS))]
            p = torch.tensor([c * len(tb.COLOURS) + k for c, k in pairs])
            u = torch.full_like(p, len(ctx) - 1)
            z = torch.randn(len(p), C, tb.SIZE // 8, tb.SIZE // 8, generator=torch.Generator().manual_seed(seed))
            for i in range(50):
                s = float(sig[i])
                v = net(torch.cat([z, z]), torch.full((2 * len(p),), s * 1000),
                        context=torch.cat([ctx[p], ctx[u]]), y=torch.cat([pooled[p], pooled[u]]))
                vc, vu = v.chunk(2)
                z = z + (float(sig[i + 1]) - s) * (vu + 5.0 * (vc - vu))
            img = vae.decode(z / scale + shift).add(1).div(2).clamp(0, 1)
            cls, _ = tb.Classifier.predict(clf, img)
            want_cls, want_col = torch.tensor([c for c, _ in pairs]), torch.tensor([k for _, k in pairs])
            cls_ok += int((cls == want_cls).sum())
            col_ok += int((tb.measured_colour(img) == want_col).sum())
            n += len(pairs)
    out.update(samples=n, sample_class_accuracy=round(cls_ok / n, 3), sample_colour_accuracy=round(col_ok / n, 3))
    bars = {"vae_psnr_db": 28.0, "sample_class_accuracy": 0.8, "sample_colour_accuracy": 0.9}
    out["bars_met"] = {k: out[k] >= v for k, v in bars.items()}
    log(f"SD3 testbed quality on held-out data: {json.dumps(out)}")
    (state / "report.json").write_text(json.dumps(out, indent=1))
    return out


def stage_export(state: Path) -> dict:
    """fp16 weights with SD3's key names, vae_scale / vae_shift set so that ComfyUI's SD3 latent format
    ((latent - 0.0609) * 1.5305) hands the MMDiT the normalised latent it was trained on, and the part
    hashes of the assembled checkpoint (as scripts/train_testbed.py's export)."""
    import torch
    from safetensors.torch import save_file

    vae = _load(state / "vae.pt")["model"]
    lat = _load(state / "latents.pt")
    ck = _load(state / "model.pt")
    scale, shift = tb.SD3_LATENT_FORMAT
    # encode: raw / vae_scale + vae_shift = (raw - mean) / (std scale) + shift
    vae_scale = lat["std"] * scale
    vae_shift = shift - lat["mean"] / vae_scale
    sd = {"model.diffusion_model." + k: v for k, v in ck["ema"].items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.items() if k.startswith("taesd_")})
    sd["first_stage_model.vae_scale"] = torch.tensor(vae_scale)
    sd["first_stage_model.vae_shift"] = torch.tensor(vae_shift)
    sd = {k: v.half().contiguous() for k, v in sd.items()}
    weights = tb.SD3_WEIGHTS
    tmp = Path(str(weights) + ".tmp")
    save_file(sd, str(tmp))
    full = tb.checkpoint_state_dict(tmp, family="sd3")
    hashes = tb.part_hashes(full)
    meta = {"comfyui_inverse": "trained SD3-format flow testbed: MMDiT + 16-channel TAESD-format VAE (fp16); "
                               "scripts/train_testbed_sd3.py", "model_steps": str(ck["step"]),
            **{"sha256:" + k: v for k, v in hashes.items()}}
    ckpt = state / tb.SD3_CKPT_NAME
    save_file(sd, str(tmp), metadata=meta)
    tb.write_checkpoint(full, ckpt, tb._weights_hash(tmp))
    meta["sha256:checkpoint"] = hashes["checkpoint"] = tb.file_sha256(ckpt)
    ckpt.unlink()
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, weights)
    log(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB); hashes {hashes}")
    return hashes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--model-steps", type=int, default=2400)
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--state", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    state, stages = sd15.setup(args, "train_testbed_sd3", "testbed_sd3", STAGES + ("report",))
    if "vae" in stages:
        stage_vae(state, args.vae_steps)
    if "latents" in stages:
        sd15.stage_latents(state, C)
    if "context" in stages:
        stage_context(state)
    if "model" in stages:
        stage_model(state, args.model_steps)
    if "export" in stages:
        stage_export(state)
    if "export" in stages or "report" in stages:
        stage_report(state)


if __name__ == "__main__":
    main()
