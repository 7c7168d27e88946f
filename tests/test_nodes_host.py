"""The node pack inside a real ComfyUI 0.3.75 server, driven over HTTP with the API-format workflows.

The workflows in example_workflows/api/ are the user-facing graphs (Kolors, 768 px tiles); each test
overrides the model to the host's tiny random one and the tiles to small ones at queue time.
"""

from __future__ import annotations

import copy
import json
import os
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

# Tiny models are all overhead; two OpenMP threads on a loaded 2-core machine spin-wait and run
# them many times slower. Inherited by the server the session fixture starts after collection.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from devtools.server import PromptRejected  # the same module the session fixtures use

REPO = Path(__file__).resolve().parent.parent
API = REPO / "example_workflows" / "api"
WORKFLOWS = sorted(p.stem for p in API.glob("*.json"))
NODE_IDS = ("TADiSRLoadModel", "TADiSRUpscale", "TADiSREncode", "TADiSRDenoise", "TADiSRDecode",
            "TADiSRTextAttention", "TADiSRLoadImageFromFolder", "TADiSRTextComposite", "TADiSRReadText")
INPUT_SIZE = (48, 40)  # width, height
SCALE = 4
TINY = {"TADiSRLoadModel": {"kolors": "tadisr-tiny-kolors", "checkpoint": "tadisr_tiny.safetensors",
                            "prompt_cache": "prompt_cache.safetensors"},
        "TADiSRUpscale": {"tile": 96, "overlap": 32, "scale": float(SCALE)},
        "TADiSREncode": {"tile": 96, "overlap": 32, "scale": float(SCALE)},
        "LoadImage": {"image": "tadisr_test_input.png"},
        "TADiSRLoadImageFromFolder": {"folder": "tadisr_test_batch"}}

pytestmark = pytest.mark.host


def load_api(name: str) -> dict:
    """An API-format workflow from example_workflows/api/."""
    return json.loads((API / f"{name}.json").read_text())


def override(prompt: dict, changes: dict) -> dict:
    """A copy of `prompt` with widget values replaced per class_type: {class_type: {input: value}}."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        for key, value in changes.get(node["class_type"], {}).items():
            node["inputs"][key] = value
    return out


def node_id(prompt: dict, class_type: str) -> str:
    """The id of the (first) node of a class in a prompt."""
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def saved_images(server, entry: dict) -> list[Path]:
    """Files the SaveImage nodes of a finished prompt wrote."""
    files = []
    for out in entry["outputs"].values():
        files += [server.output_file(img) for img in out.get("images", []) if img.get("type") == "output"]
    return files


def _sign(path: Path, size=INPUT_SIZE, seed: int = 0) -> Path:
    from PIL import ImageDraw

    im = Image.new("RGB", size, (240, 230 - 40 * seed, 200))
    ImageDraw.Draw(im).text((4, size[1] // 3), "TEXT", fill=(20, 20, 90))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The session server with this module's input images uploaded."""
    tmp = tmp_path_factory.mktemp("host_inputs")
    comfy_server.upload_image(_sign(tmp / "tadisr_test_input.png"))
    for i in range(2):
        comfy_server.upload_image(_sign(tmp / f"sign_{i}.png", seed=i), subfolder="tadisr_test_batch")
    comfy_server.upload_image(_sign(tmp / "tadisr_test_big.png", (96, 80)))
    mask = Image.new("RGBA", (INPUT_SIZE[0] * SCALE, INPUT_SIZE[1] * SCALE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (40, 50, 100, 80))  # LoadImage's MASK = 1 - alpha: 1 in this box
    mask.save(tmp / "tadisr_test_textmask.png")
    comfy_server.upload_image(tmp / "tadisr_test_textmask.png")
    return comfy_server


def _assert_success(entry: dict, server) -> None:
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:] + server.log_tail(2000)


def test_object_info_lists_every_node_as_v3_with_tooltips(server):
    info = server.object_info()
    for nid in NODE_IDS:
        assert nid in info, f"{nid} missing from /object_info"
        entry = info[nid]
        assert entry["category"] == "TADiSR" and entry["display_name"].startswith(("TADiSR", "Load TADiSR"))
        assert len(entry["description"]) > 40 and entry["python_module"] == "custom_nodes.tadisr"
        for section in ("required", "optional"):
            for name, spec in entry["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{nid}.{name}: no tooltip in /object_info"
        assert all(entry["output_tooltips"]), f"{nid}: an output has no tooltip"
    defaults = {nid: {k: v[1].get("default") for k, v in info[nid]["input"]["required"].items()}
                for nid in NODE_IDS}
    assert {k: defaults["TADiSRUpscale"][k] for k in ("scale", "tile", "overlap", "tile_batch", "capture_attention",
                                                      "color_fix")} == {
        "scale": 4.0, "tile": 768, "overlap": 256, "tile_batch": 0, "capture_attention": False, "color_fix": "auto"}
    assert defaults["TADiSRDecode"]["color_fix"] == "auto"
    loader_defaults = defaults["TADiSRLoadModel"]
    assert loader_defaults["dtype"] == "auto" and loader_defaults["prompt_cache"].startswith("auto")
    assert defaults["TADiSRLoadImageFromFolder"]["when_done"] == "wrap around"
    assert info["TADiSRLoadImageFromFolder"]["input"]["required"]["index"][1]["control_after_generate"] is True
    loader = info["TADiSRLoadModel"]["input"]["required"]
    assert "tadisr-tiny-kolors" in loader["kolors"][1]["options"]
    from nodes.loaders import DEMO_CHOICES
    from tadisr_core.model_ref import shipped_models

    for choice, name in DEMO_CHOICES.items():
        assert (choice in loader["kolors"][1]["options"]) == shipped_models()[name].checkpoint.is_file()
    assert loader_defaults["merge_lora"] is True and "fp8_e4m3fn" in loader["dtype"][1]["options"]
    assert "tadisr_tiny.safetensors" in loader["checkpoint"][1]["options"]
    assert "prompt_cache.safetensors" not in loader["checkpoint"][1]["options"]
    assert server.pack_import_failures() == []


def test_english_translation_file_is_in_step_with_the_schemas(server):
    from devtools.locales import node_defs

    stored = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text())
    assert stored == node_defs(server.object_info()), "run: python -m devtools.locales"


def test_node_docs_and_translations_are_served(server):
    status, body = server.request("GET", "extensions/tadisr/docs/TADiSRUpscale.md")
    assert status == 200 and body.startswith(b"# TADiSR")
    status, _ = server.request("GET", "extensions/tadisr/docs/TADiSRReadText/zh.md")
    assert status == 200
    zh = server.get_json("i18n")["zh"]["nodeDefs"]
    assert zh["TADiSRUpscale"]["display_name"].startswith("TADiSR")


def test_workflows_are_offered_as_templates(server):
    index = server.get_json("api/workflow_templates")
    assert sorted(index.get("tadisr", [])) == sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    title = urllib.parse.quote("TADiSR upscale 4x with text mask")
    status, body = server.request("GET", f"api/workflow_templates/tadisr/{title}.json")
    assert status == 200 and json.loads(body)["nodes"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_runs_on_the_tiny_model(server, name):
    prompt = override(load_api(name), TINY)
    runs = [prompt]
    if "TADiSRLoadImageFromFolder" in {n["class_type"] for n in prompt.values()}:
        runs.append(override(prompt, {"TADiSRLoadImageFromFolder": {"index": 1}}))
    for run in runs:
        entry = server.run(run, timeout=180)
        _assert_success(entry, server)
        files = saved_images(server, entry)
        for f in files:
            with Image.open(f) as im:
                assert im.size == (INPUT_SIZE[0] * SCALE, INPUT_SIZE[1] * SCALE), f"{f.name}: {im.size}"
        names = " ".join(f.name for f in files)
        if name == "tadisr_read_text":  # the boxes image, and the recognised text shown by Preview Any
            assert "boxes" in names and "text" in entry["outputs"][node_id(run, "PreviewAny")]
        else:  # the image and its text mask / heat map
            assert len(files) >= 2 and ("mask" in names or "heatmap" in names), names


def test_interrupt_stops_a_multi_tile_run_and_the_server_keeps_serving(server):
    prompt = override(load_api("tadisr_upscale"), {**TINY, "LoadImage": {"image": "tadisr_test_big.png"},
                                                   "TADiSRUpscale": {"tile": 64, "overlap": 48, "tile_batch": 1}})
    upscale_id = node_id(prompt, "TADiSRUpscale")
    with server.progress() as ws:
        pid = server.queue(prompt)
        ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == upscale_id
                    and m["data"].get("prompt_id", pid) == pid, timeout=120)
        server.interrupt()
        entry = server.wait(pid, timeout=120)
        progress = [d["value"] for d in ws.of_type("progress") if d.get("node") == upscale_id]
    assert entry["status"]["status_str"] == "error"
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    total = [d["max"] for d in ws.of_type("progress") if d.get("node") == upscale_id][0]
    assert total > 10 and max(progress) < total, (progress, total)  # stopped between tiles
    assert server.alive() and "TADiSRUpscale" in server.object_info()
    _assert_success(server.run(override(load_api("tadisr_upscale"), TINY), timeout=180), server)


def test_missing_files_are_reported_once_each_on_their_own_input(server):
    """Defect: a missing Kolors folder or checkpoint was reported twice, attached to both inputs."""
    prompt = override(load_api("tadisr_upscale"), {**TINY, "TADiSRLoadModel": {
        **TINY["TADiSRLoadModel"], "checkpoint": "missing.pkl"}})
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.node_errors[node_id(prompt, "TADiSRLoadModel")]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["checkpoint"], errors
    assert "missing.pkl" in errors[0]["details"] and "models/tadisr" in errors[0]["details"]
    # ComfyUI 0.3.75 does not check V3 combo values itself, and a validate_inputs message is attached to
    # every input it names: the Kolors folder is checked first thing when the loader runs (nothing ran before).
    # Later hosts refuse a combo value not in the list at queue time, naming that input alone.
    prompt = override(prompt, {"TADiSRLoadModel": {"kolors": "Kolors", "checkpoint": "tadisr_tiny.safetensors"}})
    try:
        entry = server.run(prompt, timeout=120)
    except PromptRejected as rejected:
        errors = rejected.node_errors[node_id(prompt, "TADiSRLoadModel")]["errors"]
        assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_not_in_list", "kolors")]
        return
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "TADiSRLoadModel"
    assert errors[0]["exception_message"].startswith("TADiSR: ") and errors[0]["exception_type"].endswith(
        "KolorsFolderError")  # the library's error in the nodes' words, its type kept
    assert "'Kolors' not found in models/diffusers" in errors[0]["exception_message"]
    assert server.alive()


def _upscale_then(prompt_extra: dict, tile=96, overlap=32) -> dict:
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "tadisr_test_input.png"}},
              "2": {"class_type": "TADiSRLoadModel", "inputs": {**TINY["TADiSRLoadModel"], "dtype": "auto",
                                                                "device": "auto", "merge_lora": False}},
              "3": {"class_type": "TADiSRUpscale", "inputs": {"model": ["2", 0], "image": ["1", 0], "scale": 4.0,
                                                              "tile": tile, "overlap": overlap, "tile_batch": 0,
                                                              "capture_attention": False, "color_fix": "none"}}}
    prompt.update(prompt_extra)
    return prompt


def test_impossible_attention_settings_are_refused_before_the_upscale_runs(server):
    """Defect: layers=mid (release layout) and an unconnected capture failed only after the whole upscale."""
    view = {"class_type": "TADiSRTextAttention", "inputs": {"attention": ["3", 2], "image": ["3", 0], "layers": "up",
                                                            "heads": "mean", "normalize": True, "colormap": "jet",
                                                            "opacity": 0.5}}
    save = {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}}
    for capture, layers, expect in ((False, "up", "'capture_attention' is off"), (True, "mid", "layers='mid'")):
        prompt = _upscale_then({"4": copy.deepcopy(view), "5": save}, tile=64, overlap=48)
        prompt["3"]["inputs"]["capture_attention"] = capture
        prompt["4"]["inputs"]["layers"] = layers
        prompt["1"]["inputs"]["image"] = "tadisr_test_big.png"
        with server.progress() as ws:
            entry = server.run(prompt, timeout=180)
            ticks = [d for d in ws.of_type("progress") if d.get("node") == "3"]
        assert entry["status"]["status_str"] == "error"
        error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
        assert error["node_id"] == "3" and expect in error["exception_message"], error
        assert ticks == [], "tiles ran before the refusal"


def test_nodes_that_lead_to_no_output_neither_block_nor_slow_the_upscale(server):
    """Defect: a heat-map node whose Save node was deleted (ComfyUI never runs it) made Upscale refuse to
    run, and a mask consumer that leads nowhere made it compute the mask."""
    from nodes.graph import MASK_USE_KEY, RUNS_KEY

    prompt = _upscale_then({
        "4": {"class_type": "TADiSRTextAttention", "inputs": {"attention": ["3", 2], "image": ["3", 0],
                                                              "layers": "mid", "heads": "mean", "normalize": True,
                                                              "colormap": "jet", "opacity": 0.5}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "idle/image"}}})
    entry = server.run(prompt, timeout=180)
    _assert_success(entry, server)
    queued = entry["prompt"][2]
    assert queued["3"]["inputs"][MASK_USE_KEY] is False and queued["4"]["inputs"][RUNS_KEY] is False
    assert set(entry["outputs"]) == {"6"}


def test_a_checkpoint_replaced_on_disk_under_its_name_is_loaded_again(server):
    """Defect: after a checkpoint was overwritten in models/tadisr, the same prompt came back from the
    node cache with the old weights."""
    import shutil

    folder = server.base / "models" / "tadisr"
    replaced = folder / "tadisr_tiny_replaced.safetensors"
    shutil.copy(folder / "tadisr_tiny.safetensors", replaced)
    try:
        prompt = _upscale_then({"4": {"class_type": "SaveImage",
                                      "inputs": {"images": ["3", 0], "filename_prefix": "replaced/image"}}})
        prompt["2"]["inputs"]["checkpoint"] = replaced.name

        def cached():
            entry = server.run(prompt, timeout=180)
            _assert_success(entry, server)
            return {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}

        assert "2" not in cached() and {"2", "3"} <= cached()
        st = replaced.stat()
        os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a new copy of the file would
        assert not {"2", "3"} & cached()
    finally:
        replaced.unlink()


def test_text_composite_is_the_other_upscale_outside_the_grown_mask_and_tadisr_inside(server):
    import numpy as np

    prompt = _upscale_then({
        "4": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                       "scale_by": 4.0}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "tadisr_test_textmask.png"}},
        "5": {"class_type": "TADiSRTextComposite", "inputs": {"tadisr_image": ["3", 0], "text_mask": ["11", 1],
                                                              "other_image": ["4", 0], "grow": 6, "feather": 2,
                                                              "threshold": 0.5}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "composite/out"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "composite/other"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "composite/tadisr"}},
        "9": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "composite/used"}}})
    entry = server.run(prompt, timeout=180)
    _assert_success(entry, server)

    def read(node):
        img = entry["outputs"][node]["images"][0]
        with Image.open(server.output_file(img)) as im:
            return np.asarray(im.convert("RGB")).astype(int)

    out, other, tadisr, used = read("6"), read("7"), read("8"), read("10")[..., 0]
    outside, inside = used == 0, used == 255
    assert outside.sum() > 0.5 * used.size and inside.sum() >= 40 * 20, (outside.sum(), inside.sum())
    assert np.array_equal(out[outside], other[outside])
    assert np.array_equal(out[inside], tadisr[inside])


def test_image_only_run_then_a_connected_text_mask_is_computed_not_a_cached_empty_one(server):
    """The text mask is skipped while its output is unconnected; connecting it later must not reuse the
    cached all-zero mask, and the image is the same either way."""
    import numpy as np

    from nodes.graph import MASK_USE_KEY

    save_image = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "image_only/image"}}
    entries = []
    for extra in ({}, {"5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
                       "6": {"class_type": "SaveImage",
                             "inputs": {"images": ["5", 0], "filename_prefix": "image_only/mask"}}}):
        entry = server.run(_upscale_then({"4": save_image, **extra}), timeout=180)
        _assert_success(entry, server)
        entries.append(entry)
    assert [e["prompt"][2]["3"]["inputs"][MASK_USE_KEY] for e in entries] == [False, True]

    def read(entry, node):
        with Image.open(server.output_file(entry["outputs"][node]["images"][0])) as im:
            return np.asarray(im.convert("RGB"))

    assert np.array_equal(read(entries[0], "4"), read(entries[1], "4"))
    assert read(entries[1], "6").any(), "the connected text mask came back empty"


def test_a_folder_images_transparency_survives_join_image_with_alpha_and_the_upscale(server, tmp_path):
    """Defect: the folder loader dropped alpha without a word. Its mask output (1 - alpha, as Load Image's),
    joined back by Join Image with Alpha, goes through TADiSR Upscale (which keeps RGBA) into the PNG."""
    im = Image.new("RGBA", INPUT_SIZE, (240, 230, 200, 255))
    im.paste((20, 20, 90, 0), (0, 0, INPUT_SIZE[0] // 2, INPUT_SIZE[1]))  # left half transparent
    im.save(tmp_path / "half_clear.png")
    server.upload_image(tmp_path / "half_clear.png", subfolder="tadisr_test_alpha")
    prompt = _upscale_then({
        "1": {"class_type": "TADiSRLoadImageFromFolder", "inputs": {"folder": "tadisr_test_alpha", "index": 0,
                                                                    "prefix": "", "when_done": "wrap around"}},
        "4": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["1", 4]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "tadisr_alpha"}}})
    prompt["3"]["inputs"]["image"] = ["4", 0]
    entry = server.run(prompt, timeout=180)
    _assert_success(entry, server)
    (saved,) = saved_images(server, entry)
    with Image.open(saved) as out:
        assert out.mode == "RGBA" and out.size == (INPUT_SIZE[0] * SCALE, INPUT_SIZE[1] * SCALE)
        alpha = out.getchannel("A")
        assert alpha.getpixel((10, 80)) == 0 and alpha.getpixel((out.size[0] - 10, 80)) == 255


def test_out_of_range_input_is_a_node_error(server):
    prompt = override(load_api("tadisr_upscale"), {**TINY, "TADiSRUpscale": {**TINY["TADiSRUpscale"], "scale": 9.0}})
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.node_errors[node_id(prompt, "TADiSRUpscale")]["errors"]
    assert errors[0]["type"] == "value_bigger_than_max" and errors[0]["extra_info"]["input_name"] == "scale"


def test_read_text_reads_a_sign_and_keeps_only_lines_in_the_mask(server, tmp_path):
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype("DejaVuSans-Bold.ttf", 36)
    sign = Image.new("RGB", (320, 130), (250, 250, 245))
    draw = ImageDraw.Draw(sign)
    draw.text((20, 15), "OPEN 24H", fill=(10, 10, 10), font=font)
    draw.text((20, 75), "SALE", fill=(10, 10, 10), font=font)
    sign.save(tmp_path / "tadisr_ocr_sign.png")
    mask = Image.new("RGBA", sign.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 70, 320, 130))  # MASK = 1 - alpha: only the lower line
    mask.save(tmp_path / "tadisr_ocr_mask.png")
    for f in ("tadisr_ocr_sign.png", "tadisr_ocr_mask.png"):
        server.upload_image(tmp_path / f)
    read = {"class_type": "TADiSRReadText", "inputs": {"image": ["1", 0], "min_score": 0.5, "min_coverage": 0.25}}
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "tadisr_ocr_sign.png"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "tadisr_ocr_mask.png"}},
              "3": read, "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
              "5": copy.deepcopy(read), "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
              "7": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}
    prompt["5"]["inputs"]["text_mask"] = ["2", 1]
    entry = server.run(prompt, timeout=180)
    _assert_success(entry, server)
    assert entry["outputs"]["4"]["text"] == ["OPEN 24H\nSALE"]
    assert entry["outputs"]["6"]["text"] == ["SALE"]


def test_tiling_errors_are_refused_at_queue_time(server):
    """A tile that breaks its own rule, an overlap out of range, and (defect: refused only after the model
    had loaded, minutes with Kolors) an overlap not smaller than the tile are refused when queued. ComfyUI
    attaches a validate_inputs message to every input the method names, so each is shown on tile and
    overlap alike, and says which is wrong."""
    for workflow, node in (("tadisr_upscale", "TADiSRUpscale"), ("tadisr_graph_blocks", "TADiSREncode")):
        for inputs, says in (({"tile": 100, "overlap": 32}, "tile must be a multiple of 8"),
                             ({"tile": 64, "overlap": -8}, "overlap must be at least 0 and smaller than tile (64)"),
                             ({"tile": 64, "overlap": 64}, "overlap must be at least 0 and smaller than tile (64)")):
            prompt = override(load_api(workflow), {**TINY, node: inputs})
            with pytest.raises(PromptRejected) as err:
                server.queue(prompt)
            errors = err.value.node_errors[node_id(prompt, node)]["errors"]
            assert sorted(e["extra_info"]["input_name"] for e in errors) == ["overlap", "tile"], errors
            assert all(says in e["details"] for e in errors), errors
    time.sleep(0.2)
    assert server.alive() and server.get_json("queue") is not None
