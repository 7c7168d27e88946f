"""How a batch run reports and stops on failed files: the closing summary names them (not only under a
launcher), and a full disk stops the run at the first file it fails instead of upscaling every other one
to fail alike."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tadisr_core import batch, cli, images
from tests.cli_runs import FAST, random_png, run_reported


def _upscale(argv: list[str], capsys, model) -> tuple[int, dict | None, str]:
    return run_reported(["upscale", *argv, *FAST], capsys, model=model)


def test_the_summary_names_the_failed_files_without_a_launcher(tiny_model, tmp_path, capsys):
    """Defect: one process (no launcher) printed "1 of 23 files written, 22 failed" and named none of the 22
    once the progress bars had scrolled the per-file errors away; only launched runs listed them."""
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "a.png")
    bad = [d / f"bad{k:02d}.png" for k in range(22)]
    for path in bad:
        path.write_bytes(b"not a png")
    rc, _, err = _upscale([str(d), "-o", str(tmp_path / "o")], capsys, tiny_model)
    assert rc == cli.EXIT_FAILED
    summary = err[err.index(f"1 of {len(bad) + 1} files written to {tmp_path / 'o'}, {len(bad)} failed\n"):]
    listed = [line for line in summary.splitlines() if line.startswith("  failed: ")]
    assert listed == [f"  failed: cannot read {p} as an image: not an image format Pillow knows (damaged, or "
                      f"another kind of file)" for p in bad[:20]]
    assert summary.splitlines()[-1] == "  and 2 more failed; --json lists them all"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_stops_the_run_naming_the_output_folder(code, tiny_model, tmp_path, capsys, monkeypatch):
    """Defect: a full disk read "error: in/a.png: [Errno 28] No space left on device" for every file, each after
    its whole upscale. Now the first names the output folder and what to do, and the rest are not tried."""
    d = tmp_path / "in"
    d.mkdir()
    inputs = [random_png(d / f"{name}.png", k) for k, name in enumerate("abc")]
    out = tmp_path / "o"
    upscales, writes = [], []

    def upscale(*args, **kwargs):
        upscales.append(args[1].shape)
        return real_upscale(*args, **kwargs)

    def write(*args, **kwargs):
        writes.append(args[1])
        Path(args[1]).write_bytes(b"half")  # what a full disk leaves: a temporary that must go
        raise OSError(code, os.strerror(code))

    real_upscale = batch.upscale
    monkeypatch.setattr(batch, "upscale", upscale)
    monkeypatch.setattr(images, "_write", write)
    rc, rep, err = _upscale([str(d), "-o", str(out), "--json"], capsys, tiny_model)
    assert rc == cli.EXIT_FAILED and len(upscales) == 1 and len(writes) == 1
    first = (f"{inputs[0]}: cannot write its outputs to {out}: {os.strerror(code).lower()}; free space there or "
             f"choose another output folder (-o)")
    assert [f["error"] for f in rep["files"]] == [first] + [
        f"{p}: not tried: the run stopped when the disk holding {out} filled up" for p in inputs[1:]]
    assert (rep["ok"], rep["failed"]) == (0, 3)
    assert f"error: {first}\n" in err and "error: stopped: 2 file(s) not tried\n" in err
    assert list(out.iterdir()) == []  # no outputs, no temporaries
