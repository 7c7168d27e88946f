"""Training survives damage (issue 13): bad samples, torn metrics, a truncated newest checkpoint, a used
output folder, a changed config on resume, out-of-range config values."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tadisr_core.checkpoint import load_checkpoint
from training.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


def _cfg(out: Path, **extra):
    over = {"train.output_dir": str(out), "loss.lpips_net": "none", "loss.lpips": 0, "train.validate_every": 0,
            "train.checkpoint_every": 1, "train.keep_checkpoints": 0, "train.max_steps": 2}
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return load_config(TINY, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def _run(cfg, **kw) -> dict:
    from training.train import Trainer

    return Trainer(cfg, **kw).run()


def _lines(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _clean_triplets(root: Path, count: int, seed: int = 0) -> Path:
    """`count` whole hr / lr / mask triplets of 64 px random images."""
    rng = np.random.default_rng(seed)
    for sub in ("hr", "mask", "lr"):
        (root / sub).mkdir(parents=True)
    for i in range(count):
        hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(hr).save(root / "hr" / f"{i}.png")
        Image.fromarray(hr[::4, ::4]).save(root / "lr" / f"{i}.png")
        Image.fromarray((hr[..., 0] > 128).astype(np.uint8) * 255).save(root / "mask" / f"{i}.png")
    return root


def _triplets(root: Path) -> Path:
    _clean_triplets(root, 4)
    (root / "hr" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")             # corrupt HR
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "mask" / "2.png")      # wrong-size mask
    return root


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, capsys):
    data = _triplets(tmp_path / "data")
    summary = _run(_cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), train__max_steps=4))
    assert summary["step"] == 4
    bad = _lines(tmp_path / "run", "bad_sample")
    assert bad and all(("1.png" in b["sample"]) or ("2.png" in b["sample"]) for b in bad)
    assert _lines(tmp_path / "run")[-1]["bad_samples"] == len(bad)
    assert "skipped a damaged sample" in capsys.readouterr().err


def test_a_damaged_sample_counts_once_whatever_the_epochs(tmp_path, capsys):
    """Three epochs (the last two after a resume) meet the same two damaged samples: they are logged
    once, the resume names them as still damaged, a count of 2 throughout the resumed steps, and no
    abort at train.max_bad_samples = 2."""
    data = _triplets(tmp_path / "data")
    out = tmp_path / "run"

    def cfg(steps):
        return _cfg(out, data__kind="triplets", data__root=str(data), train__max_steps=steps,
                    train__max_bad_samples=2, train__checkpoint_every=4)

    assert _run(cfg(4))["step"] == 4  # one epoch: 4 samples at batch 1
    capsys.readouterr()
    assert _run(cfg(12), resume=True)["step"] == 12
    bad = _lines(out, "bad_sample")
    assert sorted(b["sample"].split(" (")[0] for b in bad) == ["sample 1", "sample 2"]
    assert all(b["step"] <= 4 for b in bad)
    assert [r["bad_samples"] for r in _lines(out)[4:]] == [2] * 8
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

    data = _clean_triplets(tmp_path / "data", 6)
    perm = StepBatchSampler(6, 1, seed=0)._perm(0)  # epoch 0's order at batch 1: step k trains perm[k - 1]
    first = perm[0]  # its replacement (the next index) is met in step 1 too: the second must be neither
    second = next(i for i in perm[3:] if i not in (first, (first + 1) % 6) and (i + 1) % 6 != first)
    for i in (first, second):
        (data / "hr" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    out = tmp_path / "run"

    def cfg(steps):
        return _cfg(out, data__kind="triplets", data__root=str(data), train__max_steps=steps,
                    train__max_bad_samples=1, train__checkpoint_every=2)

    assert _run(cfg(2))["step"] == 2
    with pytest.raises(TrainingAborted, match=r"aborting at step \d: 2 damaged samples were skipped"):
        _run(cfg(6), resume=True)
    bad = _lines(out, "bad_sample")
    assert [b["sample"].split(" (")[0] for b in bad] == [f"sample {first}", f"sample {second}"]
    assert _lines(out)[2]["bad_samples"] == 1  # step 3, after the resume: the run's count, not the segment's
    capsys.readouterr()
    _clean_triplets(tmp_path / "fixed", 6)
    (tmp_path / "fixed" / "hr" / f"{first}.png").replace(data / "hr" / f"{first}.png")
    assert _run(cfg(6), resume=True)["step"] == 6  # the fixed one no longer counts
    said = capsys.readouterr()
    assert f"sample {second} (" in said.err and f"sample {first} (" not in said.out + said.err
    assert [b["sample"].split(" (")[0] for b in _lines(out, "bad_sample")] == [f"sample {first}", f"sample {second}"]
    assert _lines(out)[-1]["bad_samples"] == 1


def test_too_many_bad_samples_abort_with_a_checkpoint(tmp_path):
    from training.train import TrainingAborted
    from training.train_state import latest_checkpoint

    data = _triplets(tmp_path / "data")
    cfg = _cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), train__max_steps=8,
               train__max_bad_samples=0, train__checkpoint_every=100)
    with pytest.raises(TrainingAborted, match=r"damaged samples were skipped \(train\.max_bad_samples = 0\)"):
        _run(cfg)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    # as the message says: resumed with the samples still damaged, it stops again; fixed, it goes on
    # (defect: the count restored from the checkpoint aborted the fixed run at once, listing nothing)
    with pytest.raises(TrainingAborted, match="damaged samples were skipped"):
        _run(cfg, resume=True)
    _clean_triplets(tmp_path / "fixed", 4)
    for sub in ("hr", "mask"):
        for name in ("1.png", "2.png"):
            (tmp_path / "fixed" / sub / name).replace(data / sub / name)
    assert _run(cfg, resume=True)["step"] == 8


def test_resume_skips_a_truncated_checkpoint_and_a_torn_metrics_line(tmp_path, capsys):
    out = tmp_path / "run"
    _run(_cfg(out))
    newest = out / "checkpoints" / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:500])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "tot')                  # killed mid-line
    from training.resume import RunFolderError

    with pytest.raises(RunFolderError, match="model_final.safetensors holds other weights than .*step_00000001"):
        _run(_cfg(out, train__max_steps=3), resume=True)  # the finished run's step 2 is only there now
    (out / "model_final.safetensors").unlink()  # as a run killed while writing step 2 (it never finished)
    summary = _run(_cfg(out, train__max_steps=3), resume=True)
    err = capsys.readouterr().out + capsys.readouterr().err
    assert summary["step"] == 3
    assert [r["step"] for r in _lines(out)] == [1, 2, 3]
    assert "step_00000002" in err and "damaged" in err and "torn" in err


def test_a_used_folder_needs_resume_and_a_changed_config_needs_force(tmp_path):
    from training.resume import RunFolderError
    from training.train import main

    out = tmp_path / "run"
    _run(_cfg(out, train__max_steps=1))
    with pytest.raises(RunFolderError, match="already holds a training run.*--resume"):
        _run(_cfg(out, train__max_steps=1))
    with pytest.raises(RunFolderError, match=r"optim\.lr: 0\.001 -> 0\.002.*--force"):
        _run(_cfg(out, train__max_steps=2, optim__lr=0.002), resume=True)
    assert _run(_cfg(out, train__max_steps=2, optim__lr=0.002), resume=True, force=True)["step"] == 2
    assert main(["--config", str(TINY), "--output-dir", str(out)]) == 2
    notes = tmp_path / "notes.txt"  # defect: a file as --output-dir ended in a FileExistsError traceback
    notes.write_text("mine")
    with pytest.raises(RunFolderError, match=re.escape(f"the run folder {notes} (train.output_dir, --output-dir) "
                                                       "is a file; give a folder")):
        _run(_cfg(notes, train__max_steps=1))


def test_a_run_recorded_before_a_key_existed_resumes_without_force():
    # config.json of an older run lacks newer keys: they count as their defaults, not as changes
    from training.config import Config
    from training.resume import config_changes

    new = Config().to_dict()
    old = {s: {k: v for k, v in values.items() if k != "init_parts"} for s, values in new.items()}
    assert config_changes(old, new) == []
    new["model"]["init_parts"] = ["unet", "vae"]
    assert config_changes(old, new) == ["model.init_parts: None -> ['unet', 'vae']"]


@pytest.mark.parametrize("override, field", [
    ("data.crop=0", "data.crop"), ("optim.lr=-1", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.betas=[0.9, 1.5]", r"optim.betas\[1\]"), ("train.num_workers=-2", "train.num_workers"),
    ("loss.mfl=-3", "loss.mfl"), ("model.unet_rank=0", "model.unet_rank"), ("train.log_every=0", "train.log_every"),
    ("train.seed=-1", "train.seed"), ("data.crop=100", "data.crop"),
    ("data.val_crop=100", "data.val_crop"),  # was taken, and validation met a latent grid 12.5 wide
])
def test_config_values_are_range_checked_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"command line \({re.escape(override)}\): {field}"):
        load_config(TINY, [override])


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
             (["train.batch_size=4", "data.length=3"], "the dataset has 3 items, fewer than one global batch", True),
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


def test_a_bad_value_from_the_command_line_is_blamed_on_it_not_on_the_yaml(tmp_path):
    for item, words in (("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
                        ("data.degradation=realesrgan_mild", "data.degradation = 'realesrgan_mild'; choose one of"),
                        ("optim.betas=[0.9, 1.5]", "optim.betas[1] must be in [0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(f"command line ({item}): {words}")):
            load_config(TINY, [item])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(TINY.read_text() + "\noptim:\n  decay: sometimes\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad_yaml}: optim.decay = 'sometimes'")):
        load_config(bad_yaml, ["train.batch_size=2"])


def test_overrides_that_are_no_yaml_and_configs_that_are_no_utf8_are_one_line(tmp_path):
    """Defects: `--set` values YAML cannot parse were tracebacks, also for text fields, which take the
    text as typed; a config file that is not UTF-8 gave a decode error naming no file."""
    with pytest.raises(ConfigError, match=re.escape("override 'data.font_scale=[0.1,': the value is not valid YAML")):
        load_config(TINY, ["data.font_scale=[0.1,"])
    cfg = load_config(TINY, ["data.root=[2024] scans", "model.kolors_dir=@models/kolors"])
    assert (cfg.data.root, cfg.model.kolors_dir) == ("[2024] scans", "@models/kolors")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(TINY.read_bytes() + "\n# r\u00e9sum\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{latin1}: not UTF-8 text")):
        load_config(latin1)


def test_a_text_override_keeps_a_hash_and_unquotes_a_quoted_value():
    """Defect: `--set "train.output_dir=/runs/exp #2"` (any text key) was cut at " #", which YAML reads as
    a comment, and the run silently used /runs/exp. Text keys take the text as typed, stripped; YAML's null
    spellings and nothing are null; a quoted value loses its quotes."""
    given = {"/runs/exp #2": "/runs/exp #2", "  data #1 ": "data #1", '"a #b"': "a #b", "'it''s #3'": "it's #3",
             "'a' and 'b'": "'a' and 'b'", "no": "no", "null": None, "~": None, "": None}
    for raw, want in given.items():
        cfg = load_config(TINY, [f"data.root={raw}", f"model.init_checkpoint={raw}"])
        assert (cfg.data.root, cfg.model.init_checkpoint) == (want, want), raw
    cfg = load_config(TINY, ["train.output_dir=/runs/exp #2", "train.max_steps=3 # YAML's comment elsewhere"])
    assert (cfg.train.output_dir, cfg.train.max_steps) == ("/runs/exp #2", 3)


def test_a_wrong_length_list_and_an_int_written_1e3(tmp_path):
    """Defects: a list of the wrong length said only "[0.1] is not a valid tuple"; an int written 1e3 (which
    YAML reads as text) was refused while `lr: 1e-4` passed. The message names the key and the length, with
    an example; an int field takes a whole number in any notation, and refuses 1.5 saying so."""
    for item, words in (("data.font_scale=[0.1]", "data.font_scale: [0.1] is not a list of 2 numbers, e.g. [0.1, 0.2]"),
                        ("optim.betas=[0.9]", "optim.betas: [0.9] is not a list of 2 numbers, e.g. [0.9, 0.999]"),
                        ("optim.betas=0.9", "optim.betas: 0.9 is not a list of 2 numbers, e.g. [0.9, 0.999]"),
                        ("train.max_steps=1.5", "train.max_steps: 1.5 is not a whole number (e.g. 1000, or 1e3)"),
                        ("train.max_steps=many", "train.max_steps: 'many' is not a whole number (e.g. 1000, or 1e3)")):
        with pytest.raises(ConfigError, match=f"^{re.escape(f'command line: {words}')}$"):
            load_config(TINY, [item])
    cfg = load_config(TINY, ["train.max_steps=1e3", "train.checkpoint_every=2.5e2", "data.crop=128.0"])
    assert (cfg.train.max_steps, cfg.train.checkpoint_every, cfg.data.crop) == (1000, 250, 128)
    assert all(type(v) is int for v in (cfg.train.max_steps, cfg.train.checkpoint_every, cfg.data.crop))
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 1e3\noptim:\n  lr: 1e-4\n")
    assert (load_config(config).train.max_steps, load_config(config).optim.lr) == (1000, 1e-4)
    config.write_text("train:\n  max_steps: 1.5\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{config}: train.max_steps: 1.5 is not a whole number')}"):
        load_config(config)


def test_a_font_scale_range_upside_down_is_refused():
    words = re.escape("data.font_scale must be [smallest, largest]") + r".*got \[0.2, 0.1\]"
    with pytest.raises(ConfigError, match=words):
        load_config(TINY, ["data.font_scale=[0.2, 0.1]"])
    assert load_config(TINY, ["data.font_scale=[0.1, 0.2]"]).data.font_scale == (0.1, 0.2)


@pytest.mark.parametrize("workers", [0, 2])
def test_data_broken_in_the_loop_is_a_short_message_exit_1(tmp_path, capsys, workers):
    """Data found broken once training runs (every file damaged; whole images of different sizes
    batched with data.crop null): `error: training data: ...` naming it and what to change, on a line
    of its own (not after the progress bar), exit 1, no traceback, also when a DataLoader worker finds it."""
    from training.train import main

    broken = _triplets(tmp_path / "broken")
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

    data = _triplets(tmp_path / "data")
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
    import subprocess
    import sys

    from tests.processes import REPO, free_port, subprocess_env

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "training.train", "--config", str(TINY), "--output-dir", str(out)]
    for s in ("data.kind=\"triplets\"", f"data.root={json.dumps(str(data))}", "train.num_workers=0",
              "loss.lpips_net=\"none\"", "loss.lpips=0", "train.validate_every=0", *sets):
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=REPO, env=dict(subprocess_env(), MASTER_PORT=str(port)), capture_output=True,
                          text=True, timeout=300)


def _first_epoch(n: int, batch: int) -> list[list[int]]:
    """Each of two ranks' sample indices in epoch 0 (seed 0), in the order they are trained."""
    from training.builders import StepBatchSampler

    perm = StepBatchSampler(n, batch, world=2, rank=0, seed=0)._perm(0)
    return [[i for k in range(0, n, 2 * batch) for i in perm[k + r * batch: k + (r + 1) * batch]] for r in (0, 1)]


@pytest.mark.slow
def test_a_damaged_sample_met_by_another_process_is_logged_and_counted_once(tmp_path):
    """Two processes; only rank 1 meets the damaged file. The main process logs it (it used to log only
    its own), the count in every step record and in the checkpoint is the run's, and it is said once."""
    import torch

    data = _clean_triplets(tmp_path / "data", 8, seed=2)
    damaged = _first_epoch(8, 2)[1][0]  # rank 1's first sample
    (data / "hr" / f"{damaged}.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    out = tmp_path / "run"
    proc = _launch_two_processes(out, data, "data.crop=64", "train.batch_size=2", "train.max_steps=2",
                                 "train.checkpoint_every=100")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (bad,) = _lines(out, "bad_sample")
    assert bad["step"] == 1 and f"hr/{damaged}.png" in bad["sample"]
    assert [r["bad_samples"] for r in _lines(out)] == [1, 1]
    assert proc.stderr.count("warning: skipped a damaged sample:") == 1
    state = torch.load(out / "checkpoints" / "step_00000002" / "state.pt", weights_only=False)
    assert state["bad_samples"] == 1 and state["bad_sample_list"] == [bad["sample"]]


@pytest.mark.slow
def test_data_broken_on_one_of_two_processes_stops_both_with_the_steps_saved(tmp_path):
    """Two processes; at step 2 only rank 1's batch mixes image sizes. Both stop at once (none waits in a
    collective for the other), the step trained is saved, and the message names the images, once."""
    from training.train_state import latest_checkpoint

    a, b = _first_epoch(8, 2)[1][2:4]  # rank 1's batch of step 2
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for sub in ("hr", "mask"):
        (data / sub).mkdir(parents=True)
    for i in range(8):
        side = 96 if i == b else 64
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(data / "hr" / f"{i}.png")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(data / "mask" / f"{i}.png")
    out = tmp_path / "run"
    proc = _launch_two_processes(out, data, "data.crop=null", "train.batch_size=2", "train.max_steps=4",
                                 "train.checkpoint_every=100")
    assert proc.returncode != 0
    words = (f"error: training data: one batch holds images of different sizes (64x64: {a}; 96x96: {b}): with "
             "data.crop null every image must have the same size")
    assert proc.stderr.count(words) == 1, proc.stderr[-4000:]
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr)  # rank 0 used to die in the step's all-reduce
    assert f"stopped at step 1; the last checkpoint is {out / 'checkpoints' / 'step_00000001'}" in proc.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step_00000001"


def test_a_run_with_loader_workers_that_stops_on_broken_data_exits(tmp_path):
    """Defect: with train.num_workers > 0 (the Kolors configs use 4) a run that stopped on broken data
    printed its message and then never exited: the workers ignore SIGTERM, and Python's exit handlers
    terminate, then join them without a timeout."""
    import subprocess
    import sys

    broken = _triplets(tmp_path / "broken")
    for f in (broken / "hr").iterdir():
        f.write_bytes(b"\x89PNG\r\n\x1a\n torn download")
    argv = [sys.executable, "-m", "training.train", "--config", str(TINY), "--output-dir", str(tmp_path / "run"),
            "--set", "data.kind=\"triplets\"", "--set", f"data.root={json.dumps(str(broken))}",
            "--set", "data.crop=64", "--set", "train.num_workers=2", "--set", "loss.lpips_net=\"none\"",
            "--set", "loss.lpips=0", "--set", "train.validate_every=0"]
    done = subprocess.run(argv, cwd=TINY.parents[2], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "error: training data: 16 samples in a row" in done.stderr, done.stderr[-2000:]


def test_an_extended_run_is_no_longer_its_old_final_model(tmp_path, monkeypatch):
    """Defect: a finished run resumed with a larger train.max_steps and stopped half-way still ran (and
    exported) its old model_final.safetensors; resumed with a smaller one, it 'finished' past it."""
    from tadisr_core.model_ref import resolve_model
    from training.resume import RunFolderError
    from training.train import Trainer

    out = tmp_path / "run"
    assert _run(_cfg(out, train__max_steps=2))["step"] == 2
    assert resolve_model(out).checkpoint == out / "model_final.safetensors"
    step = Trainer.train_step

    def interrupted_at_step_4(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(out, train__max_steps=5), resume=True)
    assert resolve_model(out).checkpoint == out / "checkpoints" / "step_00000003" / "model.safetensors"
    with pytest.raises(RunFolderError, match=r"the run is at step 3, past train\.max_steps = 1: nothing to train"):
        _run(_cfg(out, train__max_steps=1), resume=True, force=True)
    # a model_final that no checkpoint holds (checkpoints deleted to save space) is never trained over
    other = tmp_path / "other"
    assert _run(_cfg(other, train__max_steps=2))["step"] == 2
    final = (other / "model_final.safetensors").read_bytes()
    shutil.rmtree(other / "checkpoints")
    with pytest.raises(RunFolderError, match=r"model_final\.safetensors is the only copy of its weights"):
        _run(_cfg(other, train__max_steps=4), resume=True, force=True)
    with pytest.raises(RunFolderError, match="already holds a training run"):
        _run(_cfg(other, train__max_steps=4))
    assert (other / "model_final.safetensors").read_bytes() == final and _lines(other)[-1]["step"] == 2


def test_a_run_trains_and_validates_on_the_authors_ftsr_layout(tmp_path):
    """gt/, sr_bicubic/ (the LR already upscaled to the HR size: the model's input as it is), mask/."""
    from tadisr_core.pipeline import upscale_canvas

    root = _clean_triplets(tmp_path / "ftsr", 2)
    (root / "hr").rename(root / "gt")
    (root / "sr_bicubic").mkdir()
    for f in (root / "lr").iterdir():
        lr = torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)[None].float() / 255
        up = (upscale_canvas(lr, 4)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(up).save(root / "sr_bicubic" / f.name)
        f.unlink()
    (root / "lr").rmdir()
    out = tmp_path / "run"
    summary = _run(_cfg(out, data__kind="triplets", data__root=str(root), data__hr_dir="gt",
                        data__lr_dir="sr_bicubic", data__crop=32, data__val_root=str(root), train__validate_every=2))
    assert summary["step"] == 2 and _lines(out, "bad_sample") == []
    val = _lines(out, "val")
    assert len(val) == 1 and math.isfinite(val[0]["psnr"])


def test_validation_asked_for_without_validation_data_is_said(tmp_path, capsys):
    """Defect: train.validate_every > 0 on folders without data.val_root validated nothing, silently."""
    data = _clean_triplets(tmp_path / "data", 2)
    _run(_cfg(tmp_path / "run", data__kind="triplets", data__root=str(data), data__crop=32, train__validate_every=1,
              train__max_steps=1))
    out = capsys.readouterr()
    assert ("warning: train.validate_every = 1, but there is no validation data (data.val_root and data.val_size "
            "give it): no validation will run") in out.out + out.err
    assert _lines(tmp_path / "run", "val") == []


def test_a_run_that_saved_no_checkpoint_starts_over_without_its_old_log_lines(tmp_path):
    """Defect: --resume on a run that crashed before its first checkpoint started at step 0 but kept the
    crashed run's lines, so metrics.jsonl held step 1 twice; the refusal said 'continue' with nothing to."""
    from training.resume import RunFolderError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "total": 9.0}) + "\n")
    with pytest.raises(RunFolderError, match=r"pass --resume to start it over \(it saved no checkpoint\)"):
        _run(_cfg(out))
    _run(_cfg(out, train__max_steps=2), resume=True)
    assert [r["step"] for r in _lines(out)] == [1, 2] and _lines(out)[0]["total"] != 9.0


def test_resume_with_force_trains_on_with_the_changed_optimiser_settings(tmp_path):
    """Defect: `--resume --force` with another optim.lr said it continued with the change, but the loaded
    optimiser and scheduler states kept the old rate (and betas, weight decay, eps)."""
    from training.train import Trainer

    out = tmp_path / "run"
    _run(_cfg(out, optim__warmup_steps=4))                             # steps 1-2 at lr 1e-3, warming up
    new = dict(optim__warmup_steps=4, optim__lr=1e-5, optim__betas=[0.8, 0.99], optim__weight_decay=0.5,
               optim__eps=1e-6)
    trainer = Trainer(_cfg(out, train__max_steps=4, **new), resume=True, force=True)
    for group in trainer.optimizer.param_groups:                     # step 3 of the warm-up: 3/4 of the rate
        assert group["lr"] == pytest.approx(1e-5 * 3 / 4) and group["initial_lr"] == 1e-5
        assert tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.5 and group["eps"] == 1e-6
    assert trainer.scheduler.base_lrs == [1e-5] * len(trainer.optimizer.param_groups)
    trainer.run()
    assert [r["lr"] for r in _lines(out)] == pytest.approx([1e-3 / 4, 1e-3 / 2, 1e-5 * 3 / 4, 1e-5])
    # recorded as it ran: a resume without --force finds no change, and the same rate
    again = Trainer(_cfg(out, train__max_steps=5, **new), resume=True)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_a_resume_that_changes_the_trainable_set_is_refused_before_anything_is_removed(tmp_path):
    """Defect: `--resume --force --set ablation.no_jsd=true` failed with torch's "loaded state dict contains
    a parameter group that doesn't match the size of optimizer's group", after removing model_final."""
    from training.resume import RunFolderError

    out = tmp_path / "run"
    _run(_cfg(out))
    final = (out / "model_final.safetensors").read_bytes()
    step2 = re.escape(str(out / "checkpoints" / "step_00000002"))
    refused = (rf"^--resume: the trainable parameters changed since {step2} \(\d+ -> \d+ tensors.*not even with "
               rf"--force\): start a new run .*--set model\.init_checkpoint=\"{step2}/model\.safetensors\"$")
    with pytest.raises(RunFolderError, match=refused):
        _run(_cfg(out, train__max_steps=4, ablation__no_jsd=True), resume=True, force=True)
    assert (out / "model_final.safetensors").read_bytes() == final
    # a checkpoint from before the trainable names were recorded: its optimiser state tells
    state_file = out / "checkpoints" / "step_00000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["trainable"]
    torch.save(state, state_file)
    with pytest.raises(RunFolderError, match=refused):
        _run(_cfg(out, train__max_steps=4, ablation__no_jsd=True), resume=True, force=True)
    assert (out / "model_final.safetensors").read_bytes() == final


def _init_checkpoint(path: Path, **extra) -> Path:
    """A whole-model (backbone included) native checkpoint of the tiny config's model, for model.init_checkpoint."""
    from tadisr_core.checkpoint import save_model
    from training.builders import build_model_from_config

    model = build_model_from_config(_cfg(path.parent / "unused", model__init_seed=5, **extra), log=lambda _: None)
    return save_model(model, path, backbone=True)


def test_a_resume_does_without_a_deleted_init_checkpoint_its_checkpoints_hold(tmp_path, capsys):
    """Defect: a resume read model.init_checkpoint again, although the run's checkpoints hold every weight
    it gave; a deleted one failed with "checkpoint not found: X", naming no key, after removing model_final."""
    from safetensors.torch import load_file

    init = _init_checkpoint(tmp_path / "prior.safetensors")
    out = tmp_path / "run"
    _run(_cfg(out, model__init_checkpoint=str(init)))
    init.unlink()
    summary = _run(_cfg(out, model__init_checkpoint=str(init), train__max_steps=3), resume=True)
    assert summary["step"] == 3 and "is gone" in capsys.readouterr().out
    assert load_file(out / "model_final.safetensors").keys() == load_file(out / "checkpoints" / "step_00000002"
                                                                            / "model.safetensors").keys()
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint: checkpoint not found: .*prior"):
        _run(_cfg(tmp_path / "new", model__init_checkpoint=str(init)))  # a new run needs it: the key is named


def _backbone_run(tmp_path: Path, tiny_dir) -> tuple[dict, Path]:
    """The tiny Kolors base's settings, and a one-step run on it that trained the whole backbone, at a rate
    that moves each weight well past the fp8 tolerance of `checkpoint.check_base`."""
    kolors = dict(model__kolors_dir=str(tiny_dir["kolors"]), model__prompt_cache=str(tiny_dir["prompt_cache"]))
    _run(_cfg(tmp_path / "kbb", model__train_backbone=True, optim__lr=0.05, train__max_steps=1, **kolors))
    return kolors, tmp_path / "kbb" / "model_final.safetensors"


def test_an_adapters_run_started_from_a_trained_backbone_runs_alone_and_exports(tmp_path, tiny_dir, capsys):
    """Defect: an adapters-only run (a frozen Kolors base) whose model.init_checkpoint is a run that trained
    the backbone saved the adapters only, fitting no Kolors files: `--model RUN` was refused ("trained on a
    different base model ... Load it with the Kolors files it was trained on", the folder it had loaded) and
    export_model refused it as adapters-only. It saves the whole backbone: it runs alone as it trained,
    exports, and resumes without the init checkpoint."""
    from tadisr_core.model_ref import load_model, load_standalone
    from training.export_model import export_run
    from training.train import Trainer

    kolors, init = _backbone_run(tmp_path, tiny_dir)
    out = tmp_path / "kb3"
    cfg = _cfg(out, model__init_checkpoint=str(init), **kolors)
    assert cfg.model.saves_backbone and not dataclasses.replace(cfg.model, init_parts=["mi_decoder"]).saves_backbone
    trainer = Trainer(cfg)
    trainer.run()
    assert load_checkpoint(out / "model_final.safetensors").metadata["backbone"] == "included"
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trainer.model.eval()(x).image
        assert torch.equal(load_model(out, merge_lora_weights=False)(x).image, want)
        paths = export_run(out, tmp_path / "exported", dtype="fp32")
        assert torch.equal(load_standalone(paths["weights"], paths["prompt_cache"])(x).image, want)
    init.unlink()
    summary = _run(_cfg(out, model__init_checkpoint=str(init), train__max_steps=3, **kolors), resume=True)
    assert summary["step"] == 3 and "is gone" in capsys.readouterr().out


def test_a_run_that_left_out_its_init_backbone_says_so(tmp_path, tiny_dir, monkeypatch):
    """Such a run trained by an older version (adapters only, recording that its resume needs the init
    checkpoint): `--model RUN` says where its backbone came from instead of advising the very folder it
    loaded, and its resume without the init checkpoint is refused naming the key, removing nothing."""
    from tadisr_core.checkpoint import BaseMismatchError
    from tadisr_core.model_ref import load_model
    from training.config import ModelConfig

    kolors, init = _backbone_run(tmp_path, tiny_dir)
    out = tmp_path / "run"
    with monkeypatch.context() as old:  # the older version: the init checkpoint's backbone is not saved
        old.setattr(ModelConfig, "saves_backbone", property(lambda m: m.train_backbone or not m.has_base))
        _run(_cfg(out, model__init_checkpoint=str(init), train__max_steps=1, **kolors))
    state_file = out / "checkpoints" / "step_00000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "init_checkpoint_needed": True}, state_file)
    with pytest.raises(BaseMismatchError, match=(
            rf"^{re.escape(str(out / 'model_final.safetensors'))} was trained on another backbone than the Kolors "
            rf"base its run records \(model\.kolors_dir {re.escape(str(tiny_dir['kolors']))}, in .*config\.json\): "
            rf"its \S+ does not match\. That backbone came from the run's model\.init_checkpoint "
            rf"\({re.escape(str(init))}\), which the version .* did not save in its checkpoints: train the run "
            rf"again with this version")):
        load_model(out)
    with pytest.raises(BaseMismatchError, match="Load it with the Kolors files it was trained on"):
        load_model(out, unet=str(tiny_dir["kolors"] / "unet"))  # another base given: the general advice
    init.unlink()
    final = (out / "model_final.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint not found: .*kbb.*does not hold the frozen "
                                          r"weights it gave"):
        _run(_cfg(out, model__init_checkpoint=str(init), train__max_steps=2, **kolors), resume=True)
    del state["init_checkpoint_needed"]  # from before the need was recorded
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint not found: .*may not hold every weight"):
        _run(_cfg(out, model__init_checkpoint=str(init), train__max_steps=2, **kolors), resume=True)
    assert (out / "model_final.safetensors").read_bytes() == final


def test_a_file_where_an_output_folder_must_be_is_one_line_for_every_training_command(tmp_path, capsys):
    """Defect: `export_model RUN FILE/sub`, `heldout make FILE` / `FILE/set` and `heldout demo-inputs FILE`
    ended in NotADirectoryError / FileExistsError tracebacks. Now each says what `synthesize --out` and
    `train` say (files.folder_target_problem), exit 2, before any work and with nothing written."""
    from tadisr_core.model_ref import DEMO_DIR
    from training.export_model import main as export_main
    from training.heldout import main as heldout_main

    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for folder in (blocker / "sub", blocker):
        said = (f"{blocker} is a file; give a folder" if folder == blocker
                else f"{folder}: {blocker} is a file, not a folder")
        assert export_main([str(DEMO_DIR), str(folder)]) == 2
        assert capsys.readouterr().err == f"error: OUT_DIR {said}\n"
        for argv in (["make", str(folder), "--count", "1", "--size", "64"], ["demo-inputs", str(folder)]):
            assert heldout_main(argv) == 2
            assert capsys.readouterr().err == f"error: DIR {said}\n"
    assert blocker.read_text() == "mine"


def test_loss_ocr_without_rapidocr_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    """Defect: `--set loss.ocr=1` without rapidocr ended in a RuntimeError traceback."""
    import sys

    from training.train import main

    monkeypatch.setitem(sys.modules, "rapidocr", None)  # `import rapidocr` raises ImportError
    argv = ["--config", str(TINY), "--output-dir", str(tmp_path / "run"), "--set", "loss.lpips_net=none",
            "--set", "loss.lpips=0", "--set", "loss.ocr=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: loss.ocr needs the rapidocr package (its recogniser): pip install -e '.[train]' in the "
                   "repository's folder, or set loss.ocr: 0\n"), err
    monkeypatch.delitem(sys.modules, "rapidocr")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: loss.ocr needs the onnx package (it reads the recogniser): "
                                       "pip install -e '.[train]' in the repository's folder, or set loss.ocr: 0\n")


@pytest.mark.parametrize("script, hidden, args, missing", [
    ("tadisr-train", ("yaml",), ["--config", "tiny"], "pyyaml"),
    ("tadisr-synthesize", ("kornia",), ["--backgrounds", "skimage", "--out", "OUT", "--count", "1"], "kornia"),
    ("tadisr-evaluate", ("kornia", "Levenshtein"), ["--pred", "OUT", "--gt", "OUT"], "kornia, levenshtein"),
])
def test_a_command_without_the_training_extras_says_what_to_install(tmp_path, script, hidden, args, missing):
    """Defect: without the `train` extra, tadisr-train / tadisr-synthesize ended in ModuleNotFoundError
    tracebacks and tadisr-evaluate failed every pair with one; now one line naming the packages, exit 2."""
    import subprocess
    import sys

    args = [str(tmp_path) if a == "OUT" else a for a in args]
    module = "training." + script.removeprefix("tadisr-")
    code = (f"import sys\nfor name in {hidden!r}: sys.modules[name] = None  # `import name` fails\n"
            f"sys.argv = [{script!r}]  # as its console script starts it\n"
            f"from {module} import main\nsys.exit(main({args!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=TINY.parents[2], capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stderr) == (
        2, f"error: {script} needs the training extras ({missing} not installed): pip install -e '.[train]' in the "
           "repository's folder\n")


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


def test_a_missing_prompt_cache_without_chatglm3_names_the_config_keys(tmp_path, tiny_dir, capsys):
    """Defect: a run whose model.prompt_cache does not exist yet and whose Kolors folder has no ChatGLM3 was
    told to "fix --prompt-cache, or pass --text-encoder", flags tadisr-train does not have."""
    from training.train import main

    kolors = tmp_path / "kolors"
    kolors.mkdir()
    for sub in ("unet", "vae", "scheduler"):
        (kolors / sub).symlink_to(tiny_dir["kolors"] / sub)
    cache = tmp_path / "typo.safetensors"
    argv = ["--config", str(TINY), "--output-dir", str(tmp_path / "run"), "--set",
            f"model.kolors_dir={json.dumps(str(kolors))}", "--set", f"model.prompt_cache={json.dumps(str(cache))}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--" not in err.replace(str(tmp_path), "")
    assert err.startswith(f"error: prompt cache not found: {cache}; fix model.prompt_cache, or pass model.text_encoder "
                          f"(a ChatGLM3 folder or file) or model.kolors_dir to compute it (ChatGLM3: "
                          f"{kolors / 'text_encoder' / 'config.json'} is missing")
