"""Training survives damaged data (issue 13): bad samples skipped, counted and logged (also by two
processes and across a resume), masks read by their levels, data that cannot make a batch stopped with a
one-line message (after saving the steps trained), data folders checked before the model is built."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_training import TINY, clean_triplets, damaged_triplets, lean_cfg, run, train_lines


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, capsys):
    data = damaged_triplets(tmp_path / "data")
    summary = run(lean_cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), train__max_steps=4,
                           train__checkpoint_every=4))
    assert summary["step"] == 4
    bad = train_lines(tmp_path / "run", "bad_sample")
    assert bad and all(("1.png" in b["sample"]) or ("2.png" in b["sample"]) for b in bad)
    assert train_lines(tmp_path / "run")[-1]["bad_samples"] == len(bad)
    assert "skipped a damaged sample" in capsys.readouterr().err


def test_a_damaged_sample_counts_once_whatever_the_epochs(tmp_path, capsys):
    """Three epochs (the last two after a resume) meet the same two damaged samples: they are logged
    once, the resume names them as still damaged, a count of 2 throughout the resumed steps, and no
    abort at train.max_bad_samples = 2."""
    data = damaged_triplets(tmp_path / "data")
    out = tmp_path / "run"

    def cfg(steps):
        return lean_cfg(out, data__kind="triplets", data__root=str(data), train__max_steps=steps,
                    train__batch_size=2, train__max_bad_samples=2, train__checkpoint_every=100)

    assert run(cfg(2))["step"] == 2  # one epoch: 4 samples at batch 2
    capsys.readouterr()
    assert run(cfg(6), resume=True)["step"] == 6
    bad = train_lines(out, "bad_sample")
    assert sorted(b["sample"].split(" (")[0] for b in bad) == ["sample 1", "sample 2"]
    assert all(b["step"] <= 2 for b in bad)
    assert [r["bad_samples"] for r in train_lines(out)[2:]] == [2] * 4
    said = capsys.readouterr()
    still = [ln for ln in (said.out + said.err).splitlines() if "still damaged" in ln]
    assert sorted(ln.split(": ", 2)[2].split(" (")[0] for ln in still) == ["sample 1", "sample 2"]


def test_the_damaged_samples_carry_over_a_resume(tmp_path, capsys):
    """Defect: a resume counted damaged samples from zero, so a run resumed often (preempted) never met
    train.max_bad_samples, and its step records showed only the segment's count. The checkpoint's list
    is carried over: one damaged sample before the resume and another after it make 2, past a limit
    of 1; the one met before is not logged again, and one fixed meanwhile no longer counts."""
    from training.builders import StepBatchSampler
    from training.train import TrainingAborted

    data = clean_triplets(tmp_path / "data", 6)
    perm = StepBatchSampler(6, 1, seed=0)._perm(0)  # epoch 0's order at batch 1: step k trains perm[k - 1]
    first = perm[0]  # its replacement (the next index) is met in step 1 too: the second must be neither
    second = next(i for i in perm[3:] if i not in (first, (first + 1) % 6) and (i + 1) % 6 != first)
    for i in (first, second):
        (data / "hr" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    out = tmp_path / "run"

    def cfg(steps):
        return lean_cfg(out, data__kind="triplets", data__root=str(data), train__max_steps=steps,
                    train__max_bad_samples=1, train__checkpoint_every=100)

    assert run(cfg(2))["step"] == 2
    with pytest.raises(TrainingAborted, match=r"aborting at step \d: 2 damaged samples were skipped"):
        run(cfg(6), resume=True)
    bad = train_lines(out, "bad_sample")
    assert [b["sample"].split(" (")[0] for b in bad] == [f"sample {first}", f"sample {second}"]
    assert train_lines(out)[2]["bad_samples"] == 1  # step 3, after the resume: the run's count, not the segment's
    capsys.readouterr()
    clean_triplets(tmp_path / "fixed", 6)
    (tmp_path / "fixed" / "hr" / f"{first}.png").replace(data / "hr" / f"{first}.png")
    assert run(cfg(6), resume=True)["step"] == 6  # the fixed one no longer counts
    said = capsys.readouterr()
    assert f"sample {second} (" in said.err and f"sample {first} (" not in said.out + said.err
    bad = train_lines(out, "bad_sample")
    assert [b["sample"].split(" (")[0] for b in bad] == [f"sample {first}", f"sample {second}"]
    assert train_lines(out)[-1]["bad_samples"] == 1


def test_too_many_bad_samples_abort_with_a_checkpoint(tmp_path):
    from training.train import TrainingAborted
    from training.train_state import latest_checkpoint

    data = damaged_triplets(tmp_path / "data")
    cfg = lean_cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), train__max_steps=4,
               train__max_bad_samples=0, train__checkpoint_every=100)
    with pytest.raises(TrainingAborted, match=r"damaged samples were skipped \(train\.max_bad_samples = 0\)"):
        run(cfg)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    # as the message says: resumed with the samples still damaged, it stops again; fixed, it goes on
    # (defect: the count restored from the checkpoint aborted the fixed run at once, listing nothing)
    with pytest.raises(TrainingAborted, match="damaged samples were skipped"):
        run(cfg, resume=True)
    clean_triplets(tmp_path / "fixed", 4)
    for sub in ("hr", "mask"):
        for name in ("1.png", "2.png"):
            (tmp_path / "fixed" / sub / name).replace(data / sub / name)
    assert run(cfg, resume=True)["step"] == 4


def test_training_masks_are_read_by_the_one_reader(tmp_path):
    from training.data.synthesis import load_mask, load_rgb

    rng = np.random.default_rng(0)
    opaque = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    for mode, arr in (("RGB", rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)), ("RGBA", opaque)):
        Image.fromarray(arr).save(tmp_path / f"{mode}.png")
        with Image.open(tmp_path / f"{mode}.png") as im:      # 8-bit masks: exactly PIL's "L" conversion
            assert (load_mask(tmp_path / f"{mode}.png") == (np.asarray(im.convert("L")) > 127)).all()
    # text drawn as opacity (defect: black or white colour under it read as no text, or all text)
    alpha = np.zeros((9, 7), np.uint8)
    alpha[2:5, 1:6] = 255
    for colour in (0, 255):
        rgba = np.dstack([np.full((9, 7, 3), colour, np.uint8), alpha])
        Image.fromarray(rgba).save(tmp_path / "alpha.png")
        Image.fromarray(np.dstack([np.full((9, 7), colour, np.uint8), alpha])).save(tmp_path / "la.png")
        for name in ("alpha.png", "la.png"):
            assert (load_mask(tmp_path / name) == (alpha > 0)).all(), (name, colour)
    # a black-and-white mask with a transparent margin, or one pixel not quite opaque, is still its colours
    ink = np.zeros((9, 7), np.uint8)
    ink[3:6, 2:5] = 255
    for a in (np.pad(np.full((7, 5), 255, np.uint8), 1), np.where(np.eye(9, 7) > 0, 254, 255).astype(np.uint8)):
        Image.fromarray(np.dstack([ink, ink, ink, a])).save(tmp_path / "bw.png")
        assert (load_mask(tmp_path / "bw.png") == ((ink > 0) & (a > 127))).all()
    a16 = np.arange(63, dtype=np.uint16).reshape(9, 7) * 1000
    Image.fromarray(a16).save(tmp_path / "m16.png")            # 16-bit: no longer all white
    assert (load_mask(tmp_path / "m16.png") == (np.round(a16 / 65535 * 255) > 127)).all()
    assert (load_rgb(tmp_path / "m16.png")[..., 0] == np.round(a16 / 65535 * 255)).all()


def test_class_index_masks_are_read_by_their_index(tmp_path):
    """Defect: a palette mask whose text class is a dark or coloured entry (VOC: index 1 = (128, 0, 0)),
    or a 16-bit mask storing 0/1, was read as no text at all. Every other kind still reads as before."""
    from training.data.synthesis import load_mask

    m = np.zeros((12, 10), np.uint8)
    m[3:8, 2:7] = 1
    text = m.astype(bool)

    def palette(colours):
        im = Image.fromarray(m, "P")
        if colours is not None:
            im.putpalette(colours + [0] * (768 - len(colours)))
        return im

    masks = {
        "P_voc.png": palette([0, 0, 0, 128, 0, 0]), "P_green.png": palette([0, 0, 0, 0, 128, 0]),
        "P_white.png": palette([0, 0, 0, 255, 255, 255]), "P_unset.png": palette(None),
        "P_white_first.png": Image.fromarray(1 - m, "P"),  # white at index 0: read by its colours
        "I16_0_1.png": Image.fromarray(m.astype(np.uint16)),
        "I16_0_65535.png": Image.fromarray(m.astype(np.uint16) * 65535),
        "L_0_255.png": Image.fromarray(m * 255), "L_0_1.png": Image.fromarray(m),
        "mode1.png": Image.fromarray(m * 255).convert("1"),
        "RGB.png": Image.fromarray(np.dstack([m * 255] * 3)),
        "RGBA.png": Image.fromarray(np.dstack([m * 255] * 3 + [np.full_like(m, 255)])),
        "mask.jpg": Image.fromarray(m * 255),
    }
    masks["P_white_first.png"].putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    for name, im in masks.items():
        im.save(tmp_path / name)
        assert (load_mask(tmp_path / name) == text).all(), name
    assert (load_mask(tmp_path / "P_voc.png", (20, 24)) == text.repeat(2, 0).repeat(2, 1)).all()


def test_an_antialiased_mask_saved_as_a_gray_palette_is_read_by_its_levels(tmp_path):
    """Defect: reading palette masks by index made the faint edges of an antialiased mask saved as a gray
    palette image (Pillow's convert("P"), PNG optimisers) text; such a file reads as its levels do."""
    from training.data.synthesis import load_mask

    levels = np.array([[0, 30, 255, 100, 200, 0]], np.uint8)
    Image.fromarray(levels, "L").convert("P").save(tmp_path / "gray_palette.png")
    Image.fromarray(levels, "L").save(tmp_path / "gray.png")
    assert load_mask(tmp_path / "gray_palette.png").tolist() == [[False, False, True, False, True, False]]
    assert load_mask(tmp_path / "gray.png").tolist() == load_mask(tmp_path / "gray_palette.png").tolist()


def test_data_problems_are_one_line_setup_errors_found_before_the_model(tmp_path, capsys, monkeypatch):
    """A background folder with no image, a dataset smaller than one batch, a damaged init
    checkpoint: `error: ...` naming what to fix, exit 2, no traceback; the data folders are read
    before the model is built."""
    from training import builders
    from training.train import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    built = []
    real_build = builders.build_model_from_config
    monkeypatch.setattr(builders, "build_model_from_config", lambda *a, **k: built.append(1) or real_build(*a, **k))
    cases = [(["data.backgrounds=" + json.dumps(str(empty))], f"no background images in {empty} (data.backgrounds)",
              False),
             (["train.batch_size=4", "data.length=3"], "the training set has 3 items (data.length), fewer than one "
              "global batch: train.batch_size 4 x 1 processes; give more items or a smaller train.batch_size", False),
             (["model.init_checkpoint=" + json.dumps(str(bad))], str(bad), True)]
    for k, (sets, words, model_built) in enumerate(cases):
        built.clear()
        argv = ["--config", str(TINY), "--output-dir", str(tmp_path / f"run{k}")]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
        assert bool(built) == model_built, words


@pytest.mark.parametrize("workers", [0, 2])
def test_data_broken_in_the_loop_is_a_short_message_exit_1(tmp_path, capsys, workers):
    """Data found broken once training runs (every file damaged; whole images of different sizes
    batched with data.crop null): `error: training data: ...` naming it and what to change, on a line
    of its own (not after the progress bar), exit 1, no traceback, also when a DataLoader worker finds it."""
    from training.train import main

    broken = damaged_triplets(tmp_path / "broken")
    for f in (broken / "hr").iterdir():
        f.write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    sizes = tmp_path / "sizes"
    rng = np.random.default_rng(1)
    for sub in ("hr", "mask"):
        (sizes / sub).mkdir(parents=True)
    for i, side in enumerate((64, 96)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(sizes / "hr" / f"{i}.png")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(sizes / "mask" / f"{i}.png")
    cases = [(broken, ["data.crop=64"], "16 samples in a row could not be loaded; the data is broken"),
             (sizes, ["data.crop=null", "train.batch_size=2"],
              "one batch holds images of different sizes (64x64: 0; 96x96: 1): with data.crop null every "
              "image must have the same size; set data.crop, or train.batch_size: 1")]
    for k, (root, sets, words) in enumerate(cases):
        argv = ["--config", str(TINY), "--output-dir", str(tmp_path / f"run{k}"), "--set", "data.kind=\"triplets\"",
                "--set", f"data.root={json.dumps(str(root))}", "--set", f"train.num_workers={workers}",
                "--set", "loss.lpips_net=\"none\"", "--set", "loss.lpips=0", "--set", "train.validate_every=0"]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"\nerror: training data: {words}" in err and "Traceback" not in err, err


def test_data_broken_after_some_steps_saves_them_first(tmp_path, capsys, monkeypatch):
    """Every file damaged after step 1 (a drive gone): the step is saved before the one-line stop."""
    from training.train import Trainer, main
    from training.train_state import latest_checkpoint

    data = damaged_triplets(tmp_path / "data")
    real_step = Trainer.train_step

    def step_then_damage(self, batches):
        record = real_step(self, batches)
        for f in (data / "hr").iterdir():
            f.write_bytes(b"\x89PNG\r\n\x1a\n torn download")
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_damage)
    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--output-dir", str(out), "--set", "data.kind=\"triplets\"",
            "--set", f"data.root={json.dumps(str(data))}", "--set", "data.crop=64", "--set", "train.max_steps=4",
            "--set", "train.checkpoint_every=100", "--set", "loss.lpips_net=\"none\"", "--set", "loss.lpips=0",
            "--set", "train.validate_every=0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: training data: 16 samples in a row could not be loaded" in err and "Traceback" not in err
    assert f"stopped at step 1; the last checkpoint is {out / 'checkpoints' / 'step_00000001'}: once the data " \
        "is fixed, continue with --resume" in err
    assert latest_checkpoint(out / "checkpoints").name == "step_00000001"


def _launch_two_processes(out: Path, data: Path, *sets: str):
    """`accelerate launch` of the tiny config as two gloo processes on `data` (triplets), `sets` added."""
    from tests.processes import train_on_two_processes

    args = ["--config", str(TINY), "--output-dir", str(out)]
    for s in ("data.kind=\"triplets\"", f"data.root={json.dumps(str(data))}", "train.num_workers=0",
              "loss.lpips_net=\"none\"", "loss.lpips=0", "train.validate_every=0", *sets):
        args += ["--set", s]
    return train_on_two_processes(args)


def _first_epoch(n: int, batch: int) -> list[list[int]]:
    """Each of two ranks' sample indices in epoch 0 (seed 0), in the order they are trained."""
    from training.builders import StepBatchSampler

    perm = StepBatchSampler(n, batch, world=2, rank=0, seed=0)._perm(0)
    return [[i for k in range(0, n, 2 * batch) for i in perm[k + r * batch: k + (r + 1) * batch]] for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_count_a_damaged_sample_once_and_stop_together_on_broken_data(tmp_path):
    """Two processes, one launch; only rank 1 meets the damage. At step 1 its first sample is a torn file:
    the main process logs it (it used to log only its own), the count in the step record and in the
    checkpoint is the run's, and it is said once. At step 2 only rank 1's batch mixes image sizes: both
    stop at once (none waits in a collective for the other), the step trained is saved, and the message
    names the images, once."""
    from training.train_state import latest_checkpoint

    ranks = _first_epoch(8, 2)
    damaged, (a, b) = ranks[1][0], ranks[1][2:4]   # rank 1's first sample, and its batch of step 2
    assert b not in (damaged, (damaged + 1) % 8)   # the damaged sample's replacement (the next index) fits
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for sub in ("hr", "mask"):
        (data / sub).mkdir(parents=True)
    for i in range(8):
        side = 96 if i == b else 64
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(data / "hr" / f"{i}.png")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(data / "mask" / f"{i}.png")
    (data / "hr" / f"{damaged}.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    out = tmp_path / "run"
    proc = _launch_two_processes(out, data, "data.crop=null", "train.batch_size=2", "train.max_steps=4",
                                 "train.checkpoint_every=100")
    assert proc.returncode != 0
    (bad,) = train_lines(out, "bad_sample")
    assert bad["step"] == 1 and f"hr/{damaged}.png" in bad["sample"]
    assert [r["bad_samples"] for r in train_lines(out)] == [1]
    assert proc.stderr.count("warning: skipped a damaged sample:") == 1
    words = (f"error: training data: one batch holds images of different sizes (64x64: {a}; 96x96: {b}): with "
             "data.crop null every image must have the same size")
    assert proc.stderr.count(words) == 1, proc.stderr[-4000:]
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr)  # rank 0 used to die in the step's all-reduce
    assert f"stopped at step 1; the last checkpoint is {out / 'checkpoints' / 'step_00000001'}" in proc.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step_00000001"
    state = torch.load(out / "checkpoints" / "step_00000001" / "state.pt", weights_only=False)
    assert state["bad_samples"] == 1 and state["bad_sample_list"] == [bad["sample"]]


def test_a_run_with_loader_workers_that_stops_on_broken_data_exits(tmp_path):
    """Defect: with train.num_workers > 0 (the Kolors configs use 4) a run that stopped on broken data
    printed its message and then never exited: the workers ignore SIGTERM, and Python's exit handlers
    terminate, then join them without a timeout."""
    import subprocess
    import sys

    broken = damaged_triplets(tmp_path / "broken")
    for f in (broken / "hr").iterdir():
        f.write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    argv = [sys.executable, "-m", "training.train", "--config", str(TINY), "--output-dir", str(tmp_path / "run"),
            "--set", "data.kind=\"triplets\"", "--set", f"data.root={json.dumps(str(broken))}",
            "--set", "data.crop=64", "--set", "train.num_workers=2", "--set", "loss.lpips_net=\"none\"",
            "--set", "loss.lpips=0", "--set", "train.validate_every=0"]
    done = subprocess.run(argv, cwd=TINY.parents[2], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "error: training data: 16 samples in a row" in done.stderr, done.stderr[-2000:]


def test_a_run_trains_and_validates_on_the_authors_ftsr_layout(tmp_path):
    """gt/, sr_bicubic/ (the LR already upscaled to the HR size: the model's input as it is), mask/."""
    from tadisr_core.pipeline import upscale_canvas

    root = clean_triplets(tmp_path / "ftsr", 2)
    (root / "hr").rename(root / "gt")
    (root / "sr_bicubic").mkdir()
    for f in (root / "lr").iterdir():
        lr = torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)[None].float() / 255
        up = (upscale_canvas(lr, 4)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(up).save(root / "sr_bicubic" / f.name)
        f.unlink()
    (root / "lr").rmdir()
    out = tmp_path / "run"
    summary = run(lean_cfg(out, data__kind="triplets", data__root=str(root), data__hr_dir="gt",
                        data__lr_dir="sr_bicubic", data__crop=32, data__val_root=str(root), train__validate_every=2,
                        train__checkpoint_every=2))
    assert summary["step"] == 2 and train_lines(out, "bad_sample") == []
    val = train_lines(out, "val")
    assert len(val) == 1 and math.isfinite(val[0]["psnr"])


def test_validation_asked_for_without_validation_data_is_said(tmp_path, capsys):
    """Defect: train.validate_every > 0 on folders without data.val_root validated nothing, silently."""
    data = clean_triplets(tmp_path / "data", 2)
    run(lean_cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), data__crop=32, train__validate_every=1,
              train__max_steps=1))
    out = capsys.readouterr()
    assert ("warning: train.validate_every = 1, but there is no validation data (data.val_root and data.val_size "
            "give it): no validation will run") in out.out + out.err
    assert train_lines(tmp_path / "run", "val") == []


def test_data_folders_and_a_broken_yaml_are_named_in_one_line(tmp_path, capsys):
    """Defects: a missing data.backgrounds / data.fonts folder or a font folder without fonts did not name
    the config key; a config that is no YAML printed PyYAML's multi-line excerpt instead of file:line:col."""
    from training.train import main

    empty = tmp_path / "empty"
    empty.mkdir()
    gone = tmp_path / "gone"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  seed: [1, 2\nloss:\n  lpips: 0\n")
    cases = [(str(TINY), ["data.backgrounds=" + json.dumps(str(gone))],
              f"error: image folder not found: {gone} (data.backgrounds)"),
             (str(TINY), ["data.fonts=" + json.dumps(str(gone))], f"error: font folder not found: {gone} (data.fonts)"),
             (str(TINY), ["data.fonts=" + json.dumps(str(empty))],
              "error: no text source: no fonts (install fonts-dejavu / fonts-noto-cjk, or give a font folder) and "
              "no text crops (data.fonts, data.text_crops)"),
             (str(bad), [], f"error: {bad}:4:5: not valid YAML (expected ',' or ']', but got ':')")]
    for k, (config, sets, line) in enumerate(cases):
        argv = ["--config", config, "--output-dir", str(tmp_path / f"run{k}")]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 2
        assert capsys.readouterr().err == line + "\n"
