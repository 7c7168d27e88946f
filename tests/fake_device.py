"""A second device on a machine with only a CPU, for the sequential-offload tests."""

from __future__ import annotations

from typing import Iterable

import torch


class FakeDevice:
    """"cpu:0" stands for the GPU, "cpu" for the host. Every move between them through `Tensor.to` (so
    `Module.to` too) is a real copy, as between host and GPU, and where a tensor is comes from its storage
    (`on_device`). Copies of the `watched` tensors (a model's weights) and of their copies are counted by
    direction in `copies`."""

    DEVICE, HOME = torch.device("cpu", 0), torch.device("cpu")

    def __init__(self, monkeypatch, watched: Iterable[torch.Tensor]):
        self.copies = {"to device": 0, "home": 0}
        self._device: set[int] = set()      # storages on the device
        self._weights = {t.data_ptr() for t in watched if t.numel()}
        self._alive: list[torch.Tensor] = []  # device copies, kept so that no address is used twice
        real = torch.Tensor.to

        def to(t, *args, **kwargs):
            out = real(t, *args, **kwargs)
            target = next((a for a in (*args, kwargs.get("device")) if isinstance(a, (torch.device, str))), None)
            if target is None or not t.numel():
                return out
            target, here = torch.device(target), t.data_ptr() in self._device
            if target == self.DEVICE and not here:
                out = out.clone() if out.data_ptr() == t.data_ptr() else out
                self._device.add(out.data_ptr())
                self._alive.append(out)
                self._count(t, out, "to device")
            elif target == self.HOME and here:
                out = out.clone() if out.data_ptr() == t.data_ptr() else out
                self._count(t, out, "home")
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _count(self, source: torch.Tensor, copy: torch.Tensor, direction: str) -> None:
        if source.data_ptr() in self._weights:
            self.copies[direction] += 1
            self._weights.add(copy.data_ptr())

    def on_device(self, t: torch.Tensor) -> bool:
        """Whether `t`'s storage is a copy made on the device."""
        return t.data_ptr() in self._device
