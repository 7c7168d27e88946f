"""Train TADiSR: one-step (t = 200) LoRA fine-tuning of Kolors with the joint segmentation decoders.

    python -m training.train --config tiny [--max-steps N] [--output-dir DIR]
                             [--resume] [--set section.key=value ...]
    accelerate launch [--multi_gpu --num_processes N] -m training.train --config ...
    (`--multi_gpu --num_processes 2` also works on a CPU-only machine: two gloo processes)

One optimiser step = `train.grad_accum` micro-batches of `train.batch_size` per process. Each step
appends a JSON line to OUTPUT/metrics.jsonl (main process): the loss terms, total, lr, grad norm,
samples/s. Checkpoints (OUTPUT/checkpoints/step_N) hold the trainable weights as a native
safetensors file plus optimiser/scheduler/RNG state; `--resume` continues from the newest one and
reproduces the uninterrupted run's losses. SIGTERM or Ctrl-C stops after the current step, saves a
checkpoint and exits 130 (another Ctrl-C, a second or more later, aborts at once); DataLoader workers
leave both signals to the main process, so a signal to the whole process group (SLURM, a terminal)
is handled the same.
A non-finite loss or gradient skips the optimiser step; more than `train.max_nonfinite` aborts.
A sample that cannot be loaded is replaced by the next one and logged (once, whatever the epochs);
more than `train.max_bad_samples` different ones abort (with a checkpoint; a resume carries the list over,
less those fixed or removed meanwhile), as does data that cannot
make a batch at all (`training.bad_samples.DataBroken`), exit code 1. `--resume` uses the
newest complete checkpoint that loads (damaged ones are skipped with a warning) and refuses a
changed config without `--force` (also another `train.max_steps` under a decaying learning rate, or
another number of processes, which FSDP's per-process optimiser shards refuse even with `--force`);
another set of trainable parameters is refused even with `--force`, which otherwise applies the new
`optim` settings from the resumed step on. A resume does without a deleted `model.init_checkpoint`
when its checkpoint holds every weight that gave. Nothing in the folder is removed before every check
has passed. A run into a folder that already holds one needs `--resume` (or another output folder).
DDP (`find_unused_parameters`, as the release) and FSDP come from Accelerate (`accelerate config`);
the FSDP path (full-state weight export, per-rank optimiser shards) is untested on CPU. Precision is
`train.mixed_precision` (the launcher's flag is ignored, so a config always means the same run).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from tadisr_core.files import atomic_path
from tadisr_core.images import save_image
from tadisr_core.model_ref import (
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_FINAL,
    RUN_METRICS,
    RUN_PROMPT_CACHE,
    RUN_STEP_MODEL,
    run_step_folder,
)
from tadisr_core.ranks import ArgumentParser
from tadisr_core.wording import command_line
from training import command_name, missing_extras
from training.bad_samples import DataBroken, data_broken_message
from training.config import Config, ConfigError, load_config, shipped_configs
from training.resume import (
    RunFolderError,
    apply_optim_settings,
    check_run_folder,
    config_changes,
    fresh_run_hint,
    optimizer_refusal,
    process_change,
    trainable_change,
)
from training.stop_signals import StopFlag, worker_init_ignoring_stop_signals, workers_stopped


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps or bad samples)."""


def lr_factor(step: int, warmup: int, decay: str, total: int) -> float:
    """Learning-rate multiplier of update `step` (from 0): linear warm-up, then constant or a cosine that
    reaches 5 % at `step == total`, one past the last update (diffusers' schedules count so as well)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def weight_digest(params) -> str:
    """SHA-256 of the trainable tensors (fp32 bytes, in order): equal digests = equal weights."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _multi_process_cpu() -> bool:
    """Several processes and no GPU (e.g. `accelerate launch --multi_gpu` on a CPU box): gloo on CPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not xpu



def _trainable_summary(trainable: list[tuple[str, torch.nn.Parameter]]) -> str:
    """One line of what a run trains: tensors and parameters per part (unet, vae, mi_decoder)."""
    parts: dict[str, list[int]] = {}
    for name, p in trainable:
        counts = parts.setdefault(name.split(".", 1)[0], [0, 0])
        counts[0] += 1
        counts[1] += p.numel()
    each = ", ".join(f"{part} {n} ({size:,})" for part, (n, size) in parts.items())
    return (f"trains {sum(n for n, _ in parts.values())} tensors, {sum(s for _, s in parts.values()):,} parameters: "
            f"{each}")

class Trainer:
    """Owns the accelerator, the model, the optimiser and the loop. `run()` trains to max_steps."""

    def __init__(self, cfg: Config, resume: bool = False, force: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        from tadisr_core.checkpoint import apply_checkpoint, load_checkpoint, trainable_state_dict
        from training.builders import (
            TrainingForward,
            build_loss,
            build_model_from_config,
            build_optimizer,
            cast_frozen_,
            check_loss_has_masks,
            configure_trainable,
            enable_gradient_checkpointing,
        )

        self.cfg, self.force = cfg, force
        check_loss_has_masks(cfg)
        t = cfg.train
        self.out = Path(t.output_dir)
        check_run_folder(self.out, resume)
        mp = t.mixed_precision  # explicit: `accelerate launch` would otherwise impose its default "no"
        # Unused trainables exist (skip_conv_1, MuGI a_l/b_l, W_a-less paths), as in the release's DDP setup.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.acc = Accelerator(mixed_precision=mp, kwargs_handlers=[ddp], cpu=_multi_process_cpu())
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        self.main = self.acc.is_main_process
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched not in ("", "no", mp):
            self._print(f"warning: the launcher asks for mixed precision {launched}, but this run trains in "
                        f"{mp} (train.mixed_precision, which the config sets); set train.mixed_precision = "
                        f"{launched} (or --set train.mixed_precision={launched}) to train in it")
        if mp == "fp16" and self.acc.scaler is None:
            self._print(f"warning: train.mixed_precision = fp16 needs a CUDA GPU (Accelerate has no fp16 on "
                        f"{self.acc.device.type}): this run trains in fp32; train.mixed_precision = bf16 works on CPU")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        # Both before the model: a changed run or a data problem shows in seconds, not minutes. Nothing in the
        # folder is removed before every check has passed (`_remove_final_model`, last).
        resume_from = self._resume_checkpoint() if resume else None
        remove_final = self._check_final_model(resume_from)
        build_cfg = self._model_source(resume_from)
        datasets = self._build_datasets()

        # Each machine's main process first: what the model and the loss need once (the prompt conditioning
        # computed with ChatGLM3, 12.5 GB of RAM for Kolors'; LPIPS weights fetched, into ~/.cache) it writes, and
        # the others then read.
        with self.acc.local_main_process_first():
            model = build_model_from_config(build_cfg, self.acc.device, log=self._print)
        self.trainable = configure_trainable(model, no_jsd=cfg.ablation.no_jsd, backbone=cfg.model.train_backbone)
        self._print(_trainable_summary(self.trainable))
        if resume_from is not None:
            self._check_trainable_set(resume_from)
        # build_cfg: on a resume whose init checkpoint is gone, the checkpoint resumed from stands in for it.
        self.save_backbone = build_cfg.model.saves_backbone
        self.saved_keys = {g: list(sd) for g, sd in trainable_state_dict(model, self.save_backbone).items()}
        if mp in ("bf16", "fp16") and self.acc.device.type == "cuda" and not self.fsdp:
            # Frozen weights in half precision save memory. Only on CUDA, whose autocast runs norms in
            # fp32 with cast weights (CPU autocast does not); FSDP wants one dtype per flat parameter.
            # fp16 would overflow the SDXL VAE, so it keeps the VAE and decoders in fp32 (and TrainingForward
            # runs them outside the fp16 autocast).
            keep = (model.vae, model.mi_decoder) if mp == "fp16" else ()
            cast_frozen_(model, torch.bfloat16 if mp == "bf16" else torch.float16, keep)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.model = model
        with self.acc.local_main_process_first():
            self.loss_fn = build_loss(cfg, self.acc.device)
        params = [p for _, p in self.trainable]
        optimizer = build_optimizer(cfg, params)
        o = cfg.optim
        # Not prepared by accelerate: its scheduler wrapper steps once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, warmup=o.warmup_steps, decay=o.decay, total=t.max_steps))
        self.step, self.nonfinite, self.bad_samples, self._last_end = 0, 0, 0, None
        self.bad_seen: set[str] = set()  # the damaged samples met so far (each epoch meets them again)
        self._resumed_from: Path | None = None
        self._carried_bad: list[str] = []  # the damaged samples the checkpoint resumed from lists
        torch.manual_seed(t.seed + 1_000_003 * self.acc.process_index)
        if resume_from is not None:  # the weights before wrapping, so FSDP shards them
            apply_checkpoint(model, load_checkpoint(resume_from / RUN_STEP_MODEL))
        step_forward = TrainingForward(model, full_precision_vae=mp == "fp16")
        self.forward, self.optimizer = self.acc.prepare(step_forward, optimizer)
        # FSDP puts sharded parameters in the model's place: the tensors taken before `prepare` hold no
        # gradients. Its whole parameter list is what Accelerate clips with FSDP's own norm.
        self.params = [p for p in self.forward.parameters() if p.requires_grad] if self.fsdp else params
        self.clip_params = list(self.forward.parameters()) if self.fsdp else params
        if resume_from is not None:
            self._resume_state(resume_from)
        elif resume and self.main:  # nothing saved yet: the run starts over, without the old run's log lines
            self._trim_metrics()
        self._build_data(*datasets)
        if remove_final:
            self._remove_final_model(resume_from)

    # -- setup ------------------------------------------------------------------------------------
    def _build_datasets(self) -> tuple:
        """(train, val) datasets of the config; every rank builds the same background folder, the main
        process first."""
        from training.builders import build_datasets

        if self.main:
            datasets = build_datasets(self.cfg, self.out, log=self._print)
        self.acc.wait_for_everyone()
        if not self.main:
            datasets = build_datasets(self.cfg, self.out, log=None)  # the main process has said what it found
        d, per_process = self.cfg.data, self.cfg.train.batch_size
        if len(datasets[0]) < per_process * self.acc.num_processes:
            source = {"synth": "data.length", "triplets": f"data.root {d.root}",
                      "realce": f"data.list_file {d.list_file} in {d.root}"}[d.kind]
            raise ConfigError(f"the training set has {len(datasets[0])} items ({source}), fewer than one global "
                              f"batch: train.batch_size {per_process} x {self.acc.num_processes} processes; give "
                              f"more items or a smaller train.batch_size")
        return datasets

    def _build_data(self, train, val) -> None:
        from torch.utils.data import DataLoader

        from training.bad_samples import TolerantItems, collate_same_size, sample_describer
        from training.builders import SeededItems, StepBatchSampler

        cfg, t = self.cfg, self.cfg.train

        self.train_items = TolerantItems(SeededItems(train, t.seed), sample_describer(train))
        self._carry_bad_samples()
        sampler = StepBatchSampler(len(train), t.batch_size, self.acc.num_processes, self.acc.process_index,
                                   t.seed, start=self.step * t.grad_accum)
        self.loader = DataLoader(self.train_items, batch_sampler=sampler, num_workers=t.num_workers,
                                 collate_fn=collate_same_size,
                                 pin_memory=self.acc.device.type == "cuda",
                                 persistent_workers=t.num_workers > 0,
                                 worker_init_fn=worker_init_ignoring_stop_signals())
        n_val = min(cfg.data.val_size, len(val)) if val is not None else 0
        self.val_items = []
        for i in range(n_val):
            try:
                self.val_items.append(SeededItems(val, t.seed + 1)[(0, i)])
            except Exception as exc:  # noqa: BLE001 - a damaged validation sample is left out, not fatal
                self._print(f"warning: validation sample {i} left out: {type(exc).__name__}: {exc}")
        if t.validate_every and not self.val_items:
            source = {"synth": "", "triplets": "data.val_root and ", "realce": "data.val_list_file and "}
            self._print(f"warning: train.validate_every = {t.validate_every}, but there is no validation data "
                        f"({source[cfg.data.kind]}data.val_size give it): no validation will run")

    def _carry_bad_samples(self) -> None:
        """Count the damaged samples of the checkpoint resumed from that are still damaged (every process
        reads the same files, so keeps the same list); say which, and how many were fixed or removed."""
        if not self._carried_bad:
            return
        still = self.train_items.still_damaged(self._carried_bad)
        for entry in still:
            self._print(f"warning: a damaged sample met before the resume is still damaged: {entry}")
        if gone := len(self._carried_bad) - len(still):
            self._print(f"{gone} damaged sample(s) met before the resume now load or are gone: no longer counted")
        self.bad_seen, self.bad_samples = set(still), len(still)

    def _resume_checkpoint(self) -> Path | None:
        """The newest checkpoint folder that is whole (its training state kept for `_resume_state`);
        None if there is none.

        A damaged checkpoint (truncated weights or state) is skipped with a warning in favour of the
        previous one. A changed config is refused unless `force`. The weights are read here to check
        them, and read again once the model is built, so that they are not held while it is.
        """
        from tadisr_core.checkpoint import CheckpointError, load_checkpoint
        from training.train_state import list_checkpoints, load_training_state

        found = list_checkpoints(self.out / RUN_CHECKPOINTS)
        if not found:
            self._print(f"--resume: no checkpoint under {self.out / RUN_CHECKPOINTS}; starting from step 0")
            return None
        for _, path in reversed(found):
            damage = None
            try:
                self._resumed_whole = load_checkpoint(path / RUN_STEP_MODEL).includes_backbone  # checked; not kept
                self._resumed = load_training_state(path, self.acc.process_index)
            except (CheckpointError, OSError, RuntimeError, ValueError, EOFError) as exc:
                damage = (f"warning: checkpoint {path} is damaged ({str(exc).splitlines()[0]}); trying the "
                          f"previous one")
            # All processes move on together: one whose own rank file is damaged must not resume another step.
            if self._any_across(damage is not None):
                self._print(self._first_message(damage))
                continue
            if refusal := optimizer_refusal(*self._resumed, path, self.acc.num_processes, self.fsdp):
                raise RunFolderError(refusal)
            changes = config_changes(self._resumed[0].get("config") or {}, self.cfg.to_dict())
            t = self.cfg.train
            world = process_change(self._resumed[0], path, self.acc.num_processes, t.batch_size * t.grad_accum)
            changes += [world] if world else []
            if changes and not self.force:
                raise RunFolderError(f"--resume: this run differs from the one {path} was trained with: "
                                     f"{'; '.join(changes)}. Pass --force to continue with the change")
            if changes:
                self._print(f"warning: --resume --force: continuing with a change: {'; '.join(changes)}")
            return path
        raise RunFolderError(f"--resume: every checkpoint under {self.out / RUN_CHECKPOINTS} is damaged")

    def _check_final_model(self, resume_from: Path | None) -> bool:
        """Before anything in the folder changes: refuse a resume already past train.max_steps. When a
        finished run goes on, its model_final.safetensors would stand for the run while it trains, and after
        a stop: True when it is to be removed (`_remove_final_model`, once every other check has passed),
        which it is only if the checkpoint resumed from holds the same weights; any other model_final
        (checkpoints deleted or damaged, a new run into its folder) is refused, never lost."""
        import filecmp

        max_steps = self.cfg.train.max_steps
        step = int(self._resumed[0]["step"]) if resume_from is not None else 0
        if step > max_steps:
            raise RunFolderError(f"--resume: the run is at step {step}, past train.max_steps = {max_steps}: "
                                 f"nothing to train (its weights are in {resume_from}); give a larger "
                                 f"--max-steps to go on")
        final = self.out / RUN_FINAL
        if step == max_steps or not final.is_file():
            return False
        if resume_from is None or not filecmp.cmp(final, resume_from / RUN_STEP_MODEL, shallow=False):
            what = ("is the only copy of its weights (no checkpoint of this run holds them)" if resume_from is None
                    else f"holds other weights than {resume_from}, which this run resumes from")
            raise RunFolderError(f"{final} {what}: training on would replace them. Move it away (or give "
                                 f"another --output-dir) first")
        return True

    def _remove_final_model(self, resume_from: Path) -> None:
        """Remove the finished run's model_final.safetensors that `_check_final_model` found in
        checkpoint `resume_from` too, as the run goes on past it."""
        self.acc.wait_for_everyone()  # every process compared before the main one removes it
        if self.main:
            (self.out / RUN_FINAL).unlink(missing_ok=True)
            self._print(f"{RUN_FINAL} removed: the run goes on to step {self.cfg.train.max_steps} (step "
                        f"{int(self._resumed[0]['step'])}'s weights stay in {resume_from})")

    def _model_source(self, resume_from: Path | None) -> Config:
        """The config the model is built from: the run's own; or, on a resume whose `model.init_checkpoint`
        is gone, with the resumed checkpoint in its place, when that holds every weight the init checkpoint
        gave (it is applied on top anyway). When it does not, or may not (a checkpoint from before that was
        recorded, without the whole backbone), the missing file is a ConfigError naming the key."""
        from training.builders import init_checkpoint_file

        m = self.cfg.model
        try:
            present = bool(m.init_checkpoint) and init_checkpoint_file(m).exists()
        except FileNotFoundError:  # a shipped model's file is missing
            present = False
        if resume_from is None or not m.init_checkpoint or present:
            return self.cfg
        needed = self._resumed[0].get("init_checkpoint_needed")
        if needed is None and not self._resumed_whole:
            why = f"{resume_from} may not hold every weight it gave the model (it predates that record)"
        elif needed:
            why = f"{resume_from} does not hold the frozen weights it gave the model (they are not trained)"
        else:
            self._print(f"model.init_checkpoint {m.init_checkpoint} is gone; {resume_from} holds every weight it "
                        f"gave: resuming without it")
            source = dataclasses.replace(m, init_checkpoint=str(resume_from / RUN_STEP_MODEL))
            return dataclasses.replace(self.cfg, model=source)
        raise ConfigError(f"model.init_checkpoint not found: {m.init_checkpoint}; the resume still needs it: {why}. "
                          f"Restore the file, or give its new place with --set model.init_checkpoint=... --force")

    def _check_trainable_set(self, resume_from: Path) -> None:
        """Refuse a resume whose trainable parameters differ from those checkpoint `resume_from` was trained
        with (`ablation.no_jsd`, `model.train_backbone`): its optimiser state belongs to the old set."""
        if change := trainable_change(self._resumed[0], self.trainable):
            raise RunFolderError(f"--resume: the trainable parameters changed since {resume_from} ({change}; "
                                 f"ablation.no_jsd and model.train_backbone change them), so its optimiser state "
                                 f"does not fit them (not even with --force): {fresh_run_hint(resume_from)}")

    def _resume_state(self, path: Path) -> None:
        """Optimiser, scheduler, counters and RNG of checkpoint `path` (after `prepare`)."""
        from training.train_state import set_rng_state

        state, rank_state = self._resumed
        self.optimizer.load_state_dict(rank_state["optimizer"] if self.fsdp else state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optim_settings(self.optimizer, self.scheduler, self.cfg.optim)  # those of --resume --force
        if state.get("scaler") and self.acc.scaler is not None:  # fp16: the loss scale reached so far
            self.acc.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
        # The damaged samples met so far carry over, once the data is read (`_carry_bad_samples`): the abort
        # asks to fix or remove them and resume, so those that now load no longer count.
        self._carried_bad = list(state.get("bad_sample_list", []))
        set_rng_state(rank_state["rng"])
        if self.main:  # drop log lines written after the checkpoint by the interrupted run
            self._trim_metrics()
        self._resumed_from = path
        self._print(f"resumed from {path} at step {self.step}")

    def _trim_metrics(self) -> None:
        """Keep metrics.jsonl lines up to the resumed step, so that it reads as one run: an earlier session's
        `end` line is dropped (this session writes its own), and so is a torn line (a crash mid-write)."""
        log = self.out / RUN_METRICS
        if not log.is_file():
            return
        keep = []
        for n, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self._print(f"warning: {log} line {n} is torn (an interrupted write); dropped")
                continue
            if record.get("step", 0) <= self.step and record.get("kind") != "end":
                keep.append(line)
        with atomic_path(log) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))

    # -- helpers ----------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(msg)

    def _log(self, record: dict) -> None:
        if self.main:
            with open(self.out / RUN_METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _mean_across(self, values: list[float]) -> list[float]:
        if self.acc.num_processes == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="mean").tolist()

    def _any_across(self, flag: bool) -> bool:
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def _first_message(self, message: str | None) -> str:
        """The first process's non-empty `message`, on every process (collective when there are several)."""
        if self.acc.num_processes == 1:
            return message or ""
        from accelerate.utils import gather_object

        return next((m for m in gather_object([message or ""]) if m), "")

    def _write_weights(self, path: Path) -> None:
        from tadisr_core.checkpoint import base_metadata, save_model, save_native

        # the config travels with the weights: a later --resume --force rewrites the run's config.json
        meta = {"train_step": str(self.step), "training_config": json.dumps(self.cfg.to_dict())}
        if not self.fsdp:
            save_model(self.model, path, meta, backbone=self.save_backbone)
            return
        full = self._fsdp_full_state
        groups = {g: {k: full[f"model.{g}.{k}"] for k in keys} for g, keys in self.saved_keys.items()}
        save_native(groups, self.model.spec, path, {**meta, **base_metadata(self.model, self.save_backbone)},
                    self.model.prompt)

    def save_checkpoint(self) -> Path:
        """Write checkpoint `self.step` (collective: every process calls it)."""
        from training.train_state import save_training_checkpoint

        if self.fsdp:
            self._fsdp_full_state = self.acc.get_state_dict(self.forward)
        state = {"step": self.step, "nonfinite": self.nonfinite, "bad_samples": self.bad_samples,
                 "bad_sample_list": sorted(self.bad_seen),
                 "num_processes": self.acc.num_processes, "scheduler": self.scheduler.state_dict(),
                 "config": self.cfg.to_dict(), "trainable": [name for name, _ in self.trainable],
                 # The checkpoints hold every weight model.init_checkpoint gave (`ModelConfig.saves_backbone`),
                 # so a resume does without it; runs of older versions recorded True where they did not.
                 "init_checkpoint_needed": False}
        if not self.fsdp:
            state["optimizer"] = self.optimizer.state_dict()
        if self.acc.scaler is not None and self.acc.scaler.is_enabled():  # fp16 on a GPU: its loss scale
            state["scaler"] = self.acc.scaler.state_dict()
        path = save_training_checkpoint(
            self.acc, root=self.out / RUN_CHECKPOINTS, step=self.step, write_weights=self._write_weights,
            state=state, sharded_optimizer=self.optimizer.state_dict() if self.fsdp else None,
            keep=self.cfg.train.keep_checkpoints)
        self._fsdp_full_state = None
        return path

    def _count_bad_samples(self, batches) -> None:
        """Log the damaged samples replaced in these batches, by any process, the first time they are met
        (every process keeps the same list and count); past `train.max_bad_samples` different ones, save
        and abort."""
        bad = [b for batch in batches for entry in batch.get("bad", []) if entry for b in entry.split("\n")]
        if self.acc.num_processes > 1 and self._any_across(bool(bad)):  # gathered only when there is any
            from accelerate.utils import gather_object

            bad = gather_object(bad)
        new = [b for b in dict.fromkeys(bad) if b not in self.bad_seen]
        for entry in new:
            if self.main:
                print(f"warning: skipped a damaged sample: {entry}", file=sys.stderr)
            self._log({"kind": "bad_sample", "step": self.step + 1, "sample": entry})
        limit = self.cfg.train.max_bad_samples
        if self.bad_samples + len(new) > limit:  # the same on every process
            # Saved with the steps before this one, and the damaged samples they met (as the log is trimmed
            # on a resume): this step's are met again then, and counted unless fixed.
            path = self.save_checkpoint()
            raise TrainingAborted(f"aborting at step {self.step}: {self.bad_samples + len(new)} damaged samples "
                                  f"were skipped (train.max_bad_samples = {limit}); fix or remove them (listed "
                                  f"above) and continue with --resume from {path}")
        self.bad_seen.update(new)
        self.bad_samples += len(new)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        """Forward/backward over `grad_accum` micro-batches, then one (or a skipped) optimiser step."""
        from training.data.datasets import model_input

        t = self.cfg.train
        sums: dict[str, float] = {}
        finite, n_samples = True, 0
        self._count_bad_samples(batches)
        for i, batch in enumerate(batches):
            lr = batch["lr"].to(self.acc.device, non_blocking=True)
            hr = batch["hr"].to(self.acc.device, non_blocking=True)
            mask = batch["mask"].to(self.acc.device, non_blocking=True)
            n_samples += lr.shape[0]
            sync = i == len(batches) - 1
            with nullcontext() if sync else self.acc.no_sync(self.forward):
                image, logits = self.forward(model_input(lr, hr.shape[-2:], self.cfg.data.scale))
                losses = dict(self.loss_fn(image, hr, logits, mask))
                if self.step + 1 in t.inject_nonfinite_at:
                    losses["total"] = losses["total"] * float("nan")
                self.acc.backward(losses["total"] / len(batches))
            finite &= bool(torch.isfinite(losses["total"].detach()).item())
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(batches)
        bad = self._any_across(not finite)
        grad_norm = float("nan")
        if not bad:
            grad_norm = float(self.acc.clip_grad_norm_(self.clip_params, self.cfg.optim.max_grad_norm))
            # An overflow under a grad scaler (fp16 on a GPU) is its business: it skips the step, lowers its scale.
            bad = not math.isfinite(grad_norm) and self.acc.scaler is None
        lr_now = self.scheduler.get_last_lr()[0]
        skipped = bad
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
        else:
            scaler = self.acc.scaler
            scale = scaler.get_scale() if scaler is not None else None
            self.optimizer.step()
            # fp16's grad scaler skips an overflowing update and lowers its scale (inside the fused AdamW too,
            # where Accelerate's step_was_skipped misses it): the schedule waits for the next update taken.
            skipped = scaler is not None and scaler.get_scale() < scale
            if not skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        names = list(sums)
        values = self._mean_across([sums[k] for k in names])
        now = time.perf_counter()
        elapsed = now - (self._last_end or now - 1e-9)  # since the previous step ended: includes data loading
        self._last_end = now
        record = {"kind": "train", "step": self.step, **dict(zip(names, values)), "lr": lr_now,
                  "grad_norm": grad_norm, "samples_per_s": n_samples * self.acc.num_processes / elapsed,
                  "skipped": skipped, "nonfinite": self.nonfinite, "bad_samples": self.bad_samples}
        self._log(record)
        if bad and self.nonfinite > t.max_nonfinite:
            self.save_checkpoint()
            raise TrainingAborted(f"aborting at step {self.step}: {self.nonfinite} steps had a non-finite loss or "
                                  f"gradient (train.max_nonfinite = {t.max_nonfinite}); lower optim.lr, use bf16 "
                                  f"instead of fp16, or check the data")
        return record

    # -- validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict | None:
        """PSNR/SSIM over the validation items; a sample strip saved as OUTPUT/samples/step_N.png."""
        from training.data.datasets import model_input
        from training.metrics import psnr, ssim

        if not self.val_items:
            return None
        # The prompt keys and values cached by an earlier validation came from the weights of then: the fused
        # optimiser updates them in place without a trace the cache could see (PromptKV).
        self.model.prompt_kv.clear()
        scale = self.cfg.data.scale
        rows, p_all, s_all = [], [], []
        self.model.eval()
        with torch.random.fork_rng(devices=[]):
            for item in self.val_items:
                lr = item["lr"][None]
                f = 1 if lr.shape[-2:] == item["hr"].shape[-2:] else scale  # 1: upscaled already (model_input)
                h, w = (lr.shape[-2] // 8) * 8, (lr.shape[-1] // 8) * 8
                lr = lr[..., :h, :w].to(self.acc.device)
                hr = item["hr"][None, :, : h * f, : w * f].to(self.acc.device)
                mask = item["mask"][None, :, : h * f, : w * f].to(self.acc.device)
                up = model_input(lr, hr.shape[-2:], scale)
                with self.acc.autocast():
                    image, logits = self.forward(up)
                image = image.float().clamp(0, 1)
                p_all.append(float(psnr(image, hr)[0]))
                s_all.append(float(ssim(image, hr)[0]))
                m_pred = torch.sigmoid(logits.float()).expand(-1, 3, -1, -1)
                rows.append(torch.cat([up, image, hr, m_pred, mask.expand(-1, 3, -1, -1)], dim=-1)[0].cpu())
        self.model.train()
        record = {"kind": "val", "step": self.step, "psnr": sum(p_all) / len(p_all), "ssim": sum(s_all) / len(s_all)}
        if self.main:
            width = max(r.shape[-1] for r in rows)
            strip = torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=-2)
            save_image(strip, self.out / "samples" / f"step_{self.step:08d}.png")
        self._log(record)
        return record

    def _save_for_data_fix(self, last_saved: Path | None) -> str:
        """Before stopping on broken data: save the steps trained so far (collective: every process stops
        here together), and say what is saved and how to continue."""
        if self.step == 0:
            return "stopped before step 1: nothing was trained"
        if last_saved is None or last_saved.name != run_step_folder(self.step):
            last_saved = self.save_checkpoint()
        return (f"stopped at step {self.step}; the last checkpoint is {last_saved}: once the data is "
                f"fixed, continue with --resume (and --force if the config changed)")

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until `train.max_steps` (or SIGTERM / Ctrl-C: summary["stopped"]); returns a summary dict."""
        from tqdm import tqdm

        t = self.cfg.train
        if self.main:
            (self.out / RUN_CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=2))
            if self.model.prompt is not None:  # with the weights, the run folder is a runnable model
                self.model.prompt.save(self.out / RUN_PROMPT_CACHE)
        batches = iter(self.loader)
        self._last_end = time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.main, desc="train", dynamic_ncols=True)
        stopped, last_saved = False, self._resumed_from
        with StopFlag() as flag, closing(bar), workers_stopped(batches):
            while self.step < t.max_steps:
                broken = None
                try:
                    got = [next(batches) for _ in range(t.grad_accum)]
                except DataBroken as exc:
                    broken = data_broken_message(exc)
                # Every process stops together, or the others would wait for this one in the step's collectives.
                if self._any_across(broken is not None):
                    raise DataBroken(f"{self._first_message(broken)}\n{self._save_for_data_fix(last_saved)}")
                record = self.train_step(got)
                bar.update(1)
                if self.step % max(t.log_every, 1) == 0:
                    bar.set_postfix(loss=f"{record['total']:.4f}", sps=f"{record['samples_per_s']:.2f}")
                if t.validate_every and self.step % t.validate_every == 0:
                    self.validate()
                    self._last_end = time.perf_counter()
                if self._any_across(flag.raised) and self.step < t.max_steps:  # at the last step: just finish
                    self._print(f"stop requested ({flag.name or 'by another process'}) at step {self.step}: "
                                f"saving a checkpoint (Ctrl-C again to abort without it)")
                    last_saved, stopped = self.save_checkpoint(), True
                    self._print(f"stopped at step {self.step}; saved {last_saved}. To continue, run the same "
                                f"command with --resume")
                    break
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.max_steps:
                    last_saved = self.save_checkpoint()
                    self._last_end = time.perf_counter()
        if self.main and last_saved is not None and self.step >= t.max_steps:
            with atomic_path(self.out / RUN_FINAL) as tmp:  # the finished run's weights
                shutil.copyfile(last_saved / RUN_STEP_MODEL, tmp)
        summary = {"step": self.step, "stopped": stopped, "nonfinite": self.nonfinite,
                   "checkpoint": str(last_saved) if last_saved else None}
        if t.weight_digest:
            digest = weight_digest(self.params)
            (self.out / f"weight_digest_rank{self.acc.process_index}.txt").write_text(digest + "\n")
            summary["weight_digest"] = digest
        self._log({"kind": "end", **summary})
        self.acc.wait_for_everyone()
        return summary


def lost_process_message(trainer: Trainer) -> str:
    """What to say when another process of the launcher is gone (killed, crashed) in the middle of a step:
    which one, and how the run goes on (`--resume` from the newest checkpoint)."""
    from training.train_state import latest_checkpoint

    rank, world = trainer.acc.process_index, trainer.acc.num_processes
    other = f"rank {1 - rank}" if world == 2 else "another process"
    saved = latest_checkpoint(trainer.out / RUN_CHECKPOINTS)
    resume = (f"the same command with --resume continues from {saved}" if saved is not None else
              "no checkpoint was saved yet: the same command with --resume starts over")
    return (f"rank {rank} of {world} stopped at step {trainer.step}: {other} of the launcher is gone (killed or "
            f"crashed; the launcher's report and its output say why); {resume}")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of `python -m training.train`."""
    p = ArgumentParser(prog=command_name("training.train"), description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="YAML file, or a shipped config's name (training/configs/*.yaml, installed with the "
                        f"package; from any folder): {', '.join(shipped_configs())}")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--output-dir", help="override train.output_dir")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--force", action="store_true", help="with --resume: continue even though the config changed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value (YAML syntax; a text value is taken as typed, "
                        "a # in it included), repeatable")
    args = p.parse_args(argv)
    if args.force and not args.resume:
        p.error("--force only applies with --resume (it lets a resume go on with a changed config); "
                "add --resume, or leave out --force to start a new run")
    return args


@command_line()
def main(argv=None) -> int:
    """CLI entry point; returns the exit code: 0 done, 1 aborted, 2 setup error, 130 stopped by a signal."""
    args = parse_args(argv)
    if problem := missing_extras("training.train", "yaml", "kornia"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
    new_folder = None
    try:
        cfg = load_config(args.config, overrides)
        new_folder = None if Path(cfg.train.output_dir).exists() else Path(cfg.train.output_dir)
        trainer = Trainer(cfg, resume=args.resume, force=args.force)
    except (ConfigError, FileNotFoundError, RunFolderError, ValueError) as e:  # setup: exit 2, as every tadisr command
        print(f"error: {e}", file=sys.stderr)
        if new_folder is not None:  # the run folder this start made, still empty: not left behind
            with contextlib.suppress(OSError):
                new_folder.rmdir()
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = trainer.run()
    except (FileNotFoundError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:  # decided by all processes together: said once
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except DataBroken as e:
        if rank == 0:
            print(f"error: training data: {data_broken_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from tadisr_core.ranks import is_lost_peer

        if trainer.acc.num_processes == 1 or not is_lost_peer(e):
            raise
        print(f"error: {lost_process_message(trainer)}", file=sys.stderr)
        return 1
    if rank == 0:
        print(json.dumps(summary))
    return 130 if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
