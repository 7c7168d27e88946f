"""Regenerate the example workflows: UI-format JSON, API-format copies, template titles and thumbnails.

    python -m devtools.build_workflows [NAME ...]            # graphs + before/after thumbnails (demo model)
    python -m devtools.build_workflows --graph-thumbnails    # graphs + pictures of the graphs instead
    python -m devtools.build_workflows --kolors DIR_NAME --checkpoint FILE [NAME ...]
                                                             # before/after made by a real model instead
    python -m devtools.build_workflows --input tadisr_core/demo/inputs/text_scene_2.png   # another scene

Needs the development host (`python -m devtools.comfy_host install`; `prepare` runs if needed) and
Chromium. The server runs in a throwaway base directory with the dev host's models and its own
input/ and output/, so the dev host's input/ (what `make serve` shows) is never changed.
Each graph is built in the real ComfyUI frontend from the specs below and laid out there in
columns from the nodes' real sizes (so no two nodes overlap); the view is set so the whole graph
opens framed right of the sidebar. The UI JSON is what that frontend saves; the API copy is its
own graphToPrompt() conversion. Titles and descriptions for the template browser go to
locales/{en,zh}/main.json.

The graphs load the demo model that ships with the pack (it runs without any download); their note
says how to choose the real Kolors model and checkpoint instead.

Thumbnails: each workflow is run in the host on a text scene (the sample sign below, or --input)
and the thumbnail shows the same crop as bicubic (left) and TADiSR (right). So that no two templates
look alike, three differ (`THUMBNAILS`): the one-node upscale shows its text mask over the right
half, the batch workflow upscales another scene (a bundled demo input) from its folder, and the
graph-blocks workflow, whose result is the one-node upscale's, shows its graph. By default the graph's
own demo model makes them (its weights must be in tadisr_core/demo/; without them the thumbnails
are pictures of the graphs, as with --graph-thumbnails); --kolors/--checkpoint name a real model
in the host's models folders instead. The random tiny test model is refused for that: its output
is noise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from nodes.loaders import DEMO_CHOICE, NO_CHECKPOINT
from tadisr_core.demo import DEMO_INPUTS
from tadisr_core.descriptor import DESCRIPTOR
from tadisr_core.model_ref import DEMO_CHECKPOINT
from tadisr_core.pipeline import output_size, tile_grid

from . import comfy_host
from .browser import Browser
from .server import REPO, ComfyServer

OUT = REPO / "example_workflows"
PACK = "tadisr"
# The demo model runs as shipped; the checkpoint placeholder passes the loader's check (the demo ignores it).
MODEL = {"kolors": DEMO_CHOICE, "checkpoint": NO_CHECKPOINT, "prompt_cache": "auto (compute once)",
         "dtype": "auto", "device": "auto", "merge_lora": True}
TILING = {"scale": DESCRIPTOR.size.default_scale, "tile": DESCRIPTOR.size.default_tile,
          "overlap": DESCRIPTOR.size.default_overlap, "tile_batch": 0}
UPSCALE = {**TILING, "capture_attention": False, "color_fix": "auto"}
SAMPLE = "tadisr_sample_sign.png"
BATCH_SCENE = DEMO_INPUTS / "text_scene_2.png"  # what the batch workflow's folder holds for its thumbnail
# Thumbnails that are not bicubic | TADiSR on the sample sign (see the module doc).
THUMBNAILS = {"tadisr_upscale": "mask", "tadisr_batch_folder": "batch scene", "tadisr_graph_blocks": "graph"}
TINY_NAMES = ("tadisr-tiny-kolors", "tadisr_tiny")
EXAMPLE_SIZE = 768  # ComfyUI's own input/example.png, which the graphs load
EXAMPLE_OUT = output_size(EXAMPLE_SIZE, EXAMPLE_SIZE, TILING["scale"])
EXAMPLE_TILES = len(tile_grid(*EXAMPLE_OUT, TILING["tile"], TILING["overlap"]))
SETUP = ("Model: this graph runs the small demo model built into the pack (kolors = 'demo'), with no download: "
         "a quick look at what TADiSR does, far below the real model's quality. On a CPU it takes minutes: "
         f"about 11 min on 2 cores for ComfyUI's {EXAMPLE_SIZE} px example.png (a {EXAMPLE_OUT[0]} px output, "
         f"{EXAMPLE_TILES} tiles).\n"
         "The real model: put the Kolors diffusers folder in models/diffusers (e.g. models/diffusers/Kolors) and "
         "the TADiSR checkpoint (tadisr_kolors_ftsr_526000.pkl or a .safetensors conversion) in models/tadisr, "
         "press R to refresh, then in Load TADiSR Model choose your Kolors folder as 'kolors' and the checkpoint "
         "as 'checkpoint'. The first run computes the prompt cache once from Kolors' ChatGLM3 and saves it in "
         "models/tadisr.")
TILES = ("Tiles: 768 px with 256 px overlap, as trained. Lower 'tile' if VRAM is short (out-of-memory also "
         "lowers it automatically).\n"
         "color_fix auto: the demo model's colours are taken back from the input (wavelet); the real model's "
         "output is left as the release makes it (none).")

# name: (en title, en description, zh title, zh description). ComfyUI 0.3.75's template browser
# shows a pack's templates by file name, so the UI file is named by its English title (no "-" or
# "_": the browser turns them into spaces); the API copy keeps the short name.
TEXT = {
    "tadisr_upscale": (
        "TADiSR upscale 4x with text mask", "One node: the upscaled image and a mask of where the text is.",
        "TADiSR：文字感知 4 倍放大", "一个节点：输出放大后的图像和文字位置遮罩。"),
    "tadisr_graph_blocks": (
        "TADiSR step by step graph blocks", "Encode, one-step denoise and joint decode as three nodes (same result).",
        "TADiSR 分步节点", "编码、单步去噪、联合解码三个节点（结果相同）。"),
    "tadisr_text_attention": (
        "TADiSR where the model reads text", "Heat map of the model's attention to the word 'text'.",
        "TADiSR：模型在哪里读文字", "模型对单词“text”的注意力热力图。"),
    "tadisr_batch_folder": (
        "TADiSR batch upscale a folder", "One image per queued run, from a folder, saved under its own name.",
        "TADiSR：批量放大文件夹", "每次排队运行处理文件夹中的一张图，按原文件名保存。"),
    "tadisr_text_composite": (
        "TADiSR text on another upscaler", "Any upscaler for the scene, TADiSR for the text: pasted by the text mask.",
        "TADiSR 文字 + 其他放大器", "场景用任意放大器，文字用 TADiSR：按文字遮罩贴合。"),
    "tadisr_read_text": (
        "TADiSR upscale then read text OCR", "OCR of the upscaled image inside the text mask (needs rapidocr).",
        "TADiSR：放大后识别文字", "在文字遮罩内对放大图像做 OCR（需要 rapidocr）。"),
}
TEMPLATE_KEY = "tadisr_template"  # extra[TEMPLATE_KEY] in a UI file names its API copy


def ui_file(name: str, suffix: str = ".json") -> Path:
    """The UI-format file (or its thumbnail) of workflow `name`."""
    return OUT / f"{TEXT[name][0]}{suffix}"


def _node(key, type_, size=None, title=None, **widgets):
    return {"key": key, "type": type_, "size": size, "title": title, "widgets": widgets}


def _note(text: str, width: int = 340, height: int = 300) -> dict:
    return _node("note", "Note", [width, height], title="Read me", text=text)


def _mask_save(prefix: str, mask_src) -> tuple[list, list]:
    nodes = [_node("mask_to_image", "MaskToImage"),
             _node("save_mask", "SaveImage", [340, 330], filename_prefix=f"{prefix}/text_mask")]
    return nodes, [(*mask_src, "mask_to_image", "mask"), ("mask_to_image", 0, "save_mask", "images")]


def _base(image_key: str = "image") -> list:
    return [_node(image_key, "LoadImage", [320, 340], image="example.png"),
            _node("model", "TADiSRLoadModel", [320, 220], **MODEL)]


def _upscale_spec() -> dict:
    mask_nodes, mask_links = _mask_save("tadisr", ("upscale", 1))
    nodes = _base() + [_node("upscale", "TADiSRUpscale", [320, 280], **UPSCALE),
                       _node("save_image", "SaveImage", [340, 330], filename_prefix="tadisr/upscaled"), *mask_nodes,
                       _note("TADiSR upscales photos and scans with text 4x and finds the text.\n\nLoad Image -> "
                             "TADiSR Super-Resolution Upscale -> the upscaled image and a mask of where the text is "
                             f"(saved as an image beside it).\n\n{SETUP}\n\n{TILES}")]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image"),
             ("upscale", 0, "save_image", "images"), *mask_links]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "image"], ["upscale", "note"], ["save_image"], ["mask_to_image", "save_mask"]]}


def _blocks_spec() -> dict:
    mask_nodes, mask_links = _mask_save("tadisr_blocks", ("decode", 1))
    nodes = _base() + [_node("encode", "TADiSREncode", [300, 220], **TILING),
                       _node("denoise", "TADiSRDenoise", [300, 110], tile_batch=0),
                       _node("decode", "TADiSRDecode", [300, 130], tile_batch=0, color_fix="auto"),
                       _node("save_image", "SaveImage", [340, 330], filename_prefix="tadisr_blocks/upscaled"),
                       *mask_nodes,
                       _note("TADiSR step by step: Encode (bicubic x scale, tiles, VAE encoder) -> One-Step Denoise "
                             "(one UNet pass at t=200, captures the attention to 'text') -> Joint Decode (image and "
                             "text-mask decoders, tiles blended). Same result as the all-in-one upscale node; every "
                             "tile's latents wait in RAM between the steps, so use this to look at or swap a step."
                             f"\n\n{SETUP}", height=330)]
    links = [("model", 0, "encode", "model"), ("image", 0, "encode", "image"), ("model", 0, "denoise", "model"),
             ("encode", 0, "denoise", "latents"), ("model", 0, "decode", "model"), ("denoise", 0, "decode", "latents"),
             ("decode", 0, "save_image", "images"), *mask_links]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "image"], ["encode", "denoise", "decode", "note"], ["save_image"],
                        ["mask_to_image", "save_mask"]]}


def _attention_spec() -> dict:
    nodes = _base() + [
        _node("upscale", "TADiSRUpscale", [320, 280], **{**UPSCALE, "capture_attention": True}),
        _node("attention", "TADiSRTextAttention", [320, 230], layers="all", heads="mean", normalize=True,
              colormap="jet", opacity=0.5),
        _node("save_overlay", "SaveImage", [340, 330], filename_prefix="tadisr_attention/overlay"),
        _node("heat_to_image", "MaskToImage"),
        _node("save_heat", "SaveImage", [340, 330], filename_prefix="tadisr_attention/heatmap"),
        _note("Where does TADiSR read text? With capture_attention on, TADiSR Upscale also outputs its "
              "cross-attention to the word 'text'; TADiSR Text Attention Heat Map turns it into a heat map and an "
              "overlay on the upscaled image. With the real model, try layers = up and heads = max for sharper maps "
              "(the released model has no mid-block layer). The built-in demo models never learned Kolors' word "
              "'text', so their maps hardly show the text (see their model cards): with them this graph shows "
              f"the wiring only, and heads = max saturates to a flat map (use mean).\n\n{SETUP}")]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image"),
             ("upscale", 2, "attention", "attention"), ("upscale", 0, "attention", "image"),
             ("attention", 1, "save_overlay", "images"), ("attention", 0, "heat_to_image", "mask"),
             ("heat_to_image", 0, "save_heat", "images")]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "image"], ["upscale", "attention"], ["save_overlay", "note"],
                        ["heat_to_image", "save_heat"]]}


def _batch_spec() -> dict:
    nodes = [_node("folder", "TADiSRLoadImageFromFolder", [320, 190], folder=comfy_host.BATCH_FOLDER, index=0,
                   control_after_generate="increment", prefix=f"{comfy_host.BATCH_FOLDER}/", when_done="wrap around"),
             _node("model", "TADiSRLoadModel", [320, 220], **MODEL),
             _node("upscale", "TADiSRUpscale", [320, 280], **UPSCALE),
             _node("save_image", "SaveImage", [340, 330]),
             _node("mask_to_image", "MaskToImage"),
             _node("save_mask", "SaveImage", [340, 330]),
             _note(f"Upscale a whole folder through the queue. Put the images in ComfyUI/input/"
                   f"{comfy_host.BATCH_FOLDER} (or type an absolute folder). Each run takes the next image (natural "
                   f"order: 2 before 10) and saves it as output/{comfy_host.BATCH_FOLDER}/<name>_00001_.png with "
                   "<name>_text_mask beside it. Set Run's batch count "
                   "to the number of images in the folder (its 'count' output; wire it to a Preview as Text node to "
                   "see it) and press Run once; after the last image the index "
                   "wraps to the first (or stops, with when_done = stop). A broken file fails only its own run."
                   f"\n\n{SETUP}", height=360)]
    links = [("model", 0, "upscale", "model"), ("folder", 0, "upscale", "image"),
             ("upscale", 0, "save_image", "images"), ("folder", 1, "save_image", "filename_prefix"),
             ("upscale", 1, "mask_to_image", "mask"), ("mask_to_image", 0, "save_mask", "images"),
             ("folder", 2, "save_mask", "filename_prefix")]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "folder"], ["upscale", "note"], ["save_image"], ["mask_to_image", "save_mask"]]}


def _composite_spec() -> dict:
    nodes = _base() + [
        _node("upscale", "TADiSRUpscale", [320, 280], **UPSCALE),
        _node("other", "ImageScaleBy", [320, 110], title="Other upscaler (swap in yours)", upscale_method="lanczos",
              scale_by=4.0),
        _node("composite", "TADiSRTextComposite", [320, 200], grow=8, feather=4, threshold=0.5),
        _node("save_image", "SaveImage", [340, 330], filename_prefix="tadisr_composite/composite"),
        _node("mask_to_image", "MaskToImage"),
        _node("save_mask", "SaveImage", [340, 330], filename_prefix="tadisr_composite/used_mask"),
        _note("Best of both: any upscaler for the scene, TADiSR for the text. Replace the 'Other upscaler' node with "
              "your favourite (e.g. Load Upscale Model + Upscale Image (using Model) with an ESRGAN model); TADiSR "
              "Text Mask Composite resizes its result to TADiSR's size, grows and feathers the text mask and pastes "
              "TADiSR's text in. Outside the grown mask the picture is exactly the other upscaler's."
              f"\n\n{SETUP}", height=330)]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image"), ("image", 0, "other", "image"),
             ("upscale", 0, "composite", "tadisr_image"), ("upscale", 1, "composite", "text_mask"),
             ("other", 0, "composite", "other_image"), ("composite", 0, "save_image", "images"),
             ("composite", 1, "mask_to_image", "mask"), ("mask_to_image", 0, "save_mask", "images")]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "image"], ["upscale", "other"], ["composite", "note"],
                        ["save_image", "mask_to_image", "save_mask"]]}


def _read_spec() -> dict:
    nodes = _base() + [
        _node("upscale", "TADiSRUpscale", [320, 280], **UPSCALE),
        _node("read", "TADiSRReadText", [320, 170], min_score=0.5, min_coverage=0.25),
        _node("show_text", "PreviewAny", [340, 200], title="Recognised text"),
        _node("save_boxes", "SaveImage", [340, 330], filename_prefix="tadisr_read/boxes"),
        _note("Upscale, then read: TADiSR Read Text runs OCR (RapidOCR) on the upscaled image and keeps the lines "
              "inside TADiSR's text mask. The text appears in 'Recognised text'; the image shows the boxes. RapidOCR "
              "is optional: install it once with  pip install \"rapidocr>=3.10\" \"onnxruntime>=1.18\"  in "
              "ComfyUI's Python."
              f"\n\n{SETUP}", height=300)]
    links = [("model", 0, "upscale", "model"), ("image", 0, "upscale", "image"),
             ("upscale", 0, "read", "image"), ("upscale", 1, "read", "text_mask"),
             ("read", 0, "show_text", "source"), ("read", 1, "save_boxes", "images")]
    return {"nodes": nodes, "links": links,
            "columns": [["model", "image"], ["upscale", "note"], ["read", "show_text"], ["save_boxes"]]}


SPECS = {"tadisr_upscale": _upscale_spec, "tadisr_graph_blocks": _blocks_spec,
         "tadisr_text_attention": _attention_spec, "tadisr_batch_folder": _batch_spec,
         "tadisr_text_composite": _composite_spec, "tadisr_read_text": _read_spec}

# Columns left to right, nodes top to bottom, from their real sizes: no two nodes can overlap. The
# saved view frames the whole graph in the part of the window no menu covers.
BUILD_JS = """
const spec = %s;
app.graph.clear();
const byKey = {};
for (const n of spec.nodes) {
  const node = LiteGraph.createNode(n.type);
  if (!node) throw new Error("unknown node type " + n.type);
  app.graph.add(node);
  for (const [name, value] of Object.entries(n.widgets)) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) throw new Error(n.type + " has no widget " + name);
    w.value = value;
  }
  if (n.title) node.title = n.title;
  const min = node.computeSize();
  if (n.size) node.size = [Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])];
  byKey[n.key] = node;
}
for (const [src, slot, dst, input] of spec.links) {
  if (!byKey[src].connect(slot, byKey[dst], input)) throw new Error("cannot link " + src + " -> " + dst + "." + input);
}
const title = LiteGraph.NODE_TITLE_HEIGHT || 30, gapX = 60, gapY = 40;
let x = 0;
for (const column of spec.columns) {
  let y = title, width = 0;
  for (const key of column) {
    const node = byKey[key];
    node.pos = [x, y];
    y += node.size[1] + title + gapY;
    width = Math.max(width, node.size[0]);
  }
  x += width + gapX;
}
const placed = new Set(spec.columns.flat());
const missing = spec.nodes.map(n => n.key).filter(k => !placed.has(k));
if (missing.length) throw new Error("not placed: " + missing);
let x1 = 0, y1 = 0;
for (const node of app.graph._nodes) {
  x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
}
// A 1120x860 corner of the window, clear of the sidebar (left), the tabs, menu, Run bar and its job
// summary (top) and the minimap (bottom right), in windows from 1400x900 up.
const W = 1120, H = 860, left = 75, top = 175, right = 20, bottom = 20;
const scale = Math.min(1, (W - left - right) / x1, (H - top - bottom) / y1);
app.canvas.ds.scale = scale;
app.canvas.ds.offset = [left / scale, top / scale];
app.graph.setDirtyCanvas(true, true);
const ui = app.graph.serialize();
ui.extra = {...(ui.extra || {}), ds: {scale, offset: [left / scale, top / scale]}};
return {ui, api: (await app.graphToPrompt()).output};
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


def write_template_text() -> None:
    """Template titles and descriptions into locales/{en,zh}/main.json (the template browser reads them)."""
    for lang, (ti, di) in (("en", (0, 1)), ("zh", (2, 3))):
        path = REPO / "locales" / lang / "main.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        tw = data.setdefault("templateWorkflows", {})
        tw.setdefault("category", {})[PACK] = "TADiSR"
        tw.setdefault("template", {})[PACK] = {t[0]: t[ti] for t in TEXT.values()}
        tw.setdefault("templateDescription", {})[PACK] = {t[0]: t[di] for t in TEXT.values()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sample_sign(path: Path) -> Path:
    """A small photo-like sign with text, square so the thumbnails' square crop keeps all of it: the
    input of the before/after thumbnails."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    im = Image.new("RGB", (128, 128), (120, 140, 150))
    d = ImageDraw.Draw(im)
    d.rectangle((6, 24, 122, 104), fill=(20, 70, 40), outline=(230, 230, 230), width=3)
    font = ImageFont.truetype("DejaVuSans-Bold.ttf", 20)
    d.text((16, 36), "EXIT 24", fill=(245, 245, 245), font=font)
    d.text((16, 66), "Main St", fill=(245, 245, 245), font=font)
    im.filter(ImageFilter.GaussianBlur(0.6)).resize((64, 64), Image.BICUBIC).save(path)
    return path


def before_after(lr_path: Path, sr_path: Path, out: Path, width: int = 480, label: str = "TADiSR",
                 mask_path: Path | None = None) -> None:
    """Thumbnail: the same crop as bicubic (left) and TADiSR (right, named `label`), labelled; with
    `mask_path`, the text mask tints the right half red where it finds text."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype("DejaVuSans-Bold.ttf", 14)
    sr = Image.open(sr_path).convert("RGB")
    bic = Image.open(lr_path).convert("RGB").resize(sr.size, Image.BICUBIC)
    if mask_path is not None:
        mask = Image.open(mask_path).convert("L").resize(sr.size).point(lambda v: v * 6 // 10)
        sr = Image.composite(Image.new("RGB", sr.size, (230, 40, 40)), sr, mask)
    side = min(sr.size)
    box = ((sr.width - side) // 2, (sr.height - side) // 2, (sr.width + side) // 2, (sr.height + side) // 2)
    half = width // 2
    canvas = Image.new("RGB", (width, half))
    for k, (im, text) in enumerate(((bic, "bicubic"), (sr, label))):
        tile = im.crop(box).resize((half, half), Image.LANCZOS)
        draw = ImageDraw.Draw(tile)
        x0, y0, x1, y1 = draw.textbbox((8, 8), text, font=font)
        draw.rectangle((x0 - 4, y0 - 4, x1 + 4, y1 + 4), fill=(0, 0, 0))  # readable on any picture
        draw.text((8, 8), text, fill=(255, 255, 0), font=font)
        canvas.paste(tile, (k * half, 0))
    canvas.save(out, "JPEG", quality=85, optimize=True)


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


CLOSE_DIALOGS_JS = """(() => {
  document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove());
  app.canvas.setDirty(true, true); app.canvas.draw(true, true);
  return true;
})()"""


def graph_thumbnail(browser: Browser, path: Path, width: int = 480) -> None:
    """JPEG of the graph area of the canvas, `width` px wide."""
    from PIL import Image

    browser.eval(CLOSE_DIALOGS_JS)
    time.sleep(1.0)
    x, y, w, h = browser.eval(BBOX_JS)
    shot = browser.send("Page.captureScreenshot", {"format": "png", "clip": {
        "x": max(0, x), "y": max(0, y), "width": w, "height": h, "scale": 1}}, timeout=60)
    im = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    im.thumbnail((width, width))
    im.save(path, "JPEG", quality=80, optimize=True)


def _saved_image(server: ComfyServer, entry: dict, mask: bool = False) -> Path | None:
    """The first saved image of a finished run that is the upscale (not a mask or heat map), or with
    `mask` the first text mask."""
    for out in entry["outputs"].values():
        for img in out.get("images", []):
            name = img["filename"]
            if img.get("type") == "output" and (
                    "mask" in name if mask else not any(w in name for w in ("mask", "heatmap"))):
                return server.output_file(img)
    return None


def _thumbnail_model(kolors: str | None, checkpoint: str | None, graph_thumbnails: bool) -> dict | None:
    """The loader settings that make the before/after thumbnails, or None for pictures of the graphs."""
    if graph_thumbnails:
        return None
    if kolors:
        if any(t in kolors + (checkpoint or "") for t in TINY_NAMES):
            raise SystemExit("the tiny test model outputs noise: give a real model (or use the demo) for before/after")
        return {"kolors": kolors, "checkpoint": checkpoint}
    if not DEMO_CHECKPOINT.is_file():
        print(f"no demo model in {DEMO_CHECKPOINT.parent}: the thumbnails show the graphs")
        return None
    return {}  # the graphs' own model: the demo


def _thumbnail_inputs(input_dir: Path, scene: Path | None) -> Path:
    """Write the thumbnails' inputs into a fresh base's input_dir: `scene` (default: the sample sign)
    as SAMPLE, and BATCH_SCENE as the only image of the batch workflow's folder; returns SAMPLE's path."""
    lr = input_dir / SAMPLE
    if scene:
        from PIL import Image

        Image.open(scene).convert("RGB").save(lr)
    else:
        sample_sign(lr)
    batch = input_dir / comfy_host.BATCH_FOLDER
    batch.mkdir()
    shutil.copy(BATCH_SCENE, batch / BATCH_SCENE.name)  # the folder's only image, so the one the run takes
    return lr


def build(names: list[str], kolors: str | None = None, checkpoint: str | None = None,
          graph_thumbnails: bool = False, scene: Path | None = None) -> None:
    """Build, convert and photograph the named workflows (all by default); before/after thumbnails
    on `scene` (default: the sample sign) unless `_thumbnail_model` says pictures of the graphs."""
    model = _thumbnail_model(kolors, checkpoint, graph_thumbnails)
    label = "TADiSR" if kolors else "TADiSR (demo model)"
    mask_label = "TADiSR + text mask" if kolors else "TADiSR (demo) + text mask"
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    write_template_text()
    t0 = time.monotonic()
    # a throwaway base: the dev host's input/ (the user's images, `make serve`) stays untouched
    with tempfile.TemporaryDirectory(prefix="tadisr-build-workflows-") as tmp, \
            ComfyServer(log_path=REPO / "artifacts" / "logs" / "build_workflows.log",
                        base=comfy_host.scratch_base(Path(tmp))) as server, Browser() as browser:
        lr = _thumbnail_inputs(server.input_dir, scene)
        browser.goto(server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=60)
        time.sleep(2.0)
        browser.eval(CLOSE_DIALOGS_JS)  # the template browser opens by itself on a first start
        # graphs photographed before any run, so that no node shows a picture left by an earlier one
        for name in sorted(names, key=lambda n: THUMBNAILS.get(n) != "graph"):
            graph = browser.run(BUILD_JS % json.dumps(SPECS[name]()), timeout=60)
            graph["ui"]["extra"][TEMPLATE_KEY] = name
            ui_file(name).write_text(json.dumps(graph["ui"], indent=2) + "\n")
            (OUT / "api" / f"{name}.json").write_text(json.dumps(graph["api"], indent=2) + "\n")
            thumb = ui_file(name, ".jpg")
            kind = THUMBNAILS.get(name)
            if model is not None and kind != "graph":
                overrides = {"LoadImage": {"image": SAMPLE}, **({"TADiSRLoadModel": model} if model else {})}
                browser.run(OVERRIDE_JS % json.dumps(overrides))
                before = set(server.get_json("history"))
                browser.run("await app.queuePrompt(0, 1);")
                server.wait_idle(timeout=1800)
                entry = next(v for k, v in server.get_json("history").items() if k not in before)
                if entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"{name}: the run failed: {json.dumps(entry['status'])[-2000:]}")
                sr = _saved_image(server, entry)
                mask = _saved_image(server, entry, mask=True) if kind == "mask" else None
                if sr is None or (kind == "mask" and mask is None):
                    raise RuntimeError(f"{name}: no saved image (or text mask) to make a thumbnail from")
                before_after(BATCH_SCENE if kind == "batch scene" else lr, sr, thumb,
                             label=mask_label if mask else label, mask_path=mask)
            else:
                graph_thumbnail(browser, thumb)
            zoom = graph["ui"]["extra"]["ds"]["scale"]
            print(f"{name}: {len(graph['ui']['nodes'])} nodes, opens at zoom {zoom:.2f}, "
                  f"thumbnail {thumb.stat().st_size} B")
    print(f"built {len(names)} workflow(s) in {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"workflows to build (default: all of {', '.join(SPECS)})")
    p.add_argument("--kolors", help="Kolors folder name in the host's models/diffusers: before/after by a real "
                                    "model instead of the demo")
    p.add_argument("--checkpoint", help="TADiSR checkpoint name in the host's models/tadisr (with --kolors)")
    p.add_argument("--graph-thumbnails", action="store_true", help="thumbnails show the graphs (no model run)")
    p.add_argument("--input", type=Path, help="the scene of the before/after thumbnails (default: a sample sign)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(SPECS))
    if unknown:
        p.error(f"unknown workflows {unknown}; choose from {list(SPECS)}")
    build(args.names or list(SPECS), args.kolors, args.checkpoint, args.graph_thumbnails, args.input)


if __name__ == "__main__":
    main()
