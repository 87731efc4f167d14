"""Decoder-inversion benchmark on the trained TAEF2 autoencoder (../shared/assets/taef2) and
scikit-image's bundled colour photos.

    python bench/decoder_inversion.py           # 192x192, 2 photos, 20/50/100 iterations (~10 min on 2 CPU cores)
    python bench/decoder_inversion.py --quick   # under a minute: 80x80, 1 photo, 10/20/40 iterations
    python bench/decoder_inversion.py --testbed 100   # the trained testbed's decoder, 100 held-out images

Two protocols, as in the paper and beyond it:
  (a) known latent: x = D(z_gt) with z_gt = E(photo); NMSE ||z - z_gt||^2 / ||z_gt||^2 in dB;
  (b) real photo: PSNR of D(z) against the photo.
Methods: encoder only, gradient-free fixed point (eq. 8), momentum (inertial KM, eq. 10-11), the
authors' Adam-moment variant, and the gradient-based baseline (Adam through the decoder), in
float32 and float16. Every method runs in a fresh subprocess so that its peak memory (max RSS
growth over the loaded models and data) is its own. Last line: one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)

METHODS = {
    "gradient_free_fixed_point": ("forward_step", {"rho": 0.2}),
    "gradient_free_momentum": ("inertial_km", {"alpha": 0.3, "lam": 0.1}),
    "gradient_free_adam": ("adam_forward_step", {"rho_max": 0.01}),
    "gradient_based": ("gradient_based", {"lr": 0.01}),
}


def worker(spec: dict) -> dict:
    import torch

    from comfyui_inverse.core import decoder_inversion as di
    from support import taef2

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[spec["precision"]]
    if spec.get("model") == "testbed":
        import testbed

        enc, dec = taef2.load_testbed(dtype)
        photo = testbed.load_heldout()[0][:spec["size"]]  # size = number of held-out 48 px images
    else:
        enc, dec = taef2.load(dtype)
        photo = taef2.photo(spec["photo"], spec["size"])
    E = lambda x: enc(x.to(dtype)).float()  # noqa: E731
    D = lambda z: dec(z.to(dtype)).float()  # noqa: E731
    with torch.no_grad():
        z_gt = E(photo)
        x_known = D(z_gt).clamp(0, 1)
        E(D(z_gt))  # warm-up, so that the RSS baseline holds the models and one forward pass
    x = x_known if spec["protocol"] == "known_latent" else photo
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    iters = max(spec["checkpoints"])
    t0 = time.perf_counter()
    if spec["method"] == "encoder":
        with torch.no_grad():
            z = E(x)
            d = D(z)
        rec = di.Record(recon=[float((d - x).pow(2).mean().sqrt())], nmse_db=[di.nmse_db(z, z_gt)])
        checkpoints = [0]
    else:
        fn_name, kw = METHODS[spec["method"]]
        fn = getattr(di, fn_name)
        z, rec = fn(E, D, x, iterations=iters, z_gt=z_gt, **kw)
        checkpoints = spec["checkpoints"]
    seconds = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024.0
    out = {"seconds": round(seconds, 3), "peak_mem_mb": round(peak_mb, 1), "at": {}}
    for k in checkpoints:
        r = rec.recon[min(k, len(rec.recon) - 1)]
        nm = rec.nmse_db[min(k, len(rec.nmse_db) - 1)]
        known = spec["protocol"] == "known_latent"
        out["at"][str(k)] = {"psnr_db": None if not math.isfinite(r) or r <= 0 else round(20 * math.log10(1 / r), 3),
                             "nmse_db": round(nm, 3) if known and math.isfinite(nm) else None,
                             "seconds": round(seconds * k / max(1, iters), 3)}
    return out


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--testbed", type=int, default=0, metavar="N",
                    help="the trained testbed's TAESD-format decoder on N held-out 48 px images (one batch) "
                         "instead of TAEF2 on photos")
    ap.add_argument("--methods", default=None, help="a comma list of methods (encoder and METHODS' names); all if omitted")
    ap.add_argument("--protocols", default="known_latent,real_photo", help="known_latent and/or real_photo")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from support import taef2

    if not args.testbed and not taef2.available():
        sys.exit(f"TAEF2 weights not found at {taef2.ASSETS}")
    size, photos, checkpoints = (80, ["coffee"], [10, 20, 40]) if args.quick else \
        (192, ["astronaut", "coffee"], [20, 50, 100])
    model = "taef2"
    if args.testbed:
        model, size, photos = "testbed", args.testbed, ["heldout"]
    runs = [(m, "fp32") for m in ["encoder", *METHODS]]
    if args.methods:
        unknown = set(args.methods.split(",")) - {m for m, _ in runs}
        if unknown:
            sys.exit(f"--methods: unknown {sorted(unknown)}; choose from encoder, {', '.join(METHODS)}")
        runs = [r for r in runs if r[0] in args.methods.split(",")]
    if not args.testbed:  # half precision on this CPU is emulated; the testbed protocol measures float32
        runs += [("gradient_free_adam", "fp16"), ("gradient_based", "fp16")]
    results = {"model": model, "size": size, "photos": photos, "checkpoints": checkpoints, "runs": {}}
    for protocol in args.protocols.split(","):
        for method, precision in runs:
            key = f"{protocol}/{method}/{precision}"
            per_photo = [run_worker({"model": model, "method": method, "precision": precision, "photo": ph, "size": size,
                                     "protocol": protocol, "checkpoints": checkpoints}) for ph in photos]
            agg = {"seconds": round(sum(r["seconds"] for r in per_photo) / len(per_photo), 3),
                   "peak_mem_mb": round(max(r["peak_mem_mb"] for r in per_photo), 1), "at": {}}
            for k in per_photo[0]["at"]:
                vals = {m: [r["at"][k][m] for r in per_photo] for m in ("psnr_db", "nmse_db", "seconds")}
                agg["at"][k] = {m: (None if any(v is None for v in vs) else round(sum(vs) / len(vs), 3))
                                for m, vs in vals.items()}
            results["runs"][key] = agg
            cells = "  ".join(f"@{k}: PSNR {v['psnr_db']} dB, NMSE {v['nmse_db']} dB" for k, v in agg["at"].items())
            print(f"{protocol:12s} {method:26s} {precision}  {agg['seconds']:7.2f} s  peak +{agg['peak_mem_mb']:7.1f} MB  "
                  f"{cells}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
