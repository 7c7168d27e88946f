"""`python -m tadisr_core ...` (also under `accelerate launch -m tadisr_core upscale ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
