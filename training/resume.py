"""Whether a run folder and the checkpoint to resume fit this run: `training.train` refuses a new run into
a folder that holds one, and a `--resume` whose config (without `--force`), process count or trainable
parameters no longer fit the checkpoint; each refusal (`RunFolderError`) says what to do. A forced resume
trains on with the new `optim` settings (`apply_optim_settings`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tadisr_core.files import folder_target_problem
from tadisr_core.model_ref import RUN_CHECKPOINTS, RUN_METRICS, RUN_STEP_MODEL
from training.config import Config
from training.train_state import list_checkpoints


class RunFolderError(RuntimeError):
    """The output folder or the checkpoint to resume does not fit this run; the message says what to do."""


# Settings that only steer the loop: they may change on --resume without --force.
LOOP_ONLY = {"train.max_steps", "train.output_dir", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.validate_every", "train.num_workers", "train.weight_digest",
             "train.max_nonfinite", "train.max_bad_samples", "train.inject_nonfinite_at",
             # what is validated on and how memory is saved: the training steps come out the same
             "data.val_size", "data.val_crop", "data.val_root", "data.val_list_file", "train.gradient_checkpointing"}


def _setting(cfg: dict, section: str, key: str, defaults: dict):
    """`cfg[section][key]`, or its default when the run was recorded before the key existed."""
    return (cfg.get(section) or {}).get(key, (defaults.get(section) or {}).get(key))


def config_changes(old: dict, new: dict) -> list[str]:
    """`section.key: old -> new` for every setting that differs, loop-only settings left out; a key
    that one side lacks (a run recorded before the key existed) counts as its default.

    `train.max_steps` counts too when the learning rate decays over it (`optim.decay` not constant).
    """
    defaults = Config().to_dict()
    changes = []
    for section in sorted(set(old) | set(new)):
        for key in sorted(set(old.get(section) or {}) | set(new.get(section) or {})):
            name = f"{section}.{key}"
            before, after = _setting(old, section, key, defaults), _setting(new, section, key, defaults)
            if name not in LOOP_ONLY and before != after:
                changes.append(f"{name}: {before!r} -> {after!r}")
    before, after = (_setting(c, "train", "max_steps", defaults) for c in (old, new))
    decay = _setting(new, "optim", "decay", defaults)
    if before != after and decay != "constant":
        changes.append(f"train.max_steps: {before!r} -> {after!r} (optim.decay = {decay} decays the learning rate "
                       f"over train.max_steps: the schedule would change and the rate jump at the resumed step)")
    return changes


def recorded_processes(state: dict, checkpoint: Path) -> int:
    """How many processes wrote checkpoint `state`; checkpoints from before the count was recorded are
    counted by their per-rank files."""
    return int(state.get("num_processes") or len(list(Path(checkpoint).glob("rank_*.pt"))) or 1)


def fresh_run_hint(checkpoint: Path) -> str:
    """How to go on from checkpoint `checkpoint`'s weights when the run cannot be resumed: a new run."""
    return (f"start a new run (another --output-dir) from its weights: --set "
            f"model.init_checkpoint={json.dumps(str(Path(checkpoint) / RUN_STEP_MODEL))}")


def optimizer_refusal(state: dict, rank_state: dict, checkpoint: Path, processes: int, fsdp: bool) -> str | None:
    """Why a run of `processes` processes (under FSDP or not) cannot load the optimiser state of checkpoint
    `state` / `rank_state`; None when it can. FSDP keeps one shard per process in the rank files, other
    runs keep it whole in state.pt: neither loads the other's, and shards do not re-split for another
    number of processes. Not even --force gets past these."""
    fresh = f"or {fresh_run_hint(checkpoint)}"
    before = recorded_processes(state, checkpoint)
    sharded = "optimizer" in rank_state and "optimizer" not in state
    if fsdp and not sharded:
        return (f"--resume: {checkpoint} was written without FSDP (its optimiser state is whole, in state.pt), which "
                f"an FSDP run cannot load (not even with --force). Resume it without FSDP, {fresh}")
    if not fsdp and sharded:
        return (f"--resume: {checkpoint} was written under FSDP (its optimiser state in {before} shards, one per "
                f"process), which a run without FSDP cannot load (not even with --force). Resume it under FSDP with "
                f"{before} processes, {fresh}")
    if fsdp and before != processes:
        return (f"--resume: {checkpoint} holds the FSDP optimiser state in {before} shards, one per process, which "
                f"{processes} processes cannot load (not even with --force). Resume with {before} processes, {fresh}")
    return None


def trainable_change(state: dict, trainable: list[tuple[str, torch.Tensor]]) -> str | None:
    """How the trainable parameters (name, tensor) differ from those checkpoint `state` was trained with, in
    a few words; None when they are the same. Checkpoints from before the names were recorded are compared
    by their whole optimiser state (the count and shapes of its tensors; FSDP shards are not compared)."""
    names = [n for n, _ in trainable]
    before = state.get("trainable")
    if before is not None:
        if list(before) == names:
            return None
        now, then = set(names), set(before)
        gone, new = [n for n in before if n not in now], [n for n in names if n not in then]
        example = (f"{gone[0]} no longer trained" if gone else f"{new[0]} trained now" if new
                   else "another order")
        return f"{len(before)} -> {len(names)} tensors, e.g. {example}"
    optimizer = state.get("optimizer")
    if optimizer is None:
        return None
    ids = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(ids) != len(names):
        return f"{len(ids)} -> {len(names)} tensors"
    for i, (name, p) in zip(ids, trainable):
        moment = optimizer["state"].get(i, {}).get("exp_avg")
        if moment is not None and tuple(moment.shape) != tuple(p.shape):
            return f"{name}: shape {list(moment.shape)} -> {list(p.shape)}"
    return None


def apply_optim_settings(optimizer, scheduler, o) -> None:
    """Give every parameter group of `optimizer` the AdamW settings of `o` (the config's `optim`: lr,
    betas, weight_decay, eps) and `scheduler` (a LambdaLR of `lr_factor`) the base rate `o.lr`, with each
    group's current rate where the schedule now puts it (`o.lr * factor(scheduler step)`, as the scheduler
    computes it). A loaded optimiser and scheduler state carry the settings they were saved with: a
    `--resume --force` with another `optim.lr` (or betas, ...) trains on with the new ones."""
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(lr=o.lr * factor(scheduler.last_epoch), initial_lr=o.lr, betas=tuple(o.betas),
                     weight_decay=o.weight_decay, eps=o.eps)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def process_change(state: dict, checkpoint: Path, processes: int, batch: int) -> str | None:
    """A note when checkpoint `state` was written by another number of processes than `processes`; `batch`
    = samples per step and process (train.batch_size x train.grad_accum). None when the count is the same."""
    before = recorded_processes(state, checkpoint)
    if before == processes:
        return None
    return (f"number of processes: {before} -> {processes} (global batch {before * batch} -> {processes * batch} "
            f"samples per step; the data order continues from another position)")


def check_run_folder(out: Path, resume: bool) -> None:
    """The run folder can be one (not a file), and a new run (no --resume) does not mix its metrics and
    checkpoints with an earlier run's."""
    if problem := folder_target_problem(out, f"the run folder {out} (train.output_dir, --output-dir)"):
        raise RunFolderError(problem)
    used = [p.name for p in (out / RUN_METRICS, out / RUN_CHECKPOINTS) if p.exists()]
    if used and not resume:
        go_on = ("continue it" if list_checkpoints(out / RUN_CHECKPOINTS)  # not a save cut short (step_N.tmp)
                 else "start it over (it saved no checkpoint)")
        raise RunFolderError(f"{out} already holds a training run ({', '.join(used)}); pass --resume to {go_on}, "
                             f"or choose another --output-dir")
