"""ComfyUI adapters: thin V3 nodes over core/. Importing this package imports ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from .decoder_inversion import NODES as DECODER_INVERSION_NODES
from .editing import NODES as EDITING_NODES
from .inversion import NODES as INVERSION_NODES
from .restoration import NODES as RESTORATION_NODES


class InverseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return (list(INVERSION_NODES) + list(EDITING_NODES) + list(DECODER_INVERSION_NODES)
                + list(RESTORATION_NODES))
