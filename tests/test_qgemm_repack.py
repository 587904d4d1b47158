"""The repacked multi-row int8 GEMM (nn/csrc/qgemm.c qrepack + group tiles): the interleaved layout against a
hand-written NumPy repack, every build bit-identical to the portable C for 1..512 rows, a row's bits independent of
the rows sharing its call (batched = solo), for one Q8 row per activation row and with residual blocks (every block:
``int8x2``, the blocks with an outlier: ``int8r``), the residual firing only where a block has an outlier, and
the repacked copy following in-place writes to the blocks. The product itself is checked against the dequantized
float32 product in test_qgemm.py."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from llmlab.nn.cpu_kernels import CSRC, build_kernel, find_compiler, runnable_variants
from llmlab.nn.ggml_quants import dequantize, q8_activations, q8r_activations
from llmlab.nn.packed_linear import (
    ACT_RESIDUAL,
    LINEAR_ARGTYPES,
    REPACK_ARGTYPES,
    REPACKED_ARGTYPES,
    RESIDUAL_T,
    PackedLinear,
    kernel,
)
from tests.test_qgemm import TYPES, _packed

BLOCK = {8: 34, 2: 18, 3: 20, 6: 22, 7: 24}


@pytest.fixture(scope="module")
def libs():
    """Every variant this CPU runs, built once (the shared kernel cache): {variant: ctypes library}."""
    if find_compiler() is None:
        pytest.skip("no C compiler")
    out = {}
    for v in runnable_variants():
        build = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, v)
        assert build.fn is not None, build.status
        lib = build.lib
        lib.qlinear_repacked.restype, lib.qlinear_repacked.argtypes = ctypes.c_int, REPACKED_ARGTYPES
        lib.qrepack.restype, lib.qrepack.argtypes = ctypes.c_int, REPACK_ARGTYPES
        lib.qrepack_paired.restype, lib.qrepack_paired.argtypes = ctypes.c_int, []
        lib.qrepack_bytes.restype = ctypes.c_int64
        lib.qrepack_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        out[v] = lib
    return out


def _repack(lib, tid: int, raw: torch.Tensor, K: int) -> torch.Tensor:
    N = raw.shape[0]
    out = torch.empty(lib.qrepack_bytes(tid, N, K), dtype=torch.uint8)
    assert lib.qrepack(tid, raw.data_ptr(), N, K, out.data_ptr()) == 0
    return out


def _numpy_repack(tid: int, raw: np.ndarray, K: int, paired: bool) -> np.ndarray:
    """The layout written out by hand: group-blocks (g, b) of d[8] | m[8] | qh[8] u32 | qs, chunk j of row n at
    bytes 4n..4n+3 of vector j (Q8_0) or of vector j % 4 (Q4/Q5 nibbles); bit 4n + i of qh[j] = bit 4j + i;
    group-major, or ``paired`` (the AVX-512 build): groups 2p and 2p + 1 alternate block by block (0 of 2p, 0 of
    2p + 1, 1 of 2p, ...), a last odd group alone."""
    bb, nb = BLOCK[tid], K // 32
    N = raw.shape[0]
    G = -(-N // 8)
    blocks = np.zeros((G * 8, nb, bb), np.uint8)
    blocks[:N] = raw.reshape(N, nb, bb)
    hm, q5 = tid in (3, 7), tid in (6, 7)
    out = []
    order = []  # (g, b): pairs of groups alternate block by block; a last unpaired group runs alone
    for p in range(0, G, 2 if paired else 1):
        pair = [g for g in (p, p + 1) if g < G] if paired else [p]
        order += [(g, b) for b in range(nb) for g in pair]
    for g, b in order:
        rows = blocks[g * 8:(g + 1) * 8, b]  # (8, bb)
        parts = [rows[:, 0:2].reshape(-1)]
        if hm:
            parts.append(rows[:, 2:4].reshape(-1))
        at = 2 + 2 * hm
        if q5:
            qh = rows[:, at:at + 4].copy().view("<u4").reshape(8)
            words = np.zeros(8, "<u4")
            for j in range(8):
                for n in range(8):
                    words[j] |= ((int(qh[n]) >> (4 * j)) & 0xF) << (4 * n)
            parts.append(words.view(np.uint8))
            at += 4
        qs = rows[:, at:]  # (8, 16 or 32)
        for j in range(qs.shape[1] // 4):
            parts.append(qs[:, 4 * j:4 * j + 4].reshape(-1))
        out.append(np.concatenate(parts))
    return np.concatenate(out)


@pytest.mark.parametrize("name", list(TYPES))
def test_the_interleaved_layout_is_the_hand_written_one(libs, name):
    tid = TYPES[name]
    for rows in (13, 40):  # one full group and a padded one; five groups: two pairs and a lone one
        raw = _packed(name, rows, 96)
        for v, lib in libs.items():
            got = _repack(lib, tid, raw, 96).numpy()
            assert lib.qrepack_paired() == (v == "avx512vnni")
            np.testing.assert_array_equal(got, _numpy_repack(tid, raw.numpy(), 96, lib.qrepack_paired()))


@pytest.mark.parametrize("impl", ["int8", "int8x2", "int8r"])
@pytest.mark.parametrize("name", list(TYPES))
def test_every_build_gives_the_portable_bits_and_a_row_the_same_bits_alone(libs, name, impl):
    """For 1, 2, 5, 8, 33 and 512 rows, K = 160 (not a multiple of 256), 97 outputs (odd), 1 and 2 threads: every
    variant's output equals the portable C's bit for bit, and row i of a batch equals row i computed alone. Outliers
    in column 3 of every row and column 70 of every third: int8r's tiles mix rows with and without residuals."""
    resid = ACT_RESIDUAL[impl]
    tid, K, N = TYPES[name], 160, 97
    raw = _packed(name, N, K, seed=1)
    w = dequantize(raw.reshape(-1), tid, N * K).reshape(N, K)
    torch.manual_seed(0)
    x = torch.randn(512, K)
    x[:, 3] *= 30
    x[::3, 70] *= 12
    packs = {v: _repack(lib, tid, raw, K) for v, lib in libs.items()}
    for rows in (1, 2, 5, 8, 33, 512):
        xr = x[:rows].contiguous()
        expected = q8r_activations(xr, resid) @ w.T
        outs = {}
        for v, lib in libs.items():
            for threads in (1, 2):
                y = torch.empty(rows, N)
                assert lib.qlinear_repacked(tid, xr.data_ptr(), packs[v].data_ptr(), y.data_ptr(), rows, N, K,
                                            threads, resid) == 0
                outs[v, threads] = y
        ref = outs["portable", 1]
        assert ((ref - expected).abs().max() / expected.abs().max()).item() < 2e-6
        for key, y in outs.items():
            assert torch.equal(y, ref), (key, rows)
    best = next(iter(libs))
    alone = torch.empty(1, N)
    for i in (0, 6, 31):
        xi = x[i:i + 1].contiguous()
        rc = libs[best].qlinear_repacked(tid, xi.data_ptr(), packs[best].data_ptr(), alone.data_ptr(), 1, N, K, 1,
                                         resid)
        assert rc == 0
        assert torch.equal(alone[0], outs[best, 2][i]), i


def test_the_layer_repacks_again_after_an_in_place_write():
    if kernel("int8") is None:
        pytest.skip("no int8 kernel here")
    a, b = _packed("Q4_1", 24, 64, seed=2), _packed("Q4_1", 24, 64, seed=3)
    layer = PackedLinear(a.reshape(-1), 3, 64, 24)
    x = torch.randn(3, 64)
    first = layer(x)
    assert torch.equal(layer(x), first)  # the cached copy
    with torch.no_grad():
        layer.packed.copy_(b)  # as load_state_dict does
    expected = q8_activations(x) @ layer.dequantized().T
    got = layer(x)
    assert not torch.equal(got, first)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-6


def test_a_bad_kind_or_width_is_refused(libs):
    lib = next(iter(libs.values()))
    out = torch.empty(1024, dtype=torch.uint8)
    raw = _packed("Q8_0", 8, 64)
    assert lib.qrepack(5, raw.data_ptr(), 8, 64, out.data_ptr()) == -1
    assert lib.qrepack(8, raw.data_ptr(), 8, 48, out.data_ptr()) == -1
    y = torch.empty(1, 8)
    x = torch.randn(1, 64)
    packed = _repack(lib, 8, raw, 64)
    assert lib.qlinear_repacked(8, x.data_ptr(), packed.data_ptr(), y.data_ptr(), 1, 8, 64, 1, float("nan")) == -4


def test_two_levels_keep_the_small_values_beside_a_massive_one():
    """A massive activation (SmolLM2's residual stream has values ~100x the rest) leaves its block's other 31 values
    a few steps of its scale with one Q8 row; the second row (the rounding error) restores them: the layer's error
    against the exact float product falls by more than 100x."""
    if kernel("int8") is None:
        pytest.skip("no int8 kernel here")
    raw = _packed("Q4_1", 64, 256, seed=4)
    torch.manual_seed(1)
    x = torch.randn(6, 256)
    x[:, 7] = 300.0  # one massive value in the first block of every row
    one = PackedLinear(raw.reshape(-1), 3, 256, 64, impl="int8")
    two = PackedLinear(raw.reshape(-1), 3, 256, 64, impl="int8x2")
    exact = x @ one.dequantized().T
    err1, err2 = ((layer(x) - exact).abs().max().item() for layer in (one, two))
    assert err2 < err1 / 100, (err1, err2)
    assert torch.allclose(two(x[2:3]), two(x)[2:3], rtol=0, atol=0)  # a row alone: the same bits


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0"])
def test_the_residual_fires_only_in_a_block_with_an_outlier(libs, name):
    """int8r, every build: a planted outlier (40x the rest) in block 0 of a row makes the error against the exact
    float product fall >= 10x below int8's; blocks without one (uniform values, max/mean about 2 < RESIDUAL_T) take
    no residual, so a row without outliers gives exactly int8's bits."""
    tid, K, N = TYPES[name], 128, 40
    raw = _packed(name, N, K, seed=5)
    w = dequantize(raw.reshape(-1), tid, N * K).reshape(N, K)
    torch.manual_seed(2)
    x = torch.rand(6, K) * 2 - 1  # no outliers
    spiked = x.clone()
    spiked[:, 5] = 40.0
    assert (q8r_activations(spiked, RESIDUAL_T) != q8_activations(spiked)).any()
    for v, lib in libs.items():
        packed = _repack(lib, tid, raw, K)

        def run(xr, resid, lib=lib, packed=packed):
            y = torch.empty(xr.shape[0], N)
            assert lib.qlinear_repacked(tid, xr.data_ptr(), packed.data_ptr(), y.data_ptr(), xr.shape[0], N, K, 1,
                                        resid) == 0
            return y

        assert torch.equal(run(x, RESIDUAL_T), run(x, -1.0)), v
        exact = spiked @ w.T
        err8, err8r = ((run(spiked, r) - exact).abs().max().item() for r in (-1.0, RESIDUAL_T))
        assert err8r * 10 <= err8, (v, err8, err8r)
