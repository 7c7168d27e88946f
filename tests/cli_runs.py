"""Running `tadisr upscale` in-process on the tiny random model: what the CLI tests share.

conftest.py imports the fixture: `from tests.cli_runs import *` (exports only `tiny_model`); the
helpers are imported by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tadisr_core import cli

__all__ = ["tiny_model"]  # what `from tests.cli_runs import *` brings

# small tiles for tiny inputs, and weight flags the in-process runs never read (the model is passed in)
FAST = ["--tile", "64", "--overlap", "16", "--tile-batch", "2", "--kolors", "k", "--checkpoint", "c"]


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    """The tiny release-layout model of `make-tiny`, loaded as the CLI loads it (fp32, CPU)."""
    from tadisr_core.loading import load_tadisr

    return load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])


def random_png(path: Path, seed: int = 0, size=(12, 10)) -> Path:
    """An RGB PNG of seeded noise, `size` = (height, width)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def run_cli(argv: list[str], capsys, **kw) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tadisr ARGV` run in-process (`cli.run_upscale` with `kw`, e.g.
    model=...), a setup error printed and exiting 2 as `main` does."""
    args = cli.build_parser().parse_args(argv)
    try:
        rc = cli.run_upscale(args, **kw)
    except cli.SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        rc = cli.EXIT_SETUP
    out, err = capsys.readouterr()
    return rc, out, err


def run_reported(argv: list[str], capsys, **kw) -> tuple[int, dict | None, str]:
    """`run_cli` with stdout read as the --json report (None when empty)."""
    rc, out, err = run_cli(argv, capsys, **kw)
    return rc, json.loads(out) if out.strip() else None, err
