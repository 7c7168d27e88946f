"""The files ComfyUI reads besides the code: translations, node docs, example workflows, registry metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODE_IDS = sorted(json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text()))
UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))


def _defs(lang: str) -> dict:
    return json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text())


def test_nine_nodes():
    assert NODE_IDS == sorted(["TADiSRLoadModel", "TADiSRUpscale", "TADiSREncode", "TADiSRDenoise", "TADiSRDecode",
                               "TADiSRTextAttention", "TADiSRLoadImageFromFolder", "TADiSRTextComposite",
                               "TADiSRReadText"])


def test_chinese_covers_every_node_input_and_output_of_the_english():
    en, zh = _defs("en"), _defs("zh")
    assert sorted(zh) == NODE_IDS
    for nid in NODE_IDS:
        assert zh[nid]["display_name"] and zh[nid]["description"] and zh[nid]["display_name"] != en[nid]["display_name"]
        assert zh[nid]["inputs"].keys() == en[nid]["inputs"].keys()
        assert zh[nid]["outputs"].keys() == en[nid]["outputs"].keys()
        for part in ("inputs", "outputs"):
            for key, entry in zh[nid][part].items():
                assert entry["tooltip"] and entry["tooltip"] != en[nid][part][key]["tooltip"], (nid, part, key)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_docs_in_english_and_chinese(node_id):
    docs = REPO / "web" / "docs"
    assert (docs / f"{node_id}.md").read_text().startswith("# ")
    assert (docs / node_id / "zh.md").read_text().startswith("# ")


def test_no_two_templates_share_a_thumbnail():
    """The template browser shows them side by side: two equal pictures would look like one template twice."""
    import hashlib

    from PIL import Image

    seen = {}
    for path in UI_FILES:
        digest = hashlib.sha256(Image.open(path.with_suffix(".jpg")).convert("RGB").tobytes()).hexdigest()
        assert digest not in seen, f"{path.stem} has the thumbnail of {seen[digest]}"
        seen[digest] = path.stem


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_workflow_is_for_users(path):
    ui = json.loads(path.read_text())
    api = json.loads((REPO / "example_workflows" / "api" / f"{ui['extra']['tadisr_template']}.json").read_text())
    assert path.with_suffix(".jpg").is_file()
    assert not any(c in path.stem for c in "-_"), "the 0.3.75 template browser shows the file name as the title"
    tadisr = {n["type"] for n in ui["nodes"] if n["type"].startswith("TADiSR")}
    assert tadisr and tadisr <= set(NODE_IDS)
    assert {v["class_type"] for v in api.values()} == {n["type"] for n in ui["nodes"] if n["type"] != "Note"}
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "models/tadisr" in notes[0]
    for word in ("tiny", "test", "pytest", "random"):  # written for users, not developers
        assert word not in notes[0].lower(), word
    text = path.read_text()
    assert "tadisr_tiny" not in text and "tadisr-tiny" not in text


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_workflow_runs_the_demo_model_and_says_how_to_pick_the_real_one(path):
    from nodes import loaders

    ui = json.loads(path.read_text())
    api = json.loads((REPO / "example_workflows" / "api" / f"{ui['extra']['tadisr_template']}.json").read_text())
    (model,) = [v["inputs"] for v in api.values() if v["class_type"] == "TADiSRLoadModel"]
    assert model["kolors"] == loaders.DEMO_CHOICE and model["merge_lora"] is True
    assert loaders.validate_checkpoint(model["checkpoint"]) is True  # passes with no checkpoint installed
    (note,) = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert "demo" in note and "tadisr_kolors_ftsr_526000.pkl" in note and "choose your Kolors folder" in note


def test_template_titles_in_both_languages():
    names = sorted(p.stem for p in UI_FILES)
    for lang in ("en", "zh"):
        main = json.loads((REPO / "locales" / lang / "main.json").read_text())["templateWorkflows"]
        assert sorted(main["template"]["tadisr"]) == names and sorted(main["templateDescription"]["tadisr"]) == names


def test_registry_metadata_and_what_ships():
    comfy = (REPO / "pyproject.toml").read_text().split("[tool.comfy]")[1].split("\n[")[0]
    assert re.search(r'^Icon = "https://\S+/web/icon\.png"$', comfy, re.M)
    assert re.search(r'^PublisherId = "\w+"$', comfy, re.M)
    assert re.search(r'^requires-comfyui = ">=0\.3\.75"', comfy, re.M)
    assert (REPO / "web" / "icon.png").is_file()
    ignored = {line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"training/", "tests/", "devtools/", "benchmarks/", "scripts/"} <= ignored
    for shipped in ("nodes/", "tadisr_core/", "example_workflows/", "locales/", "web/"):
        assert shipped not in ignored
