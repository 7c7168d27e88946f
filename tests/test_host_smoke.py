"""Smoke tests of the development host: a real ComfyUI with this repo linked as a pack, and its UI."""

from __future__ import annotations

from pathlib import Path

import pytest

# The fixtures (comfy_server, browser) come from tests/host_fixtures.py via conftest.py; importing them
# here as well would give this module its own session server.
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

UI_READY = "!!(window.app && window.app.graph && window.LiteGraph)"


@pytest.mark.host
def test_server_answers_with_builtin_nodes(comfy_server):
    info = comfy_server.object_info()
    for node in ("LoadImage", "SaveImage", "PreviewImage"):
        assert node in info, f"{node} missing from /object_info ({len(info)} node types)"
    assert comfy_server.pack_import_failures() == []
    assert comfy_server.alive()


@pytest.fixture
def home_page(comfy_server, browser):
    """The browser on ComfyUI's page, left afterwards (`Browser.leave_page`)."""
    browser.goto(comfy_server.url)
    yield browser
    browser.leave_page()


@pytest.mark.host
@pytest.mark.browser
def test_ui_loads_and_screenshots(home_page):
    browser = home_page
    browser.wait_for(UI_READY, timeout=60)
    n_types = browser.eval("Object.keys(LiteGraph.registered_node_types).length")
    assert n_types > 100, f"only {n_types} node types registered in the page"
    assert browser.console_errors() == [], "console errors beyond the host's known offline noise"
    shot = browser.screenshot(ARTIFACTS / "screenshots" / "ui_home.png")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"screenshot suspiciously small ({len(data)} bytes)"
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 900)
        colors = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colors is None or len(colors) > 50, "screenshot is nearly blank"
