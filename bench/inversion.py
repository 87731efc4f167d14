"""Inversion benchmark: every method through the real ComfyUI glue (tiny random-weight SD1.5
checkpoint) and through the analytic reference denoiser, at 50 and 4 steps, guidance 1 and 7.5.

    python bench/inversion.py            # full run (a few minutes on a CPU)
    python bench/inversion.py --quick    # under a minute: 10 instead of 50 steps on the ComfyUI path
    python bench/inversion.py --memory   # RNRI's peak memory at 512 px on SD1.5's real-size UNet (3 min)
    python bench/inversion.py --flow     # flow models (SD3/Flux mapping): Euler vs exact solvers, 28 steps
    python bench/inversion.py --flow --flow-steps 8,14,28   # issue 23: with FireFlow and RF-Solver
    python bench/inversion.py --testbed 100   # the trained testbed, 100 held-out images, each its own prompt

For each backend, configuration and method it prints the reconstruction RMSE of z0 (invert, then
sample back with the method's own sampling path at the same guidance), the per-step residual read
two ways (mean|z - f(z)| per element, and the per-image L1 sum ||z - f(z)||_1 that RNRI eq. 6's
"~1 for DDIM" refers to; measured for DDIM too, without counting those calls), model calls per
step, backward passes and seconds; the solvers' labels end in their calls per step. Per
configuration: DDIM's error over the best solver's, and the fidelity issue's goals (Anderson at 3
calls per step: DDIM / 100 at 50 steps, / 10 at 4 steps; at 4 calls and guidance 7.5: / 20).
On the testbed each row also gives the decoded reconstruction's PSNR against the VAE round trip.
The last line is one JSON object with every number. The ComfyUI backend needs a host (see
tests/support/comfy_host.py; skipped with a message otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)
from comfyui_inverse.core import ddim, flow_solvers, inversion, schedule
from comfyui_inverse.core.reference import GaussianMixtureDenoiser, MixturePrior
from support.core_oracles import rnri_objective

# (label, solver, SolverConfig settings, prompt-aware adjustment rounds); the label names the calls per step
SOLVER_RUNS = [
    ("rnri", "rnri", dict(iterations=2), 0),              # eq. 8: 2 fwd+bwd, f(z^2) and the DDIM seed
    ("rnri_jacobian_free", "rnri_jacobian_free", dict(iterations=2), 0),  # the authors' code (n_iters 2): 2 fwd
    ("gradient_descent", "gradient_descent", dict(iterations=2), 0),
    ("fixed_point_3", "fixed_point", dict(iterations=2), 0),
    ("anderson_3", "anderson", dict(iterations=2), 0),
    ("fixed_point_3_tol0", "fixed_point", dict(iterations=2, tol=0.0), 0),   # exactly 3 calls per step
    ("anderson_3_tol0", "anderson", dict(iterations=2, tol=0.0), 0),
    ("fixed_point_4", "fixed_point", dict(iterations=3), 0),
    ("anderson_4", "anderson", dict(iterations=3), 0),
    ("newton_krylov_5", "newton_krylov", dict(iterations=1, krylov=2), 0),
    ("newton_krylov_6", "newton_krylov", dict(iterations=1, krylov=3), 0),
    ("anderson_4_adjust2", "anderson", dict(iterations=3), 2),
]
SOLVERS = {r[0]: r for r in SOLVER_RUNS}
METHODS = ["ddim"] + [r[0] for r in SOLVER_RUNS] + ["fireflow", "rf_solver", "npi", "null_text", "ddpm"]


class Counting:
    """Counts forward calls and the calls made with gradients (each followed by one backward)."""

    def __init__(self, inner):
        self.inner, self.forward, self.backward, self.enabled = inner, 0, 0, True

    def __call__(self, z, t, conds):
        if self.enabled:
            self.forward += 1
            grad_cond = any(getattr(getattr(c, "context", None), "requires_grad", False) or
                            isinstance(c, MixturePrior) and c.means.requires_grad for c in conds)
            if torch.is_grad_enabled() and (z.requires_grad or grad_cond):
                self.backward += 1
        return self.inner(z, t, conds)


def grid_for(ac, steps):
    if steps > 10:
        return schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, steps_offset=1))
    return schedule.TimestepGrid.from_schedule(ac, schedule.timestep_spacing(steps, spacing="trailing"))


def ddim_residual(pred, traj, grid, cond, uncond, guidance):
    ts, ab = grid.timesteps[::-1], grid.alphas_cumprod[::-1]
    res = []
    with torch.no_grad():
        for i in range(1, len(ts)):
            step = inversion._Step(pred, traj[i - 1], ts[i], ab[i - 1], ab[i], cond, uncond, guidance)
            res.append(float((traj[i] - step.f(traj[i])).abs().mean()))
    return sum(res) / len(res)


def run_method(method, pred, z0, grid, backend, guidance):
    """Returns (reconstruction, mean residual or None, seconds)."""
    u = backend["uncond"] if guidance != 1.0 else None
    gc = backend["grad_context"]
    t0 = time.perf_counter()
    residual = None
    result_uncond = u
    if method == "ddim":
        traj = ddim.ddim_invert(pred, z0, grid, "c", u, guidance).trajectory
    elif method in SOLVERS:
        _, solver, settings, adjust = SOLVERS[method]
        cfg = inversion.SolverConfig(**settings)
        if adjust:
            z0 = inversion.prompt_aware_adjust(pred, z0, grid, "c", u, guidance, rounds=adjust)
        res = inversion.iterative_invert(pred, z0, grid, "c", u, guidance, solver, cfg, grad_context=gc)
        traj, rep = res.trajectory, res.report
        residual = sum(rep.residuals) / len(rep.residuals)
    elif method in inversion.FLOW_SOLVERS:  # FireFlow, RF-Solver: sampled back with the same solver
        traj = inversion.invert(pred, z0, grid, "c", u, guidance, method).trajectory
    elif method == "npi":
        traj = ddim.ddim_invert(pred, z0, grid, "c").trajectory
        result_uncond = "c"
    elif method == "null_text":
        traj = ddim.ddim_invert(pred, z0, grid, "c").trajectory
        embs = inversion.null_text_optimize(pred, traj, grid, "c", backend["null_init"](), backend["make_uncond"],
                                            guidance, inner_steps=10, lr=backend["null_lr"],
                                            grad_context=gc).extras["null_embeddings"]
        result_uncond = [backend["make_uncond"](e) for e in embs]
    elif method == "ddpm":
        res = inversion.ddpm_invert(pred, z0, grid, "c", u, guidance, torch.Generator().manual_seed(0))
        xs, maps = res.trajectory, res.extras["noise_maps"]
    seconds = time.perf_counter() - t0
    pred.enabled = False
    try:
        if method == "ddpm":
            rec = inversion.ddpm_sample(pred, xs[-1], grid, maps, "c", u, guidance)[-1]
        elif method in inversion.FLOW_SOLVERS:
            rec = flow_solvers.flow_sample(pred, traj[-1], grid, "c", u, guidance, method)[-1]
        else:
            if method == "ddim":
                residual = ddim_residual(pred, traj, grid, "c", u, guidance)
            g = guidance if result_uncond is not None else 1.0
            rec = ddim.ddim_sample(pred, traj[-1], grid, "c", result_uncond, g)[-1]
    finally:
        pred.enabled = True
    return rec, residual, seconds


def measure(backend, method, grid, guidance):
    def one(pred):
        z0 = backend["z0"](pred)
        counter = Counting(pred)
        rec, res, secs = run_method(method, counter, z0, grid, backend, guidance)
        # the residual both ways: mean|r| per element (what the tolerance reads) and the L1 sum ||r||_1
        # per image (RNRI eq. 6's "~1 for DDIM" reads as this sum)
        extra = {"psnr": backend["psnr"](rec)} if "psnr" in backend else {}
        return {**extra, "rmse": ddim.reconstruction_rmse(rec, z0), "residual": res,
                "residual_l1": None if res is None else res * z0[0].numel(), "forward": counter.forward,
                "backward": counter.backward, "calls_per_step": round(counter.forward / grid.steps, 2),
                "seconds": round(secs, 3)}

    return backend["run"](one)


GOALS = {(50, 1.0): ("anderson_3", 100), (4, 1.0): ("anderson_3", 10), (10, 1.0): ("anderson_3", 100),
         (50, 7.5): ("anderson_4", 20)}


def bench_backend(name, backend, configs, methods=METHODS):
    rows = {}
    for steps, guidance in configs:
        grid = backend["grid"](steps) if "grid" in backend else grid_for(backend["alphas_cumprod"], steps)
        key = f"{steps}steps_w{guidance:g}"
        rows[key] = {}
        for method in methods:
            r = measure(backend, method, grid, guidance)
            rows[key][method] = r
            res = "-" if r["residual"] is None else f"{r['residual']:.2e}"
            l1 = "-" if r["residual_l1"] is None else f"{r['residual_l1']:.2e}"
            psnr = f"  PSNR {r['psnr']:6.2f} dB" if "psnr" in r else ""
            print(f"{name:9s} {key:14s} {method:20s}{psnr} rmse {r['rmse']:.3e}  residual mean {res:>9s} L1 {l1:>9s}  "
                  f"calls/step {r['calls_per_step']:5.2f}  bwd {r['backward']:5d}  {r['seconds']:7.2f} s", flush=True)
        base = rows[key]["ddim"]["rmse"]
        best = min((m for m in rows[key] if m in SOLVERS or m in inversion.FLOW_SOLVERS),
                   key=lambda m: rows[key][m]["rmse"])
        line = f"{name:9s} {key:14s} DDIM / best ({best}) = {base / max(rows[key][best]['rmse'], 1e-30):.1f}x"
        if (steps, guidance) in GOALS and GOALS[(steps, guidance)][0] in rows[key]:
            m, gain = GOALS[(steps, guidance)]
            got = base / max(rows[key][m]["rmse"], 1e-30)
            rows[key]["goal"] = {"method": m, "wanted": gain, "got": round(got, 2), "reached": got >= gain}
            line += f"; goal {m} <= DDIM / {gain}: {got:.1f}x, {'reached' if got >= gain else 'NOT reached'}"
        print(line, flush=True)
    return rows


def reference_backend():
    ac = schedule.scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 16, 16)
    mean = torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.8
    prior_c = MixturePrior.gaussian(mean, 0.7)
    prior_u = MixturePrior.gaussian(torch.zeros(shape[1:], dtype=torch.float64), 1.0)
    model = GaussianMixtureDenoiser({"c": prior_c, "u": prior_u}, ac)
    z0 = mean[None].float() + 0.5 * torch.randn(shape, generator=g)
    return {
        "alphas_cumprod": ac, "uncond": "u", "grad_context": torch.enable_grad, "null_lr": 0.05,
        "z0": lambda pred: z0,
        "null_init": lambda: prior_u.means[0].float(),
        "make_uncond": lambda m: MixturePrior(m[None], prior_u.stds, prior_u.weights),
        "run": lambda fn: fn(model),
    }


def _glue_backend(glue, model, pos, neg, samples, decode=None, target=None) -> dict:
    """The bench's backend dict for a ComfyUI MODEL: runs under the glue's predictor with the
    prompts "c" (pos) and "u" (neg) on ``samples``; with ``decode`` and ``target`` it also reads a
    reconstruction as the mean PSNR of its decoded image against ``target``."""
    state = {}

    def run(fn):
        def inner(pred):
            state["pred"] = pred
            return fn(pred)
        with torch.inference_mode():
            return glue.run_with_predictor(model, {"c": pos, "u": neg}, samples.shape, inner)

    backend = {
        "alphas_cumprod": glue.model_alphas_cumprod(model), "uncond": "u", "null_lr": 0.01,
        "grad_context": lambda: state["pred"].autograd(),
        "z0": lambda pred: pred.process_latent_in(samples.to(pred.device)),
        "null_init": lambda: state["pred"].embedding("u").float().clone(),
        "make_uncond": lambda e: glue.Cond("u", context=e),
        "run": run,
    }
    if decode is not None:
        def psnr(rec):
            with torch.inference_mode():
                img = decode(state["pred"].process_latent_out(rec).cpu()).clamp(0, 1)
            mse = (img.float() - target.float()).pow(2).flatten(1).mean(1)
            return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())

        backend.update(psnr=psnr, images=samples.shape[0])
    return backend


def comfy_backend():
    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        print(f"[bench] {comfy_host.MISSING_REASON}; ComfyUI backend skipped", flush=True)
        return None
    pack = comfy_host.start_inprocess()
    import importlib
    import comfy.sd

    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(11))
        samples = vae.encode(img)
    return _glue_backend(glue, model, pos, neg, samples)


def testbed_backend(count: int, family: str = "sd15"):
    """A trained testbed (scripts/testbed.py; ``family`` "sd3": the SD3-format flow testbed, on its
    own flow grid) on its first ``count`` held-out images, each with its own prompt "a <colour>
    <class>"; reconstructions are also decoded and read as PSNR against the VAE round trip (the best
    a latent inversion can reach)."""
    from support import comfy_host

    if not comfy_host.HOST_FOUND:
        print(f"[bench] {comfy_host.MISSING_REASON}; testbed skipped", flush=True)
        return None
    pack = comfy_host.start_inprocess()
    import importlib
    import testbed as tb

    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    t = comfy_host.load_testbed(family)
    model, vae = t["model"], t["vae"]
    prompts = [tb.prompt(int(c), int(k)) for c, k in zip(t["labels"][:count], t["colours"][:count])]
    pos = comfy_host.batched_cond(t["clip"], prompts)
    neg = comfy_host.batched_cond(t["clip"], [""] * count)
    with torch.inference_mode():
        samples = vae.encode(t["images"][:count].permute(0, 2, 3, 1))
        target = vae.decode(samples)
    backend = _glue_backend(glue, model, pos, neg, samples, decode=vae.decode, target=target)
    if family == "sd3":
        backend["grid"] = lambda steps: glue.make_grid(model, steps)
    return backend


TESTBED_METHODS = ["ddim", "fixed_point_3", "anderson_3", "anderson_4", "newton_krylov_5", "rnri",
                   "rnri_jacobian_free", "npi", "null_text", "ddpm"]


FLOW_METHODS = ["ddim", "fixed_point_3", "anderson_3", "anderson_4", "newton_krylov_5", "fireflow", "rf_solver", "ddpm"]


def _flow_measure(pred, z0, grid, guidance, grad_context=torch.enable_grad) -> dict:
    """Every FLOW_METHODS entry: invert, sample back with its own path; RMSE, calls per step, seconds."""
    counting = Counting(pred)
    backend = {"uncond": "u", "grad_context": grad_context}
    out = {}
    for method in FLOW_METHODS:
        counting.forward = counting.backward = 0
        rec, residual, seconds = run_method(method, counting, z0, grid, backend, guidance)
        out["euler" if method == "ddim" else method] = {
            "rmse": ddim.reconstruction_rmse(rec, z0), "calls_per_step": counting.forward / grid.steps,
            "seconds": round(seconds, 3)}
    return out


def flow_bench(quick: bool, steps_list=(28,)) -> dict:
    """Euler (DDIM-equivalent) inversion against the exact solvers on flow models at 28 steps: the
    analytic Gaussian reference in flow parameterisation (core/flow.py, SD3's shift-3 levels), and
    the tiny random-weight SD3 (CFG 1 and 3.5) and Flux (distilled guidance 3.5 in the conditioning)
    through the real ComfyUI glue. Goal (flow issue): an exact solver at <= 3 calls per step within
    Euler inversion's error / 100. ``steps_list``: the step counts (issue 23 compares 8, 14 and 28:
    FireFlow and RF-Solver are sampled back with their own solver, the rest with Euler; calls per
    step count the inversion only)."""
    res = {}
    for steps in steps_list:
        res.update(_flow_bench_at(steps, len(steps_list) > 1))
    return res


def _flow_bench_at(steps: int, tag: bool) -> dict:
    from comfyui_inverse.core.flow import FlowPredictor, discrete_flow_sigmas, gaussian_flow_denoiser

    res = {}
    sig = discrete_flow_sigmas()
    g = torch.Generator().manual_seed(0)
    mean = {"c": torch.randn(4, 16, 16, generator=g, dtype=torch.float64) * 0.5,
            "u": torch.zeros(4, 16, 16, dtype=torch.float64)}
    pred = FlowPredictor(gaussian_flow_denoiser(mean, 0.7), sig)
    z0 = (mean["c"][None] + 0.7 * torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)).float()
    grid = schedule.TimestepGrid.from_schedule(schedule.alphas_cumprod_from_sigmas(sig),
                                               schedule.timestep_spacing(steps, len(sig), "trailing"))
    at = f"_{steps}" if tag else ""
    for w in (1.0, 3.5):
        res[f"reference_w{w}{at}"] = _flow_measure(pred, z0, grid, w)
    from support import comfy_host

    if comfy_host.HOST_FOUND:
        import importlib

        pack = comfy_host.start_inprocess()
        glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
        for kind, guidances in (("sd3", (1.0, 3.5)), ("flux", (1.0,))):
            model, cond = comfy_host.tiny_flow_model(kind)
            conds = {"c": cond(), "u": cond()}
            x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
            grid = glue.make_grid(model, steps)
            for w in guidances:
                def fn(p):
                    return _flow_measure(p, p.process_latent_in(x), grid, w, p.autograd)
                with torch.inference_mode():
                    res[f"comfy_{kind}_w{w}{at}"] = glue.run_with_predictor(model, conds, x.shape, fn)
    for name, rows in res.items():
        for method, r in rows.items():
            print(f"flow {name:18s} {method:16s} rmse {r['rmse']:.3e}  calls/step {r['calls_per_step']:5.2f}  "
                  f"{r['seconds']:7.2f} s", flush=True)
        best = min((m for m in rows if m not in ("euler", "ddpm") and rows[m]["calls_per_step"] <= 3.0 + 1e-9),
                   key=lambda m: rows[m]["rmse"])
        ratio = rows["euler"]["rmse"] / max(rows[best]["rmse"], 1e-30)
        rows["goal"] = {"best_at_3_calls": best, "euler_over_best": ratio, "reached": ratio >= 100}
        print(f"flow {name:18s} Euler / best at <= 3 calls ({best}) = {ratio:.1f}x; goal 100x: "
              f"{'reached' if ratio >= 100 else 'NOT reached'}", flush=True)
    return res


RNRI_MEMORY_MODES = ("forward", "joint", "per_branch")


def rnri_memory_worker(size: int, mode: str, save_to: str) -> dict:
    """In this (fresh) process: SD1.5's real UNet (ComfyUI's SD15 class, 860M random weights,
    float32) through the glue, one RNRI gradient dF/dz at guidance 7.5 on a size x size image's
    latent, measured on its second run: "joint" differentiates the CFG objective through one
    batched [prompt, negative] call (what solve_rnri did before), "per_branch" is what solve_rnri
    does now (core/inversion.py _residual), "forward" one plain batched call for scale. Below
    512 px the measured run is the second (first calls build oneDNN primitives that stay); at 512
    px and above the first, to save time (those caches are small against the graph there)."""
    import contextlib
    import importlib

    from support import comfy_host
    from support.peak_memory import Peak, SavedTensors

    pack = comfy_host.start_inprocess()
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    inv = importlib.import_module(pack.__name__ + ".core.inversion")
    model = comfy_host.sd15_sized_model()
    g = torch.Generator().manual_seed(0)
    conds = {name: [[torch.randn(1, 77, 768, generator=g), {}]] for name in ("c", "u")}
    z = torch.randn(1, 4, size // 8, size // 8, generator=g)

    def measure(pred):
        grid = glue.make_grid(model, 50)
        ts, ab = grid.timesteps[::-1], grid.alphas_cumprod[::-1]
        step = inv._Step(pred, z, ts[10], ab[9], ab[10], "c", "u", 7.5)

        @contextlib.contextmanager
        def grad_context():
            with pred.autograd():
                yield

        def once():
            if mode == "forward":
                with torch.no_grad():
                    return step.f(z)
            if mode == "joint":
                with grad_context():
                    zz = z.clone().requires_grad_(True)
                    F, _ = rnri_objective(step, zz, 0.1)
                    (grad,) = torch.autograd.grad(F.sum(), zz)
                return grad
            r, vjp = inv._residual(step, z, grad_context)
            return vjp(torch.sign(r)) + 0.1 * step.prior_grad(z)

        if size < 512:  # first calls build oneDNN primitives that stay: measure a second run
            once()
        t0 = time.perf_counter()
        with Peak() as peak, SavedTensors(exclude=list(model.model.parameters())) as saved:
            out = once()
        torch.save(out, save_to)
        return {"peak_rss_growth_mb": peak.mb, "autograd_saved_peak_mb": round(saved.peak / 2 ** 20, 1),
                "seconds": round(time.perf_counter() - t0, 2), "unet_calls": pred.calls}

    with torch.inference_mode():
        return glue.run_with_predictor(model, conds, z.shape, measure)


def rnri_memory(quick: bool) -> dict:
    """RNRI's peak at 512 px (256 with --quick): each mode of :func:`rnri_memory_worker` in a
    fresh process; the two gradients must agree."""
    import subprocess
    import tempfile

    from support import comfy_host
    from support.peak_memory import FRESH_ENV

    if not comfy_host.HOST_FOUND:
        print(f"[bench] {comfy_host.MISSING_REASON}; RNRI memory skipped", flush=True)
        return {"skipped": comfy_host.MISSING_REASON}
    size = 256 if quick else 512
    res, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in RNRI_MEMORY_MODES:
            path = f"{tmp}/{mode}.pt"
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", f"{size}:{mode}:{path}"],
                                  capture_output=True, text=True, env=FRESH_ENV)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            grads[mode] = torch.load(path)
    for mode in res:
        res[mode]["peak_vs_joint"] = round(res[mode]["peak_rss_growth_mb"] / res["joint"]["peak_rss_growth_mb"], 2)
    res["per_branch_vs_joint_gradient_rel_diff"] = float((grads["per_branch"] - grads["joint"]).norm()
                                                         / grads["joint"].norm())
    print(f"rnri memory {size}px: " + json.dumps(res), flush=True)
    return {f"{size}px": res}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 instead of 50 steps on the ComfyUI path")
    ap.add_argument("--backend", choices=["all", "reference", "comfy"], default="all")
    ap.add_argument("--memory", action="store_true",
                    help="only RNRI's memory: one gradient through SD1.5's real-size UNet at 512 px")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flow", action="store_true", help="only the flow models (28 steps): Euler vs exact solvers")
    ap.add_argument("--flow-steps", default="28", metavar="N,...",
                    help="--flow: the step counts (issue 23: 8,14,28)")
    ap.add_argument("--testbed", type=int, default=0, metavar="N",
                    help="only the trained testbed, on its first N held-out images (the README's table: 100)")
    ap.add_argument("--testbed-family", choices=["sd15", "sd3"], default="sd15",
                    help="--testbed: the SD1.5 testbed, or the SD3-format flow testbed (issue 23: FireFlow, RF-Solver "
                         "and the exact solvers against Euler; default configs 8:1,14:1,28:1)")
    ap.add_argument("--configs", default=None, metavar="STEPS:GUIDANCE,...",
                    help="the (steps, guidance) configurations to run, e.g. 4:1,4:7.5 (default: 50:1,50:7.5,4:1,4:7.5)")
    ap.add_argument("--methods", default=None, metavar="NAME,...",
                    help="--testbed: only these methods (default: all of the family's; SD1.5: "
                         + ", ".join(TESTBED_METHODS) + "; SD3: " + ", ".join(FLOW_METHODS) + ")")
    args = ap.parse_args(argv)
    if args.memory_worker:
        size, mode, path = args.memory_worker.split(":", 2)
        print(json.dumps(rnri_memory_worker(int(size), mode, path)))
        return
    torch.manual_seed(0)
    out = {"quick": args.quick, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.memory:
        out["rnri_memory"] = rnri_memory(args.quick)
        print(json.dumps(out))
        return
    if args.flow:
        out["flow"] = flow_bench(args.quick, [int(v) for v in args.flow_steps.split(",")])
        print(json.dumps(out, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))
        return
    full = [(50, 1.0), (50, 7.5), (4, 1.0), (4, 7.5)]
    if args.configs:
        full = [(int(c.split(":")[0]), float(c.split(":")[1])) for c in args.configs.split(",")]
    if args.testbed:
        names = TESTBED_METHODS if args.testbed_family == "sd15" else FLOW_METHODS
        chosen = [m for m in (args.methods or "").split(",") if m] or names
        if any(m not in names for m in chosen):
            ap.error(f"--methods: choose from {', '.join(names)}; got {args.methods!r}")
        backend = testbed_backend(args.testbed, args.testbed_family)
        if backend is not None and args.testbed_family == "sd3":
            configs = full if args.configs else [(8, 1.0), (14, 1.0), (28, 1.0)]
            out["testbed_sd3"] = bench_backend("sd3bed", backend, configs, chosen)
        elif backend is not None:
            configs = [(10, 1.0), (10, 7.5), (4, 1.0), (4, 7.5)] if args.quick and not args.configs else full
            out["testbed"] = bench_backend("testbed", backend, configs, chosen)
        print(json.dumps(out, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))
        return
    if args.backend in ("all", "reference"):
        ref = reference_backend()
        out["reference"] = bench_backend("reference", ref, full)
    if args.backend in ("all", "comfy"):
        backend = comfy_backend()
        if backend is not None:
            configs = [(10, 1.0), (10, 7.5), (4, 1.0), (4, 7.5)] if args.quick else full
            out["comfy_tiny_sd15"] = bench_backend("comfy", backend, configs)
    print(json.dumps(out, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))


if __name__ == "__main__":
    main()
