"""Importing the node pack must not slow ComfyUI's start-up: no diffusers / peft / transformers until
a node runs. (Its time over `import torch` is a benchmark, not a test: benchmarks/bench_import_time.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "peft", "transformers", "accelerate", "safetensors", "tadisr_core.model", "tadisr_core.loading")

# ComfyUI loads a pack as a package from its folder's __init__.py; so does this probe.
PROBE = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("tadisr_pack", {init!r}, submodule_search_locations=[{root!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["tadisr_pack"] = pack
spec.loader.exec_module(pack)
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
found = {{m: importlib.util.find_spec(m) is not None for m in ("tadisr_core", "tests", "devtools")}}
print(json.dumps({{"entry": callable(pack.comfy_entrypoint), "heavy": heavy, "importable": found}}))
"""


def _probe() -> dict:
    code = PROBE.format(init=str(REPO / "__init__.py"), root=str(REPO), heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pack_import_is_lazy():
    run = _probe()
    assert run["entry"]
    # the pack makes tadisr_core importable, not the repository root (`training` is left out of the check:
    # the development venv installs it)
    assert run["importable"] == {"tadisr_core": True, "tests": False, "devtools": False}
    assert run["heavy"] == [], f"pack import pulled in {run['heavy']}"


def test_the_entry_points_are_reachable_from_the_package_and_load_on_first_use():
    """Review: `import tadisr_core` offered only `__version__`; a diffusers user looks for `load_model` and
    `upscale` there. They are imported when first named, so the package import stays cheap."""
    code = ("import json, sys, tadisr_core; before = 'tadisr_core.pipeline' in sys.modules; "
            "from tadisr_core import load_model, upscale; "
            "import tadisr_core.pipeline as p, tadisr_core.model_ref as m; from tadisr_core import cli; "
            "print(json.dumps([before, upscale is p.upscale, load_model is m.load_model, "
            "sorted(set(tadisr_core.__all__) - set(dir(tadisr_core)))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True, True, []]
