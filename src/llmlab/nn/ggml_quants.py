"""GGML block quantization formats: dequantized to float32 bit-exact with ``gguf.quants``, packed from integer
codes, and quantized bit-exact with llama.cpp's reference quantizers (ggml/src/ggml-quants.c,
``quantize_row_q4_0_ref`` etc.; the byte layouts are ggml-common.h's block structs, as the GGUF spec stores them).

Each type packs a row in blocks of 32 weights with per-block scales (Dettmers-style blockwise
absmax / min-max quantization, as llama.cpp stores them):

    Q8_0  (34 B/block)  d:f16, q:int8[32]                    x = d*q
    Q4_0  (18 B/block)  d:f16, q:4-bit[32]                   x = d*(q-8)
    Q4_1  (20 B/block)  d:f16, m:f16, q:4-bit[32]            x = d*q + m
    Q5_0  (22 B/block)  d:f16, qh:u32, q:4-bit[32]           x = d*((q | hi<<4) - 16)
    Q5_1  (24 B/block)  d:f16, m:f16, qh:u32, q:4-bit[32]    x = d*(q | hi<<4) + m

Low nibbles hold weights 0..15 of a block, high nibbles weights 16..31; bit j of qh is the 5th bit of weight j.
The K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256) are in ``ggml_kquants``.
Shapes: raw uint8 (n_blocks * block_bytes,) -> float32 (n_blocks * block,).
"""

from __future__ import annotations

import torch

from llmlab.common import LlmlabError
from llmlab.nn.ggml_kquants import dequantize_k, quantize_k

# ggml_type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}
# Types that exist but we do not dequantize: named in errors.
KNOWN_UNSUPPORTED = {10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS",
                     17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                     23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                     34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
# blocks of 32 that pack_blocks writes: name -> (lowest code, highest code, stores a min)
CODES = {"Q8_0": (-128, 127, False), "Q4_0": (0, 15, False), "Q4_1": (0, 15, True), "Q5_0": (0, 31, False),
         "Q5_1": (0, 31, True)}


def type_name(tid: int) -> str:
    return GGML_TYPES[tid][0] if tid in GGML_TYPES else KNOWN_UNSUPPORTED.get(tid, f"type {tid}")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed uint8 -> (n, 32) values 0..15: low nibbles first, then high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) uint8 little-endian u32 -> (n, 32) bits 0/1, bit j for weight j."""
    bits = qh.long()
    word = bits[:, 0] | bits[:, 1] << 8 | bits[:, 2] << 16 | bits[:, 3] << 24  # (n,)
    return (word[:, None] >> torch.arange(32)) & 1


def dequantize(raw: torch.Tensor, tid: int, numel: int) -> torch.Tensor:
    """raw uint8 bytes of one tensor -> float32 (numel,)."""
    name, block, nbytes = GGML_TYPES[tid]
    if name == "F32":
        return raw.view(torch.float32).clone()
    if name == "F16":
        return raw.view(torch.float16).float()
    if name == "BF16":
        return raw.view(torch.bfloat16).float()
    b = raw.view(-1, nbytes)  # (n_blocks, bytes per block)
    if block == 256:
        return dequantize_k(b, name)[:numel]
    d = _f16(b[:, 0:2])
    if name == "Q8_0":
        out = d * b[:, 2:].contiguous().view(torch.int8).float()
    elif name == "Q4_0":
        out = d * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    elif name == "Q4_1":
        out = d * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])
    elif name == "Q5_0":
        q = _nibbles(b[:, 6:]).long() | (_high_bits(b[:, 2:6]) << 4)
        out = d * (q - 16).float()
    elif name == "Q5_1":
        q = _nibbles(b[:, 8:]).long() | (_high_bits(b[:, 4:8]) << 4)
        out = d * q.float() + _f16(b[:, 2:4])
    else:  # pragma: no cover - GGML_TYPES and this chain are kept in step
        raise ValueError(name)
    return out.reshape(-1)[:numel]


def pack_blocks(name: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes q (n_blocks, 32) with scales d (n_blocks,) (and mins m for Q4_1 / Q5_1), float16 or float
    rounded to float16, -> the GGML blocks of ``name`` as uint8 (n_blocks * block bytes,): the exact inverse of
    ``dequantize``. Codes are the stored ones: Q4_0 / Q4_1 0..15, Q5_0 / Q5_1 0..31, Q8_0 -128..127."""
    if name not in CODES:
        raise LlmlabError(f"pack_blocks: no block type {name!r}; use one of {', '.join(CODES)}")
    lo, hi, has_min = CODES[name]
    if q.ndim != 2 or q.shape[1] != 32:
        raise LlmlabError(f"pack_blocks: codes have shape {tuple(q.shape)}, not (n_blocks, 32): reshape rows to blocks")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise LlmlabError(f"pack_blocks: codes are {q.dtype}, not integers: round them and convert with .long()")
    n = q.shape[0]
    if (m is not None) != has_min:
        raise LlmlabError(f"pack_blocks: {name} {'stores' if has_min else 'has no'} per-block mins: "
                          f"{'pass' if has_min else 'drop'} m")
    for label, v in (("scales d", d), ("mins m", m)):
        if v is not None and tuple(v.shape) != (n,):
            raise LlmlabError(f"pack_blocks: {label} have shape {tuple(v.shape)}, not ({n},): one per block")
    if n and (int(q.min()) < lo or int(q.max()) > hi):
        raise LlmlabError(f"pack_blocks: {name} codes lie in {int(q.min())}..{int(q.max())}, outside {lo}..{hi}: "
                          "clamp them (or pick a type with that range)")
    q = q.detach().cpu().to(torch.int16)
    parts = [_f16_bytes(d)] + ([_f16_bytes(m)] if has_min else [])
    if name == "Q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        if hi == 31:  # the 5th bits: weight j -> bit j of a little-endian u32
            bits = (q >> 4).reshape(n, 4, 8)  # (n, byte, bit)
            parts.append((bits << torch.arange(8, dtype=torch.int16)).sum(2).to(torch.uint8))
        low = q & 0x0F
        parts.append((low[:, :16] | (low[:, 16:] << 4)).to(torch.uint8))  # (n, 16)
    return torch.cat(parts, dim=1).reshape(-1)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) uint8 of its float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return v.detach().cpu().to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) -> float32 (n_blocks, 32)."""
    return x.detach().float().reshape(-1, 32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's ``id = d ? 1.0f/d : 0.0f``."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) -> (n, 1): the value of largest magnitude, the first one on ties (the C loop's strict <)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q8_0 bytes: d = absmax / 127, q = roundf(x / d) (half away from zero)."""
    blocks = _blocks(x)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    v = blocks * _inverse(d)
    # roundf rounds half away from zero (torch.round: half to even): trunc(v) plus the sign where the fraction is
    # at least 1/2, i.e. trunc(2 * fraction) (exact: v - trunc(v) and its double are; v + 0.5 would round)
    t = torch.trunc(v)
    q = t + torch.trunc(2 * (v - t))
    return pack_blocks("Q8_0", q.clamp(-128, 127).to(torch.int16), d[:, 0])


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q4_0 bytes: d = max / -8 with max the signed value of largest magnitude
    (so it maps to code 0 and the other side gets the extra level), q = min(15, trunc(x / d + 8.5))."""
    blocks = _blocks(x)
    d = _signed_absmax(blocks) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15)
    return pack_blocks("Q4_0", q.to(torch.int16), d[:, 0])


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q4_1 bytes: d = (max - min) / 15, m = min,
    q = min(15, trunc((x - min) / d + 0.5))."""
    blocks = _blocks(x)
    lo = blocks.amin(dim=1, keepdim=True)
    d = (blocks.amax(dim=1, keepdim=True) - lo) / 15
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15)
    return pack_blocks("Q4_1", q.to(torch.int16), d[:, 0], lo[:, 0])


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q5_0 bytes: as Q4_0 with d = max / -16, q = min(31, trunc(x / d + 16.5))."""
    blocks = _blocks(x)
    d = _signed_absmax(blocks) / -16
    q = torch.trunc(blocks * _inverse(d) + 16.5).clamp(0, 31)
    return pack_blocks("Q5_0", q.to(torch.int16), d[:, 0])


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q5_1 bytes: as Q4_1 with d = (max - min) / 31 and 32 levels."""
    blocks = _blocks(x)
    lo = blocks.amin(dim=1, keepdim=True)
    d = (blocks.amax(dim=1, keepdim=True) - lo) / 31
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 31)
    return pack_blocks("Q5_1", q.to(torch.int16), d[:, 0], lo[:, 0])


_QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1, "Q5_0": quantize_q5_0,
               "Q5_1": quantize_q5_1}
QUANT_TYPES = (*_QUANTIZERS, "Q4_K", "Q5_K", "Q6_K")  # what ``quantize`` writes


def quantize(x: torch.Tensor, name: str) -> torch.Tensor:
    """float (.., K) -> the bytes (uint8, flat) of GGML type ``name``, bit-exact with llama.cpp's reference
    quantizer (``ggml_quantize_chunk`` without an importance matrix). K must be a multiple of the block: 32, or
    256 for Q4_K, Q5_K and Q6_K."""
    if name not in QUANT_TYPES:
        raise LlmlabError(f"cannot quantize to {name!r}; use one of {', '.join(QUANT_TYPES)}")
    block = GGML_TYPES[TYPE_IDS[name]][1]
    if x.ndim == 0 or x.shape[-1] % block:
        raise LlmlabError(f"cannot quantize rows of {x.shape[-1] if x.ndim else 0} to {name}: the row length "
                          f"must be a multiple of {block} (pad the rows, or use a type with blocks of 32 or F16)")
    return quantize_k(x, name) if block == 256 else _QUANTIZERS[name](x)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> the values the integer kernels (``csrc/qgemm.c``) multiply: each block of
    32 quantized to int8 with d = absmax / 127 and rounding half away from zero, then times d again."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = blocks * inv
    q = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5))
    return (q * d).reshape(x.shape)


def q8r_activations(x: torch.Tensor, resid: float) -> torch.Tensor:
    """float (.., K) -> what the integer kernels multiply with residual blocks (``csrc/qgemm.c`` quantize_rows):
    q8_activations(x) plus, in each block whose codes q have ``resid * sum|q| < 127 * 32`` (max|x| above ``resid``
    times mean|x|; every block for resid = 0, none for resid < 0), q8_activations of its rounding error."""
    first = q8_activations(x)
    if resid < 0:
        return first
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0  # (blocks, 1)
    codes = torch.where(d == 0, torch.zeros_like(blocks), first.reshape(-1, 32) / d).round()  # exact integers
    flagged = resid * codes.abs().sum(dim=1, keepdim=True) < 127.0 * 32
    second = q8_activations(x - first).reshape(-1, 32) * flagged
    return first + second.reshape(x.shape)
