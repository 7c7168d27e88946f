"""TADiSR for ComfyUI: text-aware 4x super-resolution with a text mask (custom node pack).

ComfyUI imports this file as the pack. It only registers node classes and the models/tadisr
folder; torch-heavy libraries (diffusers, peft) load when a node first runs.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("tadisr_core") is None:  # the library ships beside the nodes
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
