"""The pack's nodes declared with ComfyUI's V3 schema (`comfy_api`): one small module per concern.

Only these modules import `comfy_api`, so the logic in `nodes/*.py` is unit-tested without ComfyUI.
`comfy_entrypoint()` in the pack's `__init__.py` returns `TADiSRExtension()`.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .attention import TADiSRTextAttention
from .blocks import TADiSRDecode, TADiSRDenoise, TADiSREncode
from .folder import TADiSRLoadImageFromFolder
from .model import TADiSRLoadModel, TADiSRUpscale
from .text import TADiSRReadText, TADiSRTextComposite

NODES: list[type[io.ComfyNode]] = [
    TADiSRLoadModel, TADiSRUpscale, TADiSREncode, TADiSRDenoise, TADiSRDecode, TADiSRTextAttention,
    TADiSRLoadImageFromFolder, TADiSRTextComposite, TADiSRReadText,
]


class TADiSRExtension(ComfyExtension):
    """The TADiSR node pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Every node of the pack."""
        return list(NODES)
