"""Train a byte-level BPE tokenizer (Sennrich et al. 2016, arXiv:1508.07909; GPT-2's byte-level
variant, Radford et al. 2019) — the same greedy algorithm as Hugging Face ``tokenizers``' BpeTrainer.

1. Pre-tokenize the corpus (regex pieces; BPE never merges across them) and count each distinct piece.
2. Start from the 256 byte symbols (GPT-2's printable byte<->unicode table), special tokens first.
3. Count every adjacent symbol pair, weighted by piece frequency, and keep an index pair -> pieces
   where it occurs.
4. Repeatedly take the most frequent pair (ties: the pair of smaller symbol ids, as ``tokenizers``),
   add the merged symbol to the vocabulary, and rewrite only the pieces in that pair's index,
   updating the counts of the neighbouring pairs incrementally. A lazy max-heap holds the counts:
   a popped entry whose count is stale is pushed back with the current count.

Stop at ``vocab_size`` or when the best pair occurs fewer than ``min_frequency`` times.
The result is a ``ByteBPE`` (``tokenizer/bpe.py``); ``write_tokenizer``/``read_tokenizer`` use our JSON format and
``ByteBPE.to_hf_json`` writes a ``tokenizer.json`` that ``tokenizers`` loads and encodes identically (tested).
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from llmlab.common import LlmlabError, read_json, write_text_atomic
from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
from llmlab.tokenizer.pretokenize import GPT2_PATTERN, make_pretokenizer

FORMAT = "llmlab-bpe"


def check_vocab_size(vocab_size: int, n_specials: int) -> None:
    """A byte-level vocabulary holds the 256 bytes and the special tokens at least."""
    if vocab_size < 256 + n_specials:
        raise LlmlabError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least 256 + "
                          f"{n_specials} special tokens = {256 + n_specials}")


def count_pieces(texts: Iterable[str], pre_steps: list[str]) -> Counter:
    """Distinct pre-tokenized pieces of ``texts`` with their counts."""
    pretokenize = make_pretokenizer(pre_steps)
    counts: Counter = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int, *, special_tokens: list[str] | tuple[str, ...] = (),
              pre_steps: list[str] | None = None, min_frequency: int = 2,
              progress: Callable[[int, int], None] | None = None) -> ByteBPE:
    """Learn merges until the vocabulary (specials + 256 bytes + merges) has ``vocab_size`` entries."""
    pre_steps = [GPT2_PATTERN] if pre_steps is None else list(pre_steps)
    specials = list(dict.fromkeys(special_tokens))
    check_vocab_size(vocab_size, len(specials))
    base = len(specials) + 256
    byte_enc = bytes_to_unicode()
    # Symbols: specials, then the 256 bytes in the order ``tokenizers`` uses (sorted by their character).
    symbols: list[str] = specials + sorted(byte_enc.values())
    sym_id = {s: i for i, s in enumerate(symbols)}

    piece_counts = count_pieces(texts, pre_steps)
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, n in piece_counts.items():
        words.append([sym_id[byte_enc[b]] for b in piece.encode("utf-8")])
        freqs.append(n)

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, n) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += n
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    target = vocab_size - base
    while len(merges) < target and heap:
        neg, pair = heapq.heappop(heap)
        current = pair_count.get(pair, 0)
        if -neg != current:  # stale entry: re-queue with the true count
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        a, b = pair
        new = len(symbols)
        symbols.append(symbols[a] + symbols[b])
        merges.append((symbols[a], symbols[b]))
        changed: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            word, n = words[w], freqs[w]
            i, out = 0, []
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            for p in zip(word, word[1:]):  # remove the old pairs of this piece ...
                changed[p] -= n
            for p in zip(out, out[1:]):  # ... and add the new ones
                changed[p] += n
                where[p].add(w)
            words[w] = out
        for p, delta in changed.items():
            if delta == 0 or p == pair:
                continue
            pair_count[p] += delta
            if pair_count[p] <= 0:
                del pair_count[p]
            elif delta > 0:
                heapq.heappush(heap, (-pair_count[p], p))
        pair_count.pop(pair, None)
        if progress is not None:
            progress(len(merges), target)
    vocab = {s: i for i, s in enumerate(symbols)}
    return ByteBPE(vocab, merges, pre_steps, {s: vocab[s] for s in specials}, use_tokenizers_lib=False)


# ---- files ------------------------------------------------------------------------------------------


def write_tokenizer(tok: ByteBPE, path: str | os.PathLike) -> None:
    """Our format: one JSON file with the pre-tokenizer steps, special tokens and merges (the vocab
    follows from them: specials, 256 bytes, then one symbol per merge)."""
    data = {"format": FORMAT, "version": 1, "pre_steps": tok.pre_steps, "special_tokens": tok.special_tokens,
            "vocab": tok.vocab, "merges": [list(m) for m in tok.merges], "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    write_text_atomic(path, json.dumps(data, ensure_ascii=False))


def read_tokenizer(path: str | os.PathLike, use_tokenizers_lib: bool = True) -> ByteBPE:
    data = read_json(Path(path), "expected a tokenizer saved by 'llmlab tokenizer train'")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LlmlabError(f"{path}: not an llmlab BPE tokenizer file (format {FORMAT!r})")
    try:
        merges = [tuple(m) for m in data["merges"]]
        vocab = {str(k): int(v) for k, v in data["vocab"].items()}
        specials = {str(k): int(v) for k, v in data["special_tokens"].items()}
        pre_steps = [str(s) for s in data["pre_steps"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LlmlabError(f"{path}: malformed tokenizer file ({type(e).__name__}: {e})") from None
    if any(len(m) != 2 for m in merges):
        raise LlmlabError(f"{path}: malformed tokenizer file (each merge is a pair)")
    return ByteBPE(vocab, merges, pre_steps, specials, bos_id=data.get("bos_id"), eos_id=data.get("eos_id"),
                   use_tokenizers_lib=use_tokenizers_lib)


def train_files(paths: list[Path], vocab_size: int, *, special_tokens: list[str], min_frequency: int = 2,
                pre_steps: list[str] | None = None, max_bytes: int | None = None,
                show_progress: bool = True) -> tuple[ByteBPE, dict]:
    """Train on text files (UTF-8; others skipped and counted). Returns the tokenizer and statistics."""
    from tqdm import tqdm

    texts: list[str] = []
    total = skipped = 0
    for p in paths:
        try:
            text = p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if "\x00" in text:
            skipped += 1
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    if not texts or total == 0:
        raise LlmlabError("no UTF-8 text to train on: give text files, folders or globs with some content")
    t0 = time.perf_counter()
    bar = tqdm(total=vocab_size, desc="bpe merges", unit="tok", disable=not show_progress, leave=False)

    def progress(done: int, target: int) -> None:
        bar.n = vocab_size - target + done
        if done % 64 == 0 or done == target:
            bar.refresh()

    tok = train_bpe(texts, vocab_size, special_tokens=special_tokens, pre_steps=pre_steps,
                    min_frequency=min_frequency, progress=progress)
    bar.close()
    stats = {"files": len(texts), "skipped": skipped, "bytes": total, "vocab_size": len(tok.vocab),
             "merges": len(tok.merges), "seconds": round(time.perf_counter() - t0, 2)}
    return tok, stats
