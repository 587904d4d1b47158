"""GGML block quantization formats, dequantized to float32 (bit-exact with ``gguf.quants``).

Each type packs a row in blocks of 32 weights with per-block scales (Dettmers-style blockwise
absmax / min-max quantization, as llama.cpp stores them):

    Q8_0  (34 B/block)  d:f16, q:int8[32]                    x = d*q
    Q4_0  (18 B/block)  d:f16, q:4-bit[32]                   x = d*(q-8)
    Q4_1  (20 B/block)  d:f16, m:f16, q:4-bit[32]            x = d*q + m
    Q5_0  (22 B/block)  d:f16, qh:u32, q:4-bit[32]           x = d*((q | hi<<4) - 16)
    Q5_1  (24 B/block)  d:f16, m:f16, qh:u32, q:4-bit[32]    x = d*(q | hi<<4) + m

Low nibbles hold weights 0..15 of a block, high nibbles weights 16..31.
Shapes: raw uint8 (n_blocks * block_bytes,) -> float32 (n_blocks * 32,).
"""

from __future__ import annotations

import torch

# ggml_type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2),
}
# Types that exist but we do not dequantize: named in errors.
KNOWN_UNSUPPORTED = {10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
                     17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                     23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                     34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


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


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q8_0 bytes, as llama.cpp's reference quantizer (round half away)."""
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    # round half away from zero, as C's roundf (torch.round rounds half to even)
    q = torch.sign(blocks * inv) * torch.floor((blocks * inv).abs() + 0.5)
    q = q.clamp(-128, 127).to(torch.int8)
    d16 = d.to(torch.float16)
    return torch.cat((d16.view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)), dim=1).reshape(-1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> Q4_1 bytes, as llama.cpp's reference quantizer: per block of 32,
    d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)); weights 0..15 in the low
    nibbles, 16..31 in the high ones."""
    blocks = x.float().reshape(-1, 32)  # (n_blocks, 32)
    lo = blocks.amin(dim=1, keepdim=True)
    d = (blocks.amax(dim=1, keepdim=True) - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((blocks - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)  # (n_blocks, 32)
    nibbles = q[:, :16] | (q[:, 16:] << 4)  # (n_blocks, 16)
    d16, m16 = (v.to(torch.float16).view(torch.uint8).reshape(-1, 2) for v in (d, lo))
    return torch.cat((d16, m16, nibbles), dim=1).reshape(-1)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """float (.., K) with K % 32 == 0 -> the values the integer kernels (``csrc/qgemm.c``) multiply: each block of
    32 quantized to int8 with d = absmax / 127 and rounding half away from zero, then times d again."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = blocks * inv
    q = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5))
    return (q * d).reshape(x.shape)
