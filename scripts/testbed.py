"""The trained testbed: a small SD1.5-format checkpoint trained on this project's own machines.

Data: Fashion-MNIST (Zalando, MIT licence; Debian's ``dataset-fashion-mnist``), each 28x28 item
upscaled to 48x48 and tinted with one of six named colours on a plain near-white background, so
that every image has a prompt ``"a <colour> <class>"`` (10 classes x 6 colours). The official test
split is never trained on; a fixed subset of it (``HELDOUT``, committed in tests/data) serves every
measurement.

Model: ComfyUI's own architectures, so that ComfyUI loads the file as an ordinary SD1.5 checkpoint:
a TAESD-format VAE (``first_stage_model.taesd_*``, 4 latent channels, 8x down: 48 px -> 6x6
latents), a single-level SD1.5-layout UNet (model_channels 320, context_dim 768) trained with the
DDPM epsilon objective on SD1.5's schedule, and the seeded random full-size CLIP-L of
scripts/make_tiny_checkpoint.py as the text encoder, rebuilt at assembly time (not stored).

The flow testbed (issue 23) is the same data trained a second time as an SD3-format checkpoint
(``SD3``): ComfyUI's MMDiT (depth 4: hidden 256, 4 heads, patch 2: 3x3 tokens), the rectified-flow
objective, a 16-channel TAESD-format VAE, and the same seeded CLIP-L as SD3's only text encoder
(``text_encoders.clip_l.*``; ComfyUI pads its output to SD3's 4096-wide context and 2048-wide pooled
vector). ComfyUI loads it through its SD3 path (model_detection's MMDiT branch, supported_models.SD3).

This module has no ComfyUI import at module level: tests and benches use its data and file helpers
without a host; ``assemble`` needs ComfyUI importable (it rebuilds the CLIP through
make_tiny_checkpoint).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data"
WEIGHTS = DATA_DIR / "testbed_weights.safetensors"  # UNet + VAE (+ classifier), fp16, committed
HELDOUT = DATA_DIR / "testbed_heldout.safetensors"  # held-out test-split items, uint8, committed
CKPT_NAME = "inverse_testbed_sd15_v1.safetensors"
FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

SIZE = 48  # pixels; latents are SIZE/8 = 6
CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
COLOURS = {  # name -> RGB in [0, 255]; hues 0, 28, 50, 130, 225, 280 degrees
    "red": (210, 40, 40),
    "orange": (240, 130, 20),
    "yellow": (225, 195, 20),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "purple": (140, 50, 180),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = (245, 245, 242)
HELDOUT_COUNT = 128
DATA_SEED = {"train": 1, "test": 2}
CLIP_SEED = 0  # make_tiny_checkpoint.build_state_dict(CLIP_SEED)'s cond_stage_model.* is the text encoder


def prompt(cls: int, colour: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {CLASSES[cls]}"


def all_prompts() -> list[str]:
    """Index p = cls * len(COLOURS) + colour; the empty prompt (CFG's unconditional) is last."""
    return [prompt(c, k) for c in range(len(CLASSES)) for k in range(len(COLOURS))] + [""]


# ---------------------------------------------------------------------------------------------
# data

def _read_idx(path: Path):
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def load_split(split: str):
    """(items uint8 N x 28 x 28, class labels, colour labels) of Fashion-MNIST's official split;
    each item's colour is drawn once from a fixed seed per split."""
    import numpy as np

    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST is not at {FMNIST_DIR}: `apt-get install dataset-fashion-mnist` "
                                "(or set FASHION_MNIST_DIR)")
    items = _read_idx(img_path)
    labels = _read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    colours = np.random.default_rng(DATA_SEED[split]).integers(0, len(COLOURS), len(labels))
    return items, labels, colours


def heldout_indices():
    """The fixed held-out subset of the official test split (sorted indices)."""
    import numpy as np

    return np.sort(np.random.default_rng(1234).choice(10000, HELDOUT_COUNT, replace=False))


def render(items, colours, size: int = SIZE):
    """Items (N x 28 x 28 uint8) and colour indices -> images N x 3 x size x size in [0, 1]
    (float32 torch): each item upscaled bilinearly, then g = item/255 blends the background
    towards the named colour: image = (1 - g) background + g colour."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.as_tensor(np.array(items), dtype=torch.float32).unsqueeze(1) / 255.0
    g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    palette = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=torch.float32) / 255.0
    col = palette[torch.as_tensor(np.array(colours), dtype=torch.long)][:, :, None, None]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 255.0
    return (1 - g) * bg + g * col


def foreground_mask(images, threshold: float = 0.12):
    """Where an image departs from the plain background (N x H x W bool): the item's silhouette."""
    import torch

    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=images.device)[None, :, None, None] / 255.0
    return (images - bg).abs().amax(dim=1) > threshold


def measured_colour(images, threshold: float = 0.12):
    """The nearest named colour to each image's mean foreground chroma (N longs), measured from the
    pixels: per pixel the departure from the background, d = image - bg = g (colour - bg), averaged
    over the silhouette and compared by angle with each colour's departure."""
    import torch

    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=images.device)[None, :, None] / 255.0
    palette = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=torch.float32, device=images.device) / 255.0
    dirs = torch.nn.functional.normalize(palette - bg[0, :, 0], dim=1)  # 6 x 3
    mask = foreground_mask(images, threshold).flatten(1).float()  # N x HW
    d = (images.flatten(2) - bg)  # N x 3 x HW
    mean = (d * mask[:, None]).sum(-1) / mask.sum(-1, keepdim=True).clamp_min(1)
    return (torch.nn.functional.normalize(mean, dim=1) @ dirs.T).argmax(dim=1)


def load_heldout():
    """(images N x 3 x 48 x 48 in [0, 1], class labels, colour labels, test-split indices) from the
    committed held-out file: no dataset needed."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(HELDOUT))
    return render(t["items"].numpy(), t["colours"].numpy()), t["labels"].long(), t["colours"].long(), t["index"].long()


def write_heldout() -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    items, labels, colours = load_split("test")
    idx = heldout_indices()
    save_file({"items": torch.from_numpy(items[idx].copy()), "labels": torch.from_numpy(labels[idx].copy()),
               "colours": torch.from_numpy(colours[idx].copy()), "index": torch.from_numpy(idx.astype(np.int64))},
              str(HELDOUT), metadata={"source": "Fashion-MNIST test split (Zalando Research, MIT licence), via "
                                                "Debian's dataset-fashion-mnist; indices in 'index'"})


# ---------------------------------------------------------------------------------------------
# models (ComfyUI's architectures)

UNET_CONFIG = dict(image_size=SIZE // 8, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                   channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                   transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                   use_linear_in_transformer=False)
LATENT_SCALE = 0.18215  # SD1.5's latent format: the model sees VAE latent * 0.18215


def init_weights(module, zero=()):
    """PyTorch's default initialisation for every layer (ComfyUI's ops skip it), and zeros for the
    layers named in ``zero`` (as LDM's zero_module does for output projections)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    for name, m in module.named_modules():
        for cls in (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
        if any(name.endswith(z) for z in zero):
            with torch.no_grad():
                for p in m.parameters(recurse=False):
                    p.zero_()
    return module


# the SD3-format flow testbed (issue 23)
SD3_WEIGHTS = DATA_DIR / "testbed_sd3_weights.safetensors"  # MMDiT + 16-channel VAE, fp16, committed
SD3_CKPT_NAME = "inverse_testbed_sd3_v1.safetensors"
SD3_LATENT_CHANNELS = 16
SD3_LATENT_FORMAT = (1.5305, 0.0609)  # comfy.latent_formats.SD3: the model sees (VAE latent - 0.0609) * 1.5305
CLIP_L_WIDTH = 768  # SD3's context is CLIP-L's 768 features zero-padded to 4096; pooled: 768 + 1280 zeros
MMDIT_CONFIG = dict(in_channels=SD3_LATENT_CHANNELS, out_channels=SD3_LATENT_CHANNELS, patch_size=2, depth=4,
                    input_size=None, adm_in_channels=2048, pos_embed_scaling_factor=None,
                    context_embedder_config={"target": "torch.nn.Linear",
                                             "params": {"in_features": 4096, "out_features": 64 * 4}},
                    x_block_self_attn_layers=[])


def mmdit():
    """ComfyUI's MMDiT in the layout ComfyUI detects back from the weights (depth = hidden / 64; no
    stored pos_embed: the sin-cos table is computed for the 3x3 token grid), adaLN-Zero initialised
    (every modulation and the final projection zero, as DiT and SD3 start), the context embedder's
    columns beyond CLIP-L's 768 zero (they only ever meet the zero padding)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    m = MMDiT(**MMDIT_CONFIG, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    init_weights(m, zero=("adaLN_modulation.1", "final_layer.linear"))
    with torch.no_grad():
        m.context_embedder.weight[:, CLIP_L_WIDTH:] = 0
    return m


def unet():
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = UNetModel(**UNET_CONFIG, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    return init_weights(m, zero=("out.2", "proj_out", "out_layers.3"))


def taesd(latent_channels: int = 4):
    from comfy.taesd.taesd import TAESD

    return init_weights(TAESD(latent_channels=latent_channels))


class Classifier:
    """A small CNN with two heads (class, colour) on 48x48 images in [0, 1]; pure torch."""

    @staticmethod
    def build():
        from torch import nn

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(0.2), nn.Linear(128, len(CLASSES) + len(COLOURS)))

    @staticmethod
    def predict(net, images):
        """(class, colour) predictions for images N x 3 x 48 x 48 in [0, 1]."""
        import torch

        with torch.no_grad():
            out = net(images.float())
        return out[:, :len(CLASSES)].argmax(1), out[:, len(CLASSES):].argmax(1)


def load_classifier():
    from safetensors import safe_open

    net = Classifier.build()
    with safe_open(str(WEIGHTS), "pt") as f:
        net.load_state_dict({k[len("classifier."):]: f.get_tensor(k) for k in f.keys() if k.startswith("classifier.")})
    return net.eval()


# ---------------------------------------------------------------------------------------------
# the checkpoint

PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
SD3_PARTS = ("model.diffusion_model.", "first_stage_model.", "text_encoders.")
CLIP_L_SD3_PREFIX = "text_encoders.clip_l."  # where an SD3 single-file checkpoint keeps CLIP-L


FAMILIES = {"sd15": (WEIGHTS, CKPT_NAME), "sd3": (SD3_WEIGHTS, SD3_CKPT_NAME)}  # family -> (weights, checkpoint name)


def family_of(weights: Path) -> str:
    return "sd3" if Path(weights).name == SD3_WEIGHTS.name else "sd15"


def part_hashes(sd: dict) -> dict:
    """sha256 of each part of a checkpoint state dict (keys sorted, dtype, shape and bytes)."""
    out = {}
    for prefix in (SD3_PARTS if any(k.startswith(CLIP_L_SD3_PREFIX) for k in sd) else PARTS):
        h = hashlib.sha256()
        for k in sorted(k for k in sd if k.startswith(prefix)):
            v = sd[k].contiguous()
            h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(v.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        out[prefix.rstrip(".")] = h.hexdigest()
    return out


def checkpoint_state_dict(weights: Path = WEIGHTS, family: str | None = None) -> dict:
    """The full checkpoint state dict: the trained UNet (SD1.5) or MMDiT (SD3: ``SD3_WEIGHTS``) and VAE
    from ``weights`` plus the seeded random CLIP-L rebuilt as scripts/make_tiny_checkpoint.py builds it
    (needs ComfyUI importable), under the family's key names."""
    import make_tiny_checkpoint
    from safetensors.torch import load_file

    trained = load_file(str(weights))
    clip = {k: v for k, v in make_tiny_checkpoint.build_state_dict(CLIP_SEED).items()
            if k.startswith("cond_stage_model.")}
    if (family or family_of(weights)) == "sd3":  # the same CLIP-L weights under SD3's key names
        clip = {CLIP_L_SD3_PREFIX + k[len("cond_stage_model."):]: v for k, v in clip.items()}
    sd = {k: v for k, v in trained.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    sd.update(clip)
    return {k: v.contiguous() for k, v in sd.items()}


def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (standard library only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__") or {}


def recorded_hashes(weights: Path = WEIGHTS) -> dict:
    """What export recorded: sha256 of each part and of the whole assembled file ("checkpoint")."""
    meta = safetensors_metadata(weights)
    return {k[len("sha256:"):]: v for k, v in meta.items() if k.startswith("sha256:")}


def is_assembled(out: Path, weights: Path = WEIGHTS) -> bool:
    """Whether ``out`` was assembled from the committed weights as they are now."""
    return Path(out).is_file() and safetensors_metadata(out).get("comfyui_inverse_testbed") == _weights_hash(weights)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(sd: dict, out: Path, weights_hash: str) -> None:
    """One metadata key only: safetensors writes several keys in a per-process random order, which
    would change the file's bytes (and its sha256) from run to run."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"comfyui_inverse_testbed": weights_hash})
    os.replace(tmp, out)


def _weights_hash(weights: Path) -> str:
    """Names the weights an assembled file came from (the part hashes; not the file's own hash)."""
    parts = {k: v for k, v in recorded_hashes(weights).items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def assemble(out: Path, weights: Path = WEIGHTS) -> Path:
    """Write the checkpoint ComfyUI loads (kept while the committed weights are unchanged). It must
    be byte-identical on every machine: when it is not, the error names the part that differs."""
    out = Path(out)
    if is_assembled(out, weights):
        return out
    sd = checkpoint_state_dict(weights)
    write_checkpoint(sd, out, _weights_hash(weights))
    want = recorded_hashes(weights)
    if want.get("checkpoint") and file_sha256(out) != want["checkpoint"]:
        got = part_hashes(sd)
        bad = [p for p in got if want.get(p) != got[p]] or ["the file layout (safetensors' serialisation)"]
        out.unlink()
        raise RuntimeError(f"testbed checkpoint: {bad} differ(s) from what was trained and recorded in {weights.name}; "
                           "cond_stage_model is the seeded random CLIP-L (this machine's torch generator makes "
                           "other numbers), the others come from the committed weights file")
    return out


def main(argv=None) -> None:
    """``python scripts/testbed.py OUT.safetensors [--family sd15|sd3] [--comfyui PATH]``: assemble a checkpoint."""
    import argparse

    import make_tiny_checkpoint

    ap = argparse.ArgumentParser(description="Assemble a trained testbed checkpoint (UNet or MMDiT + VAE + seeded CLIP-L)")
    ap.add_argument("out")
    ap.add_argument("--family", choices=list(FAMILIES), default="sd15",
                    help="sd15: the SD1.5-format testbed; sd3: the SD3-format flow testbed (issue 23)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "~/ComfyUI"))
    args = ap.parse_args(argv)
    make_tiny_checkpoint._import_comfy(args.comfyui)
    path = assemble(Path(args.out), FAMILIES[args.family][0])
    print(f"testbed checkpoint: {path}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
