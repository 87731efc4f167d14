"""Attention control for editing real images: prompt-to-prompt and MasaCtrl.

- Prompt-to-prompt (Hertz et al., ICLR 2023; ../shared/papers/NOTES.md): the target branch's
  cross-attention probabilities are taken from the source branch (Replace: word swap with equal
  token counts; Refine: token alignment, new tokens keep their own maps; Reweight: columns of chosen
  tokens scaled by an equalizer) during the first ``cross_steps`` of the sampling, its
  self-attention probabilities during the first ``self_steps`` on maps of at most
  ``self_max_tokens`` queries (recomputed from the source's stored queries and keys, so the store
  is bounded by 2 N C numbers per self-attention layer plus heads N L per cross-attention layer,
  L the context length: about 0.7 GB per image at SDXL's 1024 px in float32, where the maps
  themselves would take 5 GB); LocalBlend keeps the latent outside the edited words' cross-attention
  region equal to the source latent.
- MasaCtrl (Cao et al., ICCV 2023; ProxEdit supplement D-E): from step ``start_step`` and
  self-attention layer ``start_layer`` on, the target branch's queries attend to the source
  branch's keys and values ("source"), to both branches' ("joint") or to its own ("none").

- MasaCtrl on a transformer's joint attention (MM-DiT: SD3; Flux's double and single blocks), the
  analogue the flow-editing papers use (shared image-token keys and values: RF-Solver-Edit and
  FireFlow share the source's values in Flux's later blocks, KV-Edit its keys and values): prompt and
  image tokens form one sequence, and the target branch keeps its own prompt tokens while its image
  tokens' keys and values are the source's ("source"), or the source's are added to its own
  ("joint"); :func:`joint_mutual_attention`.

Only the conditional target branch is edited (P2P edits ``attn[h // 2:]``); the source branch runs on
the stored inversion latent (NOTES.md) in a separate *capture* call before each step's *inject* call,
so that the source's probabilities, keys and values are known when the target attends. MasaCtrl may
also act on the base ("unconditional") branch with its own strategy (supplement E).

This module is pure PyTorch. A host (the ComfyUI glue, or the toy model in core/reference.py) calls
:meth:`AttentionController.attend` from its attention layers with the projected q, k, v of every
batch chunk and the chunk's role.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

SOURCE, SOURCE_BASE, BASE, TARGET = "source", "source_base", "base", "target"
P2P_MODES = ("replace", "refine", "reweight")
MASA_STRATEGIES = ("source", "joint", "none")


class TokenMappingError(ValueError):
    """The source and target prompts cannot be mapped onto each other for this edit."""


# ----------------------------------------------------------------------------------------------
# token mappings (prompt-to-prompt sec. 3.2, from the tokenised prompts)

def replace_mapping(src_ids: Sequence[int], tar_ids: Sequence[int], length: int) -> tuple[Tensor, Tensor]:
    """Word swap: token j of the target takes the map of token j of the source. Needs equal token
    counts (P2P's Replace), otherwise raises :class:`TokenMappingError`. Returns (mapper, alphas)."""
    if len(src_ids) != len(tar_ids):
        raise TokenMappingError(
            f"Replace (word swap) needs prompts with the same number of tokens: the source has "
            f"{len(src_ids)}, the target {len(tar_ids)}. Swap words of equal token length, or use mode 'refine'.")
    return torch.arange(length), torch.ones(length)


def refine_mapping(src_ids: Sequence[int], tar_ids: Sequence[int], length: int,
                   offset: int = 1) -> tuple[Tensor, Tensor]:
    """Refine: align the token sequences (longest matching blocks); an aligned target token takes
    its source token's map (alpha 1), a new token keeps its own (alpha 0). Positions are in the
    padded context of ``length`` tokens whose prompt tokens start at ``offset`` (after BOS); the
    tail (EOS and padding) is aligned end to end."""
    mapper = torch.arange(length)
    alphas = torch.zeros(length)
    alphas[:offset] = 1.0
    n_src, n_tar = len(src_ids), len(tar_ids)
    if offset + max(n_src, n_tar) > length:
        raise TokenMappingError(f"prompts longer than {length - offset - 1} tokens are not supported for attention control.")
    for block in difflib.SequenceMatcher(a=list(src_ids), b=list(tar_ids), autojunk=False).get_matching_blocks():
        for k in range(block.size):
            mapper[offset + block.b + k] = offset + block.a + k
            alphas[offset + block.b + k] = 1.0
    tail = length - (offset + n_tar)
    for k in range(tail):
        mapper[offset + n_tar + k] = min(offset + n_src + k, length - 1)
        alphas[offset + n_tar + k] = 1.0
    return mapper, alphas


def token_positions(prompt_ids: Sequence[int], word_ids: Sequence[int], offset: int = 1) -> list[int]:
    """Context positions of every occurrence of the token sequence ``word_ids`` in ``prompt_ids``."""
    n = len(word_ids)
    hits = [offset + i + k for i in range(len(prompt_ids) - n + 1)
            if list(prompt_ids[i:i + n]) == list(word_ids) for k in range(n)]
    return hits


def changed_positions(src_ids: Sequence[int], tar_ids: Sequence[int], offset: int = 1) -> tuple[list[int], list[int]]:
    """Positions of the tokens that differ between the prompts (the default LocalBlend words)."""
    src, tar = [], []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=list(src_ids), b=list(tar_ids), autojunk=False).get_opcodes():
        if op != "equal":
            src += [offset + i for i in range(a0, a1)]
            tar += [offset + j for j in range(b0, b1)]
    return src, tar


# ----------------------------------------------------------------------------------------------
# settings carried by the nodes

@dataclass
class PromptToPrompt:
    """Prompt-to-prompt settings over a context of ``len(mapper)`` tokens.

    mapper/alphas: target token j takes source token mapper[j]'s map with weight alphas[j]
    (:func:`replace_mapping`, :func:`refine_mapping`); equalizer: per-target-token scale (Reweight);
    steps are fractions of the sampling steps [start, end); blend_* are per-token weights of the
    LocalBlend words in each prompt (None = no LocalBlend)."""

    mode: str
    mapper: Tensor
    alphas: Tensor
    equalizer: Optional[Tensor] = None
    cross_steps: tuple[float, float] = (0.0, 0.8)
    self_steps: tuple[float, float] = (0.0, 0.5)
    self_max_tokens: int = 32 * 32
    blend_source: Optional[Tensor] = None
    blend_target: Optional[Tensor] = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    blend_downsample: int = 4
    blend_dilation: int = 1

    def __post_init__(self):
        if self.mode not in P2P_MODES:
            raise ValueError(f"mode must be one of {P2P_MODES}, got {self.mode!r}")

    @property
    def context_length(self) -> int:
        return int(self.mapper.shape[0])

    @property
    def blends(self) -> bool:
        return self.blend_source is not None and self.blend_target is not None


@dataclass
class MutualSelfAttention:
    """MasaCtrl: from sampling step ``start_step`` and self-attention layer ``start_layer`` (in the
    model's forward order; 10 of SD1.x's 16 is the decoder's 32x32 and 64x64 layers) on, the target
    branch attends with ``strategy`` and the base branch with ``base_strategy`` (default "source":
    MasaCtrl's code edits both CFG halves, and ProxEdit supplement E uses "source" for both noises)."""

    start_step: int = 4
    start_layer: int = 10
    strategy: str = "source"
    base_strategy: str = "source"

    def __post_init__(self):
        for s in (self.strategy, self.base_strategy):
            if s not in MASA_STRATEGIES:
                raise ValueError(f"MasaCtrl strategy must be one of {MASA_STRATEGIES}, got {s!r}")


@dataclass
class AttentionControl:
    """What an attention-control node outputs: prompt-to-prompt and/or MasaCtrl settings, and the
    prompt embeddings they were built for (to check the edit is given the same prompts)."""

    p2p: Optional[PromptToPrompt] = None
    masactrl: Optional[MutualSelfAttention] = None
    source_context: Optional[Tensor] = None
    target_context: Optional[Tensor] = None

    def combine(self, other: "AttentionControl") -> "AttentionControl":
        return AttentionControl(self.p2p or other.p2p, self.masactrl or other.masactrl,
                                self.source_context if self.source_context is not None else other.source_context,
                                self.target_context if self.target_context is not None else other.target_context)


# ----------------------------------------------------------------------------------------------
# the maths

def heads_split(x: Tensor, heads: int) -> Tensor:
    b, n, hd = x.shape
    return x.reshape(b, n, heads, hd // heads).transpose(1, 2)


def heads_merge(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_probs(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: [b, heads, N, M]."""
    qh, kh = heads_split(q.float(), heads), heads_split(k.float(), heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)


def apply_probs(p: Tensor, v: Tensor, heads: int) -> Tensor:
    return heads_merge(p @ heads_split(v.float(), heads)).to(v.dtype)


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain scaled dot-product attention on [b, N, heads * d] tensors."""
    out = F.scaled_dot_product_attention(heads_split(q, heads), heads_split(k, heads), heads_split(v, heads))
    return heads_merge(out)


def p2p_cross_probs(p_src: Tensor, p_tar: Tensor, p2p: PromptToPrompt) -> Tensor:
    """The target's edited cross-attention probabilities (P2P's replace_cross_attention):
    mapped source maps where aligned (alphas), the target's own elsewhere; Reweight scales the
    columns by the equalizer (not renormalised, as in P2P)."""
    mapper = p2p.mapper.to(p_src.device)
    alphas = p2p.alphas.to(p_src)
    p = p_src[..., mapper] * alphas + p_tar * (1.0 - alphas)
    if p2p.equalizer is not None:
        p = p * p2p.equalizer.to(p)
    return p


def mutual_self_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_src: Tensor, v_src: Tensor,
                          heads: int, strategy: str, attention: Callable = sdpa) -> Tensor:
    """MasaCtrl: queries of the edited branch attend to the source's keys/values ("source"), to
    both branches' ("joint": keys concatenated along the token axis) or to their own ("none")."""
    if strategy == "source":
        return attention(q, k_src.to(q.dtype), v_src.to(q.dtype), heads)
    if strategy == "joint":
        return attention(q, torch.cat([k_src.to(q.dtype), k_own], 1), torch.cat([v_src.to(q.dtype), v_own], 1), heads)
    return attention(q, k_own, v_own, heads)


def _tokens(x: Tensor, dim: int, a: int, b: int) -> Tensor:
    return x.narrow(dim, a, b - a)


def joint_mutual_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_src: Tensor, v_src: Tensor, image: slice,
                           token_dim: int, strategy: str, attention: Callable) -> Tensor:
    """MasaCtrl on joint attention: the tokens along ``token_dim`` are the prompt's and the image's,
    the image's at ``image``; ``k_src``/``v_src`` are the source branch's image tokens. "source": the
    edited branch's keys and values with its image tokens replaced by the source's (its prompt tokens
    kept, positions unchanged); "joint": those, followed by its own image tokens' (its queries see
    both images); "none": its own. ``attention(q, k, v)`` is the host's attention."""
    if strategy == "none":
        return attention(q, k_own, v_own)
    a, b = image.start, image.stop
    L = k_own.shape[token_dim]

    def swap(own, src):
        return torch.cat([_tokens(own, token_dim, 0, a), src.to(own.dtype), _tokens(own, token_dim, b, L)], token_dim)

    k, v = swap(k_own, k_src), swap(v_own, v_src)
    if strategy == "joint":
        k = torch.cat([k, _tokens(k_own, token_dim, a, b)], token_dim)
        v = torch.cat([v, _tokens(v_own, token_dim, a, b)], token_dim)
    return attention(q, k, v)


def local_blend_mask(maps_src: Tensor, maps_tar: Tensor, latent_hw: tuple[int, int], threshold: float,
                     dilation: int = 1) -> Tensor:
    """P2P's LocalBlend mask from word maps [b, 1, h, w] of the source and target words: max-pool
    (2 dilation + 1), resize to the latent, normalise by each map's maximum, threshold, union."""
    masks = []
    for m in (maps_src, maps_tar):
        m = m.float()
        if dilation > 0:
            m = F.max_pool2d(m, 2 * dilation + 1, stride=1, padding=dilation)
        m = F.interpolate(m, size=latent_hw, mode="nearest")
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        masks.append(m > threshold)
    return (masks[0] | masks[1]).float()


def _steps_window(window: tuple[float, float], step: int, total: int) -> bool:
    return int(window[0] * total) <= step < int(window[1] * total)


# ----------------------------------------------------------------------------------------------
# the runtime controller

@dataclass
class _Blend:
    """LocalBlend's attention store: per branch and map resolution (downsample factor), the running
    sum of the word maps over every layer call and step so far, and how many were added (P2P's code
    sums its AttentionStore over the steps and blends with that). ``seen`` counts this step's maps."""
    src: dict = field(default_factory=dict)
    tar: dict = field(default_factory=dict)
    seen: int = 0

    def add(self, side: str, factor: int, m: Tensor) -> None:
        store = self.src if side == "src" else self.tar
        total, count = store.get(factor, (0.0, 0))
        store[factor] = (m.detach().float() + total, count + 1)
        self.seen += 1

    def mean(self, side: str, factor: int) -> Tensor:
        total, count = (self.src if side == "src" else self.tar)[factor]
        return total / count


class AttentionController:
    """Per-edit state: which step it is, what the capture call stored, the LocalBlend maps.

    A loop calls ``begin_step(i)``, then ``capture(roles)`` and the predictor on the source latent,
    then ``inject(roles)`` and the predictor on the edited latent, then ``off()``. ``roles[j]`` is
    the role of the predictor's j-th conditioning handle (SOURCE, SOURCE_BASE, BASE, TARGET or None).
    ``attention`` computes unedited attention (the host's fastest kernel)."""

    def __init__(self, control: AttentionControl, total_steps: int, attention: Callable = sdpa):
        self.p2p = control.p2p
        self.masa = control.masactrl
        self.total = int(total_steps)
        self.attention = attention
        self.step = 0
        self.mode = "off"
        self.roles: tuple = ()
        self.store: dict = {}
        self.base_source = SOURCE_BASE  # the captured role whose keys/values the base branch reads
        self.blend = _Blend()
        self.edited_calls = 0   # attention calls in which the target branch was edited

    # loop protocol --------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        if int(step) < self.step:  # a new run with the same controller: a fresh attention store
            self.blend = _Blend()
        self.step = int(step)
        self.store.clear()
        self.base_source = SOURCE_BASE
        self.blend.seen = 0

    def capture(self, roles: Sequence, base_is_source: bool = False) -> None:
        """``base_is_source``: the base prompt is the source prompt, so no SOURCE_BASE chunk is
        evaluated (it would repeat the SOURCE chunk: same prompt, same latent) and the base branch
        reads the SOURCE chunk's keys/values."""
        self.mode, self.roles = "capture", tuple(roles)
        self.base_source = SOURCE if base_is_source else SOURCE_BASE

    def inject(self, roles: Sequence) -> None:
        self.mode, self.roles = "inject", tuple(roles)

    def off(self) -> None:
        self.mode, self.roles = "off", ()

    # which edits are active -----------------------------------------------------------------
    def cross_active(self) -> bool:
        return self.p2p is not None and _steps_window(self.p2p.cross_steps, self.step, self.total)

    def self_replace_active(self, n_queries: int) -> bool:
        return (self.p2p is not None and n_queries <= self.p2p.self_max_tokens
                and _steps_window(self.p2p.self_steps, self.step, self.total))

    def masa_active(self, layer: int) -> bool:
        return self.masa is not None and self.step >= self.masa.start_step and layer >= self.masa.start_layer

    def needs_source_base(self) -> bool:
        """MasaCtrl on the base branch needs the source latent's keys/values under the base prompt."""
        return self.masa is not None and self.masa.base_strategy != "none"

    def masa_base_active(self, layer: int) -> bool:
        return self.needs_source_base() and self.masa_active(layer)

    def blend_active(self) -> bool:
        return (self.p2p is not None and self.p2p.blends
                and self.step >= int(self.p2p.blend_start * self.total))

    def blend_recording(self) -> bool:
        """LocalBlend's maps are stored from the first step on (its mask is their running mean)."""
        return self.p2p is not None and self.p2p.blends

    def active(self) -> bool:
        """Whether this step needs the source branch at all."""
        if self.p2p is not None and (self.cross_active() or self.blend_recording()
                                     or _steps_window(self.p2p.self_steps, self.step, self.total)):
            return True
        return self.masa is not None and self.step >= self.masa.start_step

    # the hook -------------------------------------------------------------------------------
    def attend(self, kind: str, key: Hashable, layer: int, q: Tensor, k: Tensor, v: Tensor, heads: int,
               chunk_roles: Sequence, latent_hw: Optional[tuple[int, int]] = None) -> Tensor:
        """Attention of one layer for a batch made of equal chunks, chunk j in role chunk_roles[j].
        ``kind`` is "self" or "cross"; ``key`` names the layer; ``layer`` is its forward-order index
        among the self-attention layers."""
        if self.mode == "off" or not any(r in (SOURCE, SOURCE_BASE, BASE, TARGET) for r in chunk_roles):
            return self.attention(q, k, v, heads)
        n = len(chunk_roles)
        qs, ks, vs = q.chunk(n), k.chunk(n), v.chunk(n)
        outs = []
        for role, qc, kc, vc in zip(chunk_roles, qs, ks, vs):
            if self.mode == "capture" and role in (SOURCE, SOURCE_BASE):
                outs.append(self._capture(kind, key, layer, role, qc, kc, vc, heads, latent_hw))
            elif self.mode == "inject" and role in (TARGET, BASE):
                outs.append(self._inject(kind, key, layer, role, qc, kc, vc, heads, latent_hw))
            else:
                outs.append(self.attention(qc, kc, vc, heads))
        return torch.cat(outs)

    def attend_joint(self, key: Hashable, layer: int, q: Tensor, k: Tensor, v: Tensor, chunk_roles: Sequence,
                     image: slice, token_dim: int,
                     chunk_attention: Optional[Callable[[int], Callable]] = None) -> Tensor:
        """A transformer block's joint attention (prompt and image tokens in one sequence, the image's
        at ``image`` along ``token_dim``) for a batch of equal chunks in ``chunk_roles``: MasaCtrl
        only (:func:`joint_mutual_attention`); ``self.attention`` is called as attention(q, k, v),
        or ``chunk_attention(j)`` for chunk j where the host's attention differs per chunk (its rows
        of an attention mask of the whole batch). An image-only self-attention (SD3.5's) is the case
        ``image`` = all tokens."""
        if self.mode == "off" or not any(r in (SOURCE, SOURCE_BASE, BASE, TARGET) for r in chunk_roles):
            return self.attention(q, k, v)
        n = len(chunk_roles)
        outs = []
        for j, (role, qc, kc, vc) in enumerate(zip(chunk_roles, q.chunk(n), k.chunk(n), v.chunk(n))):
            attention = chunk_attention(j) if chunk_attention is not None else self.attention
            if self.mode == "capture" and (role == SOURCE and self.masa_active(layer)
                                           or role == SOURCE_BASE and self.masa_base_active(layer)):
                self.store[("kv", role, key)] = (_tokens(kc, token_dim, image.start, image.stop),
                                                  _tokens(vc, token_dim, image.start, image.stop))
            elif self.mode == "inject" and role == TARGET and self.masa_active(layer):
                k_src, v_src = self._stored(("kv", SOURCE, key))
                self.edited_calls += 1
                outs.append(joint_mutual_attention(qc, kc, vc, k_src, v_src, image, token_dim, self.masa.strategy,
                                                   attention))
                continue
            elif self.mode == "inject" and role == BASE and self.masa_base_active(layer):
                k_src, v_src = self._stored(("kv", self.base_source, key))
                outs.append(joint_mutual_attention(qc, kc, vc, k_src, v_src, image, token_dim,
                                                   self.masa.base_strategy, attention))
                continue
            outs.append(attention(qc, kc, vc))
        return torch.cat(outs)

    def _blend_layer(self, n_queries: int, latent_hw) -> Optional[tuple[int, tuple[int, int]]]:
        """(downsample factor, map size) of a cross-attention layer whose maps LocalBlend records."""
        if latent_hw is None or not self.blend_recording():
            return None
        for f in (1, 2, 4, 8, 16, 32, 64):
            h, w = math.ceil(latent_hw[0] / f), math.ceil(latent_hw[1] / f)
            if h * w == n_queries:
                return f, (h, w)
        return None

    @staticmethod
    def _word_map(p: Tensor, weights: Tensor, layer: tuple[int, tuple[int, int]]) -> tuple[int, Tensor]:
        m = (p * weights.to(p)).sum(-1).mean(1)          # [b, N]: sum over words, mean over heads
        return layer[0], m.reshape(m.shape[0], 1, *layer[1])

    def _capture(self, kind, key, layer, role, q, k, v, heads, latent_hw) -> Tensor:
        if kind == "self":
            if role == SOURCE and self.masa_active(layer) or role == SOURCE_BASE and self.masa_base_active(layer):
                self.store[("kv", role, key)] = (k, v)
            if role == SOURCE and self.self_replace_active(q.shape[1]):
                # the source's queries and keys, not its N x N maps: the maps are recomputed at
                # injection (the same function of the same tensors), so the store holds 2 N C
                # numbers per layer instead of heads N^2 (SDXL at 1024 px: 0.6 GB, not 5 GB)
                self.store[("self", key)] = (q, k)
                return apply_probs(attention_probs(q, k, heads), v, heads)
            return self.attention(q, k, v, heads)
        hw = self._blend_layer(q.shape[1], latent_hw) if role == SOURCE else None
        if role == SOURCE and (self.cross_active() or hw is not None):
            p = attention_probs(q, k, heads)
            if self.cross_active():
                self.store[("cross", key)] = p
            if hw is not None:
                self.blend.add("src", *self._word_map(p, self.p2p.blend_source, hw))
            return apply_probs(p, v, heads)
        return self.attention(q, k, v, heads)

    def stored_bytes(self) -> int:
        """Bytes held in the per-step store (the source's captured tensors)."""
        total = 0
        for value in self.store.values():
            for t in (value if isinstance(value, tuple) else (value,)):
                total += t.numel() * t.element_size()
        return total

    def _stored(self, name: tuple) -> Tensor:
        if name not in self.store:
            raise RuntimeError(f"attention control: nothing captured for {name}; the source branch must be "
                               f"evaluated (capture) before the target branch (inject) at every step")
        return self.store[name]

    def _inject(self, kind, key, layer, role, q, k, v, heads, latent_hw) -> Tensor:
        if kind == "self":
            if role == TARGET and self.masa_active(layer):
                k_src, v_src = self._stored(("kv", SOURCE, key))
                self.edited_calls += 1
                return mutual_self_attention(q, k, v, k_src, v_src, heads, self.masa.strategy, self.attention)
            if role == BASE and self.masa_base_active(layer):
                k_src, v_src = self._stored(("kv", self.base_source, key))
                return mutual_self_attention(q, k, v, k_src, v_src, heads, self.masa.base_strategy, self.attention)
            if role == TARGET and self.self_replace_active(q.shape[1]):
                self.edited_calls += 1
                q_src, k_src = self._stored(("self", key))
                return apply_probs(attention_probs(q_src.to(q.device), k_src.to(q.device), heads), v, heads)
            return self.attention(q, k, v, heads)
        if role != TARGET:
            return self.attention(q, k, v, heads)
        hw = self._blend_layer(q.shape[1], latent_hw)
        if not self.cross_active() and hw is None:
            return self.attention(q, k, v, heads)
        p = attention_probs(q, k, heads)
        if self.p2p.context_length != p.shape[-1]:
            raise ValueError(f"attention control was built for {self.p2p.context_length} context tokens, the model "
                             f"attends to {p.shape[-1]}; long prompts (over 75 tokens) are not supported")
        if hw is not None:
            self.blend.add("tar", *self._word_map(p, self.p2p.blend_target, hw))
        if self.cross_active():
            p = p2p_cross_probs(self._stored(("cross", key)), p, self.p2p)
            self.edited_calls += 1
        return apply_probs(p, v, heads)

    # LocalBlend -----------------------------------------------------------------------------
    def blend_latent(self, z: Tensor, z_src: Tensor) -> Tensor:
        """After a step: z <- z_src + M (z - z_src), M the LocalBlend mask of the word maps' running
        mean over every step so far (P2P's attention store)."""
        if not self.blend_active():
            return z
        if not self.blend.seen:
            raise RuntimeError("LocalBlend: no cross-attention maps were seen in this step")
        # the maps of the layers nearest to 1/blend_downsample of the latent (P2P: the 16x16 maps of
        # a 64x64 latent), averaged over those layers and the steps
        factors = sorted(set(self.blend.src) & set(self.blend.tar),
                         key=lambda f: (abs(math.log(f / self.p2p.blend_downsample)), -f))
        if not factors:
            raise RuntimeError("LocalBlend: the source and target branches shared no cross-attention resolution")
        f = factors[0]
        m = local_blend_mask(self.blend.mean("src", f), self.blend.mean("tar", f), tuple(z.shape[-2:]),
                             self.p2p.blend_threshold, self.p2p.blend_dilation)
        return z_src + m.to(z) * (z - z_src)
