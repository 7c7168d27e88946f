"""Regenerate the example workflows: UI-format JSON, API-format copies and thumbnails.

    .venv/bin/python workflows/build_workflows.py [NAME ...]

Needs the development host (scripts/comfy_host.py install + prepare) and Chromium. Each graph
is built in the real ComfyUI frontend from the specs below, so the UI JSON is exactly what that
frontend saves; the API copy is its own graphToPrompt() conversion. The graph is then run once
on the tiny random model (small input, small tiles) and the canvas screenshot becomes the .jpg
thumbnail the template browser shows. Outputs of the tiny model are noise-like by design.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.browser import Browser  # noqa: E402
from tests.comfy_host import ComfyServer, host_script  # noqa: E402

MODEL = {"kolors": "Kolors", "checkpoint": "tadisr_kolors_ftsr_526000.pkl", "prompt_cache": "auto (compute once)",
         "dtype": "auto", "device": "auto", "merge_lora": False}
TILING = {"scale": 4.0, "tile": 768, "overlap": 256, "tile_batch": 0}
TINY = {"TADiSRLoadModel": {"kolors": "tadisr-tiny-kolors", "checkpoint": "tadisr_tiny.safetensors",
                            "prompt_cache": "prompt_cache.safetensors"},
        "TADiSRUpscale": {"tile": 96, "overlap": 32}, "TADiSREncode": {"tile": 96, "overlap": 32},
        "LoadImage": {"image": "tadisr_example.png"}}
SETUP = ("Setup: the Kolors diffusers folder goes to models/diffusers/Kolors, the TADiSR checkpoint "
         "(tadisr_kolors_ftsr_526000.pkl or a .safetensors conversion) to models/tadisr. On the first run the "
         "prompt cache is computed once from Kolors' ChatGLM3 and saved to models/tadisr.")
TILES = ("Tiles: 768 px with 256 px overlap, as trained. Lower 'tile' if VRAM is short (out-of-memory also "
         "lowers it automatically). The automated tests run this graph on a tiny random model with tile 96 / "
         "overlap 32 and a small input.")


def _node(key, type_, pos, size=None, **widgets):
    return {"key": key, "type": type_, "pos": pos, "size": size, "widgets": widgets}


def _saves(prefix: str, image_src, mask_src, x: int, y: int) -> tuple[list, list]:
    """SaveImage for the image, MaskToImage + SaveImage for a mask."""
    nodes = [_node("save_image", "SaveImage", [x, y], [380, 390], filename_prefix=f"{prefix}/upscaled"),
             _node("mask_to_image", "MaskToImage", [x + 400, y]),
             _node("save_mask", "SaveImage", [x + 400, y + 90], [380, 390], filename_prefix=f"{prefix}/text_mask")]
    links = [(*image_src, "save_image", "images"), (*mask_src, "mask_to_image", "mask"),
             ("mask_to_image", 0, "save_mask", "images")]
    return nodes, links


def _upscale_spec() -> dict:
    nodes = [_node("image", "LoadImage", [20, 280], [320, 340], image="example.png"),
             _node("model", "TADiSRLoadModel", [20, 20], [320, 220], **MODEL),
             _node("upscale", "TADiSRUpscale", [370, 20], [320, 240], **TILING, capture_attention=False)]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image")]
    more_nodes, more_links = _saves("tadisr", ("upscale", 0), ("upscale", 1), 720, 20)
    note = ("TADiSR: text-aware 4x super-resolution, all in one node.\n\nLoad Image -> TADiSR Upscale -> the "
            "upscaled image and a mask of where the model found text (saved as an image beside it).\n\n"
            f"{SETUP}\n\n{TILES}")
    return {"nodes": nodes + more_nodes + [_node("note", "Note", [370, 300], [320, 320], text=note)],
            "links": links + more_links}


def _blocks_spec() -> dict:
    nodes = [_node("image", "LoadImage", [20, 280], [320, 340], image="example.png"),
             _node("model", "TADiSRLoadModel", [20, 20], [320, 220], **MODEL),
             _node("encode", "TADiSREncode", [370, 20], [300, 200], **TILING),
             _node("denoise", "TADiSRDenoise", [370, 250], [300, 100], tile_batch=0),
             _node("decode", "TADiSRDecode", [370, 380], [300, 100], tile_batch=0)]
    links = [("model", 0, "encode", "model"), ("image", 0, "encode", "image"), ("model", 0, "denoise", "model"),
             ("encode", 0, "denoise", "latents"), ("model", 0, "decode", "model"), ("denoise", 0, "decode", "latents")]
    more_nodes, more_links = _saves("tadisr_blocks", ("decode", 0), ("decode", 1), 700, 20)
    note = ("TADiSR as graph blocks: Encode (bicubic x scale, tiles, VAE encoder) -> One-Step Denoise (one UNet "
            "pass at t=200, captures the 'text' attention) -> Joint Decode (image + text-mask decoders, Hann-blended "
            "tiles). Same result as TADiSR Upscale with the same settings, but every tile's latents wait in RAM "
            f"between the steps.\n\n{SETUP}\n\n{TILES}")
    return {"nodes": nodes + more_nodes + [_node("note", "Note", [370, 510], [300, 330], text=note)],
            "links": links + more_links}


def _attention_spec() -> dict:
    nodes = [_node("image", "LoadImage", [20, 280], [320, 340], image="example.png"),
             _node("model", "TADiSRLoadModel", [20, 20], [320, 220], **MODEL),
             _node("upscale", "TADiSRUpscale", [370, 20], [320, 240], **TILING, capture_attention=True),
             _node("attention", "TADiSRTextAttention", [370, 300], [320, 220], layers="all", heads="mean",
                   normalize=True, colormap="jet", opacity=0.5),
             _node("save_overlay", "SaveImage", [720, 20], [380, 390], filename_prefix="tadisr_attention/overlay"),
             _node("heat_to_image", "MaskToImage", [1120, 20]),
             _node("save_heat", "SaveImage", [1120, 110], [380, 390], filename_prefix="tadisr_attention/heatmap")]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image"),
             ("upscale", 2, "attention", "attention"), ("upscale", 0, "attention", "image"),
             ("attention", 1, "save_overlay", "images"), ("attention", 0, "heat_to_image", "mask"),
             ("heat_to_image", 0, "save_heat", "images")]
    more_nodes, more_links = _saves("tadisr_attention", ("upscale", 0), ("upscale", 1), 720, 450)
    note = ("Where does TADiSR look for text? TADiSR Upscale with capture_attention on also outputs the "
            "cross-attention to the word 'text'; TADiSR Text Attention turns it into a heat map (MASK) and an "
            "overlay on the upscaled image. Try layers = up and heads = max for sharper maps.\n\n"
            f"{SETUP}\n\n{TILES}")
    return {"nodes": nodes + more_nodes + [_node("note", "Note", [370, 560], [320, 300], text=note)],
            "links": links + more_links}


def _batch_spec() -> dict:
    nodes = [_node("folder", "TADiSRLoadImageFromFolder", [20, 280], [320, 170], folder="tadisr_batch", index=0,
                   control_after_generate="increment", prefix="tadisr_batch/"),
             _node("model", "TADiSRLoadModel", [20, 20], [320, 220], **MODEL),
             _node("upscale", "TADiSRUpscale", [370, 20], [320, 240], **TILING, capture_attention=False),
             _node("save_image", "SaveImage", [720, 20], [380, 390]),
             _node("mask_to_image", "MaskToImage", [1120, 20]),
             _node("save_mask", "SaveImage", [1120, 110], [380, 390])]
    links = [("model", 0, "upscale", "model"), ("folder", 0, "upscale", "image"),
             ("upscale", 0, "save_image", "images"), ("folder", 1, "save_image", "filename_prefix"),
             ("upscale", 1, "mask_to_image", "mask"), ("mask_to_image", 0, "save_mask", "images"),
             ("folder", 2, "save_mask", "filename_prefix")]
    note = ("Batch-upscale a folder through the queue. Put the images in ComfyUI/input/tadisr_batch (or type an "
            "absolute folder). 'index' picks one image per run and increments after each queued run: set the Run "
            "button's batch count to the number of images (the 'count' output tells it) and press Run once. "
            "Results are saved as output/tadisr_batch/<name>_00001_.png and <name>_text_mask_00001_.png; "
            "a broken file fails only its own run.\n\nFrom a script: POST workflows/api/tadisr_batch_folder.json "
            f"once per index.\n\n{SETUP}\n\n{TILES}")
    return {"nodes": nodes + [_node("note", "Note", [20, 480], [320, 380], text=note)], "links": links}


SPECS = {"tadisr_upscale": _upscale_spec, "tadisr_graph_blocks": _blocks_spec,
         "tadisr_text_attention": _attention_spec, "tadisr_batch_folder": _batch_spec}

BUILD_JS = """
const spec = %s;
app.graph.clear();
const byKey = {};
for (const n of spec.nodes) {
  const node = LiteGraph.createNode(n.type);
  if (!node) throw new Error("unknown node type " + n.type);
  node.pos = n.pos;
  app.graph.add(node);
  for (const [name, value] of Object.entries(n.widgets)) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) throw new Error(n.type + " has no widget " + name);
    w.value = value;
  }
  if (n.size) node.size = n.size;
  byKey[n.key] = node;
}
for (const [src, slot, dst, input] of spec.links) {
  if (!byKey[src].connect(slot, byKey[dst], input)) throw new Error("cannot link " + src + " -> " + dst + "." + input);
}
app.graph.setDirtyCanvas(true, true);
return {ui: app.graph.serialize(), api: (await app.graphToPrompt()).output};
"""

OVERRIDE_JS = """
const overrides = %s;
for (const node of app.graph._nodes) {
  for (const [name, value] of Object.entries(overrides[node.type] || {})) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (w) { w.value = value; w.callback?.(value); }
  }
}
"""


def _sample_images(input_dir: Path) -> None:
    """Small inputs for the thumbnail runs (the tiny model makes noise of any input anyway)."""
    from PIL import Image, ImageDraw

    def sign(text: str, hue: int) -> Image.Image:
        im = Image.new("RGB", (48, 40), (250, 240 - hue, 200 + hue // 2))
        d = ImageDraw.Draw(im)
        d.rectangle((2, 10, 45, 29), fill=(30, 60 + hue, 120))
        d.text((5, 14), text, fill=(255, 255, 255))
        return im

    input_dir.mkdir(parents=True, exist_ok=True)
    sign("TEXT", 0).save(input_dir / "tadisr_example.png")
    (input_dir / "tadisr_batch").mkdir(exist_ok=True)
    for i, word in enumerate(("SALE", "OPEN")):
        sign(word, 40 * (i + 1)).save(input_dir / "tadisr_batch" / f"sign_{i}.png")


BBOX_JS = """(() => {
  const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const r = app.canvas.canvas.getBoundingClientRect();
  const a = app.canvas.ds.convertOffsetToCanvas([x0, y0]), b = app.canvas.ds.convertOffsetToCanvas([x1, y1]);
  return [r.x + a[0] - 12, r.y + a[1] - 12, b[0] - a[0] + 24, b[1] - a[1] + 24];
})()"""


def _thumbnail(browser: Browser, path: Path, width: int = 480) -> None:
    """JPEG of the graph area of the canvas, `width` px wide."""
    from PIL import Image

    browser.eval("app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
    browser.eval("document.querySelectorAll('.p-toast').forEach(t => t.remove())")
    browser.eval("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(1.0)
    x, y, w, h = browser.eval(BBOX_JS)
    shot = browser.send("Page.captureScreenshot", {"format": "png", "clip": {
        "x": max(0, x), "y": max(0, y), "width": w, "height": h, "scale": 1}}, timeout=60)
    im = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    im.thumbnail((width, width))
    im.save(path, "JPEG", quality=80, optimize=True)


def build(names: list[str]) -> None:
    """Build, convert, run and photograph the named workflows (all by default)."""
    (HERE / "api").mkdir(exist_ok=True)
    with ComfyServer(log_path=REPO / "artifacts" / "logs" / "build_workflows.log") as server, Browser() as browser:
        _sample_images(server.input_dir)
        shutil.copy(Path(host_script().comfy_dir()) / "input" / "example.png", server.input_dir / "example.png")
        browser.goto(server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=60)
        browser.eval("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")  # hide menus
        for name in names:
            graph = browser.run(BUILD_JS % json.dumps(SPECS[name]()), timeout=60)
            (HERE / f"{name}.json").write_text(json.dumps(graph["ui"], indent=2) + "\n")
            (HERE / "api" / f"{name}.json").write_text(json.dumps(graph["api"], indent=2) + "\n")
            browser.run(OVERRIDE_JS % json.dumps(TINY))
            browser.run("await app.queuePrompt(0, 1);")
            server.wait_idle(timeout=300)
            time.sleep(1.0)
            _thumbnail(browser, HERE / f"{name}.jpg")
            print(f"{name}: {len(graph['ui']['nodes'])} nodes, thumbnail {(HERE / f'{name}.jpg').stat().st_size} B")


if __name__ == "__main__":
    build(sys.argv[1:] or list(SPECS))
