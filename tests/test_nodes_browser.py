"""The pack in the real ComfyUI frontend (headless Chromium): every example_workflows/*.json opens
with no missing node type, framed clear of the menus and with no two nodes overlapping, converts to
the prompt stored in example_workflows/api/, runs from the UI on the tiny model and shows its output
images; the node search finds the nodes by what users type; a freshly added folder loader walks the
folder over three runs. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # see test_nodes_host.py

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO / "example_workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))  # UI files, named by their titles
SHOTS = REPO / "artifacts" / "screenshots"
UI_READY = "!!(window.app && window.app.graph && window.LiteGraph)"
TINY_MODEL = {"kolors": "tadisr-tiny-kolors", "checkpoint": "tadisr_tiny.safetensors",
              "prompt_cache": "prompt_cache.safetensors"}
TINY = {"TADiSRLoadModel": TINY_MODEL,
        "TADiSRUpscale": {"tile": 96, "overlap": 32}, "TADiSREncode": {"tile": 96, "overlap": 32},
        "LoadImage": {"image": "tadisr_ui_input.png"},
        "TADiSRLoadImageFromFolder": {"folder": "tadisr_ui_batch"}}

pytestmark = [pytest.mark.host, pytest.mark.browser]

LOAD_JS = """
const wf = %s;
const missing = [...new Set(wf.nodes.map(n => n.type))].filter(t => !LiteGraph.registered_node_types[t]);
await app.loadGraphData(wf);
await new Promise(r => setTimeout(r, 500));
app.canvas.setDirty(true, true); app.canvas.draw(true, true);
const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
const rects = app.graph._nodes.map(n => ({id: n.id, type: n.type,
  x0: n.pos[0], y0: n.pos[1] - title, x1: n.pos[0] + n.size[0], y1: n.pos[1] + n.size[1]}));
const overlaps = [];
for (let i = 0; i < rects.length; i++) for (let j = i + 1; j < rects.length; j++) {
  const a = rects[i], b = rects[j];
  if (a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1) overlaps.push([a.type, b.type]);
}
// framed: the corners and centre of every node are on screen and nothing (sidebar, menus, minimap) covers them
const box = app.canvas.canvas.getBoundingClientRect(), hidden = [];
for (const r of rects) {
  const a = app.canvas.ds.convertOffsetToCanvas([r.x0, r.y0]), b = app.canvas.ds.convertOffsetToCanvas([r.x1, r.y1]);
  const pts = [[a[0] + 2, a[1] + 2], [b[0] - 2, a[1] + 2], [a[0] + 2, b[1] - 2], [b[0] - 2, b[1] - 2],
               [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2]];
  for (const [x, y] of pts) {
    const el = document.elementFromPoint(box.x + x, box.y + y);
    // the node's own text box (a DOM widget) is fine
    const own = el && (el.closest('.dom-widget') || el.classList.contains('comfy-multiline-input'));
    if (el !== app.canvas.canvas && !own) {
      hidden.push([r.type, Math.round(x), Math.round(y), el ? el.className : null]);
      break;
    }
  }
}
const overrides = %s;
for (const node of app.graph._nodes) {
  for (const [name, value] of Object.entries(overrides[node.type] || {})) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) throw new Error(node.type + " has no widget " + name);
    w.value = value;
  }
}
const prompt = (await app.graphToPrompt()).output;
return {missing, overlaps, hidden, loaded: app.graph._nodes.length, prompt};
"""

SHOWN_JS = """(() => {
  const saves = app.graph._nodes.filter(n => n.type === 'SaveImage');
  const shown = n => (n.imgs || []).length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0);
  return saves.length > 0 && saves.every(shown)
    ? saves.map(n => [n.imgs[0].naturalWidth, n.imgs[0].naturalHeight]) : null;
})()"""

SEARCH_JS = """
const box = () => document.querySelector('.p-autocomplete-input, .comfy-vue-node-search-box input');
if (!box()) {
  app.extensionManager.command.execute('Workspace.SearchBox.Toggle');
  for (let i = 0; i < 50 && !box(); i++) await new Promise(r => setTimeout(r, 100));
}
const input = box();
if (!input) throw new Error("the node search box did not open");
input.focus(); input.select();
document.execCommand('insertText', false, %s);
await new Promise(r => setTimeout(r, 1500));
const found = [...document.querySelectorAll('[role=option]')].map(e => e.innerText.split('\\n')[0].trim());
app.extensionManager.command.execute('Workspace.SearchBox.Toggle');
await new Promise(r => setTimeout(r, 500));
return found;
"""

FRESH_FOLDER_JS = """
app.graph.clear();
const folder = LiteGraph.createNode("TADiSRLoadImageFromFolder"); app.graph.add(folder);
const control = folder.widgets.find(w => w.name === "control_after_generate").value;
folder.widgets.find(w => w.name === "folder").value = "tadisr_ui_batch";
const model = LiteGraph.createNode("TADiSRLoadModel"); app.graph.add(model);
for (const [k, v] of Object.entries(%s)) model.widgets.find(w => w.name === k).value = v;
const up = LiteGraph.createNode("TADiSRUpscale"); app.graph.add(up);
up.widgets.find(w => w.name === "tile").value = 96; up.widgets.find(w => w.name === "overlap").value = 32;
const save = LiteGraph.createNode("SaveImage"); app.graph.add(save);
model.connect(0, up, "model"); folder.connect(0, up, "image"); up.connect(0, save, "images");
folder.connect(1, save, "filename_prefix");
await app.queuePrompt(0, 3);
return control;
"""


def _dismiss_dialogs(browser) -> None:
    browser.eval("document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")


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
    time.sleep(2.0)  # the template browser opens by itself on a first start
    _dismiss_dialogs(browser)
    yield comfy_server, browser
    browser.leave_page()


def _api_shape(prompt: dict) -> dict:
    """Node classes and links of an API prompt (widget values left out: the test overrides some)."""
    return {k: (v["class_type"], {i: x for i, x in v["inputs"].items() if isinstance(x, list)})
            for k, v in prompt.items()}


def _new_history(server, before: set, count: int, timeout: float = 300) -> dict:
    server.wait_idle(timeout=timeout)
    new = {k: v for k, v in server.get_json("history").items() if k not in before}
    assert len(new) == count, f"expected {count} run(s) from the UI, history has {len(new)}"
    for entry in new.values():
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
    return new


def test_template_browser_lists_the_workflows_with_titles(ui):
    server, browser = ui
    assert len(WORKFLOWS) == 6 and not any(c in "".join(WORKFLOWS) for c in "-_")  # shown as titles
    index = browser.run("return await (await fetch('/api/workflow_templates')).json();")
    assert sorted(index.get("tadisr", [])) == WORKFLOWS
    for name in WORKFLOWS:
        status, _ = server.request("GET", f"api/workflow_templates/tadisr/{quote(name)}.jpg")
        assert status == 200, f"no thumbnail for {name}"
    i18n = browser.run("return await (await fetch('/i18n')).json();")
    for lang in ("en", "zh"):  # for frontends that translate a pack's template titles (1.32.9 shows file names)
        titles = i18n[lang]["templateWorkflows"]["template"]["tadisr"]
        assert sorted(titles) == WORKFLOWS and all(titles.values())
    browser.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    browser.wait_for("document.body.innerText.includes('TADiSR upscale 4x with text mask')", timeout=30)
    browser.screenshot(SHOTS / "template_browser.png")
    _dismiss_dialogs(browser)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_framed_without_overlap_runs_and_shows_its_output(ui, name):
    server, browser = ui
    ui_json = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    stored_api = json.loads((WORKFLOWS_DIR / "api" / f"{ui_json['extra']['tadisr_template']}.json").read_text())
    res = browser.run(LOAD_JS % (json.dumps(ui_json), json.dumps(TINY)), timeout=60)
    browser.screenshot(SHOTS / f"{ui_json['extra']['tadisr_template']}_opened.png")
    assert res["missing"] == [], f"{name}: missing node types {res['missing']}"
    assert res["loaded"] == len(ui_json["nodes"])
    assert res["overlaps"] == [], f"{name}: overlapping nodes {res['overlaps']}"
    assert res["hidden"] == [], f"{name}: nodes off screen or under the menus {res['hidden']}"
    assert _api_shape(res["prompt"]) == _api_shape(stored_api), "UI graph and example_workflows/api copy differ"

    before = set(server.get_json("history"))
    batch = 2 if any(n["type"] == "TADiSRLoadImageFromFolder" for n in ui_json["nodes"]) else 1
    browser.run(f"await app.queuePrompt(0, {batch});")
    new = _new_history(server, before, batch)
    files = {img["filename"] for e in new.values() for out in e["outputs"].values() for img in out.get("images", [])}
    if batch == 2:  # index incremented between the queued runs: two different source images
        assert any(f.startswith("page_0") for f in files) and any(f.startswith("page_1") for f in files), files
    sizes = browser.wait_for(SHOWN_JS, timeout=30)
    assert all(size == [192, 160] for size in sizes), sizes
    browser.screenshot(SHOTS / f"{ui_json['extra']['tadisr_template']}.png")
    errors = [e for e in browser.console_errors() if "tadisr" in e.lower()]
    assert errors == [], errors


@pytest.mark.parametrize("query, display_name", [
    ("super resolution", "TADiSR Super-Resolution Upscale (4x, text mask)"),
    ("text mask", "TADiSR Text Mask Composite"),
    ("kolors", "Load TADiSR Model (Kolors)"),
    ("OCR", "TADiSR Read Text (OCR)"),
    ("upscale", "TADiSR Super-Resolution Upscale (4x, text mask)"),
])
def test_node_search_finds_the_nodes(ui, query, display_name):
    _, browser = ui
    found = browser.run(SEARCH_JS % json.dumps(query), timeout=30)
    assert display_name in found, f"searching {query!r} found {found}"


def test_folder_loader_added_fresh_walks_the_folder_three_times(ui):
    """Defect: a folder loader added from the node library had 'randomize' and failed on the second run."""
    server, browser = ui
    before = set(server.get_json("history"))
    control = browser.run(FRESH_FOLDER_JS % json.dumps(TINY_MODEL), timeout=60)
    assert control == "increment"
    new = _new_history(server, before, 3)
    order = sorted(new.values(), key=lambda e: e["prompt"][0])
    served = [next(img["filename"] for out in e["outputs"].values() for img in out.get("images", []))
              for e in order]
    assert [f.split("_0000")[0] for f in served] == ["page_0", "page_1", "page_0"], served  # wraps after the last
