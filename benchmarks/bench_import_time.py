"""How long the node pack adds to ComfyUI's start-up, over `import torch` (goal <= 0.3 s).

    python benchmarks/bench_import_time.py [--runs 5]            # comfy_api faked (any python with torch)
    python benchmarks/bench_import_time.py --host [--runs 5]     # the dev ComfyUI host's real comfy_api

Each run is a fresh interpreter that imports torch and `comfy_api.latest` (ComfyUI imports both
before any pack, so neither is counted), then does what ComfyUI 0.3.75's `load_custom_node` does
with a V3 pack: executes the pack's `__init__.py` as a package (`pack_init`), awaits
`comfy_entrypoint()` (`entrypoint`: imports `nodes` and `nodes.v3` with every node declaration;
in ComfyUI it also registers the model folders and the prompt hook), then awaits `get_node_list()` and calls each
node's `GET_SCHEMA()` (`schemas`). The pack's share is the sum (`total`).

Without `--host`, `comfy_api.latest` is a stand-in (a `MagicMock` `io`, as `tests/node_fixtures.py`'s
`v3` fixture fakes it, whose `GET_SCHEMA` calls `define_schema`, and a `Schema` that keeps its fields):
the pack's own Python is timed, the real schema classes' work is not. `--host` runs the probe in the
dev host's venv (`python -m devtools.comfy_host install` makes it) against its vendored ComfyUI
0.3.75, real `GET_SCHEMA` included (`comfy_api_s`, ComfyUI's own import, is reported for scale). Both
set TADISR_NO_COMFY=1, so the entry point registers no folders with a ComfyUI that has not started.
Prints JSON: each part's best, median and every run, whether the best total meets the goal, and
which heavy libraries the entry point pulled in. (The test suite checks only what is not timed: no
heavy library is imported by `__init__.py`.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 0.3
HEAVY = ("diffusers", "peft", "transformers", "accelerate", "tadisr_core.model", "tadisr_core.loading")

STUB_COMFY_API = """
import dataclasses, types
from unittest import mock
io = mock.MagicMock()
class ComfyNode:
    @classmethod
    def GET_SCHEMA(cls):
        return cls.define_schema()
@dataclasses.dataclass(init=False)
class Schema:  # a dataclass (nodes.v3.common reads its fields) that keeps whatever it is given
    def __init__(self, **fields):
        self.__dict__.update(fields)
io.ComfyNode, io.Schema = ComfyNode, Schema
latest = types.ModuleType("comfy_api.latest")
latest.io, latest.ComfyExtension = io, object
api = types.ModuleType("comfy_api")
api.latest = latest
sys.modules["comfy_api"], sys.modules["comfy_api.latest"] = api, latest
"""

PROBE = """
import asyncio, importlib.util, json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
{comfy_api}
import comfy_api.latest
t2 = time.perf_counter()
spec = importlib.util.spec_from_file_location("tadisr_pack", {init!r}, submodule_search_locations=[{root!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["tadisr_pack"] = pack
spec.loader.exec_module(pack)
t3 = time.perf_counter()
loop = asyncio.new_event_loop()
extension = loop.run_until_complete(pack.comfy_entrypoint())
t4 = time.perf_counter()
nodes = loop.run_until_complete(extension.get_node_list())
schemas = [node.GET_SCHEMA() for node in nodes]
t5 = time.perf_counter()
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"torch_s": t1 - t0, "comfy_api_s": t2 - t1, "pack_init_s": t3 - t2, "entrypoint_s": t4 - t3,
                  "schemas_s": t5 - t4, "nodes": len(nodes), "heavy": heavy}}))
"""

PARTS = ("pack_init_s", "entrypoint_s", "schemas_s", "total_s")


def probe(host: bool = False) -> dict:
    """One fresh-interpreter start-up: seconds per part (see the module's docstring)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TADISR_NO_COMFY="1")
    if host:
        sys.path.insert(0, str(REPO))
        from devtools import comfy_host

        python = str(comfy_host.python())
        if not Path(python).exists():
            raise SystemExit("no dev ComfyUI host: run `python -m devtools.comfy_host install` first")
        prelude = f"sys.path.insert(0, {str(comfy_host.comfy_dir())!r})"
        env = comfy_host.server_env(env)
        env["TADISR_NO_COMFY"] = "1"
    else:
        python, prelude = sys.executable, STUB_COMFY_API
    code = PROBE.format(comfy_api=prelude, init=str(REPO / "__init__.py"), root=str(REPO), heavy=HEAVY)
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    run = json.loads(out.stdout.strip().splitlines()[-1])
    run["total_s"] = run["pack_init_s"] + run["entrypoint_s"] + run["schemas_s"]
    return run


def report(runs: list[dict], host: bool) -> dict:
    """Best and median of each part over `runs`, the goal check on the best total."""
    out: dict = {"comfy_api": "real (dev host, ComfyUI 0.3.75)" if host else "stand-in (MagicMock io)",
                 "runs": len(runs), "nodes": runs[0]["nodes"]}
    for key in PARTS + (("comfy_api_s",) if host else ()):
        values = [r[key] for r in runs]
        out[key] = {"best": round(min(values), 4), "median": round(statistics.median(values), 4),
                    "all": [round(v, 4) for v in values]}
    out.update(goal_s=GOAL_S, meets_goal=out["total_s"]["best"] <= GOAL_S,
               heavy_after_entrypoint=sorted({m for r in runs for m in r["heavy"]}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--host", action="store_true", help="the dev ComfyUI host's python and real comfy_api")
    args = p.parse_args(argv)
    runs = [probe(args.host) for _ in range(args.runs)]
    print(json.dumps(report(runs, args.host), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
