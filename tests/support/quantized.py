"""The tiny SD1.5 UNet as users load quantized models (issue 22), written once into the cache folder:

- GGUF files in ComfyUI-GGUF's layout (its tools/convert.py rules: 1-D and small tensors F32, conv
  weights whose last dimension is no multiple of 256 stored as rows of 256 with their original shape
  in ``comfy.gguf.orig_shape.*``), quantized with the ``gguf`` package's own quantizer: F16, Q8_0,
  Q4_0, and a Q8_0 file whose keep-list holds F32 and F16 Linear layers (as ComfyUI-GGUF keeps SD3's
  final layer): weights ComfyUI's casts pass through unchanged. Loaded by ComfyUI-GGUF's
  ``UnetLoaderGGUF``, the pack unpacked from ../shared/hosts (never committed).
- the UNet as a diffusion-model file for ComfyUI's ``UNETLoader`` with ``weight_dtype`` fp8_e4m3fn;
- a random LoRA (kohya keys, rank 4, on every attention and feed-forward projection), stacked
  with ComfyUI's ``LoraLoaderModelOnly`` on a GGUF and on an fp8 model.
"""
from __future__ import annotations

import importlib
import os
import sys
import tarfile
from pathlib import Path

import torch

from . import comfy_host

GGUF_PACK = "ComfyUI-GGUF-795e451"
QUANT_DIR = comfy_host.CACHE_DIR / "quantized"
LORA_NAME = "inverse_tiny_lora.safetensors"
FP8_NAME = "inverse_tiny_unet.safetensors"

# variant -> how it is loaded: (loader, file or weight dtype, LoRA on top)
VARIANTS = {
    "gguf_f16": ("gguf", "F16", False),
    "gguf_q8_0": ("gguf", "Q8_0", False),
    "gguf_q4_0": ("gguf", "Q4_0", False),
    "gguf_q8_0_kept_f32_f16": ("gguf", "Q8_0_KEPT", False),
    "fp8_e4m3fn": ("fp8", "fp8_e4m3fn", False),
    "gguf_q4_0_lora": ("gguf", "Q4_0", True),
    "fp8_e4m3fn_lora": ("fp8", "fp8_e4m3fn", True),
}
# the keep-list of the "kept" file: Linear layers left unquantized, as a converter's keys_hiprec does
KEPT = {"attn1.to_out.0.weight": "F32", "ff.net.2.weight": "F32", "attn2.to_q.weight": "F16"}


def gguf_archive() -> Path | None:
    """ComfyUI-GGUF's source archive, beside ComfyUI's (../shared/hosts, or $COMFYUI_INVERSE_SHARED/hosts)."""
    shared = [Path(os.environ["COMFYUI_INVERSE_SHARED"])] if os.environ.get("COMFYUI_INVERSE_SHARED") else []
    for folder in shared + [comfy_host.ROOT.parent / "shared"]:
        if (folder / "hosts" / f"{GGUF_PACK}.tar.gz").is_file():
            return folder / "hosts" / f"{GGUF_PACK}.tar.gz"
    return None


def missing_reason() -> str | None:
    if gguf_archive() is None:
        return f"no {GGUF_PACK}.tar.gz in ../shared/hosts (ComfyUI-GGUF, for the GGUF tests)"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the `gguf` package is not installed (requirements-test.txt)"
    return None


def gguf_pack_dir() -> Path:
    """ComfyUI-GGUF unpacked into the cache folder (once, under a lock)."""
    target = comfy_host.CACHE_DIR / "packs" / GGUF_PACK
    with comfy_host.cache_lock(GGUF_PACK):
        if not (target / "ComfyUI-GGUF" / "nodes.py").is_file():
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(gguf_archive()) as tar:
                tar.extractall(target, filter="data")
    return target / "ComfyUI-GGUF"


def load_gguf_pack():
    """ComfyUI-GGUF loaded as ComfyUI loads a custom node pack; returns its module."""
    import asyncio

    import nodes

    path = gguf_pack_dir()
    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        if not asyncio.run(nodes.load_custom_node(str(path))):
            raise RuntimeError(f"ComfyUI-GGUF at {path} did not load (see the log above)")
    return sys.modules[str(path).replace(".", "_x_")]


def _unet_state_dict() -> dict:
    from safetensors.torch import load_file

    prefix = "model.diffusion_model."
    sd = load_file(str(comfy_host.tiny_checkpoint()))
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def _qtype_of(key: str, t: torch.Tensor, qtype: str):
    """ComfyUI-GGUF's convert.py choice for a float32 tensor, plus this module's keep-list."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.ndim == 1 or t.numel() <= 1024:
        return Q.F32
    if qtype == "Q8_0_KEPT":
        for suffix, kept in KEPT.items():
            if key.endswith(suffix):
                return getattr(Q, kept)
        return Q.Q8_0
    return getattr(Q, qtype)


def write_gguf(sd: dict, path: Path, qtype: str) -> dict:
    """Writes ``sd`` (float32) as a GGUF file the way ComfyUI-GGUF's tools/convert.py does; returns
    the count of tensors per stored type."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="sd1")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict = {}
    for key, t in sd.items():
        data = t.numpy()
        q = _qtype_of(key, t, qtype)
        n = data.size
        if data.ndim > 1 and n >= 512 and n % 256 == 0 and data.shape[-1] % 256 != 0:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", tuple(int(d) for d in data.shape))
            data = data.reshape(n // 256, 256)
        try:
            data = gguf.quants.quantize(data, q)
        except (AttributeError, gguf.QuantError):  # as convert.py: F16 where a type cannot hold the shape
            q = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, q)
        writer.add_tensor(key, data, raw_dtype=q)
        counts[q.name] = counts.get(q.name, 0) + 1
    tmp = path.with_suffix(".part")
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return counts


def _write_lora(sd: dict, path: Path) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(22)
    lora = {}
    for key, t in sd.items():
        if t.ndim == 2 and any(s in key for s in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", ".ff.net.2.")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            out_f, in_f = t.shape
            lora[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) / in_f ** 0.5
            lora[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
            lora[f"{name}.alpha"] = torch.tensor(4.0)
    save_file({k: v.half() if v.ndim else v for k, v in lora.items()}, str(path))


def files() -> Path:
    """The GGUF files, the fp8 diffusion-model file and the LoRA, written once; returns their folder."""
    from safetensors.torch import save_file

    with comfy_host.cache_lock("quantized"):
        wanted = [QUANT_DIR / f"inverse_tiny_unet-{q}.gguf" for q in ("F16", "Q8_0", "Q4_0", "Q8_0_KEPT")]
        if not all(p.is_file() for p in wanted + [QUANT_DIR / FP8_NAME, QUANT_DIR / LORA_NAME]):
            QUANT_DIR.mkdir(parents=True, exist_ok=True)
            sd = _unet_state_dict()
            for p in wanted:
                write_gguf(sd, p, p.stem.split("-", 1)[1])
            save_file({k: v.half() for k, v in sd.items()}, str(QUANT_DIR / FP8_NAME))
            _write_lora(sd, QUANT_DIR / LORA_NAME)
    return QUANT_DIR


def register_folders() -> None:
    import folder_paths

    folder = str(files())
    for kind in ("diffusion_models", "loras"):
        if folder not in folder_paths.get_folder_paths(kind):
            folder_paths.add_model_folder_path(kind, folder)


def load(variant: str):
    """The MODEL of ``variant`` (a key of VARIANTS), loaded through the loader nodes a user would use,
    under inference mode as ComfyUI runs nodes."""
    import nodes

    register_folders()
    kind, what, lora = VARIANTS[variant]
    with torch.inference_mode():
        if kind == "gguf":
            pack = load_gguf_pack()
            model = importlib.import_module(pack.__name__ + ".nodes").UnetLoaderGGUF().load_unet(
                f"inverse_tiny_unet-{what}.gguf")[0]
        else:
            model = nodes.UNETLoader().load_unet(FP8_NAME, what)[0]
        if lora:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA_NAME, 1.0)[0]
    return model
