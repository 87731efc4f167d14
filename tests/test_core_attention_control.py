"""Prompt-to-prompt and MasaCtrl attention control (core/attention_control.py) on exact formulas and
on a toy attention model that calls the controller like the ComfyUI glue does."""
import pytest
import torch

from comfyui_inverse.core import attention_control as ac
from comfyui_inverse.core import proxedit
from support.core_models import TOKENS, toy_inversion

T = TOKENS  # context tokens in these tests (the toy attention model's)


def _p2p(**kw):
    mapper, alphas = ac.replace_mapping([1, 2, 3], [1, 5, 3], T)
    return ac.PromptToPrompt("replace", mapper, alphas, **kw)


def test_replace_mapping_needs_equal_token_counts():
    mapper, alphas = ac.replace_mapping([10, 11, 12], [10, 13, 12], T)
    assert torch.equal(mapper, torch.arange(T)) and torch.equal(alphas, torch.ones(T))
    with pytest.raises(ac.TokenMappingError, match="source has 3, the target 4"):
        ac.replace_mapping([10, 11, 12], [10, 13, 14, 12], T)


def test_refine_mapping_aligns_tokens_and_marks_new_ones():
    # "a cat sitting" -> "a fluffy cat sitting": BOS at 0, prompt tokens from 1
    mapper, alphas = ac.refine_mapping([7, 8, 9], [7, 4, 8, 9], T)
    assert mapper[:5].tolist() == [0, 1, 2, 2, 3] and alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert mapper[5:].tolist() == [4, 5, 6] and alphas[5:].tolist() == [1, 1, 1]   # EOS/padding end to end
    assert ac.changed_positions([7, 8, 9], [7, 4, 8, 9]) == ([], [2])
    assert ac.token_positions([7, 4, 8, 9], [8, 9]) == [3, 4]


def test_cross_probs_replace_refine_reweight():
    g = torch.Generator().manual_seed(0)
    p_src = torch.softmax(torch.randn(2, 3, 5, T, generator=g), -1)
    p_tar = torch.softmax(torch.randn(2, 3, 5, T, generator=g), -1)
    assert torch.equal(ac.p2p_cross_probs(p_src, p_tar, _p2p()), p_src)
    mapper, alphas = ac.refine_mapping([7, 8, 9], [7, 4, 8, 9], T)
    ref = ac.p2p_cross_probs(p_src, p_tar, ac.PromptToPrompt("refine", mapper, alphas))
    assert torch.equal(ref[..., 2], p_tar[..., 2]) and torch.equal(ref[..., 3], p_src[..., 2])
    eq = torch.ones(T)
    eq[2] = 3.0
    rw = ac.p2p_cross_probs(p_src, p_tar, _p2p(equalizer=eq))
    assert torch.allclose(rw[..., 2], 3 * p_src[..., 2]) and torch.equal(rw[..., 1], p_src[..., 1])


def _qkv(seed, b=2, n=16, m=16, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g), torch.randn(b, m, d, generator=g), torch.randn(b, m, d, generator=g)


def test_target_cross_attention_uses_the_source_maps_with_its_own_values():
    ctl = ac.AttentionController(ac.AttentionControl(p2p=_p2p()), total_steps=10)
    ctl.begin_step(0)
    qs, ks, vs = _qkv(0, m=T)
    qt, kt, vt = _qkv(1, m=T)
    ctl.capture([ac.SOURCE])
    out_src = ctl.attend("cross", "c", 0, qs, ks, vs, 2, [ac.SOURCE])
    assert torch.allclose(out_src, ac.sdpa(qs, ks, vs, 2), atol=1e-5)   # capture does not change the source
    ctl.inject([ac.BASE, ac.TARGET])
    out = ctl.attend("cross", "c", 0, torch.cat([qt, qt]), torch.cat([kt, kt]), torch.cat([vt, vt]), 2,
                     [ac.BASE, ac.TARGET])
    base, tar = out.chunk(2)
    assert torch.allclose(base, ac.sdpa(qt, kt, vt, 2), atol=1e-5)       # base branch untouched
    expected = ac.apply_probs(ac.attention_probs(qs, ks, 2), vt, 2)
    assert torch.allclose(tar, expected, atol=1e-5)
    assert not torch.allclose(tar, ac.sdpa(qt, kt, vt, 2), atol=1e-3)
    # outside the cross-replacement window the target attends with its own maps
    ctl.begin_step(9)
    ctl.inject([ac.TARGET])
    assert torch.allclose(ctl.attend("cross", "c", 0, qt, kt, vt, 2, [ac.TARGET]), ac.sdpa(qt, kt, vt, 2), atol=1e-5)


def test_self_attention_replacement_only_on_small_maps_and_early_steps():
    ctl = ac.AttentionController(ac.AttentionControl(p2p=_p2p(self_steps=(0.0, 0.5), self_max_tokens=16)), 10)
    qs, ks, vs = _qkv(0)
    qt, kt, vt = _qkv(1)
    for step, n_ok in ((0, True), (6, False)):
        ctl.begin_step(step)
        ctl.capture([ac.SOURCE])
        ctl.attend("self", "s", 0, qs, ks, vs, 2, [ac.SOURCE])
        ctl.inject([ac.TARGET])
        out = ctl.attend("self", "s", 0, qt, kt, vt, 2, [ac.TARGET])
        want = ac.apply_probs(ac.attention_probs(qs, ks, 2), vt, 2) if n_ok else ac.sdpa(qt, kt, vt, 2)
        assert torch.allclose(out, want, atol=1e-5)
    big = ac.AttentionController(ac.AttentionControl(p2p=_p2p(self_max_tokens=15)), 10)
    big.begin_step(0)
    big.capture([ac.SOURCE])
    big.attend("self", "s", 0, qs, ks, vs, 2, [ac.SOURCE])
    big.inject([ac.TARGET])
    assert torch.allclose(big.attend("self", "s", 0, qt, kt, vt, 2, [ac.TARGET]), ac.sdpa(qt, kt, vt, 2), atol=1e-5)


@pytest.mark.parametrize("strategy", ["source", "joint", "none"])
def test_masactrl_strategies(strategy):
    masa = ac.MutualSelfAttention(start_step=2, start_layer=1, strategy=strategy, base_strategy="none")
    ctl = ac.AttentionController(ac.AttentionControl(masactrl=masa), 10)
    qs, ks, vs = _qkv(0)
    qt, kt, vt = _qkv(1)
    want = {"source": ac.sdpa(qt, ks, vs, 2), "joint": ac.sdpa(qt, torch.cat([ks, kt], 1), torch.cat([vs, vt], 1), 2),
            "none": ac.sdpa(qt, kt, vt, 2)}[strategy]
    for step, layer, active in ((3, 1, True), (3, 0, False), (1, 1, False)):
        ctl.begin_step(step)
        assert ctl.active() == (step >= 2)
        ctl.capture([ac.SOURCE])
        ctl.attend("self", ("l", layer), layer, qs, ks, vs, 2, [ac.SOURCE])
        ctl.inject([ac.BASE, ac.TARGET])
        out = ctl.attend("self", ("l", layer), layer, torch.cat([qt, qt]), torch.cat([kt, kt]), torch.cat([vt, vt]), 2,
                         [ac.BASE, ac.TARGET])
        base, tar = out.chunk(2)
        assert torch.allclose(base, ac.sdpa(qt, kt, vt, 2), atol=1e-5)  # base_strategy "none"
        assert torch.allclose(tar, want if active else ac.sdpa(qt, kt, vt, 2), atol=1e-5)


def _explicit_attention(q, k, v):
    """Softmax attention written out, [B, heads, L, d] (the layout Flux hands its attention)."""
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    return p @ v


@pytest.mark.parametrize("strategy", ["source", "joint", "none"])
@pytest.mark.parametrize("image_first", [False, True])
def test_masactrl_on_joint_attention_keeps_the_prompt_tokens_and_shares_the_source_image(strategy, image_first):
    """A joint-attention block (prompt and image tokens in one sequence): the target's queries attend
    to its own prompt tokens and the source's image tokens ("source"), plus its own image tokens
    ("joint"), or to its own sequence ("none"); written out token by token. Both token layouts
    (Flux [B, heads, L, d], MM-DiT [B, L, heads d]) give the same result."""
    g = torch.Generator().manual_seed(3)
    n_txt, n_img, heads, d = 5, 7, 2, 4
    masa = ac.MutualSelfAttention(start_step=1, start_layer=1, strategy=strategy, base_strategy="none")
    image = slice(0, n_img) if image_first else slice(n_txt, n_txt + n_img)
    txt = [i for i in range(n_txt + n_img) if not image.start <= i < image.stop]
    src, tar = ([torch.randn(1, heads, n_txt + n_img, d, generator=g) for _ in range(3)] for _ in range(2))
    qt, kt, vt = tar
    k_src_img, v_src_img = src[1][:, :, image], src[2][:, :, image]
    keys = {"source": (torch.cat([kt[:, :, txt], k_src_img], 2), torch.cat([vt[:, :, txt], v_src_img], 2)),
            "joint": (torch.cat([kt[:, :, txt], k_src_img, kt[:, :, image]], 2),
                      torch.cat([vt[:, :, txt], v_src_img, vt[:, :, image]], 2)),
            "none": (kt, vt)}[strategy]
    want = _explicit_attention(qt, *keys)  # attention does not depend on the order of the keys

    def merged(x):  # [B, heads, L, d] -> [B, L, heads d]
        return x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], heads * d)

    for token_dim in (2, 1):
        lay = (lambda x: x) if token_dim == 2 else merged
        ctl = ac.AttentionController(ac.AttentionControl(masactrl=masa), 10)
        if token_dim == 2:
            ctl.attention = _explicit_attention
        else:
            def attention(q, k, v):
                split = [x.reshape(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3) for x in (q, k, v)]
                return merged(_explicit_attention(*split))
            ctl.attention = attention
        for step, layer, active in ((2, 1, True), (2, 0, False), (0, 1, False)):
            ctl.begin_step(step)
            ctl.capture([ac.SOURCE])
            ctl.attend_joint("b", layer, *(lay(x) for x in src), [ac.SOURCE], image, token_dim)
            ctl.inject([ac.BASE, ac.TARGET])
            out = ctl.attend_joint("b", layer, *(lay(torch.cat([x, x])) for x in tar), [ac.BASE, ac.TARGET], image,
                                   token_dim)
            base, got = out.chunk(2)
            plain = lay(_explicit_attention(qt, kt, vt))
            assert torch.allclose(base, plain, atol=1e-5)  # base_strategy "none"
            assert torch.allclose(got, lay(want) if active else plain, atol=1e-5), (strategy, token_dim, step, layer)


def test_masactrl_on_the_base_branch_uses_the_source_latent_under_the_base_prompt():
    masa = ac.MutualSelfAttention(start_step=0, start_layer=0, strategy="none", base_strategy="source")
    ctl = ac.AttentionController(ac.AttentionControl(masactrl=masa), 10)
    ctl.begin_step(0)
    assert ctl.needs_source_base()
    qs, ks, vs = _qkv(0)
    qb, kb, vb = _qkv(2)
    qt, kt, vt = _qkv(1)
    ctl.capture([ac.SOURCE, ac.SOURCE_BASE])
    ctl.attend("self", "s", 0, torch.cat([qs, qb]), torch.cat([ks, kb]), torch.cat([vs, vb]), 2, [ac.SOURCE, ac.SOURCE_BASE])
    ctl.inject([ac.BASE, ac.TARGET])
    base, tar = ctl.attend("self", "s", 0, torch.cat([qt, qt]), torch.cat([kt, kt]), torch.cat([vt, vt]), 2,
                           [ac.BASE, ac.TARGET]).chunk(2)
    assert torch.allclose(base, ac.sdpa(qt, kb, vb, 2), atol=1e-5)
    assert torch.allclose(tar, ac.sdpa(qt, kt, vt, 2), atol=1e-5)


def test_inject_without_capture_is_a_clear_error():
    ctl = ac.AttentionController(ac.AttentionControl(p2p=_p2p()), 10)
    ctl.begin_step(0)
    ctl.inject([ac.TARGET])
    q, k, v = _qkv(0, m=T)
    with pytest.raises(RuntimeError, match="capture"):
        ctl.attend("cross", "c", 0, q, k, v, 2, [ac.TARGET])


def test_local_blend_mask_threshold_and_union():
    src = torch.zeros(1, 1, 4, 4)
    src[0, 0, 0, 0] = 1.0
    tar = torch.zeros(1, 1, 4, 4)
    tar[0, 0, 3, 3] = 1.0
    tar[0, 0, 3, 0] = 0.2
    m = ac.local_blend_mask(src, tar, (8, 8), threshold=0.3, dilation=0)
    assert m.shape == (1, 1, 8, 8) and int(m.sum()) == 8 and m[0, 0, 0, 0] == 1 and m[0, 0, 7, 7] == 1
    assert m[0, 0, 7, 0] == 0


# ------------------------------------------------------------------------------------------------
# the full edit loop on the toy attention model

def test_hooks_change_only_the_conditional_target_branch_in_the_model():
    model, res, _ = toy_inversion()
    z_src, z = res.trajectory[3], res.trajectory[3] + 0.3
    plain = model(z, 500, ["src", "tar"])
    model.controller = ctl = ac.AttentionController(
        ac.AttentionControl(p2p=_p2p(), masactrl=ac.MutualSelfAttention(0, 0, base_strategy="none")), 10)
    e_base, e_tar = proxedit.edit_predict(model, z, z_src, 500, "src", "tar", ctl, "src", step=0)
    assert torch.allclose(e_base, plain[0], atol=1e-5)
    assert (e_tar - plain[1]).abs().max() > 1e-3
    assert ctl.edited_calls == 3 and ctl.mode == "off"


def test_replace_with_the_source_prompt_on_the_source_latent_is_the_identity():
    model, res, _ = toy_inversion()
    z = res.trajectory[4]
    plain = model(z, 400, ["src", "same"])
    model.controller = ctl = ac.AttentionController(ac.AttentionControl(p2p=_p2p(self_max_tokens=64)), 10)
    e_base, e_tar = proxedit.edit_predict(model, z, z, 400, "src", "same", ctl, "src", step=0)
    assert torch.allclose(e_tar, plain[1], atol=1e-5) and torch.allclose(e_base, plain[0], atol=1e-5)


def test_edit_with_control_costs_one_extra_call_per_controlled_step_and_local_blend_keeps_the_rest():
    model, res, z0 = toy_inversion(steps=10)
    mapper, alphas = ac.replace_mapping([1, 2, 3], [1, 5, 3], T)
    blend_s, blend_t = torch.zeros(T), torch.zeros(T)
    blend_s[2] = blend_t[2] = 1.0
    p2p = ac.PromptToPrompt("replace", mapper, alphas, cross_steps=(0.0, 0.8), self_steps=(0.0, 0.4),
                            blend_source=blend_s, blend_target=blend_t, blend_start=0.0, blend_downsample=1,
                            blend_threshold=0.9, blend_dilation=0)  # the toy's running-mean maps are flat
    model.controller = ctl = ac.AttentionController(ac.AttentionControl(p2p=p2p), 10)
    model.calls = 0
    cfg = proxedit.ProxConfig(guidance=7.5, quantile=0.5)
    edit = proxedit.prox_edit(model, res, "src", "tar", cfg, control=ctl)[-1]
    assert model.calls == 20   # LocalBlend from step 0 needs the source maps at every step
    same = (edit - z0).abs() < 1e-6                    # outside the blend mask: the stored trajectory's z_0
    assert 0.05 < float(same.float().mean()) < 0.95
    model.controller = None
    free = proxedit.prox_edit(model, res, "src", "tar", cfg)[-1]
    assert (edit - free).abs().max() > 1e-3


def test_local_blend_uses_the_running_mean_of_the_maps_over_the_steps():
    """Review defect 6: P2P's code blends with its attention store, the maps summed over every
    step so far; a mask from the current step's maps alone differs."""
    blend = torch.zeros(T)
    blend[2] = 1.0
    ctl = ac.AttentionController(ac.AttentionControl(p2p=_p2p(blend_source=blend, blend_target=blend,
                                                              blend_start=0.75, blend_threshold=0.5,
                                                              blend_dilation=0, blend_downsample=1)), 4)
    maps = []
    for step in range(4):  # the word's map moves: left half for steps 0-2, the right edge at step 3
        m = torch.zeros(1, 1, 8, 8)
        if step < 3:
            m[..., :4] = 1.0
        else:
            m[..., 7:] = 1.0
        maps.append(m)
        ctl.begin_step(step)
        ctl.blend.add("src", 1, m)
        ctl.blend.add("tar", 1, m)
    z_src, z = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    out = ctl.blend_latent(z, z_src)
    mean = torch.stack(maps).mean(0)
    expected = ac.local_blend_mask(mean, mean, (8, 8), 0.5, 0)
    assert torch.equal(out[:, :1], expected)
    assert not torch.equal(expected, ac.local_blend_mask(maps[-1], maps[-1], (8, 8), 0.5, 0))
    ctl.begin_step(0)  # a new run starts a new attention store
    assert not ctl.blend.src


def test_masactrl_edits_both_cfg_branches_by_default():
    """Review defect 7: MasaCtrl's code and ProxEdit supplement E inject the source's keys/values
    into the unconditional (base) branch too."""
    assert ac.MutualSelfAttention().base_strategy == "source"
    model, res, _ = toy_inversion()
    z_src, z = res.trajectory[3], res.trajectory[3] + 0.3
    plain = model(z, 500, ["src", "tar"])
    model.controller = ctl = ac.AttentionController(ac.AttentionControl(masactrl=ac.MutualSelfAttention(0, 0)), 10)
    e_base, e_tar = proxedit.edit_predict(model, z, z_src, 500, "src", "tar", ctl, "src", step=0)
    assert (e_base - plain[0]).abs().max() > 1e-3 and (e_tar - plain[1]).abs().max() > 1e-3


def test_p2p_store_is_bounded_at_sdxl_1024px():
    """Prompt-to-prompt's per-step store at SDXL's 1024 px shapes (128x128 latent; 10 layers at
    64x64 with 640 channels and 10 heads, 60 at 32x32 with 1280 channels and 20 heads; 77 context
    tokens) stays within the bound the module states: 2 N C numbers per self-attention layer with
    N <= self_max_tokens, plus heads N L per cross-attention layer, in the tensors' own dtype
    (float16 here: half of the float32 figure) -- not the heads N^2 maps (5 GB in float32)."""
    torch.manual_seed(0)
    mapper, alphas = ac.replace_mapping(list(range(1, 8)), [1, 2, 9, 4, 5, 6, 7], 77)
    ctl = ac.AttentionController(ac.AttentionControl(p2p=ac.PromptToPrompt("replace", mapper, alphas)), 50)
    ctl.begin_step(0)
    ctl.capture([ac.SOURCE])
    dtype, bound, maps = torch.float16, 0, 0
    layers = [(4096, 640, 10)] * 4 + [(1024, 1280, 20)] * 20 + [(1024, 1280, 20)] * 10 + \
             [(1024, 1280, 20)] * 30 + [(4096, 640, 10)] * 6
    for i, (n, c, heads) in enumerate(layers):
        x = torch.randn(1, n, c, dtype=dtype)
        ctx = torch.randn(1, 77, c, dtype=dtype)
        if n <= 32 * 32:  # a 64x64 self-attention is not replaced, and too big for this test's CPU
            ctl.attend("self", ("l", i), i, x, x, x, heads, [ac.SOURCE], (128, 128))
            bound += 2 * n * c * 2
            maps += heads * n * n * 4
        ctl.attend("cross", ("l", i), i, x, ctx, ctx, heads, [ac.SOURCE], (128, 128))
        bound += heads * n * 77 * 4  # cross maps are float32 probabilities
    stored = ctl.stored_bytes()
    assert 0 < stored <= bound
    assert stored < 1.0e9 < maps
