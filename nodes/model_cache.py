"""Loaded TADiSR models: the handle the nodes pass around, and a cache keyed by the load settings.

A handle lives as long as ComfyUI keeps the loader's output (its node cache); the cache here holds
handles weakly, so a second loader with the same settings shares the weights, and whatever
ComfyUI drops (a changed input, "free model and node cache") really goes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import host


@dataclass(eq=False)
class TADiSRHandle:
    """A loaded model, where it runs, and what it was loaded from."""

    model: Any                      # tadisr_core.model.TADiSRModel (weights on the offload device when idle)
    device: torch.device
    dtype: torch.dtype
    key: tuple
    sources: dict[str, str] = field(default_factory=dict)
    patcher: Any = None             # ComfyUI ModelPatcher, so ComfyUI can evict the model

    @contextlib.contextmanager
    def running(self, memory_required: int = 0) -> Iterator[Any]:
        """The model on its compute device for the duration of the block."""
        with host.model_on_device(self.model, self.device, self.patcher, memory_required) as model:
            yield model

    def __repr__(self) -> str:
        names = ", ".join(f"{k}={os.path.basename(v)}" for k, v in self.sources.items())
        return f"TADiSRHandle({names}, {self.dtype}, {self.device})"


_lock = threading.Lock()
_live: "weakref.WeakValueDictionary[tuple, TADiSRHandle]" = weakref.WeakValueDictionary()


def get_or_load(key: tuple, load: Callable[[], TADiSRHandle]) -> TADiSRHandle:
    """The cached handle for `key`, or `load()`'s result (cached)."""
    with _lock:
        handle = _live.get(key)
        if handle is None:
            handle = load()
            _live[key] = handle
        return handle


def clear() -> None:
    """Forget every cached model (tests)."""
    with _lock:
        _live.clear()
