"""The model descriptor is the one source of what the model supports: the CLI, the library and the nodes
read its channel rule and default tiling instead of keeping their own copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A descriptor with other values is put in place before any reader is imported; every reader must follow it.
PROBE = """
import dataclasses, inspect, json, sys, types
from unittest import mock

import torch
import tadisr_core.descriptor as d

size = dataclasses.replace(d.DESCRIPTOR.size, default_tile=512, default_overlap=128, default_scale=2.0)
d.DESCRIPTOR = dataclasses.replace(d.DESCRIPTOR, size=size, input_channels=(3, 4))

io = mock.MagicMock()              # comfy_api.latest faked just enough to declare the V3 nodes
io.ComfyNode = object
io.Schema = dataclasses.make_dataclass("Schema", [])
latest = types.ModuleType("comfy_api.latest")
latest.io, latest.ComfyExtension = io, object
sys.modules["comfy_api"] = types.SimpleNamespace(latest=latest)
sys.modules["comfy_api.latest"] = latest

from nodes import blocks, convert, upscale
from nodes.v3 import TADiSREncode, TADiSRUpscale
from tadisr_core import batch, cli, finite, images, pipeline


def tiling(fn):
    p = inspect.signature(fn).parameters
    return {k: p[k].default for k in ("scale", "tile", "overlap") if k in p}


def tiling_of(settings):
    return {k: getattr(settings, k) for k in ("scale", "tile", "overlap")}


def refusal(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)


args = cli.build_parser().parse_args(["upscale", "in.png", "-o", "out"])
helps = {a.dest: a.help for a in cli.build_parser()._subparsers._group_actions[0].choices["upscale"]._actions}
gray = torch.rand(1, 1, 8, 8)
print(json.dumps({
    "defaults": {
        "cli": tiling_of(args), "batch.Options": tiling_of(batch.Options()),
        **{f"pipeline.{f.__name__}": tiling(f) for f in (pipeline.tile_grid, pipeline.upscale,
                                                         pipeline.kept_state_bytes, pipeline.encode_tiles)},
        "nodes.upscale": tiling(upscale.upscale), "nodes.blocks.encode": tiling(blocks.encode),
        "TADiSRUpscale": tiling(TADiSRUpscale.execute), "TADiSREncode": tiling(TADiSREncode.execute),
    },
    "help": [helps["scale"], helps["tile"], helps["overlap"]],
    "refusals": [refusal(lambda: finite.check_input_image(gray)),
                 refusal(lambda: convert.image_to_core(gray.movedim(1, -1))),
                 refusal(lambda: images.check_writable("out.png", 1))],
}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_default_tiling_reads_the_descriptor(probe):
    """Review: 4 / 768 / 256 were retyped in the CLI, the batch options, the pipeline and the nodes; now a
    descriptor with other defaults (2 / 512 / 128) is followed everywhere, the CLI's help included."""
    want = {"scale": 2.0, "tile": 512, "overlap": 128}
    assert probe["defaults"] == {name: want if name != "pipeline.tile_grid" else {"tile": 512, "overlap": 128}
                                 for name in probe["defaults"]}
    assert len(probe["defaults"]) == 10
    assert probe["help"] == ["upscale factor, 1 to 8 (default 2)",
                             "tile size in output pixels, multiple of 8 (default 512)",
                             "tile overlap in output pixels (default 128)"]


def test_every_channel_check_reads_the_descriptor(probe):
    """Review: the 1 / 3 / 4 channel rule was written four times; now a descriptor taking 3 or 4 channels
    makes the library, the node boundary and the image writer refuse a gray image, each message naming
    the descriptor's counts."""
    assert probe["refusals"] == [
        "expected an image [B, C, H, W] with C in 3, 4 (gray, RGB, RGBA), got (1, 1, 8, 8)",
        "TADiSR: the image must be [batch, height, width, channels] with 3 or 4 channels, got shape (1, 8, 8, 1)",
        "out.png: cannot save 1 channels as an image (need 3 or 4)",
    ]


def test_channels_text_joins_the_counts():
    from tadisr_core.descriptor import DESCRIPTOR

    assert DESCRIPTOR.input_channels == (1, 3, 4)
    assert DESCRIPTOR.channels_text() == "1, 3 or 4"
    assert not hasattr(DESCRIPTOR, "weight_dtypes")  # the weight precisions are WEIGHT_DTYPES' keys, nowhere else
