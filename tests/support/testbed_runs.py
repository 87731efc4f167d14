"""The pack's nodes on the trained testbed (scripts/testbed.py), as the tests and the benches run them:
encode/decode held-out images, invert, reconstruct, edit and restore through the nodes' own
``execute``, with every image NCHW in [0, 1]. Needs the in-process host (support/comfy_host.py)."""
from __future__ import annotations

import importlib
import json

import torch

import testbed as tb  # scripts/

from support import comfy_host


def psnr(a, b, mask=None):
    """PSNR in dB of images in [0, 1] (any layout), per batch item; over ``mask`` when given."""
    d = (a.float() - b.float()).pow(2)
    if mask is not None:
        m = mask.float().expand_as(d)
        mse = (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    else:
        mse = d.flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def nchw(x):
    return x.permute(0, 3, 1, 2).contiguous()


class Testbed:
    __test__ = False  # a helper, not a test class (test modules import it)

    def __init__(self, family: str = "sd15"):
        """``family``: "sd15" (the SD1.5-format testbed) or "sd3" (the SD3-format flow testbed, issue 23)."""
        self.pack = comfy_host.start_inprocess()
        self.family = family
        t = comfy_host.load_testbed(family)
        self.model, self.clip, self.vae, self.path = t["model"], t["clip"], t["vae"], t["path"]
        self.images, self.labels, self.colours = t["images"], t["labels"], t["colours"]
        self.classifier = t["classifier"]
        self._nodes = {}

    def nodes(self, name):
        if name not in self._nodes:
            self._nodes[name] = importlib.import_module(f"{self.pack.__name__}.nodes.{name}")
        return self._nodes[name]

    # -- images and prompts
    def encode(self, images):
        with torch.inference_mode():
            return {"samples": self.vae.encode(nhwc(images))}

    def decode(self, samples):
        with torch.inference_mode():
            return nchw(self.vae.decode(samples)).clamp(0, 1)

    def prompts(self, idx, colours=None, classes=None):
        colours = self.colours[idx] if colours is None else colours
        classes = self.labels[idx] if classes is None else classes
        return [tb.prompt(int(c), int(k)) for c, k in zip(classes, colours)]

    def cond(self, texts):
        return comfy_host.batched_cond(self.clip, list(texts))

    # -- inversion
    def invert(self, node, lat, pos, neg, **kw):
        n = self.nodes("inversion")
        with torch.inference_mode():
            if node != "NegativePromptInversion":
                kw["negative"] = neg
            return getattr(n, node).execute(self.model, pos, latent=lat, spacing="auto", **kw).args[0]

    def reconstruct(self, result, pos, neg, guidance):
        n = self.nodes("inversion")
        with torch.inference_mode():
            return n.SampleFromInversion.execute(self.model, pos, result, guidance, 0, negative=neg).args[0]["samples"]

    # -- editing
    EDIT_METHODS = ("prox_npi_p2p", "prox_npi", "npi", "prox_ddpm", "prox_masactrl", "prox_exact", "null_text_p2p")

    def edit(self, idx, targets, method="prox_npi_p2p", steps=50, **kw):
        """Edit held-out items ``idx`` to the prompts ``targets``; returns (edited, VAE round trip).

        prox_npi_p2p: ProxEdit over negative-prompt inversion with a prompt-to-prompt word swap
        (workflow 09; one item at a time, as the control is built for one prompt pair); prox_npi:
        the same without attention control; npi: plain negative-prompt-inversion editing (CFG with
        the source prompt as negative: ProxEdit at quantile 0, no inversion guidance); prox_ddpm:
        ProxEdit over edit-friendly DDPM inversion (base 'negative', no inversion guidance, 36% of
        the steps skipped: the quick start's edit);
        prox_masactrl: ProxEdit over NPI with MasaCtrl (from step 4, the decoder's layers);
        prox_exact: ProxEdit over exact inversion (Anderson, 2 calls a step, guidance 1);
        null_text_p2p: null-text inversion (guidance 7.5, the paper's 10 Adam steps at lr 0.01) and
        prompt-to-prompt's edit over it (Mokady et al.: guided sampling from the inverted noise with
        the per-step null embeddings as the unconditional branch; ProxEdit at quantile 0 with base
        'negative' is that plain guidance; one item at a time, like prox_npi_p2p)."""
        idx, targets = list(idx), list(targets)
        if method in ("prox_npi_p2p", "null_text_p2p") and len(idx) > 1:
            runs = [self.edit([i], [t], method, steps, **kw) for i, t in zip(idx, targets)]
            return torch.cat([r[0] for r in runs]), torch.cat([r[1] for r in runs])
        e = self.nodes("editing")
        lat = self.encode(self.images[idx])
        neg = self.cond([""] * len(idx))
        args = dict(base="source", guidance=7.5, prox="hard", quantile=0.7, fixed_threshold=0.0, dilation=1,
                    inversion_guidance=0.5, reconstruction_guidance=0.0, t_rec=400, source_null_mix=0.0, skip_steps=0)
        control = None
        with torch.inference_mode():
            if method in ("prox_npi_p2p", "null_text_p2p"):
                control, source, target = _p2p(e, self.clip, self.prompts(idx)[0], targets[0])
            else:
                source, target = self.cond(self.prompts(idx)), self.cond(targets)
            if method == "prox_masactrl":
                control = e.MasaCtrl.execute(start_step=4, start_layer=-1, strategy="source",
                                             base_strategy="source").args[0]
        if method == "prox_ddpm":
            inv = self.invert("DDPMInversion", lat, source, neg, steps=steps, guidance=1.0, seed=0)
            args.update(base="negative", inversion_guidance=0.0, skip_steps=int(0.36 * steps))
        elif method == "prox_exact":  # exact inversion (Anderson, 2 calls a step) at guidance 1
            inv = self.invert("ExactInversion", lat, source, neg, steps=steps, guidance=1.0, method="anderson",
                              iterations=1, tolerance=0.0, lambda_prior=0.1, adjust_rounds=0)
            args.update(inversion_guidance=0.0)
        elif method == "null_text_p2p":
            inv = self.invert("NullTextInversion", lat, source, neg, steps=steps, guidance=7.5, inner_steps=10,
                              learning_rate=0.01, tolerance=1e-5)
            args.update(base="negative", quantile=0.0, inversion_guidance=0.0)
        else:
            inv = self.invert("NegativePromptInversion", lat, source, neg, steps=steps)
        if method == "npi":
            args.update(quantile=0.0, inversion_guidance=0.0)
        args.update(kw)
        with torch.inference_mode():
            out = e.ProxEdit.execute(self.model, inv, target, negative=neg, attention_control=control,
                                     **args).args[0]["samples"]
        return self.decode(out), self.decode(lat["samples"])

    # -- flow editing (the SD3 flow testbed; the nodes run on the SD1.5 one too)
    FLOW_EDIT_METHODS = ("flowedit", "flowedit_masked", "rf_inversion", "fireflow_edit", "rf_solver_edit")

    def flow_edit(self, idx, targets, method="flowedit", steps=28, **kw):
        """Edit held-out items ``idx`` to the prompts ``targets`` with a flow-native node; returns
        (edited, VAE round trip). flowedit: the FlowEdit node (source guidance 1.5, target 5.5, n_max
        = steps - 4: the paper's Flux proportions scaled to this model); flowedit_masked: the same
        restricted to the item's silhouette, dilated by one latent pixel (the mask as a user paints
        it); rf_inversion: RF-Inversion Edit (gamma 0.5, eta 0.9, stop steps / 4: the authors');
        fireflow_edit / rf_solver_edit: the FireFlow / RF-Solver papers' edit without feature sharing:
        invert with the source prompt, sample back with the target, both with the solver, at guidance
        2 (RF-Solver's Flux setting, here as CFG)."""
        idx, targets = list(idx), list(targets)
        fe = self.nodes("flow_edit")
        lat = self.encode(self.images[idx])
        source, target, neg = self.cond(self.prompts(idx)), self.cond(targets), self.cond([""] * len(idx))
        with torch.inference_mode():
            if method in ("flowedit", "flowedit_masked"):
                args = dict(source_guidance=1.5, target_guidance=5.5, n_max=steps - 4, seed=0, feather=1.0)
                if method == "flowedit_masked":
                    sil = tb.foreground_mask(self.images[idx], 0.03).float()[:, None]
                    args["mask"] = torch.nn.functional.max_pool2d(sil, 17, stride=1, padding=8)[:, 0]
                args.update(kw)
                out = fe.FlowEdit.execute(self.model, source, target, steps, negative=neg, latent=lat, **args).args[0]
            elif method == "rf_inversion":
                args = dict(guidance=3.5, gamma=0.5, eta=0.9, seed=0, start=0, stop=max(1, steps // 4))
                args.update(kw)
                out = fe.RFInversion.execute(self.model, source, target, steps, negative=neg, latent=lat,
                                             **args).args[0]
            elif method in ("fireflow_edit", "rf_solver_edit"):
                solver = method[:-len("_edit")]
                g = kw.get("guidance", 2.0)
                inv = self.nodes("inversion")
                res = inv.ExactInversion.execute(self.model, source, steps, g, "auto", solver, 1, 0.0, 0.1, 0,
                                                 negative=neg, latent=lat).args[0]
                out = inv.SampleFromInversion.execute(self.model, target, res, g, 0, negative=neg).args[0]
            else:
                raise ValueError(method)
        return self.decode(out["samples"]), self.decode(lat["samples"])

    # -- restoration
    def operator(self, kind, **kw):
        r = self.nodes("restoration")
        args = dict(scale_factor=4, kernel_size=9, blur_sigma=2.0, motion_intensity=0.5, mask_amount=0.4,
                    sigma_y=0.02, seed=1)
        args.update(kw)
        with torch.inference_mode():
            return r.DegradationOperator.execute(kind, **args).args[0]

    def degrade(self, images, op):
        with torch.inference_mode():
            return self.nodes("restoration").DegradeImage.execute(nhwc(images), op, 0).args[0]

    def restore(self, y, op, pos, **kw):
        """Returns (image NCHW, report dict)."""
        args = dict(method="stsl", steps=50, seed=0, step_size=1.0, gluing=0.1, stochasticity=0.0,
                    stsl_inner_steps=2, stsl_lambda=1.0, stsl_trace_weight=0.02, stsl_lr=0.05,
                    stsl_start="measurement", p2l_prompt_steps=1, p2l_prompt_lr=1e-3, p2l_project_every=4,
                    p2l_cg_iters=10, p2l_cg_lambda=0.01, decoder_memory="full", tile_size=40)
        args.update(kw)
        with torch.inference_mode():
            out = self.nodes("restoration").Restore.execute(self.model, self.vae, pos, y, op, **args).args
        return nchw(out[0]).clamp(0, 1), json.loads(out[2])


def _p2p(editing_nodes, clip, source: str, target: str):
    """Prompt-to-prompt's word swap, or its refinement where the node says the two prompts differ in
    token count ("t-shirt" -> "shirt"), as a user would follow its error message."""
    for mode in ("replace", "refine"):
        try:
            return editing_nodes.PromptToPrompt.execute(clip, source, target, mode, 0.8, 0.5, "", True, "", 0.3,
                                                        0.2).args
        except Exception as e:  # noqa: BLE001  the node's InverseInputError
            if mode == "refine" or "mode 'refine'" not in str(e):
                raise


def edit_measures(edited, source, want_colour=None, want_class=None, classifier=None) -> list:
    """PIE-Bench's measures on the testbed, per item: edit success (measured colour / the classifier's
    class), structure kept (silhouette IoU with the source), background kept (PSNR outside the
    source's silhouette, taken generously so the item's soft edge does not count)."""
    m_src, m_edit = tb.foreground_mask(source), tb.foreground_mask(edited)
    outside = ~tb.foreground_mask(source, 0.03)
    iou = (m_src & m_edit).flatten(1).sum(1) / (m_src | m_edit).flatten(1).sum(1).clamp_min(1)
    bg = psnr(edited, source, outside[:, None])
    rows = [{"iou": float(a), "background_psnr": float(b)} for a, b in zip(iou, bg)]
    if want_colour is not None:
        for r, ok in zip(rows, tb.measured_colour(edited).cpu() == torch.as_tensor(want_colour)):
            r["colour_ok"] = bool(ok)
    if want_class is not None:
        pred = tb.Classifier.predict(classifier, edited)[0].cpu()
        for r, ok in zip(rows, pred == torch.as_tensor(want_class)):
            r["class_ok"] = bool(ok)
    return rows
