"""Which KV blocks belong to which sequence: allocation, reference counts, prefix caching, copy-on-write.

PagedAttention (Kwon et al. 2023, arXiv:2309.06180) stores each sequence's keys/values in fixed-size
blocks listed in a *block table*. This module owns the bookkeeping; ``nn/paged_attention.py`` owns the
tensors.

- Reference counts: a block may be in several tables (forks for ``n > 1`` and beam search share the
  prompt). It returns to the free list when its count drops to 0.
- Prefix caching (as vLLM's automatic prefix caching): a *full* block is named by the hash of its tokens
  and of everything before it (the previous block's hash), so equal hashes mean equal prefixes. A new
  prompt first looks its full blocks up and reuses the ones it finds. Freed blocks keep their hash and
  stay findable until they are handed out again, least recently freed first (LRU eviction).
- Copy-on-write: a sequence about to write into a block someone else also holds gets its own copy
  first (only the last, partly filled block of a fork can be in that state).

The pool size is fixed when the engine starts (the user's KV budget), so the budget is never exceeded:
when no block is free the scheduler preempts a sequence instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class NoFreeBlocks(RuntimeError):
    """Raised by ``allocate`` when the pool is exhausted (the scheduler checks first; this is a guard)."""


def block_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    """The name of a full block: its tokens and its whole prefix (through the previous block's hash)."""
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self.hash_of: dict[int, int] = {}  # block -> hash (full, registered blocks)
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (a hash collision check)
        self.by_hash: dict[int, int] = {}  # hash -> block
        self.queries = 0  # prompt blocks looked up in the prefix cache
        self.hits = 0  # ... and found

    # -- counts -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # -- allocation -----------------------------------------------------------------------------------------
    def _take(self) -> int:
        if not self.free:
            raise NoFreeBlocks("no free KV block")
        b, _ = self.free.popitem(last=False)  # least recently freed
        h = self.hash_of.pop(b, None)
        if h is not None:  # evict its cached content
            self.tokens_of.pop(b, None)
            if self.by_hash.get(h) == b:
                del self.by_hash[h]
        self.ref[b] = 1
        return b

    def _hold(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def release(self, table: list[int]) -> None:
        """Drop a sequence's hold on its blocks (all of them); the table is emptied."""
        for b in reversed(table):  # tail first: a prefix's head blocks stay cached longest
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()

    def match_prefix(self, tokens: list[int], table: list[int]) -> int:
        """Fill an empty ``table`` with cached blocks holding a prefix of ``tokens``; -> tokens covered.

        At least one token is always left to compute (its logits start the generation)."""
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        prev = None
        for i in range((len(tokens) - 1) // bs):  # full blocks, never the one holding the last token
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(prev, chunk)
            self.queries += 1
            b = self.by_hash.get(h)
            if b is None or self.tokens_of.get(b) != chunk:
                self.queries += (len(tokens) - 1) // bs - i - 1  # the misses that follow
                break
            self.hits += 1
            self._hold(b)
            table.append(b)
            prev = h
        return len(table) * bs

    def can_grow(self, table: list[int], n_tokens: int, writes_from: int) -> bool:
        """Whether the table can cover ``n_tokens`` positions (new blocks plus a copy-on-write)."""
        need = max(0, self.blocks_for(n_tokens) - len(table))
        if writes_from < len(table) * self.block_size and self.ref[table[writes_from // self.block_size]] > 1:
            need += 1
        return need <= len(self.free)

    def grow(self, table: list[int], n_tokens: int, writes_from: int,
             copy_block: Callable[[int, int, int], None]) -> None:
        """Make ``table`` cover ``n_tokens`` positions, writable from position ``writes_from`` on.

        A shared block at ``writes_from`` is copied first (``copy_block(src, dst, n_valid)``)."""
        bs = self.block_size
        if writes_from < len(table) * bs:
            i = writes_from // bs
            src = table[i]
            if self.ref[src] > 1:
                dst = self._take()
                copy_block(src, dst, writes_from - i * bs)
                self.ref[src] -= 1
                table[i] = dst
        while len(table) * bs < n_tokens:
            table.append(self._take())

    def fork(self, table: list[int]) -> list[int]:
        """A second table sharing every block (copy-on-write happens at the next write)."""
        for b in table:
            self._hold(b)
        return list(table)

    def register_full(self, tokens: list[int], table: list[int], n_valid: int, hashes: list[int]) -> None:
        """Name the full blocks among the first ``n_valid`` positions so later prompts can reuse them.

        ``hashes`` is the sequence's running list of its full blocks' hashes (extended in place)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(hashes), n_valid // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(hashes[-1] if hashes else None, chunk)
            hashes.append(h)
            b = table[i]
            if b in self.hash_of or h in self.by_hash:
                continue  # already named (a shared block), or another block holds the same content
            self.hash_of[b], self.tokens_of[b], self.by_hash[h] = h, chunk, b
