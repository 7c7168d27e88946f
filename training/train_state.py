"""Training checkpoints: weights (native safetensors) + optimiser, scheduler, RNG and step, atomically.

Layout of `OUTPUT/checkpoints/step_00001000/`:
    model.safetensors   trainable tensors (tadisr_core.checkpoint native format, loadable for inference)
    state.pt            step, optimiser (replicated optimisers), scheduler, non-finite count, config
    rank_<r>.pt         per process: RNG states (and the optimiser shard under FSDP)
A checkpoint is written into `step_X.tmp/` and renamed when complete, so a directory without the
`.tmp` suffix is always whole. Every file loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from tadisr_core.files import atomic_path
from tadisr_core.model_ref import RUN_STEP_DIR, RUN_STEP_MODEL, run_step_folder


def step_dir(root: Path, step: int) -> Path:
    """`root/step_00000042`."""
    return Path(root) / run_step_folder(step)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = RUN_STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file() and (p / RUN_STEP_MODEL).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) RNG states, as weights-only-loadable objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_training_checkpoint(accelerator, *, root: Path, step: int, write_weights, state: dict,
                             sharded_optimizer: dict | None = None, keep: int = 0) -> Path:
    """Write checkpoint `step` under `root` from every process (a collective: all ranks must call it).

    `write_weights(path)` runs on the main process; `state` is written by it to state.pt;
    `sharded_optimizer` (FSDP) goes into each rank's file. Returns the final directory.
    """
    root, final = Path(root), step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank_state = {"rng": rng_state()}
    if sharded_optimizer is not None:
        rank_state["optimizer"] = sharded_optimizer
    _atomic_torch_save(rank_state, tmp / f"rank_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        write_weights(tmp / RUN_STEP_MODEL)
        _atomic_torch_save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(path: Path, rank: int) -> tuple[dict, dict]:
    """(state.pt, this rank's file; rank 0's when the run had fewer processes), read through the bounded
    pickle scan; CheckpointError when a file is damaged."""
    from tadisr_core.checkpoint import safe_torch_load

    path = Path(path)
    state = safe_torch_load(path / "state.pt", "training state")
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        rank_file = path / "rank_0.pt"
    return state, safe_torch_load(rank_file, "training state")
