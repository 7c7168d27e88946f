"""The tiny training config as the training tests run it: overrides, a run, its log lines, small triplet
data folders (the LPIPS weights: conftest's `lpips_dir`; subprocesses: `tests.processes`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.processes import REPO
from training.config import Config, load_config

TINY = REPO / "training" / "configs" / "tiny.yaml"


def tiny_overrides(out: Path, lpips_dir: Path, **extra) -> list[str]:
    over = {"train.output_dir": str(out), "loss.lpips_weights": str(lpips_dir), "train.validate_every": 0}
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={json.dumps(v)}" for k, v in over.items()]


def tiny_cfg(out: Path, lpips_dir: Path, **extra) -> Config:
    return load_config(TINY, tiny_overrides(out, lpips_dir, **extra))


def lean_cfg(out: Path, **extra) -> Config:
    """The tiny config without LPIPS or validation, 2 steps, a checkpoint at each, none deleted."""
    over = {"train.output_dir": str(out), "loss.lpips_net": "none", "loss.lpips": 0, "train.validate_every": 0,
            "train.checkpoint_every": 1, "train.keep_checkpoints": 0, "train.max_steps": 2}
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return load_config(TINY, [f"{k}={json.dumps(v)}" for k, v in over.items()])


def run(cfg: Config, resume: bool = False, force: bool = False) -> dict:
    from training.train import Trainer

    return Trainer(cfg, resume=resume, force=force).run()


def train_lines(out: Path, kind: str = "train") -> list[dict]:
    """The records of one kind in the run's metrics.jsonl (training steps; "val", "bad_sample", ...)."""
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in lines if r["kind"] == kind]


def clean_triplets(root: Path, count: int, seed: int = 0) -> Path:
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


def damaged_triplets(root: Path) -> Path:
    """4 triplets (`clean_triplets`) of which sample 1's HR is a torn PNG and sample 2's mask has the wrong size."""
    clean_triplets(root, 4)
    (root / "hr" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n torn download")             # corrupt HR
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "mask" / "2.png")      # wrong-size mask
    return root
