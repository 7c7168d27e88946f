"""The trainer on the tiny config: loss falls, exact resume, DDP on two CPU processes, SIGTERM,
non-finite steps, gradient checkpointing, ablations, configs, the training-step benchmark (its data:
test_train_data.py)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from tadisr_core.spec import VARIANTS
from tests.processes import REPO, subprocess_env, train_on_two_processes
from tests.tiny_training import TINY, lean_cfg, run, tiny_cfg, tiny_overrides, train_lines
from training.config import Config, ConfigError, load_config

ARTIFACTS = REPO / "artifacts"


# -- the long one ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_config_trains_and_loss_falls(tmp_path, lpips_dir, capsys):
    cfg = load_config(TINY, tiny_overrides(tmp_path, lpips_dir, train__validate_every=20))
    assert cfg.train.max_steps == 40
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    lines = train_lines(tmp_path)
    assert [r["step"] for r in lines] == list(range(1, 41)) and summary["step"] == 40
    first = sum(r["total"] for r in lines[:10]) / 10
    last = sum(r["total"] for r in lines[-10:]) / 10
    report = {"first10_mean_total": first, "last10_mean_total": last, "ratio": last / first,
              "seconds": round(seconds, 1), "s_per_step": round(seconds / 40, 3),
              "first10": [round(r["total"], 4) for r in lines[:10]],
              "last10": [round(r["total"], 4) for r in lines[-10:]]}
    message = (f"tiny.yaml 40 steps: mean total loss first 10 = {first:.4f}, last 10 = {last:.4f} "
               f"({seconds:.1f} s, {seconds / 40:.2f} s/step)")
    with capsys.disabled():  # shown with or without -s
        print("\n" + message)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "train_tiny_loss.json").write_text(json.dumps(report, indent=2))
    assert last < 0.9 * first, f"loss did not fall clearly: {message}"
    # every term is logged, validation ran, checkpoints and final weights exist
    terms = {"mse", "lpips", "mfl", "mask_mse", "mask_focal", "mask_dice", "total"}
    assert terms | {"lr", "samples_per_s", "grad_norm"} <= set(lines[0])
    assert (tmp_path / "samples" / "step_00000020.png").is_file()
    assert (tmp_path / "checkpoints" / "step_00000040" / "model.safetensors").is_file()
    from tadisr_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "model_final.safetensors")
    assert ckpt.spec.variant == "paper" and ckpt.metadata["train_step"] == "40"


def test_a_run_says_what_it_trains_at_its_start(tmp_path, capsys):
    """Review: a run never said how many tensors and parameters it trains, the first check of a new setup."""
    from training.train import Trainer

    trainer = Trainer(lean_cfg(tmp_path, train__max_steps=1))
    [line] = [s for s in capsys.readouterr().out.splitlines() if s.startswith("trains ")]
    grads = [p for p in trainer.model.parameters() if p.requires_grad]
    assert line.startswith(f"trains {len(grads)} tensors, {sum(p.numel() for p in grads):,} parameters: unet ")
    assert ", vae " in line and ", mi_decoder " in line


def test_a_run_on_a_random_base_is_a_model_by_itself(tmp_path):
    """tiny.yaml trains adapters on a random backbone that no Kolors folder holds: the run saves that
    backbone too, so `--model RUN` runs it with no other weights (the README's training step 3)."""
    from tadisr_core.checkpoint import load_checkpoint
    from tadisr_core.model_ref import load_model
    from training.train import Trainer

    trainer = Trainer(lean_cfg(tmp_path, train__max_steps=1))
    assert trainer.cfg.model.kolors_dir is None and not trainer.cfg.model.train_backbone
    key = "conv_out.base_layer.weight"  # a frozen base weight of the UNet
    base = dict(trainer.model.unet.named_parameters())[key].detach().clone()
    trainer.run()
    ckpt = load_checkpoint(tmp_path / "model_final.safetensors")
    assert ckpt.includes_backbone and torch.equal(ckpt.groups["unet"][key], base)  # saved, still untrained
    model = load_model(tmp_path, merge_lora_weights=False)  # no --kolors
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(x), model(x)
    assert torch.equal(got.image, want.image) and torch.equal(got.mask_logits, want.mask_logits)


def test_a_run_on_kolors_files_records_its_base_and_runs_as_a_model(tmp_path, tiny_dir, monkeypatch):
    """An all-in-one Kolors checkpoint (UNet and VAE in one file, as models/checkpoints keeps it) as
    `model.unet`, no Kolors folder: the run saves adapters only, and `--model RUN` finds that base in
    its config.json with no base flag; when a relative path there cannot be found, the message says
    where it came from and what it is relative to."""
    from safetensors.torch import load_file, save_file

    from tadisr_core.checkpoint import load_checkpoint
    from tadisr_core.kolors_files import KolorsFolderError
    from tadisr_core.kolors_identity import CHECKPOINT_SECTIONS
    from tadisr_core.model_ref import load_model
    from training.train import Trainer

    kolors, run_dir = tiny_dir["kolors"], tmp_path / "run"
    tensors = {f"{CHECKPOINT_SECTIONS[part]}{k}": v for part in ("unet", "vae")
               for k, v in load_file(kolors / part / "diffusion_pytorch_model.safetensors").items()}
    monkeypatch.chdir(tmp_path)  # the config names the file relative to the folder training runs in
    save_file(tensors, "kolors_aio.safetensors",  # the tiny structure in its metadata, as the tiny files do
              metadata={f"{part}_config": (kolors / part / "config.json").read_text() for part in ("unet", "vae")})
    base = {"model__prompt_cache": str(tiny_dir["prompt_cache"]), "train__max_steps": 1}
    no_vae = tmp_path / "KolorsNoVae"  # kijai's wrapper keeps Kolors so: the VAE goes in model.vae
    shutil.copytree(kolors, no_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ConfigError, match=r"model\.vae\): \S*KolorsNoVae has no vae/ folder.* are "
                                          r"model\.kolors_dir, model\.unet and model\.vae\)$"):
        Trainer(lean_cfg(run_dir, model__kolors_dir=str(no_vae), **base))
    trainer = Trainer(lean_cfg(run_dir, model__unet="kolors_aio.safetensors", **base))
    trainer.run()
    assert json.loads((run_dir / "config.json").read_text())["model"]["unet"] == "kolors_aio.safetensors"
    ckpt = load_checkpoint(run_dir / "model_final.safetensors")
    assert not ckpt.includes_backbone and ckpt.metadata["backbone"] == "external"
    model = load_model(run_dir, merge_lora_weights=False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        want, got = trainer.model(x), model(x)
    assert torch.equal(got.image, want.image) and torch.equal(got.mask_logits, want.mask_logits)
    monkeypatch.chdir(run_dir)
    recorded = re.escape(str(run_dir / "config.json"))
    with pytest.raises(KolorsFolderError, match=rf"^unet weights not found: kolors_aio\.safetensors \(the Kolors base "
                                                rf"recorded in {recorded}, whose relative paths are relative to the "
                                                rf"folder training ran in"):
        load_model(run_dir)


def test_kolors_files_without_a_folder_build_the_same_model(tiny_dir, tmp_path):
    """`model.unet` + `model.vae` (here component folders) stand without `model.kolors_dir`, given a prompt cache."""
    from training.builders import build_model_from_config
    from training.config import config_from_dict

    unet, vae = (str(tiny_dir["kolors"] / part) for part in ("unet", "vae"))
    with pytest.raises(ConfigError, match=r"c\.yaml: a base of model\.unet / model\.vae files without "
                                          r"model\.kolors_dir needs model\.prompt_cache .*model\.text_encoder"):
        config_from_dict({"model": {"unet": unet, "vae": vae}}, "c.yaml").validate("c.yaml")
    prompt = str(tiny_dir["prompt_cache"])
    with pytest.raises(ConfigError, match=r"model\.vae\): no vae given: pass --kolors DIR .* or --vae FILE\|DIR; .* "
                                          r"are model\.kolors_dir, model\.unet and model\.vae\)$"):
        build_model_from_config(config_from_dict({"model": {"unet": unet, "prompt_cache": prompt}}, "c.yaml"))
    with pytest.raises(ConfigError, match=r"^model\.prompt_cache not found: \S*missing\.safetensors; give an existing "
                                          r"prompt cache, or model\.text_encoder \(a ChatGLM3 folder or file\) or "
                                          r"model\.kolors_dir to compute it there$"):
        build_model_from_config(config_from_dict({"model": {"unet": unet, "vae": vae, "prompt_cache": str(
            tmp_path / "missing.safetensors")}}, "c.yaml"))
    folder = Config()
    folder.model.kolors_dir, folder.model.prompt_cache = str(tiny_dir["kolors"]), prompt
    files = config_from_dict({"model": {"unet": unet, "vae": vae, "prompt_cache": prompt}}, "c.yaml").validate("c.yaml")
    want, got = build_model_from_config(folder).state_dict(), build_model_from_config(files).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())


# -- resume ---------------------------------------------------------------------------------------
def test_resume_reproduces_uninterrupted_run(tmp_path, lpips_dir):
    """4 steps in one go and as 2 + 2 resumed: the steps after the resume (data order, random state,
    optimiser moments) and the final weights are the same. The uninterrupted run saves its final step only."""
    from safetensors.torch import load_file

    full, split = tmp_path / "full", tmp_path / "split"
    run(tiny_cfg(full, lpips_dir, train__max_steps=4, train__checkpoint_every=4))
    run(tiny_cfg(split, lpips_dir, train__max_steps=2, train__checkpoint_every=2))
    summary = run(tiny_cfg(split, lpips_dir, train__max_steps=4, train__checkpoint_every=2), resume=True)
    assert summary["step"] == 4
    a, b = train_lines(full), train_lines(split)
    assert [r["step"] for r in b] == list(range(1, 5))
    for ra, rb in zip(a[2:], b[2:], strict=True):
        for key in ("mse", "lpips", "mfl", "mask_mse", "mask_focal", "mask_dice", "total"):
            assert abs(ra[key] - rb[key]) <= 1e-6, f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    wa, wb = load_file(full / "model_final.safetensors"), load_file(split / "model_final.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-6


def test_resume_without_checkpoint_starts_fresh(tmp_path, lpips_dir):
    summary = run(tiny_cfg(tmp_path, lpips_dir, train__max_steps=1), resume=True)
    assert summary["step"] == 1


# -- distributed ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path, lpips_dir):
    """A checkpoint every 2 steps and at the last: step 2 is the one a damaged step 3 falls back to."""
    args = ["--config", str(TINY), "--max-steps", "3", "--output-dir", str(tmp_path)]
    for item in tiny_overrides(tmp_path, lpips_dir, train__weight_digest=True, train__checkpoint_every=2,
                               train__keep_checkpoints=0):
        args += ["--set", item]
    proc = train_on_two_processes(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d0 = (tmp_path / "weight_digest_rank0.txt").read_text().strip()
    d1 = (tmp_path / "weight_digest_rank1.txt").read_text().strip()
    assert d0 == d1 and len(d0) == 64
    lines = train_lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]  # logged by the main process only
    assert all(r["samples_per_s"] > 0 and not r["skipped"] for r in lines)
    # one process resuming it would halve the global batch: not without --force
    from training.resume import RunFolderError

    with pytest.raises(RunFolderError, match=r"number of processes: 2 -> 1 \(global batch 2 -> 1 .*--force"):
        run(tiny_cfg(tmp_path, lpips_dir, train__max_steps=4, train__weight_digest=True), resume=True)
    # only rank 1's file of the newest checkpoint damaged: both processes resume the one before (defect: rank 1
    # alone fell back a step, and the two waited on each other's collectives)
    newest = tmp_path / "checkpoints" / "step_00000003"
    (newest / "rank_1.pt").write_bytes((newest / "rank_1.pt").read_bytes()[:100])
    (tmp_path / "model_final.safetensors").unlink()  # as a run killed while rank 1 wrote step 3
    proc = train_on_two_processes([*args[:2], "--max-steps", "4", *args[4:], "--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"warning: checkpoint {newest} is damaged" in proc.stdout + proc.stderr
    assert [r["step"] for r in train_lines(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "weight_digest_rank0.txt").read_text() == (tmp_path / "weight_digest_rank1.txt").read_text()


# -- interruption and failure -----------------------------------------------------------------
def test_nonfinite_step_is_skipped(tmp_path):
    from safetensors.torch import load_file

    cfg = lean_cfg(tmp_path, train__inject_nonfinite_at=[2])  # a checkpoint after each of its 2 steps
    summary = run(cfg)
    lines = train_lines(tmp_path)
    assert [r["skipped"] for r in lines] == [False, True] and summary["nonfinite"] == 1
    w1 = load_file(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors")
    w2 = load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # no optimiser update on the skipped step


def test_too_many_nonfinite_steps_abort(tmp_path, lpips_dir):
    from training.train import TrainingAborted

    cfg = tiny_cfg(tmp_path, lpips_dir, train__max_steps=5, train__max_nonfinite=1, train__inject_nonfinite_at=[1, 2])
    with pytest.raises(TrainingAborted, match="max_nonfinite = 1"):
        run(cfg)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: a test that trains in another
    precision starts from a fresh one and leaves one."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, fp16 trains under a grad scaler")
def test_fp16_without_cuda_says_it_trains_in_fp32_and_skips_a_nonfinite_gradient(
        tmp_path, lpips_dir, capsys, fresh_accelerator_state):
    """Defect: fp16 without CUDA silently trained in fp32, and its non-finite gradients were left to a grad
    scaler that does not exist there: the step was taken and every weight became NaN."""
    from training.train import Trainer

    trainer = Trainer(tiny_cfg(tmp_path, lpips_dir, loss__lpips_net="none", loss__lpips=0, train__max_steps=2,
                               train__mixed_precision="fp16"))
    said = capsys.readouterr().out
    assert re.search(r"warning: train\.mixed_precision = fp16 needs a CUDA GPU .*trains in fp32", said)
    loss = trainer.loss_fn

    def nonfinite_gradient_at_step_1(image, hr, logits, mask):
        out = dict(loss(image, hr, logits, mask))
        if trainer.step == 0:  # a finite loss with a non-finite gradient, as an overflow in backward gives
            out["total"] = out["total"] + (image.mean() - image.mean().detach()).abs().sqrt()
        return out

    trainer.loss_fn = nonfinite_gradient_at_step_1
    trainer.run()
    assert [(r["skipped"], math.isfinite(r["total"])) for r in train_lines(tmp_path)] == [(True, True), (False, True)]
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_a_checkpoint_keeps_the_grad_scaler_state(tmp_path, lpips_dir, monkeypatch):
    """fp16 on a GPU trains under Accelerate's grad scaler, whose loss scale is found over many steps: a
    checkpoint keeps it and a resume goes on with it (a CPU scaler stands in for the GPU's here)."""
    import accelerate

    from training.train import Trainer

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    cfg = tiny_cfg(tmp_path, lpips_dir, loss__lpips_net="none", loss__lpips=0, train__max_steps=2)
    trainer = Trainer(cfg)
    reached = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 100,
               "_growth_tracker": 7}
    trainer.acc.scaler.load_state_dict(reached)
    trainer.step = 1
    trainer.save_checkpoint()
    assert Trainer(cfg, resume=True).acc.scaler.state_dict() == reached


def test_a_step_the_grad_scaler_skips_is_logged_as_skipped_and_the_schedule_waits(tmp_path, lpips_dir, monkeypatch):
    """Defect: under fp16's grad scaler an overflowing step (the scaler skips the update and lowers its scale)
    was logged as taken and advanced the learning-rate schedule (a CPU scaler stands in for the GPU's)."""
    import accelerate

    from training.train import Trainer

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    trainer = Trainer(tiny_cfg(tmp_path, lpips_dir, loss__lpips_net="none", loss__lpips=0, train__max_steps=3,
                               optim__warmup_steps=2))
    loss = trainer.loss_fn

    def overflow_at_step_2(image, hr, logits, mask):
        out = dict(loss(image, hr, logits, mask))
        if trainer.step == 1:  # a finite loss whose gradient overflows
            out["total"] = out["total"] + (image.mean() - image.mean().detach()).abs().sqrt()
        return out

    trainer.loss_fn = overflow_at_step_2
    trainer.run()
    lines = train_lines(tmp_path)
    assert [r["skipped"] for r in lines] == [False, True, False] and lines[-1]["nonfinite"] == 0
    assert [r["lr"] for r in lines] == [lines[0]["lr"], lines[1]["lr"], lines[1]["lr"]]  # no step of the schedule
    assert trainer.scheduler.last_epoch == 2 and trainer.acc.scaler.get_scale() < 65536.0


def test_validation_after_fused_optimiser_steps_uses_the_trained_prompt_projections(tmp_path, lpips_dir):
    """Defect: validation cached the prompt's cross-attention keys and values, and fused AdamW writes the
    to_k / to_v weights in place without the version bump that would renew them: every validation after
    the first ran with the weights of the first."""
    from training.train import Trainer

    trainer = Trainer(tiny_cfg(tmp_path, lpips_dir, loss__lpips_net="none", loss__lpips=0, train__max_steps=3,
                               model__train_backbone=True, optim__lr=1e-2))
    trainer.validate()  # caches the prompt's keys and values
    trainer.run()
    after = trainer.validate()
    trainer.model.prompt_kv.clear()
    fresh = trainer.validate()
    assert (after["psnr"], after["ssim"]) == (fresh["psnr"], fresh["ssim"])


# -- model variants, ablations, checkpointing ---------------------------------------------------
def test_gradient_checkpointing_matches_plain_run(tmp_path):
    """TACA capture + UNet checkpointing: same losses (the capture is repeated on recomputation; the second
    step's loss shows the first step's gradients). LPIPS, outside the model, is left out."""
    plain = run(lean_cfg(tmp_path / "plain", train__checkpoint_every=2))
    gc = run(lean_cfg(tmp_path / "gc", train__checkpoint_every=2, train__gradient_checkpointing=True))
    assert plain["step"] == gc["step"] == 2
    for a, b in zip(train_lines(tmp_path / "plain"), train_lines(tmp_path / "gc")):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5, abs=1e-6)


def test_ablations_change_model_and_terms(tmp_path, lpips_dir):
    from training.train import Trainer

    no_jsd = Trainer(tiny_cfg(tmp_path / "jsd", lpips_dir, train__max_steps=1, ablation__no_jsd=True))
    before = {n: p.detach().clone() for n, p in no_jsd.model.mi_decoder.named_parameters()}
    assert not any(n.startswith("mi_decoder.") for n, _ in no_jsd.trainable)
    no_jsd.run()
    assert set(train_lines(tmp_path / "jsd")[0]) >= {"mse", "lpips"}
    assert not {"mfl", "mask_mse", "mask_focal", "mask_dice"} & set(train_lines(tmp_path / "jsd")[0])
    after = dict(no_jsd.model.mi_decoder.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.abs().sum() == 0 for n, p in after.items() if n.endswith(".a_l"))

    no_taca = Trainer(tiny_cfg(tmp_path / "taca", lpips_dir, train__max_steps=1, ablation__no_taca=True,
                               ablation__no_mfl=True))
    assert no_taca.model.spec.mask_input == "mid-block" and not no_taca.model.needs_attention
    no_taca.run()
    line = train_lines(tmp_path / "taca")[0]
    assert "mfl" not in line and "mask_dice" in line and not line["skipped"]


def test_trainable_set(tiny_model_factory):
    from training.builders import configure_trainable

    model = tiny_model_factory("paper")
    names = {n for n, _ in configure_trainable(model)}
    assert names and all(n.startswith(("unet.", "vae.", "mi_decoder.")) for n in names)
    assert {n for n in names if n.startswith("unet.")} == {
        n for n, _ in model.unet.named_parameters(prefix="unet") if "lora_" in n or n.startswith("unet.conv_in.")}
    assert any("skip_conv_2.base_layer.weight" in n for n in names)
    assert "mi_decoder.attention_proj.weight" in names
    assert not any(n.startswith("unet.") and "lora_" not in n and "conv_in" not in n for n in names)
    frozen = [n for n, p in model.vae.named_parameters() if not p.requires_grad]
    assert "encoder.conv_in.base_layer.weight" in frozen


def test_build_from_kolors_folder_and_checkpoint(tiny_dir):
    from tadisr_core.checkpoint import load_checkpoint, trainable_state_dict
    from training.builders import build_model_from_config

    cfg = Config()
    cfg.model.variant = "release"
    cfg.model.kolors_dir, cfg.model.init_checkpoint = str(tiny_dir["kolors"]), str(tiny_dir["checkpoint"])
    cfg.model.prompt_cache = str(tiny_dir["prompt_cache"])
    model = build_model_from_config(cfg)
    ckpt = load_checkpoint(tiny_dir["checkpoint"])
    got = trainable_state_dict(model)["unet"]
    assert all(torch.equal(got[k], v) for k, v in ckpt.groups["unet"].items())
    cfg.model.variant = "paper"
    with pytest.raises(ConfigError, match="release"):
        build_model_from_config(cfg)


# In each rank of the launcher: every ChatGLM3 load and LPIPS fetch is logged, slowly (a big model, a download);
# the fetch writes weights of the right shapes, as no package index is needed.
COUNT_DOWNLOADS = '''
import os, time
if os.environ.get("RANK"):
    from tadisr_core import prompt
    from training import convert_lpips_weights

    def logged(what):
        with open(os.environ["LOADS_LOG"], "a") as f:
            f.write(f"{what} {os.environ['RANK']}\\n")
        time.sleep(2)

    _load = prompt._load_chatglm
    def load(*a, **kw):
        logged("chatglm")
        return _load(*a, **kw)

    def fetch(out_dir=None, instead=None):
        import torch
        from safetensors.torch import save_file
        from training.lpips import state_dict_keys, weights_filename
        logged("lpips")
        out_dir.mkdir(parents=True, exist_ok=True)
        for net in ("alex", "vgg"):
            save_file({k: torch.rand(s) for k, s in state_dict_keys(net).items()}, str(out_dir / weights_filename(net)))

    prompt._load_chatglm, convert_lpips_weights.fetch_default = load, fetch
'''


@pytest.mark.slow
def test_two_processes_compute_the_prompt_and_fetch_lpips_once(tiny_dir, tmp_path):
    """Defect: under a launcher every rank computed a missing prompt conditioning with ChatGLM3 (12.5 GB of
    RAM each for Kolors') and fetched and converted missing LPIPS weights, all at once. The main process
    computes and fetches them; the others then read its files."""
    site, log = tmp_path / "site", tmp_path / "loads.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNT_DOWNLOADS)
    args = ["--config", str(TINY), "--max-steps", "1", "--output-dir", str(tmp_path / "run")]
    for item in (f"model.kolors_dir={tiny_dir['kolors']}", f"model.init_checkpoint={tiny_dir['checkpoint']}",
                 "model.variant=release", "train.validate_every=0"):
        args += ["--set", item]
    caches = {"TADISR_PROMPT_CACHE_DIR": str(tmp_path / "kept"), "TADISR_LPIPS_DIR": str(tmp_path / "lpips")}
    proc = train_on_two_processes(args, PYTHONPATH=f"{REPO}:{site}", LOADS_LOG=str(log), **caches)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(log.read_text().splitlines()) == ["chatglm 0", "lpips 0"]

def test_a_kolors_run_without_a_prompt_cache_keeps_the_one_it_computes(tiny_dir, tmp_path, monkeypatch):
    """Defect: a run on a Kolors folder without model.prompt_cache loaded ChatGLM3 at every start and resume."""
    from tadisr_core import prompt
    from training.builders import build_model_from_config

    computed = []  # each time ChatGLM3 is loaded
    load = prompt._load_chatglm
    monkeypatch.setattr(prompt, "_load_chatglm", lambda *a, **kw: computed.append(a[0]) or load(*a, **kw))
    monkeypatch.setenv("TADISR_PROMPT_CACHE_DIR", str(tmp_path / "kept"))
    cfg = Config()
    cfg.model.variant = "release"
    cfg.model.kolors_dir, cfg.model.init_checkpoint = str(tiny_dir["kolors"]), str(tiny_dir["checkpoint"])
    first, resumed = (build_model_from_config(cfg).prompt for _ in range(2))
    assert computed == [tiny_dir["kolors"] / "text_encoder"] and len(list((tmp_path / "kept").iterdir())) == 1
    assert torch.equal(first.prompt_embeds, resumed.prompt_embeds)


def test_init_parts_start_another_variant_from_the_backbone(tmp_path):
    # the release-layout demo starts from the paper demo's backbone, with a fresh mask decoder
    from tadisr_core.checkpoint import CheckpointError, apply_checkpoint, load_checkpoint, save_model
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec
    from training.builders import build_model_from_config

    paper = build_model(tiny_spec("paper"), prompt=random_prompt(tiny_spec("paper")), seed=3)
    path = save_model(paper, tmp_path / "paper.safetensors", backbone=True)
    cfg = Config()
    cfg.model.variant, cfg.model.size, cfg.model.init_checkpoint = "release", "tiny", str(path)
    with pytest.raises(ConfigError, match=r"init_parts: \[unet, vae\]"):
        build_model_from_config(cfg)
    cfg.model.init_parts = ["unet", "vae"]
    said = []
    model = build_model_from_config(cfg, log=said.append)
    fresh = build_model_from_config(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, init_checkpoint=None, init_parts=None)))
    assert model.spec.variant == "release" and not model.needs_attention
    for part in ("unet", "vae"):  # taken whole
        want = getattr(paper, part).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(model, part).state_dict().items())
    got, init = model.mi_decoder.state_dict(), fresh.mi_decoder.state_dict()
    assert all(torch.equal(v, init[k]) for k, v in got.items())  # the config's own initialisation
    assert said == [f"model.init_parts: took unet, vae from {path}; kept their initialisation: mi_decoder"]
    with pytest.raises(ValueError, match=r"parts \['decoder'\]: choose among"):
        apply_checkpoint(model, load_checkpoint(path), ["decoder"])
    # the parts taken must fit whole: a checkpoint of another size is refused, not half loaded
    cfg.model.size = "demo"
    with pytest.raises(CheckpointError, match=r"paper\.safetensors(.|\n)*unet\.\S+: expected shape"):
        build_model_from_config(cfg)


def test_a_config_choice_that_does_not_fit_the_init_checkpoint_is_named(tmp_path):
    """Defect: `model.skip_convs` (default true) replaced a checkpoint's own setting, and a run started from a
    model trained without skip convs stopped on a list of missing tensors that named no key."""
    from tadisr_core.checkpoint import save_model
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec
    from training.builders import build_model_from_config

    spec = dataclasses.replace(tiny_spec("paper"), skip_convs=False)
    path = save_model(build_model(spec, prompt=random_prompt(spec), seed=3), tmp_path / "plain.safetensors",
                      backbone=True)
    cfg = Config()
    cfg.model.init_checkpoint = str(path)
    with pytest.raises(ConfigError, match=rf"^model\.init_checkpoint {re.escape(str(path))} does not fit this "
                                          r"config: model\.skip_convs = true but it has false\. Set those keys"):
        build_model_from_config(cfg)
    cfg.model.skip_convs, cfg.model.unet_rank = False, 8
    with pytest.raises(ConfigError, match=r"fit this config: model\.unet_rank = 8 but it has 4\. "):
        build_model_from_config(cfg)
    cfg.model.unet_rank, cfg.ablation.no_taca = None, True
    with pytest.raises(ConfigError, match=r'model\.mask_input \(ablation\.no_taca\) = "mid-block" but it has '
                                          r'"attention"'):
        build_model_from_config(cfg)
    cfg.ablation.no_taca = False
    assert not build_model_from_config(cfg).spec.skip_convs  # the checkpoint's own layout, taken whole


def test_init_parts_are_checked_when_the_config_loads():
    from training.config import config_from_dict

    base = {"model": {"init_checkpoint": "x.safetensors", "init_parts": ["unet", "decoder"]}}
    with pytest.raises(ConfigError, match=r"init_parts = \['unet', 'decoder'\]; choose .*'mi_decoder'"):
        config_from_dict(base, "c.yaml").validate("c.yaml")
    with pytest.raises(ConfigError, match="init_parts .* needs model.init_checkpoint"):
        config_from_dict({"model": {"init_parts": ["unet"]}}, "c.yaml").validate("c.yaml")


def test_fp16_training_runs_the_vae_and_decoders_in_fp32():
    """Defect: fp16 training kept the VAE's weights in fp32, but the step's fp16 autocast still ran its
    convolutions in fp16, where the SDXL VAE's activations overflow. The UNet alone runs in fp16."""
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec
    from training.builders import TrainingForward

    spec = tiny_spec("paper")
    model = build_model(spec, prompt=random_prompt(spec), seed=0)
    dtypes = {}
    for name, module in (("encoder", model.vae.encoder.conv_out), ("decoder", model.vae.decoder.conv_out),
                         ("unet", model.unet.conv_out)):
        module.register_forward_hook(lambda _m, _i, out, name=name: dtypes.__setitem__(name, out.dtype))
    lr = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = TrainingForward(model)(lr)
        assert dtypes == {"encoder": torch.float32, "decoder": torch.float32, "unet": torch.float32}
        with torch.autocast("cpu", dtype=torch.float16):
            TrainingForward(model)(lr)
            assert dtypes["decoder"] == torch.float16  # what plain autocast does
            got = TrainingForward(model, full_precision_vae=True)(lr)
    assert dtypes == {"encoder": torch.float32, "decoder": torch.float32, "unet": torch.float16}
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and (g - w).abs().max() < 0.05


def test_meta_materialise_gives_a_finite_model():
    from tadisr_core.model import build_model, random_prompt
    from tadisr_core.spec import tiny_spec
    from training.builders import materialise_random_

    spec = tiny_spec("paper")
    model = build_model(spec, device="meta")
    materialise_random_(model, "cpu")
    model.set_prompt(random_prompt(spec))
    out = model(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(out.image).all() and torch.isfinite(out.mask_logits).all()


# -- configuration -------------------------------------------------------------------------------
def test_config_files_load():
    for name in ("tiny", "kolors_ftsr", "kolors_realce"):
        cfg = load_config(REPO / "training" / "configs" / f"{name}.yaml")
        assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.max_grad_norm == 1.0
    ftsr = load_config(REPO / "training" / "configs" / "kolors_ftsr.yaml")
    assert (ftsr.data.crop, ftsr.train.mixed_precision, ftsr.train.gradient_checkpointing) == (768, "bf16", True)
    assert ftsr.optim.lr == 5e-5 and ftsr.loss.preset == "paper"
    assert load_config(REPO / "training" / "configs" / "kolors_realce.yaml").optim.lr == 2e-5


DEMO_PHASES = ("demo_prior", "demo", "demo_finetune", "demo_crop256")


def _make_recipe(target: str) -> str:
    """The lines of one Makefile target's recipe."""
    text = (REPO / "Makefile").read_text()
    return re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M).group(1)


def test_release_demo_starts_from_the_shipped_paper_demo_and_ships_where_the_loader_looks():
    from tadisr_core import model_ref
    from training.builders import init_checkpoint_file

    cfg = load_config(REPO / "training" / "configs" / "demo_release.yaml")
    paper = load_config(REPO / "training" / "configs" / f"{DEMO_PHASES[-1]}.yaml")
    assert (cfg.model.variant, cfg.model.size, cfg.model.train_backbone) == ("release", "demo", True)
    assert cfg.model.init_checkpoint == "demo"  # by name: found wherever the pack is installed
    assert init_checkpoint_file(cfg.model) == model_ref.DEMO_CHECKPOINT
    assert cfg.model.init_parts == ["unet", "vae"]
    assert cfg.data == paper.data  # phase 4's task...
    assert cfg.train.seed not in {load_config(REPO / "training" / "configs" / f"{p}.yaml").train.seed
                                  for p in DEMO_PHASES}  # ...on scenes no paper phase saw
    recipe = _make_recipe("demo-model-release")
    out = model_ref.DEMO_RELEASE_CHECKPOINT
    assert "--config training/configs/demo_release.yaml" in recipe
    assert f"{out.parent.relative_to(REPO)} --name {out.stem}\n" in recipe


def test_demo_phases_chain_by_their_defaults():
    # run without --output-dir, each demo phase starts from the one before it
    phases = [load_config(REPO / "training" / "configs" / f"{name}.yaml")
              for name in DEMO_PHASES]
    for before, after in zip(phases, phases[1:]):
        assert after.model.init_checkpoint == f"{before.train.output_dir}/model_final.safetensors"
    task_seeds = [p.train.seed for p in phases[1:]]
    assert len(set(task_seeds)) == len(task_seeds)  # each task phase sees fresh scenes
    # `make demo-model` runs them all, in this order, each from the run before it, each skipped when
    # finished and resumed when stopped (a trailing slash in DEMO_RUN is dropped)
    dry = subprocess.run(["make", "-n", "demo-model", "DEMO_RUN=runs/x/"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    runs = re.findall(r"test -f (\S+)/model_final\.safetensors \|\| .*--config training/configs/(\w+)\.yaml "
                      r"--output-dir (\S+) (?:--set model\.init_checkpoint=(\S+) )? *\$\(test -d (\S+) && echo "
                      r"--resume\)", dry)
    assert [name for _, name, _, _, _ in runs] == list(DEMO_PHASES)
    assert all(done == out == resumed and out.startswith("runs/x") for done, _, out, _, resumed in runs), runs
    for (_, _, out, _, _), (_, _, _, init, _) in zip(runs, runs[1:]):
        assert init == f"{out}/model_final.safetensors"


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """Defect: outside the repository root `--config training/configs/tiny.yaml` was not found, and the
    configs installed with the package could not be named at all."""
    from training.train import main, parse_args

    monkeypatch.chdir(tmp_path)
    tiny = load_config(TINY).to_dict()
    for given in ("tiny", "tiny.yaml", "training/configs/tiny.yaml"):
        assert load_config(given).to_dict() == tiny, given
    assert load_config("demo_release").model.variant == "release"
    (tmp_path / "tiny.yaml").write_text("train:\n  max_steps: 7\n")  # the path given wins when it exists
    assert load_config("tiny.yaml").train.max_steps == 7
    assert load_config("tiny").train.max_steps == tiny["train"]["max_steps"]
    (tmp_path / "demo").mkdir()  # defect: a folder of a shipped config's name hid the config ("not found")
    assert load_config("demo").to_dict() == load_config(REPO / "training" / "configs" / "demo.yaml").to_dict()
    for unknown in ("tinny", "elsewhere/tiny.yaml"):  # a name is a name; another folder is a path
        with pytest.raises(FileNotFoundError, match=rf"^config file not found: {unknown}; give a YAML file or a "
                                                    r"shipped config's name: demo, .*demo_release, .*tiny$"):
            load_config(unknown)
    assert main(["--config", "tinny", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file not found: tinny;") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "shipped config's name" in capsys.readouterr().out


def test_force_without_resume_is_a_usage_error(tmp_path, capsys):
    """Defect: `--force` without `--resume` was taken silently and did nothing (it only lets a resume go on
    with a changed config), so a user who meant a resume started a new run believing the flag applied.
    It is a usage error naming both flags, before any run folder is made."""
    from training.train import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "tiny", "--output-dir", str(out), "--force"])
    assert stopped.value.code == 2 and not out.exists()
    assert "--force only applies with --resume" in capsys.readouterr().err


def test_a_launchers_mixed_precision_other_than_the_configs_is_said(tmp_path, monkeypatch, capsys):
    """Review: `accelerate launch --mixed_precision bf16` trained in the config's fp32 without a word (the
    config's train.mixed_precision is the run's, recorded in its config.json)."""
    from training.train import Trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    Trainer(lean_cfg(tmp_path / "a", train__max_steps=1))
    said = ("warning: the launcher asks for mixed precision bf16, but this run trains in no (train.mixed_precision, "
            "which the config sets); set train.mixed_precision = bf16 (or --set train.mixed_precision=bf16)")
    assert said in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch` without the flag
    Trainer(lean_cfg(tmp_path / "b", train__max_steps=1))
    assert "launcher asks" not in capsys.readouterr().out


def test_init_checkpoint_takes_a_shipped_models_name_from_any_folder(tmp_path, monkeypatch):
    """Defect: demo_release.yaml named the shipped demo by a path relative to the repository root, and
    `--set model.init_checkpoint=demo` was refused; it takes the `--model` names, and the run records
    the name it was given."""
    from tadisr_core import model_ref
    from tadisr_core.checkpoint import load_checkpoint
    from training.builders import build_model_from_config, init_checkpoint_file

    monkeypatch.chdir(tmp_path)
    demo = load_checkpoint(model_ref.DEMO_CHECKPOINT)
    key = "conv_out.base_layer.weight"
    for config, init in (("demo_release", "demo"), ("demo_release", "demo-release")):
        cfg = load_config(config, [f"model.init_checkpoint={init}"] + ["model.init_parts=null"] * (init != "demo"))
        assert cfg.to_dict()["model"]["init_checkpoint"] == init  # config.json records what was given
        assert init_checkpoint_file(cfg.model) == model_ref.shipped_models()[init].checkpoint
        model = build_model_from_config(cfg, log=lambda _: None)
        weights = demo if init == "demo" else load_checkpoint(model_ref.DEMO_RELEASE_CHECKPOINT)
        assert torch.equal(dict(model.unet.named_parameters())[key].detach().float(),
                           weights.groups["unet"][key].float())
        assert cfg.model.saves_backbone  # the demos train every weight
    # a shipped model whose file is gone: named, with how to get it back
    monkeypatch.setattr(model_ref, "DEMO_CHECKPOINT", tmp_path / "gone" / "tadisr_demo.safetensors")
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint: the demo model is missing from .*gone; "
                                          r"reinstall the pack or re-create it with `make demo-model`$"):
        build_model_from_config(load_config("demo_release"))


def test_a_resume_finds_an_init_checkpoint_given_by_name(tmp_path, monkeypatch):
    """Defect: a resume looked for `model.init_checkpoint: demo` as a file in the working folder, found
    none and refused (or said it was gone) although the shipped model is there."""
    from types import SimpleNamespace

    from training.train import Trainer

    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo_release")
    printed = []
    trainer = SimpleNamespace(cfg=cfg, _resumed=({},), _resumed_whole=False, _print=printed.append)
    assert Trainer._model_source(trainer, tmp_path / "checkpoints" / "step_00000100") is cfg and not printed
    cfg.model.init_checkpoint = "gone.safetensors"  # a path still counts as gone when it is
    with pytest.raises(ConfigError, match=r"^model\.init_checkpoint not found: gone\.safetensors; the resume"):
        Trainer._model_source(trainer, tmp_path / "checkpoints" / "step_00000100")


def test_the_release_demo_recipe_starts_outside_the_repository(tmp_path):
    """The reported commands, from another folder: a shipped config by name, whose init checkpoint is a
    shipped model by name (one small step)."""
    cmd = [sys.executable, "-m", "training.train", "--config", "demo_release", "--output-dir", "run",
           "--max-steps", "1"]
    for item in ("data.crop=64", "data.length=2", "loss.lpips_net=none", "loss.lpips=0", "train.validate_every=0"):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["init_checkpoint"] == "demo"
    assert (tmp_path / "run" / "model_final.safetensors").is_file()


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.max_step'"):
        load_config(bad)
    bad.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown section 'trian'"):
        load_config(bad)
    bad.write_text("train:\n  mixed_precision: fp8\n")
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(bad)
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(bad)
    bad.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1 reads a bare no as False
    with pytest.raises(ConfigError, match="quote"):
        load_config(bad)
    assert load_config(TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'model.rank'"):
        load_config(TINY, ["model.rank=3"])
    cfg = load_config(TINY, ["optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "ablation.no_mfl=true",
                             "model.kolors_dir=null"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.ablation.no_mfl


def test_cli_reports_config_errors(tmp_path, capsys):
    from training.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  weight: 3\n")
    assert main(["--config", str(bad)]) == 2
    assert "loss.weight" in capsys.readouterr().err


# -- benchmark smoke -----------------------------------------------------------------------------
def test_bench_train_step_defaults_per_mode():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_train_step import parse_args
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def pick(argv):
        a = parse_args(argv)
        return a.size, a.gc, a.lpips_net, a.precision, a.cpu
    assert pick([]) == (768, True, "vgg", "bf16", False)     # the full-size GPU step, as kolors_ftsr.yaml
    assert pick(["--demo"]) == (256, False, "alex", "no", True)
    assert pick(["--tiny"]) == (768, True, "alex", "no", True)  # the tiny mode's crop is fixed at 64
    assert pick(["--demo", "--gc", "--size", "128"])[:2] == (128, True)
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--demo"])
    assert parse_args(["--demo", "--vae-widths", "8,16,48,48"]).vae_widths == (8, 16, 48, 48)
    for bad in (["--vae-widths", "8,16,48,48"], ["--demo", "--vae-widths", "8,16,48"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_bench_train_step_demo_mode(lpips_dir):
    """`--demo` with converted LPIPS weights (`--tiny` with random ones is the device script's rehearsal,
    tests/test_bench_smoke.py)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--demo", "--size", "64", "--vae-widths",
           "8,16,48,48", "--steps", "1", "--warmup", "1", "--lpips-weights", str(lpips_dir / "lpips_alex.safetensors"),
           "--lpips-net", "alex"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["s_per_step"] > 0 and out["trainable_params"] > 0
    assert out["spec"] == "demo" and not out["gradient_checkpointing"]  # as demo.yaml: every weight trains
    assert out["trainable_params"] == out["total_params"] and out["lpips_net"] == "alex"
    assert out["vae_widths"] == [8, 16, 48, 48] and out["total_params"] < 8_746_944  # fewer than the shipped demo


def test_bench_optimizer_step_smoke():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_optimizer_step import bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = bench("tiny", steps=1, warmup=1)
    assert out["spec"] == "tiny" and out["tensors"] > 1000  # every LoRA A and B is its own tensor
    assert min(out[f"{f}_s_per_step"] for f in ("loop", "foreach", "fused")) > 0
    assert out["foreach_max_diff_from_loop"] == 0.0 and out["fused_max_diff_from_loop"] < 1e-5


def test_optimizer_is_fused_adamw_with_the_configs_settings():
    from training.builders import build_optimizer

    cfg = Config()
    cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.eps = 1e-2, (0.8, 0.95), 0.1, 1e-4
    start = [torch.linspace(-1, 1, 12).reshape(3, 4), torch.linspace(2, 3, 5)]
    fused_params = [nn.Parameter(t.clone()) for t in start]
    loop_params = [nn.Parameter(t.clone()) for t in start]
    fused = build_optimizer(cfg, fused_params)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-4, foreach=False)
    assert fused.defaults["fused"]
    for step in range(3):
        for a, b in zip(fused_params, loop_params):
            a.grad = torch.cos(a.detach() * (step + 1))
            b.grad = torch.cos(b.detach() * (step + 1))
        fused.step()
        loop.step()
    for a, b, s in zip(fused_params, loop_params, start):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        assert (a.detach() - s).abs().min() > 1e-3  # every entry moved


def test_lr_factor_warmup_then_cosine_to_five_percent():
    from training.train import lr_factor

    assert lr_factor(0, 10, "cosine", 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.05)
    assert lr_factor(500, 0, "constant", 110) == 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_recipe_smoke_chains_its_phases_trains_the_backbone_and_runs_as_a_model(tmp_path, lpips_dir, variant):
    """A step of each demo phase, as `make demo-model` chains them: the autoencoder prior
    (demo_prior.yaml: scale 1, the HR itself as input), then the task phases (demo.yaml,
    demo_finetune.yaml, demo_crop256.yaml), each from the previous phase's weights. Every weight
    trains, and the run folder is a runnable model. The recipe trains either variant (the release
    variant here runs the prior and the last phase only: the two between differ from those in settings
    that do not depend on the variant); the shipped
    `demo-release` instead starts from the paper demo (demo_release.yaml, tested above)."""
    from tadisr_core.checkpoint import load_checkpoint
    from tadisr_core.model_ref import load_model
    from tadisr_core.pipeline import upscale
    from training.train import Trainer

    small = dict(train__max_steps=1, data__length=4, data__crop=64, train__batch_size=1, model__variant=variant)
    prior = load_config(REPO / "training" / "configs" / "demo_prior.yaml",
                        tiny_overrides(tmp_path / "prior", lpips_dir, **small))
    assert (prior.data.scale, prior.data.degradation, prior.model.train_backbone) == (1, "bicubic", True)
    run(prior)
    key = "conv_out.base_layer.weight"
    previous = tmp_path / "prior" / "model_final.safetensors"
    for phase in DEMO_PHASES[1:] if variant == "paper" else DEMO_PHASES[-1:]:
        before = load_checkpoint(previous)
        cfg = load_config(REPO / "training" / "configs" / f"{phase}.yaml", tiny_overrides(
            tmp_path / phase, lpips_dir, model__init_checkpoint=str(previous), **small))
        assert cfg.model.size == "demo" and cfg.model.train_backbone and cfg.data.scale == 4
        trainer = Trainer(cfg)
        # each phase starts from the previous phase's weights, backbone included...
        assert torch.equal(dict(trainer.model.unet.named_parameters())[key].detach(), before.groups["unet"][key])
        assert trainer.run()["step"] == 1
        previous = tmp_path / phase / "model_final.safetensors"
        ckpt = load_checkpoint(previous)
        assert ckpt.includes_backbone and key in ckpt.groups["unet"]
        assert not torch.equal(ckpt.groups["unet"][key], before.groups["unet"][key])  # ...and trains it further
        assert (tmp_path / phase / "prompt_cache.safetensors").is_file()
    model = load_model(tmp_path / DEMO_PHASES[-1])
    assert model.spec.variant == variant
    out = upscale(model, torch.rand(1, 3, 16, 16), 4, tile=64, overlap=16, tile_batch=1)
    assert out.image.shape == (1, 3, 64, 64) and torch.isfinite(out.mask).all()
