"""Attention control: prompt tokens, the attention layers of UNets and DiTs, and the patches that
hand each attention call to a core/ controller (prompt-to-prompt, MasaCtrl)."""

from __future__ import annotations

import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from .errors import InverseInputError

Tensor = torch.Tensor


def prompt_tokens(clip, text: str, input_name: str) -> tuple[list[int], int]:
    """The token ids of ``text``'s words (no BOS/EOS/padding) and the context length the model
    attends to, from the CLIP's own tokenizer ("l" for SD1.x/SDXL, else its first tokenizer)."""
    tokens = clip.tokenize(text, return_word_ids=True)
    key = "l" if "l" in tokens else sorted(tokens)[0]
    chunks = tokens[key]
    if len(chunks) != 1:
        raise InverseInputError(f"{input_name}: the prompt is longer than one 75-token chunk; attention control "
                                f"needs a prompt of at most 75 tokens.")
    ids = [int(t[0]) for t in chunks[0] if len(t) > 2 and t[2] > 0]
    return ids, len(chunks[0])


def word_tokens(clip, word: str) -> list[int]:
    return prompt_tokens(clip, word, "words")[0]


def dit_blocks(model) -> list[tuple[str, int]] | None:
    """A joint-attention transformer's blocks in forward order as ComfyUI's "dit" patch keys: Flux's
    ("double_block", i) then ("single_block", i), MM-DiT's (SD3) ("double_block", i); None for
    other models."""

    dm = getattr(model.model, "diffusion_model", None)
    if isinstance(dm, Flux):
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])
    if isinstance(dm, MMDiT):
        return [("double_block", i) for i in range(len(dm.joint_blocks))]
    return None


def attention_layers(model) -> list[tuple]:
    """The attention layers attention control acts on, in forward order, as ComfyUI's patch keys:
    a UNet's transformer layers (block, id, index), or a joint-attention transformer's blocks
    (:func:`dit_blocks`)."""
    dm = getattr(model.model, "diffusion_model", None)
    blocks = dit_blocks(model)
    if blocks is not None:
        return blocks
    if dm is None or not hasattr(dm, "input_blocks") or not hasattr(dm, "output_blocks"):
        raise InverseInputError("attention_control: prompt-to-prompt and MasaCtrl control a UNet's attention "
                                "(SD1.x, SD2.x, SDXL) or the joint attention of SD3's and Flux's blocks; this model "
                                "has neither. Disconnect attention_control: ProxEdit's proximal guidance alone works "
                                "on it.")
    keys = []
    stages = (("input", list(dm.input_blocks)), ("middle", [dm.middle_block] if dm.middle_block is not None else []),
              ("output", list(dm.output_blocks)))
    for name, blocks in stages:
        for i, block in enumerate(blocks):
            for m in block.modules():
                if hasattr(m, "transformer_blocks"):
                    keys += [(name, i, j) for j in range(len(m.transformer_blocks))]
    if not keys:
        raise InverseInputError("model: this UNet has no attention layers to control.")
    return keys


def masactrl_start_layer(layers: list[tuple]) -> int:
    """MasaCtrl's default start layer (:func:`attention_layers`): for a UNet its first decoder
    (output-block) layer plus a third of its decoder layers -- the paper's 10 for SD1.x/2.x (16
    layers, decoder 7-15), 46 for SDXL (70 layers, decoder 34-69); for a transformer the later half
    of its blocks (Flux: 28 of 57, single blocks 9-37; the flow-editing papers share the source's
    features in Flux's later single blocks; SD3.5 medium: 12 of 24)."""
    if layers and len(layers[0]) == 2:
        return len(layers) // 2
    decoder = [n for n, (block, _i, _j) in enumerate(layers) if block == "output"]
    if not decoder:
        return 0
    return decoder[0] + round(len(decoder) / 3)


def with_attention_control(model, controller):
    """A clone of ``model`` whose self- and cross-attention layers run through ``controller``
    (:class:`core.attention_control.AttentionController`); the shared model is not changed.
    The chunk roles come from ``extra_options["cond_or_uncond"]`` (indices into the conditioning
    list of the current call), so the order in which ComfyUI batches the chunks does not matter."""

    layers = attention_layers(model)
    if len(layers[0]) == 2:
        return _with_joint_attention_control(model, controller, layers)
    order = {key: n for n, key in enumerate(layers)}
    clone = model.clone()

    def make_patch(kind):
        def patch(q, k, v, extra_options):
            block = extra_options.get("block")
            key = (block[0], block[1], extra_options.get("block_index", 0))
            roles = _roles(controller, extra_options)
            shape = extra_options.get("original_shape")
            precision = extra_options.get("attn_precision")
            controller.attention = lambda q_, k_, v_, h: comfy_attention.optimized_attention(
                q_, k_, v_, h, attn_precision=precision)
            return controller.attend(kind, key, order.get(key, -1), q, k, v, extra_options["n_heads"], roles,
                                     tuple(shape[-2:]) if shape else None)
        return patch

    self_patch, cross_patch = make_patch("self"), make_patch("cross")
    for name, i in sorted({(b, i) for b, i, _ in layers}):
        clone.set_model_attn1_replace(self_patch, name, i)
        clone.set_model_attn2_replace(cross_patch, name, i)
    return clone


def _roles(controller, transformer_options) -> list:
    index = (transformer_options or {}).get("cond_or_uncond") or [0]
    return [controller.roles[j] if j < len(controller.roles) else None for j in index]


def image_self_attention_blocks(model) -> set:
    """The blocks (:func:`dit_blocks` keys) of an MM-DiT that also run an image-only self-attention
    (SD3.5's ``x_block.attn2``: blocks 0-12 of SD3.5 medium), after the block's joint attention."""
    dm = getattr(model.model, "diffusion_model", None)
    return {("double_block", i) for i, b in enumerate(getattr(dm, "joint_blocks", None) or [])
            if getattr(getattr(b, "x_block", None), "x_block_self_attn", False)}


def _with_joint_attention_control(model, controller, blocks):
    """:func:`with_attention_control` for a joint-attention transformer (Flux, MM-DiT): a "dit" block
    patch on every block records where the image tokens sit in its joint sequence (the prompt's
    first, the image's after them; Flux's double blocks may flip the two), and an
    ``optimized_attention_override`` sends that block's joint attention through the controller
    (:meth:`core.attention_control.AttentionController.attend_joint`), and SD3.5's image-only
    self-attention of the same block too (all its tokens are image tokens; the controller keeps its
    keys/values apart from the joint attention's), so MasaCtrl acts on every self-attention of the
    image in the blocks it controls. An attention mask of the whole batch (Flux's ``attention_mask``
    conditioning) reaches each chunk's attention as that chunk's rows. Every other attention call,
    and every call outside an edit, goes to the attention it would have used (an earlier override
    included). The shared model is not changed."""
    dm = model.model.diffusion_model
    clone = model.clone()
    state: dict = {}
    earlier = clone.model_options.get("transformer_options", {}).get("optimized_attention_override")
    override = _joint_attention_override(controller, state, {key: n for n, key in enumerate(blocks)},
                                         image_self_attention_blocks(model), earlier)
    for key in blocks:
        clone.set_model_patch_replace(_joint_block_patch(dm, state, key), "dit", key[0], key[1])
    # after the block patches: each of them replaces the clone's transformer_options with a copy
    clone.model_options["transformer_options"] = {**clone.model_options.get("transformer_options", {}),
                                                  "optimized_attention_override": override}
    return clone


def _joint_block_patch(dm, state: dict, key):
    """A "dit" block patch that records in ``state`` where the image tokens of block ``key`` sit in its
    joint sequence while the block runs (Flux's single blocks: one sequence, the prompt's tokens first;
    double blocks: the prompt's, then the image's, unless the block flips them)."""
    def patch(args, extra):
        n_img = args["img"].shape[1]
        if key[0] == "single_block":  # Flux: one sequence, the prompt's tokens first
            n_txt = state.get("n_txt", 0)
            image, length = slice(n_txt, n_img), n_img
        else:
            n_txt = args["txt"].shape[1]
            state["n_txt"] = n_txt
            blocks_list = getattr(dm, "double_blocks", None)
            flipped = blocks_list is not None and getattr(blocks_list[key[1]], "flipped_img_txt", False)
            image = slice(0, n_img) if flipped else slice(n_txt, n_txt + n_img)
            length = n_txt + n_img
        state["block"] = (key, image, length)
        try:
            return extra["original_block"](args)
        finally:
            state.pop("block", None)
    return patch


def _joint_attention_override(controller, state: dict, order: dict, image_only: set, earlier):
    """The ``optimized_attention_override`` of :func:`_with_joint_attention_control`: the joint attention
    of the block ``state`` names (and SD3.5's image-only self-attention of it) goes to the controller,
    every other call to the attention it would have used (``earlier``, an earlier override, included)."""
    def override(func, q, k, v, *rest, **kwargs):
        def run(q_, k_, v_, kw):  # the attention this call would have run (heads etc. in rest / kw)
            if earlier is not None:
                return earlier(func, q_, k_, v_, *rest, **kw)
            return func(q_, k_, v_, *rest, **kw)

        def plain(q_, k_, v_):
            return run(q_, k_, v_, kwargs)

        block = state.get("block")
        token_dim = 2 if kwargs.get("skip_reshape") else 1  # Flux: [B, heads, L, d]; MM-DiT: [B, L, heads d]
        if block is None:
            return plain(q, k, v)
        key, image, length = block
        tokens = q.shape[token_dim]
        if tokens == length:
            name = key
        elif key in image_only and tokens == image.stop - image.start:  # SD3.5: the image-only self-attention
            name, image = (*key, "image"), slice(0, tokens)
        else:
            return plain(q, k, v)
        masa = controller.masa
        mask = kwargs.get("mask")
        if mask is not None and masa is not None and "joint" in (masa.strategy, masa.base_strategy):
            # "source" keeps every token where it is (a mask still fits); "joint" appends tokens
            raise InverseInputError("attention_control: MasaCtrl's 'joint' strategy adds the source's image tokens "
                                    "to a masked attention; choose strategy 'source' with attention masks.")
        roles = _roles(controller, kwargs.get("transformer_options"))
        chunk_attention = None
        if isinstance(mask, Tensor) and mask.ndim >= 3 and len(roles) > 1 and mask.shape[0] == q.shape[0]:
            masks = mask.chunk(len(roles))  # the whole batch's mask: each chunk attends with its own rows

            def chunk_attention(j):
                return lambda q_, k_, v_: run(q_, k_, v_, dict(kwargs, mask=masks[j]))
        controller.attention = plain
        return controller.attend_joint(name, order[key], q, k, v, roles, image, token_dim, chunk_attention)
    return override
