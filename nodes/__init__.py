"""ComfyUI nodes of TADiSR: thin adapters over tadisr_core.

`nodes/*.py` hold the node logic (ComfyUI tensor layouts, model cache, progress, interrupt) and
import neither ComfyUI nor `comfy_api`; `nodes/v3/` declares the nodes with ComfyUI's V3 schema.
"""
