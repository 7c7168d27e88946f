"""TADiSR for ComfyUI: text-aware 4x super-resolution with a text mask (custom node pack, V3 nodes).

ComfyUI imports this file as the pack and calls `comfy_entrypoint()`. Importing it is cheap: the
node declarations (and `comfy_api`) load in the entry point, torch-heavy libraries (diffusers,
peft) when a node first runs.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"  # the folder loader's default control, node docs (web/docs/)


def _provide_core() -> None:
    """Make the bundled `tadisr_core` importable by its name (unless installed): only that package,
    not the whole pack folder, so `training`, `tests` and `devtools` never become importable."""
    if "tadisr_core" in sys.modules or importlib.util.find_spec("tadisr_core") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tadisr_core")
    spec = importlib.util.spec_from_file_location("tadisr_core", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tadisr_core"] = module
    spec.loader.exec_module(module)


_provide_core()


async def comfy_entrypoint():
    """The pack's ComfyExtension (ComfyUI's V3 entry point)."""
    from .nodes import graph, host
    from .nodes.v3 import TADiSRExtension

    host.register_model_folders()
    host.add_prompt_hook(graph.mark_prompt)
    return TADiSRExtension()
