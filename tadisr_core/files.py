"""Writing a file so that its final name appears only once it is complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `<path>.tmp` to write to; on success it is renamed onto `path`, on error removed.

    The rename is atomic on one filesystem, so readers (and an interrupted run) never see a
    half-written `path`.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
