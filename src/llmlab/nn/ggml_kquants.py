"""K-quants (Q4_K, Q5_K, Q6_K): GGML's super-blocks of 256 weights, dequantized and quantized bit-exact with
llama.cpp (ggml/src/ggml-quants.c: ``dequantize_row_q4_K`` .. ``q6_K``, the reference quantizers
``quantize_row_q4_K_ref`` .. ``q6_K_ref`` with their helpers ``make_qkx2_quants``, ``make_qx_quants`` and
``nearest_int``; block structs in ggml-common.h; K-quants by Kawrakow, llama.cpp PR #1684).

A super-block splits into sub-blocks, each with a small integer scale (and min) that is itself quantized
against one f16 scale of the super-block:

    Q4_K (144 B)  d:f16, dmin:f16, scales:u8[12], qs:u8[128]                 8 sub-blocks of 32
                  x = d*sc_j * q - dmin*m_j, q 0..15; sc_j, m_j 6-bit, packed in scales[12]
    Q5_K (176 B)  d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]      as Q4_K, q 0..31
    Q6_K (210 B)  ql:u8[128], qh:u8[64], scales:i8[16], d:f16                16 sub-blocks of 16
                  x = d*sc_j * (q - 32), q 0..63

The reference quantizers (no importance matrix) search each sub-block for the scale (and min) of least
weighted squared error, then quantize the sub-block scales to 6 or 8 bits and the weights again against
those. Bit-exactness needs the C code's float32 arithmetic in its order: every sum is accumulated element by
element (``_running_sum``; torch's reductions add pairwise), divisions stay divisions, and rounding is
``nearest_int``'s bit trick. The C loops run over one sub-block at a time; here each step runs over all
sub-blocks at once, so working tensors are (positions in a sub-block, sub-blocks).
"""

from __future__ import annotations

import torch

QK_K = 256
_MAGIC = torch.tensor(12582912.0)  # 1.5 * 2^23: nearest_int's shift
_EPS = torch.tensor(1e-15)  # GROUP_MAX_EPS: a sub-block below this absmax is all zero
_CHUNK = 1 << 15  # sub-blocks quantized at once: bounds the temporaries (~100 MB)


def _f32(v: float) -> torch.Tensor:
    """A float32 scalar, so that arithmetic with it rounds to float32 at each step as C's float does."""
    return torch.tensor(v, dtype=torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 as llama.cpp's ``nearest_int``: adding 1.5 * 2^23 leaves round-half-to-even(v) in the
    low 22 mantissa bits (for |v| < 2^22, which the quantizers guarantee; beyond, the same bits as C)."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _nearest_(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """In place: v -> nearest_int(v) clamped to lo..hi, kept as float32. Within nearest_int's range (|v| < 2^22)
    adding and subtracting 1.5 * 2^23 rounds exactly as it does; any value beyond (or NaN) takes the bit trick."""
    least, most = v.aminmax()
    if least >= -4194303 and most <= 4194303:
        return v.add_(_MAGIC).sub_(_MAGIC).clamp_(lo, hi)
    return v.copy_(nearest_int(v).clamp(lo, hi))


def _running_sum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """(n, ...) -> (...): ``s = start (or 0); for i: s += t[i]`` in float32, C's summation order."""
    acc = torch.zeros_like(t[0]) if start is None else start.clone()
    for row in t:
        acc += row
    return acc


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8 of its float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return v.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


# ---- dequantization ---------------------------------------------------------------------------------
def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) packed scales -> 6-bit scales and mins (n, 8) float32 (``get_scale_min_k4``): sub-blocks 0..3
    in the low 6 bits of bytes 0..3 / 4..7; 4..7 in the nibbles of bytes 8..11 with their top 2 bits in the
    spare high bits of bytes 0..3 / 4..7."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=1)
    m = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return sc.float(), m.float()


def _nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) -> (n, 8, 32): each 32 bytes hold sub-block 2c in the low nibbles and 2c+1 in the high ones."""
    q = qs.reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)  # (n, 4, 2, 32)
    return (q & 0x0F).reshape(-1, 8, 32)


def dequantize_k(b: torch.Tensor, name: str) -> torch.Tensor:
    """(n_blocks, block bytes) uint8 -> float32 (n_blocks * 256,), in ``gguf.quants``' operation order."""
    n = b.shape[0]
    if name == "Q6_K":
        lo = b[:, :128].reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
        lo = (lo & 0x0F).reshape(n, 8, 32)  # (half, nibble, byte) -> 32-runs of the super-block, in order
        hi = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
        hi = (hi & 0x03).reshape(n, 8, 32)
        q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        d = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
        return (d[..., None] * q).reshape(-1)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    if name == "Q4_K":
        q = _nibbles_k(b[:, 16:144])
    else:  # Q5_K: the 5th bit of sub-block k's weight l is bit k of qh[l]
        high = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
        q = _nibbles_k(b[:, 48:176]) | (high << 4)
    return ((d * sc)[..., None] * q.float() - (dmin * m)[..., None]).reshape(-1)


# ---- Q4_K / Q5_K quantization ------------------------------------------------------------------------
def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per sub-block (columns of x, w: (32, S)) the scale and min minimising sum w*(scale*L + min - x)^2 over
    nstep+1 trial scales around (max - min) / nmax, each refined by weighted least squares; a min above zero
    is clamped to zero. Returns L (32, S) int32 in 0..nmax, scale (S,), and -min (S,).

    The trials run in order and a better one moves ``min``, which the next trial's grid starts from."""
    mn, mx = x.amin(0), x.amax(0)
    sum_w = _running_sum(w[1:], w[0])
    sum_x = _running_sum(w[1:] * x[1:], w[0] * x[0])
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx == mn  # a constant sub-block: L = 0, scale 0; its range is set to 1 so its throwaway trials stay finite
    top = torch.where(flat, mn + 1, mx)
    iscale = _f32(nmax) / (top - mn)
    scale = _f32(1.0) / iscale
    L = _nearest_(iscale * (x - mn), 0, nmax)  # (32, S) float
    diff = scale * L + mn - x
    best = _running_sum(w * (diff * diff))
    trial, prods = torch.empty_like(x), x.new_empty(x.shape[0], 3, x.shape[1])  # (32, 3, S): w*l, w*l*l, w*l*x
    for step in range(nstep + 1):
        iscale = (_f32(rmin) + _f32(rdelta) * step + nmax) / (top - mn)
        _nearest_(torch.sub(x, mn, out=trial).mul_(iscale), 0, nmax)
        wl = torch.mul(w, trial, out=prods[:, 0])
        torch.mul(wl, trial, out=prods[:, 1])
        torch.mul(wl, x, out=prods[:, 2])
        sum_l, sum_l2, sum_xl = _running_sum(prods)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        diff = torch.mul(trial, this_scale, out=diff).add_(this_min).sub_(x)
        err = _running_sum(diff.mul_(diff).mul_(w))
        better = (det > 0) & (err < best) & ~flat
        torch.where(better, trial, L, out=L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0, L.int()), torch.where(flat, 0.0, scale), -mn


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (n, 8) -> the (n, 12) bytes ``_scale_min_k4`` reads."""
    return torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)), dim=1).to(torch.uint8)


def _quantize_qk(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """(n, 256) float32 -> (n, 144 or 176) uint8: ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref``."""
    nmax, rmin, rdelta, nstep = (15, -1.0, 0.1, 20) if name == "Q4_K" else (31, -0.5, 0.1, 15)
    n = blocks.shape[0]
    xt = blocks.reshape(n * 8, 32).T.contiguous()  # (32, S): position l of every sub-block
    # sqrtf: torch's float32 sqrt is not correctly rounded on every CPU (1 ulp off); float64's, rounded once, is
    av_x = torch.sqrt((_running_sum(xt * xt) / 32).double()).float()
    L, scales, mins = _make_qkx2_quants(xt, av_x + xt.abs(), nmax, rmin, rdelta, nstep)
    L, scales, mins = L.T.reshape(n, 8, 32), scales.reshape(n, 8), mins.reshape(n, 8)
    # max over the sub-blocks, from 0: C keeps a value only when strictly larger, so never a -0.0
    max_scale = torch.where(scales.amax(1) > 0, scales.amax(1), 0.0)
    max_min = torch.where(mins.amax(1) > 0, mins.amax(1), 0.0)
    inv_scale = torch.where(max_scale > 0, _f32(63.0) / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, _f32(63.0) / max_min, 0.0)
    # uint8_t ls = nearest_int(..); ls = MIN(63, ls): the int wraps to a byte before the clamp
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    d16, dmin16 = (max_scale / 63.0).to(torch.float16), (max_min / 63.0).to(torch.float16)
    d = d16.float()[:, None] * ls.float()  # (n, 8)
    dm = dmin16.float()[:, None] * lm.float()
    # quantize again against the stored scales; a sub-block whose scale rounds to 0 keeps the search's L
    again = nearest_int((blocks.reshape(n, 8, 32) + dm[..., None]) / d[..., None]).clamp(0, nmax)
    L = torch.where(d[..., None] != 0, again, L)
    halves = (L & 0xF).reshape(n, 4, 2, 32)  # (64-runs, low/high nibble, byte)
    qs = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, 128).to(torch.uint8)
    parts = [d16.view(torch.uint8).reshape(n, 2), dmin16.view(torch.uint8).reshape(n, 2), _pack_scales_k4(ls, lm)]
    if name == "Q5_K":  # bit k of qh[l]: the 5th bit of sub-block k's weight l
        parts.append(((L >> 4) << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8))
    return torch.cat(parts + [qs], dim=1)


# ---- Q6_K quantization ---------------------------------------------------------------------------
def _make_qx_quants(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(16, nmax, x, L, rmse_type=1, NULL)`` per sub-block (columns of x: (16, S)): the
    symmetric scale minimising sum x^2 * (x - scale*l)^2, trying 19 grids around -max/nmax (max: the value of
    largest magnitude). Returns L (16, S) int32 in 0..2*nmax-1 and the scale (S,)."""
    ax = x.abs()
    idx = ax.argmax(0, keepdim=True)  # the first largest |x|, as the C loop's strict >
    mx, amax = x.gather(0, idx)[0], ax.gather(0, idx)[0]
    zero = amax < _EPS  # all zero: L = 0, scale 0; its max is set to 1 so its throwaway tries stay finite
    mx = torch.where(zero, 1.0, mx)
    tries = torch.stack([_f32(-nmax)] + [-(_f32(nmax) + _f32(0.1) * k) for k in range(-9, 10) if k])  # (19,)
    iscale = tries[:, None] / mx  # (19, S): the first is the plain -nmax / max
    w, wx = x * x, x * x * x
    sumlx, suml2 = torch.zeros_like(iscale), torch.zeros_like(iscale)
    for i in range(x.shape[0]):  # position by position, all tries at once: C's order of the sums
        lf = _nearest_(iscale * x[i], -nmax, nmax - 1)  # (19, S)
        sumlx += wx[i] * lf
        suml2 += w[i] * lf * lf
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], 0.0)
    best = scale * sumlx[0]
    chosen = iscale[0]
    for k in range(1, len(tries)):  # in order: each accepted try raises the bar for the next
        better = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        this_scale = sumlx[k] / suml2[k]
        scale = torch.where(better, this_scale, scale)
        best = torch.where(better, this_scale * sumlx[k], best)
        chosen = torch.where(better, iscale[k], chosen)
    L = _nearest_(chosen * x, -nmax, nmax - 1).int() + nmax
    return torch.where(zero, 0, L), torch.where(zero, 0.0, scale)


def _quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 -> (n, 210) uint8: ``quantize_row_q6_K_ref``."""
    n = blocks.shape[0]
    L, scales = _make_qx_quants(blocks.reshape(n * 16, 16).T.contiguous())
    L, scales = L.T.reshape(n, 16, 16), scales.reshape(n, 16)
    idx = scales.abs().argmax(1, keepdim=True)  # the first sub-block scale of largest magnitude
    max_scale = scales.gather(1, idx)[:, 0]
    empty = max_scale.abs() < _EPS  # the whole super-block is stored as zeros
    iscale = _f32(-128.0) / max_scale
    d16 = (_f32(1.0) / iscale).to(torch.float16)
    # MIN(127, nearest_int(..)) stored in an int8_t: wraps like C's conversion
    sc = ((nearest_int(iscale[:, None] * scales).clamp(max=127) + 128) & 0xFF) - 128
    d = d16.float()[:, None] * sc.float()  # (n, 16)
    again = nearest_int(blocks.reshape(n, 16, 16) / d[..., None]).clamp(-32, 31) + 32
    L = torch.where(d[..., None] != 0, again, L).reshape(n, 2, 4, 32)  # (128-halves, 32-runs, byte)
    lo, hi = L & 0xF, L >> 4
    ql = (lo[:, :, :2] | (lo[:, :, 2:] << 4)).reshape(n, 128)  # runs 0, 1 low nibbles; 2, 3 high
    qh = (hi << torch.tensor([0, 2, 4, 6]).reshape(1, 1, 4, 1)).sum(2).reshape(n, 64)
    out = torch.cat((ql.to(torch.uint8), qh.to(torch.uint8), sc.to(torch.int8).view(torch.uint8),
                     d16.view(torch.uint8).reshape(n, 2)), dim=1)
    return torch.where(empty[:, None], 0, out).to(torch.uint8)


def quantize_k(x: torch.Tensor, name: str) -> torch.Tensor:
    """float (.., K) with K % 256 == 0 -> Q4_K / Q5_K / Q6_K bytes (uint8, flat), as llama.cpp's reference
    quantizer without an importance matrix (``ggml_quantize_chunk`` with imatrix NULL)."""
    blocks = x.detach().float().reshape(-1, QK_K)  # (n_blocks, 256)
    step = _CHUNK // (16 if name == "Q6_K" else 8)  # super-blocks at a time
    fn = _quantize_q6_k if name == "Q6_K" else (lambda b: _quantize_qk(b, name))
    return torch.cat([fn(blocks[i:i + step]) for i in range(0, blocks.shape[0], step)]).reshape(-1)
