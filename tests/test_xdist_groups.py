"""`make test`'s --dist loadgroup keeps an xdist_group on one worker (it silently did not under pytest 9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.processes import subprocess_env

GROUPED = """
import os
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("workers")


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(8))
def test_grouped(i):
    (WORKERS / f"grouped_{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.parametrize("i", range(8))
def test_free(i):
    (WORKERS / f"free_{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "workers").mkdir()
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent(GROUPED))
    (tmp_path / "conftest.py").write_text("from tests.xdist_groups import name_groups\n\n\n"
                                          "def pytest_collection_modifyitems(config, items):\n"
                                          "    name_groups(config, items)\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", "-v", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worker = {f.name: f.read_text() for f in (tmp_path / "workers").iterdir()}
    assert len(worker) == 16
    assert len({worker[f"grouped_{i}"] for i in range(8)}) == 1, worker
    assert len(set(worker.values())) == 2, worker  # the free tests still use both workers
    assert "test_grouped[0]@together" in done.stdout
