"""The pack as ComfyUI loads it (the real ComfyUI, tiny SD1.5): every node registers, with a schema a
person can read, and bad input over every node ends in a clear error or a finite result."""
from __future__ import annotations

import importlib

import torch

from support import comfy_host
from support.integration import _editing, _encode, _nodes, _npi, _restore_args

comfy_host.skip_module_without_host()


# --------------------------------------------------------------------------------------------
# registration and schemas

def test_pack_registers_with_no_import_error(pack):
    import nodes

    assert comfy_host._state["load_ok"] is True
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(comfy_host.PACK_DIR_NAME)}
    assert {"InverseDDIMInversion", "InverseExactInversion", "InverseNegativePromptInversion", "InverseNullTextInversion", "InverseDDPMInversion", "InverseSampleFromInversion", "InverseSamplerDDIMInversion"} <= set(ours)


def test_every_node_schema_has_description_and_tooltips(pack):
    import nodes

    ours = [v for v in nodes.NODE_CLASS_MAPPINGS.values()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(comfy_host.PACK_DIR_NAME)]
    assert ours
    for cls in ours:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("Inverse"), schema.node_id
        assert schema.category.split("/")[0] == "Inverse"
        assert schema.display_name and len(schema.description) > 40, schema.node_id
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{schema.node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{schema.node_id} output {o.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["description"] == schema.description
        for i in schema.inputs:  # the frontend randomizes seeds unless told they have a control value
            if "seed" in i.id:
                assert getattr(i, "control_after_generate", None), f"{schema.node_id}.{i.id}"



# the secondary inputs each node folds away (issue 21), as /object_info serves them: method-specific and expert
ADVANCED = {
    "InverseRestore": {"gluing", "stochasticity", "decoder_memory", "tile_size", "stsl_inner_steps", "stsl_lambda",
                       "stsl_trace_weight", "stsl_lr", "stsl_noise_samples", "stsl_start", "p2l_prompt_steps",
                       "p2l_prompt_lr", "p2l_project_every", "p2l_cg_iters", "p2l_cg_lambda"},
    "InverseExactInversion": {"spacing", "iterations", "tolerance", "lambda_prior", "adjust_rounds", "krylov"},
    "InverseProxEdit": {"fixed_threshold", "dilation", "inversion_guidance", "reconstruction_guidance", "t_rec",
                        "source_null_mix"},
    "InverseMasaCtrl": {"start_layer", "base_strategy"},
    "InverseDecoderInversion": {"momentum", "precision", "decoder_memory", "tile_size"},
}


def test_secondary_inputs_are_marked_advanced_and_keep_the_widget_order(pack):
    import nodes

    for node_id, expected in ADVANCED.items():
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        flagged = {name for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
                   if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("advanced")}
        assert expected <= flagged, (node_id, expected - flagged)
        # the main inputs stay in view: the method and what the paper tunes first
        assert not flagged & {"method", "steps", "seed", "quantile", "guidance", "step_size"}, (node_id, flagged)


# --------------------------------------------------------------------------------------------
# fuzz: bad input over every node ends in a clear error or a finite result

def _fuzz_cases():
    """(name, fn(ctx)) over every node; ctx holds the loaded model, a good latent, an inversion, ..."""
    nan = float("nan")
    inf = float("inf")

    def lat(fill=None, shape=(1, 4, 8, 8)):
        z = torch.zeros(shape)
        if fill is not None:
            z.view(-1)[0] = fill
        return {"samples": z}

    def ddim(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", latent=c["lat"])
        a.update(kw)
        return c["n"].DDIMInversion.execute(c["model"], a.pop("positive", c["pos"]), **a)

    def exact(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", method="anderson", iterations=2, tolerance=1e-4,
                 lambda_prior=0.1, adjust_rounds=0, latent=c["lat"])
        a.update(kw)
        return c["n"].ExactInversion.execute(c["model"], c["pos"], **a)

    def npi(c, **kw):
        a = dict(steps=4, spacing="auto", latent=c["lat"])
        a.update(kw)
        return c["n"].NegativePromptInversion.execute(c["model"], c["pos"], **a)

    def null(c, **kw):
        a = dict(steps=3, guidance=7.5, spacing="auto", inner_steps=2, learning_rate=0.01, tolerance=1e-5,
                 negative=c["neg"], latent=c["lat"])
        a.update(kw)
        return c["n"].NullTextInversion.execute(c["model"], c["pos"], **a)

    def ddpm(c, **kw):
        a = dict(steps=4, guidance=1.0, spacing="auto", seed=0, latent=c["lat"])
        a.update(kw)
        return c["n"].DDPMInversion.execute(c["model"], c["pos"], **a)

    def sample(c, **kw):
        a = dict(inversion=c["res"], guidance=7.5, skip_steps=0)
        a.update(kw)
        return c["n"].SampleFromInversion.execute(c["model"], c["pos"], **a)

    def prox(c, **kw):
        a = dict(inversion=c["res"], target=c["neg"], base="source", guidance=7.5, prox="hard", quantile=0.7,
                 fixed_threshold=0.0, dilation=1, inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400,
                 source_null_mix=0.0, skip_steps=0, negative=c["neg"])
        a.update(kw)
        return c["e"].ProxEdit.execute(c["model"], **a)

    def guider(c, **kw):
        a = dict(inversion=c["res"], target=c["neg"], base="source", guidance=7.5, prox="hard", quantile=0.7,
                 fixed_threshold=0.0, dilation=1, inversion_guidance=0.0, reconstruction_guidance=0.0, t_rec=400,
                 source_null_mix=0.0, negative=c["neg"])
        a.update(kw)
        return c["e"].ProxEditGuider.execute(c["model"], **a)

    def p2p(c, **kw):
        a = dict(source_prompt="a photo of a cat", target_prompt="a photo of a dog", mode="replace",
                 cross_replace=0.8, self_replace=0.5, reweight="", local_blend=False, blend_words="",
                 blend_threshold=0.3, blend_start=0.2)
        a.update(kw)
        return c["e"].PromptToPrompt.execute(c["clip"], **a)

    def masa(c, **kw):
        a = dict(start_step=4, start_layer=2, strategy="source", base_strategy="source")
        a.update(kw)
        return c["e"].MasaCtrl.execute(**a)

    def dinv(c, image=None, **kw):
        a = dict(method="gradient_free_adam", iterations=2, step_size=0.01, momentum=0.3, precision="auto")
        a.update(kw)
        return c["d"].DecoderInversion.execute(torch.rand(1, 64, 64, 3) if image is None else image, c["vae"], **a)

    def op(c, **kw):
        a = dict(kind="sr_avgpool", scale_factor=4, kernel_size=9, blur_sigma=3.0, motion_intensity=0.5,
                 mask_amount=0.4, sigma_y=0.05, seed=1)
        a.update(kw)
        return c["r"].DegradationOperator.execute(**a)

    def degrade(c, image=None, **kw):
        return c["r"].DegradeImage.execute(torch.rand(1, 64, 64, 3) if image is None else image, c["op"], 0)

    def restore(c, measurement=None, **kw):
        y = torch.rand(1, 16, 16, 3) if measurement is None else measurement
        return c["r"].Restore.execute(c["model"], c["vae"], c["pos"], y, c["op"], **_restore_args(**dict(kw)))

    img = lambda H, W, fill=None: (lambda t: (t.view(-1).__setitem__(0, fill), t)[1] if fill is not None else t)(
        torch.rand(1, H, W, 3))  # noqa: E731
    return [
        ("ddim nan latent", lambda c: ddim(c, latent=lat(nan))), ("ddim inf latent", lambda c: ddim(c, latent=lat(inf))),
        ("ddim 16ch latent", lambda c: ddim(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("ddim 5d latent", lambda c: ddim(c, latent=lat(shape=(1, 4, 2, 8, 8)))),
        ("ddim 1x1 image", lambda c: ddim(c, latent=None, image=img(1, 1), vae=c["vae"])),
        ("ddim nan image", lambda c: ddim(c, latent=None, image=img(64, 64, nan), vae=c["vae"])),
        ("ddim steps 0", lambda c: ddim(c, steps=0)), ("ddim guidance nan", lambda c: ddim(c, guidance=nan)),
        ("ddim guidance inf", lambda c: ddim(c, guidance=inf, negative=c["neg"])),
        ("ddim no negative", lambda c: ddim(c, guidance=7.5)),
        ("ddim cond batch", lambda c: ddim(c, latent=lat(shape=(2, 4, 8, 8)), positive=c["pos3"])),
        ("exact nan latent", lambda c: exact(c, latent=lat(nan))),
        ("rnri inf latent", lambda c: exact(c, method="rnri", latent=lat(inf))),
        ("gd nan latent", lambda c: exact(c, method="gradient_descent", latent=lat(nan))),
        ("exact lambda inf", lambda c: exact(c, method="rnri", lambda_prior=inf)),
        ("exact tolerance nan", lambda c: exact(c, tolerance=nan)),
        ("exact iterations -1", lambda c: exact(c, iterations=-1)), ("exact krylov 0", lambda c: exact(c, krylov=0)),
        ("exact bad method", lambda c: exact(c, method="newton")),
        ("npi nan latent", lambda c: npi(c, latent=lat(nan))), ("npi 16ch", lambda c: npi(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("npi 4x4 image", lambda c: npi(c, latent=None, image=img(4, 4), vae=c["vae"])),
        ("null nan latent", lambda c: null(c, latent=lat(nan))), ("null lr nan", lambda c: null(c, learning_rate=nan)),
        ("null lr huge", lambda c: null(c, learning_rate=1e9)), ("null no negative", lambda c: null(c, negative=None)),
        ("ddpm inf latent", lambda c: ddpm(c, latent=lat(inf))), ("ddpm steps 0", lambda c: ddpm(c, steps=0)),
        ("ddpm 16ch", lambda c: ddpm(c, latent=lat(shape=(1, 16, 8, 8)))),
        ("sample guidance nan", lambda c: sample(c, guidance=nan)), ("sample skip too far", lambda c: sample(c, skip_steps=99)),
        ("sample mask batch", lambda c: sample(c, mask=torch.ones(3, 64, 64))),
        ("sample mask nan", lambda c: sample(c, mask=torch.full((1, 64, 64), nan))),
        ("prox quantile nan", lambda c: prox(c, quantile=nan)), ("prox quantile 1.5", lambda c: prox(c, quantile=1.5)),
        ("prox threshold -1", lambda c: prox(c, fixed_threshold=-1.0)), ("prox guidance inf", lambda c: prox(c, guidance=inf)),
        ("prox inversion guidance nan", lambda c: prox(c, inversion_guidance=nan)),
        ("prox t_rec -5", lambda c: prox(c, t_rec=-5)), ("prox mix nan", lambda c: prox(c, source_null_mix=nan)),
        ("prox bad prox", lambda c: prox(c, prox="l7")), ("guider guidance nan", lambda c: guider(c, guidance=nan)),
        ("guider quantile -1", lambda c: guider(c, quantile=-1.0)),
        ("p2p reweight nan", lambda c: p2p(c, mode="reweight", reweight="dog:nan")),
        ("p2p cross nan", lambda c: p2p(c, cross_replace=nan)), ("p2p blend threshold nan", lambda c: p2p(c, blend_threshold=nan)),
        ("p2p empty target", lambda c: p2p(c, target_prompt="")), ("p2p blend word missing", lambda c: p2p(c, local_blend=True, blend_words="zebra")),
        ("p2p bad mode", lambda c: p2p(c, mode="swap")),
        ("masa start -1", lambda c: masa(c, start_step=-1)), ("masa bad strategy", lambda c: masa(c, strategy="all")),
        ("dinv step nan", lambda c: dinv(c, step_size=nan)), ("dinv iterations 0", lambda c: dinv(c, iterations=0)),
        ("dinv momentum 1", lambda c: dinv(c, method="gradient_free_momentum", momentum=1.0)),
        ("dinv inf latent", lambda c: dinv(c, latent=lat(inf))), ("dinv 2x2 image", lambda c: dinv(c, image=img(2, 2))),
        ("op scale 0", lambda c: op(c, scale_factor=0)), ("op kernel even", lambda c: op(c, kind="gaussian_blur", kernel_size=8)),
        ("op sigma nan", lambda c: op(c, sigma_y=nan)), ("op mask amount 2", lambda c: op(c, kind="inpaint_random", mask_amount=2.0)),
        ("op blur sigma 0", lambda c: op(c, kind="gaussian_blur", blur_sigma=0.0)),
        ("degrade nan image", lambda c: degrade(c, image=img(64, 64, nan))), ("degrade 1x1 image", lambda c: degrade(c, image=img(1, 1))),
        ("restore nan measurement", lambda c: restore(c, measurement=img(16, 16, nan))),
        ("restore step nan", lambda c: restore(c, step_size=nan)), ("restore lr inf", lambda c: restore(c, stsl_lr=inf)),
        ("restore steps 0", lambda c: restore(c, steps=0)), ("restore wrong size", lambda c: restore(c, measurement=img(15, 17))),
        ("restore gluing nan", lambda c: restore(c, method="psld", gluing=nan)),
        ("restore bad method", lambda c: restore(c, method="dps3")),
    ]


def _outcome(run) -> str:
    """'clear' (an error whose message starts with the input it names), 'ok' (every output tensor
    finite) or what went wrong: 'raw: <type>: <message>' or 'nan in the output'."""
    import comfy.model_management

    try:
        with torch.inference_mode():
            out = run()
    except comfy.model_management.InterruptProcessingException:
        raise
    except Exception as exc:  # noqa: BLE001  (the point is to see any exception)
        msg = str(exc)
        import re

        return "clear" if re.match(r"^[a-z_/0-9]+( \([^)]*\))?: ", msg) else f"raw: {type(exc).__name__}: {msg[:200]}"
    tensors = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
    walk(getattr(out, "args", out))
    return "ok" if all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.is_floating_point()) \
        else "nan in the output"


def test_fuzz_bad_input_over_every_node_ends_clearly(pack, loaded):
    """65 bad inputs over all 15 nodes: each ends in a clear error naming an input, or in a finite
    result; never a raw exception from inside, never a silent NaN."""
    model, clip, vae, pos, neg = loaded
    r = importlib.import_module(pack.__name__ + ".nodes.restoration")
    with torch.inference_mode():
        one = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        pos3 = [[one[0][0].expand(3, *one[0][0].shape[1:]).clone(), dict(one[0][1])]]  # a batch of 3 prompts
        op = r.DegradationOperator.execute("sr_avgpool", 4, 9, 3.0, 0.5, 0.4, 0.05, 1).args[0]
    _, res, _ = _npi(pack, loaded, pos, steps=4)
    ctx = {"model": model, "clip": clip, "vae": vae, "pos": pos, "neg": neg, "pos3": pos3, "res": res, "op": op,
           "lat": _encode(loaded), "n": _nodes(pack), "e": _editing(pack), "r": r,
           "d": importlib.import_module(pack.__name__ + ".nodes.decoder_inversion")}
    cases = _fuzz_cases()
    assert len(cases) >= 60 and len({type(c) for c in ctx.values()}) > 5
    bad = {name: o for name, fn in cases if (o := _outcome(lambda: fn(ctx))) not in ("clear", "ok")}
    assert not bad, "\n".join(f"{k} -> {v}" for k, v in bad.items())
