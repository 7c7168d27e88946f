"""Training, data synthesis and evaluation code for TADiSR (not needed for inference)."""

import sys
from pathlib import Path


def command_name(module: str) -> str:
    """How the user started `module`, for usage and error lines: its console script (`tadisr-train`) when
    run as one, else `python -m training.train`."""
    script = "tadisr-" + module.rpartition(".")[2]
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"
