"""Train the testbed checkpoint (scripts/testbed.py): data -> VAE -> latents -> UNet -> classifier -> export.

Each stage saves its state under --state (default: the cache folder's testbed/, outside the
repository) and resumes from it; a finished stage is skipped. Fixed seeds throughout. ``export``
writes tests/data/testbed_weights.safetensors (fp16, with the part hashes of the assembled
checkpoint in its metadata), assembles the checkpoint and reports the quality bars on held-out
images: VAE round-trip PSNR, and the classifier's reading of class-conditional samples.

Usage: python scripts/train_testbed.py [--stages data,vae,latents,context,unet,classifier,decoder,export]
           [--vae-steps N] [--unet-steps N] [--decoder-steps N] [--comfyui PATH] [--state DIR]
Needs ComfyUI importable (--comfyui or COMFYUI_PATH) and Debian's dataset-fashion-mnist (stages
vae, latents, classifier). Measured on this project's 2-core machines: VAE 500 steps at batch 32 ~19
min, latents 6 min, UNet 1,200 steps at batch 64 ~60 min (3.0 s a step), classifier 7 min, export
and report 3 min. The defaults are the committed model's recipe (its decoder was not refined:
--decoder-steps 0). A re-run gives a model of the same recipe, not the same bytes: the committed
VAE run was resumed once under an earlier batch seeding, and CPU kernels differ between machines.
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
import provision  # noqa: E402

STAGES = ("data", "vae", "latents", "context", "unet", "classifier", "decoder", "export")


def log(msg: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def psnr(a, b) -> "torch.Tensor":
    import torch

    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------

def _fit(label: str, path: Path, opt, step: int, steps: int, seed: int, batch: int, lr_at, loss_fn,
         held_psnr, snapshot) -> None:
    """The VAE stages' shared loop: from ``step`` to ``steps``, a batch of rendered training items
    drawn from the seed ``seed + step`` (so a resumed run is the same run), the learning rate
    ``lr_at(step)``, one AdamW step on ``loss_fn(x, generator)``; every 25 steps the held-out
    PSNR is logged and ``snapshot(step)`` saved to ``path``."""
    import torch

    items, labels, colours = tb.load_split("train")
    g = torch.Generator()
    t0, first = time.time(), step
    while step < steps:
        g.manual_seed(seed + step)
        idx = torch.randint(0, len(items), (batch,), generator=g).numpy()
        x = tb.render(items[idx], colours[idx])
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        loss = loss_fn(x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == steps:
            with torch.no_grad():
                p = held_psnr()
            log(f"{label} step {step}/{steps} loss {loss.item():.5f} held-out PSNR {p:.2f} dB "
                f"({(time.time() - t0) / (step - first):.2f} s/step)")
            _save(snapshot(step), path)


def _vae_loss(model, x, g, encoder_grad: bool = True):
    """MSE + 0.1 L1 of the round trip, the latent jittered by N(0, 0.03^2) so that the decoder
    tolerates a sampler's imperfect latents."""
    import torch

    with torch.set_grad_enabled(encoder_grad):
        z = model.taesd_encoder(x)
    y = model.taesd_decoder(z + 0.03 * torch.randn(z.shape, generator=g))
    return (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean()


def _held_psnr(model, hold):
    return psnr(model.taesd_decoder(model.taesd_encoder(hold)).clamp(0, 1), hold).mean()


def stage_vae(state: Path, steps: int, batch: int = 32) -> None:
    """TAESD-format VAE on the 48 px training images (loss: :func:`_vae_loss`). Warm-started from
    TAEF2's trained 64-channel blocks (../shared/assets/taef2; the first and last latent
    convolutions are new)."""
    import torch

    path = state / "vae.pt"
    ck = _load(path) or {}
    if ck.get("step", 0) >= steps:
        return
    torch.manual_seed(0)
    model = tb.taesd()
    if not ck:
        _warm_start(model)
    else:
        model.load_state_dict(ck["model"])
    params = list(model.taesd_encoder.parameters()) + list(model.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.0)
    if ck:
        opt.load_state_dict(ck["opt"])
    hold = tb.load_heldout()[0][:64]
    _fit("vae", path, opt, ck.get("step", 0), steps, 100_000, batch,
         lr_at=lambda s: 8e-4 * min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))),
         loss_fn=lambda x, g: _vae_loss(model, x, g), held_psnr=lambda: _held_psnr(model, hold),
         snapshot=lambda s: {"model": model.state_dict(), "opt": opt.state_dict(), "step": s})


def stage_decoder(state: Path, steps: int, batch: int = 32) -> None:
    """More training of the VAE's decoder alone, the encoder frozen: the latent space the UNet was
    trained in stays exactly as it was, only the decoding of it improves."""
    import torch

    path = state / "decoder.pt"
    ck = _load(path) or {}
    if steps <= 0 or ck.get("step", 0) >= steps:
        return
    model = tb.taesd()
    model.load_state_dict(_load(state / "vae.pt")["model"])
    if ck:
        model.taesd_decoder.load_state_dict(ck["decoder"])
    model.taesd_encoder.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.taesd_decoder.parameters(), lr=2e-4, weight_decay=0.0)
    if ck:
        opt.load_state_dict(ck["opt"])
    hold = tb.load_heldout()[0][:64]
    _fit("decoder", path, opt, ck.get("step", 0), steps, 300_000, batch,
         lr_at=lambda s: 2e-4 * 0.5 * (1 + math.cos(math.pi * s / steps)),
         loss_fn=lambda x, g: _vae_loss(model, x, g, encoder_grad=False), held_psnr=lambda: _held_psnr(model, hold),
         snapshot=lambda s: {"decoder": model.taesd_decoder.state_dict(), "opt": opt.state_dict(), "step": s})


def _warm_start(model) -> None:
    from safetensors.torch import load_file

    shared = Path(os.environ.get("COMFYUI_INVERSE_SHARED", tb.ROOT.parent / "shared")) / "assets" / "taef2"
    for part, name in ((model.taesd_encoder, "taef2_encoder"), (model.taesd_decoder, "taef2_decoder")):
        f = shared / f"{name}.safetensors"
        if not f.is_file():
            log(f"no {f}: {name} starts from random weights")
            continue
        src = load_file(str(f))
        own = part.state_dict()
        take = {k: v.float() for k, v in src.items() if k in own and own[k].shape == v.shape}
        part.load_state_dict(take, strict=False)
        log(f"warm start: {len(take)}/{len(own)} tensors of the {name.split('_')[1]} from TAEF2")


LATENT_ITEMS = 24_000  # the UNet trains on the first 24k items of the training split (400 per prompt on average)


def stage_latents(state: Path, latent_channels: int = 4) -> None:
    """Encode the denoiser's training items once (the encoder costs ~16 ms an image on 2 cores) with
    the VAE in ``state`` (``latent_channels``: 16 for the SD3 flow testbed); record the latent
    mean/std that set vae_shift/vae_scale."""
    import torch

    path = state / "latents.pt"
    if path.is_file():
        return
    model = tb.taesd(latent_channels)
    model.load_state_dict(_load(state / "vae.pt")["model"])
    model.eval()
    items, labels, colours = (a[:LATENT_ITEMS] for a in tb.load_split("train"))
    out = []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(items), 500):
            out.append(model.taesd_encoder(tb.render(items[i:i + 500], colours[i:i + 500])).half())
            if i % 6000 == 0:
                log(f"latents {i}/{len(items)} ({time.time() - t0:.0f} s)")
    raw = torch.cat(out)
    mean, std = raw.float().mean().item(), raw.float().std().item()
    log(f"latents: mean {mean:.4f} std {std:.4f}")
    _save({"raw": raw, "labels": torch.from_numpy(labels), "colours": torch.from_numpy(colours),
           "mean": mean, "std": std}, path)


def stage_context(state: Path) -> None:
    """The text encoder's output for every prompt, through ComfyUI's own CLIP (the seeded CLIP-L)."""
    import torch

    path = state / "context.pt"
    if path.is_file():
        return
    import comfy.sd
    import make_tiny_checkpoint

    tiny = state / "clip_source.safetensors"
    if not tiny.is_file():
        make_tiny_checkpoint.main([str(tiny), "--comfyui", os.environ["COMFYUI_PATH"], "--seed", str(tb.CLIP_SEED)])
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny), output_vae=False, output_clip=True)[:4]
    prompts = tb.all_prompts()
    ctx = []
    for p in prompts:
        cond = clip.encode_from_tokens(clip.tokenize(p))
        ctx.append(cond[0].float() if isinstance(cond, tuple) else cond.float())
    ctx = torch.cat(ctx)
    flat = torch.nn.functional.normalize(ctx.flatten(1), dim=1)
    sim = flat @ flat.T
    log(f"context {tuple(ctx.shape)}; cosine between prompts: max {sim.fill_diagonal_(-1).max():.4f}")
    _save({"context": ctx, "prompts": prompts}, path)


def ddpm_tables():
    """SD1.5's abar table from the pack's core/schedule.py, loaded as a file (it imports only torch), so
    that the repo root never goes on sys.path (its nodes/ package would shadow ComfyUI's nodes.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_inverse_schedule", tb.ROOT / "core" / "schedule.py")
    schedule = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = schedule  # dataclasses look their module up
    spec.loader.exec_module(schedule)
    return schedule.scaled_linear_alphas_cumprod().float()


def optimise(model, opt, ema, loss, step: int, steps: int, run_loss: float, label: str, clock, path: Path) -> float:
    """The denoisers' shared tail of a training step (``step``: the steps done, this one included): one
    AdamW step on ``loss`` with the gradient norm clipped to 1, the EMA of the weights (decay
    min(0.999, (1 + step) / (10 + step))), the mean loss logged every 20 steps (``clock``: the start
    time and step of this run) and the state saved to ``path`` every 100. Returns the running loss sum."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    d = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            ema[k].mul_(d).add_(v, alpha=1 - d) if v.is_floating_point() else ema[k].copy_(v)
    run_loss += loss.item()
    if step % 20 == 0 or step == steps:
        t0, first = clock
        log(f"{label} step {step}/{steps} loss {run_loss / ((step - 1) % 20 + 1):.4f} "
            f"({(time.time() - t0) / (step - first):.2f} s/step)")
        run_loss = 0.0
    if step % 100 == 0 or step == steps:
        _save({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step}, path)
    return run_loss


def stage_unet(state: Path, steps: int, batch: int = 64, lr: float = 3e-4) -> None:
    """DDPM epsilon objective (Ho et al. 2020, eq. 14) on SD1.5's scaled-linear schedule, t uniform
    in 0..999, the prompt dropped to "" 10% of the time (classifier-free guidance); AdamW, EMA."""
    import torch

    path = state / "unet.pt"
    ck = _load(path) or {}
    if ck.get("step", 0) >= steps:
        return
    lat = _load(state / "latents.pt")
    ctx = _load(state / "context.pt")["context"]
    z0 = ((lat["raw"].float() - lat["mean"]) / lat["std"])
    prompt_idx = lat["labels"] * len(tb.COLOURS) + lat["colours"]
    empty = len(ctx) - 1
    abar = ddpm_tables()
    torch.manual_seed(0)
    model = tb.unet()
    if ck:
        model.load_state_dict(ck["model"])
    ema = {k: v.clone() for k, v in (ck.get("ema") or model.state_dict()).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if ck:
        opt.load_state_dict(ck["opt"])
    step = ck.get("step", 0)
    g = torch.Generator()
    t0, first, run_loss = time.time(), step, 0.0
    model.train()
    while step < steps:
        g.manual_seed(200_000 + step)  # as in stage_vae: resuming changes nothing
        idx = torch.randint(0, len(z0), (batch,), generator=g)
        x0 = z0[idx]
        p = prompt_idx[idx].clone()
        p[torch.rand(batch, generator=g) < 0.1] = empty
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for pg in opt.param_groups:
            pg["lr"] = lr * min(1.0, (step + 1) / 100)
        loss = (model(xt, t.float(), context=ctx[p]) - eps).pow(2).mean()
        step += 1
        run_loss = optimise(model, opt, ema, loss, step, steps, run_loss, "unet", (t0, first), path)


def stage_classifier(state: Path, steps: int = 400, batch: int = 128) -> None:
    """A small CNN reading class and colour, trained on the clean training renders (with noise and
    blur augmentation so that it reads imperfect samples as a person would)."""
    import torch
    import torch.nn.functional as F

    path = state / "classifier.pt"
    if path.is_file():
        return
    torch.manual_seed(0)
    net = tb.Classifier.build()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    items, labels, colours = tb.load_split("train")
    g = torch.Generator().manual_seed(300)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(items), (batch,), generator=g).numpy()
        x = tb.render(items[idx], colours[idx])
        x = (x + 0.03 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)
        for pg in opt.param_groups:
            pg["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        out = net(x)
        loss = F.cross_entropy(out[:, :10], torch.from_numpy(labels[idx])) + \
            F.cross_entropy(out[:, 10:], torch.from_numpy(colours[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    net.eval()
    items, labels, colours = tb.load_split("test")
    cls, col = tb.Classifier.predict(net, tb.render(items[:5000], colours[:5000]))
    acc = ((cls.numpy() == labels[:5000]).mean(), (col.numpy() == colours[:5000]).mean())
    log(f"classifier on 5000 test-split images: class {acc[0]:.3f}, colour {acc[1]:.3f}")
    _save({"model": net.state_dict(), "test_accuracy": acc}, path)


def stage_report(state: Path, seeds: int = 2) -> dict:
    """The quality bars on held-out data, from the exported weights file (pure torch, the same
    arithmetic ComfyUI does): the VAE round trip's PSNR on the 128 held-out images, and the
    class-conditional samples (DDIM, 50 steps, CFG 5; every prompt x ``seeds``) read by the
    classifier (item) and by the measured colour."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(tb.WEIGHTS))
    vae, unet = tb.taesd(), tb.unet()
    vae.load_state_dict({k[len("first_stage_model."):]: v.float() for k, v in sd.items()
                         if k.startswith("first_stage_model.")})
    unet.load_state_dict({k[len("model.diffusion_model."):]: v.float() for k, v in sd.items()
                          if k.startswith("model.diffusion_model.")})
    vae.eval(), unet.eval()
    net = tb.load_classifier()
    images, labels, colours, _ = tb.load_heldout()
    ctx = _load(state / "context.pt")["context"]
    abar = ddpm_tables()
    out = {}
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(images * 2 - 1)).add(1).div(2).clamp(0, 1)
        out["vae_psnr_db"] = round(float(psnr(round_trip, images).mean()), 2)
        cls_ok, col_ok, clf_col_ok, n = 0, 0, 0, 0
        for seed in range(seeds):
            pairs = [(c, k) for c in range(len(tb.CLASSES)) for k in range(len(tb.COLOURS))]
            p = torch.tensor([c * len(tb.COLOURS) + k for c, k in pairs])
            z = torch.randn(len(p), 4, tb.SIZE // 8, tb.SIZE // 8, generator=torch.Generator().manual_seed(seed))
            ts = list(range(999, -1, -20))  # 50 DDIM steps
            for i, t in enumerate(ts):
                a, a_prev = float(abar[t]), float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
                e = unet(torch.cat([z, z]), torch.full((2 * len(p),), float(t)),
                         context=torch.cat([ctx[p], ctx[-1:].expand(len(p), -1, -1)]))
                ec, eu = e.chunk(2)
                e = eu + 5.0 * (ec - eu)
                z = a_prev ** 0.5 * (z - (1 - a) ** 0.5 * e) / a ** 0.5 + (1 - a_prev) ** 0.5 * e
            img = vae.decode(z / tb.LATENT_SCALE).add(1).div(2).clamp(0, 1)
            cls, col = tb.Classifier.predict(net, img)
            want_cls, want_col = torch.tensor([c for c, _ in pairs]), torch.tensor([k for _, k in pairs])
            cls_ok += int((cls == want_cls).sum())
            col_ok += int((tb.measured_colour(img) == want_col).sum())
            clf_col_ok += int((col == want_col).sum())
            n += len(pairs)
    out.update(samples=n, sample_class_accuracy=round(cls_ok / n, 3), sample_colour_accuracy=round(col_ok / n, 3),
               sample_colour_accuracy_classifier=round(clf_col_ok / n, 3),
               classifier_test_accuracy=[round(float(a), 4) for a in _load(state / "classifier.pt")["test_accuracy"]])
    bars = {"vae_psnr_db": 28.0, "sample_class_accuracy": 0.8, "sample_colour_accuracy": 0.9}
    out["bars_met"] = {k: out[k] >= v for k, v in bars.items()}
    log(f"quality on held-out data: {json.dumps(out)}")
    (state / "report.json").write_text(json.dumps(out, indent=1))
    return out


def stage_export(state: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    vae = _load(state / "vae.pt")["model"]
    dec = _load(state / "decoder.pt")
    if dec:  # the decoder trained further on the frozen encoder (stage decoder)
        vae.update({"taesd_decoder." + k: v for k, v in dec["decoder"].items()})
    lat = _load(state / "latents.pt")
    un = _load(state / "unet.pt")
    cl = _load(state / "classifier.pt")
    vae_scale = lat["std"] * tb.LATENT_SCALE
    vae_shift = -lat["mean"] / vae_scale
    sd = {}
    for k, v in un["ema"].items():
        sd["model.diffusion_model." + k] = v
    for k, v in vae.items():
        if k.startswith("taesd_"):
            sd["first_stage_model." + k] = v
    sd["first_stage_model.vae_scale"] = torch.tensor(vae_scale)
    sd["first_stage_model.vae_shift"] = torch.tensor(vae_shift)
    sd = {k: v.half().contiguous() for k, v in sd.items()}
    for k, v in cl["model"].items():
        sd["classifier." + k] = v.float().contiguous() if v.is_floating_point() else v.contiguous()
    tmp = Path(str(tb.WEIGHTS) + ".tmp")
    save_file(sd, str(tmp))  # first without hashes, to assemble once
    full = tb.checkpoint_state_dict(tmp)
    hashes = tb.part_hashes(full)
    meta = {"comfyui_inverse": "trained testbed: UNet + TAESD-format VAE (fp16) + classifier (fp32); "
                               "scripts/train_testbed.py", "unet_steps": str(un["step"]),
            **{"sha256:" + k: v for k, v in hashes.items()}}
    save_file(sd, str(tmp), metadata=meta)
    ckpt = state / tb.CKPT_NAME
    tb.write_checkpoint(full, ckpt, tb._weights_hash(tmp))
    meta["sha256:checkpoint"] = hashes["checkpoint"] = tb.file_sha256(ckpt)
    ckpt.unlink()
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, tb.WEIGHTS)
    log(f"wrote {tb.WEIGHTS} ({tb.WEIGHTS.stat().st_size / 1e6:.1f} MB); hashes {hashes}")
    return hashes


def setup(args, prog: str, state_name: str, known) -> tuple:
    """The trainers' shared start: find ComfyUI (--comfyui, COMFYUI_PATH, the cache) and import it,
    set torch's threads, make the state folder (--state, else the cache folder's ``state_name``) and
    check the --stages against ``known``. Returns (state folder, stages)."""
    host = provision.find_host({**os.environ, **({"COMFYUI_PATH": args.comfyui} if args.comfyui else {})},
                               provision=False)
    if host is None:
        sys.exit(f"{prog}: no ComfyUI found; pass --comfyui, set COMFYUI_PATH, or run bash scripts/test.sh once "
                 "(it provisions one)")
    os.environ["COMFYUI_PATH"] = str(host.path)
    import make_tiny_checkpoint

    make_tiny_checkpoint._import_comfy(str(host.path))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    state = Path(args.state) if args.state else provision.cache_dir() / state_name
    state.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    for s in stages:
        if s not in known:
            sys.exit(f"unknown stage {s!r}; stages: {','.join(known)}")
    return state, stages


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--unet-steps", type=int, default=1200)
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="train the decoder alone this many more steps after the UNet (the committed model: 0)")
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--state", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    state, stages = setup(args, "train_testbed", "testbed", STAGES)
    if "data" in stages and not tb.HELDOUT.is_file():
        tb.write_heldout()
        log(f"wrote {tb.HELDOUT}")
    if "vae" in stages:
        stage_vae(state, args.vae_steps)
    if "latents" in stages:
        stage_latents(state)
    if "context" in stages:
        stage_context(state)
    if "unet" in stages:
        stage_unet(state, args.unet_steps)
    if "classifier" in stages:
        stage_classifier(state)
    if "decoder" in stages:
        stage_decoder(state, args.decoder_steps)
    if "export" in stages:
        stage_export(state)
        stage_report(state)


if __name__ == "__main__":
    main()
