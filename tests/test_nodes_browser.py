"""The example workflows in the real ComfyUI frontend (headless Chromium): each workflows/*.json
loads with no missing node type, converts to the prompt stored in workflows/api/, runs from the
UI on the tiny model and shows its output images. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # see test_nodes_host.py

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
SHOTS = REPO / "artifacts" / "screenshots"
UI_READY = "!!(window.app && window.app.graph && window.LiteGraph)"
TINY = {"TADiSRLoadModel": {"kolors": "tadisr-tiny-kolors", "checkpoint": "tadisr_tiny.safetensors",
                            "prompt_cache": "prompt_cache.safetensors"},
        "TADiSRUpscale": {"tile": 96, "overlap": 32}, "TADiSREncode": {"tile": 96, "overlap": 32},
        "LoadImage": {"image": "tadisr_ui_input.png"},
        "TADiSRLoadImageFromFolder": {"folder": "tadisr_ui_batch"}}

pytestmark = [pytest.mark.host, pytest.mark.browser]

LOAD_JS = """
const wf = %s;
const missing = [...new Set(wf.nodes.map(n => n.type))].filter(t => !LiteGraph.registered_node_types[t]);
await app.loadGraphData(wf);
const overrides = %s;
for (const node of app.graph._nodes) {
  for (const [name, value] of Object.entries(overrides[node.type] || {})) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) throw new Error(node.type + " has no widget " + name);
    w.value = value;
  }
}
const prompt = (await app.graphToPrompt()).output;
return {missing, loaded: app.graph._nodes.length, types: app.graph._nodes.map(n => n.type), prompt};
"""

SHOWN_JS = """(() => {
  const saves = app.graph._nodes.filter(n => n.type === 'SaveImage');
  return saves.length > 0 && saves.every(n => (n.imgs || []).length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0))
    ? saves.map(n => [n.imgs[0].naturalWidth, n.imgs[0].naturalHeight]) : null;
})()"""


@pytest.fixture(scope="module")
def ui(comfy_server, browser, tmp_path_factory):
    """The ComfyUI page, ready, with this module's input images uploaded."""
    from PIL import Image, ImageDraw

    tmp = tmp_path_factory.mktemp("ui_inputs")

    def sign(name: str, shade: int) -> Path:
        im = Image.new("RGB", (48, 40), (240, 220 - shade, 200))
        ImageDraw.Draw(im).text((4, 14), "TEXT", fill=(20, 20, 90))
        im.save(tmp / name)
        return tmp / name

    comfy_server.upload_image(sign("tadisr_ui_input.png", 0))
    for i in range(2):
        comfy_server.upload_image(sign(f"page_{i}.png", 40 * i), subfolder="tadisr_ui_batch")
    browser.goto(comfy_server.url)
    browser.wait_for(UI_READY, timeout=60)
    return comfy_server, browser


def _api_shape(prompt: dict) -> dict:
    """Node classes and links of an API prompt (widget values left out: the test overrides some)."""
    return {k: (v["class_type"], {i: x for i, x in v["inputs"].items() if isinstance(x, list)})
            for k, v in prompt.items()}


def test_template_browser_lists_the_workflows(ui):
    server, browser = ui
    index = browser.run("return await (await fetch('/api/workflow_templates')).json();")
    assert sorted(index.get("tadisr", [])) == WORKFLOWS
    for name in WORKFLOWS:
        status, _ = server.request("GET", f"api/workflow_templates/tadisr/{name}.jpg")
        assert status == 200, f"no thumbnail for {name}"
    browser.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    browser.wait_for("document.body.innerText.includes('tadisr')", timeout=30)
    browser.screenshot(SHOTS / "template_browser.png")
    browser.goto(server.url)  # a fresh page closes the dialog, whatever its markup
    browser.wait_for(UI_READY, timeout=60)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_converts_queues_and_shows_its_output(ui, name):
    server, browser = ui
    ui_json = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    stored_api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    res = browser.run(LOAD_JS % (json.dumps(ui_json), json.dumps(TINY)), timeout=60)
    assert res["missing"] == [], f"{name}: missing node types {res['missing']}"
    assert res["loaded"] == len(ui_json["nodes"])
    assert _api_shape(res["prompt"]) == _api_shape(stored_api), "UI graph and workflows/api copy differ"

    before = set(server.get_json("history"))
    batch = 2 if any(n["type"] == "TADiSRLoadImageFromFolder" for n in ui_json["nodes"]) else 1
    browser.run(f"await app.queuePrompt(0, {batch});")
    server.wait_idle()
    new = {k: v for k, v in server.get_json("history").items() if k not in before}
    assert len(new) == batch, f"{name}: expected {batch} run(s) from the UI, history has {len(new)}"
    for entry in new.values():
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
    files = {img["filename"] for e in new.values() for out in e["outputs"].values() for img in out.get("images", [])}
    if batch == 2:  # index incremented between the queued runs: two different source images
        assert any(f.startswith("page_0") for f in files) and any(f.startswith("page_1") for f in files), files
    sizes = browser.wait_for(SHOWN_JS, timeout=30)
    assert all(size == [192, 160] for size in sizes), sizes
    browser.eval("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(0.5)
    browser.screenshot(SHOTS / f"{name}.png")
    errors = [e for e in browser.console_errors() if "tadisr" in e.lower()]
    assert errors == [], errors
