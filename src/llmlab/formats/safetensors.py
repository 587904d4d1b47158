"""The safetensors format, read and written with every declared size checked first.

Layout: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. A bad header length, overlapping or out-of-file offsets, or
a size that does not match dtype x shape is a clear error before any tensor is built.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from llmlab.common import LlmlabError, atomic_path

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> tuple[dict, int, int]:
    """Return (header dict, data start offset, file size) after validating every entry."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlmlabError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise LlmlabError(f"{path}: safetensors header length {n} does not fit in a file of {size} "
                                  "bytes (truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise LlmlabError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise LlmlabError(f"{path}: safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise LlmlabError(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            raise LlmlabError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)):
            raise LlmlabError(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offs
        nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise LlmlabError(f"{path}: tensor {name!r} data_offsets {offs} do not match its shape {shape} "
                              f"within {data_size} data bytes (truncated or corrupt file)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise LlmlabError(f"{path}: tensors {n1!r} and {n2!r} overlap (corrupt file)")
    return header, data_start, size


def load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (memory-mapped, copy-on-write: safe to modify)."""
    header, start, size = read_header(path)
    out: dict[str, torch.Tensor] = {}
    if size == start:
        return {name: torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
                for name, info in header.items() if name != "__metadata__"}
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        if end == begin:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=start + begin)
        out[name] = t.view(dtype).reshape(info["shape"])
    return out


def save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (contiguous, CPU copies) atomically; shared storage is written once per name."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in NAMES:
            raise LlmlabError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
