"""Running core/ loops inside ComfyUI's sampling machinery: run_with_predictor (a SAMPLER that a
CFGGuider runs, so patches, hooks and memory management apply), the inversion KSAMPLER and the
core-sampling KSAMPLER for SamplerCustomAdvanced."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

import comfy.samplers

from .errors import InverseInputError
from .predictor import ComfyNoisePredictor, KDiffusionPredictor
from .schedule import (check_diffusion_model, coords_of, from_comfy_latent, grid_from_sigmas, model_compute_dtype,
                       model_sampling_of, model_sigma_table, to_comfy_latent, to_start_latent)


class _PredictorGuider(comfy.samplers.CFGGuider):
    def set_named_conds(self, conds: Mapping[str, Any]) -> None:
        self.inner_set_conds(dict(conds))


class _CallSampler(comfy.samplers.Sampler):
    """A SAMPLER whose 'sampling' is an arbitrary function of the noise predictor."""

    def __init__(self, fn: Callable[[ComfyNoisePredictor], Any], on_call=None):
        self.fn = fn
        self.on_call = on_call
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        predictor = ComfyNoisePredictor(model_wrap, extra_args["model_options"], self.on_call)
        self.result = self.fn(predictor)
        return latent_image


def run_with_predictor(model, conds: Mapping[str, Any], latent_shape: Sequence[int],
                       fn: Callable[[ComfyNoisePredictor], Any], seed: int = 0) -> Any:
    """Load ``model`` the way ComfyUI's samplers do, process ``conds`` (a name -> CONDITIONING
    mapping) for latents of ``latent_shape`` and call ``fn(predictor)``; returns its result."""
    for name, c in conds.items():
        if c is None or len(c) == 0:
            raise InverseInputError(f"{name}: empty CONDITIONING; connect a CLIP Text Encode node.")
    guider = _PredictorGuider(model)
    guider.set_named_conds(conds)
    sampler = _CallSampler(fn)
    zeros = torch.zeros(tuple(latent_shape), dtype=torch.float32)
    sigmas = torch.tensor([float(model_sampling_of(model).sigma_max), 0.0])
    guider.sample(zeros, zeros, sampler, sigmas, disable_pbar=True, seed=seed)
    return sampler.result


def _sigmas_setup(model, patcher, sigmas, extra_args):
    """What a pack KSAMPLER needs from the SIGMAS it is given: (grid, coords, predictor over the
    denoiser ``model`` that ComfyUI hands the sampler), after checking the model is one the pack runs."""
    check_diffusion_model(patcher)
    coords = coords_of(patcher)
    predictor = KDiffusionPredictor(model, extra_args, model_sigma_table(patcher), coords, model_compute_dtype(patcher))
    return grid_from_sigmas(patcher, sigmas), coords, predictor


def make_inversion_sampler(invert: Callable) -> comfy.samplers.KSAMPLER:
    """A KSAMPLER that runs ``invert(predictor, z0, grid, callback)`` (a core inversion loop) over
    the connected SIGMAS, in either order, starting from the latent (the noise input is ignored;
    use DisableNoise). It returns the noisy latent at the largest sigma, in ComfyUI's convention."""

    class _InversionKSampler(comfy.samplers.KSAMPLER):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                   denoise_mask=None, disable_pbar=False):
            grid, coords, predictor = _sigmas_setup(model_wrap, model_wrap.model_patcher, sigmas, extra_args)
            z0 = latent_image.float() if latent_image is not None else torch.zeros_like(noise)

            def cb(i, total, z):  # SamplerCustomAdvanced's callback drives the progress bar
                if callback is not None:
                    x = to_comfy_latent(z, grid.alphas_cumprod[::-1][i + 1], coords)
                    callback(i, x, x, total)

            traj = invert(predictor, z0, grid, cb)
            return to_start_latent(traj[-1], grid.alphas_cumprod[0], coords)

    return _InversionKSampler(None)


def make_solver_sampler(sample: Callable) -> comfy.samplers.KSAMPLER:
    """A KSAMPLER that samples with a core loop, ``sample(predictor, z_T, grid, callback)`` returning
    the trajectory in sampling order (e.g. core/flow_solvers.py's ``flow_sample``), over the connected
    SIGMAS, which must end at 0. It starts where ComfyUI's samplers start (the noised latent, or the
    latent itself with DisableNoise) and sees the denoiser ComfyUI gives every sampler, so a denoise
    mask (inpainting) and the model's patches apply."""

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        grid, coords, predictor = _sigmas_setup(model, model.inner_model.model_patcher, sigmas, extra_args or {})

        def cb(i, total, z):
            if callback is not None:
                xi = to_comfy_latent(z, grid.alphas_cumprod[i + 1], coords)
                callback({"i": i, "x": xi, "denoised": xi, "sigma": sigmas[i], "sigma_hat": sigmas[i]})

        traj = sample(predictor, from_comfy_latent(x.float(), grid.alphas_cumprod[0], coords), grid, cb)
        return to_comfy_latent(traj[-1], grid.alphas_cumprod[-1], coords).to(x.dtype)

    return comfy.samplers.KSAMPLER(sampler_function)
