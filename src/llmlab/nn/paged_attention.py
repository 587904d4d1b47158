"""Paged KV cache and attention over block tables (PagedAttention: Kwon et al. 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", arXiv:2309.06180).

Keys and values live in one pool of fixed-size blocks; a sequence owns a *block table* (a list of block
ids), so its cache grows one block at a time, never needs a contiguous region, and two sequences can
share blocks (a common system prompt, the forks of ``n > 1`` or beam search). Which blocks belong to whom
is the serving layer's business (``serve/block_manager.py``); this module only stores and attends.

Shapes: pool k, v (n_layers, n_blocks, H_kv, block_size, D): one (block, head) tile is contiguous.
A step's new tokens from all sequences are concatenated: q (1, H, N, D), k/v (1, H_kv, N, D), N = the sum
of the per-sequence new-token counts. ``slots`` (N,) is where each new token's k/v go: block * block_size
+ offset.

Two attention paths, tested equal to attention on a contiguous cache:

- ``reference``: gather each sequence's blocks into a contiguous (1, H_kv, S, D) tensor, then the
  textbook attention with a causal mask whose queries sit at the end of the S keys;
- ``kernel``: the same for prompt chunks (SDPA on the gathered keys); decode rows (one new token) of every
  sequence in one call: a C kernel that walks the block tables in place (``nn/paged_decode.py``), or,
  without a compiler, one batched gather for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmlab.nn.attention import build_mask, grouped_attention

IMPLS = ("kernel", "reference")


class PagedKVPool:
    """The block pool. ``n_blocks`` blocks of ``block_size`` positions each, for every layer."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs >= 1 block of >= 1 position, got {n_blocks} x {block_size}")
        shape = (n_layers, n_blocks, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_blocks, self.block_size = n_blocks, block_size

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype: torch.dtype = torch.float32) -> int:
        """Bytes one block takes in k and v over all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * block_size * n_kv_heads * head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def copy_block_(self, src: int, dst: int, upto: int | None = None) -> None:
        """Copy-on-write: block ``dst`` gets ``src``'s first ``upto`` positions (all layers)."""
        n = self.block_size if upto is None else upto
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def gather(self, layer: int, table: list[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first ``length`` keys and values, contiguous: (1, H_kv, length, D) each."""
        idx = torch.as_tensor(table, dtype=torch.long, device=self.k.device)
        k = self.k[layer, idx]  # (nb, Hkv, bs, D)
        v = self.v[layer, idx]
        nb, hkv, bs, d = k.shape
        k = k.transpose(0, 1).reshape(1, hkv, nb * bs, d)[:, :, :length]  # (1, Hkv, length, D)
        v = v.transpose(0, 1).reshape(1, hkv, nb * bs, d)[:, :, :length]
        return k, v


def paged_decode_reference(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, tables: torch.Tensor,
                           ctx_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One new query per sequence against its whole cache, by one batched gather.

    q (n, H, D); k_layer/v_layer (n_blocks, H_kv, bs, D); tables (n, max_blocks) int (padding entries may
    be any valid block id); ctx_lens (n,) -> (n, H, D)."""
    n, H, D = q.shape
    _, hkv, bs, _ = k_layer.shape
    k = k_layer[tables.long()]  # (n, mb, Hkv, bs, D)
    v = v_layer[tables.long()]
    mb = k.shape[1]
    k = k.transpose(1, 2).reshape(n, hkv, mb * bs, D)  # (n, Hkv, S, D)
    v = v.transpose(1, 2).reshape(n, hkv, mb * bs, D)
    mask = torch.arange(mb * bs, device=q.device)[None, :] < ctx_lens.to(q.device)[:, None]  # (n, S)
    out = grouped_attention(q[:, :, None], k, v, mask[:, None, None, :], scale)  # (n, H, 1, D)
    return out[:, :, 0]


@dataclass
class PagedBatch:
    """One forward step over many sequences: their new tokens, concatenated, and where their caches are.

    Passed to the model as ``cache``; ``Attention`` hands q, k, v to ``attend`` (``owns_attention``)."""

    pool: PagedKVPool
    q_lens: list[int]  # new tokens per sequence in this step
    ctx_lens: list[int]  # positions cached after this step (earlier + new), per sequence
    block_tables: list[list[int]]
    impl: str = "kernel"
    decode_kernel: object | None = None  # callable like paged_decode_reference, or None
    owns_attention: bool = field(default=True, init=False)

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"paged attention impl must be one of {IMPLS}, got {self.impl!r}")
        if self.impl == "kernel" and self.decode_kernel is None:
            from llmlab.nn.paged_decode import paged_decode_kernel  # imported here: it imports this module

            self.decode_kernel = paged_decode_kernel()  # the C kernel, or None (the batched gather) without one
        bs = self.pool.block_size
        dev = self.pool.k.device
        slots = []
        for ql, cl, table in zip(self.q_lens, self.ctx_lens, self.block_tables):
            if ql < 1 or cl < ql or cl > len(table) * bs:
                raise ValueError(f"bad paged step: {ql} new tokens, {cl} cached, {len(table)} blocks of {bs}")
            slots.extend(table[p // bs] * bs + p % bs for p in range(cl - ql, cl))
        slots_t = torch.tensor(slots, dtype=torch.long, device=dev)  # (N,)
        self._blk, self._off = slots_t // bs, slots_t % bs
        self._starts = [0]
        for ql in self.q_lens:
            self._starts.append(self._starts[-1] + ql)
        # Decode rows (one new token) go through one batched call on the kernel path.
        self._decode = [i for i, ql in enumerate(self.q_lens) if ql == 1] if self.impl == "kernel" else []
        if self._decode:
            mb = max(len(self.block_tables[i]) for i in self._decode)
            tables = torch.zeros(len(self._decode), mb, dtype=torch.int32)
            for r, i in enumerate(self._decode):
                tables[r, :len(self.block_tables[i])] = torch.tensor(self.block_tables[i], dtype=torch.int32)
            self._dec_tables = tables.to(dev)  # (n_dec, mb)
            self._dec_ctx = torch.tensor([self.ctx_lens[i] for i in self._decode], dtype=torch.int32, device=dev)
            self._dec_rows = torch.tensor([self._starts[i] for i in self._decode], dtype=torch.long, device=dev)

    @property
    def n_tokens(self) -> int:
        return self._starts[-1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' k, v (1, H_kv, N, D) in their slots."""
        self.pool.k[layer][self._blk, :, self._off] = k[0].transpose(0, 1)  # (N, Hkv, D)
        self.pool.v[layer][self._blk, :, self._off] = v[0].transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, H_kv, N, D) of the new tokens -> attention output (1, H, N, D)."""
        self.write(layer, k, v)
        out = torch.empty_like(q)
        decode = set(self._decode)
        for i, (ql, cl, table) in enumerate(zip(self.q_lens, self.ctx_lens, self.block_tables)):
            if i in decode:
                continue
            s = self._starts[i]
            qi = q[:, :, s:s + ql]  # (1, H, ql, D)
            ki, vi = self.pool.gather(layer, table, cl)  # (1, Hkv, cl, D)
            mask = build_mask(ql, cl, cl - ql, True, None, q.device)  # queries end-aligned with the keys
            if self.impl == "reference" or ql <= 4:
                out[:, :, s:s + ql] = grouped_attention(qi, ki, vi, mask, scale)
            else:
                rep = q.shape[1] // ki.shape[1]
                ki, vi = ki.repeat_interleave(rep, dim=1), vi.repeat_interleave(rep, dim=1)  # (1, H, cl, D)
                out[:, :, s:s + ql] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        if self._decode:
            qd = q[0, :, self._dec_rows].transpose(0, 1).contiguous()  # (n_dec, H, D)
            fn = self.decode_kernel or paged_decode_reference
            od = fn(qd, self.pool.k[layer], self.pool.v[layer], self._dec_tables, self._dec_ctx, scale)
            out[0, :, self._dec_rows] = od.transpose(0, 1).to(out.dtype)  # (H, n_dec, D)
        return out
