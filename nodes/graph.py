"""Looking at the queued prompt from inside a node, to refuse impossible settings before the work.

A prompt is ComfyUI's API format: {node id: {"class_type", "inputs": {name: value | [src id, slot]}}}.
"""

from __future__ import annotations

from typing import Callable, Iterable

ATTENTION_VIEW = "TADiSRTextAttention"
RUNS_KEY = "tadisr_runs"  # written False by `mark_prompt` on a heat-map node that leads to no output


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


def running_nodes(prompt: dict, is_output: Callable[[str], bool | None],
                  targets: Iterable[str] | None = None) -> set[str]:
    """Ids of the nodes ComfyUI will execute: the output nodes (only those among `targets` when the
    client asked for a partial run) and every node they read from, directly or not. A node that
    leads to no output never runs. `is_output(class_type)` is None for a class it cannot tell
    (outside ComfyUI): such a node counts as an output, so nothing is taken for idle by mistake."""
    wanted = None if targets is None else {str(t) for t in targets}
    stack = [str(nid) for nid, node in (prompt or {}).items()
             if isinstance(node, dict) and is_output(node.get("class_type")) is not False
             and (wanted is None or str(nid) in wanted)]
    runs: set[str] = set()
    while stack:
        nid = stack.pop()
        if nid in runs or not isinstance(prompt.get(nid), dict):
            continue
        runs.add(nid)
        for value in (prompt[nid].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2:
                stack.append(str(value[0]))
    return runs


def check_attention_use(prompt: dict, node_id: str, output_index: int, groups: dict, captured: bool = True) -> None:
    """ValueError before any tile runs when a TADiSR Text Attention node fed by this output cannot work:
    the attention is not captured, or its `layers` asks for a UNet part this model hooks no layer in.
    A heat-map node that `mark_prompt` found leading to no output is left out: it never runs."""
    for nid, node in consumers(prompt, node_id, output_index):
        if node.get("class_type") != ATTENTION_VIEW or (node.get("inputs") or {}).get(RUNS_KEY) is False:
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
    """False only when `mark_prompt` saw this Upscale node's text_mask output unconnected, or read only
    by nodes that lead to no output (without that mark, e.g. a prompt that did not come through
    ComfyUI's queue, the mask is made)."""
    node = (prompt or {}).get(str(node_id)) or {}
    return (node.get("inputs") or {}).get(MASK_USE_KEY) is not False


def mark_prompt(json_data: dict, is_output: Callable[[str], bool | None] | None = None) -> dict:
    """ComfyUI on-prompt hook: marks what only the whole prompt tells (output nodes as
    `is_output`, by default `host.is_output_class`, says).

    Each Upscale node's inputs get whether its text_mask output is read by a node that leads to an
    output: Upscale skips the mask when it is not, and ComfyUI caches a node by its inputs, so this
    entry makes a later run with the mask connected a different cache entry (not a stale empty mask).
    It ignores a partial run's targets, which would flip it, and so re-run the upscale, between a
    partial and a whole run. A heat-map node that will not run (in this run) gets RUNS_KEY False, so
    its settings are not checked for it."""
    prompt = (json_data or {}).get("prompt")
    if not isinstance(prompt, dict):
        return json_data
    if is_output is None:
        from .host import is_output_class as is_output
    used = running_nodes(prompt, is_output)
    targets = json_data.get("partial_execution_targets")
    runs = used if targets is None else running_nodes(prompt, is_output, targets)
    for nid, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue
        if node.get("class_type") == UPSCALE:
            node["inputs"][MASK_USE_KEY] = any(cid in used for cid, _ in consumers(prompt, nid, TEXT_MASK_OUTPUT))
        elif node.get("class_type") == ATTENTION_VIEW:
            if str(nid) in runs:
                node["inputs"].pop(RUNS_KEY, None)
            else:
                node["inputs"][RUNS_KEY] = False
    return json_data
