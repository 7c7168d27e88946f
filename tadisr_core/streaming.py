"""Weights straight from file into the target dtype, one tensor at a time.

A safetensors file is read with plain `readinto` calls (no memory map, so the file's pages never
count against the process), each tensor cast to the target dtype as soon as it is read. A load
therefore holds the weights once in their target dtype plus one tensor in the file's dtype.
Modules are built on the meta device and receive these tensors by assignment: no random init,
no fp32 copy of the whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
Rename = Callable[[str], str | None]
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # ComfyUI's two names for the format (in any case)
GGUF_HINT = ("a quantised format (ComfyUI-GGUF's) that TADiSR cannot load: give the .safetensors weights it was "
             "quantised from instead (fp16, bf16 and fp8 .safetensors files are read)")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class WeightsHeader:
    """The tensor table and metadata of a weights file, read without reading any tensor."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def weights_format(path: str | Path) -> str | None:
    """A file's format from its first bytes, whatever its name: "safetensors" (an 8-byte little-endian
    header length that fits the file, then `{`), "gguf", "zip" (a torch file), "pickle" (an older torch
    file) or "json" (such as the *.index.json of weights saved in shards); None for anything else or
    a file that cannot be read."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    for magic, name in ((b"GGUF", "gguf"), (b"PK\x03\x04", "zip"), (b"\x80", "pickle")):
        if head.startswith(magic):
            return name
    return "json" if head.lstrip()[:1] in (b"{", b"[") else None


def is_safetensors(path: str | Path) -> bool:
    """Whether `path` is read as safetensors: by its first bytes, else (a damaged or missing file, whose
    reading then says what is wrong) by its name: .safetensors or .sft in any case."""
    found = weights_format(path)
    return found == "safetensors" or (found is None and Path(path).suffix.lower() in SAFETENSORS_SUFFIXES)


def unreadable_format(path: str | Path) -> str | None:
    """Why no loader here reads `path`, when its first bytes say it is a GGUF file or JSON (the index of
    sharded weights: its folder is what to give); None for any other file."""
    found = weights_format(path)
    if found == "gguf":
        return f"{path} is a GGUF file, {GGUF_HINT}"
    if found == "json":
        return (f"{path} is a JSON file, not weights (an *.index.json lists the shards of weights saved in "
                f"pieces): give the folder that holds it")
    return None


def shards_folder(path: Path) -> Path:
    """The folder of `path` when it is a JSON file (the *.index.json of sharded weights, given for them),
    else `path`: the loaders of folders find the shards or say how to join them."""
    return path.parent if path.is_file() and weights_format(path) == "json" else path


def read_header(path: str | Path) -> WeightsHeader:
    """The header of a safetensors file (`is_safetensors`), or the tensor table of a torch `.bin` (memory-mapped)."""
    path = Path(path)
    if is_safetensors(path):
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            try:
                table = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
                raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
        meta, tensors = _parse_table(path, table, 8 + n)
        return WeightsHeader(path, tensors, meta)
    sd = _torch_file(path)
    return WeightsHeader(path, {k: TensorInfo(t.dtype, tuple(t.shape), 0, 0) for k, t in sd.items()}, {})


def header_mentions(path: str | Path, text: str) -> bool:
    """Whether a safetensors file's header (its tensor names and metadata) contains `text`, read as
    raw bytes without parsing: a cheap first filter over large model folders. True for other formats."""
    path = Path(path)
    if not is_safetensors(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            (n,) = struct.unpack("<Q", head)
            return text.encode() in f.read(min(n, 100 << 20))
    except OSError:
        return False


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_table(path: Path, table, base: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Metadata and tensor table of a safetensors header, checked as the format requires: string
    metadata, known dtypes, integer shapes, and byte spans that fit their shapes and tile the data
    buffer exactly (no overlaps, no holes, nothing past the end of the file)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file ({why})")

    if not isinstance(table, dict):
        raise bad("its header is not a table")
    meta = table.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("its metadata is not a table of strings")
    tensors = {}
    for k, v in table.items():
        shape, offsets = (v.get("shape"), v.get("data_offsets")) if isinstance(v, dict) else (None, None)
        if (not isinstance(v, dict) or v.get("dtype") not in _ST_DTYPES or not isinstance(shape, list)
                or not all(map(_is_count, shape)) or not isinstance(offsets, list) or len(offsets) != 2
                or not all(map(_is_count, offsets)) or offsets[0] > offsets[1]):
            raise bad(f"bad entry for tensor {k}: {str(v)[:120]}")
        info = TensorInfo(_ST_DTYPES[v["dtype"]], tuple(shape), base + offsets[0], base + offsets[1])
        if info.end - info.start != math.prod(info.shape) * info.dtype.itemsize:
            raise ValueError(f"{path} is corrupt: tensor {k} spans {info.end - info.start} bytes, its shape "
                             f"{list(info.shape)} needs {math.prod(info.shape) * info.dtype.itemsize}")
        tensors[k] = info
    end = base
    for k, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != end:
            raise ValueError(f"{path} is corrupt: tensor {k} starts at byte {info.start}, expected {end} "
                             f"(tensors overlap or leave a hole)")
        end = info.end
    size = path.stat().st_size
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    return meta, tensors


class TorchFileError(ValueError):
    """A torch file that `load_torch_file` cannot read, for a reason the message names with the file."""


def load_torch_file(path: str | Path, mmap: bool = False) -> object:
    """`torch.load(path, map_location="cpu", weights_only=True)` of a torch file, whatever its name, memory-mapped
    when `mmap` and the file allows it (a legacy pre-zip file is read whole).

    torch.load hands any path ending in .safetensors to safetensors without looking at its bytes, so a
    torch file under a safetensors name is given to it as an open file (which it cannot memory-map).
    TorchFileError for a pickle protocol torch's weights-only loader does not read, and for a safetensors
    error (from a torch that dispatches by other names too); other pickle errors pass as they are."""
    import pickle
    import warnings

    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():  # torch warns of any protocol above 2 before the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES:
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # a legacy (pre-zip) torch file cannot be memory-mapped: read it whole
                    if "mmap" not in str(e):
                        raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise TorchFileError(f"{path}: cannot be read as a torch file ({e})") from None
    except pickle.UnpicklingError as e:
        if "Unsupported operand" not in str(e):
            raise
        raise TorchFileError(f"{path} was written with a newer pickle protocol (torch.save(..., pickle_protocol=4 "
                             f"or 5)), which torch's weights-only loader does not read; nothing from it was "
                             f"executed. Re-save it with torch.save's default protocol") from None


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle (.bin / .ckpt / .pt), read with torch's weights-only loader; a
    training checkpoint's {"state_dict": ...} is unwrapped. ValueError saying what to give for a file
    that is no torch file (`unreadable_format`, or neither zip nor pickle)."""
    import pickle

    if weights_format(path) not in ("zip", "pickle") and path.is_file():
        raise ValueError(unreadable_format(path) or f"{path} is not a weights file TADiSR reads (neither safetensors "
                                                    f"nor a torch .bin / .pt / .ckpt): give the model's .safetensors")
    try:
        sd = load_torch_file(path, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is a pickle that holds more than weights (a training checkpoint?), and such files "
                         f"are not opened here for safety; save its state dict as .safetensors "
                         f"(safetensors.torch.save_file) and give that file") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def iter_tensors(path: str | Path, dtype: torch.dtype | None = None, rename: Rename | None = None,
                 header: WeightsHeader | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order, floating tensors cast to `dtype`, names passed through
    `rename` (None drops the tensor). Only one tensor in the file's dtype is alive at a time."""
    path = Path(path)
    if not is_safetensors(path):
        for name, t in _torch_file(path).items():
            new = rename(name) if rename else name
            if new is not None:
                cast = _cast(t, dtype)
                yield new, cast.clone() if cast is t else cast  # never hand out the memory map
        return
    header = header or read_header(path)
    with open(path, "rb", buffering=0) as f:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            new = rename(name) if rename else name
            if new is None:
                continue
            size = info.end - info.start
            if size == 0:
                yield new, _cast(torch.empty(info.shape, dtype=info.dtype), dtype)
                continue
            buf = bytearray(size)
            f.seek(info.start)
            view, got = memoryview(buf), 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
                got += n
            t = torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
            yield new, _cast(t, dtype)
            del t, buf  # before the next tensor is read


def fit_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """`t` in the layer's `shape` when only the layout differs: LDM files store the VAE's attention
    projections as 1x1 convolutions, where diffusers has linear layers."""
    if tuple(t.shape) != tuple(shape) and t.numel() == math.prod(shape):
        return t.reshape(shape)
    return t


def assign_weights(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], source: str | Path) -> None:
    """Give a meta-built `module` its tensors by assignment (no copy), in the shapes of its layers
    (`fit_shape`). Raises ValueError naming `source` on any gap."""
    want = dict(module.state_dict(keep_vars=True))
    got: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        ref = want.get(name)
        got[name] = t if ref is None else fit_shape(t, ref.shape)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if tuple(want[k].shape) != tuple(got[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: expected {tuple(want[k].shape)}, "
                         f"found {tuple(got[k].shape)})")
        raise ValueError(f"{source}: the weights do not fit the model: " + "; ".join(parts))
    module.load_state_dict(got, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{source}: no values for {leftover[:3]} after loading")


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of `module`, each shared tensor counted once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
