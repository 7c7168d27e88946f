"""Looking at the queued prompt from inside a node, to refuse impossible settings before the work.

A prompt is ComfyUI's API format: {node id: {"class_type", "inputs": {name: value | [src id, slot]}}}.
"""

from __future__ import annotations

ATTENTION_VIEW = "TADiSRTextAttention"


def consumers(prompt: dict, node_id: str, output_index: int) -> list[tuple[str, dict]]:
    """(id, node) of every node with an input linked to output `output_index` of `node_id`."""
    out = []
    for nid, node in (prompt or {}).items():
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) \
                    and value[1] == output_index:
                out.append((str(nid), node))
                break
    return out


def check_attention_use(prompt: dict, node_id: str, output_index: int, groups: dict, captured: bool = True) -> None:
    """ValueError before any tile runs when a TADiSR Text Attention node fed by this output cannot work:
    the attention is not captured, or its `layers` asks for a UNet part this model hooks no layer in."""
    for nid, node in consumers(prompt, node_id, output_index):
        if node.get("class_type") != ATTENTION_VIEW:
            continue
        if not captured:
            raise ValueError(f"TADiSR: TADiSR Text Attention (node {nid}) reads this node's attention, but "
                             "'capture_attention' is off: turn it on, or disconnect the attention output")
        layers = (node.get("inputs") or {}).get("layers", "all")
        if isinstance(layers, str) and layers != "all" and layers not in groups:
            have = ", ".join(["all", *groups])
            raise ValueError(f"TADiSR: TADiSR Text Attention (node {nid}): layers='{layers}' is impossible for "
                             f"this model, which captures no attention in the {layers} layers; choose one of: "
                             f"{have}")


UPSCALE = "TADiSRUpscale"
TEXT_MASK_OUTPUT = 1
MASK_USE_KEY = "tadisr_text_mask_used"  # not a declared input: ComfyUI passes it to no node, but caches by it


def text_mask_wanted(prompt: dict, node_id: str) -> bool:
    """False only when `mark_text_mask_use` saw this Upscale node's text_mask output unconnected
    (without that mark, e.g. a prompt that did not come through ComfyUI's queue, the mask is made)."""
    node = (prompt or {}).get(str(node_id)) or {}
    return (node.get("inputs") or {}).get(MASK_USE_KEY) is not False


def mark_text_mask_use(json_data: dict) -> dict:
    """ComfyUI on-prompt hook: write into each Upscale node's inputs whether its text_mask output is
    connected. Upscale skips the mask when it is not, and ComfyUI caches a node by its inputs: this
    entry makes a later run with the mask connected a different cache entry (not a stale empty mask)."""
    prompt = (json_data or {}).get("prompt")
    if isinstance(prompt, dict):
        for nid, node in prompt.items():
            if isinstance(node, dict) and node.get("class_type") == UPSCALE and isinstance(node.get("inputs"), dict):
                node["inputs"][MASK_USE_KEY] = bool(consumers(prompt, nid, TEXT_MASK_OUTPUT))
    return json_data
