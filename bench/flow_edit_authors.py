"""FlowEdit against the authors' code: their ``FlowEditSD3`` (fallenshock/FlowEdit, FlowEdit_utils.py),
run unmodified on the tests' tiny random-weight SD3 (ComfyUI's MMDiT), or with ``--flux`` their
``FlowEditFLUX`` on the tiny Flux, against the pack's FlowEdit Guider + Sampler on the same model,
prompts, latent, timesteps and noise draws. Prints the largest difference.

    python bench/flow_edit_authors.py [--flux] --authors PATH_TO/FlowEdit_utils.py [--diffusers DIR]

Needs the authors' file (git clone https://github.com/fallenshock/FlowEdit) and ``diffusers`` (for their
FlowMatchEulerDiscreteScheduler; ``pip install --no-deps --target DIR diffusers`` is enough; never a
test dependency). Their pipeline object is replaced by a stand-in: ``encode_prompt`` returns the tiny
model's conditionings and ``transformer`` calls ComfyUI's MMDiT, which predicts the velocity as
diffusers' SD3 transformer does (timestep = 1000 t). Their ``retrieve_timesteps`` import (diffusers'
SD pipeline module, which needs transformers' image processors) is given diffusers' two-line function.

The noise: their loop draws ``torch.randn_like(x_src)`` from the global generator once per editing
step; the node draws from ``torch.Generator().manual_seed(seed)`` in the same order, so seeding the
global generator with the same seed gives the same draws. The grid: their scheduler's shifted sigmas
(SD3: shift 3, 50 steps); the node is given the same levels as SIGMAS through its GUIDER/SAMPLER pair
(the first level, s = 1, is pure noise, which the pack's flow grids stop short of; it is among the
steps FlowEdit skips at n_max < 50, so the SIGMAS start at the first editing step).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types

import torch

from _authors import load, pack as _pack, unpack as _unpack
import _boot  # noqa: F401  (bench/_boot.py: scripts/ and the tests' support package importable, the pack loaded)


def _load_authors(path: str):
    def retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)

    shim = types.ModuleType("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    shim.retrieve_timesteps = retrieve_timesteps
    return load(path, "flowedit_authors", {shim.__name__: shim})


class _Callable:
    """A function with a ``config`` attribute (diffusers' transformer as the authors' code calls it)."""

    def __init__(self, fn, config):
        self.fn, self.config = fn, config

    def __call__(self, *a, **kw):
        return self.fn(*a, **kw)


class _FluxPipe:
    """The authors' ``pipe`` for FlowEditFLUX over a ComfyUI Flux MODEL: diffusers' packing of 2 x 2
    latent patches into tokens, undone around ComfyUI's Flux (which patchifies itself); guidance
    embedded (the transformer's timestep and guidance are ComfyUI's s and scale)."""

    vae_scale_factor = 16  # the FluxPipeline of the authors' diffusers: 2 ** len(block_out_channels)

    def __init__(self, model, conds: dict, scheduler, shape):
        self.model, self.conds, self.scheduler, self.shape = model, conds, scheduler, shape
        self.transformer = _Callable(self._transformer,
                                     types.SimpleNamespace(in_channels=4 * shape[1], guidance_embeds=True))

    def check_inputs(self, **kw):
        pass

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents):
        return latents.to(device=device, dtype=dtype), None

    _pack_latents = staticmethod(lambda x, *a: _pack(x))
    _unpack_latents = staticmethod(lambda x, h, w, vsf: _unpack(x, 2 * (h // vsf), 2 * (w // vsf)))

    def encode_prompt(self, prompt, **kw):
        c = self.conds[prompt][0]
        return c[0], c[1]["pooled_output"], None

    def _transformer(self, hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections, **kw):
        H, W = self.shape[-2:]
        out = self.model.model.diffusion_model(_unpack(hidden_states, H, W), timestep, context=encoder_hidden_states,
                                               y=pooled_projections, guidance=guidance)
        return (_pack(out.float()),)


class _PackedNoise:
    """``torch`` for the authors' module, except that ``randn_like`` of a packed latent draws the
    unpacked latent's shape (what the node draws) from the global generator and packs it: the same
    numbers at the same pixels in both runs."""

    def __init__(self, shape):
        self.shape = shape

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, **kw):
        return _pack(torch.randn(self.shape)).to(x) if x.dim() == 3 else torch.randn_like(x, **kw)


class _Pipe:
    """The authors' ``pipe`` for FlowEditSD3 over a ComfyUI SD3 MODEL and named conditionings."""

    do_classifier_free_guidance = True

    def __init__(self, model, conds: dict):
        self.model, self.conds = model, conds
        self.transformer = self._transformer

    def encode_prompt(self, prompt, negative_prompt, **kw):
        c, n = self.conds[prompt][0], self.conds[negative_prompt][0]
        return c[0], n[0], c[1]["pooled_output"], n[1]["pooled_output"]

    def _transformer(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, **kw):
        out = self.model.model.diffusion_model(hidden_states, timestep, context=encoder_hidden_states,
                                               y=pooled_projections)
        return (out.float(),)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", required=True, help="the authors' FlowEdit_utils.py")
    ap.add_argument("--diffusers", default=None, help="a folder holding the diffusers package, if not installed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--n-max", type=int, default=33)
    ap.add_argument("--n-avg", type=int, default=1)
    ap.add_argument("--flux", action="store_true", help="FlowEditFLUX on the tiny Flux (28 steps, n_max 24, 1.5 -> 5.5 "
                                                         "embedded; n_min 0 and 4)")
    args = ap.parse_args(argv)
    if args.diffusers:
        sys.path.insert(0, args.diffusers)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from support import comfy_host

    pack = comfy_host.start_inprocess()
    fe_nodes = importlib.import_module(pack.__name__ + ".nodes.flow_edit")
    from comfy_extras import nodes_custom_sampler as cs

    authors = _load_authors(args.authors)
    if args.flux:
        return _flux(authors, fe_nodes, cs, comfy_host, args)
    model, cond = comfy_host.tiny_flow_model("sd3")
    conds = {"src": cond(), "tar": cond(), "neg": cond()}
    x_src = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))  # model space
    seed, gs, gt = 5, 3.5, 13.5
    rows = []
    for n_min in (0,):  # their FlowEditSD3 fails with a NameError for n_min > 0 (noise_pred_tar, their L223)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        torch.manual_seed(seed)
        with torch.inference_mode():
            theirs = authors.FlowEditSD3(_Pipe(model, conds), sched, x_src, "src", "tar", "neg", T_steps=args.steps,
                                         n_avg=args.n_avg, src_guidance_scale=gs, tar_guidance_scale=gt,
                                         n_min=n_min, n_max=args.n_max)
        sched.set_timesteps(args.steps)
        sigmas = torch.cat([sched.sigmas[args.steps - args.n_max:-1], torch.zeros(1)]).float()
        with torch.inference_mode():
            guider = fe_nodes.FlowEditGuider.execute(model, conds["src"], conds["tar"], gs, gt,
                                                     negative=conds["neg"]).args[0]
            sampler = fe_nodes.FlowEditSampler.execute(args.n_max, n_min, args.n_avg).args[0]
            lat = {"samples": model.model.process_latent_out(x_src)}
            ours = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(seed)[0], guider, sampler, sigmas,
                                                     lat)[0]["samples"]
            ours = model.model.process_latent_in(ours)
        diff = float((ours - theirs).abs().max())
        moved = float((theirs - x_src).abs().max())
        rows.append((n_min, diff, moved))
        print(f"FlowEdit SD3 (tiny MMDiT), {args.steps} steps, n_max {args.n_max}, n_min {n_min}, n_avg {args.n_avg}, "
              f"guidance {gs} -> {gt}: largest |ours - authors'| = {diff:.3e} (the edit moved the latent by up to "
              f"{moved:.3f})", flush=True)



def _flux(authors, fe_nodes, cs, comfy_host, args):
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, n_max = (28, 24) if args.steps == 50 else (args.steps, args.n_max)
    model, cond = comfy_host.tiny_flow_model("flux")
    conds = {"src": cond(), "tar": cond()}
    x_src = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    seed, gs, gt = 5, 1.5, 5.5
    authors.torch = _PackedNoise(x_src.shape)
    for n_min in (0, 4):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
        pipe = _FluxPipe(model, conds, sched, x_src.shape)
        torch.manual_seed(seed)
        with torch.inference_mode():
            theirs = authors.FlowEditFLUX(pipe, sched, x_src, "src", "tar", None, T_steps=steps, n_avg=args.n_avg,
                                          src_guidance_scale=gs, tar_guidance_scale=gt, n_min=n_min, n_max=n_max)
        sigmas = sched.sigmas.float()
        with torch.inference_mode():
            guider = fe_nodes.FlowEditGuider.execute(model, conds["src"], conds["tar"], gs, gt).args[0]
            sampler = fe_nodes.FlowEditSampler.execute(n_max, n_min, args.n_avg).args[0]
            lat = {"samples": model.model.process_latent_out(x_src)}
            ours = cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(seed)[0], guider, sampler, sigmas,
                                                     lat)[0]["samples"]
            ours = model.model.process_latent_in(ours)
        diff = float((ours - theirs).abs().max())
        print(f"FlowEdit FLUX (tiny Flux), {steps} steps, n_max {n_max}, n_min {n_min}, n_avg {args.n_avg}, guidance "
              f"{gs} -> {gt} (embedded): largest |ours - authors'| = {diff:.3e} (the edit moved the latent by up to "
              f"{float((theirs - x_src).abs().max()):.3f})", flush=True)


if __name__ == "__main__":
    main()
