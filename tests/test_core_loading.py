"""Loading a Kolors diffusers folder: fp16 variant files, and errors that name what is missing."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from tadisr_core.kolors_files import KolorsFolderError, find_kolors_files
from tadisr_core.loading import ensure_prompt_cache, load_tadisr


@pytest.fixture
def kolors_copy(tiny_dir, tmp_path):
    dst = tmp_path / "kolors"
    shutil.copytree(tiny_dir["kolors"], dst)
    return dst


def test_fp16_variant_files_are_accepted(kolors_copy, tiny_dir):
    for sub in ("unet", "vae"):
        f = kolors_copy / sub / "diffusion_pytorch_model.safetensors"
        f.rename(f.with_name("diffusion_pytorch_model.fp16.safetensors"))
    found = find_kolors_files(kolors_copy)
    assert found.unet.name == "diffusion_pytorch_model.fp16.safetensors"
    model = load_tadisr(kolors_copy, tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    ref = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).image, ref(x).image)


def test_missing_pieces_are_named(kolors_copy, tiny_dir):
    (kolors_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(KolorsFolderError, match=r"no weights in .*vae.*Kwai-Kolors/Kolors/vae"):
        load_tadisr(kolors_copy, tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    shutil.rmtree(kolors_copy / "unet")
    with pytest.raises(KolorsFolderError, match=r"unet/config\.json is missing"):
        find_kolors_files(kolors_copy)
    with pytest.raises(KolorsFolderError, match="Kolors folder not found"):
        find_kolors_files(kolors_copy / "nope")


def test_text_encoder_is_only_needed_for_the_prompt_cache(kolors_copy, tiny_dir, tmp_path):
    shutil.rmtree(kolors_copy / "text_encoder")
    load_tadisr(kolors_copy, tiny_dir["checkpoint"], tiny_dir["prompt_cache"])  # cache given: fine
    with pytest.raises(KolorsFolderError, match=r"text_encoder/config\.json is missing"):
        load_tadisr(kolors_copy, tiny_dir["checkpoint"], tmp_path / "new_cache.safetensors")


def test_prompt_cache_is_computed_once_and_saved(tiny_dir, tmp_path):
    path = tmp_path / "models" / "prompt_cache.safetensors"
    first = ensure_prompt_cache(path, tiny_dir["kolors"])
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = ensure_prompt_cache(path, tiny_dir["kolors"])
    assert path.stat().st_mtime_ns == stamp and torch.equal(first.prompt_embeds, again.prompt_embeds)


def test_dtype_policy_keeps_the_vae_in_fp32_under_fp16(tiny_dir):
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.float16)
    assert model.unet.conv_in.weight.dtype == torch.float16
    assert model.vae.decoder.conv_in.weight.dtype == torch.float32
    bf = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = bf(x)
    assert out.image.dtype == torch.float32 and torch.isfinite(out.image).all()


def test_prompt_cache_from_every_chatglm_layout(tiny_dir, tmp_path):
    """A Kolors folder, a ChatGLM3 folder (models/LLM style) and a text_encoder folder that holds its
    own tokenizer give the same cache, computed on the CPU."""
    from tadisr_core.prompt import compute_prompt_cache_from_kolors, find_text_encoder

    kolors = tiny_dir["kolors"]
    llm = tmp_path / "LLM" / "chatglm3-6b"
    shutil.copytree(kolors / "text_encoder", llm)
    for f in (kolors / "tokenizer").iterdir():
        shutil.copy(f, llm / f.name)
    te_only = tmp_path / "kolors_te"
    shutil.copytree(llm, te_only / "text_encoder")
    assert find_text_encoder(llm) == (llm, llm)
    assert find_text_encoder(te_only) == (te_only / "text_encoder", te_only / "text_encoder")
    kw = dict(max_length=32, dtype=torch.float32, time_ids=(64, 64, 0, 0, 64, 64))
    ref = compute_prompt_cache_from_kolors(kolors, **kw)
    for source in (llm, te_only):
        cache = compute_prompt_cache_from_kolors(source, **kw)
        assert torch.equal(cache.prompt_embeds, ref.prompt_embeds) and cache.text_columns == ref.text_columns


def _chatglm_copy(kolors: Path, folder: Path, edit) -> Path:
    """A ChatGLM3 folder (models/LLM style) copied from the tiny Kolors one, its weights passed through `edit`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(kolors / "text_encoder", folder)
    for f in (kolors / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    weights = folder / "model.safetensors"
    save_file(edit(load_file(str(weights))), str(weights))
    return folder


def test_incomplete_or_damaged_chatglm_is_refused_and_writes_no_cache(tiny_dir, tmp_path):
    """ChatGLM3 with missing tensors (transformers would fill them at random) or NaN weights: a
    ValueError naming the folder and what to do, and no prompt cache is saved."""
    from tadisr_core.loading import ensure_prompt_cache

    def drop(tensors):
        return {k: v for k, v in tensors.items() if ".layers.0." not in k}

    def poison(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("weight") and tensors[k].ndim == 2)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        return tensors

    for name, edit, words in (("missing", drop, "weights are incomplete"), ("nan", poison, "contains NaN")):
        folder = _chatglm_copy(tiny_dir["kolors"], tmp_path / name / "chatglm3-6b", edit)
        cache = tmp_path / name / "prompt_cache.safetensors"
        with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*" + words + ".*re-download text_encoder/"):
            ensure_prompt_cache(cache, folder)
        assert not cache.exists()


def test_text_encoder_auto_runs_on_the_models_gpu_when_it_has_room(tiny_dir, tmp_path, monkeypatch):
    """`text_encoder_device_name="auto"` while loading for a GPU: ChatGLM3 goes to that GPU (it
    used to stay on the CPU, as "auto" was resolved without the model's device)."""
    from tadisr_core import devices, loading, prompt_store
    from tadisr_core.prompt import CHATGLM_BYTES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as far as the loader can tell
    monkeypatch.setattr(devices, "free_memory", lambda device: CHATGLM_BYTES)
    seen = []

    class Stop(Exception):
        pass

    def record(source, device, **kwargs):
        seen.append(torch.device(device))
        raise Stop

    monkeypatch.setattr(loading, "compute_prompt_cache_from_kolors", record)
    monkeypatch.setattr(prompt_store, "compute_prompt_cache_from_kolors", record)  # no cache path: kept one
    for cache in (tmp_path / "absent.safetensors", None):  # computed and saved, or computed in memory
        with pytest.raises(Stop):
            loading.load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], cache, device="cuda:0",
                                text_encoder_device_name="auto")
    with pytest.raises(Stop):
        loading.load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None, device="cuda:0")
    assert seen == [torch.device("cuda:0")] * 2 + [torch.device("cpu")]  # the default stays the CPU


def test_text_encoder_device_auto_falls_back_to_cpu():
    from tadisr_core.prompt import CHATGLM_BYTES, text_encoder_device

    assert text_encoder_device("auto", "cpu") == torch.device("cpu")
    assert text_encoder_device("auto", "cuda:0", free_bytes=CHATGLM_BYTES - 1) == torch.device("cpu")
    assert text_encoder_device("auto", "cuda:0", free_bytes=CHATGLM_BYTES) == torch.device("cuda:0")
    assert text_encoder_device("cpu", "cuda:0", free_bytes=1 << 40) == torch.device("cpu")


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_equals_fp32_load_then_cast(tiny_dir, dtype, merge):
    """Streaming in the target dtype must not change any number: the result equals loading in fp32
    (merging there) and casting afterwards, as the loader did before."""
    from tadisr_core.devices import place_model

    args = (tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    ref = place_model(load_tadisr(*args, merge_lora_weights=merge), None, dtype)
    got = load_tadisr(*args, dtype=dtype, merge_lora_weights=merge)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(ref_sd[k].dtype == got_sd[k].dtype and torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)


def test_low_precision_merge_holds_one_fp32_base_weight_at_a_time(tiny_dir, monkeypatch):
    """The fp32 merge re-reads each LoRA layer's base weight; the previous one must be gone when the
    next is read (collecting them first held a whole fp32 copy of every LoRA'd layer)."""
    import weakref

    import tadisr_core.scaled_weights as scaled_weights
    import tadisr_core.streaming as streaming

    real, alive, most = streaming.iter_tensors, [], []

    def tracked(path, dtype=None, *args, **kwargs):
        for name, t in real(path, dtype, *args, **kwargs):
            if dtype == torch.float32:  # the merge's reads (the backbone is streamed in bf16)
                most.append(sum(r() is not None for r in alive))
                alive.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(streaming, "iter_tensors", tracked)
    monkeypatch.setattr(scaled_weights, "iter_tensors", tracked)  # where the backbone's files are read
    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=torch.bfloat16)
    assert len(alive) > 10, "the merge read no base weights"
    assert max(most) == 0, f"{max(most)} earlier fp32 base weights were still alive when the next was read"
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}


def test_a_given_checkpoint_object_is_neither_changed_nor_shared(tiny_dir):
    """load_tadisr may be handed a Checkpoint the caller keeps: loading in bf16 must not cast or
    merge into it, and the model must not alias its tensors (a later fp32 load equals a fresh one)."""
    from tadisr_core.checkpoint import load_checkpoint

    args = (tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    ckpt = load_checkpoint(tiny_dir["checkpoint"])
    before = {(g, k): v.clone() for g, sd in ckpt.groups.items() for k, v in sd.items()}
    bf16 = load_tadisr(args[0], ckpt, args[2], dtype=torch.bfloat16)
    assert all(torch.equal(ckpt.groups[g][k], v) and ckpt.groups[g][k].dtype == v.dtype for (g, k), v in before.items())
    ours = {t.data_ptr() for t in bf16.state_dict().values()}
    assert not ours & {t.data_ptr() for sd in ckpt.groups.values() for t in sd.values()}
    again, fresh = load_tadisr(args[0], ckpt, args[2]).state_dict(), load_tadisr(*args).state_dict()
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)


def test_a_prompt_cache_of_another_model_is_refused_at_load_naming_it(tiny_dir, tmp_path, capsys):
    """A cache made for a UNet of another width (here Kolors' 4096 on the tiny model's 64): one
    error at load naming the file, not a shape error for every image."""
    from PIL import Image

    from tadisr_core.cli import main as cli_main
    from tadisr_core.prompt import PromptCache

    tiny = PromptCache.load(tiny_dir["prompt_cache"])
    other = tmp_path / "kolors_prompt_cache.safetensors"
    PromptCache(torch.zeros(1, tiny.prompt_embeds.shape[1], 4096), torch.zeros(1, 4096), tiny.time_ids,
                tiny.prompt, tiny.text_columns).save(other)
    with pytest.raises(ValueError, match=re.escape(str(other)) + ": the prompt cache does not fit this model: its "
                       "embeddings are 4096 / 4096 wide with 6 time ids, the UNet takes 64 / 64 and 6"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], other)
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    code = cli_main(["upscale", str(image), "-o", str(tmp_path / "out"), "--kolors", str(tiny_dir["kolors"]),
                     "--checkpoint", str(tiny_dir["checkpoint"]), "--prompt-cache", str(other), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and str(other) in err and "prompt-cache --kolors DIR" in err, err


def test_dtype_and_device_by_name_or_a_clear_error_before_loading(tiny_dir):
    """The library takes the command line's names ("auto", "bf16"); a dtype or device it cannot use is
    a ValueError naming it, not a checkpoint said to be damaged."""
    from tadisr_core.model_ref import load_model

    by_name = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype="bf16",
                          device="cpu")
    assert by_name.unet.conv_in.weight.dtype == torch.bfloat16
    auto = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype="auto")
    assert auto.unet.conv_in.weight.dtype == torch.float32  # auto on the CPU
    for dtype, words in (("float", "unknown dtype 'float'"),
                         (torch.int8, "dtype torch.int8 is not one TADiSR runs in")):
        with pytest.raises(ValueError, match=re.escape(words)):
            load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], dtype=dtype)
    with pytest.raises(ValueError, match="^device='bf16': not a device"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], device="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"], device="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        load_model(tiny_dir["checkpoint"], kolors_dir=str(tiny_dir["kolors"]), prompt_cache=tiny_dir["prompt_cache"],
                   dtype="half")


def test_a_chatglm_without_its_rotary_buffer_still_makes_the_same_cache(tiny_dir, tmp_path):
    """Only missing weights are refused: the rotary inv_freq buffer, if a download lacks it, is rebuilt
    by the model itself, and the cache is the same."""
    from tadisr_core.prompt import compute_prompt_cache_from_kolors

    folder = _chatglm_copy(tiny_dir["kolors"], tmp_path / "chatglm3-6b",
                           lambda tensors: {k: v for k, v in tensors.items() if not k.endswith("inv_freq")})
    kw = dict(max_length=32, dtype=torch.float32, time_ids=(64, 64, 0, 0, 64, 64))
    ref = compute_prompt_cache_from_kolors(tiny_dir["kolors"], **kw)
    assert torch.equal(compute_prompt_cache_from_kolors(folder, **kw).prompt_embeds, ref.prompt_embeds)


def test_an_unknown_offload_mode_is_refused_before_any_file_is_read(tmp_path):
    from tadisr_core.model_ref import load_model

    missing = tmp_path / "not_there"
    with pytest.raises(ValueError, match=r"unknown offload mode 'cpu'; choose one of \('none', 'sequential'\)"):
        load_model(missing, offload="cpu")
    with pytest.raises(ValueError, match="unknown offload mode 'Sequential'"):
        load_tadisr(missing, missing / "ckpt.safetensors", offload="Sequential")


def test_python_callers_are_told_arguments_and_the_command_line_flags(tiny_dir, monkeypatch):
    """Defect: a Python caller was told CLI flags ("--device cuda: ...", "pass --kolors DIR ... or --unet"), and
    `text_encoder_device_name="cuda"` on a machine without CUDA failed inside torch after ChatGLM3 was read."""
    from tadisr_core import devices, loading, prompt_store
    from tadisr_core.wording import command_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module in (loading, prompt_store):
        monkeypatch.setattr(module, "compute_prompt_cache_from_kolors", lambda *a, **k: pytest.fail("ChatGLM3 read"))
    with pytest.raises(RuntimeError, match=re.escape("text_encoder_device_name='cuda': CUDA is not available")):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None, text_encoder_device_name="cuda")
    with pytest.raises(KolorsFolderError) as python:
        find_kolors_files(None)
    with command_line(), pytest.raises(KolorsFolderError) as cli:
        find_kolors_files(None)
    assert str(python.value) == "no unet given: pass kolors_dir=DIR (a Kolors diffusers folder) or unet=FILE|DIR"
    assert str(cli.value) == "no unet given: pass --kolors DIR (a Kolors diffusers folder) or --unet FILE|DIR"
    with pytest.raises(RuntimeError) as python:
        devices.resolve_device("cuda:1")
    with command_line(), pytest.raises(RuntimeError) as cli:
        devices.resolve_device("cuda:1")
    assert str(python.value).startswith("device='cuda:1': CUDA is not available")
    assert str(cli.value).startswith("--device cuda:1: CUDA is not available")
