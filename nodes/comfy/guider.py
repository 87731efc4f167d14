"""GUIDERs over core/ loops: EditGuider runs one core/ edit step per model evaluation (ProxEdit under
SamplerCustomAdvanced); NamedCondGuider and make_guider_sampler make a GUIDER/SAMPLER pair whose
SAMPLER runs a whole core loop over the GUIDER's named conditionings (FlowEdit)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import comfy.samplers

from ...core.proxedit import ddim_x0_for
from .errors import InverseInputError, PureNoiseStartError
from .predictor import ComfyNoisePredictor
from .schedule import check_diffusion_model, grid_from_sigmas, grid_sigmas, coords_of


class EditGuider(comfy.samplers.CFGGuider):
    """GUIDER for SamplerCustomAdvanced over an inversion. ``step(predictor, result, z, i)`` returns
    the edited z_{t-1} from z_t at grid step i (core.proxedit.edit_step); the guider returns the
    denoised prediction whose DDIM/Euler step lands exactly there (core.proxedit.ddim_x0_for), so a
    deterministic one-call-per-step sampler reproduces the core loop. The sigmas must be levels of
    the inversion's grid (its SIGMAS output, possibly split)."""

    def __init__(self, model, conds: Mapping[str, Any], result, step: Callable):
        super().__init__(model)
        self.inner_set_conds(dict(conds))
        self.result = result
        self.step = step
        self._device_result = None
        self.coords = coords_of(model)
        # the inversion's own levels (its SIGMAS output), whatever this model's table holds
        self._levels = [float(v) for v in grid_sigmas(model, result.grid)[:-1]]

    def _grid_index(self, sigma: float) -> int:
        grid = self.result.grid
        for i, s in enumerate(self._levels):
            if abs(s - sigma) <= 1e-4 * max(s, 1e-6):
                return i
        raise InverseInputError(
            f"sigmas: the sampler asked for sigma {sigma:.5g}, which is not a level of the inversion's "
            f"{grid.steps}-step grid; connect the inversion node's sigmas output (SplitSigmas to skip steps) "
            f"and a one-evaluation-per-step sampler such as euler or ddim.")

    def predict_noise(self, x, timestep, model_options={}, seed=None):

        want = tuple(self.result.z0.shape)
        if tuple(x.shape) != want:
            raise InverseInputError(
                f"latent_image: SamplerCustomAdvanced gave a latent of shape {tuple(x.shape)} but the inversion is "
                f"{want}; connect the inversion's noise_latent (or a latent of the inverted image's size and batch).")
        predictor = ComfyNoisePredictor(self, model_options)
        if self._device_result is None:
            self._device_result = self.result.to(predictor.device)
        sigma = float(timestep.flatten()[0])
        i = self._grid_index(sigma)
        ab = self.result.grid.alphas_cumprod
        z = x.float() / self.coords.x_scale(self.coords.ddpm_sigma(sigma))
        z_next = self.step(predictor, self._device_result, z, i)
        return ddim_x0_for(z, z_next, ab[i], ab[i + 1]).to(x.dtype)


class NamedCondGuider(comfy.samplers.CFGGuider):
    """A GUIDER that carries named CONDITIONINGs (e.g. source, target, negative) and settings for a
    SAMPLER made by :func:`make_guider_sampler` with the same ``kind``; with any other sampler it
    refuses with the fix, as it has no single prediction to give."""

    def __init__(self, model, conds: Mapping[str, Any], kind: str, settings: Mapping[str, Any]):
        super().__init__(model)
        self.inner_set_conds(dict(conds))
        self.kind = kind
        self.settings = dict(settings)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        raise InverseInputError(f"sampler: the {self.kind} Guider runs only with the {self.kind} Sampler; connect that "
                                f"SAMPLER to SamplerCustomAdvanced.")


def make_guider_sampler(kind: str, run: Callable, first_step: Optional[Callable[[int], int]] = None
                        ) -> comfy.samplers.Sampler:
    """A SAMPLER for a :class:`NamedCondGuider` of the same ``kind``: it calls ``run(predictor,
    guider_settings, z, grid, mask, seed, callback)`` with a ComfyNoisePredictor over the guider's
    named conditionings, the input latent in model space (ComfyUI's process_latent_in, DDPM = flow
    coordinates at the clean level), the SIGMAS as a grid (they must end at 0), the latent's noise
    mask resized to the latent (SetLatentNoiseMask; None without one) and the noise input's seed,
    and returns the clean latent ``run`` returns."""

    class _GuiderSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            if not isinstance(model_wrap, NamedCondGuider) or model_wrap.kind != kind:
                raise InverseInputError(f"guider: the {kind} Sampler needs the {kind} Guider; connect it to "
                                        f"SamplerCustomAdvanced's guider input.")
            check_diffusion_model(model_wrap.model_patcher)
            steps = len(sigmas) - 1
            if first_step is not None:
                sigmas = sigmas[min(max(first_step(steps), 0), steps - 1):]
            try:
                grid = grid_from_sigmas(model_wrap.model_patcher, sigmas)
            except PureNoiseStartError:
                raise InverseInputError(
                    f"sigmas: the {kind} Sampler would take a step from s = 1, pure noise, where the pack's solvers "
                    f"cannot evaluate the model (its noise prediction is undefined there); with a schedule that "
                    f"starts at 1 (BasicScheduler on SD3/Flux) let at most {steps - 1} of its {steps} steps edit "
                    f"(n_max), or drop the first sigma with SplitSigmas.") from None
            predictor = ComfyNoisePredictor(model_wrap, extra_args["model_options"])
            z = latent_image.float().to(predictor.device)
            mask = None
            if denoise_mask is not None:
                mask = denoise_mask.float().to(z.device)[:, :1]
                mask = mask.expand(z.shape[0], 1, *z.shape[2:]) if mask.shape[0] == 1 else mask

            def cb(i, total, x):
                if callback is not None:
                    callback(i, x, x, total)

            return run(predictor, model_wrap.settings, z, grid, mask, int(extra_args.get("seed") or 0), cb)

    return _GuiderSampler()
