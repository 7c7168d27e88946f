"""Session fixtures for tests against the real ComfyUI host and headless Chromium.

conftest.py imports them: `from tests.host_fixtures import *` (exports only the three fixtures).

Setting TADISR_SKIP_HOST=1 skips every test that uses them; otherwise a failing install/prepare or a
server that does not start is a test error (never a silent skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devtools.browser import CHROMIUM, Browser
from devtools.server import REPO, ComfyServer, ensure_host

ARTIFACTS = REPO / "artifacts"
__all__ = ["comfy_host", "comfy_server", "browser"]  # what `from tests.host_fixtures import *` brings


def _skip_requested() -> None:
    if os.environ.get("TADISR_SKIP_HOST") == "1":
        pytest.skip("TADISR_SKIP_HOST=1: real ComfyUI host / browser tests skipped")


@pytest.fixture(scope="session")
def comfy_host() -> None:
    """The host venv and base directory exist (runs `devtools.comfy_host install` and `prepare`)."""
    _skip_requested()
    ensure_host()


@pytest.fixture(scope="session")
def comfy_server(comfy_host) -> ComfyServer:
    """One ComfyUI server for the session; log in artifacts/logs/, outputs in artifacts/comfy_output/."""
    out = ARTIFACTS / "comfy_output"
    shutil.rmtree(out, ignore_errors=True)
    with ComfyServer(log_path=ARTIFACTS / "logs" / "comfy_server.log", output_dir=out) as server:
        yield server


@pytest.fixture(scope="session")
def browser() -> Browser:
    """One headless Chromium for the session (installed by scripts/install_test_deps.sh if missing)."""
    _skip_requested()
    if not Path(CHROMIUM).exists():
        subprocess.run(["bash", str(REPO / "scripts" / "install_test_deps.sh")], check=True)
    with Browser() as b:
        yield b
