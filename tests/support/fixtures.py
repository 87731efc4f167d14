"""The fixtures the integration tests share (a pytest plugin, registered by tests/conftest.py).

``pack``, ``glue`` and ``core`` are session-scoped (ComfyUI is imported into the process once). The models
are module-scoped, as in the modules that defined them: a gradient through the glue turns a loaded
model's inference tensors into ordinary ones in place (same values), and some tests must start from a
freshly loaded model's inference weights.
- ``pack``: the pack as ComfyUI loaded it; ``glue``: its ComfyUI glue (nodes/comfy/); ``core``: core/ddim.
- ``loaded``: the tiny SD1.5 checkpoint as ComfyUI's loader node loads it, and two prompts
  (model, clip, vae, positive, negative).
- ``sd3``: a tiny random-weight SD3 and three random conditionings (positive, negative, target);
  ``flux``: a tiny Flux and two (positive, target).
A test module may define a fixture of the same name to override one.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from support import comfy_host


@pytest.fixture(scope="session")
def pack():
    return comfy_host.start_inprocess()


@pytest.fixture(scope="session")
def glue(pack):
    return importlib.import_module(pack.__name__ + ".nodes.comfy")


@pytest.fixture(scope="session")
def core(pack):
    return importlib.import_module(pack.__name__ + ".core.ddim")


@pytest.fixture(scope="module")
def loaded(pack):
    """The tiny checkpoint loaded the way ComfyUI's loader node does (under inference mode)."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(comfy_host.tiny_checkpoint()))[:3]
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of an astronaut"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, vae, pos, neg


@pytest.fixture(scope="module")
def sd3(pack):
    model, cond = comfy_host.tiny_flow_model("sd3")
    return model, cond(), cond(), cond()


@pytest.fixture(scope="module")
def flux(pack):
    model, cond = comfy_host.tiny_flow_model("flux")
    return model, cond(), cond()
