"""The tiny training config as the training tests run it: overrides, a run, its log lines (the LPIPS
weights: conftest's `lpips_dir`; subprocesses: `tests.processes`)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.processes import REPO
from training.config import Config, load_config

TINY = REPO / "training" / "configs" / "tiny.yaml"


def tiny_overrides(out: Path, lpips_dir: Path, **extra) -> list[str]:
    over = {"train.output_dir": str(out), "loss.lpips_weights": str(lpips_dir), "train.validate_every": 0}
    over.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={json.dumps(v)}" for k, v in over.items()]


def tiny_cfg(out: Path, lpips_dir: Path, **extra) -> Config:
    return load_config(TINY, tiny_overrides(out, lpips_dir, **extra))


def run(cfg: Config, resume: bool = False) -> dict:
    from training.train import Trainer

    return Trainer(cfg, resume=resume).run()


def train_lines(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in lines if r["kind"] == "train"]
