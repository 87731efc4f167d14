"""ProxEdit benchmark through the real ComfyUI glue (tiny random-weight SD1.5 checkpoint).

    python bench/editing.py            # 50 steps
    python bench/editing.py --quick    # 20 steps, under a minute
    python bench/editing.py --testbed 100   # ProxEdit's claim on the trained testbed (100 held-out items)

Prints, for a negative-prompt inversion edited toward another prompt:
- UNet calls, batch elements and seconds of a ProxEdit run against a plain CFG sampling run of the
  same steps (goal: at most 1.1x, since both evaluate two branches per step); the same for ProxEdit
  with prompt-to-prompt (word swap, LocalBlend), with MasaCtrl (the tiny UNet's layers 2-3 from
  step 4), and for the ProxEdit GUIDER under SamplerCustomAdvanced (euler);
- the distance of the quantile-1 edit to the inversion's reconstruction (the method's defining
  property: exactly 0);
- the share of latent elements changed by more than 5% of the reconstruction's standard deviation,
  and the mean change relative to that deviation, as functions of the quantile, for hard and soft
  thresholding.
Last line: one JSON object with every number.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)


# class swaps between similar shapes (Fashion-MNIST labels): sneaker <-> sandal, ankle boot -> sneaker,
# t-shirt <-> shirt, pullover <-> coat
CLASS_SWAPS = {7: 5, 5: 7, 9: 7, 0: 6, 6: 0, 2: 4, 4: 2}


def testbed_protocol(count: int, steps: int, methods, kinds=("colour", "class"), family: str = "sd15") -> dict:
    """ProxEdit's claim on the trained testbed: for the first ``count`` held-out items, a colour swap
    (colour + 3 of the six: red -> green, orange -> blue, ...) and, for the classes with a similar
    shape, a class swap; per method: edit success (measured colour / the classifier's class),
    structure kept (silhouette IoU with the source) and background kept (PSNR outside it)."""
    import testbed as tb
    from support.testbed_runs import Testbed, edit_measures

    bed = Testbed(family)
    items = list(range(count))
    colour_new = [(int(bed.colours[i]) + 3) % len(tb.COLOURS) for i in items]
    swap_items = [i for i in items if int(bed.labels[i]) in CLASS_SWAPS]
    class_new = [CLASS_SWAPS[int(bed.labels[i])] for i in swap_items]
    out = {"items": count, "steps": steps, "class_swaps": len(swap_items)}
    for method in methods:
        row = {}
        for kind, idx, targets, want in (
                ("colour", items, bed.prompts(items, colours=colour_new), {"want_colour": colour_new}),
                ("class", swap_items, bed.prompts(swap_items, classes=class_new),
                 {"want_class": class_new, "classifier": bed.classifier})):
            if not idx or kind not in kinds:
                continue
            t0 = time.perf_counter()
            if method in Testbed.FLOW_EDIT_METHODS:
                edited, source = bed.flow_edit(idx, targets, method, steps)
            else:
                edited, source = bed.edit(idx, targets, method, steps)
            rows = edit_measures(edited, source, **want)
            ok = "colour_ok" if kind == "colour" else "class_ok"
            row[kind] = {"success": round(sum(r[ok] for r in rows) / len(rows), 3),
                         "iou": round(sum(r["iou"] for r in rows) / len(rows), 3),
                         "background_psnr": round(sum(r["background_psnr"] for r in rows) / len(rows), 2),
                         "seconds": round(time.perf_counter() - t0, 1)}
            label = "testbed" if family == "sd15" else "sd3bed"
            print(f"{label} {method:14s} {kind:6s} swap ({len(idx):3d} items): success {row[kind]['success']:.3f}  "
                  f"IoU {row[kind]['iou']:.3f}  background PSNR {row[kind]['background_psnr']:6.2f} dB  "
                  f"{row[kind]['seconds']:7.1f} s", flush=True)
        out[method] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--testbed", type=int, default=0, metavar="N",
                    help="only the trained testbed's protocol, on its first N held-out items (README: 100)")
    ap.add_argument("--methods", default=",".join(("prox_npi_p2p", "prox_npi", "npi", "prox_ddpm", "prox_masactrl",
                                                      "null_text_p2p")),
                    help="testbed: the editing methods (tests/support/testbed_runs.py Testbed.edit)")
    ap.add_argument("--kinds", default="colour,class", help="testbed: which edits, colour swaps and/or class swaps")
    ap.add_argument("--family", choices=["sd15", "sd3"], default="sd15",
                    help="testbed: the SD1.5 testbed, or the SD3-format flow testbed (issue 23; methods flowedit, "
                         "flowedit_masked, rf_inversion, prox_exact, ...)")
    args = ap.parse_args(argv)
    from support import comfy_host

    if args.testbed:
        if not comfy_host.HOST_FOUND:
            sys.exit(comfy_host.MISSING_REASON)
        res = testbed_protocol(args.testbed, 20 if args.quick else 50, args.methods.split(","), args.kinds.split(","),
                               args.family)
        print(json.dumps(res))
        return

    if not comfy_host.HOST_FOUND:
        sys.exit(comfy_host.MISSING_REASON)
    pack = comfy_host.start_inprocess()
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    inv = importlib.import_module(pack.__name__ + ".nodes.inversion")
    ed = importlib.import_module(pack.__name__ + ".nodes.editing")
    steps = 20 if args.quick else 50
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        enc = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
        src, tar, neg = enc("a photograph of an astronaut"), enc("a photograph of a robot"), enc("")
        lat = {"samples": vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(11)))}
        npi = inv.NegativePromptInversion.execute(model, src, steps, "auto", latent=lat).args[0]

    batches: list[int] = []

    def hook(module, a, out):
        if isinstance(module, UNetModel):
            batches.append(int(a[0].shape[0]))

    h = torch.nn.modules.module.register_module_forward_hook(hook)

    def run(fn):
        batches.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        return out, {"unet_calls": len(batches), "batch_elements": sum(batches),
                     "seconds": round(time.perf_counter() - t0, 3)}

    def prox(q, kind="hard", **kw):
        return ed.ProxEdit.execute(model, npi, tar, "source", 7.5, kind, q, 0.0, 1, kw.get("ig", 0.0), kw.get("rg", 0.0),
                                   400, 0.0, 0, negative=neg).args[0]["samples"]

    results = {"steps": steps}
    rec, cost_rec = run(lambda: inv.SampleFromInversion.execute(model, src, npi, 1.0, 0).args[0]["samples"])
    _, cost_cfg = run(lambda: inv.SampleFromInversion.execute(model, tar, npi, 7.5, 0, negative=neg).args[0]["samples"])
    _, cost_prox = run(lambda: prox(0.7, ig=0.5, rg=0.1))
    with torch.inference_mode():
        p2p = ed.PromptToPrompt.execute(clip, "a photograph of an astronaut", "a photograph of a robot", "replace", 0.8,
                                        0.5, "", True, "", 0.3, 0.2).args[0]
        masa = ed.MasaCtrl.execute(4, 2, "source", "none").args[0]
    prox_args = dict(base="source", guidance=7.5, prox="hard", quantile=0.7, fixed_threshold=0.0, dilation=1,
                     inversion_guidance=0.5, reconstruction_guidance=0.1, t_rec=400, source_null_mix=0.0)
    controlled = {}
    for name, control in (("proxedit_p2p", p2p), ("proxedit_masactrl", masa)):
        _, controlled[name] = run(lambda: ed.ProxEdit.execute(model, npi, tar, skip_steps=0, negative=neg,
                                                              attention_control=control, **prox_args))

    with torch.inference_mode():
        sig = inv.NegativePromptInversion.execute(model, src, steps, "auto", latent=lat).args
    from comfy_extras import nodes_custom_sampler as cs

    def guided_only():
        guider = ed.ProxEditGuider.execute(model, npi, tar, negative=neg, attention_control=p2p, **prox_args).args[0]
        return cs.SamplerCustomAdvanced().sample(cs.DisableNoise().get_noise()[0], guider,
                                                 cs.KSamplerSelect().get_sampler("euler")[0], sig[2], sig[1])

    _, controlled["guider_p2p_euler"] = run(guided_only)
    h.remove()
    results["cost"] = {"cfg": cost_cfg, "proxedit": cost_prox, **controlled,
                       "ratio_batch_elements": round(cost_prox["batch_elements"] / cost_cfg["batch_elements"], 3),
                       "ratio_seconds": round(cost_prox["seconds"] / cost_cfg["seconds"], 3)}
    for name, c in controlled.items():
        results["cost"][f"ratio_batch_elements_{name}"] = round(c["batch_elements"] / cost_cfg["batch_elements"], 3)
        results["cost"][f"ratio_seconds_{name}"] = round(c["seconds"] / cost_cfg["seconds"], 3)
    print(f"CFG run: {cost_cfg}\nProxEdit (NPI, hard, q 0.7, inversion+reconstruction guidance): {cost_prox}\n"
          f"ratio (batch elements): {results['cost']['ratio_batch_elements']}, ratio (seconds, noisy): "
          f"{results['cost']['ratio_seconds']}", flush=True)
    for name, c in controlled.items():
        print(f"{name}: {c}; ratio to CFG (batch elements) {results['cost'][f'ratio_batch_elements_{name}']}, "
              f"(seconds) {results['cost'][f'ratio_seconds_{name}']}", flush=True)
    with torch.inference_mode():
        exact = {k: float((prox(1.0, k) - rec).abs().max()) for k in ("hard", "soft")}
    results["quantile_1_max_abs_diff_to_reconstruction"] = exact
    print(f"quantile 1: max |edit - reconstruction| = {exact}", flush=True)
    share, mean = {}, {}
    scale = float(rec.std())
    for kind in ("hard", "soft"):
        share[kind], mean[kind] = {}, {}
        for q in (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.0):
            with torch.inference_mode():
                diff = (prox(q, kind) - rec).abs()
            share[kind][str(q)] = round(float((diff > 0.05 * scale).float().mean()), 4)
            mean[kind][str(q)] = round(float(diff.mean()) / scale, 4)
        print(f"{kind}: share of latent elements changed by > 5% of std: {share[kind]}", flush=True)
        print(f"{kind}: mean |change| / std: {mean[kind]}", flush=True)
    results["share_changed_vs_quantile"] = share
    results["mean_change_vs_quantile"] = mean
    print(json.dumps(results))


if __name__ == "__main__":
    main()
