"""Training configs and setups that cannot work are one line naming the key or flag (issue 13): values out
of range, overrides that are no YAML, outputs that are files, missing extras, a missing prompt cache."""

from __future__ import annotations

import json
import re

import pytest

from tests.tiny_training import TINY
from training.config import ConfigError, load_config


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


def test_the_focal_loss_takes_no_class_weight_as_its_function_does():
    """Defect: `sigmoid_focal_loss` takes alpha -1 for no class weight (the reproduction's focal loss), but the
    config refused every value outside [0, 1], so that loss could not be configured."""
    import torch

    from training.builders import loss_settings_of
    from training.losses import sigmoid_focal_loss

    settings = loss_settings_of(load_config(TINY, ["loss.focal_alpha=-1"]))
    assert settings.focal_alpha == -1
    logits, target = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]])
    p = torch.sigmoid(logits)
    p_true = torch.where(target > 0, p, 1 - p)
    assert sigmoid_focal_loss(logits, target, -1).item() == pytest.approx(
        (-(1 - p_true) ** 2 * torch.log(p_true)).mean().item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"loss\.focal_alpha must be in \[0, 1\], or -1 for no class weight, got "
                                          r"-0\.5"):
        load_config(TINY, ["loss.focal_alpha=-0.5"])


def test_an_ablation_that_contradicts_an_explicit_loss_weight_is_refused():
    # defect: ablation.no_mfl silently won over loss.mfl
    with pytest.raises(ConfigError, match=r"ablation\.no_mfl turns the modified focal loss off, but loss\.mfl = "
                                          r"10\.0; drop one of them"):
        load_config(TINY, ["ablation.no_mfl=true", "loss.mfl=10.0"])


def test_a_bad_value_from_the_command_line_is_blamed_on_it_not_on_the_yaml(tmp_path):
    for item, words in (("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
                        ("data.degradation=realesrgan_mild", "data.degradation = 'realesrgan_mild'; choose one of"),
                        ("optim.betas=[0.9, 1.5]", "optim.betas[1] must be in [0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(f"command line ({item}): {words}")):
            load_config(TINY, [item])
    # defect: a key given twice was blamed on the first override, which the second had replaced
    with pytest.raises(ConfigError, match=re.escape("command line (train.max_steps=-3): train.max_steps must be >= 1")):
        load_config(TINY, ["train.max_steps=5", "train.max_steps=-3"])
    # defect: a rule between two keys broken by an override was blamed on the YAML alone
    with pytest.raises(ConfigError, match=re.escape(f"{TINY} with command line (data.scale=3): data.crop = 64 must "
                                                    f"be a multiple of 8 x data.scale (24)")):
        load_config(TINY, ["data.scale=3"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(TINY.read_text().replace("\noptim:\n", "\noptim:\n  decay: sometimes\n", 1))
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


def test_a_setup_error_leaves_no_empty_run_folder_behind(tmp_path, capsys):
    """Defect: a start that stopped on missing data left its new, empty run folder behind; a folder that was
    there before stays."""
    from training.train import main

    data = ["--set", "data.kind=triplets", "--set", f"data.root={json.dumps(str(tmp_path / 'no_data'))}"]
    assert main(["--config", str(TINY), "--output-dir", str(tmp_path / "run"), *data]) == 2
    assert "no_data" in capsys.readouterr().err and not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    assert main(["--config", str(TINY), "--output-dir", str(tmp_path / "kept"), *data]) == 2
    assert (tmp_path / "kept").is_dir()


def test_a_key_given_twice_in_a_config_file_is_refused_naming_it_and_its_lines(tmp_path):
    """Defect: a key written twice in a config file (a second `train:` section appended at its end, or a key
    repeated inside a section) silently replaced the first, and the run trained with half of what the file
    says. Either is refused at any nesting level, naming the file, the key and both lines."""
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  max_steps: 5\noptim:\n  lr: 1.0e-3\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{config}:5: train is given twice (lines 1 and 5)')}"):
        load_config(config)
    config.write_text("train:\n  max_steps: 5\n  seed: 1\n  max_steps: 7\n")
    twice = f"{config}:4: train.max_steps is given twice (lines 2 and 4)"
    with pytest.raises(ConfigError, match=f"^{re.escape(twice)}"):
        load_config(config)


def test_a_missing_validation_folder_is_named_by_its_key(tmp_path):
    """Review: `data.val_root=/nonexist` said "missing folder /nonexist/hr (...)" without the key that named it,
    as if `data.root` were wrong."""
    import numpy as np
    from PIL import Image

    from training.builders import build_datasets

    for sub, shape in (("hr", (64, 64, 3)), ("mask", (64, 64))):
        (tmp_path / "data" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "data" / sub / "a.png")
    root, val = (json.dumps(str(tmp_path / name)) for name in ("data", "no_val"))
    cfg = load_config(TINY, ["data.kind=triplets", f"data.root={root}", f"data.val_root={val}"])
    with pytest.raises(FileNotFoundError, match=rf"^missing folder {re.escape(str(tmp_path / 'no_val' / 'hr'))} "
                                                r"\(.*\) \(data\.val_root\)$"):
        build_datasets(cfg, tmp_path, log=None)


def test_an_empty_config_file_is_refused(tmp_path):
    """Review: an empty YAML file trained every default (a 512 px synthesis run) without a word."""
    for text in ("", "# only a comment\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'empty.yaml'))}: the config is empty; "):
            load_config(tmp_path / "empty.yaml")
