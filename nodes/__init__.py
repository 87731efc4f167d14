"""ComfyUI adapters: thin V3 nodes over core/. Importing this package imports ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from .inversion import NODES as INVERSION_NODES


class InverseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(INVERSION_NODES)
