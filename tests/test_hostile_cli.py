"""The batch CLI under hostile conditions (issue 13): no silent black output, every weight-file problem
one line with exit 2, stops and signals that leave nothing partial. Output names (nothing overwritten,
nothing re-processed) are tested in test_cli_output_names.py."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadisr_core import batch, cli, images
from tests.cli_runs import FAST, random_png
from tests.cli_runs import run_reported as run
from tests.hostile_files import dag_key_pickle, torch_zip

FAST = [*FAST, "-q"]


def test_stale_world_size_processes_every_file(tiny_model, tmp_path, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        random_png(d / f"{i}.png", i)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    rc, rep, err = run(["upscale", str(d), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys, model=tiny_model)
    assert rc == 0 and len(rep["files"]) == 3 and rep["world_size"] == 1
    assert "WORLD_SIZE=4 RANK=0 are set but no launcher" in err


@pytest.mark.parametrize("world, rank", [("", "0"), ("2", "x")])
def test_non_integer_world_size_or_rank_is_ignored_with_a_warning(world, rank, tiny_model, tmp_path, capsys,
                                                                    monkeypatch):
    """An empty or non-integer WORLD_SIZE / RANK used to end in a ValueError traceback from int()."""
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "0.png")
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    rc, rep, err = run(["upscale", str(d), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys, model=tiny_model)
    assert rc == 0 and len(rep["files"]) == 1 and rep["world_size"] == 1
    assert f"WORLD_SIZE={world!r} RANK={rank!r} are not integers" in err


def test_nan_input_pixel_fails_that_file_only(tiny_model, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    a = np.full((10, 12), 0.5, np.float32)
    a[4, 4] = np.nan
    Image.fromarray(a, mode="F").save(d / "nan.tif")
    random_png(d / "ok.png")
    rc, rep, _ = run(["upscale", str(d), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys, model=tiny_model)
    by = {Path(f["input"]).name: f for f in rep["files"]}
    assert rc == cli.EXIT_FAILED and by["ok.png"]["ok"]
    assert "nan.tif" in by["nan.tif"]["error"] and "NaN or Inf" in by["nan.tif"]["error"]
    assert not (tmp_path / "o" / "nan_x4.png").exists()


def test_non_finite_model_output_is_an_error_naming_file_and_tiles(tiny_dir, tmp_path, capsys):
    from tadisr_core.loading import load_tadisr

    model = load_tadisr(tiny_dir["kolors"], tiny_dir["checkpoint"], tiny_dir["prompt_cache"])
    with torch.no_grad():
        next(p for n, p in model.mi_decoder.named_parameters() if n.endswith("weight")).fill_(float("inf"))
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "sign.png")
    rc, rep, err = run(["upscale", str(d), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys, model=model)
    error = rep["files"][0]["error"]
    assert rc == cli.EXIT_FAILED and "sign.png" in error
    assert "model output of tiles 1-" in error and "non-finite" in error
    assert not (tmp_path / "o" / "sign_x4.png").exists()


def test_a_bad_color_fix_is_refused_before_any_tile(tiny_model):
    from tadisr_core.pipeline import upscale

    tiles = []
    with pytest.raises(ValueError, match=r"color_fix must be one of \('auto', 'none', 'wavelet'\), got 'bogus'"):
        upscale(tiny_model, torch.rand(1, 3, 16, 16), 4, tile=64, overlap=16, color_fix="bogus",
                progress=lambda done, total: tiles.append(done))
    assert tiles == []


def test_unwritable_output_folder_is_reported_before_loading(tmp_path, capsys, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    random_png(tmp_path / "a.png")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)  # as a read-only folder does (not for root)
    rc = cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: cannot write to the output folder {tmp_path / 'out'}: Permission denied\n"


def test_a_file_where_an_output_folder_must_be_is_one_line_for_every_command(tmp_path, capsys):
    """Defect: `make-tiny FILE/sub` (both entries) ended in a NotADirectoryError traceback, `upscale -o FILE/sub`
    and `tadisr_core.demo -o FILE/sub` said "cannot write ...: Not a directory". Now each says what
    `synthesize --out` and `train` say (files.folder_target_problem), exit 2, nothing written."""
    from tadisr_core import demo, testing

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    random_png(tmp_path / "a.png")
    for folder in (blocker / "tiny", blocker):
        said = (f"{folder} is a file; give a folder" if folder == blocker
                else f"{folder}: {blocker} is a file, not a folder")
        for entry in (cli.main, testing.main):
            assert entry(["make-tiny", str(folder)]) == 2
            assert capsys.readouterr().err == f"error: DIR {said}\n"
        assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(folder), "--model", "demo"]) == 2
        assert capsys.readouterr().err == f"error: -o {said}\n"
        with pytest.raises(SystemExit) as exit_:
            demo.main([str(tmp_path / "a.png"), "-o", str(folder)])
        assert exit_.value.code == 2 and capsys.readouterr().err == f"error: -o {said}\n"
    assert blocker.read_text() == "x"


def _nan_checkpoint(tiny_dir, tmp_path) -> Path:
    raw = torch.load(tiny_dir["official"], weights_only=True)
    key = next(iter(raw["state_dict_unet"]))
    raw["state_dict_unet"][key] = torch.full_like(raw["state_dict_unet"][key], float("nan"))
    torch.save(raw, tmp_path / "nan.pkl")
    return tmp_path / "nan.pkl"


def test_every_weight_file_problem_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys):
    random_png(tmp_path / "a.png")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_dir["checkpoint"].read_bytes()[:1000])
    cases = {
        "checkpoint given as --prompt-cache": ({"prompt_cache": tiny_dir["official"]}, "not a prompt cache"),
        "prompt cache given as --checkpoint": ({"checkpoint": tiny_dir["prompt_cache"]}, "it is a prompt cache"),
        "NaN weights": ({"checkpoint": _nan_checkpoint(tiny_dir, tmp_path)}, "contains NaN"),
        "hash-bomb pickle": ({"checkpoint": torch_zip(tmp_path / "dag.pkl", dag_key_pickle())}, "refused"),
        "a folder": ({"checkpoint": tmp_path}, "is a folder"),
        "truncated": ({"checkpoint": cut}, "truncated or corrupt"),
        "missing Kolors folder": ({"kolors": tmp_path / "nokolors"}, "nokolors"),
    }
    for name, (override, expected) in cases.items():
        files = {"kolors": tiny_dir["kolors"], "checkpoint": tiny_dir["checkpoint"],
                 "prompt_cache": tiny_dir["prompt_cache"], **override}
        rc = cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "-q",
                       "--kolors", str(files["kolors"]), "--checkpoint", str(files["checkpoint"]),
                       "--prompt-cache", str(files["prompt_cache"])])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (name, err)
    with pytest.raises(SystemExit) as e:
        cli.main(["prompt-cache", "--kolors", str(tiny_dir["kolors"]), "-o", str(tmp_path / "p.safetensors"),
                  "--time-ids", "nan", "768", "0", "0", "768", "768"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


def test_every_prompt_cache_problem_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, monkeypatch):
    """Devices are checked before ChatGLM3 loads; a damaged tokenizer or a truncated weights shard, and a
    sequence too short for the prompt, are one line naming the file or flag (they were tracebacks, and
    --tokens 0 wrote a cache that was not padded)."""
    import shutil

    from tadisr_core import prompt

    kolors = tmp_path / "kolors"
    shutil.copytree(tiny_dir["kolors"], kolors)
    real_load, loaded = prompt._load_chatglm, []
    monkeypatch.setattr(prompt, "_load_chatglm", lambda *a: loaded.append(a) or real_load(*a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["prompt-cache", "--kolors", str(kolors), "-o", str(tmp_path / "p.safetensors"), "--tokens", "32"]
    cases = [(["--device", "cuda"], "--device cuda: CUDA is not available"),
             (["--device", "gpu"], "--device gpu: not a device; use auto, cpu, cuda"),
             (["--tokens", "0"], "prompt of 9 tokens does not fit 0 (2 are special tokens); use a longer"),
             (["--tokens", "-4"], "prompt of 9 tokens does not fit -4")]
    for extra, message in cases:
        assert cli.main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
    assert not loaded and not (tmp_path / "p.safetensors").exists()
    tokenizer = kolors / "tokenizer" / "tokenizer.model"
    weights = kolors / "text_encoder" / "model.safetensors"
    damaged = [(tokenizer, 100, f"{tokenizer}: not a readable tokenizer"),  # a cut download
               (weights, 5000, f"{weights.parent}: ChatGLM3's weights are truncated or damaged")]
    for path, keep, message in damaged:
        whole = path.read_bytes()
        path.write_bytes(whole[:keep])
        assert cli.main(argv) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (path, err)
        path.write_bytes(whole)
    assert cli.main(argv) == 0 and (tmp_path / "p.safetensors").is_file()


def test_out_of_memory_gets_memory_advice_and_v_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """Defect: `prompt-cache` told an out-of-memory error to check the ChatGLM3 files, and had no -v; and
    the tracebacks that `upscale -v` promised were logged below the level -v set."""
    from tadisr_core import model_ref, prompt

    def raising(exc):
        def fail(*args, **kwargs):
            raise exc
        return fail

    argv = ["prompt-cache", "--kolors", str(tmp_path), "-o", str(tmp_path / "p.safetensors")]
    for exc in (torch.OutOfMemoryError("CPU out of memory"), MemoryError()):
        monkeypatch.setattr(prompt, "compute_prompt_cache_from_kolors", raising(exc))
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "out of memory computing the prompt cache on the CPU: ChatGLM3 in bf16 needs " \
            "about 12.5 GB of RAM" in err[0] and "--device cuda" in err[0] and "ChatGLM3 files" not in err[0], err
    monkeypatch.setattr(prompt, "compute_prompt_cache_from_kolors", raising(KeyError("odd")))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(KeyError: 'odd')" in err[0] and "run with -v for the traceback" in err[0]
    assert cli.main([*argv, "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: cannot compute the prompt cache")
    monkeypatch.setattr(model_ref, "load_model", raising(KeyError("odd")))
    argv = ["upscale", str(random_png(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--model", "demo"]
    assert cli.main(argv) == 2 and "Traceback" not in capsys.readouterr().err
    assert cli.main([*argv, "-v"]) == 2 and "KeyError: 'odd'" in capsys.readouterr().err.split("Traceback")[-1]


def test_sigterm_during_a_save_leaves_no_partial_files(tiny_model, tmp_path, capsys, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    random_png(d / "a.png")
    out = tmp_path / "out"
    real = images._write
    calls = []

    def write_then_terminate(image, path, *args):
        real(image, path, *args)
        calls.append(path)
        os.kill(os.getpid(), signal.SIGTERM)             # arrives between the SR image and the mask

    monkeypatch.setattr(images, "_write", write_then_terminate)
    with pytest.raises(cli.Terminated):  # which `main` reports as "terminated (SIGTERM)", not Ctrl-C's "aborted"
        run(["upscale", str(d), "-o", str(out), *FAST], capsys, model=tiny_model)
    assert calls and sorted(p.name for p in out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_outputs_have_normal_permissions(tiny_model, tmp_path, capsys):
    random_png(tmp_path / "a.png")
    rc, _, _ = run(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *FAST], capsys, model=tiny_model)
    mask = os.umask(0)
    os.umask(mask)
    assert rc == 0 and {p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()} == {0o666 & ~mask}


def test_sigterm_during_convert_leaves_no_temporary_file(tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def write_then_terminate(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_terminate)
    assert cli.main(["convert", str(tiny_dir["official"]), str(tmp_path / "n.safetensors")]) == cli.EXIT_CANCELLED
    assert list(tmp_path.iterdir()) == []


def test_folder_walks_name_what_they_leave_out(tiny_model, tmp_path, capsys):
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    random_png(d / "a.png")
    random_png(d / "sub" / "b.png")
    (d / "notes.txt").write_text("not an image")
    (d / "moved.png").symlink_to(tmp_path / "gone.png")  # defect: a link to nothing was left out unsaid
    rc, rep, err = run(["upscale", str(d), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys, model=tiny_model)
    assert rc == 0 and [Path(f["input"]).name for f in rep["files"]] == ["a.png"]
    assert "left out 1 file(s) that are not images we read (notes.txt)" in err
    assert "1 sub-folder(s) not searched; add --recursive" in err
    assert f"left out {d / 'moved.png'}: a link to {tmp_path / 'gone.png'}, which does not exist" in err


def test_inputs_without_any_image_are_a_setup_error_before_weights(tmp_path, capsys):
    only = tmp_path / "only"
    (only / "sub").mkdir(parents=True)
    random_png(only / "sub" / "a.png")
    rc = cli.main(["upscale", str(only), "-o", str(tmp_path / "o")])  # no weight flag either
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SETUP and f"nothing to upscale: no image files in {only}\n" in err
    assert "1 sub-folder(s) not searched; add --recursive" in err and "--model demo" not in err
    outputs = tmp_path / "outputs"  # defect: told to add --recursive, which finds nothing more here
    outputs.mkdir()
    random_png(outputs / "a_x4.png")
    assert cli.main(["upscale", str(outputs), "-o", str(tmp_path / "o")]) == cli.EXIT_SETUP
    err = capsys.readouterr().err
    assert "left out 1 file(s) named like outputs" in err and "name them explicitly" in err
    assert "--recursive" not in err
    assert not (tmp_path / "o").exists()


def test_bad_devices_and_an_output_that_is_a_file_are_named(tmp_path, capsys):
    random_png(tmp_path / "a.png")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    named = tmp_path / "result.png"  # defect: made a folder named result.png and wrote into it
    cases = [(["-o", str(blocker)], f"-o {blocker} is a file; give a folder"),
             (["-o", str(named)], f"-o {named} names a file, but -o is the output folder (NAME_x4.png is written "
                                  "into it): give a folder, or make this one first to use it"),
             (["-o", str(tmp_path / "o" / "x4"), "--device", "gpu"], "--device gpu: not a device; use auto, cpu"),
             (["-o", str(tmp_path / "o"), "--text-encoder-device", "bogus"],
              "--text-encoder-device bogus: not a device"),
             (["-o", str(tmp_path / "o"), "--device", "mps"], "--device mps: MPS (Apple GPUs) is not available")]
    for extra, message in cases:
        assert cli.main(["upscale", str(tmp_path / "a.png"), "--kolors", "k", "--checkpoint", "c", *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists() and not named.exists()
    named.mkdir()
    cli.ensure_writable_folder(named)  # a folder of that name made on purpose is taken


def test_a_nan_input_is_blamed_on_the_image_not_the_weights(tiny_model):
    from tadisr_core.finite import NonFiniteError
    from tadisr_core.pipeline import upscale

    image = torch.rand(1, 3, 16, 16)
    image[0, 1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"input image: 1 non-finite value\(s\) \(NaN/Inf\); the image holds NaN "
                                             r"or Inf pixels: fix or replace it$"):
        upscale(tiny_model, image, 4, tile=64, overlap=16)


def test_a_tile_batch_that_is_no_number_is_named(tiny_model):
    from tadisr_core.pipeline import upscale

    for bad in ("x", 0, -2):
        with pytest.raises(ValueError, match=re.escape(f"tile_batch must be >= 1 or 'auto', got {bad!r}")):
            upscale(tiny_model, torch.rand(1, 3, 16, 16), 4, tile=64, overlap=16, tile_batch=bad)


def test_sequential_offload_on_the_cpu_says_it_is_ignored(tiny_model, caplog):
    import logging

    from tadisr_core.devices import place_model

    with caplog.at_level(logging.WARNING, logger="tadisr"):
        place_model(tiny_model, "cpu", offload="sequential")
    assert "offload sequential has nothing to do on the CPU" in caplog.text


def test_the_staged_encode_blames_a_nan_input_on_the_image(tiny_model):
    from tadisr_core.finite import NonFiniteError
    from tadisr_core.pipeline import encode_tiles

    image = torch.rand(1, 3, 16, 16)
    image[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="input image: 1 non-finite value.*fix or replace it$"):
        encode_tiles(tiny_model, image, 4, tile=64, overlap=16)


def test_a_fractional_or_boolean_tile_batch_is_named(tiny_model):
    from tadisr_core.pipeline import upscale

    for bad in (2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"tile_batch must be >= 1 or 'auto', got {bad!r}")):
            upscale(tiny_model, torch.rand(1, 3, 16, 16), 4, tile=64, overlap=16, tile_batch=bad)


def test_a_mistyped_input_is_a_setup_error_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Defect: `upscale phto.png` loaded the model first, then failed the file (exit 1) and left `-o` behind."""
    def no_load(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", no_load)
    rc, _, err = run(["upscale", str(tmp_path / "phto.png"), "-o", str(tmp_path / "out"), "--model", "demo"], capsys)
    assert rc == cli.EXIT_SETUP and f"input not found: {tmp_path / 'phto.png'}" in err
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_while_the_model_loads_leaves_no_empty_output_folders(tmp_path, capsys, monkeypatch):
    """Review: Ctrl-C or SIGTERM while the model loaded left the output folders the run had made (a
    setup error removed them)."""
    def interrupted_load(args, prompt_once=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", interrupted_load)
    random_png(tmp_path / "a.png")
    with pytest.raises(KeyboardInterrupt):
        run(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out" / "sub"), "--model", "demo"], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher", [False, True], ids=["alone", "under a launcher"])
def test_sigterm_while_the_model_loads_says_it_was_terminated(tmp_path, capsys, monkeypatch, launcher):
    """Defect: SIGTERM during the load said "aborted", as Ctrl-C does; a launcher's process whose peer died
    (torchrun then terminates the others) did not say why it stopped."""
    def terminated_load(args, prompt_once=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the load")

    monkeypatch.setattr(cli, "load_model", terminated_load)
    if launcher:  # what the launcher's environment says; the run itself stays one process
        monkeypatch.setattr(batch, "distributed_rank", lambda: (1, 2))
    random_png(tmp_path / "a.png")
    assert cli.main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--model", "demo"]) == 130
    said = capsys.readouterr().err.splitlines()[-1]
    assert said == "terminated (SIGTERM)" + ("; a launcher sends it to every process when one of them fails: its "
                                             "report names which" if launcher else "")


def test_weight_variables_set_for_kolors_do_not_break_the_demo(tmp_path, monkeypatch):
    """Defect: with TADISR_CHECKPOINT set (for the real model) `--model demo` said "give either --model or
    --checkpoint", and TADISR_PROMPT_CACHE gave the demo Kolors' prompt cache."""
    monkeypatch.setenv("TADISR_CHECKPOINT", str(tmp_path / "tadisr_kolors_ftsr_526000.pkl"))
    monkeypatch.setenv("TADISR_PROMPT_CACHE", str(tmp_path / "kolors_prompt_cache.safetensors"))
    args = cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), "--model", "demo"])
    assert cli.load_model(args).spec.unet.block_out_channels[0] == 16          # the demo, with its own cache
    args = cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), "--model", "demo",
                                          "--checkpoint", "other.pkl"])
    with pytest.raises(cli.SetupError, match="either --model or --checkpoint"):
        cli.load_model(args)                                                   # given on the command line: refused


def test_the_command_line_wins_over_the_environment_and_two_given_models_conflict(tiny_dir, tmp_path, monkeypatch):
    """Defect: `--model demo --checkpoint X` ran the demo without a word when X equalled $TADISR_CHECKPOINT,
    and TADISR_MODEL with `--kolors K --checkpoint C` on the command line said "give either"."""
    def parse(*flags):
        return cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), *flags])

    checkpoint = str(tiny_dir["checkpoint"])
    monkeypatch.setenv("TADISR_CHECKPOINT", checkpoint)
    with pytest.raises(cli.SetupError, match="give either --model or --checkpoint, not both$"):
        cli.load_model(parse("--model", "demo", "--checkpoint", checkpoint))       # both on the command line
    monkeypatch.setenv("TADISR_MODEL", "demo")
    with pytest.raises(cli.SetupError, match="TADISR_MODEL and TADISR_CHECKPOINT are both set"):
        cli.load_model(parse())                                                    # both in the environment
    monkeypatch.delenv("TADISR_CHECKPOINT")
    model = cli.load_model(parse("--kolors", str(tiny_dir["kolors"]), "--checkpoint", checkpoint,
                                 "--prompt-cache", str(tiny_dir["prompt_cache"])))
    assert model.spec.unet.block_out_channels[0] == 8                              # the tiny Kolors model
    monkeypatch.setenv("TADISR_MODEL", "demoo")  # defect: reported as "--model demoo", a flag never typed
    with pytest.raises(cli.SetupError, match=r"^TADISR_MODEL \(environment\) demoo: no such file or folder"):
        cli.load_model(parse())
    with pytest.raises(cli.SetupError, match=r"^--model demoo: no such file or folder"):
        cli.load_model(parse("--model", "demoo"))


def test_a_missing_prompt_cache_for_a_model_that_runs_alone_names_its_own(tmp_path):
    """Defect: the advice was Kolors' `tadisr prompt-cache --kolors DIR -o NAME` (its folder dropped), for a
    model that takes only the cache it was trained with."""
    args = cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), "--model", "demo",
                                          "--prompt-cache", str(tmp_path / "none.safetensors")])
    with pytest.raises(cli.SetupError) as err:
        cli.load_model(args)
    message = str(err.value)
    assert str(tmp_path / "none.safetensors") in message and "trained with" in message
    assert "leave out --prompt-cache" in message and "--kolors" not in message


@pytest.mark.parametrize("config", ['{"model": {"kolors_dir": ', '{"model": null}', "[]"])
def test_a_damaged_run_config_is_named(tmp_path, config):
    """Defect: a truncated config.json gave a JSON error naming no file; `"model": null` a traceback."""
    from tadisr_core.model_ref import resolve_model

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_final.safetensors").write_bytes(resolve_model("demo").checkpoint.read_bytes())
    (run_dir / "config.json").write_text(config)
    args = cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), "--model", str(run_dir)])
    with pytest.raises(cli.SetupError, match=re.escape(str(run_dir / "config.json"))):
        cli.load_model(args)


@pytest.mark.parametrize("config", ['{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"}',
                                    '{"architectures": ["ChatGLMModel"], "model_type": "chatglm"}'])
def test_another_tools_config_beside_model_final_is_not_taken_for_a_run(tmp_path, config):
    """Defect: a folder holding model_final.safetensors and a diffusers or transformers config.json was taken
    for a training run, and refused ("no 'model' section"); it loads as it would without that file."""
    from tadisr_core.model_ref import RUN_CONFIG_SECTIONS, RUN_FINAL, RUN_PROMPT_CACHE, resolve_model
    from training.config import Config

    assert set(Config().to_dict()) == set(RUN_CONFIG_SECTIONS)                      # what a run's config.json holds
    demo, folder = resolve_model("demo"), tmp_path / "kept"
    folder.mkdir()
    (folder / RUN_FINAL).write_bytes(demo.checkpoint.read_bytes())
    (folder / RUN_PROMPT_CACHE).write_bytes(demo.prompt_cache.read_bytes())
    (folder / "config.json").write_text(config)
    for ref in (folder, folder / RUN_FINAL):
        files = resolve_model(ref)
        assert (files.checkpoint, files.prompt_cache, files.kolors) == (folder / RUN_FINAL, folder / RUN_PROMPT_CACHE,
                                                                        None)
    args = cli.build_parser().parse_args(["upscale", "x.png", "-o", str(tmp_path), "--model", str(folder)])
    assert cli.load_model(args).spec.unet.block_out_channels[0] == 16                  # the demo's weights


def test_a_per_file_error_keeps_the_type_name_only_for_unexpected_kinds():
    from tadisr_core.batch import _error_text

    assert _error_text(images.ImageReadError("cannot read x")) == "cannot read x"
    assert _error_text(ValueError("bad value")) == "bad value"
    assert _error_text(RuntimeError("CUDA error")) == "RuntimeError: CUDA error"


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-1", "0"])
def test_a_bad_max_pixels_variable_is_one_setup_error_before_any_image(value, tiny_model, tmp_path, capsys,
                                                                       monkeypatch):
    """It used to fail every image after the model loaded ('ImageReadError: ...', an OverflowError for inf,
    'above the limit of -1' for -1)."""
    random_png(tmp_path / "a.png")
    monkeypatch.setenv("TADISR_MAX_PIXELS", value)
    rc, rep, err = run(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *FAST, "--json"], capsys,
                       model=tiny_model)
    assert rc == cli.EXIT_SETUP and rep is None and not (tmp_path / "o").exists()
    assert err.strip() == (f"error: TADISR_MAX_PIXELS={value!r} (environment) is not a positive number of pixels; "
                           "unset it for the default of 64,000,000 or set e.g. 2e8")  # not "6e+07"


def test_a_prompt_cache_without_a_text_column_is_refused_with_attention_before_the_first_image(tiny_model_factory,
                                                                                                tmp_path, capsys):
    """Every image used to fail with the same "no column for the word 'text'" error."""
    from tadisr_core.model import random_prompt

    model = tiny_model_factory()
    model.set_prompt(random_prompt(model.spec, text_columns=()))
    random_png(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *FAST, "--json"]
    rc, rep, err = run([*argv, "--attention"], capsys, model=model)
    assert rc == cli.EXIT_SETUP and rep is None and not list((tmp_path / "o").glob("*"))
    assert err.strip() == ("error: the prompt cache has no column for the word 'text' (prompt "
                           f"{model.prompt.prompt!r}): --attention needs it; compute the prompt cache from "
                           "Kolors' ChatGLM3 with `tadisr prompt-cache --kolors DIR -o FILE`")
    rc, rep, _ = run(argv, capsys, model=model)  # without --attention this model reads no attention
    assert rc == 0 and rep["files"][0]["ok"]


def test_a_prompt_cache_naming_a_folder_is_refused_before_chatglm3_runs(tiny_model, tiny_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """It used to compute the cache (minutes with the real ChatGLM3), then fail renaming it onto the folder;
    `prompt-cache -o FOLDER --force` likewise ended in "cannot write ...: Is a directory"."""
    folder = tmp_path / "caches"
    folder.mkdir()
    random_png(tmp_path / "a.png")
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *FAST]
    rc, _, err = run([*argv, "--prompt-cache", str(folder)], capsys, model=tiny_model)
    assert rc == cli.EXIT_SETUP
    example = folder / "prompt.safetensors"
    assert err == f"error: --prompt-cache {folder} is a folder: give a file name, e.g. {example}\n"
    monkeypatch.setenv("TADISR_PROMPT_CACHE", str(folder))
    rc, _, err = run(argv, capsys, model=tiny_model)
    assert rc == cli.EXIT_SETUP and err.startswith(f"error: TADISR_PROMPT_CACHE (environment) {folder} is a folder")
    for force in ([], ["--force"]):
        rc = cli.main(["prompt-cache", "--kolors", str(tiny_dir["kolors"]), "-o", str(folder), "--tokens", "32",
                       *force])
        assert rc == cli.EXIT_SETUP and capsys.readouterr().err == (f"error: -o {folder} is a folder: give a file "
                                                                   f"name, e.g. {folder / 'prompt.safetensors'}\n")
    assert not any(folder.iterdir())
    blocker = tmp_path / "a.png"  # a file where the cache's folder must be: refused before ChatGLM3 too
    rc = cli.main(["prompt-cache", "--kolors", str(tiny_dir["kolors"]), "-o", str(blocker / "p.safetensors")])
    assert rc == cli.EXIT_SETUP
    assert capsys.readouterr().err == f"error: -o {blocker / 'p.safetensors'}: {blocker} is a file, not a folder\n"


def test_another_weights_file_given_as_the_checkpoint_says_which_flag_takes_it(tiny_dir, tmp_path, capsys):
    """A Kolors UNet / VAE or a prompt cache as --checkpoint or --model used to say only "not a native TADiSR
    checkpoint (metadata format='pt')"."""
    random_png(tmp_path / "a.png")
    kolors = tiny_dir["kolors"]
    argv = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "-q"]
    cases = [(["--kolors", str(kolors), "--prompt-cache", str(tiny_dir["prompt_cache"]), "--checkpoint"],
              kolors / "unet" / "diffusion_pytorch_model.safetensors", "(metadata format='pt'): it is a Kolors UNet; "
                                                                       "pass it as --unet"),
             (["--model"], kolors / "vae" / "diffusion_pytorch_model.safetensors",
              "(metadata format='pt'): it is an SDXL VAE; pass it as --vae"),
             (["--model"], tiny_dir["prompt_cache"],
              "(metadata format='tadisr-prompt-cache/1'): it is a prompt cache; pass it as --prompt-cache")]
    for flags, path, words in cases:
        assert cli.main([*argv, *flags, str(path)]) == cli.EXIT_SETUP
        assert capsys.readouterr().err == f"error: {path}: not a native TADiSR checkpoint {words}\n"


def test_a_missing_weight_file_names_the_variable_or_flag_that_gave_it(tiny_dir, tmp_path, capsys, monkeypatch):
    """TADISR_KOLORS / _CHECKPOINT / _UNET pointing nowhere were reported without the variable (TADISR_MODEL was),
    and a missing --unet file as "unet weights not found" without the flag."""
    random_png(tmp_path / "a.png")
    nope = tmp_path / "nope.safetensors"
    vae = tiny_dir["kolors"] / "vae" / "diffusion_pytorch_model.safetensors"
    base = ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "-q", "--prompt-cache",
            str(tiny_dir["prompt_cache"])]
    cases = [("TADISR_KOLORS", ["--checkpoint", str(tiny_dir["checkpoint"])],
              f"TADISR_KOLORS (environment): Kolors folder not found: {nope}"),
             ("TADISR_CHECKPOINT", ["--kolors", str(tiny_dir["kolors"])],
              f"TADISR_CHECKPOINT (environment): checkpoint not found: {nope}"),
             ("TADISR_UNET", ["--vae", str(vae), "--checkpoint", str(tiny_dir["checkpoint"])],
              f"TADISR_UNET (environment): unet weights not found: {nope}"),
             (None, ["--unet", str(nope), "--vae", str(vae), "--checkpoint", str(tiny_dir["checkpoint"])],
              f"--unet: unet weights not found: {nope}")]
    for var, flags, says in cases:
        for other in ("TADISR_KOLORS", "TADISR_KOLORS_DIR", "TADISR_CHECKPOINT", "TADISR_UNET", "TADISR_VAE",
                      "TADISR_MODEL"):
            monkeypatch.delenv(other, raising=False)
        if var:
            monkeypatch.setenv(var, str(nope))
        assert cli.main([*base, *flags]) == cli.EXIT_SETUP
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
