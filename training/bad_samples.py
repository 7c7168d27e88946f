"""Training survives damaged samples: a sample that cannot be loaded is replaced and reported.

`TolerantItems` wraps the seeded dataset. When item (epoch, i) raises (corrupt HR, wrong-size
mask or LR, unreadable file), the next index is tried, deterministically, so a resumed run sees
the same replacements. The returned item's "bad" field lists what was skipped ("" when nothing), so
the trainer can count and log it in the main process whatever the number of data-loader workers.
When the data itself is broken (every sample fails, or samples of different sizes meet in a batch),
`DataBroken` says so in words, and the trainer stops with that message instead of a traceback.
"""
from __future__ import annotations

import re

from torch.utils.data import Dataset

MAX_TRIES = 16   # consecutive bad samples before the data itself is declared broken


class DataBroken(RuntimeError):
    """The training data cannot make a batch; the message says why and what to change."""


def data_broken_message(exc: DataBroken) -> str:
    """The message of `exc`, also when a DataLoader worker raised it (torch then re-raises it in the main
    process with the worker's traceback in front of the message)."""
    text = str(exc)
    if "Original Traceback" in text:
        text = text.rsplit(f"{DataBroken.__name__}: ", 1)[-1]
    return text.strip()


def collate_same_size(items: list[dict]) -> dict:
    """torch's default batching, after checking the samples have one size (they differ when `data.crop`
    is null and the images do)."""
    from torch.utils.data import default_collate

    by_size: dict[str, list[str]] = {}
    for item in items:
        by_size.setdefault(f"{item['hr'].shape[-1]}x{item['hr'].shape[-2]}", []).append(str(item["name"]))
    if len(by_size) > 1:
        found = "; ".join(f"{size}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for size, names in by_size.items())
        raise DataBroken(f"one batch holds images of different sizes ({found}): with data.crop null every "
                         "image must have the same size; set data.crop, or train.batch_size: 1")
    return default_collate(items)


class TolerantItems(Dataset):
    """Dataset keyed by (epoch, index) whose failing items are replaced by the next good one."""

    def __init__(self, inner: Dataset, describe=None):
        self.inner = inner
        self.describe = describe or (lambda index: f"sample {index}")

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad = []
        for k in range(MAX_TRIES):
            i = (index + k) % len(self.inner)
            item, damage = self._load(epoch, i)
            if damage:
                bad.append(damage)
                continue
            return {**item, "bad": "\n".join(bad)}
        raise DataBroken(f"{MAX_TRIES} samples in a row could not be loaded; the data is broken. Last errors:\n"
                         + "\n".join(bad[-3:]))

    def _load(self, epoch: int, i: int) -> tuple[dict | None, str]:
        """(item i, "") or (None, what is damaged: the sample and the error)."""
        try:
            return self.inner[(epoch, i)], ""
        except Exception as exc:  # noqa: BLE001 - any damage in one sample must not stop training
            return None, f"{self.describe(i)}: {type(exc).__name__}: {exc}"

    def still_damaged(self, entries: list[str]) -> list[str]:
        """Of damaged samples listed before (a checkpoint's list), those that still fail, as they fail now.
        One that loads (fixed) or whose index now names other files (removed, renamed) is left out."""
        still = []
        for entry in entries:
            found = re.match(r"sample (\d+)\b", entry)
            i = int(found.group(1)) if found else -1
            if 0 <= i < len(self) and entry.startswith(f"{self.describe(i)}: "):
                still.append(self._load(0, i)[1])
        return sorted({damage for damage in still if damage})


def sample_describer(dataset):
    """A function index -> the sample's file(s), for datasets that list their items; else "sample i"."""
    items = getattr(dataset, "items", None)

    def describe(index: int) -> str:
        if items is not None and index < len(items):
            entry = items[index]
            files = [str(v) for v in (entry[1].values() if isinstance(entry[1], dict) else entry[1:]) if v]
            return f"sample {index} ({', '.join(files)})"
        return f"sample {index}"

    return describe
