"""Where each example API workflow (workflows/api/) is executed in the suite: once each, plus where a
second run proves something the first cannot (the frontend's path to the server, another model family).

- ``SDXL``: on the tiny SDXL (test_sdxl.py). Every node and model-dependent code path of the SD
  workflows: the DDIM SAMPLER, an autograd solver (RNRI), null-text (a tuned embedding with SDXL's
  pooled vector), DDPM noise maps, NPI + prompt-to-prompt + MasaCtrl + ProxEdit, the ProxEdit GUIDER,
  ProxEdit over DDPM, decoder inversion with the fixed point, and the four restoration methods.
- ``FRONTEND``: converted by ComfyUI's real frontend and queued through it on the tiny SD1.5 or the
  tests' tiny flow models (test_frontend.py): every node type of the pack, every model family, each
  kind of graph; a Flux and an SD3.5 graph whose loader is swapped through the frontend; the flow-editing
  nodes (masked FlowEdit, the FlowEdit GUIDER/SAMPLER, RF-Inversion, FireFlow's SAMPLERs).
- ``IN_PROCESS``: the rest, in-process on the tiny SD1.5 or flow models (test_workflows.py).

Every workflow's UI twin converts to its API twin in the real frontend (test_frontend.py), so the API
twin that runs is the graph a user queues.
"""
from __future__ import annotations

from . import comfy_host

SDXL = ["invert_and_reconstruct", "rnri_invert_and_reconstruct", "reconstruct_null_text", "reconstruct_ddpm",
        "texture_then_pose", "proxedit_guider", "proxedit_ddpm", "decoder_inversion_then_inversion",
        "restore_compare_methods"]

FRONTEND = ["invert_and_reconstruct", "reconstruct_null_text", "texture_then_pose", "proxedit_guider",
            "decoder_inversion_then_inversion", "testbed_invert_and_edit", "flux_invert_and_reconstruct",
            "sd35_restore_gaussian_deblur_stsl", "flux_flowedit_masked", "sd35_flowedit_guider", "flux_rf_inversion_stylize",
            "sd35_fireflow_reconstruct"]

# queued through the newest frontend as well (test_frontend_newest.py): every model family and each kind of
# graph (a SAMPLER graph, a GUIDER graph in SamplerCustomAdvanced, the trained testbed, a swapped flow loader);
# its conversion of every workflow is checked like the pinned one's
FRONTEND_NEWEST = ["invert_and_reconstruct", "proxedit_guider", "testbed_invert_and_edit", "flux_invert_and_reconstruct",
                   "sd35_proxedit_word_edit"]

ALL = sorted(p.stem for p in (comfy_host.ROOT / "workflows" / "api").glob("*.json"))
IN_PROCESS = [s for s in ALL if s not in SDXL and s not in FRONTEND]
