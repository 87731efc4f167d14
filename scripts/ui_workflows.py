"""UI-format (litegraph) twins of the API-format example workflows, laid out for people.

``python scripts/ui_workflows.py`` regenerates workflows/*.json (and their template thumbnails,
workflows/*.jpg, and the README's screenshots, docs/screenshots/*.png) from workflows/api/*.json,
using the node definitions of the real ComfyUI (COMFYUI_PATH) and its real frontend in a headless
browser (scripts/frontend.py), which measures every node's size. Each workflow gets:
- a readable file name (the template browser's card title), numbered in reading order (MANIFEST);
- groups per stage (load, invert, edit/restore, decode and save), nodes in columns by data flow,
  no two nodes overlapping, every node at least the size the frontend needs to show its widgets;
- a note on what it shows, what to change and when the default size needs a GPU;
- model metadata, so the frontend's missing-models dialog names the checkpoint to download;
- a saved view that shows the whole graph on a 1440x900 screen.
The tests convert every UI workflow back with :func:`ui_to_api` (and, in the browser, with the
frontend's own graphToPrompt) and compare with the API twin, so the two never drift apart.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# the checkpoints the example workflows load, with their downloads (also read by the tests' host)
from example_checkpoints import CHECKPOINTS, FLUX, SD15, SD35, TESTBED, checkpoint_of  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes, never queued

# per checkpoint: what the note says about the model, and about the machine it needs
MODEL_NOTE = {
    SD15["name"]: ("Checkpoint: any SD1.x/SD2.x/SDXL checkpoint (the file named in Load Checkpoint is SD1.5's; the "
                   "frontend offers its download if it is missing).",
                   "Sized for a GPU: 512 x 512 px and 50 steps. On a CPU, set the Resize node to 256 x 256 and the "
                   "step counts to 10 first."),
    FLUX["name"]: ("Checkpoint: Flux dev, Comfy-Org's single file with its text encoders and VAE (the frontend offers "
                   "its download if it is missing). Other Flux files: Load Diffusion Model + DualCLIPLoader + Load VAE "
                   "instead. Flux dev has no negative prompt: its guidance is the FluxGuidance input (2 here, as in "
                   "the flow-editing papers; 3.5 is its text-to-image default), and the Inverse nodes' guidance stays 1.",
                   "Needs a GPU that runs Flux dev in ComfyUI: a 12B model at 1024 x 1024 px and 28 steps (Restore "
                   "also back-propagates through it: lower the Resize node if memory runs out). A CPU is far too "
                   "slow for Flux: try the SD1.5 workflows there."),
    SD35["name"]: ("Checkpoint: SD3.5 medium with its text encoders (the frontend offers its download if it is "
                   "missing); SD3.5 large and SD3 medium work too. SD3.5 uses classifier-free guidance (4.5 here) "
                   "with a negative prompt, as in its own workflows.",
                   "Needs a GPU: 1024 x 1024 px and 28 steps. On a CPU, set the Resize node to 256 x 256 and the "
                   "step counts to 8 first, and expect minutes per step."),
}

MODEL_NOTE[TESTBED["name"]] = (
    "Checkpoint: the pack's small trained testbed, an SD1.5-format model trained on 48 x 48 px Fashion-MNIST items "
    "in six colours (prompts 'a <colour> <item>'). scripts/ui.sh and scripts/quickstart.sh assemble it from the "
    "pack's tests/data and list it beside your models; it is not a download.",
    "Runs anywhere: on a CPU the whole workflow takes about a minute.")

# (API twin, card title, what it shows, what to change); the order is the reading order
MANIFEST = [
    ("invert_and_reconstruct", "Invert and reconstruct (DDIM inversion)",
     "DDIM inversion of a photo, reconstructed twice: with the pack's sampler and with ComfyUI's own "
     "SamplerCustomAdvanced on the inversion's sigmas. The VAE round trip is the best any inversion can do.",
     "the photo (Load Image), the prompt describing it, the checkpoint, steps"),
    ("reconstruct_fixed_point", "Exact inversion - fixed point",
     "Exact (implicit) inversion at guidance 7.5: each step solved by fixed-point iterations, then reconstructed.",
     "the photo, the prompt, method (anderson, newton_krylov, rnri...), iterations, tolerance"),
    ("reconstruct_gradient_descent", "Exact inversion - gradient descent",
     "Exact inversion at guidance 7.5 with each step solved by gradient descent on the step residual.",
     "the photo, the prompt, iterations, learning rate"),
    ("rnri_invert_and_reconstruct", "Exact inversion - RNRI (Newton-Raphson)",
     "Regularized Newton-Raphson Inversion with prompt-aware adjustment, then reconstructed.",
     "the photo, the prompt, iterations, the regularisation weights"),
    ("reconstruct_negative_prompt", "Negative-prompt inversion",
     "Negative-prompt inversion: invert with the prompt, reconstruct with CFG 7.5 using the prompt as negative.",
     "the photo, the prompt, guidance"),
    ("reconstruct_null_text", "Null-text inversion",
     "Null-text inversion: per-step optimised unconditional embeddings that make CFG 7.5 reproduce the photo.",
     "the photo, the prompt, inner iterations"),
    ("reconstruct_ddpm", "Edit-friendly DDPM inversion",
     "Edit-friendly DDPM inversion: noise maps that make a stochastic sampler reproduce the photo exactly.",
     "the photo, the prompt, guidance"),
    ("proxedit_npi", "Edit - ProxEdit over negative-prompt inversion",
     "ProxEdit: proximal guidance edits the photo towards the target prompt and keeps the rest.",
     "the photo, source and target prompts, the proximal threshold (quantile)"),
    ("proxedit_p2p_word_swap", "Edit - ProxEdit with prompt-to-prompt word swap",
     "ProxEdit with prompt-to-prompt cross-attention control (word swap, local blend).",
     "the photo, the two prompts (same token count for a swap), blend words"),
    ("proxmasactrl_pose", "Edit - ProxMasaCtrl pose change",
     "ProxEdit with MasaCtrl mutual self-attention: a new pose that keeps the subject's appearance.",
     "the photo, the target prompt (the new pose), MasaCtrl start step and layer"),
    ("proxedit_ddpm", "Edit - ProxEdit over DDPM inversion",
     "ProxEdit over edit-friendly DDPM noise maps.",
     "the photo, the two prompts, guidance"),
    ("proxedit_guider", "Edit - ProxEdit GUIDER in SamplerCustomAdvanced",
     "The ProxEdit GUIDER driving ComfyUI's own SamplerCustomAdvanced (euler) over the inversion.",
     "the photo, the prompts in the Prompt-to-Prompt node, the sampler"),
    ("rnri_then_edit", "Edit - ProxEdit over RNRI",
     "RNRI inversion at guidance 7.5, then a ProxEdit word edit.",
     "the photo, the two prompts"),
    ("texture_then_pose", "Edit - texture then pose (P2P then MasaCtrl)",
     "Two edits in a row: a prompt-to-prompt texture edit, the result re-inverted, then a MasaCtrl pose edit.",
     "the photo, the three prompts"),
    ("decoder_inversion", "Decoder inversion",
     "Decoder inversion: the latent whose decoding best matches the photo (better than the VAE encoder's).",
     "the photo, method, iterations, precision"),
    ("decoder_inversion_then_inversion", "Decoder inversion then exact inversion",
     "Image -> latent (decoder inversion) -> noise (exact inversion) -> latent -> image.",
     "the photo, the prompt, iterations"),
    ("restore_sr_x4_stsl", "Restore - super-resolution x4 (STSL)",
     "Posterior-sampling super-resolution with STSL. Degrade Image makes the low-resolution test input from the photo.",
     "the photo; to restore your own low-resolution image, feed it to Restore's measurement instead"),
    ("restore_gaussian_deblur_stsl", "Restore - Gaussian deblur (STSL)",
     "Posterior-sampling Gaussian deblurring with STSL.",
     "the photo, blur sigma, noise sigma_y; your own blurred image goes to Restore's measurement"),
    ("restore_motion_deblur_stsl", "Restore - motion deblur (STSL)",
     "Posterior-sampling motion deblurring with STSL.",
     "the photo, the motion intensity and seed; your own blurred image goes to Restore's measurement"),
    ("restore_box_inpainting_stsl", "Restore - box inpainting (STSL)",
     "Posterior-sampling inpainting of a missing box with STSL.",
     "the photo, the mask amount; your own masked image goes to Restore's measurement"),
    ("restore_compare_methods", "Restore - LDPS, PSLD, P2L and STSL compared",
     "The four restoration samplers side by side on one Gaussian-blurred photo, with their reports.",
     "the photo, the operator, steps"),
    ("flux_invert_and_reconstruct", "Flux - invert and reconstruct (Euler vs exact inversion)",
     "Flux dev: Euler inversion (DDIM in flow coordinates) and exact inversion (Anderson, 3 model calls per step) "
     "of a photo, each reconstructed; the exact one also with ComfyUI's own euler sampler on its sigmas.",
     "the photo, the prompt, FluxGuidance, steps"),
    ("flux_proxedit_word_edit", "Flux - ProxEdit word edit",
     "Flux dev: exact inversion, then ProxEdit towards the target prompt with the source prompt's prediction as the "
     "base (no negative branch); quantile 1 gives back the photo.",
     "the photo, source and target prompts, guidance (the edit strength, 2-4), quantile"),
    ("flux_proxmasactrl_pose", "Flux - ProxMasaCtrl pose change",
     "Flux dev: exact inversion, then ProxEdit with MasaCtrl: from step 3 on, in the later half of Flux's blocks, "
     "the edited image keeps its own prompt tokens and reads the source image's keys and values, so the pose can "
     "change while the subject's appearance stays.",
     "the photo, the target prompt (the new pose), MasaCtrl's start step and block"),
    ("flux_restore_sr_x4_stsl", "Flux - restore super-resolution x4 (STSL)",
     "Posterior-sampling super-resolution with STSL on Flux dev. Degrade Image makes the low-resolution test input.",
     "the photo; to restore your own low-resolution image, feed it to Restore's measurement instead"),
    ("sd35_invert_and_reconstruct", "SD3.5 - invert and reconstruct (Euler vs exact inversion)",
     "SD3.5 at guidance 4.5: Euler inversion and exact inversion (Anderson) of a photo, each reconstructed; the exact "
     "one also with ComfyUI's own euler sampler and CFGGuider on its sigmas.",
     "the photo, the prompt, guidance, steps"),
    ("sd35_proxedit_word_edit", "SD3.5 - ProxEdit word edit",
     "SD3.5: negative-prompt inversion, then ProxEdit towards the target prompt at guidance 4.5.",
     "the photo, source and target prompts, the proximal threshold (quantile)"),
    ("sd35_restore_gaussian_deblur_stsl", "SD3.5 - restore Gaussian deblur (STSL)",
     "Posterior-sampling Gaussian deblurring with STSL on SD3.5.",
     "the photo, blur sigma, noise sigma_y; your own blurred image goes to Restore's measurement"),
    ("testbed_invert_and_edit", "Testbed - invert and edit a red sneaker (runs on a CPU)",
     "The quick start's workflow on the small trained testbed checkpoint: a held-out image (a red sneaker) as the "
     "model sees it, its VAE round trip, its exact inversion (Anderson) reconstructed, and an edit to a blue "
     "sneaker with ProxEdit and a prompt-to-prompt word swap.",
     "the target prompt's colour (red, orange, yellow, green, blue, purple) or item (t-shirt, trousers, pullover, "
     "dress, coat, sandal, shirt, sneaker, bag, ankle boot), with the same word in the source prompt"),
    ("flux_flowedit", "Flux - FlowEdit word edit (no inversion)",
     "Flux dev: FlowEdit edits the photo toward the target prompt without inverting it: over the last 24 of 28 steps "
     "it follows the difference of the target and source velocities on noised copies of the photo (the paper's Flux "
     "settings: guidance 1.5 -> 5.5, embedded).",
     "the photo, source and target prompts, n_max (fewer: closer to the photo), target_guidance (the edit strength)"),
    ("flux_flowedit_masked", "Flux - masked FlowEdit",
     "FlowEdit restricted to a mask (here the lower half, the suit): outside it the latent is the photo's exactly; "
     "the edit is feathered in over 2 latent pixels inside its edge.",
     "the mask (paint one on the photo: right-click Load Image, Open in MaskEditor, and connect its MASK), the prompts"),
    ("sd35_flowedit_guider", "SD3.5 - FlowEdit as GUIDER and SAMPLER",
     "SD3.5: FlowEdit in ComfyUI's SamplerCustomAdvanced: the FlowEdit Guider (prompts, guidance 3.5 -> 13.5 with "
     "CFG) and the FlowEdit Sampler (the last 33 of BasicScheduler's 50 steps edit), seeded by RandomNoise. "
     "SetLatentNoiseMask on the photo's latent would restrict the edit to a mask.",
     "the photo, source and target prompts, n_max, the scheduler's steps"),
    ("flux_rf_inversion_stylize", "Flux - RF-Inversion stylization",
     "Flux dev: RF-Inversion inverts the photo with the controlled forward ODE (gamma 0.5) and samples the target "
     "prompt with the controlled reverse ODE (eta 0.9 over the first 7 of 28 steps): a watercolour of the same "
     "layout.",
     "the photo, the target prompt (the style), eta and stop (more: closer to the photo), gamma"),
    ("sd35_fireflow_reconstruct", "SD3.5 - FireFlow inversion and reconstruction",
     "SD3.5: FireFlow, a second-order flow solver (29 model calls for 28 steps), inverts the photo and samples it "
     "back, once with the pack's nodes and once in ComfyUI's SamplerCustomAdvanced with the Inversion Sampler and "
     "the Flow Solver Sampler on the inversion's sigmas; the two agree.",
     "the photo, the prompt, method (fireflow or rf_solver) in all three places, steps"),
]

STAGE_OF = {
    "CheckpointLoaderSimple": 0, "LoadImage": 0, "ImageScale": 0, "CLIPTextEncode": 0, "FluxGuidance": 0,
    "InversePromptToPrompt": 0,
    "InverseDegradationOperator": 1, "InverseDegradeImage": 1, "VAEEncode": 1,
    "InverseDDIMInversion": 1, "InverseExactInversion": 1, "InverseNegativePromptInversion": 1,
    "InverseNullTextInversion": 1, "InverseDDPMInversion": 1, "InverseDecoderInversion": 1,
    "InverseSampleFromInversion": 2, "InverseProxEdit": 2, "InverseMasaCtrl": 2, "InverseProxEditGuider": 2,
    "SolidMask": 0, "MaskComposite": 0,
    "InverseFlowEdit": 2, "InverseRFInversion": 2, "InverseFlowEditGuider": 2, "InverseFlowEditSampler": 2,
    "BasicScheduler": 2, "RandomNoise": 2, "InverseSamplerDDIMInversion": 1, "InverseSamplerFlowSolver": 2,
    "KSamplerSelect": 2, "CFGGuider": 2, "BasicGuider": 2, "DisableNoise": 2, "SamplerCustomAdvanced": 2, "InverseRestore": 2,
    "VAEDecode": 3, "SaveImage": 3, "PreviewAny": 3, "ImageBatch": 3,
}
GROUP_COLORS = ["#3f789e", "#8A8", "#b06634", "#a1309b"]
NODE_W = 260
MIN_H = {"SaveImage": 270, "CLIPTextEncode": 100, "PreviewAny": 150, "InversePromptToPrompt": 380,
         "LoadImage": 326}  # LoadImage: with its preview, which a small image may not show yet when measured;
# PreviewAny: room for a report's first lines under newer frontends' plain/markdown toggle
GAP_X, GAP_Y, TITLE_H, PAD, GROUP_TITLE = 36, 16, 30, 16, 44
MAX_COLUMN_H = 1000
NOTE_SIZE = (NODE_W, 250)


def ui_file(stem: str) -> Path:
    """The UI twin of workflows/api/<stem>.json."""
    for i, (s, title, *_rest) in enumerate(MANIFEST):
        if s == stem:
            return ROOT / "workflows" / f"{i + 1:02d} {title}.json"
    raise KeyError(f"{stem} is not in scripts/ui_workflows.py's MANIFEST")


def _stage_titles(prompt: dict) -> list[str]:
    types = {n["class_type"] for n in prompt.values()}
    if "InverseRestore" in types:
        return ["Load: model, photo, prompt", "Degrade (makes the test input)", "Restore", "Save"]
    if types & {"InverseProxEdit", "InverseProxEditGuider", "InverseFlowEdit", "InverseFlowEditGuider",
                 "InverseRFInversion"}:
        return ["Load: model, photo, prompts", "Encode and invert", "Edit", "Decode and save"]
    if types == types & {"CheckpointLoaderSimple", "LoadImage", "ImageScale", "VAEEncode", "InverseDecoderInversion",
                         "VAEDecode", "SaveImage"}:
        return ["Load: VAE and photo", "Encode and invert the decoder", "", "Decode and save"]
    return ["Load: model, photo, prompts", "Encode and invert", "Reconstruct", "Decode and save"]


def note_text(stem: str) -> str:
    i = [m[0] for m in MANIFEST].index(stem)
    _, title, shows, change = MANIFEST[i]
    model, machine = MODEL_NOTE[checkpoint_of(json.loads((ROOT / "workflows" / "api" / f"{stem}.json").read_text()))]
    return f"{title}\n\n{shows}\n\nChange: {change}.\n\n{model}\n\n{machine}"


def _inputs(node_cls) -> list[tuple[str, object, dict]]:
    spec = node_cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            typ = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput", False)


def _widget_values(name, typ, opts, value) -> list:
    vals = [value]
    if opts.get("control_after_generate"):
        vals.append("fixed")
    if opts.get("image_upload"):
        vals.append("image")
    return vals


def _outputs(node_cls) -> list[tuple[str, str]]:
    types = list(getattr(node_cls, "RETURN_TYPES", ()) or ())
    names = list(getattr(node_cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def _ids_depth(prompt: dict):
    ids = {k: i + 1 for i, k in enumerate(prompt)}
    depth: dict[str, int] = {}

    def d(k):
        if k not in depth:
            depth[k] = 0
            ups = [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list)]
            depth[k] = 1 + max((d(u) for u in ups), default=-1)
        return depth[k]

    for k in prompt:
        d(k)
    return ids, depth


def api_to_ui(prompt: dict, node_classes: dict, sizes: dict | None = None, stem: str | None = None,
              max_column_h: int = MAX_COLUMN_H) -> dict:
    """The UI twin of an API prompt. ``sizes`` ({ui id: (w, h)}, measured by the frontend) lays
    it out for people (see the module docstring); without it, a plain grid for measuring."""
    ids, depth = _ids_depth(prompt)
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for k, node in prompt.items():
        cls = node_classes[node["class_type"]]
        ui_inputs, widgets = [], []
        for name, typ, opts in _inputs(cls):
            value = node["inputs"].get(name)
            if _is_widget(typ, opts):
                if isinstance(value, list):
                    raise ValueError(f"node {k}: widget {name} driven by a link is not supported here")
                if value is None:
                    value = opts.get("default", typ[0] if isinstance(typ, list) and typ else None)
                widgets += _widget_values(name, typ, opts, value)
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value[0], int(value[1])
                src_type = _outputs(node_classes[prompt[src]["class_type"]])[slot][1]
                links.append([link_id, ids[src], slot, ids[k], len(ui_inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
            ui_inputs.append({"name": name, "type": typ if isinstance(typ, str) else "COMBO", "link": link_id})
        nodes.append({
            "id": ids[k], "type": node["class_type"], "pos": [40 + 360 * (ids[k] % 6), 40 + 700 * (ids[k] // 6)],
            "size": [NODE_W, 60 + 26 * (len(ui_inputs) + len(widgets))], "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets, "title": node.get("_meta", {}).get("title", node["class_type"]),
            "_api_id": k,
        })
    order = sorted(prompt, key=lambda k: depth[k])
    for n in nodes:
        k = n.pop("_api_id")
        n["order"] = order.index(k)
        cls = node_classes[prompt[k]["class_type"]]
        n["outputs"] = [{"name": name, "type": typ, "links": out_links.get((k, i), []), "slot_index": i}
                        for i, (name, typ) in enumerate(_outputs(cls))]
        if n["type"] == "CheckpointLoaderSimple" and "url" in CHECKPOINTS.get(n["widgets_values"][0], {}):
            n["properties"]["models"] = [dict(CHECKPOINTS[n["widgets_values"][0]])]
    ui = {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
          "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
    models = [dict(CHECKPOINTS[name]) for name in sorted({n["widgets_values"][0] for n in nodes
                                                          if n["type"] == "CheckpointLoaderSimple"} & set(CHECKPOINTS))
              if "url" in CHECKPOINTS[name]]
    if models:
        ui["models"] = models
    if sizes is not None:
        _lay_out(ui, prompt, ids, depth, sizes, stem, max_column_h)
    return ui


def _lay_out(ui: dict, prompt: dict, ids: dict, depth: dict, sizes: dict, stem: str | None,
             max_column_h: int = MAX_COLUMN_H) -> None:
    by_id = {n["id"]: n for n in ui["nodes"]}
    titles = _stage_titles(prompt)
    note = None
    if stem is not None:
        nid = len(ui["nodes"]) + 1
        note = {"id": nid, "type": "Note", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {}, "order": nid - 1,
                "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note_text(stem)],
                "title": "Read me: what to change", "color": "#432", "bgcolor": "#653"}
        ui["nodes"].append(note)
        ui["last_node_id"] = nid
    x = 0
    for stage in range(4):
        members = [k for k in prompt if STAGE_OF.get(prompt[k]["class_type"], 2) == stage]
        items = [(depth[k], by_id[ids[k]]) for k in members]
        if stage == 0 and note is not None:
            items.insert(0, (-1, note))
        if not items:
            continue
        # columns filled top to bottom in data-flow order, a new one when the next node would
        # make the column taller than max_column_h
        columns: list[list[dict]] = [[]]
        height = 0
        for _dep, n in sorted(items, key=lambda t: t[0]):
            w, h = sizes.get(n["id"], n["size"])
            h = max(h, MIN_H.get(n["type"], 0))
            n["size"] = [max(NODE_W, int(w + 0.999)), int(h + 0.999)]
            step = n["size"][1] + TITLE_H + GAP_Y
            if columns[-1] and height + step > max_column_h:
                columns.append([])
                height = 0
            columns[-1].append(n)
            height += step
        x0 = x
        bottom = 0
        for col in columns:
            y = GROUP_TITLE + TITLE_H
            width = max(n["size"][0] for n in col)
            for n in col:
                n["pos"] = [x + PAD, y]
                y += n["size"][1] + TITLE_H + GAP_Y
            bottom = max(bottom, y - GAP_Y)
            x += width + GAP_X
        x_end = x - GAP_X + 2 * PAD
        ui["groups"].append({"id": len(ui["groups"]) + 1, "title": f"{len(ui['groups']) + 1}. {titles[stage]}",
                             "bounding": [x0, 0, x_end - x0, bottom + PAD], "color": GROUP_COLORS[stage],
                             "font_size": 24, "flags": {}})
        x = x_end + GAP_X


def rects(ui: dict) -> list[tuple[float, float, float, float]]:
    """Every node's (title bar included) and group's rectangle in graph units."""
    out = [(n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H) for n in ui["nodes"]]
    return out + [tuple(g["bounding"]) for g in ui["groups"]]


_GRIDS: dict = {}


def _grid(blocked, step: int):
    """The blocked cells as a summed-area table: (x0, y0, table), so that counting the cells a
    rectangle touches costs four lookups (fit_view tries thousands of views)."""
    key = id(blocked)
    if key not in _GRIDS or _GRIDS[key][0] is not blocked:
        if not blocked:
            _GRIDS[key] = (blocked, None)
        else:
            xs, ys = [b[0] for b in blocked], [b[1] for b in blocked]
            x0, y0 = min(xs), min(ys)
            nx, ny = int((max(xs) - x0) // step) + 1, int((max(ys) - y0) // step) + 1
            table = [[0] * (nx + 1) for _ in range(ny + 1)]
            for bx, by in blocked:
                table[int((by - y0) // step) + 1][int((bx - x0) // step) + 1] = 1
            for j in range(1, ny + 1):
                row, above = table[j], table[j - 1]
                for i in range(1, nx + 1):
                    row[i] += row[i - 1] + above[i] - above[i - 1]
            _GRIDS[key] = (blocked, (x0, y0, nx, ny, table))
    return _GRIDS[key][1]


def _touches(grid, step: int, x0: float, y0: float, x1: float, y1: float) -> bool:
    """Whether a blocked cell (bx, by) with x0 <= bx + step, bx <= x1, y0 <= by + step, by <= y1 exists."""
    if grid is None:
        return False
    gx, gy, nx, ny, t = grid
    i0, i1 = max(0, math.ceil((x0 - step - gx) / step)), min(nx - 1, math.floor((x1 - gx) / step))
    j0, j1 = max(0, math.ceil((y0 - step - gy) / step)), min(ny - 1, math.floor((y1 - gy) / step))
    if i0 > i1 or j0 > j1:
        return False
    return t[j1 + 1][i1 + 1] - t[j0][i1 + 1] - t[j1 + 1][i0] + t[j0][i0] > 0


def fits(ui_rects, scale: float, offset, canvas_rect, blocked, step: int) -> bool:
    """Whether every rectangle, drawn at ``scale`` and ``offset``, lies on the canvas and off every
    blocked cell (page pixels covered by the frontend's own panels: tabs, minimap, zoom buttons)."""
    cx, cy, cw, ch = canvas_rect
    grid = _grid(blocked, step)
    for x, y, w, h in ui_rects:
        x0, y0 = cx + (x + offset[0]) * scale, cy + (y + offset[1]) * scale
        x1, y1 = x0 + w * scale, y0 + h * scale
        if x0 < cx or y0 < cy or x1 > cx + cw or y1 > cy + ch:
            return False
        if _touches(grid, step, x0, y0, x1, y1):
            return False
    return True


def fit_view(ui: dict, canvas_rect, blocked, step: int) -> float:
    """The largest scale (<= 1) whose view shows every node and group on the canvas and off the
    panels, with the graph's top left 12 px right of and below a panel's edge (or the canvas's);
    stores it as the workflow's saved view."""
    rs = rects(ui)
    bx0 = min(r[0] for r in rs)
    by0 = min(r[1] for r in rs)
    cx, cy, cw, ch = canvas_rect
    near = [(bx, by) for bx, by in blocked if bx < cx + 300 and by < cy + 300]
    lefts = sorted({12} | {bx + step + 12 - cx for bx, _ in near})
    tops = sorted({12} | {by + step + 12 - cy for _, by in near})
    best = None
    for left in lefts:
        for top in tops:
            def fit_at(scale):
                return fits(rs, scale, [left / scale - bx0, top / scale - by0], canvas_rect, blocked, step)

            if best is not None and not fit_at(best[0] + 1e-4):
                continue
            lo, hi = 0.05, 1.0
            found = 1.0 if fit_at(1.0) else None
            if found is None:
                for _ in range(30):
                    mid = (lo + hi) / 2
                    if fit_at(mid):
                        found, lo = mid, mid
                    else:
                        hi = mid
            if found is not None and (best is None or found > best[0]):
                best = (found, left, top)
    if best is None:
        raise ValueError("the graph does not fit the canvas at any scale")
    scale, left, top = best
    scale = float(int(scale * 1000)) / 1000
    ui["extra"]["ds"] = {"scale": scale, "offset": [round(left / scale - bx0, 1), round(top / scale - by0, 1)]}
    return scale


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """What the frontend queues for a UI workflow (no converted widgets, no reroutes)."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    link_src = {l[0]: (str(l[1]), l[2]) for l in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n.get("mode", 0) != 0 or n["type"] in VIRTUAL_TYPES:
            continue
        cls = node_classes[n["type"]]
        inputs = {}
        wv = list(n.get("widgets_values", []))
        sockets = {i["name"]: i for i in n.get("inputs", [])}
        for name, typ, opts in _inputs(cls):
            if _is_widget(typ, opts):
                inputs[name] = wv.pop(0)
                if opts.get("control_after_generate"):
                    wv.pop(0)
                if opts.get("image_upload"):
                    wv.pop(0)
            elif name in sockets and sockets[name]["link"] is not None:
                src, slot = link_src[sockets[name]["link"]]
                assert int(src) in by_id
                inputs[name] = [src, slot]
        if wv:
            raise ValueError(f"node {n['id']} ({n['type']}): {len(wv)} widget values left over")
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def normalise_api(prompt: dict) -> dict:
    """Renumber an API prompt's nodes 1..N in file order, drop _meta (for comparisons)."""
    ids = {k: str(i + 1) for i, k in enumerate(prompt)}
    out = {}
    for k, node in prompt.items():
        inputs = {n: ([ids[v[0]], v[1]] if isinstance(v, list) else v) for n, v in node["inputs"].items()}
        out[ids[k]] = {"class_type": node["class_type"], "inputs": inputs}
    return out




THUMB_SIZE = (640, 400)
SCREENSHOTS = {  # one per capability, for the README
    "invert_and_reconstruct": "inversion", "proxedit_p2p_word_swap": "editing",
    "decoder_inversion": "decoder_inversion", "restore_compare_methods": "restoration",
    "flux_invert_and_reconstruct": "flow_models",
}


def _measure(frontend, comfy_host, node_classes, version: str, stems: list[str]) -> dict:
    """What a frontend needs: each node's smallest size per workflow, its canvas's size, the cells its
    own panels cover (relative to the canvas's top left, where the saved view's offset is counted
    from), and the zoom below which it stops drawing text."""
    with frontend.FrontendSession(comfy_host.COMFYUI_PATH, comfy_host.testbed_checkpoint().parent,
                                  ROOT / "workflows" / "input", (comfy_host.HOST_NODES,),
                                  comfy_host.host_nodes_env(), version=version) as fe:
        cx, cy, cw, ch = fe.canvas_rect()
        blocked = {(bx - cx, by - cy) for bx, by in fe.blocked_cells()}
        sizes = {}
        for stem in stems:
            fe.load(api_to_ui(json.loads((ROOT / "workflows" / "api" / f"{stem}.json").read_text()), node_classes))
            sizes[stem] = {n["id"]: n["min_size"] for n in fe.snapshot()["nodes"]}
        out = dict(canvas=(cw, ch), blocked=blocked, readable=fe.low_quality_below(), sizes=sizes)
    print(f"frontend {version}: canvas {cw:.0f} x {ch:.0f} at ({cx:.0f}, {cy:.0f}), {len(blocked)} cells covered by "
          f"panels, text drawn from zoom {out['readable']:.3f}")
    return out


def main() -> None:
    """Lays every workflow out for all the frontends the tests run (scripts/frontend.py's FRONTENDS):
    each node as large as the largest frontend needs it, the saved view clear of every frontend's
    panels; the thumbnails and screenshots are the pinned frontend's."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))  # the tests' support package: ComfyUI in-process, the test nodes
    import frontend
    from support import comfy_host
    from PIL import Image

    comfy_host.start_inprocess()
    import nodes

    stems = [m[0] for m in MANIFEST]
    on_disk = sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json"))
    if sorted(stems) != on_disk:
        raise SystemExit(f"MANIFEST and workflows/api differ: {sorted(set(stems) ^ set(on_disk))}")
    measured = [_measure(frontend, comfy_host, nodes.NODE_CLASS_MAPPINGS, v, stems) for v in frontend.FRONTENDS]
    canvas = [0, 0, min(m["canvas"][0] for m in measured), min(m["canvas"][1] for m in measured)]
    blocked = sorted(set().union(*(m["blocked"] for m in measured)))
    readable = max(m["readable"] for m in measured)
    for old in (ROOT / "workflows").glob("*.json"):
        old.unlink()
    for old in (ROOT / "workflows").glob("*.jpg"):
        old.unlink()
    shots = ROOT / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with frontend.FrontendSession(comfy_host.COMFYUI_PATH, comfy_host.testbed_checkpoint().parent,
                                  ROOT / "workflows" / "input", (comfy_host.HOST_NODES,),
                                  comfy_host.host_nodes_env(), version=frontend.PINNED) as fe:
        for stem in stems:
            prompt = json.loads((ROOT / "workflows" / "api" / f"{stem}.json").read_text())
            sizes = {nid: [max(m["sizes"][stem][nid][i] for m in measured) for i in (0, 1)]
                     for nid in measured[0]["sizes"][stem]}
            best = None
            for max_h in range(600, 2001, 50):  # the column height that gives the largest view
                ui = api_to_ui(prompt, nodes.NODE_CLASS_MAPPINGS, sizes, stem, max_column_h=max_h)
                scale = fit_view(ui, canvas, blocked, frontend.BLOCK_STEP)
                if best is None or scale > best[0] + 1e-3:
                    best = (scale, ui)
            scale, ui = best
            target = ui_file(stem)
            target.write_text(json.dumps(ui, indent=1) + "\n")
            fe.load(ui)
            png = shots / f"_{stem}.tmp.png"
            fe.screenshot(png)
            img = Image.open(png).convert("RGB")
            img.resize(THUMB_SIZE, Image.LANCZOS).save(target.with_suffix(".jpg"), quality=85)
            if stem in SCREENSHOTS:
                img.resize((1080, 675), Image.LANCZOS).save(shots / f"{SCREENSHOTS[stem]}.png", optimize=True)
            png.unlink()
            flag = "" if scale >= readable else "  (below the zoom that draws text)"
            print(f"wrote {target.name} and its thumbnail: view scale {scale:.3f}{flag}")


if __name__ == "__main__":
    main()
