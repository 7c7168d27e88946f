"""A bounded look at a torch zip checkpoint before `torch.load` ever unpickles it.

`torch.load(weights_only=True)` runs no code, but a hostile pickle can still freeze the process
(a dict key built as a deep tuple DAG makes hashing take 2^depth steps in C, holding the Python
lock) or crash it (a million-deep nested tuple). `scan_torch_zip` walks the pickle's opcodes with
the standard library's `pickletools` (no object is built), keeping one small record per stack and
memo entry, and refuses, naming the file and the reason:

* nesting deeper than `MAX_DEPTH`, or one value that, counting each shared reference again, holds
  more than `MAX_EXPANDED` objects (a small DAG that printing or comparing would expand);
* dict keys and set items that are not plain strings or integers;
* globals outside the few that `torch.save` writes for tensors and state dicts (the name is given);
* opcodes `torch.save` never writes for such files (object construction, extensions, text persistent ids);
* containers changed after they were put inside another object (only crafted pickles do that);
* storages that claim more bytes than their zip record holds, and tensor views reaching past their storage;
* zip records that are compressed, too large, or fail their CRC-32 (torch itself ignores the CRC).

Time and memory are linear in the pickle's size; the CRC pass streams the records in chunks.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

MAX_DEPTH = 64                   # torch.save of nested state dicts stays below 12
MAX_PICKLE_BYTES = 256 << 20     # the pickle part only (tensor bytes live in separate records)
MAX_STACK = 100_000              # live unconsumed objects (torch.save batches dict items by 1000)
MAX_MEMO = 200_000               # remembered objects (a full checkpoint with optimiser state needs ~50k)
MAX_EXPANDED = 10_000_000        # objects one value holds when shared references are counted each time
_CHUNK = 1 << 20

_ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
    "torch.storage.UntypedStorage",
})
_REBUILD = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                      "torch._utils._rebuild_parameter"})
_STORAGE_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16,
}
_DTYPE_ITEMSIZE = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "int64": 8,
    "long": 8, "int32": 4, "int": 4, "int16": 2, "short": 2, "int8": 1, "uint8": 1, "bool": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
# Opcodes that build arbitrary objects or read extension registries: torch.save never writes them here.
_REFUSED_OPS = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID",
                          "NEXT_BUFFER", "READONLY_BUFFER", "BYTEARRAY8"})
_IN_PLACE = frozenset({"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD"})
_KEYED = frozenset({"SETITEM", "SETITEMS", "ADDITEMS", "FROZENSET"})
_MARK = object()
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class UnsafePickleError(ValueError):
    """The file's pickle was refused before loading; the message names the file and the reason."""


class _Item:
    """What the scan knows of one pickled object: nesting depth, kind, small literal value."""

    __slots__ = ("depth", "kind", "value", "sealed", "size")

    def __init__(self, depth: int = 0, kind: str = "other", value=None, size: int = 1):
        self.depth, self.kind, self.value, self.sealed, self.size = depth, kind, value, False, size


def _storage_itemsize(name: str) -> int | None:
    if name == "torch.storage.UntypedStorage":
        return 1
    if name.startswith("torch.") and name.endswith("Storage"):
        return _STORAGE_ITEMSIZE.get(name[len("torch."):-len("Storage")])
    return None


def _global_allowed(name: str) -> bool:
    if name in _ALLOWED_GLOBALS or _storage_itemsize(name) is not None:
        return True
    return name.startswith("torch.") and name[len("torch."):] in _DTYPE_ITEMSIZE


def _literal(item: _Item):
    return item.value if item.kind in ("str", "int", "global", "tuple", "bool", "none", "storage") else None


class _Scan:
    def __init__(self, path: Path, records: dict[str, zipfile.ZipInfo], prefix: str):
        self.path, self.records, self.prefix = path, records, prefix
        self.stack: list = []
        self.memo: dict[int, _Item] = {}
        self.storages: dict[str, int] = {}        # record key -> bytes claimed by the pickle
        self.itemsizes: dict[str, int] = {}       # record key -> element size of its typed storage

    def refuse(self, reason: str):
        raise UnsafePickleError(f"{self.path}: refused: {reason}; nothing from it was executed")

    def pop(self) -> _Item:
        if not self.stack or self.stack[-1] is _MARK:
            self.refuse("malformed pickle (stack underflow)")
        return self.stack.pop()

    def pop_to_mark(self) -> list[_Item]:
        items = []
        while self.stack and self.stack[-1] is not _MARK:
            items.append(self.stack.pop())
        if not self.stack:
            self.refuse("malformed pickle (no mark)")
        self.stack.pop()
        return items[::-1]

    def push(self, item: _Item) -> None:
        if len(self.stack) >= MAX_STACK:
            self.refuse(f"more than {MAX_STACK:,} objects pending at once (more than a weights file needs)")
        if item.depth > MAX_DEPTH:
            self.refuse(f"objects nested deeper than {MAX_DEPTH} levels (a crafted pickle; it could crash the "
                        f"process)")
        if item.size > MAX_EXPANDED:
            self.refuse(f"shared references that expand to more than {MAX_EXPANDED:,} objects (a crafted pickle; "
                        f"printing or comparing it could take forever)")
        self.stack.append(item)

    def run(self, data: bytes) -> None:
        try:
            for op, arg, pos in pickletools.genops(data):
                self.step(op, arg, pos)
        except UnsafePickleError:
            raise
        except ValueError as exc:  # pickletools: truncated or malformed opcode stream
            raise UnsafePickleError(f"{self.path}: cannot be read, truncated or corrupt pickle ({exc})") from None

    def step(self, op, arg, pos: int) -> None:  # noqa: C901 - one branch per opcode family
        name = op.name
        if name in _REFUSED_OPS:
            self.refuse(f"opcode {name} at byte {pos} builds arbitrary objects (not written by torch.save)")
        if name in ("PROTO", "FRAME", "STOP"):
            if name == "STOP":
                self.pop()
            return
        if name == "MARK":
            if len(self.stack) >= MAX_STACK:
                self.refuse(f"more than {MAX_STACK:,} objects pending at once (more than a weights file needs)")
            self.stack.append(_MARK)
            return
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not self.stack or self.stack[-1] is _MARK:
                self.refuse("malformed pickle (memo of nothing)")
            self.memo[len(self.memo) if name == "MEMOIZE" else int(arg)] = self.stack[-1]
            if len(self.memo) > MAX_MEMO:
                self.refuse(f"more than {MAX_MEMO:,} remembered objects (more than a weights file needs)")
            return
        if name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in self.memo:
                self.refuse(f"malformed pickle (memo {arg} read before it was written)")
            self.push(self.memo[int(arg)])
            return
        if name == "DUP":
            self.push(self.stack[-1] if self.stack and self.stack[-1] is not _MARK else self.pop())
            return
        if name == "POP":
            self.pop()
            return
        if name == "POP_MARK":
            self.pop_to_mark()
            return
        if name == "GLOBAL":
            self.push(self.global_item(str(arg).replace(" ", ".", 1)))
            return
        if name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if module.kind != "str" or attr.kind != "str" or module.value is None or attr.value is None:
                self.refuse("STACK_GLOBAL with a computed name")
            self.push(self.global_item(f"{module.value}.{attr.value}"))
            return
        if name == "BINPERSID":
            self.push(self.persistent(self.pop()))
            return
        # Everything else: literals and containers, read from pickletools' stack description.
        before = [s.name for s in op.stack_before]
        if "mark" in before:
            sliced = self.pop_to_mark()
            pre = [self.pop() for _ in range(before.index("mark"))][::-1]
        else:
            sliced, pre = [], [self.pop() for _ in before][::-1]
        if not op.stack_after:
            return
        if name in _KEYED:
            keys = sliced[0::2] if name == "SETITEMS" else ([pre[1]] if name == "SETITEM" else sliced)
            for key in keys:
                if key.kind not in ("str", "int"):
                    self.refuse(f"a dict key or set item that is a {key.kind}, not a plain string or integer "
                                f"(hashing it could take forever)")
        if name in _IN_PLACE:
            target, parts = pre[0], pre[1:] + sliced
            if target.sealed:
                self.refuse(f"{name} at byte {pos} changes an object after it was used inside another")
            for p in parts:
                p.sealed = True
            target.depth = max([target.depth] + [p.depth + 1 for p in parts])
            target.size = min(MAX_EXPANDED + 1, target.size + sum(p.size for p in parts))
            self.push(target)
            return
        parts = pre + sliced
        for p in parts:
            p.sealed = True
        depth = 1 + max((p.depth for p in parts), default=-1) if parts else 0
        item = self.reduce(pre[0], pre[1], depth) if name == "REDUCE" else self.literal(name, arg, parts, depth)
        item.size = min(MAX_EXPANDED + 1, 1 + sum(p.size for p in parts))
        self.push(item)

    def literal(self, name: str, arg, parts: list[_Item], depth: int) -> _Item:
        if "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            return _Item(depth, "str", arg if isinstance(arg, str) and len(arg) <= 256 else None)
        if name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
            if isinstance(arg, bool):
                return _Item(depth, "bool", arg)
            return _Item(depth, "int", arg if abs(arg) < 1 << 64 else None)
        if name in ("NEWTRUE", "NEWFALSE"):
            return _Item(depth, "bool", name == "NEWTRUE")
        if name == "NONE":
            return _Item(depth, "none", None)
        if name.startswith("TUPLE") or name == "EMPTY_TUPLE":
            values = tuple(_literal(p) for p in parts)
            return _Item(depth, "tuple", values if len(parts) <= 16 else None)
        kind = {"EMPTY_DICT": "dict", "DICT": "dict", "EMPTY_LIST": "list", "LIST": "list",
                "EMPTY_SET": "set", "FROZENSET": "set"}.get(name, "other")
        return _Item(depth, kind)

    def global_item(self, name: str) -> _Item:
        module, _, attr = name.rpartition(".")
        name = f"{_PY2_MODULES.get(module, module)}.{attr}"  # protocol 2 spells builtins as __builtin__
        if not _global_allowed(name):
            self.refuse(f"the global {name} is not allowed in a weights file (only tensors, dtypes and state "
                        f"dicts are); it was not imported")
        return _Item(0, "global", name)

    def persistent(self, pid: _Item) -> _Item:
        v = pid.value if pid.kind == "tuple" else None
        if not (isinstance(v, tuple) and len(v) == 5 and v[0] == "storage" and isinstance(v[2], str)
                and isinstance(v[4], int) and isinstance(v[1], str)):
            self.refuse("a persistent id that is not a plain tensor storage reference")
        itemsize = _storage_itemsize(v[1])
        if itemsize is None or v[4] < 0:
            self.refuse(f"a storage of unknown type {v[1]}")
        key, nbytes = v[2], v[4] * itemsize
        record = self.records.get(f"{self.prefix}data/{key}")
        if record is None:
            self.refuse(f"storage {key!r} has no record in the zip (truncated or corrupt file)")
        if nbytes > record.file_size:
            self.refuse(f"storage {key!r} claims {nbytes:,} bytes but its zip record holds {record.file_size:,}")
        self.storages[key], self.itemsizes[key] = nbytes, itemsize
        return _Item(pid.depth + 1, "storage", (key, nbytes))

    def reduce(self, fn: _Item, args: _Item, depth: int) -> _Item:
        if fn.kind != "global":
            self.refuse("a call of something other than an allowed global")
        if fn.value in _REBUILD and fn.value != "torch._utils._rebuild_parameter":
            self.check_view(args)
            return _Item(depth, "tensor")
        if fn.value == "collections.OrderedDict":
            return _Item(depth, "dict")
        if fn.value == "torch._utils._rebuild_parameter":
            return _Item(depth, "tensor")
        self.refuse(f"the global {fn.value} is called; only tensor rebuilds and OrderedDict may be")

    def check_view(self, args: _Item) -> None:
        """A tensor view must stay inside its storage (else it could ask for any amount of memory)."""
        v = args.value if args.kind == "tuple" else None
        if not v or len(v) < 4 or not isinstance(v[0], tuple) or len(v[0]) != 2:
            self.refuse("a tensor rebuilt from arguments that are not plain literals")
        storage, offset, size, stride = v[0], v[1], v[2], v[3]
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and all(isinstance(s, int) and s >= 0 for s in size + stride)):
            self.refuse("a tensor with a size or stride that is not a tuple of non-negative integers")
        itemsize = 1
        if len(v) >= 7 and v[6] is not None:  # _rebuild_tensor_v3 passes the dtype (storage is untyped)
            itemsize = _DTYPE_ITEMSIZE.get(str(v[6]).rpartition(".")[2], 0)
            if not itemsize:
                self.refuse(f"a tensor of unknown dtype {v[6]}")
            elements = storage[1] // itemsize
        else:
            elements = None
        key, nbytes = storage
        if elements is None:  # typed storage: offset and strides count elements of that type
            elements = nbytes // self.itemsizes[key]
        extent = 0 if 0 in size else offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
        if offset < 0 or extent > elements:
            self.refuse(f"a tensor view of shape {list(size)} reaches past its storage {key!r} "
                        f"({elements:,} elements)")


def _find_pickle(path: Path, zf: zipfile.ZipFile) -> tuple[zipfile.ZipInfo, str]:
    pkls = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pkls) != 1:
        raise UnsafePickleError(f"{path}: not a torch checkpoint (expected one <name>/data.pkl in the zip, "
                                f"found {len(pkls)})")
    return pkls[0], pkls[0].filename[: -len("data.pkl")]


def scan_torch_zip(path: str | Path, *, verify_crc: bool = True) -> dict[str, int]:
    """Check a `torch.save` zip without unpickling it; returns {storage key: bytes}. UnsafePickleError if refused."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            info, prefix = _find_pickle(path, zf)
            records = {i.filename: i for i in zf.infolist()}
            for i in records.values():
                if i.compress_type != zipfile.ZIP_STORED:
                    raise UnsafePickleError(f"{path}: refused: record {i.filename} is compressed (torch.save "
                                            f"stores records uncompressed); nothing from it was executed")
            if info.file_size > MAX_PICKLE_BYTES:
                raise UnsafePickleError(f"{path}: refused: its pickle is {info.file_size:,} bytes (limit "
                                        f"{MAX_PICKLE_BYTES:,}); nothing from it was executed")
            scan = _Scan(path, records, prefix)
            scan.run(zf.read(info))
            if verify_crc:
                for key in scan.storages:
                    _check_crc(zf, records[f"{prefix}data/{key}"], path)
            return scan.storages
    except zipfile.BadZipFile as exc:
        raise UnsafePickleError(f"{path}: cannot be read, truncated or corrupt ({exc})") from None


def rereadable_torch_zip(path: str | Path) -> bool:
    """Whether `path` is a torch zip whose pickle passes the bounded scan (CRCs not read), so that its
    tensor table may be read with torch's weights-only loader without being asked for."""
    try:
        scan_torch_zip(path, verify_crc=False)
    except (ValueError, OSError):  # refused, not a zip (safetensors, a legacy pickle...), unreadable
        return False
    return True


def _check_crc(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    with zf.open(info) as f:  # ZipExtFile checks the CRC-32 when the record has been read to its end
        while f.read(_CHUNK):
            pass
