"""Training, data synthesis and evaluation code for TADiSR (not needed for inference)."""

import importlib.util
import sys
from pathlib import Path

TRAIN_EXTRA_INSTALL = "pip install -e '.[train]' in the repository's folder"  # tadisr is not on PyPI
# the import names the `train` extra (pyproject.toml) provides, and the packages that provide them
TRAIN_EXTRA = {"yaml": "pyyaml", "kornia": "kornia", "rapidocr": "rapidocr", "onnxruntime": "onnxruntime",
               "Levenshtein": "levenshtein", "onnx": "onnx", "skimage": "scikit-image"}


def command_name(module: str) -> str:
    """How the user started `module`, for usage and error lines: its console script (`tadisr-train`) when
    run as one, else `python -m training.train`."""
    script = "tadisr-" + module.rpartition(".")[2]
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def missing_extras(module: str, *imports: str) -> str | None:
    """The one line saying which of `imports` (keys of TRAIN_EXTRA) the command `module` needs but cannot
    import, and how to install them; None when all are there. The commands ask it first, so that a missing
    extra is that line (exit 2), not an import traceback or an error per image."""
    missing = [TRAIN_EXTRA[name] for name in imports if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"{command_name(module)} needs the training extras ({', '.join(missing)} not installed): "
            f"{TRAIN_EXTRA_INSTALL}")

