"""Multi-process batch upscale (torchrun, `accelerate launch`): one plan from rank 0, one report, one exit code."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tadisr_core.files import atomic_path
from tadisr_core.ranks import Ranks
from tests.processes import REPO, free_port, two_ranks

FAST = ["--tile", "64", "--overlap", "16", "--tile-batch", "2", "-q"]


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (16 + 4 * i, 20, 3), dtype=np.uint8)).save(folder / name)


# a scanner adds and removes files while the ranks start: rank 1 alone sees this listing
LATE = ["a.png", "c.png", "e.png", "f.png"]


def _rank_worker(rank: int, port: int, folder: str, out: str, log: str) -> None:
    """One rank of a 2-process launcher: files are listed differently per rank; every job it processes is logged."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from tadisr_core import batch, cli
    from tadisr_core.batch import Record

    listing = batch.collect_inputs

    def collect(inputs, recursive=False, exclude=None):
        found = listing(inputs, recursive, exclude)
        return found if rank == 0 else [(Path(folder) / n, Path(folder), None) for n in LATE]

    def process(model, job, options, **kw):
        with open(log, "a") as f:
            f.write(f"{rank} {job.input.name} {job.image.name}\n")
        return Record(str(job.input), ok=True)

    batch.collect_inputs, batch.process_file = collect, process
    args = cli.build_parser().parse_args(["upscale", folder, "-o", out, *FAST])
    sys.exit(cli.run_upscale(args, model=SimpleNamespace(device="cpu")))


def test_every_rank_processes_rank_0s_plan(tmp_path):
    """Each rank used to list and plan the inputs itself: with files arriving during start-up some were
    upscaled twice, some never. Now rank 0's plan is every rank's."""
    folder = tmp_path / "in"
    _images(folder, ["a.png", "b.png", "c.png", "d.png"])
    log, port = tmp_path / "jobs.log", free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(folder), str(tmp_path / "out"), str(log)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    done = sorted(line.split() for line in log.read_text().splitlines())
    assert done == [["0", "a.png", "a_x4.png"], ["0", "c.png", "c_x4.png"],
                    ["1", "b.png", "b_x4.png"], ["1", "d.png", "d_x4.png"]]


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    """Two processes computing one prompt cache wrote through the same `<name>.tmp`: the second rename failed."""
    target = tmp_path / "cache.safetensors"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]


SLOW_SAVE = '''
import os, time, safetensors.torch as st
_save = st.save_file
def save_file(*a, **k):  # a slow shared filesystem; each save is counted
    with open(os.environ["SAVES_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    _save(*a, **k)
    time.sleep(1)
st.save_file = save_file
'''


def test_torchrun_batch_with_a_bad_file_and_a_missing_prompt_cache(tiny_dir, tmp_path):
    """2 ranks under torchrun, one unreadable input, a prompt cache to compute: rank 0 computes it once, every
    good file is written, ONE JSON report counts both ranks' files, and the launcher exits 1 for the bad file
    only (a rank exiting 1 early used to get the other ranks killed; both ranks computed the cache and
    collided on its temporary file)."""
    folder, out = tmp_path / "in", tmp_path / "out"
    _images(folder, ["a.png", "b.png", "c.png", "d.png"])
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (folder / "notes.txt").write_text("left out, with a warning (once: rank 0 alone lists the folder)")
    slow = tmp_path / "site"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_SAVE)
    cache = tmp_path / "cache.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(slow)]), "OMP_NUM_THREADS": "1",
           "SAVES_LOG": str(tmp_path / "saves.log")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "tadisr_core", "upscale", str(folder),
                           "-o", str(out), "--kolors", str(tiny_dir["kolors"]), "--checkpoint",
                           str(tiny_dir["checkpoint"]), "--prompt-cache", str(cache), *FAST, "--json"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one document
    assert (report["ok"], report["failed"], report["world_size"], report["cancelled"]) == (4, 1, 2, False)
    ranks = {Path(f["input"]).name: f["rank"] for f in report["files"]}
    assert ranks == {"a.png": 0, "b.png": 1, "bad.png": 0, "c.png": 1, "d.png": 0}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_{kind}" for n in "abcd"
                                                           for kind in ("x4.png", "text_mask.png"))
    assert len((tmp_path / "saves.log").read_text().splitlines()) == 1 and cache.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    # torchrun may still send its stop signal to rank 1 when rank 0 exits 1 first ("closing signal SIGTERM");
    # rank 1 has handed over its records by then and must not be reported killed by it
    assert not re.search(r"exitcode\s*:\s*-15|Signal 15", proc.stderr), proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1 and "bad.png" in proc.stderr
    assert proc.stderr.count("left out 1 file(s) that are not images we read (notes.txt)") == 1


JOIN_ALONE = '''
import datetime, sys
from tadisr_core import cli, ranks
ranks.JOIN_TIMEOUT = datetime.timedelta(seconds=1)
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("rank", [0, 1])
def test_launcher_variables_without_a_launcher_end_with_one_line(tmp_path, rank):
    """MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE=2 left over in a shell, no launcher: the join used to wait
    30 days, deaf to Ctrl-C. Now it waits JOIN_TIMEOUT and ends with one line naming the variables (also on
    rank 1, where torch's store client logged pages of C++ stack frames while rank 0 never came)."""
    _images(tmp_path, ["in.png"])
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": str(rank), "WORLD_SIZE": "2"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-c", JOIN_ALONE, "upscale", str(tmp_path / "in.png"), "-o",
                           str(tmp_path / "out"), "--model", "demo", *FAST],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.endswith(
        f"error: no other process joined rank {rank} of 2 at 127.0.0.1:{port} within 1 s: MASTER_ADDR, MASTER_PORT, "
        "RANK and WORLD_SIZE are set but no launcher started the other processes; unset them, or start "
        "through torchrun / accelerate launch\n")
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr and not (tmp_path / "out").exists()


class _CtrlCInGather(Ranks):
    """Rank 0 of 2 whose gather gets the process group's Ctrl-C while it waits; rank 1 stopped early."""

    def from_rank0(self, make):
        return make()

    def gather(self, obj):
        os.kill(os.getpid(), signal.SIGINT)
        return [obj, {**obj, "rank": 1, "records": [], "cancelled": True}]


def test_ctrl_c_while_rank_0_waits_for_the_others_keeps_the_report(tmp_path, monkeypatch, capsys):
    """Rank 0 done with its share, waiting in the final gather, got the group's Ctrl-C as KeyboardInterrupt
    ('aborted', the report lost). Now it is the first Ctrl-C's request to stop: the report comes (rank 0 wrote
    its 1 of the 2 files), exit 130."""
    from tadisr_core import batch, cli
    from tadisr_core.batch import Record

    _images(tmp_path / "in", ["a.png", "b.png"])
    monkeypatch.setattr(batch, "process_file", lambda model, job, options, **kw: Record(str(job.input), ok=True))
    args = cli.build_parser().parse_args(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST[:-1]])
    try:
        code = cli._upscale_files(args, _CtrlCInGather(0, 2), None, SimpleNamespace(device="cpu"))
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the gather aborted rank 0")
    assert code == cli.EXIT_CANCELLED
    err = capsys.readouterr().err
    assert "stopping after the current tiles" in err
    assert f"1 of 2 files written to {tmp_path / 'out'} by 2 processes" in err


MAIN = '''
import sys
from tadisr_core import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def test_a_setup_error_of_rank_0_is_said_once(tmp_path):
    """An output folder that is a file: every rank printed rank 0's error, none saying which rank it was. Now
    rank 0 says it, the other rank one line that points to it; both exit 2."""
    _images(tmp_path / "in", ["a.png"])
    (tmp_path / "out").write_text("a file")
    ranks = two_ranks(MAIN, ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "demo", *FAST])
    assert [r.returncode for r in ranks] == [2, 2], ranks[1].stderr[-3000:]
    assert ranks[0].stderr == f"error: -o {tmp_path / 'out'} is a file; give a folder\n"
    assert ranks[1].stderr == "rank 1 of 2: stopped by rank 0's error (rank 0 says what it is)\n"


TRAIN_MAIN = '''
import sys
from training import train
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("script, argv, error", [
    (MAIN, ["upscale", "in.png", "-o", "out", "--tile", "big"], "argument --tile: invalid"),
    (TRAIN_MAIN, ["--config", "tiny", "--max-step", "x"], "argument --max-steps: invalid int value: 'x'"),
], ids=["tadisr", "training.train"])
def test_a_usage_error_under_a_launcher_is_printed_by_rank_0_alone(script, argv, error):
    """Defect: every process printed the same usage and error (8 copies on an 8-GPU machine)."""
    ranks = two_ranks(script, argv)
    assert [r.returncode for r in ranks] == [2, 2]
    assert ranks[0].stderr.startswith("usage: ") and error in ranks[0].stderr
    assert ranks[1].stderr == "rank 1 of 2: stopped by rank 0's error (rank 0 says what it is)\n"


@pytest.mark.parametrize("main_of", ["tadisr_core.cli", "training.train"])
def test_help_under_a_launcher_is_printed_by_rank_0_alone(monkeypatch, capsys, main_of):
    """Defect: `--help` under a launcher printed the whole help once per process."""
    import importlib

    main = importlib.import_module(main_of).main
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        out = capsys.readouterr()
        assert stop.value.code == 0 and out.out.startswith("usage: ") is printed and out.err == "", rank


COUNT_ENCODER_LOADS = '''
import sys
from tadisr_core import cli, prompt
_load = prompt._load_chatglm
def load(*args, **kwargs):
    print("loading ChatGLM3", file=sys.stderr)
    return _load(*args, **kwargs)
prompt._load_chatglm = load
sys.exit(cli.main(sys.argv[1:]))
'''


def test_under_a_launcher_only_rank_0_loads_the_text_encoder(tiny_dir, tmp_path):
    """No --prompt-cache: every rank loaded ChatGLM3 (12.5 GB of RAM each for Kolors') to encode the same
    prompt. Now rank 0 encodes it and hands the conditioning over; the outputs are those of one process."""
    _images(tmp_path / "in", ["a.png", "b.png"])
    weights = ["--kolors", str(tiny_dir["kolors"]), "--checkpoint", str(tiny_dir["checkpoint"]), *FAST]
    ranks = two_ranks(COUNT_ENCODER_LOADS, ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "two"), *weights])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    assert [r.stderr.count("loading ChatGLM3") for r in ranks] == [1, 0]
    from tadisr_core import cli

    assert cli.main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "one"), *weights]) == cli.EXIT_OK
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["a_text_mask.png", "a_x4.png", "b_text_mask.png", "b_x4.png"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)),
                              np.asarray(Image.open(tmp_path / "two" / name))), name


def _gather_with_a_lost_rank(rank: int, port: int, result: str) -> None:
    """Rank 1 of 2 dies (killed, crashed) before handing its share over; rank 0 writes what its gather got."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from tadisr_core.ranks import joined_ranks

    with joined_ranks() as ranks:
        if rank == 1:
            os._exit(9)
        Path(result).write_text(json.dumps(ranks.gather({"rank": 0})))


def test_a_rank_lost_before_the_final_gather_costs_its_share_only(tmp_path):
    """Rank 0's gather raised LauncherError when another rank was gone (the whole report lost, exit 2). Now it
    returns what it got, None in the lost rank's place."""
    result, port = tmp_path / "gathered.json", free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_gather_with_a_lost_rank, args=(r, port, str(result))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 9]
    assert json.loads(result.read_text()) == [{"rank": 0}, None]


class _LostRank1(Ranks):
    """Rank 0 of 2 whose gather finds rank 1 gone (`Ranks.gather`'s None in its place)."""

    def from_rank0(self, make):
        return make()

    def gather(self, obj):
        return [obj, None]


def test_a_lost_rank_is_named_and_rank_0_reports_its_own_files(tiny_model_factory, tmp_path, monkeypatch, capsys):
    """Rank 1 killed while rank 0 waited for its records: rank 0 ended with exit 2 and no report, though it
    wrote its files. Now it reports them (--json too), names the lost rank in one line and exits 1."""
    from tadisr_core import batch, cli
    from tadisr_core.batch import Record

    _images(tmp_path / "in", ["a.png", "b.png"])
    monkeypatch.setattr(batch, "process_file", lambda model, job, options, **kw: Record(str(job.input), ok=True))
    args = cli.build_parser().parse_args(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST,
                                          "--json"])
    assert cli._upscale_files(args, _LostRank1(0, 2), None, tiny_model_factory()) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["ok"], report["failed"], report["planned"], report["world_size"], report["lost_ranks"]) == \
        (1, 0, 2, 2, [1])
    assert [Path(f["input"]).name for f in report["files"]] == ["a.png"]
    assert err == ("error: rank 1 of 2 stopped without reporting (killed or crashed; see its output): its files "
                   "are not counted here, though some may have been written\n")


def test_the_launchers_stop_signal_after_a_lost_rank_still_gives_rank_0_its_report(tmp_path, monkeypatch, capsys):
    """Rank 1 killed while rank 0 still worked: torchrun sends SIGTERM to the others, and rank 0 aborted at once
    ('aborted', no report, its remaining files unwritten). Under a launcher SIGTERM now stops after the current
    tiles: rank 0 reports what it wrote, names the lost rank and exits 1 (outside one, it still aborts)."""
    from tadisr_core import batch, cli
    from tadisr_core.batch import Record
    from tadisr_core.pipeline import UpscaleCancelled

    _images(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png", "e.png"])  # rank 0: a, c, e

    def process_file(model, job, options, cancel, **kw):
        if job.input.name == "c.png":
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's, while rank 0 upscales its second file
            if cancel():
                raise UpscaleCancelled("stopped after 1 of 4 tile batches")
        return Record(str(job.input), ok=True)

    monkeypatch.setattr(batch, "process_file", process_file)
    args = cli.build_parser().parse_args(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST[:-1]])
    previous = signal.getsignal(signal.SIGTERM)
    assert cli._upscale_files(args, _LostRank1(0, 2), None, SimpleNamespace(device="cpu")) == cli.EXIT_FAILED
    assert signal.getsignal(signal.SIGTERM) in (previous, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "stopping after the current tiles: the launcher stops this process (SIGTERM: another one stopped?)" in err
    assert f"cancelled during {tmp_path / 'in' / 'c.png'}" in err
    assert "error: rank 1 of 2 stopped without reporting" in err
    assert f"1 of 5 files written to {tmp_path / 'out'} by 2 processes" in err
