"""Pure-PyTorch diffusion maths for ComfyUI-Inverse.

Nothing in this package imports ComfyUI. Methods are plain functions over the small
protocols in :mod:`.protocols` (a noise predictor, a timestep grid), so that they can be
tested against analytic reference models and reused by any host.
"""
