"""Fixtures and helpers of the node tests that run without ComfyUI (test_nodes_unit.py,
test_nodes_text_tools.py).

conftest.py imports the fixtures: `from tests.node_fixtures import *` (exports only them); the
helpers are imported by name.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from nodes import loaders, model_cache

__all__ = ["models_dir", "handle", "v3"]  # what `from tests.node_fixtures import *` brings

TILE = dict(scale=4.0, tile=64, overlap=16, tile_batch=2)


def random_image(b=1, h=24, w=16, c=3, seed=0):
    """A ComfyUI IMAGE ([batch, height, width, channels], 0..1) of seeded uniform noise."""
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


def _link_models(root, tiny: dict) -> None:
    """A ComfyUI models/ layout under `root` whose entries link to the tiny Kolors folder and checkpoints."""
    (root / "diffusers").mkdir(parents=True)
    (root / "tadisr").mkdir()
    (root / "diffusers" / "tiny-kolors").symlink_to(tiny["kolors"])
    (root / "diffusers" / "not-kolors").mkdir()  # no unet/ vae/: must not be offered
    for key in ("checkpoint", "official", "prompt_cache"):
        (root / "tadisr" / tiny[key].name).symlink_to(tiny[key])


@pytest.fixture(scope="module")
def models_dir(tiny_dir, tmp_path_factory):
    """A models/ folder with the tiny Kolors folder and checkpoints, used through $TADISR_MODELS_DIR."""
    root = tmp_path_factory.mktemp("models")
    _link_models(root, tiny_dir)
    old = os.environ.get("TADISR_MODELS_DIR")
    os.environ["TADISR_MODELS_DIR"] = str(root)
    yield root
    model_cache.clear()
    if old is None:
        os.environ.pop("TADISR_MODELS_DIR", None)
    else:
        os.environ["TADISR_MODELS_DIR"] = old


@pytest.fixture(scope="module")
def handle(models_dir):
    """The loader node's model handle of the tiny release-layout model, in fp32 on the CPU."""
    return loaders.load_model("tiny-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32", "cpu",
                              False)


@pytest.fixture
def v3(monkeypatch):
    """nodes.v3 imported with `comfy_api.latest` faked just enough to call the nodes' `execute` (with an
    empty queued prompt); the real modules, and none of these, are left in sys.modules afterwards."""
    import dataclasses
    import importlib
    from unittest import mock

    import nodes

    io = mock.MagicMock()
    io.ComfyNode = type("ComfyNode", (), {"hidden": types.SimpleNamespace(prompt={}, unique_id="1")})
    io.NodeOutput = lambda *outputs: outputs
    io.Schema = dataclasses.make_dataclass("Schema", [])
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, object
    api = types.ModuleType("comfy_api")
    api.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", api)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    ours = lambda: [name for name in sys.modules if name == "nodes.v3" or name.startswith("nodes.v3.")]  # noqa: E731
    for name in ours():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(nodes, "v3", raising=False)
    yield importlib.import_module("nodes.v3")
    for name in ours():
        del sys.modules[name]
    if hasattr(nodes, "v3"):
        del nodes.v3
