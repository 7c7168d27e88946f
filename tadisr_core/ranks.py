"""The processes of a multi-process batch (`torchrun`, `accelerate launch`): one plan, one report.

Under a launcher the processes join a CPU process group (gloo; Python objects only, nothing on the
GPUs): rank 0 alone lists the inputs and plans the output names (and computes the prompt
conditioning), and hands the plan to every rank, or tells them that it failed; at the end every rank's
records go to rank 0, which reports for the whole run, a rank that stopped without reporting included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import threading
from typing import Callable, Iterator, TypeVar

from .batch import distributed_rank

T = TypeVar("T")
log = logging.getLogger("tadisr")

# the final gather waits for the slowest rank's whole share of the files (gloo's default is 30 min)
TIMEOUT = datetime.timedelta(days=30)
# a launcher starts its processes within this; launcher variables left over in a shell never get a peer
JOIN_TIMEOUT = datetime.timedelta(minutes=5)
# joining longer than this is said (once) on stderr, so a stale environment is not a silent hang
JOIN_NOTICE_SECONDS = 5.0


class LauncherError(RuntimeError):
    """The processes of the launcher cannot be joined, or one of them stopped without reporting."""


class Rank0Failed(LauncherError):
    """On a rank other than 0: rank 0 failed in `Ranks.from_rank0` and reports its error itself."""


# what gloo says when the process at the other end of a connection is gone (killed, crashed, exited)
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe")


def is_lost_peer(exc: BaseException) -> bool:
    """Whether `exc`, raised by a collective, says that another process of the launcher is gone."""
    return isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _LOST_PEER)


def stopped_by_rank0(rank: int, world: int) -> str:
    """What a rank other than 0 says when rank 0 reports the error that stopped them all."""
    return f"rank {rank} of {world}: stopped by rank 0's error (rank 0 says what it is)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors and --help are printed once under a launcher: every process
    gets the same arguments, so rank 0 prints them; for an error the other ranks say one line pointing to
    it, for --help nothing."""

    def error(self, message: str):
        rank, world = distributed_rank()
        if rank > 0:
            self.exit(2, stopped_by_rank0(rank, world) + "\n")
        super().error(message)

    def print_help(self, file=None) -> None:
        if distributed_rank()[0] == 0:
            super().print_help(file)


class Ranks:
    """This process's rank among `world` processes, and the two exchanges a batch needs."""

    def __init__(self, rank: int = 0, world: int = 1, group=None) -> None:
        self.rank, self.world, self.group = rank, world, group

    def from_rank0(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 alone; every rank returns its result. When it raises, rank 0 raises
        it (and reports it), the other ranks raise Rank0Failed (or KeyboardInterrupt for a Ctrl-C)
        instead of waiting: the error is said once, by rank 0."""
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = (True, make())
            except (Exception, KeyboardInterrupt) as exc:
                box[0] = (False, type(exc).__name__)  # the name only: any exception, picklable or not
                self._exchange(dist.broadcast_object_list, box, src=0)
                raise
        self._exchange(dist.broadcast_object_list, box, src=0)
        ok, value = box[0]
        if ok:
            return value
        if value == "KeyboardInterrupt":
            raise KeyboardInterrupt
        raise Rank0Failed(stopped_by_rank0(self.rank, self.world))

    def gather(self, obj: T) -> list[T | None] | None:
        """Every rank's `obj` in rank order, on rank 0, with None for a rank that stopped without handing
        it over (killed, crashed); None on the other ranks. Received rank by rank, so that a lost rank
        costs its own share only."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        if self.rank > 0:
            self._exchange(dist.send_object_list, [obj], dst=0)
            return None
        shares: list = [obj]
        for src in range(1, self.world):
            box: list = [None]
            try:
                dist.recv_object_list(box, src=src, group=self.group)
            except RuntimeError as exc:  # that rank is gone: the others' connections are their own
                log.debug("rank %d stopped without reporting: %s", src, _first_line(exc))
            shares.append(box[0])
        return shares

    def _exchange(self, collective, *args, **kwargs) -> None:
        try:
            collective(*args, **kwargs, group=self.group)
        except RuntimeError as exc:  # a peer exited (crashed, killed) or never came: gloo says so here
            raise LauncherError(f"rank {self.rank} of {self.world} lost the other processes of the launcher "
                                f"({_first_line(exc)})") from None


@contextlib.contextmanager
def joined_ranks() -> Iterator[Ranks]:
    """The launcher's processes as `Ranks` (rank 0 of 1 without a launcher): joins a gloo process group
    from the launcher's environment (MASTER_ADDR / MASTER_PORT, RANK, WORLD_SIZE) and leaves it on exit,
    errors and Ctrl-C included. A default group already set up (by an embedding program) is kept; a
    gloo group is made beside it."""
    rank, world = distributed_rank()
    if world == 1:
        yield Ranks()
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    try:
        if owned:
            store = _join_store(rank, world)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
            group = None
        else:
            group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    except LauncherError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise LauncherError(f"cannot join the other processes of the launcher (rank {rank} of {world}): "
                            f"{_first_line(exc)}") from None
    try:
        yield Ranks(rank, world, group)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def _join_store(rank: int, world: int):
    """The launcher's store (torch's env:// rendezvous) once all `world` processes joined it, waited for
    JOIN_TIMEOUT at most. It is joined in a daemon thread: this (main) thread keeps running Python, so
    Ctrl-C and SIGTERM still stop the process while the others are awaited."""
    from torch.distributed import DistError
    from torch.distributed.rendezvous import rendezvous

    result: list = []

    def join() -> None:
        try:
            if rank > 0:
                _wait_for_rank0(JOIN_TIMEOUT.total_seconds())
            result.append((True, next(rendezvous("env://", rank, world, timeout=JOIN_TIMEOUT))[0]))
        except BaseException as exc:  # handed to the main thread
            result.append((False, exc))

    thread = threading.Thread(target=join, name="tadisr-join", daemon=True)
    thread.start()
    thread.join(JOIN_NOTICE_SECONDS)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if thread.is_alive():
        log.warning("waiting for %d other process(es) at %s (rank %d of %d) ...", world - 1, where, rank, world)
        while thread.is_alive():
            thread.join(0.5)
    ok, value = result[0]
    if ok:
        return value
    if isinstance(value, _NoRank0) or (isinstance(value, DistError) and "timed out" in str(value).lower()):
        raise LauncherError(
            f"no other process joined rank {rank} of {world} at {where} within "
            f"{JOIN_TIMEOUT.total_seconds():g} s: MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE are set "
            "but no launcher started the other processes; unset them, or start through torchrun / "
            "accelerate launch") from None
    raise value


class _NoRank0(Exception):
    """Nothing listened at MASTER_ADDR:MASTER_PORT within JOIN_TIMEOUT."""


def _wait_for_rank0(seconds: float) -> None:
    """On a rank above 0: wait until rank 0's store accepts connections at MASTER_ADDR:MASTER_PORT (_NoRank0
    after `seconds`). Torch's store client would log pages of C++ stack frames on every failed try."""
    import socket
    import time

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not (port or "").isdigit():
        return  # the rendezvous names what is missing
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((addr, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise _NoRank0() from None
            time.sleep(0.2)


def _first_line(exc: BaseException) -> str:
    """The first line of gloo's (often long) message, or the exception's type when it has none."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
