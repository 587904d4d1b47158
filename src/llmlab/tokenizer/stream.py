"""UTF-8-safe incremental detokenization for streaming.

A byte-level token can end in the middle of a multi-byte character (an emoji is 4 bytes and often
2-3 tokens). We keep the undecoded tail and only emit complete characters; invalid bytes (not just
incomplete) become U+FFFD, exactly as a full ``decode`` would.
"""

from __future__ import annotations


def _complete_prefix_len(data: bytes) -> int:
    """Length of the longest prefix that does not end inside an incomplete UTF-8 sequence."""
    n = len(data)
    # Look back at most 3 bytes for the lead byte of a sequence still waiting for continuations.
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n


class StreamDecoder:
    """Feed token ids one by one; ``push`` returns the new text that is safe to print."""

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.pending = b""

    def push(self, token_id: int) -> str:
        if self.skip_special and int(token_id) in self.tokenizer.special_ids:
            return ""
        self.pending += self.tokenizer.token_bytes(token_id)
        cut = _complete_prefix_len(self.pending)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out.decode("utf-8", errors="replace")

    def flush(self) -> str:
        out, self.pending = self.pending, b""
        return out.decode("utf-8", errors="replace")
