"""Stopping and resuming the trainer: Ctrl-C and SIGTERM (also sent to the whole process group, with
DataLoader workers) save a checkpoint and exit 130; a resume that would silently change the run (the
cosine schedule's length, the number of processes) needs --force."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.processes import REPO, subprocess_env
from tests.tiny_training import TINY, run, tiny_cfg, tiny_overrides


# -- the signal handling, in this process ---------------------------------------------------------
@pytest.fixture
def stop_flag():
    """`StopFlag` installed in this (the main) thread; the previous handlers come back afterwards."""
    from training.stop_signals import StopFlag

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopFlag() as flag:
        yield flag
    assert {s: signal.getsignal(s) for s in before} == before


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary


def test_first_ctrl_c_asks_to_stop_a_later_one_interrupts(stop_flag):
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # else pytest itself is interrupted
    _deliver(signal.SIGINT)
    assert stop_flag.raised and stop_flag.name == "Ctrl-C"
    _deliver(signal.SIGINT)  # at once: the launcher forwarding the same Ctrl-C, not a second press
    assert stop_flag.raised
    stop_flag._since -= stop_flag.REPEAT_S  # as if a second had passed
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)


def test_sigterm_asks_to_stop_however_often(stop_flag):
    _deliver(signal.SIGTERM)
    stop_flag._since -= stop_flag.REPEAT_S
    _deliver(signal.SIGTERM)
    assert stop_flag.raised and stop_flag.name == "SIGTERM"


def test_worker_init_ignores_stop_signals_then_runs_the_inner_one():
    from training.stop_signals import worker_init_ignoring_stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    try:
        worker_init_ignoring_stop_signals(seen.append)(3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert seen == [3]


# -- a real run, signalled as SLURM and a terminal do -----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_to_the_process_group_saves_a_checkpoint_and_exits_130(tmp_path, lpips_dir, sig, name):
    cmd = [sys.executable, "-m", "training.train", "--config", str(TINY), "--max-steps", "16"]
    for item in tiny_overrides(tmp_path, lpips_dir, train__checkpoint_every=1000, train__num_workers=2):
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, sig)  # the workers get it too
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] and 2 <= summary["step"] < 16
    step = f"step_{summary['step']:08d}"
    assert summary["checkpoint"].endswith(step) and (tmp_path / "checkpoints" / step / "model.safetensors").is_file()
    from training.train_state import latest_checkpoint

    assert latest_checkpoint(tmp_path / "checkpoints").name == step  # what --resume picks
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert f"stop requested ({name})" in out and "run the same command with --resume" in out
    assert "Traceback" not in err


KILLED_AT_STEP_2 = """
import os, signal, sys
from training import train
step = train.Trainer.train_step
def train_step(self, batches):
    if self.step == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batches)
train.Trainer.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_killed_under_a_launcher_is_named_in_one_line_with_the_way_to_resume(tmp_path):
    """Rank 1 of 2 killed at step 2: rank 0 ended with gloo's traceback. Now one line names the lost process
    and the checkpoint --resume continues from; exit 1."""
    from tests.processes import two_ranks

    argv = ["--config", str(TINY), "--output-dir", str(tmp_path), "--max-steps", "4"]
    for item in ("train.num_workers=0", "loss.lpips_net=\"none\"", "loss.lpips=0", "train.validate_every=0",
                 "train.checkpoint_every=1"):
        argv += ["--set", item]
    rank0, rank1 = two_ranks(KILLED_AT_STEP_2, argv, HF_HUB_OFFLINE="1")
    assert (rank0.returncode, rank1.returncode) == (1, -signal.SIGKILL), rank0.stderr[-3000:]
    assert "Traceback" not in rank0.stderr
    errors = [line for line in rank0.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: rank 0 of 2 stopped at step 1: rank 1 of the launcher is gone (killed or crashed; the "
                      f"launcher's report and its output say why); the same command with --resume continues from "
                      f"{tmp_path / 'checkpoints' / 'step_00000001'}"]


# -- resuming into a changed run ------------------------------------------------------------------
def test_max_steps_is_a_change_only_when_the_learning_rate_decays_over_it():
    from training.config import Config
    from training.resume import config_changes

    old, new = Config(), Config()
    old.train.max_steps, new.train.max_steps = 8, 16
    assert config_changes(old.to_dict(), new.to_dict()) == []  # constant rate: free to change
    old.optim.decay = new.optim.decay = "cosine"
    (change,) = config_changes(old.to_dict(), new.to_dict())
    assert change.startswith("train.max_steps: 8 -> 16") and "learning rate" in change and "schedule" in change
    new.train.max_steps = 8
    assert config_changes(old.to_dict(), new.to_dict()) == []


def test_resume_with_another_cosine_length_needs_force(tmp_path, lpips_dir, capsys, monkeypatch):
    from training import builders
    from training.resume import RunFolderError

    run(tiny_cfg(tmp_path, lpips_dir, train__max_steps=2, optim__decay="cosine"))
    with monkeypatch.context() as m:  # refused before the data and the model are built (minutes at full size)
        for slow in ("build_datasets", "build_model_from_config"):
            m.setattr(builders, slow, lambda *a, slow=slow, **k: pytest.fail(f"{slow} ran before the refusal"))
        with pytest.raises(RunFolderError, match=r"train\.max_steps: 2 -> 3 .*learning rate.*--force"):
            run(tiny_cfg(tmp_path, lpips_dir, train__max_steps=3, optim__decay="cosine"), resume=True)
    from training.train import Trainer

    summary = Trainer(tiny_cfg(tmp_path, lpips_dir, train__max_steps=3, optim__decay="cosine"), resume=True,
                      force=True).run()
    assert summary["step"] == 3 and "train.max_steps: 2 -> 3" in capsys.readouterr().out


def _as_written_by(checkpoint: Path, processes: int | None) -> None:
    """Make a one-process checkpoint look written by `processes` processes (None: by a trainer that did not
    record the count, which is then read from the per-rank files)."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state.pop("num_processes", None)
    if processes is not None:
        state["num_processes"] = processes
    torch.save(state, checkpoint / "state.pt")
    for rank in range(1, processes or 2):
        shutil.copyfile(checkpoint / "rank_0.pt", checkpoint / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, lpips_dir) -> Path:
    """One step of the tiny config at 2 micro-batches (its checkpoint: step 1), trained once for the resume
    tests of this module; each resumes its own copy."""
    out = tmp_path_factory.mktemp("one_step_run")
    run(tiny_cfg(out, lpips_dir, train__max_steps=1, train__grad_accum=2))
    return out


@pytest.mark.parametrize("recorded", [4, None])
def test_resume_with_another_number_of_processes_needs_force(one_step_run, tmp_path, lpips_dir, capsys, recorded):
    from training.resume import RunFolderError
    from training.train import Trainer

    shutil.copytree(one_step_run, tmp_path, dirs_exist_ok=True)
    state = torch.load(tmp_path / "checkpoints" / "step_00000001" / "state.pt", weights_only=True)
    assert state["num_processes"] == 1
    _as_written_by(tmp_path / "checkpoints" / "step_00000001", recorded)
    n = recorded or 2
    cfg = tiny_cfg(tmp_path, lpips_dir, train__max_steps=2, train__grad_accum=2)
    with pytest.raises(RunFolderError, match=rf"number of processes: {n} -> 1 \(global batch {2 * n} -> 2 .*--force"):
        run(cfg, resume=True)
    if recorded is None:
        return
    assert Trainer(cfg, resume=True, force=True).run()["step"] == 2
    assert f"warning: --resume --force: continuing with a change: number of processes: {n} -> 1" in \
        capsys.readouterr().out


def _as_written_under_fsdp(checkpoint: Path) -> None:
    """Move a checkpoint's optimiser state from state.pt into its rank files, as FSDP keeps it (one shard each)."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    optimizer = state.pop("optimizer")
    torch.save(state, checkpoint / "state.pt")
    for rank_file in checkpoint.glob("rank_*.pt"):
        torch.save({**torch.load(rank_file, weights_only=True), "optimizer": optimizer}, rank_file)


def test_optimiser_state_fsdp_cannot_load_is_refused_even_with_force(one_step_run, tmp_path, lpips_dir, monkeypatch):
    """FSDP's per-process optimiser shards do not re-split for another process count, and neither an
    FSDP run nor another loads the other's state: refused even with --force, naming both ways on (the
    FSDP run used to fall through to loading rank 0's shard, or fail on a missing key)."""
    import accelerate
    from accelerate.utils import DistributedType

    from training.resume import RunFolderError
    from training.train import Trainer

    shutil.copytree(one_step_run, tmp_path, dirs_exist_ok=True)
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    weights = f"--set model.init_checkpoint=\"{checkpoint / 'model.safetensors'}\""
    fresh = f"or start a new run (another --output-dir) from its weights: {weights}"

    def refused(fsdp: bool) -> str:
        with monkeypatch.context() as m:
            if fsdp:
                m.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
            with pytest.raises(RunFolderError) as caught:
                Trainer(tiny_cfg(tmp_path, lpips_dir, train__max_steps=2, train__grad_accum=2), resume=True,
                        force=True)
        return str(caught.value)

    assert refused(fsdp=True) == (f"--resume: {checkpoint} was written without FSDP (its optimiser state is whole, in "
                                  f"state.pt), which an FSDP run cannot load (not even with --force). Resume it "
                                  f"without FSDP, {fresh}")
    _as_written_by(checkpoint, 4)
    _as_written_under_fsdp(checkpoint)
    assert refused(fsdp=True) == (f"--resume: {checkpoint} holds the FSDP optimiser state in 4 shards, one per "
                                  f"process, which 1 processes cannot load (not even with --force). Resume with 4 "
                                  f"processes, {fresh}")
    assert refused(fsdp=False) == (f"--resume: {checkpoint} was written under FSDP (its optimiser state in 4 shards, "
                                   f"one per process), which a run without FSDP cannot load (not even with --force). "
                                   f"Resume it under FSDP with 4 processes, {fresh}")


def test_an_abort_by_a_second_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    from training import train

    class Interrupted:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "Trainer", Interrupted)
    assert train.main(["--config", str(TINY)]) == 130
    assert capsys.readouterr().err == "interrupted: nothing saved since the last checkpoint\n"
