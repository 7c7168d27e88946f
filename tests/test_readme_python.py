"""The README's Python example runs as written (with the demo model, in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadisr_core.model_ref import DEMO_CHECKPOINT

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(), reason="the demo model is not in this checkout")
def test_the_readme_python_example_runs_with_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save("sign.png")
    scope = {"REAL_WEIGHTS": False}
    exec(compile(_python_block(), str(README), "exec"), scope)
    out, mask = Image.open("sign_x4.png"), Image.open("sign_text_mask.png")
    assert out.size == mask.size == (160, 96) and out.mode == "RGB"
    result = scope["result"]
    assert result.image.shape == (1, 3, 96, 160) and torch.isfinite(result.image).all()
    assert np.array_equal(np.asarray(out), (result.image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_the_readme_python_example_names_what_exists():
    """Each name the example imports or calls with the real weights is there, with a docstring."""
    import importlib

    block = _python_block()
    for module, names in re.findall(r"^from (\S+) import (.+)$", block, re.M):
        for name in (n.strip() for n in names.split(",")):
            obj = getattr(importlib.import_module(module), name)
            assert obj.__doc__, f"{module}.{name} has no docstring"
    import inspect

    from tadisr_core.loading import load_tadisr

    params = inspect.signature(load_tadisr).parameters
    assert {"dtype", "device", "offload"} <= set(params)
