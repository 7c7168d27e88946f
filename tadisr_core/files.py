"""Files: writing so that the final name appears only once complete, and clear reasons a file cannot be read."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterator


def default_file_mode() -> int:
    """Mode of a newly created file under the current umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_WRITES = itertools.count()  # numbers this process's temporary files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `<path>.<pid>-<n>.tmp` to write to; on success it is renamed onto `path`, on error removed.

    The rename is atomic on one filesystem, so readers (and an interrupted run) never see a
    half-written `path`; the process id and a count keep writers of the same file at once (the ranks
    of a launcher, threads) off each other's temporary file. The result gets the umask's normal mode (some
    writers create 0600 files).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_WRITES)}.tmp")
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that keeps `folder` from being (made) a folder: `folder` itself, or the nearest existing
    path above it when that is a file; None when nothing does (it may not exist yet)."""
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def folder_target_problem(folder: str | os.PathLike, name: str) -> str | None:
    """Why `folder` (given as `name`, e.g. "-o out") cannot become a folder (`file_in_the_way`), or None."""
    blocker = file_in_the_way(folder)
    if blocker is None:
        return None
    if blocker == Path(folder):
        return f"{name} is a file; give a folder"
    return f"{name}: {blocker} is a file, not a folder"


def file_target_problem(path: str | os.PathLike, name: str, example: str) -> str | None:
    """Why a file to write at `path` (given as `name`, e.g. "--json") cannot be written: it is an existing
    folder (`example` is a file name to suggest inside it), or a file stands where one of its folders must be.
    None when it can be written; checked before the work that produces the file."""
    path = Path(path)
    if path.is_dir():
        return f"{name} {path} is a folder: give a file name, e.g. {path / example}"
    blocker = file_in_the_way(path.parent)
    return None if blocker is None else f"{name} {path}: {blocker} is a file, not a folder"


def require_readable(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path` as a Path if it is a readable file; else FileNotFoundError / PermissionError / IsADirectoryError.

    The message names `what` the file is for, the path and the reason (`hint` is appended to "not found").
    """
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else "")) from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} {path} is a folder; expected a file") from None
    except PermissionError:
        raise PermissionError(f"{what} {path}: permission denied (check the owner and mode of the file and "
                              f"its folders)") from None
    return path


def json_object(text: str, where: str, hint: str) -> dict:
    """The JSON object in `text`; ValueError naming `where` it came from when it is not one (truncated,
    not JSON, or a list or string), with `hint` (what to do) appended."""
    try:
        value = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise ValueError(f"{where}: not valid JSON ({exc}); {hint}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a JSON {type(value).__name__}, not the object of settings expected; {hint}")
    return value


def read_json_object(path: str | os.PathLike, hint: str) -> dict:
    """`json_object` of a file (a config.json); OSError when it cannot be read, ValueError naming it
    when it is not a JSON object (an undecodable file included)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc}); {hint}") from None
    return json_object(text, str(path), hint)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same existing file (links and `..` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """Identity of a file or folder for caches: real path, size and modification time (ns)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


def user_cache_dir(kind: str, env_var: str) -> Path:
    """The folder where TADiSR keeps `kind` between runs: `$<env_var>` when set, else `~/.cache/tadisr/<kind>`
    (XDG_CACHE_HOME is not followed: files kept there by earlier versions stay found)."""
    own = os.environ.get(env_var)
    return Path(own).expanduser() if own else Path.home() / ".cache" / "tadisr" / kind


def source_identity(path: str | os.PathLike) -> tuple[str, int, int] | str:
    """`file_identity`, or the path alone for one that is not on disk (an object built in memory)."""
    try:
        return file_identity(path)
    except OSError:
        return str(path)
