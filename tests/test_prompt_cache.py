"""The prompt cache as users meet it: files that are not one prompt's conditioning are refused when read,
naming the file; a checkpoint run on another prompt's conditioning says so; ChatGLM3 runs in the dtype
Kolors uses and is freed even when encoding fails."""

from __future__ import annotations

import gc
import json
import logging
import os
import weakref

import pytest
import torch
from safetensors.torch import save_file

from tadisr_core import cli, prompt
from tadisr_core.checkpoint import convert, load_checkpoint
from tadisr_core.loading import load_tadisr
from tadisr_core.model_ref import load_standalone, shipped_model
from tadisr_core.prompt import PromptCache, chatglm_dtype

KW = dict(max_length=32, time_ids=(64, 64, 0, 0, 64, 64))


def _write(path, tensors: dict, **meta) -> None:
    base = {"format": "tadisr-prompt-cache/1", "prompt": "text", "text_columns": "[31]", "tokens": "32"}
    save_file(tensors, str(path), metadata={k: v for k, v in {**base, **meta}.items() if v is not None})


GOOD = {"prompt_embeds": torch.zeros(1, 32, 64), "text_embeds": torch.zeros(1, 64), "time_ids": torch.zeros(1, 6)}
# Defects: each of these loaded (and failed per image, or never, or with an IndexError and no file name)
MALFORMED = {
    "embeds of two dimensions": ({"prompt_embeds": torch.zeros(32, 64)}, {},
                                 "prompt_embeds is [32, 64], not [1, tokens, width]"),
    "two prompts": ({"prompt_embeds": torch.zeros(2, 32, 64)}, {}, "prompt_embeds is [2, 32, 64], not [1, tokens, "),
    "two pooled embeddings": ({"text_embeds": torch.zeros(2, 64)}, {}, "text_embeds is [2, 64], not [1, 64]"),
    "five time ids": ({"time_ids": torch.zeros(1, 5)}, {}, "time_ids is [1, 5], not [1, 6]"),
    "integer embeddings": ({"prompt_embeds": torch.zeros(1, 32, 64, dtype=torch.int32)}, {},
                           "prompt_embeds holds int32, not floats"),
    "a column past the sequence": ({}, {"text_columns": "[72]"}, "'text' columns [72] are not a list of token "
                                                                  "positions 0..31"),
    "columns that are no list": ({}, {"text_columns": '"12"'}, "'text' columns '12' are not a list"),
    "columns that are no numbers": ({}, {"text_columns": '{"a": 1}'}, "'text' columns {'a': 1} are not a list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_cache_that_is_not_one_prompts_conditioning_is_refused_naming_the_file(case, tmp_path):
    tensors, meta, problem = MALFORMED[case]
    path = tmp_path / "odd.safetensors"
    _write(path, {**GOOD, **tensors}, **meta)
    with pytest.raises(ValueError) as err:
        PromptCache.load(path)
    assert str(err.value).startswith(f"{path}: not a prompt cache of one prompt (") and problem in str(err.value)
    assert str(err.value).endswith("recompute it with `tadisr prompt-cache`")


def test_a_cache_without_its_prompt_is_named(tmp_path):
    """Defect: "cannot load the model (KeyError: 'prompt')", without the file."""
    path = tmp_path / "no_prompt.safetensors"
    _write(path, GOOD, prompt=None)
    with pytest.raises(ValueError, match=rf"^{path}: not a readable prompt cache \(KeyError: 'prompt'\)"):
        PromptCache.load(path)


def test_a_half_precision_cache_is_read_as_float32(tmp_path):
    path = tmp_path / "half.safetensors"
    _write(path, {k: v.half() + 1 for k, v in GOOD.items()})
    cache = PromptCache.load(path)
    assert {t.dtype for t in (cache.prompt_embeds, cache.text_embeds, cache.time_ids)} == {torch.float32}
    assert cache.text_columns == (31,) and cache.prompt == "text" and torch.all(cache.prompt_embeds == 1)


# the command the warnings give, a runnable one (defect: it lacked the required -o and shell quoting)
FIX = ("tadisr prompt-cache --kolors DIR -o FILE --prompt 'best quality,highres,extremely detailed,text' "
       "--time-ids 64 64 0 0 64 64")


def test_the_command_the_warning_gives_makes_the_cache_that_matches(tiny_dir, tmp_path, caplog):
    """The warning's command, with DIR and FILE filled in and split as a shell splits it, writes a cache the
    checkpoint runs on without a warning."""
    import shlex

    other = PromptCache.load(tiny_dir["prompt_cache"])
    other.prompt, other.time_ids = "it's \"odd\" $HOME", torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    other.save(tmp_path / "other.safetensors")
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tmp_path / "other.safetensors")
    command = caplog.records[-1].getMessage().split("`")[1]
    argv = shlex.split(command.replace("DIR", shlex.quote(str(tiny_dir["kolors"])))
                       .replace("FILE", shlex.quote(str(tmp_path / "fixed.safetensors"))))
    assert argv[:2] == ["tadisr", "prompt-cache"] and cli.main(argv[1:]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tmp_path / "fixed.safetensors")
    assert not [r for r in caplog.records if "was trained with" in r.getMessage()]


def test_a_checkpoint_run_on_another_prompts_cache_is_warned_of(tiny_dir, tmp_path, caplog):
    """Defect: a checkpoint trained on one prompt ran on a cache of another (ComfyUI's auto cache is always
    the release's prompt) without a word."""
    other = PromptCache.load(tiny_dir["prompt_cache"])
    other.prompt = "a photo of a shop sign"
    other.save(tmp_path / "other.safetensors")
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tmp_path / "other.safetensors")
    said = [r.getMessage() for r in caplog.records if "was trained with the prompt" in r.getMessage()]
    assert said == [f"{tiny_dir['checkpoint']} was trained with the prompt 'best quality,highres,extremely "
                    f"detailed,text', but the prompt cache {tmp_path / 'other.safetensors'} encodes 'a photo of a "
                    f"shop sign': the output differs from what it learned; compute a cache of its conditioning with "
                    f"`{FIX}` (DIR: Kolors or ChatGLM3)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])  # its own prompt
        load_tadisr(tiny_dir["kolors"], tiny_dir["official"], tmp_path / "other.safetensors")  # the .pkl names none
    assert not [r for r in caplog.records if "was trained with the prompt" in r.getMessage()]


def test_a_checkpoint_run_on_other_time_ids_is_warned_of(tiny_dir, tmp_path, caplog):
    """Defect: a cache made with other `prompt-cache --time-ids` (the size conditioning) ran without a word:
    checkpoints did not record the time ids they were trained with."""
    other = PromptCache.load(tiny_dir["prompt_cache"])
    assert json.loads(load_checkpoint(tiny_dir["checkpoint"]).metadata["time_ids"]) == [64, 64, 0, 0, 64, 64]
    other.time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    other.save(tmp_path / "sized.safetensors")
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tmp_path / "sized.safetensors")
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])  # its own: no word
    said = [r.getMessage() for r in caplog.records if "was trained with" in r.getMessage()]
    assert said == [f"{tiny_dir['checkpoint']} was trained with the time ids 64 64 0 0 64 64, but the prompt cache "
                    f"{tmp_path / 'sized.safetensors'} holds 1024 1024 0 0 1024 1024: the output differs from what "
                    f"it learned; compute a cache of its conditioning with `{FIX}` (DIR: Kolors or ChatGLM3)"]
    converted = convert(tiny_dir["checkpoint"], tmp_path / "converted.safetensors")  # conversion keeps them
    recorded = load_checkpoint(tiny_dir["checkpoint"]).metadata["time_ids"]
    assert load_checkpoint(converted).metadata["time_ids"] == recorded


def test_a_cache_computed_for_a_checkpoint_encodes_what_it_was_trained_with(tiny_dir, tmp_path, caplog):
    """Defect: `--kolors K --checkpoint C` without a cache (or with a new --prompt-cache path) computed the
    conditioning of the release's time ids whatever C was trained with, then warned that they differ (the
    release's .pkl, which records none, still gets the release's)."""
    checkpoint = load_checkpoint(tiny_dir["checkpoint"])
    recorded_ids = json.loads(checkpoint.metadata["time_ids"])
    checkpoint.metadata["prompt"] = "a shop sign, text"  # another prompt than the release's, as a run may train
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        in_memory = load_tadisr(tiny_dir["kolors"], checkpoint, None).prompt
        load_tadisr(tiny_dir["kolors"], checkpoint, tmp_path / "new.safetensors")
        release = load_tadisr(tiny_dir["kolors"], tiny_dir["official"], None).prompt
    assert not [r for r in caplog.records if "was trained with" in r.getMessage()]
    saved = PromptCache.load(tmp_path / "new.safetensors")
    for cache in (in_memory, saved):
        assert cache.prompt == "a shop sign, text"
        assert cache.time_ids.flatten().tolist() == recorded_ids == [64, 64, 0, 0, 64, 64]
    assert release.prompt == prompt.HEATMAP_PROMPT and release.time_ids.flatten().tolist() == [768, 768, 0, 0, 768, 768]


def test_conditioning_without_a_cache_path_is_computed_once_and_kept_for_later_runs(tiny_dir, tmp_path, monkeypatch,
                                                                                     caplog):
    """Defect: without --prompt-cache every run loaded ChatGLM3 (12.5 GB, minutes) again, and kept nothing."""
    computed = []  # each time ChatGLM3 is loaded
    load = prompt._load_chatglm
    monkeypatch.setattr(prompt, "_load_chatglm", lambda *a, **kw: computed.append(a[0]) or load(*a, **kw))
    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(tmp_path / "kept"))
    with caplog.at_level(logging.INFO, logger="tadisr"):
        first = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None).prompt
        again = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None).prompt
    assert len(computed) == 1  # the second run read what the first kept
    [kept] = (tmp_path / "kept").iterdir()
    assert kept.name.startswith(f"{tiny_dir['kolors'].name}-") and kept.suffix == ".safetensors"
    assert f"the prompt conditioning is kept in {kept}: later runs with this ChatGLM3 skip it" in caplog.text
    assert torch.equal(first.prompt_embeds, again.prompt_embeds) and first.text_columns == again.text_columns
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    other = load_checkpoint(tiny_dir["checkpoint"])
    other.metadata["prompt"] = "a shop sign, text"  # another conditioning: kept beside the first
    assert load_tadisr(tiny_dir["kolors"], other, None).prompt.prompt == "a shop sign, text"
    assert len(computed) == 2 and len(list((tmp_path / "kept").iterdir())) == 2

    weights = next((tiny_dir["kolors"] / "text_encoder").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the encoder replaced: computed again
    try:
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(computed) == 3

    kept.write_bytes(b"cut short")  # a damaged kept file is computed again, not an error
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        assert torch.equal(load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None).prompt.prompt_embeds,
                           first.prompt_embeds)
    assert len(computed) == 4 and f"{kept}: not a prompt cache (.safetensors) or truncated" in caplog.text
    assert "computing it again" in caplog.text
    assert torch.equal(PromptCache.load(kept).prompt_embeds, first.prompt_embeds)


def test_conditioning_that_cannot_be_kept_still_runs_and_says_where_to_keep_it(tiny_dir, tmp_path, monkeypatch,
                                                                              caplog):
    """A cache folder that cannot be written (here a file stands where it would be) leaves the conditioning in
    memory and says how to keep it: the run is not lost to a read-only home."""
    (tmp_path / "blocked").write_text("a file, not a folder")
    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(tmp_path / "blocked" / "prompt"))
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None)
    assert model.prompt.prompt == prompt.HEATMAP_PROMPT and model.prompt.prompt_embeds.isfinite().all()
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"the prompt conditioning was computed with ChatGLM3 but cannot be kept in "
                           f"{tmp_path / 'blocked' / 'prompt'} (")
    assert said.endswith("set TADISR_PROMPT_CACHE_DIR to a folder you can write, or give prompt_cache FILE")

    class SafetensorError(Exception):  # what safetensors raises for a folder it may not write in (not an OSError)
        pass

    def refuse(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    import safetensors.torch

    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(tmp_path / "read_only"))
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None)  # review: this was the load's error
    [said] = [r.getMessage() for r in caplog.records]
    assert f"cannot be kept in {tmp_path / 'read_only'} (Error while serializing: I/O error: Permission" in said
    monkeypatch.undo()

    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(tmp_path / "kept"))
    load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None)
    monkeypatch.setattr(PromptCache, "load", classmethod(lambda cls, path: (_ for _ in ()).throw(
        PermissionError(f"prompt cache {path}: permission denied"))))  # another user's kept file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], None)
    assert "permission denied; computing it again" in caplog.text


def test_a_model_that_runs_alone_given_another_cache_is_warned_of_too(tmp_path, caplog):
    """Defect: only the Kolors path compared the conditioning; `--model demo --prompt-cache other` ran silently."""
    demo = shipped_model("demo")
    other = PromptCache.load(demo.prompt_cache)
    other.prompt = "text"
    other.save(tmp_path / "other.safetensors")
    with caplog.at_level(logging.WARNING, logger="tadisr"):
        load_standalone(demo.checkpoint, tmp_path / "other.safetensors")
    assert [r.getMessage() for r in caplog.records if "was trained with" in r.getMessage()] == [
        f"{demo.checkpoint} was trained with the prompt 'best quality,highres,extremely detailed,text', but the "
        f"prompt cache {tmp_path / 'other.safetensors'} encodes 'text': the output differs from what it learned; use "
        f"the prompt cache kept with it (its run's or its folder's: leave out prompt_cache)"]  # no encoder makes it


def test_chatglm3_runs_in_fp16_on_a_gpu_as_kolors_does_and_bf16_on_the_cpu(tiny_dir, tmp_path, monkeypatch):
    """Defect: ChatGLM3 always ran in bf16, 3 mantissa bits short of the fp16 Kolors encodes its prompts in."""
    assert chatglm_dtype("cpu") == torch.bfloat16
    assert chatglm_dtype("cuda:1") == chatglm_dtype(torch.device("mps")) == torch.float16
    loaded = []
    real = prompt._load_chatglm
    monkeypatch.setattr(prompt, "_load_chatglm", lambda weights, dtype: loaded.append(dtype) or real(weights, dtype))
    prompt.compute_prompt_cache_from_kolors(tiny_dir["kolors"], **KW)
    assert loaded == [torch.bfloat16]
    asked = []
    monkeypatch.setattr(prompt, "compute_prompt_cache_from_kolors", lambda *a: asked.append(a[-2:]) or
                        PromptCache.load(tiny_dir["prompt_cache"]))
    for flags, dtype in (([], torch.bfloat16), (["--dtype", "fp32"], torch.float32)):
        out = tmp_path / f"cache{len(asked)}.safetensors"
        assert cli.main(["prompt-cache", "--kolors", str(tiny_dir["kolors"]), "-o", str(out), *flags]) == 0
        assert asked[-1] == (torch.device("cpu"), dtype)


def test_an_encoding_failure_frees_chatglm3(tiny_dir, monkeypatch):
    """Defect: while the error lived (a CLI message, a ComfyUI error report) its traceback's frames held
    the 6 B-parameter encoder."""
    seen = []

    def failing(text_encoder, *args):
        seen.append(weakref.ref(text_encoder))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(prompt, "compute_prompt_cache", failing)
    with pytest.raises(torch.OutOfMemoryError) as err:
        prompt.compute_prompt_cache_from_kolors(tiny_dir["kolors"], **KW)
    gc.collect()
    assert err.value is not None and len(seen) == 1 and seen[0]() is None

