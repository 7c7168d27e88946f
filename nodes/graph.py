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
