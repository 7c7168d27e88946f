"""Write locales/en/nodeDefs.json from the running dev host's /object_info (the English strings live
in the node schemas; this keeps the host's translation file in step with them).

    python -m devtools.locales            # starts the dev host, writes locales/en/nodeDefs.json

locales/zh/nodeDefs.json is written by hand in the same shape; tests check both cover every node,
input and output.
"""

from __future__ import annotations

import json

from .server import REPO, ComfyServer

PREFIX = "TADiSR"


def node_defs(info: dict) -> dict:
    """The frontend's nodeDefs shape for the TADiSR entries of /object_info."""
    out = {}
    for nid, entry in sorted(info.items()):
        if not nid.startswith(PREFIX):
            continue
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in entry["input"].get(section, {}).items():
                inputs[name] = {"name": name, "tooltip": spec[1].get("tooltip")}
        outputs = {str(i): {"name": n, "tooltip": t}
                   for i, (n, t) in enumerate(zip(entry["output_name"], entry["output_tooltips"]))}
        out[nid] = {"display_name": entry["display_name"], "description": entry["description"],
                    "inputs": inputs, "outputs": outputs}
    return out


def main() -> None:
    """Start the dev host and write locales/en/nodeDefs.json."""
    with ComfyServer() as server:
        defs = node_defs(server.object_info())
    path = REPO / "locales" / "en" / "nodeDefs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(defs, indent=2, ensure_ascii=False) + "\n")
    print(f"{path}: {len(defs)} nodes")


if __name__ == "__main__":
    main()
