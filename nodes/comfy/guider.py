"""A GUIDER that runs one core/ edit step per model evaluation (ProxEdit under SamplerCustomAdvanced)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import comfy.samplers

from ...core.proxedit import ddim_x0_for
from .errors import InverseInputError
from .predictor import ComfyNoisePredictor
from .schedule import coords_of, grid_sigmas


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
