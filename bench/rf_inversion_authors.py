"""RF-Inversion against the authors' code: ``RFInversionFluxPipeline`` (diffusers' community
pipeline_flux_rf_inversion.py, the implementation the RF-Inversion authors publish; read at
diffusers 58eb52c), its ``invert`` (Algorithm 1, the controlled forward ODE) and ``__call__``
(Algorithm 2, the controlled reverse ODE) run unmodified, against the pack's RF-Inversion on the
same model, latent, conditionings and noise sample.

    python bench/rf_inversion_authors.py --authors PATH/pipeline_flux_rf_inversion.py --diffusers DIR [--testbed N]

Needs the authors' file (``examples/community/pipeline_flux_rf_inversion.py`` of a diffusers clone)
and diffusers itself for its scheduler (``pip install --no-deps --target DIR diffusers``; never a
test dependency). Their pipeline class is loaded with its base classes and text-encoder types
stubbed (only the names it imports; its own methods are untouched), and an instance is given a
stand-in transformer: ComfyUI's model behind diffusers' packing of 2 x 2 latent patches into tokens.
Their noise sample ``y_1 = torch.randn_like(Y_t)`` is given the pack's draw (the same numbers at the
same pixels).

1. Tiny random Flux (the tests' ``tiny_flow_model("flux")``), guidance embedded:
   a. the reverse ODE: their ``__call__`` from the same inverted latent and image latent, on their
      scheduler's resolution-shifted sigmas (started at 0.98 before the shift: the pack's flow grids
      stop short of the pure-noise level), against core ``rf_sample`` on those levels;
   b. the forward ODE's controller: at gamma 1 the model drops out (the straight line to y_1),
      their ``invert`` on a stand-in scheduler whose steps land where they evaluate (the paper's
      uniform grid t_i = i / N) against core ``rf_invert`` on those levels;
   c. the whole edit at the defaults (28 steps, gamma 0.5, eta 0.9 on the first quarter,
      guidance 3.5), each on its own grid: their pipeline against the RF-Inversion Edit node.
2. ``--testbed N``: the trained SD3-format flow testbed (scripts/train_testbed_sd3.py), N held-out
   items, their pipeline (their scheduler at SD3's shift 3; the stand-in applies CFG, at 1 for the
   inversion and 3.5 for the sampling, where Flux embeds it) against the node, on reconstruction
   (target = source prompt; PSNR against the VAE round trip) and on a colour swap (the edit
   metrics of bench/editing.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
import types

import numpy as np
import torch

from _authors import load, pack as _pack, unpack as _unpack
import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)


def _load_authors(path: str):
    """Their module with the names it imports from transformers and from diffusers' pipeline and
    model packages stubbed while it loads (those packages pull in transformers' image stack); the
    scheduler, utils and image processor are diffusers' own."""

    def stub(name, **attrs):
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        return m

    def cls(name):
        return type(name, (), {})

    stubs = {
        "transformers": stub("transformers", **{n: cls(n) for n in ("CLIPTextModel", "CLIPTokenizer",
                                                                   "T5EncoderModel", "T5TokenizerFast")}),
        "diffusers.loaders": stub("diffusers.loaders", **{n: cls(n) for n in (
            "FluxLoraLoaderMixin", "FromSingleFileMixin", "TextualInversionLoaderMixin")}),
        "diffusers.models.autoencoders": stub("diffusers.models.autoencoders", AutoencoderKL=cls("AutoencoderKL")),
        "diffusers.models.transformers": stub("diffusers.models.transformers",
                                              FluxTransformer2DModel=cls("FluxTransformer2DModel")),
        "diffusers.pipelines.flux.pipeline_output": stub("diffusers.pipelines.flux.pipeline_output",
                                                         FluxPipelineOutput=cls("FluxPipelineOutput")),
        "diffusers.pipelines.pipeline_utils": stub("diffusers.pipelines.pipeline_utils", DiffusionPipeline=_Base),
    }
    return load(path, "rf_inversion_authors", stubs)


class _Base:
    """What their pipeline uses of diffusers' DiffusionPipeline: a progress bar and the offload hook."""

    def progress_bar(self, total=None, iterable=None):
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda *a: None))

    def maybe_free_model_hooks(self):
        pass


class _Noise:
    """``torch`` for their module, except that ``randn_like`` returns the given (packed) sample."""

    def __init__(self, sample):
        self.sample = sample

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, **kw):
        return self.sample.to(x)


class _Transformer:
    """diffusers' Flux transformer as their pipeline calls it (packed tokens, timestep = sigma),
    over a ComfyUI diffusion model: ``flux`` (its own timestep is sigma, guidance embedded) or an
    SD3 MMDiT (timestep 1000 sigma) with classifier-free guidance at the pipeline's guidance value
    against ``negative`` (context, pooled), where Flux would embed it."""

    def __init__(self, diffusion_model, shape, flux: bool, negative=None, offset: float = 0.0):
        self.dm, self.shape, self.flux, self.negative, self.offset = diffusion_model, shape, flux, negative, offset
        self.config = types.SimpleNamespace(in_channels=4 * shape[1], guidance_embeds=True)

    def __call__(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, **kw):
        H, W = self.shape[-2:]
        x = _unpack(hidden_states, H, W)
        t = timestep.reshape(-1).expand(x.shape[0]).float() + self.offset
        if self.flux:
            out = self.dm(x, t, context=encoder_hidden_states, y=pooled_projections,
                          guidance=guidance.reshape(-1).expand(x.shape[0]).float())
        else:
            g = float(guidance.reshape(-1)[0])
            out = self.dm(x, 1000.0 * t, context=encoder_hidden_states, y=pooled_projections)
            if g != 1.0:
                ctx, pooled = self.negative
                unc = self.dm(x, 1000.0 * t, context=ctx.expand(x.shape[0], -1, -1),
                              y=pooled.expand(x.shape[0], -1))
                out = unc + g * (out - unc)
        return (_pack(out.float()),)


class _UniformScheduler:
    """A scheduler whose sigmas are 1 - i / N for i < N = steps + 1 (no final 0): their ``invert``
    steps by sigmas[i] - sigmas[i + 1] = 1 / N and evaluates at t_i = i / N, so with it each step
    lands where the next one evaluates (Algorithm 1's uniform grid, ending at s = steps / N)."""

    order = 1
    config = {}

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, **kw):
        N = (len(sigmas) if sigmas is not None else num_inference_steps) + 1  # their invert passes steps sigmas
        self.sigmas = torch.tensor([1.0 - i / N for i in range(N)])
        self.timesteps = 1000.0 * self.sigmas

    def set_begin_index(self, i):
        pass


def _pipe(authors, transformer, scheduler, x0, conds):
    """An instance of their pipeline class (their methods, unmodified) over the stand-ins: the
    image latent ``x0`` [1, C, H, W] is what their ``encode_image`` returns, ``conds`` maps a prompt
    name to (context, pooled)."""

    class Pipe(authors.RFInversionFluxPipeline):
        def __init__(self):
            self.transformer, self.scheduler, self._x0, self._conds = transformer, scheduler, x0, conds
            self.vae_scale_factor = 8
            self.default_sample_size = x0.shape[-1]
            self.text_encoder = types.SimpleNamespace(dtype=torch.float32)

        @property
        def _execution_device(self):
            return torch.device("cpu")

        def encode_image(self, image, dtype=None, **kw):
            return self._x0.to(dtype), None

        def encode_prompt(self, prompt, prompt_2=None, device=None, **kw):
            ctx, pooled = self._conds[prompt]
            return ctx, pooled, torch.zeros(ctx.shape[1], 3)

    return Pipe()


def _authors_edit(authors, pipe, x0, y1, steps, gamma, eta, stop, guidance, source_guidance, sigmas=None,
                  reverse_scheduler=None):
    """Their invert then their __call__ (the RF-Inversion edit of their docstring's example), in
    unpacked model-space latents; returns (inverted, edited)."""
    H, W = x0.shape[-2:]
    authors.torch = _Noise(_pack(y1))
    with torch.inference_mode():
        inv, img, ids = pipe.invert(image=None, source_prompt="source", source_guidance_scale=source_guidance,
                                    num_inversion_steps=steps, gamma=gamma, height=8 * H, width=8 * W)
        if reverse_scheduler is not None:
            pipe.scheduler = reverse_scheduler
        out = pipe(prompt="target", inverted_latents=inv, image_latents=img, latent_image_ids=ids, height=8 * H,
                   width=8 * W, eta=eta, start_timestep=0.0, stop_timestep=stop / steps, num_inference_steps=steps,
                   sigmas=sigmas, guidance_scale=guidance, output_type="latent", return_dict=False)[0]
    return _unpack(inv, H, W), _unpack(out, H, W)


def _flux_scheduler(FlowMatch):
    return FlowMatch(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux(authors, pack, comfy_host, FlowMatch, steps=28):
    glue = importlib.import_module(pack.__name__ + ".nodes.comfy")
    fe = importlib.import_module(pack.__name__ + ".core.flow_edit")
    fe_nodes = importlib.import_module(pack.__name__ + ".nodes.flow_edit")
    model, cond = comfy_host.tiny_flow_model("flux")
    src, tar = cond(), cond()
    names = {"source": (src[0][0], src[0][1]["pooled_output"]), "target": (tar[0][0], tar[0][1]["pooled_output"])}
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 16, 16, generator=g)  # model space
    xT = torch.randn(1, 16, 16, 16, generator=g)
    seed = 5
    y1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))  # the node's draw
    dm = model.model.diffusion_model
    rows = {}

    # a. the reverse ODE on the same levels
    sched = _flux_scheduler(FlowMatch)
    pipe = _pipe(authors, _Transformer(dm, x0.shape, True), sched, x0, names)
    H, W = x0.shape[-2:]
    with torch.inference_mode():
        theirs = _unpack(pipe(prompt="target", inverted_latents=_pack(xT), image_latents=_pack(x0),
                              latent_image_ids=torch.zeros(H * W // 4, 3), height=8 * H, width=8 * W, eta=0.9,
                              start_timestep=0.0, stop_timestep=0.25, num_inference_steps=steps,
                              sigmas=np.linspace(0.98, 1.0 / steps, steps), guidance_scale=3.5,
                              output_type="latent", return_dict=False)[0], H, W)
    grid = glue.grid_from_sigmas(model, sched.sigmas.float())
    conds, uncond, _, gs = fe_nodes._conds(model, src, tar, None, 0.0, 3.5)
    with torch.inference_mode():
        ours = glue.run_with_predictor(model, conds, x0.shape, lambda pred: fe.rf_sample(
            pred, xT, grid, x0, "target", uncond, gs, 0.9, 0, steps // 4))
    rows["reverse"] = d = float((ours - theirs).abs().max())
    print(f"(1a) reverse ODE, tiny Flux, {steps} steps (their shifted sigmas from 0.98), eta 0.9 on steps [0, "
          f"{steps // 4}), guidance 3.5: largest |ours - authors'| = {d:.3e} (the ODE moved the latent by up to "
          f"{float((theirs - xT).abs().max()):.3f})", flush=True)

    # b. the forward ODE on the grid where their steps land where they evaluate: at gamma 1 the model
    # drops out; otherwise their model call is at t_i and the pack's at the next level (as DDIM
    # inversion evaluates), which the stand-in's offset of one step (1 / N) reproduces
    N = steps + 1
    for gamma, offset in ((1.0, 0.0), (0.5, 0.0), (0.0, 0.0), (0.5, 1.0 / N), (0.0, 1.0 / N)):
        pipe = _pipe(authors, _Transformer(dm, x0.shape, True, offset=offset), _UniformScheduler(), x0, names)
        authors.torch = _Noise(_pack(y1))
        with torch.inference_mode():
            inv = _unpack(pipe.invert(image=None, source_prompt="source", source_guidance_scale=0.0,
                                      num_inversion_steps=steps, gamma=gamma, height=8 * H, width=8 * W)[0], H, W)
        grid = glue.grid_from_sigmas(model, torch.tensor([1.0 - i / N for i in range(1, N)] + [0.0]))
        with torch.inference_mode():
            mine = glue.run_with_predictor(model, conds, x0.shape, lambda pred: fe.rf_invert(
                pred, x0, grid, "source", gamma=gamma, y1=y1))
        rows[f"forward_gamma_{gamma:g}" + ("_next_level" if offset else "")] = d = float((mine - inv).abs().max())
        at = "their model call at t_(i+1)" if offset else "their model call at t_i"
        print(f"(1b) forward ODE, tiny Flux, {steps} steps on the uniform grid t_i = i / {N}, gamma {gamma:g}, {at}: largest "
              f"|ours - authors'| = {d:.3e} (the inverted latent's largest entry {float(inv.abs().max()):.3f})",
              flush=True)

    # c. the whole edit at the defaults, each on its own grid
    pipe = _pipe(authors, _Transformer(dm, x0.shape, True), _flux_scheduler(FlowMatch), x0, names)
    inv, theirs = _authors_edit(authors, pipe, x0, y1, steps, 0.5, 0.9, steps // 4, 3.5, 0.0)
    with torch.inference_mode():
        node = fe_nodes.RFInversion.execute(model, src, tar, steps, 3.5, 0.5, 0.9, seed, start=0, stop=steps // 4,
                                            latent={"samples": model.model.process_latent_out(x0)}).args[0]
        ours = model.model.process_latent_in(node["samples"])
    rows["edit"] = d = float((ours - theirs).abs().max())
    print(f"(1c) whole edit, tiny Flux, {steps} steps, gamma 0.5, eta 0.9 on [0, {steps // 4}), guidance 3.5, each on "
          f"its own grid: largest |ours - authors'| = {d:.3e}, RMS {float((ours - theirs).pow(2).mean().sqrt()):.3e} "
          f"(the edit moved the latent by up to {float((theirs - x0).abs().max()):.3f})", flush=True)
    return rows


def testbed(authors, FlowMatch, count: int, steps: int = 28):
    import testbed as tb
    from support.testbed_runs import Testbed, edit_measures, psnr

    bed = Testbed("sd3")
    fe_nodes = bed.nodes("flow_edit")
    items = list(range(count))
    new = [(int(bed.colours[i]) + 3) % len(tb.COLOURS) for i in items]
    lat = bed.encode(bed.images[items])
    x0 = bed.model.model.process_latent_in(lat["samples"]).float()
    seed = 0
    y1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))  # the node's draw for the batch
    source_texts, target_texts = bed.prompts(items), bed.prompts(items, colours=new)
    with torch.inference_mode():
        enc = {t: bed.clip.encode_from_tokens(bed.clip.tokenize(t), return_pooled=True)
               for t in dict.fromkeys(source_texts + target_texts + [""])}
    dm = bed.model.model.diffusion_model
    vae_rt = bed.decode(lat["samples"])
    rows = {}
    for kind, targets in (("reconstruction", source_texts), ("colour", target_texts)):
        res = {}
        t0 = time.perf_counter()
        out = []
        for k in items:  # their pipeline inverts one image at a time (batch_size = 1 in invert)
            names = {"source": enc[source_texts[k]], "target": enc[targets[k]]}
            pipe = _pipe(authors, _Transformer(dm, x0[k:k + 1].shape, False, enc[""]), FlowMatch(shift=3.0),
                         x0[k:k + 1], names)
            out.append(_authors_edit(authors, pipe, x0[k:k + 1], y1[k:k + 1], steps, 0.5, 0.9, steps // 4, 3.5,
                                     1.0)[1])
        res["authors"] = (torch.cat(out), time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            node = fe_nodes.RFInversion.execute(bed.model, bed.cond(source_texts), bed.cond(targets), steps, 3.5, 0.5,
                                                0.9, seed, start=0, stop=steps // 4, negative=bed.cond([""] * count),
                                                latent=lat).args[0]
        res["pack"] = (bed.model.model.process_latent_in(node["samples"]).float(), time.perf_counter() - t0)
        for who, (z, sec) in res.items():
            img = bed.decode(bed.model.model.process_latent_out(z))
            if kind == "reconstruction":
                p = float(np.mean([psnr(img[i:i + 1], vae_rt[i:i + 1]) for i in range(count)]))
                rows[f"{who}_{kind}"] = {"psnr": round(p, 2), "seconds": round(sec, 1)}
                print(f"(2) testbed {who:7s} reconstruction ({count} items): PSNR {p:6.2f} dB against the VAE round "
                      f"trip  {sec:6.1f} s", flush=True)
            else:
                m = edit_measures(img, vae_rt, want_colour=new)
                r = {"success": round(sum(x["colour_ok"] for x in m) / count, 3),
                     "iou": round(sum(x["iou"] for x in m) / count, 3),
                     "background_psnr": round(sum(x["background_psnr"] for x in m) / count, 2),
                     "seconds": round(sec, 1)}
                rows[f"{who}_{kind}"] = r
                print(f"(2) testbed {who:7s} colour swap ({count} items): success {r['success']:.3f}  IoU "
                      f"{r['iou']:.3f}  background PSNR {r['background_psnr']:6.2f} dB  {sec:6.1f} s", flush=True)
        d = res["pack"][0] - res["authors"][0]
        print(f"(2) testbed {kind}: largest |ours - authors'| = {float(d.abs().max()):.3f}, RMS "
              f"{float(d.pow(2).mean().sqrt()):.3f} (latents' RMS {float(x0.pow(2).mean().sqrt()):.3f})", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", required=True, help="diffusers' examples/community/pipeline_flux_rf_inversion.py")
    ap.add_argument("--diffusers", default=None, help="a folder holding the diffusers package, if not installed")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--testbed", type=int, default=0, metavar="N", help="also N held-out items of the trained SD3 "
                                                                        "flow testbed (16)")
    args = ap.parse_args(argv)
    if args.diffusers:
        sys.path.insert(0, args.diffusers)
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler as FlowMatch
    from support import comfy_host

    pack = comfy_host.start_inprocess()
    authors = _load_authors(args.authors)
    tiny_flux(authors, pack, comfy_host, FlowMatch, args.steps)
    if args.testbed:
        testbed(authors, FlowMatch, args.testbed, args.steps)


if __name__ == "__main__":
    main()
