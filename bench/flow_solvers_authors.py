"""RF-Solver and FireFlow against the authors' code: RF-Solver's ``denoise``
(wangjiangshan0725/RF-Solver-Edit, FLUX_Image_Edit/src/flux/sampling.py) and FireFlow's
``denoise_fireflow`` (HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing,
src/flux/sampling.py), run unmodified on the tests' tiny random Flux and SD3 (ComfyUI's models
behind the stand-in ``model`` their loops call), against the pack's solvers (core/flow_solvers.py,
through the glue's predictor) on the same levels, latents and conditionings.

    python bench/flow_solvers_authors.py --rf-solver RF-Solver-Edit/FLUX_Image_Edit/src/flux/sampling.py \\
        --fireflow FireFlow-.../src/flux/sampling.py

Their files import only Flux's model and conditioner types besides torch and einops; those two
names are stubbed while a file loads. Their feature sharing is off (``inject_step`` 0), which
leaves the plain solver. Three comparisons per model and solver, on the model's own 28-step grid
(ComfyUI's sigmas, which stop at s <= 0.99 where the authors' Flux schedule starts at s = 1):

- sampling from the noisiest level to the clean one: the same algorithm, so the difference is
  float32 rounding;
- inversion from the first noisy level up: the same;
- inversion from the clean latent: the first step differs by design. The authors call Flux at
  s = 0; the pack calls the model there as DDIM inversion does (the clean latent at the next level),
  since an epsilon model predicts nothing at the clean level and the pack runs these solvers on
  every family.
"""
from __future__ import annotations

import argparse
import importlib
import types

import torch

from _authors import load, pack as _pack, unpack as _unpack
import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)


def _load(path: str, name: str):
    """Their sampling.py as ``name``.sampling, with its package's ``model`` and
    ``modules.conditioner`` stubbed while it loads."""
    stubs = {name: types.ModuleType(name), f"{name}.model": types.ModuleType(f"{name}.model"),
             f"{name}.modules": types.ModuleType(f"{name}.modules"),
             f"{name}.modules.conditioner": types.ModuleType(f"{name}.modules.conditioner")}
    stubs[name].__path__ = []
    stubs[f"{name}.modules"].__path__ = []
    stubs[f"{name}.model"].Flux = type("Flux", (), {})
    stubs[f"{name}.modules.conditioner"].HFEmbedder = type("HFEmbedder", (), {})
    return load(path, f"{name}.sampling", stubs)


class _Model:
    """Their ``model(img=, img_ids=, txt=, txt_ids=, y=, timesteps=, guidance=, info=)`` over a
    ComfyUI diffusion model: Flux (timestep = s, guidance embedded) or SD3 (timestep 1000 s, no
    guidance); returns (packed velocity, info). Counts the calls."""

    def __init__(self, dm, shape, flux: bool):
        self.dm, self.shape, self.flux, self.calls = dm, shape, flux, 0

    def __call__(self, img, img_ids, txt, txt_ids, y, timesteps, guidance, info):
        self.calls += 1
        H, W = self.shape[-2:]
        x = _unpack(img, H, W)
        if self.flux:
            out = self.dm(x, timesteps.float(), context=txt, y=y, guidance=guidance.float())
        else:
            out = self.dm(x, 1000.0 * timesteps.float(), context=txt, y=y)
        return _pack(out.float()), info


def compare(kind: str, authors: dict, pack, comfy_host, steps: int = 28, guidance: float = 3.5) -> dict:
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    fs = importlib.import_module(pack.__name__ + ".core.flow_solvers")
    steps_mod = importlib.import_module(pack.__name__ + ".core.steps")
    model, cond = comfy_host.tiny_flow_model(kind)
    c = cond()
    flux = kind == "flux"
    named = {"c": glue.with_guidance(c, guidance) if flux else c}
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 16, 16, generator=g)  # model space, flow coordinates
    xT = torch.randn(1, 16, 16, 16, generator=g)
    grid = glue.make_grid(model, steps)
    sig = [float(v) for v in glue.grid_sigmas(model, grid)]  # noisy to clean, ending at 0
    ab = list(grid.alphas_cumprod)
    ts = list(grid.timesteps)
    txt, vec = c[0][0], c[0][1]["pooled_output"]
    H, W = x0.shape[-2:]
    ids = torch.zeros(H * W // 4, 3)
    rows = {}
    for method, (fn, label) in authors.items():
        def theirs(x, timesteps, inverse):
            m = _Model(model.model.diffusion_model, x0.shape, flux)
            with torch.inference_mode():
                out, _ = fn(m, _pack(x), ids, txt, torch.zeros(txt.shape[1], 3), vec, timesteps, inverse,
                            {"inject_step": 0}, guidance)
            return _unpack(out, H, W), m.calls

        def ours(run):
            with torch.inference_mode():
                return glue.run_with_predictor(model, named, x0.shape, run)

        def flow(z, a):
            return steps_mod.to_flow(z, a)

        res = {}
        # sampling, noisiest level to clean
        t_out, t_calls = theirs(xT, sig, False)
        o = ours(lambda p: (fs.midpoint_march(p, fs._to_ddpm(xT, ab[0]), ts, ab, "c", None, 1.0, method)[-1],
                            p.calls))
        res["sampling"] = (float((o[0] - t_out).abs().max()), t_calls, o[1], float((t_out - xT).abs().max()))
        # inversion from the first noisy level up (their timesteps without the final 0)
        z1 = x0 * 0.9 + xT * 0.1  # any latent at that level
        t_out, t_calls = theirs(z1, sig[:-1], True)
        o = ours(lambda p: (flow(fs.midpoint_march(p, fs._to_ddpm(z1, ab[-2]), ts[-2::-1], ab[-2::-1], "c", None,
                                                   1.0, method)[-1], ab[0]), p.calls))
        res["inversion from s > 0"] = (float((o[0] - t_out).abs().max()), t_calls, o[1],
                                       float((t_out - z1).abs().max()))
        # inversion from the clean latent (the first step differs by design)
        t_out, t_calls = theirs(x0, sig, True)
        o = ours(lambda p: (flow(fs.flow_invert(p, x0, grid, "c", None, 1.0, method).trajectory[-1], ab[0]),
                            p.calls))
        res["inversion from s = 0"] = (float((o[0] - t_out).abs().max()), t_calls, o[1],
                                       float((t_out - x0).abs().max()))
        for what, (d, tc, oc, moved) in res.items():
            print(f"{label} on the tiny {kind.upper() if kind == 'sd3' else 'Flux'}, {steps} steps, {what}: largest "
                  f"|ours - authors'| = {d:.3e} (the latent moved by up to {moved:.3f}; model calls: theirs {tc}, "
                  f"ours {oc})", flush=True)
        rows[method] = res
    return rows


def testbed(authors, count: int, steps_list=(8, 14, 28)) -> dict:
    """The trained SD3-format flow testbed: each solver's round trip (inversion from the clean
    latent, then sampling back with the same solver and prompt, guidance 1) with the authors' loops
    and with the pack's, on the same grid; PSNR of the decoded reconstruction against the VAE round
    trip. Only the first inversion step's model call differs between the two."""
    import numpy as np
    from support.testbed_runs import Testbed, psnr

    bed = Testbed("sd3")
    glue = importlib.import_module(bed.pack.__name__ + ".nodes.comfy")
    fs = importlib.import_module(bed.pack.__name__ + ".core.flow_solvers")
    model = bed.model
    items = list(range(count))
    lat = bed.encode(bed.images[items])
    x0 = model.model.process_latent_in(lat["samples"]).float()
    c = bed.cond(bed.prompts(items))
    txt, vec = c[0][0], c[0][1]["pooled_output"]
    H, W = x0.shape[-2:]
    ids = torch.zeros(H * W // 4, 3)
    vae_rt = bed.decode(lat["samples"])
    rows = {}
    for steps in steps_list:
        grid = glue.make_grid(model, steps)
        sig = [float(v) for v in glue.grid_sigmas(model, grid)]
        for method, (fn, label) in authors.items():
            m = _Model(model.model.diffusion_model, x0.shape, False)
            with torch.inference_mode():
                xT, _ = fn(m, _pack(x0), ids, txt, torch.zeros(txt.shape[1], 3), vec, sig, True, {"inject_step": 0},
                           1.0)
                rec, _ = fn(m, xT, ids, txt, torch.zeros(txt.shape[1], 3), vec, sig, False, {"inject_step": 0}, 1.0)
            theirs = _unpack(rec, H, W)
            with torch.inference_mode():
                def run(p):
                    res = fs.flow_invert(p, x0, grid, "c", None, 1.0, method)
                    return fs.flow_sample(p, res.trajectory[-1], grid, "c", None, 1.0, method)[-1]
                ours = glue.run_with_predictor(model, {"c": c}, x0.shape, run)
            row = {}
            for who, z in (("authors", theirs), ("pack", ours)):
                img = bed.decode(model.model.process_latent_out(z))
                row[who] = round(float(np.mean([psnr(img[i:i + 1], vae_rt[i:i + 1]) for i in items])), 2)
            rows[f"{method}_{steps}"] = row
            print(f"testbed ({count} items) {label}, {steps} steps, round trip: PSNR authors {row['authors']:.2f} dB, "
                  f"pack {row['pack']:.2f} dB (model calls {m.calls} each)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rf-solver", required=True, help="RF-Solver-Edit's FLUX_Image_Edit/src/flux/sampling.py")
    ap.add_argument("--fireflow", required=True, help="FireFlow's src/flux/sampling.py")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--testbed", type=int, default=0, metavar="N", help="also the round trip on N held-out items of "
                                                                        "the trained SD3 flow testbed (16)")
    args = ap.parse_args(argv)
    from support import comfy_host

    pack = comfy_host.start_inprocess()
    authors = {"rf_solver": (_load(args.rf_solver, "rfsolver_authors").denoise, "RF-Solver (authors' denoise)"),
               "fireflow": (_load(args.fireflow, "fireflow_authors").denoise_fireflow,
                            "FireFlow (authors' denoise_fireflow)")}
    for kind in ("flux", "sd3"):
        compare(kind, authors, pack, comfy_host, args.steps)
    if args.testbed:
        testbed(authors, args.testbed)


if __name__ == "__main__":
    main()
