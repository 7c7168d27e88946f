"""Run folders and resuming (issue 13): a used folder, a changed config, a truncated newest checkpoint, an
extended or a changed run, init checkpoints and backbones a run started from."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tadisr_core.checkpoint import load_checkpoint
from tests.tiny_training import TINY, lean_cfg, run, train_lines
from training.config import ConfigError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-step run of `lean_cfg` (a checkpoint at each step). Tests take a copy (`_copy_of`): a run
    folder resumes wherever it lies (train.output_dir is not compared on resume)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(lean_cfg(out))
    return out


def _copy_of(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


def test_resume_skips_a_truncated_checkpoint_and_a_torn_metrics_line(tmp_path, capsys, finished_run):
    out = _copy_of(finished_run, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:500])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "tot')                  # killed mid-line
    from training.resume import RunFolderError

    with pytest.raises(RunFolderError, match="model_final.safetensors holds other weights than .*step_00000001"):
        run(lean_cfg(out, train__max_steps=3), resume=True)  # the finished run's step 2 is only there now
    (out / "model_final.safetensors").unlink()  # as a run killed while writing step 2 (it never finished)
    summary = run(lean_cfg(out, train__max_steps=3), resume=True)
    err = capsys.readouterr().out + capsys.readouterr().err
    assert summary["step"] == 3
    assert [r["step"] for r in train_lines(out)] == [1, 2, 3]
    assert "step_00000002" in err and "damaged" in err and "torn" in err


def test_a_used_folder_needs_resume_and_a_changed_config_needs_force(tmp_path):
    from training.resume import RunFolderError
    from training.train import main

    out = tmp_path / "run"
    run(lean_cfg(out, train__max_steps=1))
    with pytest.raises(RunFolderError, match="already holds a training run.*--resume"):
        run(lean_cfg(out, train__max_steps=1))
    with pytest.raises(RunFolderError, match=r"optim\.lr: 0\.001 -> 0\.002.*--force"):
        run(lean_cfg(out, train__max_steps=2, optim__lr=0.002), resume=True)
    assert run(lean_cfg(out, train__max_steps=2, optim__lr=0.002), resume=True, force=True)["step"] == 2
    # the log reads as one run (defect: the first session's end line stayed between steps 1 and 2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "end"] == [2] and records[-1]["kind"] == "end"
    # review: an export of step 1 was stamped with the config.json the forced resume rewrote (lr 0.002)
    from training.export_model import export_run

    for ref, lr in ((out / "checkpoints" / "step_00000001", 0.001), (out, 0.002)):
        weights = export_run(ref, tmp_path / f"export_{lr}")["weights"]
        assert json.loads(load_checkpoint(weights).metadata["training_config"])["optim"]["lr"] == lr
    assert main(["--config", str(TINY), "--output-dir", str(out)]) == 2
    notes = tmp_path / "notes.txt"  # defect: a file as --output-dir ended in a FileExistsError traceback
    notes.write_text("mine")
    with pytest.raises(RunFolderError, match=re.escape(f"the run folder {notes} (train.output_dir, --output-dir) "
                                                       "is a file; give a folder")):
        run(lean_cfg(notes, train__max_steps=1))


def test_a_run_recorded_before_a_key_existed_resumes_without_force():
    # config.json of an older run lacks newer keys: they count as their defaults, not as changes
    from training.config import Config
    from training.resume import config_changes

    new = Config().to_dict()
    old = {s: {k: v for k, v in values.items() if k != "init_parts"} for s, values in new.items()}
    assert config_changes(old, new) == []
    new["model"]["init_parts"] = ["unet", "vae"]
    assert config_changes(old, new) == ["model.init_parts: None -> ['unet', 'vae']"]
    # what is validated on and gradient checkpointing leave the steps as they were (defect: --force asked)
    changed = json.loads(json.dumps(new))
    changed["data"].update(val_size=1, val_crop=64, val_root="val", val_list_file="val.txt")
    changed["train"]["gradient_checkpointing"] = True
    assert config_changes(new, changed) == []


def test_an_extended_run_is_no_longer_its_old_final_model(tmp_path, monkeypatch, finished_run):
    """Defect: a finished run resumed with a larger train.max_steps and stopped half-way still ran (and
    exported) its old model_final.safetensors; resumed with a smaller one, it 'finished' past it."""
    from tadisr_core.model_ref import resolve_model
    from training.resume import RunFolderError
    from training.train import Trainer

    out = _copy_of(finished_run, tmp_path / "run")
    assert resolve_model(out).checkpoint == out / "model_final.safetensors"
    step = Trainer.train_step

    def interrupted_at_step_4(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(lean_cfg(out, train__max_steps=5), resume=True)
    assert resolve_model(out).checkpoint == out / "checkpoints" / "step_00000003" / "model.safetensors"
    with pytest.raises(RunFolderError, match=r"the run is at step 3, past train\.max_steps = 1: nothing to train"):
        run(lean_cfg(out, train__max_steps=1), resume=True, force=True)
    # a model_final that no checkpoint holds (checkpoints deleted to save space) is never trained over
    other = _copy_of(finished_run, tmp_path / "other")
    final = (other / "model_final.safetensors").read_bytes()
    shutil.rmtree(other / "checkpoints")
    with pytest.raises(RunFolderError, match=r"model_final\.safetensors is the only copy of its weights"):
        run(lean_cfg(other, train__max_steps=4), resume=True, force=True)
    with pytest.raises(RunFolderError, match="already holds a training run"):
        run(lean_cfg(other, train__max_steps=4))
    assert (other / "model_final.safetensors").read_bytes() == final and train_lines(other)[-1]["step"] == 2


def test_a_run_that_saved_no_checkpoint_starts_over_without_its_old_log_lines(tmp_path):
    """Defect: --resume on a run that crashed before its first checkpoint started at step 0 but kept the
    crashed run's lines, so metrics.jsonl held step 1 twice; the refusal said 'continue' with nothing to, also
    when a save cut short had left a checkpoints/ folder."""
    from training.resume import RunFolderError

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "total": 9.0}) + "\n")
    (out / "checkpoints" / "step_00000001.tmp").mkdir(parents=True)  # a save a second Ctrl-C cut short
    with pytest.raises(RunFolderError, match=r"pass --resume to start it over \(it saved no checkpoint\)"):
        run(lean_cfg(out))
    run(lean_cfg(out, train__max_steps=2), resume=True)
    assert [r["step"] for r in train_lines(out)] == [1, 2] and train_lines(out)[0]["total"] != 9.0


def test_resume_with_force_trains_on_with_the_changed_optimiser_settings(tmp_path):
    """Defect: `--resume --force` with another optim.lr said it continued with the change, but the loaded
    optimiser and scheduler states kept the old rate (and betas, weight decay, eps)."""
    from training.train import Trainer

    out = tmp_path / "run"
    run(lean_cfg(out, optim__warmup_steps=4, train__checkpoint_every=2))  # steps 1-2 at lr 1e-3, warming up
    new = dict(optim__warmup_steps=4, optim__lr=1e-5, optim__betas=[0.8, 0.99], optim__weight_decay=0.5,
               optim__eps=1e-6, train__checkpoint_every=2)
    trainer = Trainer(lean_cfg(out, train__max_steps=4, **new), resume=True, force=True)
    for group in trainer.optimizer.param_groups:                     # step 3 of the warm-up: 3/4 of the rate
        assert group["lr"] == pytest.approx(1e-5 * 3 / 4) and group["initial_lr"] == 1e-5
        assert tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.5 and group["eps"] == 1e-6
    assert trainer.scheduler.base_lrs == [1e-5] * len(trainer.optimizer.param_groups)
    trainer.run()
    assert [r["lr"] for r in train_lines(out)] == pytest.approx([1e-3 / 4, 1e-3 / 2, 1e-5 * 3 / 4, 1e-5])
    # recorded as it ran: a resume without --force finds no change, and the same rate
    again = Trainer(lean_cfg(out, train__max_steps=5, **new), resume=True)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_a_resume_that_changes_the_trainable_set_is_refused_before_anything_is_removed(tmp_path, finished_run):
    """Defect: `--resume --force --set ablation.no_jsd=true` failed with torch's "loaded state dict contains
    a parameter group that doesn't match the size of optimizer's group", after removing model_final."""
    from training.resume import RunFolderError

    out = _copy_of(finished_run, tmp_path / "run")
    final = (out / "model_final.safetensors").read_bytes()
    step2 = re.escape(str(out / "checkpoints" / "step_00000002"))
    refused = (rf"^--resume: the trainable parameters changed since {step2} \(\d+ -> \d+ tensors.*not even with "
               rf"--force\): start a new run .*--set model\.init_checkpoint=\"{step2}/model\.safetensors\"$")
    with pytest.raises(RunFolderError, match=refused):
        run(lean_cfg(out, train__max_steps=4, ablation__no_jsd=True), resume=True, force=True)
    assert (out / "model_final.safetensors").read_bytes() == final
    # a checkpoint from before the trainable names were recorded: its optimiser state tells
    state_file = out / "checkpoints" / "step_00000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["trainable"]
    torch.save(state, state_file)
    with pytest.raises(RunFolderError, match=refused):
        run(lean_cfg(out, train__max_steps=4, ablation__no_jsd=True), resume=True, force=True)
    assert (out / "model_final.safetensors").read_bytes() == final


def test_a_resume_does_without_a_deleted_init_checkpoint_its_checkpoints_hold(tmp_path, capsys, finished_run):
    """Defect: a resume read model.init_checkpoint again, although the run's checkpoints hold every weight
    it gave; a deleted one failed with "checkpoint not found: X", naming no key, after removing model_final.
    The init checkpoint: a copy of `finished_run`'s final model (a random base: the backbone included)."""
    from safetensors.torch import load_file

    init = Path(shutil.copy(finished_run / "model_final.safetensors", tmp_path / "prior.safetensors"))
    assert load_checkpoint(init).includes_backbone
    out = tmp_path / "run"
    run(lean_cfg(out, model__init_checkpoint=str(init), train__checkpoint_every=2))
    init.unlink()
    summary = run(lean_cfg(out, model__init_checkpoint=str(init), train__max_steps=3, train__checkpoint_every=2),
                  resume=True)
    assert summary["step"] == 3 and "is gone" in capsys.readouterr().out
    assert load_file(out / "model_final.safetensors").keys() == load_file(out / "checkpoints" / "step_00000002"
                                                                            / "model.safetensors").keys()
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint: checkpoint not found: .*prior"):
        run(lean_cfg(tmp_path / "new", model__init_checkpoint=str(init)))  # a new run needs it: the key is named


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory, tiny_dir) -> Path:
    """A one-step run on the tiny Kolors base that trained the whole backbone, at a rate that moves each
    weight well past the fp8 tolerance of `checkpoint.check_base`. Tests take a copy (`_backbone_run`):
    they delete its model_final as the init checkpoint of their runs."""
    out = tmp_path_factory.mktemp("backbone") / "kbb"
    run(lean_cfg(out, model__train_backbone=True, optim__lr=0.05, train__max_steps=1, **_kolors(tiny_dir)))
    return out


def _kolors(tiny_dir) -> dict:
    return dict(model__kolors_dir=str(tiny_dir["kolors"]), model__prompt_cache=str(tiny_dir["prompt_cache"]))


def _backbone_run(tmp_path: Path, tiny_dir, backbone_run: Path) -> tuple[dict, Path]:
    """The tiny Kolors base's settings, and a copy of `backbone_run`'s model_final in tmp_path/kbb."""
    return _kolors(tiny_dir), _copy_of(backbone_run, tmp_path / "kbb") / "model_final.safetensors"


def test_an_adapters_run_started_from_a_trained_backbone_runs_alone_and_exports(tmp_path, tiny_dir, capsys,
                                                                                 backbone_run):
    """Defect: an adapters-only run (a frozen Kolors base) whose model.init_checkpoint is a run that trained
    the backbone saved the adapters only, fitting no Kolors files: `--model RUN` was refused ("trained on a
    different base model ... Load it with the Kolors files it was trained on", the folder it had loaded) and
    export_model refused it as adapters-only. It saves the whole backbone: it runs alone as it trained,
    exports, and resumes without the init checkpoint."""
    from tadisr_core.model_ref import load_model, load_standalone
    from training.export_model import export_run
    from training.train import Trainer

    kolors, init = _backbone_run(tmp_path, tiny_dir, backbone_run)
    out = tmp_path / "kb3"
    cfg = lean_cfg(out, model__init_checkpoint=str(init), train__checkpoint_every=2, **kolors)
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
    summary = run(lean_cfg(out, model__init_checkpoint=str(init), train__max_steps=3, train__checkpoint_every=2,
                           **kolors), resume=True)
    assert summary["step"] == 3 and "is gone" in capsys.readouterr().out


def test_a_run_that_left_out_its_init_backbone_says_so(tmp_path, tiny_dir, monkeypatch, backbone_run):
    """Such a run trained by an older version (adapters only, recording that its resume needs the init
    checkpoint): `--model RUN` says where its backbone came from instead of advising the very folder it
    loaded, and its resume without the init checkpoint is refused naming the key, removing nothing."""
    from tadisr_core.checkpoint import BaseMismatchError
    from tadisr_core.model_ref import load_model
    from training.config import ModelConfig

    kolors, init = _backbone_run(tmp_path, tiny_dir, backbone_run)
    out = tmp_path / "run"
    with monkeypatch.context() as old:  # the older version: the init checkpoint's backbone is not saved
        old.setattr(ModelConfig, "saves_backbone", property(lambda m: m.train_backbone or not m.has_base))
        run(lean_cfg(out, model__init_checkpoint=str(init), train__max_steps=1, **kolors))
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
        run(lean_cfg(out, model__init_checkpoint=str(init), train__max_steps=2, **kolors), resume=True)
    del state["init_checkpoint_needed"]  # from before the need was recorded
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint not found: .*may not hold every weight"):
        run(lean_cfg(out, model__init_checkpoint=str(init), train__max_steps=2, **kolors), resume=True)
    assert (out / "model_final.safetensors").read_bytes() == final
