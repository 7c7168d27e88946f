"""`python -m tadisr_core upscale` end to end on the make-tiny weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tadisr_core import cli
from tadisr_core.batch import collect_inputs, plan_jobs
from tests.cli_runs import run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--tile", "64", "--overlap", "16", "--tile-batch", "2", "-q"]


def weights(tiny_dir) -> list[str]:
    return ["--kolors", str(tiny_dir["kolors"]), "--checkpoint", str(tiny_dir["checkpoint"]),
            "--prompt-cache", str(tiny_dir["prompt_cache"])]


@pytest.fixture
def inputs(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)).save(d / "odd.png")
    rgba = rng.integers(0, 256, (15, 20, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 20, dtype=np.uint8)[None, :]
    Image.fromarray(rgba).save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (12, 9), dtype=np.uint8)).save(d / "gray.jpg")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return d


def test_folder_end_to_end_with_a_corrupt_file(tiny_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["upscale", str(inputs), "-o", str(out), *weights(tiny_dir), *FAST,
                                  "--attention", "--json"], capsys)
    assert rc == cli.EXIT_FAILED                                  # one file failed ...
    report = json.loads(stdout)
    assert report["ok"] == 3 and report["failed"] == 1 and report["world_size"] == 1
    by_name = {Path(r["input"]).name: r for r in report["files"]}
    assert not by_name["corrupt.png"]["ok"] and "corrupt.png" in by_name["corrupt.png"]["error"]
    assert "corrupt.png" in stderr
    for name, (w, h) in {"odd": (37, 23), "alpha": (20, 15), "gray": (9, 12)}.items():
        rec = next(r for r in report["files"] if Path(r["input"]).stem == name)
        assert rec["ok"] and rec["input_size"] == [w, h] and rec["output_size"] == [4 * w, 4 * h]
        assert set(rec["seconds"]) == {"load", "upscale", "save", "total"} and rec["tiles"] >= 1
        sr, mask, att = (Image.open(out / f"{name}{suffix}.png") for suffix in ("_x4", "_text_mask", "_attention"))
        assert sr.size == mask.size == att.size == (4 * w, 4 * h)      # ... the rest succeeded, exact x4
        assert mask.mode == "L" and att.mode == "L"
    assert Image.open(out / "alpha_x4.png").mode == "RGBA"
    assert Image.open(out / "odd_x4.png").mode == "RGB"
    assert not any(out.glob("corrupt*")) and not any(out.glob(".*partial"))


def test_rgba_alpha_is_the_upscaled_input_alpha(tiny_model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = run_cli(["upscale", str(inputs / "alpha.png"), "-o", str(out), "--kolors", "x", "--checkpoint", "y",
                        *FAST], capsys, model=tiny_model)
    assert rc == 0
    src = torch.from_numpy(np.asarray(Image.open(inputs / "alpha.png"))[..., 3].astype(np.float32) / 255)
    ref = F.interpolate(src[None, None], size=(60, 80), mode="bicubic", align_corners=False).clamp(0, 1)
    got = np.asarray(Image.open(out / "alpha_x4.png"))[..., 3].astype(np.float32) / 255
    assert np.abs(got - ref[0, 0].numpy()).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_outputs_keep_the_printed_size_of_the_input(tiny_model, tmp_path, capsys, image_format):
    """Defect: a 300-dpi scan came out with no resolution (PNG) or at 72 dpi (JPEG): its 4x output printed 16x too
    large. Now image and mask carry 4 x the input's dpi; an input without one gives outputs without one."""
    from tadisr_core.images import read_image

    d = tmp_path / "in"
    d.mkdir()
    pixels = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels.save(d / "scan.png", dpi=(300, 300))
    pixels.save(d / "photo.jpg", dpi=(300, 150))
    pixels.save(d / "plain.png")
    out = tmp_path / "out"
    rc, _, _ = run_cli(["upscale", str(d), "-o", str(out), "--kolors", "x", "--checkpoint", "y", "--format",
                        image_format, *FAST], capsys, model=tiny_model)
    assert rc == 0
    for name, want in {"scan": (1200, 1200), "photo": (1200, 600)}.items():
        for path in (out / f"{name}_x4.{image_format}", out / f"{name}_text_mask.png"):
            with Image.open(path) as im:     # what other programs read:
                if path.suffix != ".webp":   # PNG pHYs, JPEG JFIF
                    assert im.info.get("dpi") == pytest.approx(want, abs=0.01), path
                if path.suffix != ".png":    # EXIF (all WebP has)
                    assert im.getexif().get(0x011A) == pytest.approx(want[0], abs=0.01), path
            assert read_image(path).dpi == pytest.approx(want, abs=0.01), path
    for path in (out / f"plain_x4.{image_format}", out / "plain_text_mask.png"):
        assert read_image(path).dpi is None
        with Image.open(path) as im:
            assert im.info.get("jfif_unit", 0) == 0 and 0x011A not in im.getexif()
            assert path.suffix != ".png" or "dpi" not in im.info   # (Pillow says 72 for any JPEG with EXIF)


@pytest.mark.parametrize("dtype, stored", [("fp32", "float32"), ("fp8_e4m3fn", "float8_e4m3fn")])
def test_the_json_report_names_the_dtype_the_weights_are_kept_in(tiny_dir, inputs, tmp_path, capsys, dtype, stored):
    """fp8 weights are read in bf16: the report said "bfloat16" for an fp8 run."""
    rc, stdout, _ = run_cli(["upscale", str(inputs / "odd.png"), "-o", str(tmp_path / "out"), *weights(tiny_dir),
                             *FAST, "--dtype", dtype, "--json"], capsys)
    assert rc == 0 and json.loads(stdout)["dtype"] == stored


def test_module_entry_point_with_scale_2(tiny_dir, inputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tadisr_core", "upscale", str(inputs / "odd.png"), "-o", str(out),
                           *weights(tiny_dir), *FAST, "--scale", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"][0]["output_size"] == [74, 46]
    assert Image.open(out / "odd_x2.png").size == (74, 46)
    assert Image.open(out / "odd_text_mask.png").size == (74, 46)


def test_missing_weights_name_the_file_and_where_to_get_it(tiny_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["upscale", str(inputs / "odd.png"), "-o", str(out), *FAST]
    rc = cli.main(args + ["--kolors", str(tmp_path / "nope"), "--checkpoint", str(tiny_dir["checkpoint"])])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SETUP and str(tmp_path / "nope") in err and "Kolors" in err
    missing = tmp_path / "tadisr_kolors_ftsr_526000.pkl"
    rc = cli.main(args + ["--kolors", str(tiny_dir["kolors"]), "--checkpoint", str(missing)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SETUP and str(missing) in err and "huqiming513/TADiSR-Models" in err
    rc = cli.main(args + ["--kolors", str(tiny_dir["kolors"])])
    assert rc == cli.EXIT_SETUP and "--checkpoint" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_prompt_cache_with_no_chatglm3_leads_with_the_cache_file(tiny_dir, inputs, tmp_path, capsys,
                                                                          monkeypatch):
    """It used to name only the Kolors folder's missing text_encoder/config.json, neither the cache nor a flag.
    A cache named by TADISR_PROMPT_CACHE is to be fixed there, not by a --prompt-cache the user never gave."""
    kolors = tmp_path / "k2"
    kolors.mkdir()
    for sub in ("unet", "vae", "scheduler"):
        (kolors / sub).symlink_to(tiny_dir["kolors"] / sub)
    cache = tmp_path / "typo.safetensors"
    args = ["upscale", str(inputs / "odd.png"), "-o", str(tmp_path / "out"), *FAST, "--kolors", str(kolors),
            "--checkpoint", str(tiny_dir["checkpoint"])]
    no_chatglm3 = f"DIR|FILE to compute it (ChatGLM3: {kolors / 'text_encoder' / 'config.json'} is missing"
    rc = cli.main(args + ["--prompt-cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SETUP and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: prompt cache not found: {cache}; fix --prompt-cache, or pass --text-encoder "
                          + no_chatglm3)
    monkeypatch.setenv("TADISR_PROMPT_CACHE", str(cache))
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == cli.EXIT_SETUP and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: TADISR_PROMPT_CACHE (environment): prompt cache not found: {cache}; fix "
                          f"TADISR_PROMPT_CACHE (environment), or pass --text-encoder " + no_chatglm3)


def test_cancel_between_tiles_writes_nothing_partial(tiny_model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    checks = {"n": 0}

    def cancel() -> bool:         # 4 tile batches go by (alpha.png: 2 batches, gray.jpg: 1, ...), then stop
        checks["n"] += 1
        return checks["n"] > 4

    rc, _, stderr = run_cli(["upscale", str(inputs / "alpha.png"), str(inputs / "gray.jpg"), str(inputs / "odd.png"),
                             "-o", str(out), "--kolors", "x", "--checkpoint", "y", *FAST], capsys,
                            cancel=cancel, model=tiny_model)
    assert rc == cli.EXIT_CANCELLED and "cancelled during" in stderr and "odd.png" in stderr
    assert "The same command with --skip-existing goes on from it" in stderr  # review: a plain re-run redid all
    written = sorted(p.name for p in out.iterdir())
    assert written == ["alpha_text_mask.png", "alpha_x4.png", "gray_text_mask.png", "gray_x4.png"]
    assert checks["n"] == 5                              # stopped at the first check after the request


def test_output_names_and_skip_existing(tiny_model, inputs, tmp_path, capsys):
    Image.open(inputs / "odd.png").save(inputs / "odd.jpg")
    jobs = plan_jobs(collect_inputs([inputs / "odd.png", inputs / "odd.jpg"]), tmp_path / "o", 2.5)
    assert [j.image.name for j in jobs] == ["odd_x2.5.png", "odd-2_x2.5.png"]
    assert [j.mask.name for j in jobs] == ["odd_text_mask.png", "odd-2_text_mask.png"]
    missing = collect_inputs([tmp_path / "nothing.png"])
    assert missing[0][2] and "not found" in missing[0][2]

    out = tmp_path / "out"
    argv = ["upscale", str(inputs / "gray.jpg"), "-o", str(out), "--kolors", "x", "--checkpoint", "y", *FAST,
            "--json", "--skip-existing"]
    assert run_cli(argv, capsys, model=tiny_model)[0] == 0
    rc, stdout, _ = run_cli(argv, capsys, model=tiny_model)
    assert rc == 0 and json.loads(stdout)["files"][0]["skipped"] is True


def test_bad_arguments_exit_2(capsys, tmp_path):
    for extra, says in ((["--tile", "60"], "--tile must be a multiple of 8 between 64 and 4096, got 60"),
                        # the nodes' tile limit holds on the command line too (it once let 4104 through)
                        (["--tile", "4104"], "--tile must be a multiple of 8 between 64 and 4096, got 4104"),
                        (["--tile", "64", "--overlap", "64"], "--overlap must be at least 0 and smaller than tile"),
                        # only --tile given: the overlap is the default (defect: blamed a flag never typed)
                        (["--tile", "128"], "--overlap must be at least 0 and smaller than tile (128), got 256 "
                                            "(the default --overlap): give a smaller one with --tile 128, e.g. "
                                            "--overlap 32")):
        assert cli.main(["upscale", "x.png", "-o", str(tmp_path), "--kolors", "k", "--checkpoint", "c", *extra]) == 2
        assert f"error: {says}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["upscale", "x.png", "-o", str(tmp_path), "--scale", "9"])
    with pytest.raises(SystemExit):
        cli.main(["upscale", "x.png", "-o", str(tmp_path), "--tile-batch", "0"])


def test_a_scale_that_is_no_number_names_no_python_function(tmp_path, capsys):
    """It used to say "argument --scale: invalid _scale value: 'abc'"."""
    with pytest.raises(SystemExit):
        cli.main(["upscale", "x.png", "-o", str(tmp_path), "--scale", "abc"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(" error: argument --scale: expected a number, got 'abc'"), last


def test_prompt_cache_command_writes_a_loadable_cache(tiny_dir, tmp_path, capsys):
    from tadisr_core.prompt import PromptCache

    out = tmp_path / "cache.safetensors"
    argv = ["prompt-cache", "--kolors", str(tiny_dir["kolors"]), "-o", str(out), "--tokens", "32", "--dtype", "fp32"]
    assert cli.main(argv) == 0
    cache = PromptCache.load(out)
    assert cache.text_columns == (31,)
    assert torch.equal(cache.prompt_embeds, PromptCache.load(tiny_dir["prompt_cache"]).prompt_embeds)
    assert cli.main(argv) == 2 and "pass --force" in capsys.readouterr().err
    assert cli.main(["prompt-cache", "--kolors", str(tmp_path / "none"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert (f"error: ChatGLM3 not found: {tmp_path / 'none'} (give a Kolors folder, its text_encoder folder, a "
            "ChatGLM3 folder or a ChatGLM3 .safetensors file)") in capsys.readouterr().err  # was "Kolors folder"
    single = tmp_path / "LLM" / "chatglm3-fp16.safetensors"  # the Kolors node packs' single file
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", single.parent)
    shutil.copy(tiny_dir["kolors"] / "text_encoder" / "model.safetensors", single)
    argv[2], argv[4] = str(single), str(tmp_path / "from_file.safetensors")
    assert cli.main(argv) == 0
    assert torch.equal(PromptCache.load(argv[4]).prompt_embeds, cache.prompt_embeds)
    (single.parent / "tokenizer.model").unlink()
    assert cli.main(argv[:5] + ["--force"]) == 2
    assert "chatglm3-fp16.safetensors is a ChatGLM3 weights file without its tokenizer" in capsys.readouterr().err


def test_no_mask_writes_the_same_image_and_no_mask(tiny_model, inputs, tmp_path, capsys):
    both, alone = tmp_path / "both", tmp_path / "alone"
    for out, extra in ((both, []), (alone, ["--no-mask"])):
        argv = ["upscale", str(inputs / "odd.png"), "-o", str(out), "--kolors", "x", "--checkpoint", "y", *FAST,
                *extra]
        assert run_cli(argv, capsys, model=tiny_model)[0] == 0
    assert sorted(p.name for p in both.iterdir()) == ["odd_text_mask.png", "odd_x4.png"]
    assert sorted(p.name for p in alone.iterdir()) == ["odd_x4.png"]
    assert (both / "odd_x4.png").read_bytes() == (alone / "odd_x4.png").read_bytes()
    assert cli.build_parser().parse_args(["upscale", "a.png", "-o", "o"]).merge_lora is True
    assert cli.build_parser().parse_args(["upscale", "a.png", "-o", "o", "--no-merge-lora"]).merge_lora is False
