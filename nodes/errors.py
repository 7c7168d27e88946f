"""Errors as users meet them in ComfyUI: every message a node raises starts with "TADiSR: ".

The nodes' own messages carry the prefix; `reported` gives it to everything else a node's `execute`
raises (the library's errors: the value-range refusal, NonFiniteError, KolorsFolderError, ...) at the
one place node execution enters the pack, keeping the exception's type and traceback.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

PREFIX = "TADiSR: "

F = TypeVar("F", bound=Callable)


def prefix_message(exc: BaseException) -> None:
    """Put `PREFIX` before `exc`'s message, in place (same object, type and traceback).

    Left alone: out-of-memory errors (ComfyUI acts on their type and words), messages that already begin
    with TADiSR's name, and exceptions whose text is not their one string argument (ComfyUI's interrupt has none;
    an OSError with an errno is formatted from several)."""
    from tadisr_core.devices import is_oom

    if is_oom(exc) or len(exc.args) != 1 or not isinstance(exc.args[0], str):
        return
    message = exc.args[0]
    if str(exc) != message or message.startswith((PREFIX, "TADiSR ")):  # "TADiSR Read Text: ..." names us too
        return
    exc.args = (PREFIX + message,)


def reported(execute: F) -> F:
    """Decorator for a node's `execute`: whatever it raises reaches ComfyUI with `prefix_message` applied."""

    @functools.wraps(execute)
    def run(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except Exception as exc:
            prefix_message(exc)
            raise

    return run  # type: ignore[return-value]
