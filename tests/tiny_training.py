"""The tiny training config as the training tests run it: overrides, a run, its log lines, and the
environment and port for trainer subprocesses (the LPIPS weights: conftest's `lpips_dir`)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from training.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
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


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
