"""One command line (issue 11.6): `tadisr` with sub-commands, one exit-code convention, one set of env names."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

from tadisr_core import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command():
    text = cli.build_parser().format_help()
    for command in ("upscale", "prompt-cache", "inspect", "convert", "make-tiny", "train", "evaluate", "synthesize"):
        assert f"    {command}" in text, command
    assert "Exit codes: 0 ok, 1 some inputs failed, 2 setup error, 130 cancelled" in " ".join(text.split())


def test_console_scripts_point_at_main_functions():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tadisr"] == "tadisr_core.cli:main"
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    assert {f"tadisr-{n}" for n in cli.TRAINING_COMMANDS} <= set(scripts)


def test_checkpoint_and_make_tiny_commands_run_through_tadisr(tmp_path, capsys):
    assert cli.main(["make-tiny", str(tmp_path / "tiny")]) == 0
    official = tmp_path / "tiny" / "tadisr_tiny_official.pkl"
    assert official.is_file(), sorted(p.name for p in (tmp_path / "tiny").iterdir())
    capsys.readouterr()
    assert cli.main(["inspect", str(official), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits_model"] is True
    assert cli.main(["convert", str(official), str(tmp_path / "n.safetensors")]) == 0
    assert cli.main(["inspect", str(tmp_path / "absent.pkl")]) == 2
    # the paper variant has no release pickle (that layout cannot hold it): none is written or listed
    capsys.readouterr()
    assert cli.main(["make-tiny", str(tmp_path / "paper"), "--variant", "paper"]) == 0
    assert "official" not in capsys.readouterr().out and not list((tmp_path / "paper").glob("*.pkl"))
    assert cli.main(["inspect", str(tmp_path / "paper" / "tadisr_tiny.safetensors")]) == 0


def test_training_commands_point_to_their_scripts(capsys):
    assert cli.main(["train", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "run `tadisr-train --config x.yaml`" in err and "python -m training.train" in err


def test_old_kolors_env_name_still_works_with_a_note(monkeypatch, capsys):
    monkeypatch.delenv("TADISR_KOLORS", raising=False)
    monkeypatch.setenv("TADISR_KOLORS_DIR", "/old/kolors")
    args = cli.build_parser().parse_args(["upscale", "a.png", "-o", "out"])
    assert args.kolors == "/old/kolors" and "TADISR_KOLORS_DIR is deprecated" in capsys.readouterr().err
    assert args.kolors.var == "TADISR_KOLORS_DIR"  # marked with the variable it came from
    monkeypatch.setenv("TADISR_KOLORS", "/new/kolors")
    args = cli.build_parser().parse_args(["upscale", "a.png", "-o", "out"])
    assert args.kolors == "/new/kolors" and args.kolors.var == "TADISR_KOLORS"
    args = cli.build_parser().parse_args(["upscale", "a.png", "-o", "out", "--kolors", "/given"])
    assert args.kolors == "/given" and not isinstance(args.kolors, cli.FromEnv)


def test_module_entry_point_is_kept():
    done = subprocess.run([sys.executable, "-m", "tadisr_core", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "make-tiny" in done.stdout


def test_inspect_on_another_weights_file_says_what_it_is_and_how_to_pass_it(tiny_dir, tmp_path, capsys):
    """Kolors' UNet, its VAE, an all-in-one checkpoint and ChatGLM3 are not TADiSR checkpoints: `inspect`
    still exits 2, and says which of TADiSR's other inputs the file is."""
    from safetensors.torch import load_file, save_file

    kolors = tiny_dir["kolors"]
    unet = load_file(str(kolors / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(kolors / "vae" / "diffusion_pytorch_model.safetensors"))
    configs = {"unet_config": (kolors / "unet" / "config.json").read_text(),
               "vae_config": (kolors / "vae" / "config.json").read_text()}
    both = tmp_path / "kolors_all_in_one.safetensors"
    save_file({**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
               **{f"first_stage_model.{k}": v for k, v in vae.items()}}, str(both), metadata=configs)
    cases = {kolors / "unet" / "diffusion_pytorch_model.safetensors": "(metadata format='pt'): it is a Kolors UNet; "
                                                                      "pass it as --unet",
             kolors / "vae" / "diffusion_pytorch_model.safetensors": "(metadata format='pt'): it is an SDXL VAE; "
                                                                     "pass it as --vae",
             both: "(metadata format=None): it is an all-in-one Kolors checkpoint (UNet and VAE); pass it as --unet",
             kolors / "text_encoder" / "model.safetensors": "(metadata format='pt'): it is the ChatGLM3 text encoder; "
                                                            "pass it as --text-encoder"}
    for path, words in cases.items():
        assert cli.main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert "not a native TADiSR checkpoint" in err and words in err, (path.name, err)
    odd = tmp_path / "odd.safetensors"  # names of a UNet at shapes no UNet has: no hint, and no traceback
    save_file({"conv_in.weight": torch.zeros(3), "encoder_hid_proj.weight": torch.zeros(2),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(5)}, str(odd))
    (tmp_path / "notes.safetensors").write_bytes(b"not weights")
    for path in (odd, tmp_path / "notes.safetensors"):
        assert cli.main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "it is" not in err and "Traceback" not in err


def test_inspect_on_a_kolors_unet_in_torch_format_names_it_in_one_short_line(tiny_dir, tmp_path, capsys):
    """A Kolors UNet saved by torch.save was refused with every one of its keys listed (100k characters
    for the full-size one) and no hint; it is named as the safetensors UNet is, with a few keys."""
    from safetensors.torch import load_file

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text((tiny_dir["kolors"] / "unet" / "config.json").read_text())
    weights = load_file(str(tiny_dir["kolors"] / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    assert cli.main(["inspect", str(unet / "diffusion_pytorch_model.bin")]) == 2
    err = capsys.readouterr().err
    assert "not a TADiSR Kolors checkpoint" in err and "keys)): it is a Kolors UNet; pass it as --unet\n" in err
    assert f"({len(weights)} keys)" in err and len(err) < 600 and err.count("\n") == 1, err


def test_training_commands_name_themselves_as_the_user_started_them(monkeypatch, capsys):
    """Defect: `tadisr-train` without --config answered "python -m training.train: error: ..."."""
    import pytest

    from training import evaluate, synthesize, train

    for name, main in (("train", train.main), ("synthesize", synthesize.main), ("evaluate", evaluate.main)):
        for argv0, prog in ((f"/venv/bin/tadisr-{name}", f"tadisr-{name}"),
                            (str(ROOT / "training" / f"{name}.py"), f"python -m training.{name}")):
            monkeypatch.setattr(sys, "argv", [argv0])
            with pytest.raises(SystemExit):
                main([])
            assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog}: error: the following arguments"), argv0
