"""Start ComfyUI's main.py in this interpreter, after an environment check.

Usage: python comfy_boot.py COMFYUI_DIR [main.py arguments...]

Some machines carry a torchvision wheel whose compiled operators do not match the
installed torch (for instance a CUDA torchvision next to a CPU torch): importing it then
fails with "operator torchvision::nms does not exist", and ComfyUI imports torchvision
at start-up. When (and only when) that happens, this script declares the two operator
schemas torchvision registers fake kernels for, so that torchvision's pure-Python part
imports. On a normal installation it changes nothing.
"""
import os
import runpy
import sys


def ensure_torchvision_importable() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: ComfyUI will say so itself
    except RuntimeError as exc:
        if "does not exist" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:
            pass
    # keep the library object alive for the life of the process
    sys.modules[__name__].__dict__["_torchvision_shim_lib"] = lib
    import torchvision  # noqa: F401


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: comfy_boot.py COMFYUI_DIR [main.py arguments...]")
    comfy_dir = os.path.abspath(sys.argv[1])
    main_py = os.path.join(comfy_dir, "main.py")
    if not os.path.isfile(main_py):
        sys.exit(f"comfy_boot: no main.py in {comfy_dir}; point COMFYUI_PATH at a ComfyUI checkout")
    ensure_torchvision_importable()
    sys.argv = [main_py] + sys.argv[2:]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
