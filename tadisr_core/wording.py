"""Messages name what the caller gave in the caller's words: Python argument names by default, the command
line's flags while a CLI command runs (`command_line`), so one message serves both."""

from __future__ import annotations

import contextlib
from typing import Iterator

_speaking_cli = False  # a process-wide setting, not a context variable: the CLI's reader and writer threads share it


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """While this is entered (or a function decorated with `@command_line()` runs: a CLI's `main`), `named`
    gives the command line's words."""
    global _speaking_cli
    before, _speaking_cli = _speaking_cli, True
    try:
        yield
    finally:
        _speaking_cli = before


def named(cli: str, python: str) -> str:
    """How a message names an input: `cli` (e.g. "--kolors DIR") inside `command_line()`, else `python`
    (e.g. "kolors_dir=DIR")."""
    return cli if _speaking_cli else python
