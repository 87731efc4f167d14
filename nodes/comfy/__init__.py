"""The one package that touches ComfyUI internals; one module per concern:

- ``errors``: InverseInputError, the error every node raises for bad input;
- ``schedule``: model checks, timestep grids <-> SIGMAS, GridLevel, latent conventions (Coords);
- ``predictor``: ComfyNoisePredictor (MODEL + named CONDITIONINGs), Cond, PromptLayout, KDiffusionPredictor;
- ``autograd``: inference tensors made differentiable, SavedTensorGuard (copy-on-write for in-place models);
- ``sampler``: run_with_predictor (core loops inside CFGGuider.sample), the inversion KSAMPLER and the
  sampling KSAMPLER of a core loop (make_solver_sampler);
- ``progress``: ProgressReporter, the progress bar and cancel point;
- ``checks``: widget, latent, image, mask and conditioning checks;
- ``vae``: VaeCodec (decoder inversion) and LatentCodec (posterior samplers);
- ``attention``: prompt tokens and attention patches for prompt-to-prompt and MasaCtrl;
- ``guider``: EditGuider (ProxEdit as a GUIDER), NamedCondGuider and make_guider_sampler (FlowEdit as a
  GUIDER/SAMPLER pair);
- ``server``: the pack's example workflows listed in reading order by ComfyUI's template route.

The node modules import this package and nothing else of ComfyUI (besides comfy_api's V3 schema).

It turns a ComfyUI MODEL plus CONDITIONINGs into the :class:`core.protocols.NoisePredictor`
the methods in core/ are written against, and back: timestep grids to SIGMAS, latents to the
LATENT convention, core loops to a SAMPLER.

Sigma space. ComfyUI's discrete-time models are k-diffusion models: a latent ``x`` at noise level
``sigma`` is ``x = z_t * sqrt(1 + sigma^2)`` where ``z_t`` is the DDPM latent and
``sigma_t = sqrt((1 - abar_t) / abar_t)``; the model returns the denoised ``x0`` and
``eps = (x - x0) / sigma``. Grids made from a step count take the model's own ``model_sampling``
table, so that ComfyUI maps them back to exactly the integer timestep we mean. This holds for
epsilon and v-prediction models alike (ComfyUI's denoised output already accounts for the
parameterisation) and for LCM's distilled sampling table.

Levels. A grid's timesteps are :class:`GridLevel` objects: the model timestep (an int, as core/ and the
NoisePredictor protocol use it) carrying the grid's exact level, the DDPM sigma its abar belongs to.
The predictors evaluate the model at that level, never at the table entry of the timestep index,
so a model is never evaluated at one level and stepped at another: SIGMAS off the table reach the
model exactly as given (as ComfyUI's samplers keep them; flow time is continuous), and a MODEL
patched to another shift than the inversion's (ModelSamplingSD3, ModelSamplingFlux at another
resolution) is evaluated at the inversion's levels, which for a flow model is the same network at
the same flow time.

Flow-matching models (SD3/SD3.5's discrete flow, Flux; ComfyUI's CONST prediction): a latent
``x = (1 - s) x0 + s eps`` at flow time ``s`` with the model predicting v = eps - x0 is the DDPM
family in other coordinates: ``x / (1 - s) = x0 + sigma eps`` with ``sigma = s / (1 - s)``, so
``abar = 1 / (1 + sigma^2)`` and ``z = x sqrt(abar) / (1 - s) = x (1 + sigma) / sqrt(1 + sigma^2)``;
Tweedie's x0 is ComfyUI's denoised ``x - s v`` and ``eps = (x - (1 - s) x0) / s``. A DDIM step in
those coordinates is exactly an Euler step of the flow ODE (tests/test_flow.py derives and checks
each identity against ComfyUI's model_sampling). core/flow.py's ``Coords`` holds the two mappings;
core/ keeps one set of solvers. Pure noise (s = 1) has abar = 0, where the eps parameterisation cannot give x0,
so flow grids stop at s <= :data:`FLOW_MAX_S` (a SIGMAS input starting at 1.0 is refused with the fix).

Model loading, patches, hooks, ControlNets and area/mask conditioning all go through ComfyUI's own
``CFGGuider.sample`` machinery: the predictor lives inside a SAMPLER that the guider runs, and
every call goes through ``comfy.samplers.calc_cond_batch``, which batches the conditionings into
as few UNet calls as memory allows.

Autograd. Nodes run under ``torch.inference_mode()`` and loaded weights are inference tensors,
which autograd refuses to save for backward. :meth:`ComfyNoisePredictor.autograd` leaves inference
mode, enables gradients and converts the diffusion model's inference-tensor parameters and
buffers, one at a time and in place, into ordinary tensors with the same values (peak extra
memory: the largest single tensor, not a second copy of the model). Values, devices, dtypes and
patches are unchanged, so this does not alter what the shared model computes.
"""
from __future__ import annotations

from .errors import InverseInputError, PureNoiseStartError  # noqa: F401
from .schedule import (model_sampling_of, FLOW_MAX_S, is_flow_model, check_diffusion_model, coords_of, is_lcm_model,
                       model_timesteps, comfy_sigma_table, model_compute_dtype, model_sigma_table, usable_timesteps,
                       model_alphas_cumprod, default_spacing, make_grid, GridLevel, level_sigma, grid_from_sigmas,
                       grid_level_sigmas, grid_sigmas, abar_sigma, to_comfy_latent, from_comfy_latent,
                       to_start_latent, to_latent_output, guidance_embedded, with_guidance)  # noqa: F401
from .autograd import (IN_PLACE_MODULES, adds_in_place, SavedTensorGuard, make_autograd_safe)  # noqa: F401
from .predictor import (cond_embedding, Cond, PromptLayout, ComfyNoisePredictor, KDiffusionPredictor)  # noqa: F401
from .sampler import (run_with_predictor, make_inversion_sampler, make_solver_sampler)  # noqa: F401
from .progress import (ProgressReporter)  # noqa: F401
from .vae import (VAE_PRECISIONS, VaeCodec, DECODER_MEMORY, vae_downscale, LatentCodec)  # noqa: F401
from .checks import (check_widgets, check_finite, model_latent_channels, check_latent_for_model, latent_batch,
                     check_image, encode_image, latent_mask, check_cond_batch)  # noqa: F401
from .attention import (prompt_tokens, word_tokens, dit_blocks, attention_layers, masactrl_start_layer,
                        with_attention_control, image_self_attention_blocks)  # noqa: F401
from .guider import (EditGuider, NamedCondGuider, make_guider_sampler)  # noqa: F401
