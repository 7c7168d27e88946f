"""Building a module tree without the cyclic garbage collector's interruptions, and without the frames
that torch._dynamo's first import holds on to."""

from __future__ import annotations

import contextlib
import gc
import sys


def import_torch_dynamo() -> None:
    """Import torch._dynamo (diffusers and peft import it) now, keeping nothing of the callers.

    Its first import leaves a reference cycle that holds every frame on the stack at that moment
    (torch.fx's `wrap` keeps its own frame in a local), and a frame that has returned keeps its last
    locals. So the first model a process built stayed in memory after its last user let it go, held by
    the frames of the functions that built and returned it, until the cyclic collector happened to
    run. Collecting that cycle right after the import leaves those frames to reference counting.
    """
    if "torch._dynamo" in sys.modules:
        return
    import torch._dynamo  # noqa: F401

    gc.collect()


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a model's module tree is built (usable as a decorator).

    A build makes tens of thousands of Python objects (every module, parameter and LoRA layer), none of
    them garbage yet, and so many new objects set off full collections of the whole process heap: a
    quarter of the build time in a process that holds a few models (ComfyUI, a test worker). Reference
    counting frees objects as usual meanwhile; a collector someone else turned off stays off. The
    libraries a build imports come in through `import_torch_dynamo` first.
    """
    import_torch_dynamo()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
