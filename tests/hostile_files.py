"""Writers of hostile files for the tests (nothing binary is committed; each is built at test time).

`torch_zip` writes the torch zip container around any pickle bytes; `TorchLikePickler` pickles
objects the way `torch.save` does (tensor rebuild calls over persistent storage ids) but with any
size, stride and storage size, so lying files can be made without patching bytes. `gray_png` writes a
low-bit gray PNG with a transparency key; `json_only_text_encoder` a Kolors folder without ChatGLM3's shards.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import torch


def torch_zip(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A `torch.save`-shaped zip: archive/data.pkl, archive/data/<key> records, version, byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return Path(path)


def dag_key_pickle(levels: int = 64) -> bytes:
    """A dict whose key is a tuple DAG of `levels` levels: hashing it walks 2**levels nodes (~0.8 KB)."""
    out = [b"\x80\x02", b")", b"q\x00"]                    # PROTO 2, EMPTY_TUPLE, BINPUT 0
    for i in range(1, levels + 1):
        out += [b"h" + bytes([i - 1]), b"h" + bytes([i - 1]), b"\x86", b"q" + bytes([i])]  # (t, t), BINPUT i
    out += [b"}", b"h" + bytes([levels]), b"N", b"s", b"."]  # {t_levels: None}
    return b"".join(out)


def deep_tuple_pickle(depth: int = 2_000_000) -> bytes:
    """((((...)))) nested `depth` times with TUPLE1 (~`depth` bytes): crashes a recursive consumer."""
    return b"\x80\x02)" + b"\x85" * depth + b"."


class FakeStorage:
    """A storage reference: record `key` claiming `numel` elements of `storage_type`."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

    def __init__(self, storage: FakeStorage, size: tuple, stride: tuple, offset: int = 0):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchLikePickler(pickle.Pickler):
    """Protocol-2 pickler writing FakeStorage as torch's persistent ids."""

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_like(path: Path, obj, records: dict[str, bytes]) -> Path:
    """Write `obj` (with FakeTensor / FakeStorage inside) as a torch zip with the given records."""
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=2).dump(obj)
    return torch_zip(path, buf.getvalue(), records)


def floats(*values: float) -> bytes:
    """Little-endian float32 bytes."""
    return struct.pack(f"<{len(values)}f", *values)


def corrupt_one_record(src: Path, dst: Path) -> Path:
    """Copy a torch zip with one byte of its largest tensor record flipped (the zip still opens; the CRC is wrong)."""
    with zipfile.ZipFile(src) as zf:
        infos = [i for i in zf.infolist() if "/data/" in i.filename]
        target = max(infos, key=lambda i: i.file_size)
        offset = target.header_offset
        with open(src, "rb") as f:
            f.seek(offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
        start = offset + 30 + name_len + extra_len + target.file_size // 2
    data = bytearray(Path(src).read_bytes())
    data[start] ^= 0x55
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def gray_png(path, samples: list[int], bits: int, key: int) -> None:
    """A one-row gray PNG of `bits`-bit `samples` with tRNS `key`, byte by byte (Pillow before 13 ignores
    save(bits=...) for mode L and writes 8 bits)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = int("".join(format(v, f"0{bits}b") for v in samples).ljust(-(-len(samples) * bits // 8) * 8, "0"), 2)
    packed = row.to_bytes(-(-len(samples) * bits // 8), "big")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", len(samples), 1, bits, 0, 0, 0, 0))
                     + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", zlib.compress(b"\x00" + packed))
                     + chunk(b"IEND", b""))


def json_only_text_encoder(tiny_dir, folder):
    """A Kolors folder whose ChatGLM3 weights were not downloaded (unet/ vae/ tokenizer/ and *.json only):
    text_encoder/ holds config.json and the shard index, no shard."""
    shutil.copytree(tiny_dir["kolors"], folder, ignore=shutil.ignore_patterns("model.safetensors"))
    names = [f"pytorch_model-0000{i}-of-00007.bin" for i in range(1, 8)]
    index = {"metadata": {}, "weight_map": {f"transformer.t{i}": name for i, name in enumerate(names)}}
    (folder / "text_encoder" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder
