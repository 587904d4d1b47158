"""The edge between token ids and text for a streaming server: UTF-8-safe incremental text with stop strings.

The engine speaks token ids and knows nothing of stop strings (OpenAI's ``stop`` parameter). A
``TextTracker`` per generated sequence turns its new ids into text that is safe to send at once:

- only complete UTF-8 characters (``tokenizer.stream.StreamDecoder``: an emoji is often 2-3 tokens);
- never any part of a stop string. A stop string can span several tokens ("Observation:" may come as
  "Obs" + "ervation" + ":"), so the longest tail of the text that could still grow into a stop string is
  held back until the next ids decide it. Once a stop string appears, the emitted text ends right before
  it (OpenAI: "the returned text will not contain the stop sequence") and ``stopped`` turns True.

Why holding back the *longest* such tail is enough: if a stop string starts at position p, then as long as
it is incomplete, everything from p on is a prefix of it, so p is never emitted before the match is decided.
"""

from __future__ import annotations

from llmlab.tokenizer.stream import StreamDecoder


def _held_tail(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``stops``."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextTracker:
    """Incremental text of one generated sequence. ``push(ids)`` -> the new text safe to send now."""

    def __init__(self, tokenizer, stop_strings: list[str] | None = None, skip_special: bool = True):
        self.decoder = StreamDecoder(tokenizer, skip_special=skip_special)
        self.stops = [s for s in (stop_strings or []) if s]  # an empty stop string would match everywhere
        self.pending = ""  # decoded but not sent: could be the start of a stop string
        self.text = ""  # everything sent so far
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def _scan(self, final: bool) -> str:
        """Send what ``pending`` allows: up to a stop string, or all but a possible stop-string start."""
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            cut, self.stop_string = min(hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return self._emit(out)
        keep = 0 if final else _held_tail(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return self._emit(out)

    def push(self, ids) -> str:
        """The text the new ``ids`` make safe to send (may be ""); nothing once ``stopped``."""
        if self.stopped:
            return ""
        for tid in ids:
            self.pending += self.decoder.push(int(tid))
        return self._scan(final=False)

    def finish(self) -> str:
        """The sequence ended without a stop string: send what was held back (and any incomplete bytes,
        as U+FFFD, exactly as a full ``decode`` would)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._scan(final=True)


def token_piece(tokenizer, token_id: int) -> tuple[str, bytes]:
    """A single token as OpenAI's log-prob entries show it: its text and its raw bytes. A token that is
    only part of a UTF-8 character is written ``bytes:\\xe2\\x80`` (OpenAI's convention), so the string
    never holds a lone U+FFFD that the client cannot tell apart from a real one."""
    data = tokenizer.token_bytes(int(token_id))
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data
