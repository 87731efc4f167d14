"""RNRI step by step on the trained testbed: does an eq. 8 iterate ever beat the DDIM seed?

    python bench/rnri_steps.py               # 8 held-out images, 50 and 4 steps, guidance 1 (about 5 minutes on 2 cores)
    python bench/rnri_steps.py --images 4 --steps 50 --iterations 2,5

Each inversion step of :func:`~comfyui_inverse.core.inversion.solve_rnri` evaluates the residual
mean|z - f(z)| at z_s, at the DDIM seed f(z_s), and at each eq. 8 iterate (``report.history``, in
that order), and returns the best of them. For every configuration this prints: the share of steps
at which the best eq. 8 iterate beats the DDIM seed, the median over steps of (best iterate's
residual / the seed's), and the reconstruction PSNR against the VAE round trip (the same reading as
``bench/inversion.py --testbed``). With lambda 0 (no prior term) as a control. The last line is one
JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import _boot  # noqa: F401
import inversion as inv_bench
from comfyui_inverse.core import ddim, inversion


def configure(pred, backend, z0, grid, iterations: int, lam: float) -> dict:
    cfg = inversion.SolverConfig(iterations=iterations, lam=lam)
    t0 = time.perf_counter()
    res = inversion.iterative_invert(pred, z0, grid, "c", None, 1.0, "rnri", cfg,
                                     grad_context=backend["grad_context"])
    seconds = time.perf_counter() - t0
    wins, ratios = 0, []
    for hist in res.report.history:
        seed, iterates = hist[1], hist[2:]
        best = min(iterates) if iterates else float("inf")
        wins += best < seed
        ratios.append(best / max(seed, 1e-30))
    rec = ddim.ddim_sample(pred, res.trajectory[-1], grid, "c", None, 1.0)[-1]
    return {"steps_won": wins, "steps": len(res.report.history),
            "median_ratio": statistics.median(ratios) if ratios else None,
            "psnr": backend["psnr"](rec), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", default="50,4")
    ap.add_argument("--iterations", default="2,5")
    args = ap.parse_args()
    backend = inv_bench.testbed_backend(args.images)
    if backend is None:
        raise SystemExit("no ComfyUI host: see tests/support/comfy_host.py")
    out = {}

    def one(pred):
        z0 = backend["z0"](pred)
        for steps in (int(s) for s in args.steps.split(",")):
            grid = inv_bench.grid_for(backend["alphas_cumprod"], steps)
            runs = [(k, 0.1) for k in (int(i) for i in args.iterations.split(","))] + [(2, 0.0)]
            for k, lam in runs:
                r = configure(pred, backend, z0, grid, k, lam)
                key = f"{steps}steps_K{k}_lam{lam:g}"
                out[key] = r
                print(f"rnri {steps:2d} steps, {k} eq. 8 iterations, lambda {lam:g}: an iterate beats the DDIM "
                      f"seed at {r['steps_won']:2d} of {r['steps']} steps; best iterate / seed residual "
                      f"(median) {r['median_ratio']:.2f}; PSNR {r['psnr']:.2f} dB; {r['seconds']} s", flush=True)
        return out

    backend["run"](one)
    print(json.dumps({"images": args.images, "rnri_steps": out}))


if __name__ == "__main__":
    main()
