"""GGUF, llama.cpp's single-file model format (versions 2 and 3), read and written.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata
as (string key, u32 type, value); tensor infos as (string name, u32 n_dims, u64 dims[n_dims], u32
ggml type, u64 offset); padding to ``general.alignment`` (default 32); tensor data.

The file is untrusted input. Every count, length and offset is checked against the bytes that are
left before anything is allocated or read (a 43-byte file declaring 2^63 array items once hung the
``gguf`` package), and tensor data must lie inside the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.common import LlmlabError, atomic_path
from llmlab.nn.ggml_quants import GGML_TYPES, KNOWN_UNSUPPORTED, dequantize, type_name

MAGIC = b"GGUF"
# value type id -> (struct code, size); 8 = string, 9 = array
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, T_UINT64 = 4, 5, 6, 7, 8, 9, 10
MAX_DIMS = 8
_U64 = struct.Struct("<Q")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first): GGUF stores dims innermost first
    ggml_type: int
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise LlmlabError(f"{self.path}: malformed GGUF: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain (truncated file?)")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q", 8, what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def string_array(self, count: int, key: str) -> list[str]:
        """The hot loop of loading a vocabulary (~50-250k strings): locals only, checks kept."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.fail(f"array {key!r} is truncated")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.fail(f"a string in {key!r} declares {n} bytes, more than remain")
            append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, f"value of {key!r}")
        if vtype == T_STRING:
            return self.string(f"string value of {key!r}")
        if vtype == T_ARRAY:
            if depth > 2:
                self.fail(f"arrays nested too deeply in {key!r}")
            itype = self.scalar("I", 4, f"array type of {key!r}")
            count = self.scalar("Q", 8, f"array length of {key!r}")
            # Smallest possible item: a scalar's size, 8 bytes for a string/array header.
            min_item = _SCALARS[itype][1] if itype in _SCALARS else 8 if itype in (T_STRING, T_ARRAY) else None
            if min_item is None:
                self.fail(f"array {key!r} has unknown item type {itype}")
            if count * min_item > self.size - self.pos:
                self.fail(f"array {key!r} declares {count} items, more than the file can hold")
            if itype in _SCALARS:
                code, size = _SCALARS[itype]
                vals = list(struct.unpack_from(f"<{count}{code}", self.buf, self.pos))
                self.pos += count * size
                return vals
            if itype == T_STRING:
                return self.string_array(count, key)
            return [self.value(itype, key, depth + 1) for _ in range(count)]
        self.fail(f"metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """Parsed header of a GGUF file; tensor data is read lazily from a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise LlmlabError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise LlmlabError(f"{self.path}: cannot read: {e.strerror}") from None
        cur = _Cursor(self._mm, self.path)
        if bytes(self._mm[:4]) != MAGIC:
            raise LlmlabError(f"{self.path}: not a GGUF file (bad magic {bytes(self._mm[:4])!r})")
        cur.pos = 4
        self.version = cur.scalar("I", 4, "version")
        if self.version not in (2, 3):
            raise LlmlabError(f"{self.path}: unsupported GGUF version {self.version} (llmlab reads 2 and 3)")
        n_tensors = cur.scalar("Q", 8, "tensor count")
        n_kv = cur.scalar("Q", 8, "metadata count")
        # Each metadata entry takes >= 8+4+1 bytes, each tensor info >= 8+4+4+8 bytes.
        if n_kv * 13 > size or n_tensors * 24 > size:
            cur.fail(f"header declares {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")
        self.metadata: dict[str, object] = {}
        self.metadata_types: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("I", 4, f"type of {key!r}")
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = vtype
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("I", 4, f"dims of {name!r}")
            if n_dims > MAX_DIMS:
                cur.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.scalar("Q", 8, f"shape of {name!r}") for _ in range(n_dims)]
            ttype = cur.scalar("I", 4, f"type of {name!r}")
            offset = cur.scalar("Q", 8, f"offset of {name!r}")
            infos.append((name, dims, ttype, offset))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            cur.fail(f"general.alignment={align!r} is not a power of two")
        data_start = cur.pos + (-cur.pos % align)
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ttype, offset in infos:
            if ttype not in GGML_TYPES and ttype not in KNOWN_UNSUPPORTED:
                cur.fail(f"tensor {name!r} has unknown ggml type {ttype}")
            if any(d > size * 64 for d in dims):
                cur.fail(f"tensor {name!r} declares an absurd shape {dims}")
            numel = math.prod(dims)
            block, bsize = GGML_TYPES.get(ttype, (None, 1, 0))[1:]
            if ttype in GGML_TYPES and numel % block:
                cur.fail(f"tensor {name!r} has {numel} elements, not a multiple of its block size {block}")
            nbytes = numel // block * bsize
            start = data_start + offset
            if ttype in GGML_TYPES and start + nbytes > size:
                raise LlmlabError(f"{self.path}: tensor {name!r} lies past the end of the file "
                                  f"(needs bytes up to {start + nbytes}, file has {size}): truncated download?")
            if name in self.tensors:
                cur.fail(f"tensor {name!r} appears twice")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ttype, start, nbytes)

    def raw(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor viewing the memory map (read-only: do not modify)."""
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)

    def load(self, name: str) -> torch.Tensor:
        """Dequantized float32 tensor with its PyTorch shape."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise LlmlabError(f"{self.path}: tensor {name!r} uses quantization {info.type_name}, which llmlab "
                              f"cannot read yet (supported: {', '.join(n for n, _, _ in GGML_TYPES.values())}); "
                              "re-export the model with one of those")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on a read-only map: we never write to it
            raw = self.raw(info)
        return dequantize(raw, info.ggml_type, info.numel).reshape(info.shape)


# ---- writing ------------------------------------------------------------------------------------
def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _infer_type(value) -> int:
    if isinstance(value, bool):
        return T_BOOL
    if isinstance(value, int):
        return T_UINT32 if 0 <= value < 2**32 else 11
    if isinstance(value, float):
        return T_FLOAT32
    if isinstance(value, str):
        return T_STRING
    if isinstance(value, (list, tuple)):
        return T_ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _pack_value(value, vtype: int, item_type: int | None = None) -> bytes:
    if vtype in _SCALARS:
        return struct.pack("<" + _SCALARS[vtype][0], value)
    if vtype == T_STRING:
        return _pack_string(value)
    if vtype == T_ARRAY:
        if item_type is None:
            kinds = {_infer_type(v) for v in value} or {T_INT32}
            item_type = T_STRING if T_STRING in kinds else T_FLOAT32 if T_FLOAT32 in kinds else T_INT32
        out = struct.pack("<IQ", item_type, len(value))
        if item_type in _SCALARS:
            return out + struct.pack(f"<{len(value)}{_SCALARS[item_type][0]}", *value)
        return out + b"".join(_pack_value(v, item_type) for v in value)
    raise ValueError(f"bad GGUF value type {vtype}")


def write_gguf(path: str | os.PathLike, metadata: dict[str, object], tensors: dict[str, tuple[bytes, tuple, int]],
               types: dict[str, int | tuple[int, int]] | None = None, alignment: int = 32) -> None:
    """Write a GGUF v3 file atomically.

    ``tensors``: name -> (raw bytes in ggml layout, PyTorch shape, ggml type id).
    ``types``: optional explicit value type for a key (or (T_ARRAY, item type) for arrays).
    """
    types = types or {}
    # Readers find the data with general.alignment (32 when absent): another alignment must be recorded.
    if metadata.get("general.alignment", alignment) != alignment:
        raise ValueError(f"general.alignment={metadata['general.alignment']!r} but alignment={alignment}")
    if alignment != 32:
        metadata = {**metadata, "general.alignment": alignment}
    parts = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        spec = types.get(key)
        vtype, item = (spec if isinstance(spec, tuple) else (spec, None)) if spec is not None else (None, None)
        vtype = vtype if vtype is not None else _infer_type(value)
        parts.append(_pack_string(key) + struct.pack("<I", vtype) + _pack_value(value, vtype, item))
    offset, blobs = 0, []
    for name, (data, shape, ttype) in tensors.items():
        dims = list(reversed(shape)) or [1]
        parts.append(_pack_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset))
        pad = -len(data) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = b"".join(parts)
    header += b"\0" * (-len(header) % alignment)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for b in blobs:
            f.write(b)
