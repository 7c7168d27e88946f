"""TADiSR core: the model, checkpoints and inference pipeline (no ComfyUI, no training imports).

Importing this package is cheap; heavy libraries (diffusers, peft) load on first use.
"""

__version__ = "0.1.0"
