"""TADiSR core: the model, checkpoints and inference pipeline (no ComfyUI, no training imports).

Importing this package is cheap; heavy libraries (diffusers, peft) load on first use. The main entry
points are also reachable from here, loaded when first named: `load_model` (a shipped model, a training
run or a checkpoint), `load_tadisr` (the Kolors backbone and a TADiSR checkpoint), `upscale`,
`read_image`, `load_image` and `save_image`.
"""

import importlib

__version__ = "0.1.0"

_ENTRY_POINTS = {"load_model": "model_ref", "load_tadisr": "loading", "upscale": "pipeline",
                 "read_image": "images", "load_image": "images", "save_image": "images"}
__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    """The entry point `name`, imported from its module on first use (PEP 562)."""
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    """The module's names and the entry points (imported or not)."""
    return sorted({*globals(), *_ENTRY_POINTS})
