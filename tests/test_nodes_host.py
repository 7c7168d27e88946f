"""The node pack inside a real ComfyUI 0.3.75 server, driven over HTTP with the API-format workflows.

The workflows in workflows/api/ are the user-facing graphs (Kolors, 768 px tiles); each test
overrides the model to the host's tiny random one and the tiles to small ones at queue time.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

# Tiny models are all overhead; two OpenMP threads on a loaded 2-core machine spin-wait and run
# them many times slower. Inherited by the server the session fixture starts after collection.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from devtools.server import PromptRejected  # the same module the session fixtures use

REPO = Path(__file__).resolve().parent.parent
API = REPO / "workflows" / "api"
WORKFLOWS = sorted(p.stem for p in API.glob("*.json"))
NODE_IDS = ("TADiSRLoadModel", "TADiSRUpscale", "TADiSREncode", "TADiSRDenoise", "TADiSRDecode",
            "TADiSRTextAttention", "TADiSRLoadImageFromFolder")
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
    """An API-format workflow from workflows/api/."""
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
    return comfy_server


def _assert_success(entry: dict, server) -> None:
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:] + server.log_tail(2000)


def test_object_info_lists_every_node_with_its_inputs(server):
    import nodes

    info = server.object_info()
    for nid in NODE_IDS:
        assert nid in info, f"{nid} missing from /object_info"
        entry, cls = info[nid], nodes.NODE_CLASS_MAPPINGS[nid]
        assert entry["category"] == "TADiSR" and entry["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[nid]
        assert entry["description"] and entry["output"] == list(cls.RETURN_TYPES)
        assert list(entry["input"]["required"]) == list(cls.INPUT_TYPES()["required"])
        for name, spec in entry["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{nid}.{name}: no tooltip in /object_info"
    loader = info["TADiSRLoadModel"]["input"]["required"]
    assert "tadisr-tiny-kolors" in loader["kolors"][0]
    assert "tadisr_tiny.safetensors" in loader["checkpoint"][0]
    assert "prompt_cache.safetensors" not in loader["checkpoint"][0]
    assert server.pack_import_failures() == []


def test_workflows_are_offered_as_templates(server):
    index = server.get_json("api/workflow_templates")
    assert sorted(index.get("tadisr", [])) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    status, body = server.request("GET", "api/workflow_templates/tadisr/tadisr_upscale.json")
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
        assert len(files) >= 2, f"expected the image and its mask, got {files}"
        for f in files:
            with Image.open(f) as im:
                assert im.size == (INPUT_SIZE[0] * SCALE, INPUT_SIZE[1] * SCALE), f"{f.name}: {im.size}"
        names = " ".join(f.name for f in files)
        assert "mask" in names or "heatmap" in names


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


def test_missing_checkpoint_is_a_node_error_naming_the_file(server):
    prompt = override(load_api("tadisr_upscale"), {**TINY, "TADiSRLoadModel": {**TINY["TADiSRLoadModel"],
                                                                                "checkpoint": "missing.pkl"}})
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.node_errors[node_id(prompt, "TADiSRLoadModel")]["errors"]
    text = json.dumps(errors)
    assert "missing.pkl" in text and "models/tadisr" in text
    assert server.alive()


def test_out_of_range_input_is_a_node_error(server):
    prompt = override(load_api("tadisr_upscale"), {**TINY, "TADiSRUpscale": {**TINY["TADiSRUpscale"], "scale": 9.0}})
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.node_errors[node_id(prompt, "TADiSRUpscale")]["errors"]
    assert errors[0]["type"] == "value_bigger_than_max" and errors[0]["extra_info"]["input_name"] == "scale"


def test_wrong_input_fails_the_run_with_a_clear_message_and_the_server_survives(server):
    prompt = override(load_api("tadisr_upscale"), {**TINY, "TADiSRUpscale": {"tile": 64, "overlap": 64}})
    entry = server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_type"].endswith("ValueError") and "overlap" in error["exception_message"]
    assert error["node_type"] == "TADiSRUpscale"
    time.sleep(0.2)
    assert server.alive() and server.get_json("queue") is not None
