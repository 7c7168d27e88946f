"""Node logic without ComfyUI: nodes/host.py falls back to plain behaviour (no progress bar, no
interrupt, model folders under $TADISR_MODELS_DIR). The folder loader is tested in test_nodes_folder.py,
host.py's ComfyUI branches (fake comfy modules) in test_nodes_fake_comfy.py."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from nodes import attention_view, blocks, convert, graph, host, loaders, model_cache, upscale
from tadisr_core.heatmap import AttentionTiles, channel_groups
from tadisr_core.prompt import PromptCache
from tests.node_fixtures import TILE, random_image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are all overhead: with 2 threads on a loaded 2-core machine OpenMP spin-waits
    # make them 5-200x slower; one thread is fast and steady.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- host fallback and conversions -------------------------------------------------------------
def test_host_fallback_without_comfyui(models_dir):
    assert host.model_folders("tadisr") == [str(models_dir / "tadisr")]
    host.progress_reporter(3)(1, 3)  # no-op
    host.check_interrupt()           # never interrupts
    assert host.cancel_callback()() is False
    assert host.torch_device().type in ("cpu", "cuda")
    assert host.find_path("tadisr", "../diffusers") is None


def test_conversions_round_trip():
    img = random_image(2, 5, 7, 3)
    core = convert.image_to_core(img)
    assert core.shape == (2, 3, 5, 7)
    assert torch.equal(convert.image_from_core(core), img)
    mask = torch.rand(2, 5, 7)
    assert torch.equal(convert.mask_from_core(convert.mask_to_core(mask)), mask)
    assert convert.mask_to_core(mask[0]).shape == (1, 1, 5, 7)
    for bad in (torch.rand(1, 5, 7, 2), torch.rand(1, 5, 7, 5), torch.rand(5, 7)):
        with pytest.raises(ValueError, match="1, 3 or 4 channels"):
            convert.image_to_core(bad)


def test_an_integer_image_is_refused_not_clamped_to_white():
    """Defect: a uint8 IMAGE (0..255) was clamped to 0..1 and upscaled into a white picture without a word."""
    with pytest.raises(ValueError, match=r"^TADiSR: other_image holds uint8 values; an IMAGE holds floats in 0\.\.1"):
        convert.image_to_core((torch.rand(1, 8, 8, 3) * 255).to(torch.uint8), "other_image")
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)$"):  # the shape as given, not as reshaped inside
        convert.image_to_core(torch.rand(8, 8))
    assert torch.equal(convert.image_to_core(torch.ones(1, 2, 2, 3, dtype=torch.bool)), torch.ones(1, 3, 2, 2))


# -- loading ------------------------------------------------------------------------------------
def test_sft_checkpoints_and_prompt_caches_are_listed_and_load(models_dir):
    """Defect: ComfyUI's other safetensors suffix, .sft, was loadable but never listed in models/tadisr."""
    folder = models_dir / "tadisr"
    made = [folder / "tadisr_tiny_copy.sft", folder / "prompt_cache_copy.sft"]
    shutil.copyfile(folder / "tadisr_tiny.safetensors", made[0])
    shutil.copyfile(folder / "prompt_cache.safetensors", made[1])
    try:
        assert "tadisr_tiny_copy.sft" in loaders.checkpoint_choices()
        assert "prompt_cache_copy.sft" in loaders.prompt_cache_choices()
        copy = loaders.load_model("tiny-kolors", "tadisr_tiny_copy.sft", "prompt_cache_copy.sft", "fp32", "cpu", False)
        original = loaders.load_model("tiny-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32",
                                      "cpu", False)
        image = random_image(1, 8, 8)
        assert torch.equal(upscale.upscale(copy, image, **TILE)[0], upscale.upscale(original, image, **TILE)[0])
    finally:
        for path in made:
            path.unlink()


def test_loader_choices(models_dir):
    assert loaders.kolors_choices() == ["tiny-kolors"] + loaders.demo_choices()
    from tadisr_core.model_ref import shipped_models

    assert sorted(loaders.DEMO_CHOICES.values()) == sorted(shipped_models())  # one choice per shipped model
    assert loaders.checkpoint_choices() == ["tadisr_tiny.safetensors", "tadisr_tiny_official.pkl"]
    assert loaders.prompt_cache_choices() == [loaders.AUTO_CACHE, "prompt_cache.safetensors"]


def test_loader_caches_and_reuses(handle):
    again = loaders.load_model("tiny-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32", "cpu",
                               merge_lora=False)
    assert again is handle
    assert handle.dtype == torch.float32 and handle.device == torch.device("cpu")
    assert "tadisr_tiny.safetensors" in repr(handle)


def test_cache_holds_models_weakly(models_dir, handle):
    import gc

    merged = loaders.load_model("tiny-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32", "cpu",
                                merge_lora=True)
    assert merged is not handle and merged.key != handle.key
    key = merged.key
    del merged
    gc.collect()
    assert key not in model_cache._live and handle.key in model_cache._live


def test_prompt_conditioning_follows_the_model_between_devices(handle):
    """The prompt is kept as model buffers, so moving the model (as ComfyUI's patcher does) moves it too."""
    import copy

    model = copy.deepcopy(handle.model).to("meta")
    assert model.device.type == "meta"
    assert {t.device.type for t in (model.prompt.prompt_embeds, model.prompt.text_embeds, model.prompt.time_ids)} \
        == {"meta"}


def test_missing_files_name_the_file_and_the_folder(models_dir):
    with pytest.raises(FileNotFoundError, match=r"'nope.pkl' not found in models/tadisr .*Choose one of \[.*"
                                                r"'tadisr_tiny.safetensors'"):
        loaders.load_model("tiny-kolors", "nope.pkl")
    with pytest.raises(FileNotFoundError, match=r"'Kolors' not found in models/diffusers"):
        loaders.load_model("Kolors", "tadisr_tiny.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a complete Kolors diffusers folder"):
        loaders.load_model("not-kolors", "tadisr_tiny.safetensors")
    msg = loaders.validate_checkpoint("nope.pkl")  # the loader's early check names only the checkpoint
    assert "nope.pkl" in msg and "models/tadisr" in msg and "diffusers" not in msg
    assert loaders.validate_checkpoint("tadisr_tiny.safetensors") is True
    with pytest.raises(FileNotFoundError, match="'x.safetensors' not found"):
        loaders.resolve_prompt_cache("x.safetensors", loaders.resolve_kolors("tiny-kolors"))
    with pytest.raises(ValueError, match="dtype"):
        loaders.resolve_dtype("fp8", torch.device("cpu"))
    assert loaders.resolve_dtype("fp8_e4m3fn", torch.device("cpu")) == torch.float8_e4m3fn
    assert loaders.validate_checkpoint(loaders.NO_CHECKPOINT) is True  # fine for the demo; run-time error otherwise
    with pytest.raises(FileNotFoundError, match="not found in models/tadisr"):
        loaders.load_model("tiny-kolors", loaders.NO_CHECKPOINT)


def test_a_kolors_unet_or_prompt_cache_chosen_as_checkpoint_says_where_it_goes(models_dir, tiny_dir):
    """It used to say only "not a native TADiSR checkpoint (metadata format='pt')"; the node's advice names
    ComfyUI's folders and inputs, never a command-line flag."""
    unet = models_dir / "tadisr" / "unet"  # with its config.json: the tiny UNet's shapes are no real Kolors'
    unet.symlink_to(tiny_dir["kolors"] / "unet")
    try:
        cases = {"unet/diffusion_pytorch_model.safetensors":
                 "(metadata format='pt'): it is a Kolors UNet; put it in models/unet and choose it in the kolors "
                 "list (with an SDXL VAE from models/vae)",
                 tiny_dir["prompt_cache"].name: "(metadata format='tadisr-prompt-cache/1'): it is a prompt cache; "
                                                "choose it as prompt_cache (a prompt_cache*.safetensors file in "
                                                "models/tadisr)"}
        for name, words in cases.items():
            with pytest.raises(ValueError) as info:
                loaders.load_model("tiny-kolors", name, "prompt_cache.safetensors", "fp32", "cpu", False)
            assert str(info.value).startswith("TADiSR: ") and str(info.value).endswith(words)
            assert "--" not in str(info.value)
    finally:
        unet.unlink()


def test_auto_prompt_cache_is_computed_once_into_models_tadisr(models_dir, tiny_dir):
    target = models_dir / "tadisr" / "prompt_cache_tiny-kolors.safetensors"
    assert not target.exists()
    h = loaders.load_model("tiny-kolors", "tadisr_tiny_official.pkl", loaders.AUTO_CACHE, "fp32", "cpu")
    assert target.is_file() and h.sources["prompt"] == str(target)
    stamp = target.stat().st_mtime_ns
    model_cache.clear()
    loaders.load_model("tiny-kolors", "tadisr_tiny_official.pkl", loaders.AUTO_CACHE, "fp32", "cpu")
    assert target.stat().st_mtime_ns == stamp
    assert loaders.prompt_cache_choices()[-1] == "prompt_cache_tiny-kolors.safetensors"


@pytest.fixture
def files_only_models(tiny_dir, tmp_path, monkeypatch):
    """A models/ folder with no Kolors folder: a UNet file in models/diffusion_models, the VAE file in
    models/vae, a non-UNet file beside the UNet, ChatGLM3 in models/LLM and the checkpoint."""
    root = tmp_path / "models"
    for sub in ("diffusion_models", "vae", "tadisr", "LLM"):
        (root / sub).mkdir(parents=True)
    from safetensors.torch import load_file, save_file

    kolors = tiny_dir["kolors"]
    for sub, target in (("unet", "diffusion_models/kolors_unet"), ("vae", "diffusion_models/not_a_unet"),
                        ("vae", "vae/sdxl_vae")):  # tiny files carry their config (real ones are found by shape)
        save_file(load_file(kolors / sub / "diffusion_pytorch_model.safetensors"), root / f"{target}.safetensors",
                  metadata={"config": (kolors / sub / "config.json").read_text()})
    (root / "LLM" / "chatglm3-6b").symlink_to(kolors)  # text_encoder/ + tokenizer/ are a ChatGLM3 source
    for key in ("checkpoint", "prompt_cache"):
        (root / "tadisr" / tiny_dir[key].name).symlink_to(tiny_dir[key])
    monkeypatch.setenv("TADISR_MODELS_DIR", str(root))
    return root


def test_single_unet_and_vae_files_load_like_the_folder(files_only_models, handle):
    pair = "unet/kolors_unet.safetensors + vae/sdxl_vae.safetensors"
    assert loaders.kolors_choices() == [pair] + loaders.demo_choices()
    h = loaders.load_model(pair, "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32", "cpu", False)
    assert h.key[0] == loaders.resolve_kolors(pair).key()
    img = random_image(seed=3)
    assert torch.equal(upscale.upscale(h, img, **TILE)[0], upscale.upscale(handle, img, **TILE)[0])


def test_auto_prompt_cache_without_a_folder_uses_chatglm_from_models_llm(files_only_models):
    pair = "unet/kolors_unet.safetensors + vae/sdxl_vae.safetensors"
    h = loaders.load_model(pair, "tadisr_tiny.safetensors", loaders.AUTO_CACHE, "fp32", "cpu", False)
    target = files_only_models / "tadisr" / "prompt_cache_kolors_unet.safetensors"
    assert target.is_file() and h.sources["prompt"] == str(target)
    (files_only_models / "LLM" / "chatglm3-6b").unlink()
    target.unlink()
    model_cache.clear()
    with pytest.raises(FileNotFoundError, match=r"no usable ChatGLM3 was found to compute it: .*models/LLM"):
        loaders.load_model(pair, "tadisr_tiny.safetensors", loaders.AUTO_CACHE, "fp32", "cpu", False)


@pytest.mark.parametrize("folder, pack", [("LLM", "ComfyUI-Kolors-MZ"),
                                          ("LLM/checkpoints", "ComfyUI-KwaiKolorsWrapper")])
def test_auto_prompt_cache_from_the_single_chatglm_file_of_the_kolors_node_packs(files_only_models, folder, pack):
    """chatglm3-fp16.safetensors where Kolors-MZ (models/LLM) and the KwaiKolorsWrapper (models/LLM/checkpoints)
    keep it: without a tokenizer the error names the file and what to do; with the tokenizer those packs
    ship in custom_nodes/<pack>/configs/tokenizer the cache is the one the ChatGLM3 folder gives."""
    pair = "unet/kolors_unet.safetensors + vae/sdxl_vae.safetensors"
    target = files_only_models / "tadisr" / "prompt_cache_kolors_unet.safetensors"
    loaders.load_model(pair, "tadisr_tiny.safetensors", loaders.AUTO_CACHE, "fp32", "cpu", False)
    from_folder = PromptCache.load(target)
    kolors = (files_only_models / "LLM" / "chatglm3-6b").resolve()
    (files_only_models / "LLM" / "chatglm3-6b").unlink()
    target.unlink()
    model_cache.clear()
    single = files_only_models / folder / "chatglm3-fp16.safetensors"
    single.parent.mkdir(exist_ok=True)
    shutil.copy(kolors / "text_encoder" / "model.safetensors", single)
    with pytest.raises(FileNotFoundError, match=rf"no usable ChatGLM3 was found to compute it \(\S*{folder}/chatglm3-"
                                                r"fp16.safetensors is a ChatGLM3 weights file without its tokenizer"):
        loaders.load_model(pair, "tadisr_tiny.safetensors", loaders.AUTO_CACHE, "fp32", "cpu", False)
    shutil.copytree(kolors / "tokenizer", files_only_models.parent / "custom_nodes" / pack / "configs" / "tokenizer")
    h = loaders.load_model(pair, "tadisr_tiny.safetensors", loaders.AUTO_CACHE, "fp32", "cpu", False)
    assert h.sources["prompt"] == str(target)
    cache = PromptCache.load(target)
    assert torch.equal(cache.prompt_embeds, from_folder.prompt_embeds)
    assert cache.text_columns == from_folder.text_columns


def test_a_kolors_folder_without_chatglm3s_shards_gives_way_to_models_llm(tiny_dir, tmp_path, monkeypatch):
    """Defect: a Kolors folder whose text_encoder/ holds its config and shard index but no shard (a download of
    unet/, vae/ and the *.json files) was taken as ChatGLM3's source, so chatglm3-fp16.safetensors in models/LLM
    was never tried and the load ended in a raw FileNotFoundError of a shard."""
    from tests.hostile_files import json_only_text_encoder

    models = tmp_path / "models"
    kolors = json_only_text_encoder(tiny_dir, models / "diffusers" / "Kolors")
    (models / "tadisr").mkdir()
    (models / "tadisr" / tiny_dir["checkpoint"].name).symlink_to(tiny_dir["checkpoint"])
    monkeypatch.setenv("TADISR_MODELS_DIR", str(models))
    files = loaders.resolve_kolors("Kolors")
    problems = []
    assert loaders.text_encoder_source(files, problems) is None
    lacks = f"{kolors / 'text_encoder'} lacks pytorch_model-00001-of-00007.bin and 6 more"
    assert len(problems) == 1 and problems[0].startswith(lacks)
    with pytest.raises(FileNotFoundError, match=r"no usable ChatGLM3 was found to compute it \(" + re.escape(lacks)
                                                + r".*\): put Kolors' text_encoder/ \+ tokenizer/ in the Kolors "
                                                  r"folder, or .* in models/LLM \(\S+models/LLM, "):
        loaders.load_model("Kolors", tiny_dir["checkpoint"].name, loaders.AUTO_CACHE, "fp32", "cpu", False)
    single = models / "LLM" / "chatglm3-fp16.safetensors"
    single.parent.mkdir()
    shutil.copy(tiny_dir["kolors"] / "text_encoder" / "model.safetensors", single)
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", single.parent, dirs_exist_ok=True)
    assert loaders.text_encoder_source(files) == single


def test_kolors_errors_are_the_library_messages(files_only_models):
    from tadisr_core.kolors_files import KolorsFolderError
    from tadisr_core.kolors_identity import NotKolorsError

    with pytest.raises(NotKolorsError, match=r"not_a_unet.safetensors: not a Kolors UNet"):
        loaders.load_model("unet/not_a_unet.safetensors + vae/sdxl_vae.safetensors", "tadisr_tiny.safetensors")
    with pytest.raises(KolorsFolderError, match="a single UNet file needs a VAE file too"):
        loaders.load_model("unet/kolors_unet.safetensors", "tadisr_tiny.safetensors")


# model_ref's files of each shipped model, as the loader's fixtures replace them
DEMO_FILES = {"demo": ("DEMO_CHECKPOINT", "DEMO_PROMPT_CACHE"),
              "demo-release": ("DEMO_RELEASE_CHECKPOINT", "DEMO_RELEASE_PROMPT_CACHE")}


@pytest.fixture(params=sorted(DEMO_FILES))
def demo_files(request, tmp_path, monkeypatch):
    """(name, model): a standalone tiny checkpoint of the shipped demo's variant standing in for it."""
    from tadisr_core import model_ref
    from tadisr_core.checkpoint import save_model
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec

    name = request.param
    spec = tiny_spec("release" if name == "demo-release" else "paper")
    model = build_model(spec, prompt=random_prompt(spec), seed=4).eval()
    ckpt, cache = tmp_path / f"{name}.safetensors", tmp_path / "prompt_cache.safetensors"
    save_model(model, ckpt, backbone=True)
    model.prompt.save(cache)
    for attr, path in zip(DEMO_FILES[name], (ckpt, cache)):
        monkeypatch.setattr(model_ref, attr, path)
    return name, model


def test_demo_choice_loads_the_built_in_model_and_ignores_checkpoint_and_cache(models_dir, demo_files):
    from tadisr_core import pipeline

    name, model = demo_files
    (choice,) = [c for c, n in loaders.DEMO_CHOICES.items() if n == name]
    assert choice in loaders.kolors_choices()
    h = loaders.load_model(choice, loaders.NO_CHECKPOINT, "missing.safetensors", "fp32", "cpu", False)
    assert h.sources["checkpoint"].endswith(f"{name}.safetensors")
    assert h.model.spec.variant == model.spec.variant
    assert h.model.default_color_fix == "wavelet"  # what color_fix "auto" gives the demos
    img = random_image(seed=6)
    image, mask, _ = upscale.upscale(h, img, **TILE)
    ref = pipeline.upscale(model, convert.image_to_core(img), 4.0, 64, 16, 2, color_fix="wavelet")
    assert torch.equal(image, convert.image_from_core(ref.image))
    assert torch.equal(mask, convert.mask_from_core(ref.mask))


def test_without_demo_weights_the_choices_are_absent_and_explain(models_dir, monkeypatch, tmp_path):
    from tadisr_core import model_ref

    for attr, _ in DEMO_FILES.values():
        monkeypatch.setattr(model_ref, attr, tmp_path / "absent.safetensors")
    assert loaders.demo_choices() == [] and not set(loaders.DEMO_CHOICES) & set(loaders.kolors_choices())
    for choice, name in loaders.DEMO_CHOICES.items():
        with pytest.raises(FileNotFoundError, match=f"built-in {name} model's absent.safetensors is missing"):
            loaders.load_model(choice, loaders.NO_CHECKPOINT)


# -- running -----------------------------------------------------------------------------------
def test_upscale_gives_scale_times_the_size_for_a_batch(handle):
    image, mask, att = upscale.upscale(handle, random_image(2), **TILE)
    assert image.shape == (2, 96, 64, 3) and mask.shape == (2, 96, 64) and att is None
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert 0 <= mask.min() and mask.max() <= 1
    assert not torch.equal(image[0], image[1])


def test_image_only_when_the_text_mask_is_not_connected(handle):
    img = random_image(2, seed=9)
    image, mask, _ = upscale.upscale(handle, img, **TILE)
    image_only, zeros, _ = upscale.upscale(handle, img, **TILE, mask=False)
    assert torch.equal(image_only, image)
    assert zeros.shape == mask.shape and not zeros.any() and mask.any()


def test_loading_and_running_under_inference_mode_as_comfyui_does(handle):
    """Defect: the prompt K/V cache read the version counter of inference tensors, which ComfyUI's
    inference mode makes of everything a node creates ("Inference tensors do not track version counter")."""
    img = random_image(seed=11)
    ref = upscale.upscale(handle, img, **TILE)
    model_cache.clear()
    with torch.inference_mode():
        h = loaders.load_model("tiny-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32", "cpu",
                               False)
        assert h is not handle and h.model.prompt_embeds.is_inference()
        for _ in range(2):  # the second run reuses the cached prompt keys and values
            out = upscale.upscale(h, img, **TILE)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


OUTPUTS = {"PreviewImage", "MaskPreview", "SaveImage"}  # what ComfyUI's registry flags OUTPUT_NODE here


def _is_output(class_type):
    return class_type in OUTPUTS


def test_prompt_hook_marks_whether_the_text_mask_is_connected():
    prompt = {"1": {"class_type": "TADiSRUpscale", "inputs": {"image": ["0", 0]}},
              "2": {"class_type": "TADiSRUpscale", "inputs": {"image": ["0", 0]}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
              "4": {"class_type": "MaskPreview", "inputs": {"mask": ["2", 1]}}}
    assert graph.text_mask_wanted(prompt, "1")  # not marked: the mask is made
    assert graph.mark_prompt({"prompt": prompt}, _is_output)["prompt"] is prompt
    assert prompt["1"]["inputs"][graph.MASK_USE_KEY] is False and prompt["2"]["inputs"][graph.MASK_USE_KEY] is True
    assert not graph.text_mask_wanted(prompt, "1") and graph.text_mask_wanted(prompt, 2)
    assert graph.text_mask_wanted(None, "1")


def test_nodes_that_lead_to_no_output_are_idle_for_the_checks():
    """Defect: a text-mask or heat-map consumer whose outputs go nowhere (its Save node muted or deleted),
    which ComfyUI never runs, still made Upscale compute the mask, or refuse to run."""
    prompt = {"1": {"class_type": "TADiSRUpscale", "inputs": {"image": ["0", 0]}},
              "2": {"class_type": "TADiSRTextAttention", "inputs": {"attention": ["1", 2], "image": ["1", 0],
                                                                    "layers": "mid"}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
              "4": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 1]}},
              "5": {"class_type": "GrowMask", "inputs": {"mask": ["1", 1]}},
              "6": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}}}
    assert graph.running_nodes(prompt, _is_output) == {"1", "3"}
    graph.mark_prompt({"prompt": prompt}, _is_output)
    assert prompt["1"]["inputs"][graph.MASK_USE_KEY] is False
    assert prompt["2"]["inputs"][graph.RUNS_KEY] is False
    graph.check_attention_use(prompt, "1", 2, {"up": (0, 1)}, captured=False)  # the idle view is not asked
    # once it leads to an output (here through the mask chain), it runs and is checked
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    prompt["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    graph.mark_prompt({"prompt": prompt}, _is_output)
    assert graph.running_nodes(prompt, _is_output) == {"1", "2", "3", "5", "6", "7", "8"}
    assert prompt["1"]["inputs"][graph.MASK_USE_KEY] is True and graph.RUNS_KEY not in prompt["2"]["inputs"]
    with pytest.raises(ValueError, match="'capture_attention' is off"):
        graph.check_attention_use(prompt, "1", 2, {"up": (0, 1)}, captured=False)
    # ComfyUI's partial execution runs only the outputs the client names (and what they read): the heat map
    # is not asked, but the mask mark stays, or the upscale would re-run between partial and whole runs
    graph.mark_prompt({"prompt": prompt, "partial_execution_targets": ["3"]}, _is_output)
    assert prompt["1"]["inputs"][graph.MASK_USE_KEY] is True and prompt["2"]["inputs"][graph.RUNS_KEY] is False
    # outside ComfyUI no class is known: every node counts as an output, nothing is taken for idle
    graph.mark_prompt({"prompt": prompt}, host.is_output_class)
    assert prompt["1"]["inputs"][graph.MASK_USE_KEY] is True and graph.RUNS_KEY not in prompt["2"]["inputs"]


@pytest.mark.parametrize("channels", [1, 4])
def test_gray_and_rgba_inputs(handle, channels):
    image, mask, _ = upscale.upscale(handle, random_image(1, 16, 16, channels), 2.0, 64, 8, 1)
    assert image.shape == (1, 32, 32, 4 if channels == 4 else 3) and mask.shape == (1, 32, 32)


def test_colour_under_transparent_pixels_does_not_reach_the_upscale_output(handle):
    """Defect: a white logo saved with black under its transparent pixels came out with a dark soft edge."""
    alpha = torch.zeros(1, 16, 16, 1)
    alpha[:, 4:12, 4:12] = 1
    alpha[:, 3, 4:12] = alpha[:, 12, 4:12] = 0.5               # the soft edge
    outs = [upscale.upscale(handle, torch.cat([torch.where(alpha > 0, 1.0, under).expand(-1, -1, -1, 3), alpha],
                                              -1), 2.0, 64, 8, 1) for under in (0.0, 1.0)]
    (black, black_mask, _), (white, white_mask, _) = outs
    seen = black[..., 3:] > 0
    assert torch.equal(black[..., 3:], white[..., 3:]) and seen.any()
    assert (black[..., :3] - white[..., :3]).abs().mul(seen).max() < 1e-5
    assert (black_mask - white_mask).abs().mul(seen[..., 0]).max() < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=9.0), "scale must be between 1 and 8"),
    (dict(scale=0.5), "scale must be between 1 and 8"),
    (dict(tile=60), "tile must be a multiple of 8"),
    (dict(tile=64, overlap=64), "overlap must be at least 0 and smaller than tile"),
])
def test_wrong_settings_raise_clear_errors(handle, kwargs, match):
    with pytest.raises(ValueError, match=match):
        upscale.upscale(handle, random_image(), **{**TILE, **kwargs})


def test_tiling_refused_at_queue_time_says_tadisr(v3):
    """Defect: with the check's own wrapper gone, the queue-time message lost its "TADiSR: " prefix. An
    overlap not smaller than the tile is refused at queue time too (it was refused only after the model
    had loaded); a linked tile or overlap (None) is checked when the node runs."""
    for node in (v3.TADiSRUpscale, v3.TADiSREncode):
        assert node.validate_inputs(100, 32) == "TADiSR: tile must be a multiple of 8 between 64 and 4096, got 100"
        overlap = "TADiSR: overlap must be at least 0 and smaller than tile"
        assert node.validate_inputs(128, 128) == f"{overlap} (128), got 128"
        assert node.validate_inputs(64, -8) == f"{overlap} (64), got -8"
        assert node.validate_inputs(64, 56) is True and node.validate_inputs(None, 64) is True
        assert node.validate_inputs(None, -8) == "TADiSR: overlap must be between 0 and 4088 (and smaller than " \
                                                 "the tile), got -8"  # ComfyUI's own range check is skipped
        assert node.validate_inputs(64, None) is True


def test_wrong_image_and_model_inputs(handle):
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        upscale.upscale(handle, torch.rand(1, 16, 16, 2), **TILE)
    with pytest.raises(ValueError, match="must come from Load TADiSR Model"):
        upscale.upscale("not a model", random_image(), **TILE)
    with pytest.raises(ValueError, match="connect the output of TADiSR One-Step Denoise"):
        lat = blocks.encode(handle, random_image(), **TILE)
        blocks.decode(handle, lat, 2)


def test_chained_blocks_equal_the_all_in_one_node(handle):
    img = random_image(2, seed=3)
    ref_image, ref_mask, _ = upscale.upscale(handle, img, **TILE)
    lat = blocks.encode(handle, img, **TILE)
    lat2, att = blocks.denoise(handle, lat, 2)
    image, mask = blocks.decode(handle, lat2, 2)
    assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
    assert isinstance(att, AttentionTiles) and len(att.maps) == len(lat2.tiles)
    cap_image, cap_mask, cap = upscale.upscale(handle, img, **TILE, attention=True)
    assert torch.equal(cap_image, ref_image) and torch.equal(cap_mask, ref_mask)
    assert cap.size == (96, 64) and set(cap.groups) == {"down", "up"}  # release layout: no mid block
    for a, b in zip(cap.maps, att.maps):
        assert torch.equal(a, b)


def test_text_attention_views(v3, handle):
    img = random_image(2, seed=4)
    image, _, att = upscale.upscale(handle, img, **TILE, attention=True)
    heat, over = attention_view.view(att, image, "all", "mean", True, "jet", 0.5)
    assert heat.shape == (2, 96, 64) and over.shape == (2, 96, 64, 3)
    for b in range(2):
        assert heat[b].min() == 0 and heat[b].max() == 1
    up_max, _ = attention_view.view(att, image, "up", "max", True, "inferno", 0.5)
    assert not torch.allclose(up_max, heat)
    raw, _ = attention_view.view(att, image, "down", "mean", False, "gray", 0.5)
    assert 0 <= raw.min() and raw.max() <= 1 and raw.max() < 1  # probabilities, not stretched
    _, plain = attention_view.view(att, image, "all", "mean", True, "gray", 0.0)
    assert torch.allclose(plain, image)
    _, small = attention_view.view(att, image[:, ::2, ::2], "all", "mean", True, "jet", 1.0)  # resized to the image
    assert small.shape == (2, 48, 32, 3)
    with pytest.raises(ValueError, match=r"^TADiSR: the image \(4x400\) and the heat map \(64x96\) have other aspect "
                                         r"ratios"):  # another picture: the map was stretched onto it without a word
        v3.TADiSRTextAttention.execute(att, random_image(1, 400, 4), "all", "mean", True, "jet", 0.5)
    with pytest.raises(ValueError, match="^TADiSR: this model captures no attention in the 'mid' layers"):
        v3.TADiSRTextAttention.execute(att, image, "mid", "mean", True, "jet", 0.5)
    with pytest.raises(ValueError, match="turn on 'capture_attention'"):
        attention_view.view(None, image, "all", "mean", True, "jet", 0.5)


def test_text_attention_dropdowns_offer_the_library_choices(v3, monkeypatch):
    """Review: the node's 'layers' / 'heads' options were a copy of tadisr_core.heatmap's; now read from
    it (a changed library list changes the dropdown)."""
    from tadisr_core import heatmap

    monkeypatch.setattr(heatmap, "LAYER_GROUPS", ("all", "up"))
    monkeypatch.setattr(heatmap, "REDUCTIONS", ("max",))
    io = v3.attention.io
    monkeypatch.setattr(io, "Schema", lambda **fields: fields)
    io.Combo.Input.reset_mock()
    v3.TADiSRTextAttention.define_schema()
    options = {c.args[0]: c.kwargs["options"] for c in io.Combo.Input.call_args_list}
    assert options["layers"] == ["all", "up"] and options["heads"] == ["max"]

def test_colormap_endpoints():
    heat = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    rgb = attention_view.colorize(heat, "jet")
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor([0, 0, .5])) and torch.allclose(rgb[1, :, 0, 0],
                                                                                        torch.tensor([.5, 0, 0]))
    gray = attention_view.colorize(torch.full((1, 1, 2, 2), 0.25), "gray")
    assert torch.allclose(gray, torch.full((1, 3, 2, 2), 0.25))


def _record_memory_asked(monkeypatch) -> list[int]:
    """The activation bytes each run asks `host.model_on_device` for, in order (the run still happens)."""
    asked = []
    real = host.model_on_device

    def recording(model, device, patcher, memory_required=0):
        asked.append(memory_required)
        return real(model, device, patcher, memory_required)

    monkeypatch.setattr(host, "model_on_device", recording)
    return asked


def test_memory_is_made_for_the_tiles_the_image_has(handle, monkeypatch):
    """Defect: every run asked ComfyUI for a full `tile` x `tile` of activation memory (x tile_batch),
    so a small image could evict other models for tiles it never runs."""
    from tadisr_core.devices import estimate_tile_bytes

    asked = _record_memory_asked(monkeypatch)
    upscale.upscale(handle, random_image(1, 6, 10), scale=4.0, tile=768, overlap=256, tile_batch=8)  # one 24 x 40 tile
    latents = blocks.encode(handle, random_image(1, 6, 10), scale=4.0, tile=768, overlap=256, tile_batch=8)
    blocks.denoise(handle, latents, tile_batch=8)
    assert asked == [estimate_tile_bytes(handle.model, 24, 40)] * 3
    assert asked[0] < estimate_tile_bytes(handle.model, 768, 768) / 500


def test_progress_per_tile_and_interrupt_between_tiles(handle, monkeypatch):
    calls = []
    monkeypatch.setattr(host, "progress_reporter", lambda total: lambda done, total: calls.append((done, total)))
    upscale.upscale(handle, random_image(2), **{**TILE, "tile_batch": 1})
    assert calls[-1][0] == calls[-1][1] == 4 and [c[0] for c in calls] == [1, 2, 3, 4]

    calls.clear()
    upscale.upscale(handle, random_image(2), **{**TILE, "tile_batch": 1}, attention=True)
    assert [c[0] for c in calls] == [1, 2, 3, 4] and {c[1] for c in calls} == {4}  # one fused pass

    class Interrupted(Exception):
        pass

    seen = []

    def check():
        seen.append(1)
        if len(seen) > 2:  # the node's own check, then one tile, then stop
            raise Interrupted

    monkeypatch.setattr(host, "check_interrupt", check)
    calls.clear()
    with pytest.raises(Interrupted):
        upscale.upscale(handle, random_image(2), **{**TILE, "tile_batch": 1})
    assert [c[0] for c in calls] == [1]


# -- the paper layout (decoder reads the attention) ----------------------------------------------
@pytest.fixture(scope="module")
def paper_handle(tmp_path_factory, models_dir):
    from tadisr_core.spec import tiny_spec
    from tadisr_core.testing import make_tiny

    paths = make_tiny(tmp_path_factory.mktemp("tiny_paper"), tiny_spec("paper"))
    (models_dir / "diffusers" / "tiny-paper").symlink_to(paths["kolors"])
    (models_dir / "tadisr" / "tadisr_tiny_paper.safetensors").symlink_to(paths["checkpoint"])
    return loaders.load_model("tiny-paper", "tadisr_tiny_paper.safetensors", "prompt_cache.safetensors", "fp32", "cpu")


def test_paper_layout_blocks_and_attention(paper_handle):
    img = random_image(1, seed=5)
    ref_image, ref_mask, att = upscale.upscale(paper_handle, img, **TILE, attention=True)
    lat = blocks.encode(paper_handle, img, **TILE)
    image, mask = blocks.decode(paper_handle, blocks.denoise(paper_handle, lat, 2)[0], 2)
    assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
    assert set(att.groups) == {"down", "mid", "up"}
    heat, _ = attention_view.view(att, image, "mid", "max", True, "jet", 0.5)
    assert heat.shape == (1, 96, 64)


def test_blocks_refuse_latents_of_another_loader_naming_the_fix(handle, paper_handle):
    """Defect: Encode with one model, Denoise or Decode with another gave a raw torch channel error."""
    img = random_image(1, seed=5)
    lat = blocks.encode(paper_handle, img, **TILE)
    fix = r"\(connect one Load TADiSR Model to Encode, One-Step Denoise and Joint Decode\)"
    with pytest.raises(ValueError, match="^TADiSR: these latents were encoded by a model of another architecture"):
        blocks.denoise(handle, lat, 2)
    with pytest.raises(ValueError, match=fix):
        blocks.decode(handle, blocks.denoise(paper_handle, lat, 2)[0], 2)


# -- early refusals from the queued prompt ----------------------------------------------------------
def _prompt(layers="mid"):
    return {"1": {"class_type": "TADiSRUpscale", "inputs": {"image": ["5", 0]}},
            "2": {"class_type": "TADiSRTextAttention", "inputs": {"attention": ["1", 2], "image": ["1", 0],
                                                                  "layers": layers}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}


def test_consumers_of_an_output():
    assert [nid for nid, _ in graph.consumers(_prompt(), "1", 0)] == ["2", "3"]
    assert [nid for nid, _ in graph.consumers(_prompt(), "1", 2)] == ["2"]
    assert graph.consumers(_prompt(), "1", 1) == []


def test_impossible_attention_use_is_refused_before_any_tile(handle, monkeypatch):
    """Defect: layers=mid on the release layout and an unconnected capture failed only after the upscale."""
    groups = channel_groups(handle.model)
    assert "mid" not in groups
    with pytest.raises(ValueError, match=r"node 2\): layers='mid' is impossible for this model"):
        graph.check_attention_use(_prompt("mid"), "1", 2, groups)
    with pytest.raises(ValueError, match="'capture_attention' is off"):
        graph.check_attention_use(_prompt("up"), "1", 2, groups, captured=False)
    graph.check_attention_use(_prompt("up"), "1", 2, groups)
    graph.check_attention_use(_prompt("all"), "1", 2, groups)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_machine_lacks_is_refused_by_the_loader():
    # ComfyUI 0.3.75 does not check V3 combo values: a workflow from a Mac still says "mps"
    for name, why in (("mps", "MPS .* is not available"), ("gpu", "not a device")):
        with pytest.raises(ValueError, match=f"TADiSR: device '{name}' cannot be used .*{why}.*choose one of"):
            loaders.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_on_a_cpu_only_host_is_worded_for_the_device_input_not_the_cli():
    """Defect: "device 'cuda:0' cannot be used (--device cuda:0: CUDA is not available ...)": a CLI flag in
    a node's message."""
    with pytest.raises(ValueError) as err:
        loaders.resolve_device("cuda:0")
    assert str(err.value) == ("TADiSR: device 'cuda:0' cannot be used (CUDA is not available in this torch build / "
                              f"machine); choose one of {loaders.device_choices()}")


def test_a_built_in_demo_without_its_prompt_cache_names_it_and_what_to_do(tmp_path, monkeypatch):
    """Defect: without its prompt cache the demo said to compute one with `tadisr prompt-cache --kolors DIR`,
    which a model without Kolors cannot do."""
    import dataclasses

    from tadisr_core import model_ref

    shipped = model_ref.shipped_models()
    demo = dataclasses.replace(shipped["demo"], prompt_cache=tmp_path / "gone.safetensors")
    monkeypatch.setattr(model_ref, "shipped_models", lambda: {**shipped, "demo": demo})
    with pytest.raises(FileNotFoundError) as err:
        loaders.load_model(loaders.DEMO_CHOICE, loaders.NO_CHECKPOINT, loaders.AUTO_CACHE, "auto", "cpu", True)
    message = str(err.value)
    assert message.startswith("TADiSR: the built-in demo model's gone.safetensors is missing from ")
    assert str(tmp_path) in message and "reinstall the pack" in message and "--kolors" not in message


def test_the_loader_fingerprint_follows_the_weight_files(models_dir, tiny_dir):
    """ComfyUI re-runs Load Model when this changes: a checkpoint or a chosen prompt cache replaced on disk
    (defect: the cache was keyed by its name alone), not the 'auto' prompt cache the first load writes
    (review: that re-ran the whole graph once), nor a linked input (review: NaN there re-ran the graph on
    every queue)."""
    import shutil

    copy = models_dir / "tadisr" / "fingerprinted.safetensors"
    shutil.copy(tiny_dir["checkpoint"], copy)
    auto = models_dir / "tadisr" / loaders.auto_cache_name(loaders.resolve_kolors("tiny-kolors"))
    try:
        before = loaders.fingerprint("tiny-kolors", copy.name, loaders.AUTO_CACHE)
        auto.write_bytes(b"written by the first load")
        assert loaders.fingerprint("tiny-kolors", copy.name, loaders.AUTO_CACHE) == before
        st = copy.stat()
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert loaders.fingerprint("tiny-kolors", copy.name, loaders.AUTO_CACHE) != before
    finally:
        copy.unlink()
        auto.unlink(missing_ok=True)
    chosen = models_dir / "tadisr" / "prompt_cache_fingerprinted.safetensors"
    shutil.copy(tiny_dir["prompt_cache"], chosen)
    try:
        before = loaders.fingerprint("tiny-kolors", "tadisr_tiny.safetensors", chosen.name)
        assert loaders.fingerprint("tiny-kolors", "tadisr_tiny.safetensors", chosen.name) == before
        st = chosen.stat()
        os.utime(chosen, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # recomputed under the same name
        assert loaders.fingerprint("tiny-kolors", "tadisr_tiny.safetensors", chosen.name) != before
    finally:
        chosen.unlink()
    assert loaders.fingerprint(None, "tadisr_tiny.safetensors", loaders.AUTO_CACHE) == "linked"
    nan = loaders.fingerprint("no such kolors", "tadisr_tiny.safetensors", loaders.AUTO_CACHE)
    assert nan != nan  # never equal: the run says what is missing


def test_memory_is_made_for_every_image_of_the_batch(handle, monkeypatch):
    """Defect: the reserved tile batch was capped at one image's tiles, though the nodes run
    batch x tiles units (here 3 images of one 24 x 40 tile, tile_batch 8: 3 tiles at once)."""
    from tadisr_core.devices import estimate_tile_bytes

    asked = _record_memory_asked(monkeypatch)
    upscale.upscale(handle, random_image(3, 6, 10), scale=4.0, tile=768, overlap=256, tile_batch=8)
    latents = blocks.encode(handle, random_image(3, 6, 10), scale=4.0, tile=768, overlap=256, tile_batch=2)
    blocks.denoise(handle, latents, tile_batch=8)
    assert asked == [3 * estimate_tile_bytes(handle.model, 24, 40), 2 * estimate_tile_bytes(handle.model, 24, 40),
                     3 * estimate_tile_bytes(handle.model, 24, 40)]


def test_library_errors_reach_comfyui_with_the_tadisr_prefix_and_their_type(v3, handle, monkeypatch):
    """Defect: the library's errors (the value-range refusal, NaN pixels, a missing Kolors folder) reached
    ComfyUI without the "TADiSR: " the nodes' own messages carry. Now prefixed once where node execution
    enters the pack, the exception's type kept; out-of-memory errors (ComfyUI acts on them) untouched."""
    from tadisr_core.finite import NonFiniteError
    from tadisr_core.kolors_files import KolorsFolderError

    upscale_node = v3.TADiSRUpscale
    x = random_image(1, 8, 8) * 255
    span = f"{float(x.min()):.3g}..{float(x.max()):.3g}"
    with pytest.raises(ValueError) as err:
        upscale_node.execute(handle, x, **TILE)
    assert str(err.value) == (f"TADiSR: the input image's values span {span}, but the model reads 0..1: map a -1..1 "
                              "image with (x + 1) / 2 and a 0..255 one with x / 255")
    x = random_image(1, 8, 8)
    x[0, :2, :3, 0] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        upscale_node.execute(handle, x, **TILE)
    assert str(err.value) == ("TADiSR: input image: 6 non-finite value(s) (NaN/Inf); the image holds NaN or Inf "
                              "pixels: fix or replace it")
    with pytest.raises(KolorsFolderError) as direct:
        loaders.resolve_kolors("no-such-kolors")
    with pytest.raises(KolorsFolderError) as err:
        v3.TADiSRLoadModel.execute("no-such-kolors", "tadisr_tiny.safetensors", "prompt_cache.safetensors", "fp32",
                                   "cpu", False)
    assert str(err.value) == "TADiSR: " + str(direct.value)
    with pytest.raises(ValueError) as err:  # the pipeline's tiling check, prefixed once
        upscale_node.execute(handle, random_image(1, 8, 8), 4.0, 64, 64, 2)
    assert str(err.value) == "TADiSR: overlap must be at least 0 and smaller than tile (64), got 64"

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(upscale, "upscale", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as err:
        upscale_node.execute(handle, random_image(1, 8, 8), **TILE)
    assert str(err.value) == "CUDA out of memory. Tried to allocate 2.00 GiB"


def test_whatever_any_node_raises_carries_the_prefix(v3):
    """Every node's execute prefixes what it raises (here: called without its inputs), type kept."""
    assert len(v3.NODES) == 9
    for node in v3.NODES:
        with pytest.raises(TypeError, match=r"^TADiSR: .*execute\(\) missing \d required positional argument"):
            node.execute()
