"""ComfyUI-Inverse: inversion, editing, decoder inversion and restoration nodes for ComfyUI.

ComfyUI loads this package and calls :func:`comfy_entrypoint` (the V3 extension API). The
node modules import ComfyUI, so they are imported only then; ``core`` stays importable on its own.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import InverseExtension

    return InverseExtension()
