"""Subprocesses of the tests: the environment trainer and CLI processes run in, a free port for their
rendezvous, two ranks started as a launcher would start them, and the trainer launched on two processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_processes(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m training.train ARGS` as two gloo processes on the CPU (fp32, no
    dynamo, a free rendezvous port), with `env` added to their environment: its exit code, stdout and stderr."""
    port = str(free_port())
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "training.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=dict(subprocess_env(), MASTER_PORT=port, **env), capture_output=True,
                          text=True, timeout=300)


def two_ranks(script: str, argv: list[str], **env: str) -> list[subprocess.CompletedProcess]:
    """`python -c script argv...` as ranks 0 and 1 of a launcher (its variables set, no agent to stop
    the others when one exits): each rank's exit code, stdout and stderr."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        rank_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank),
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env}
        procs.append(subprocess.Popen([sys.executable, "-c", script, *argv], env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done
