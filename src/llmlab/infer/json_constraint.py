"""Constrained decoding to a JSON schema: a list of (subject, relation, object) triples, nothing else.

The method of Willard & Louf 2023 ("Efficient Guided Generation for Large Language Models", arXiv:2307.09702):
the schema becomes a finite automaton over bytes; each automaton state gets a mask over the vocabulary (the tokens
whose bytes the automaton can read from that state without dying), computed once per state and cached; at every
step the logits of the masked-out tokens are set to -inf, so

    p'(t | prefix) ∝ p(t | prefix) · 1[walk(state(prefix), bytes(t)) is alive and can still finish in budget].

The language is the canonical ``json.dumps`` layout of ``TRIPLES_SCHEMA``::

    [{"subject": "...", "relation": "...", "object": "..."}, {...}]

with strings of 1 or more printable ASCII characters other than ``"`` and ``\\`` (so no escapes are needed and any
byte-level token split decodes to the same text), and at most ``max_items`` triples. Besides the automaton, each
state knows ``dist``: the fewest bytes that complete an accepted string from it. A token is allowed only when
``dist(after it) <= tokens left - 1``; byte-level BPE has a one-byte token for every byte, so a completion of
``dist`` bytes always fits, and the budget can never cut the JSON short. The reply therefore always parses and
validates (``validate_triples``; tests/test_kg.py checks both against a brute-force search on a tiny vocabulary and
against the ``jsonschema`` library).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

KEYS = ("subject", "relation", "object")
MAX_ITEMS = 8


def triples_schema(keys: tuple[str, ...] = KEYS, max_items: int = MAX_ITEMS) -> dict:
    """The JSON Schema of a reply: at most ``max_items`` objects with exactly ``keys``, each a non-empty string of
    printable ASCII without ``"`` or ``\\``."""
    return {"type": "array", "maxItems": max_items,
            "items": {"type": "object", "required": list(keys), "additionalProperties": False,
                      "properties": {k: {"type": "string", "minLength": 1, "pattern": r"^[ !#-\[\]-~]+$"}
                                     for k in keys}}}


TRIPLES_SCHEMA = triples_schema()
STRING_BYTES = frozenset(b for b in range(0x20, 0x7F) if b not in (0x22, 0x5C))  # printable ASCII but " and \
FAR = 1 << 30  # the distance of a dead walk


class TripleGrammar:
    """The byte automaton. A state is ``(item, piece, offset)``: ``item`` counts the triples begun, ``piece``
    indexes ``self.pieces`` (literal bytes or a string slot) or is one of the negative codes below, ``offset`` is
    the position in a literal, or 0/1 for a string slot that is empty/non-empty."""

    START, OPEN, SEP, COMMA, NEXT, DONE = -1, -2, -3, -4, -5, -6  # before "[", after "[", after a triple ("," or
    # "]"), after ",", after ", " (a "{" next), accepted

    def __init__(self, keys: tuple[str, ...] = KEYS, max_items: int = MAX_ITEMS) -> None:
        if max_items < 1 or not keys:
            raise ValueError("the grammar needs at least one key and one item")
        self.keys, self.max_items = keys, max_items
        # {"subject": "<slot>", "relation": "<slot>", "object": "<slot>"}  ->  literal, slot, literal, ..., literal
        self.pieces: list[bytes | None] = []
        for i, key in enumerate(keys):
            self.pieces += [(("{" if i == 0 else "\", ") + json.dumps(key) + ": \"").encode(), None]
        self.pieces.append(b"\"}")
        self.start = (0, self.START, 0)

    def step(self, state: tuple, byte: int) -> tuple | None:
        """The state after reading ``byte``, or None (dead)."""
        item, piece, off = state
        if piece == self.START:
            return (0, self.OPEN, 0) if byte == ord("[") else None
        if piece in (self.OPEN, self.NEXT):
            if piece == self.OPEN and byte == ord("]"):
                return (0, self.DONE, 0)
            return (item + 1, 0, 1) if byte == self.pieces[0][0] else None
        if piece == self.SEP:
            if byte == ord("]"):
                return (item, self.DONE, 0)
            return (item, self.COMMA, 0) if byte == ord(",") and item < self.max_items else None
        if piece == self.COMMA:
            return (item, self.NEXT, 0) if byte == ord(" ") else None
        if piece == self.DONE:
            return None
        if self.pieces[piece] is None:  # a string slot: more characters, or the closing quote of the next literal
            if byte in STRING_BYTES:
                return (item, piece, 1)
            return self._literal(item, piece + 1, 0, byte) if off == 1 else None
        return self._literal(item, piece, off, byte)

    def _literal(self, item: int, piece: int, off: int, byte: int) -> tuple | None:
        text = self.pieces[piece]
        if byte != text[off]:
            return None
        if off + 1 < len(text):
            return (item, piece, off + 1)
        return (item, piece + 1, 0) if piece + 1 < len(self.pieces) else (item, self.SEP, 0)

    def dist(self, state: tuple) -> int:
        """The fewest bytes that take ``state`` to acceptance."""
        piece = state[1]
        fixed = {self.DONE: 0, self.START: 2, self.OPEN: 1, self.SEP: 1}  # "", "[]", "]", "]"
        if piece in fixed:
            return fixed[piece]
        whole = self._item_dist(0, 0) + 1  # a whole triple, then "]"
        if piece in (self.COMMA, self.NEXT):
            return whole + (piece == self.COMMA)
        return self._item_dist(piece, state[2]) + 1

    def _item_dist(self, piece: int, off: int) -> int:
        """Bytes to close the current triple from (piece, offset), each empty slot needing one character."""
        n = 0
        for p in range(piece, len(self.pieces)):
            text, first = self.pieces[p], p == piece
            n += (0 if first and off else 1) if text is None else len(text) - (off if first else 0)
        return n

    def walk(self, state: tuple, data: bytes) -> tuple | None:
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    def accepts(self, state: tuple | None) -> bool:
        return state is not None and state[1] == self.DONE

    def forced(self, state: tuple) -> bytes:
        """The bytes every continuation from ``state`` begins with (empty where there is a choice)."""
        piece, off = state[1], state[2]
        if piece == self.START:
            return b"["
        if piece in (self.COMMA, self.NEXT):
            return (b" " if piece == self.COMMA else b"") + self.pieces[0]
        if piece >= 0 and self.pieces[piece] is not None:
            return self.pieces[piece][off:]
        return b""

    def first_bytes(self, state: tuple) -> list[int]:
        """The bytes ``state`` can read."""
        return [b for b in range(256) if self.step(state, b) is not None]


def validate_triples(obj, keys: tuple[str, ...] = KEYS, max_items: int = MAX_ITEMS) -> list[tuple[str, ...]]:
    """Check a parsed reply against ``triples_schema(keys, max_items)`` -> the triples; a ValueError names the first
    problem."""
    if not isinstance(obj, list):
        raise ValueError(f"expected a JSON array of triples, got {type(obj).__name__}")
    if len(obj) > max_items:
        raise ValueError(f"{len(obj)} triples, at most {max_items}")
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or set(item) != set(keys):
            raise ValueError(f"triple {i}: expected an object with exactly the keys {', '.join(keys)}")
        for key in keys:
            value = item[key]
            if not isinstance(value, str) or not value or any(ord(c) not in STRING_BYTES for c in value):
                raise ValueError(f"triple {i}: {key} must be a non-empty string of printable ASCII without \" or \\")
        out.append(tuple(item[k] for k in keys))
    return out


def parse_triples(text: str) -> list[tuple[str, str, str]]:
    """A model's reply -> validated triples (ValueError: not JSON, or not the schema)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    return validate_triples(obj)


@dataclass
class _Row:
    ids: list[int]  # the generated ids the state reflects
    state: tuple | None


class TokenConstraint:
    """Masks over a vocabulary for a ``TripleGrammar``: ``allowed(row, ids, left)`` -> (V,) bool, the tokens that
    keep row ``row`` (its generated ``ids`` so far) in the language and able to finish within ``left`` tokens
    (this one included). Stop ids are allowed exactly when the JSON is complete. Pass it as ``constraint=`` to
    ``infer.generate.generate``."""

    def __init__(self, grammar: TripleGrammar, vocab: list[bytes], stop_ids: set[int], special_ids=()) -> None:
        self.grammar, self.vocab, self.V = grammar, vocab, len(vocab)
        self.stop_ids = sorted(stop_ids)
        no_bytes = set(special_ids) | set(stop_ids)
        by_first: dict[int, list[int]] = {}
        run = np.zeros(self.V, dtype=np.int64)  # leading string bytes of each token
        quote_next = np.zeros(self.V, dtype=bool)  # the byte after that run is a closing quote
        for tid, data in enumerate(vocab):
            if not data or tid in no_bytes:
                run[tid] = -1
                continue
            by_first.setdefault(data[0], []).append(tid)
            n = next((i for i, b in enumerate(data) if b not in STRING_BYTES), len(data))
            run[tid], quote_next[tid] = n, n < len(data) and data[n] == 0x22
        self.by_first = {b: np.array(ids, dtype=np.int64) for b, ids in by_first.items()}
        self.all_string = np.array([n == len(d) and n > 0 for n, d in zip(run, vocab)])  # (V,) string bytes only
        self.run, self.quote_next = run, quote_next
        width = max((len(p) for p in grammar.pieces if p), default=1) + 2  # the longest forced run
        self.lengths = np.array([len(d) if r >= 0 else 0 for d, r in zip(vocab, run)], dtype=np.int64)
        self.head = np.full((self.V, width), -1, dtype=np.int16)  # (V, width) each token's first bytes, -1 padded
        for tid, data in enumerate(vocab):
            if self.lengths[tid]:
                self.head[tid, :min(width, len(data))] = np.frombuffer(data[:width], dtype=np.uint8)
        # A token can close at most `cross` triples; from triple number <= max_items - cross every "," it may read
        # is allowed, so those states differ only in the item count, which no mask depends on: they share one.
        longest = max((len(d) for d in vocab), default=1)
        self._same_up_to = grammar.max_items - (1 + longest // grammar._item_dist(0, 0))
        self._after: dict[tuple, torch.Tensor] = {}  # state -> (V,) dist after the token (FAR: dead)
        self._rows: dict[int, _Row] = {}

    def dist_after(self, state: tuple) -> torch.Tensor:
        """(V,) int64: ``dist`` of the state each token leads to from ``state``; FAR where the walk dies."""
        if 1 <= state[0] <= self._same_up_to and state[1] >= 0:
            state = (1, state[1], state[2])  # the shared key (see __init__)
        cached = self._after.get(state)
        if cached is not None:
            return cached
        g = self.grammar
        out = np.full(self.V, FAR, dtype=np.int64)
        if 0 <= state[1] < len(g.pieces) and g.pieces[state[1]] is None:  # a string slot
            out[self.all_string] = g.dist((state[0], state[1], 1))  # more characters: the slot is non-empty
            candidates = np.nonzero(self.quote_next & ((self.run > 0) | (state[2] == 1)))[0]  # ... then a quote
        elif forced := g.forced(state):  # tokens agreeing with the forced bytes as far as both go
            want = np.frombuffer(forced, dtype=np.uint8).astype(np.int16)[:self.head.shape[1]]
            n = len(want)
            agree = (self.head[:, :n] == want) | (np.arange(n) >= self.lengths[:, None])  # (V, n)
            candidates = np.nonzero(agree.all(1) & (self.lengths > 0))[0]
        else:
            candidates = [self.by_first[b] for b in g.first_bytes(state) if b in self.by_first]
            candidates = np.concatenate(candidates) if candidates else np.zeros(0, dtype=np.int64)
        for tid in candidates.tolist():
            after = g.walk(state, self.vocab[tid])
            if after is not None:
                out[tid] = g.dist(after)
        self._after[state] = result = torch.from_numpy(out)
        return result

    def state_of(self, row: int, ids: list[int]) -> tuple | None:
        """The automaton state after a row's generated ``ids`` (advanced incrementally while they grow)."""
        r = self._rows.get(row)
        if r is None or ids[:len(r.ids)] != r.ids:  # a new row, or not a continuation: start over
            r = self._rows[row] = _Row([], self.grammar.start)
        for tid in ids[len(r.ids):]:
            if r.state is not None:
                r.state = None if tid in self.stop_ids else self.grammar.walk(r.state, self.vocab[tid])
        r.ids = list(ids)
        return r.state

    def allowed(self, row: int, ids: list[int], left: int) -> torch.Tensor:
        """(V,) bool for the next token of ``row`` with ``left`` tokens left (>= 1, this one included)."""
        state = self.state_of(row, ids)
        if state is None:  # finished (a stop id) or dead: nothing more is read; allow anything
            return torch.ones(self.V, dtype=torch.bool)
        mask = self.dist_after(state) <= left - 1
        if self.grammar.accepts(state):
            mask[self.stop_ids] = True
        return mask

    def min_tokens(self) -> int:
        """The smallest budget that can produce an accepted reply ("[]")."""
        return self.grammar.dist(self.grammar.start)

    @classmethod
    def for_tokenizer(cls, tokenizer, stop_ids: set[int], vocab_size: int,
                      grammar: TripleGrammar | None = None) -> TokenConstraint:
        """The constraint over a byte-level tokenizer's vocabulary (ids beyond it, padding rows of the output
        head, are never allowed)."""
        n = len(tokenizer.id_to_token)
        vocab = [tokenizer.token_bytes(i) if i < n and i in tokenizer.id_to_token else b"" for i in range(vocab_size)]
        return cls(grammar or TripleGrammar(), vocab, stop_ids, tokenizer.special_ids)
