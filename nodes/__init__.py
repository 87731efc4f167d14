"""ComfyUI adapters: thin V3 nodes over core/. Importing this package imports ComfyUI."""
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from .comfy.server import serve_templates_in_order

from .decoder_inversion import NODES as DECODER_INVERSION_NODES
from .editing import NODES as EDITING_NODES
from .flow_edit import NODES as FLOW_EDIT_NODES
from .inversion import NODES as INVERSION_NODES
from .restoration import NODES as RESTORATION_NODES


WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


class InverseExtension(ComfyExtension):
    async def on_load(self) -> None:
        serve_templates_in_order(WORKFLOWS)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        serve_templates_in_order(WORKFLOWS)  # ComfyUI 0.3.64 does not call on_load yet
        return (list(INVERSION_NODES) + list(EDITING_NODES) + list(FLOW_EDIT_NODES) + list(DECODER_INVERSION_NODES)
                + list(RESTORATION_NODES))
