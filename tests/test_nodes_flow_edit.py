"""The flow-editing nodes (issue 23): FlowEdit (node and GUIDER/SAMPLER pair) and RF-Inversion on the
tiny SD3 (classifier-free guidance), the tiny Flux (embedded guidance) and the tiny SD1.5 checkpoint
(through the flow view of its noise prediction); SDXL in test_sdxl.py. The closed forms are in
test_core_flow_edit.py."""
from __future__ import annotations

import torch

from support import comfy_host
from support.integration import _encode, _lat, check_flow_edit_nodes

comfy_host.skip_module_without_host()


def test_flow_edit_nodes_on_sd3(pack, sd3):
    model, pos, neg, tar = sd3
    check_flow_edit_nodes(pack, model, pos, tar, neg, _lat(31))


def test_flow_edit_nodes_on_flux_with_embedded_guidance(pack, flux):
    model, pos, tar = flux
    out = check_flow_edit_nodes(pack, model, pos, tar, None, _lat(32), guidance=(1.5, 5.5))
    # the guidance is embedded: another target guidance gives another edit at the same model calls
    import importlib

    fe = importlib.import_module(pack.__name__ + ".nodes.flow_edit")
    with torch.inference_mode():
        other = fe.FlowEdit.execute(model, pos, tar, 4, 1.5, 2.5, 3, 1, latent=_lat(32)).args[0]["samples"]
    assert not torch.equal(other, out["flowedit"])


def test_flow_edit_nodes_on_sd15_and_clear_errors(pack, glue, loaded):
    model, clip, vae, pos, neg = loaded
    with torch.inference_mode():
        tar = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of a red robot"))
    check_flow_edit_nodes(pack, model, pos, tar, neg, _encode(loaded, 12), guidance=(3.5, 7.5))
    import importlib

    import pytest

    fe = importlib.import_module(pack.__name__ + ".nodes.flow_edit")
    with torch.inference_mode(), pytest.raises(glue.InverseInputError, match=r"^negative: "):
        fe.FlowEdit.execute(model, pos, tar, 6, 3.5, 7.5, 5, 1, latent=_encode(loaded, 12))
