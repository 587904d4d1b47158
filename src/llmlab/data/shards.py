"""Token shards: a corpus tokenized once into flat memory-mapped arrays (the nanoGPT layout).

``prepare`` reads documents (``data/corpus.py``), drops exact duplicates (BLAKE2 of the text),
tokenizes them (training a byte-level BPE on the corpus first when no tokenizer is given), appends the
end-of-text id after each document as the separator, and writes

    out/train.bin, out/val.bin    uint16 (vocab <= 65536) or uint32 token ids, back to back
    out/tokenizer.json            the tokenizer, in our format (``tokenizer/bpe_train.py``)
    out/meta.json                 dtype, counts, separator id, the inputs — written last

Documents go to the validation split by a hash of their text (``val_fraction``), so the split does
not depend on file order. Every file is written to a temporary name and renamed: an interrupted
prepare never leaves a folder that looks complete.

``TokenShards`` reads them back with ``numpy.memmap`` (no copy into RAM) and serves training windows.
Batches are a pure function of (seed, step): window starts come from a generator seeded with both,
so resuming at step s sees exactly the batches an uninterrupted run sees, and each data-parallel rank
takes its rows of the same global batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmlab.common import LlmlabError, atomic_path, read_json, write_text_atomic
from llmlab.data.corpus import CorpusStats, default_sources, expand_inputs, iter_documents
from llmlab.tokenizer import bpe_train
from llmlab.tokenizer.bpe import ByteBPE

EOT = "<|endoftext|>"
MASK = "<|mask|>"
PAD = "<|pad|>"
DEFAULT_SPECIALS = [EOT, MASK, PAD]


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list, metadata={"cli": False})
    out: str = field(default="data/stdlib", metadata={"help": "output folder for the shards"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer: a file from 'llmlab tokenizer train', a tokenizer.json or HF folder, a .gguf, or "
                "'smollm2'; none = train a byte-level BPE on the corpus"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size when training the tokenizer"})
    tokenizer_sample_mb: float = field(default=8.0, metadata={"help": "MB of text the tokenizer is trained on"})
    val_fraction: float = field(default=0.01, metadata={"help": "fraction of documents held out for validation"})
    text_field: str = field(default="text", metadata={"help": "JSONL / Parquet field holding the text"})
    dedup: bool = field(default=True, metadata={"help": "drop exact-duplicate documents"})

    def validate(self) -> PrepareConfig:
        if not 0.0 <= self.val_fraction < 1.0:
            raise LlmlabError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        bpe_train.check_vocab_size(self.vocab_size, len(DEFAULT_SPECIALS))
        if self.tokenizer_sample_mb <= 0:
            raise LlmlabError("--tokenizer-sample-mb must be > 0")
        return self


def load_tokenizer(spec: str) -> ByteBPE:
    """Our tokenizer file, a tokenizer.json / HF folder, or a .gguf (incl. the embedded 'smollm2')."""
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf
    from llmlab.formats.load import DEFAULT_CHAT, embedded_path
    from llmlab.tokenizer.hf_json import load_tokenizer_json

    if spec in ("smollm2", DEFAULT_CHAT):
        return tokenizer_from_gguf(GGUFFile(embedded_path(DEFAULT_CHAT)))
    path = Path(spec).expanduser()
    if not path.exists():
        raise LlmlabError(f"{spec}: no such tokenizer file or folder")
    if path.is_dir():
        tok = load_tokenizer_json(path)
    elif path.suffix == ".gguf":
        tok = tokenizer_from_gguf(GGUFFile(path))
    else:
        data = read_json(path, "expected a tokenizer file")
        if isinstance(data, dict) and data.get("format") == bpe_train.FORMAT:
            tok = bpe_train.read_tokenizer(path)
        elif path.name == "tokenizer.json":
            tok = load_tokenizer_json(path.parent)
        else:
            raise LlmlabError(f"{path}: not a tokenizer file (use 'llmlab tokenizer train' or a tokenizer.json)")
    if not isinstance(tok, ByteBPE):
        raise LlmlabError(f"{spec}: pretraining shards need a byte-level BPE tokenizer")
    return tok


def separator_id(tok: ByteBPE) -> int:
    """The id placed between documents: <|endoftext|> if present, else the tokenizer's eos."""
    if EOT in tok.special_tokens:
        return tok.special_tokens[EOT]
    if tok.eos_id is not None:
        return tok.eos_id
    raise LlmlabError("the tokenizer has neither <|endoftext|> nor an eos token to separate documents")


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(cfg: PrepareConfig, show_progress: bool = True) -> dict:
    """Build the shards; returns the meta dict (also written to out/meta.json)."""
    from tqdm import tqdm

    cfg.validate()
    t0 = time.perf_counter()
    paths = expand_inputs(cfg.inputs) if cfg.inputs else default_sources()
    if not paths:
        raise LlmlabError("no input files: give files, folders, globs, .jsonl or .parquet")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()

    # 1. Read, drop exact duplicates.
    seen: set[bytes] = set()
    docs: list[str] = []
    duplicates = 0
    for doc in tqdm(iter_documents(paths, stats, cfg.text_field), desc="reading", unit="doc",
                    disable=not show_progress, leave=False):
        if not doc.strip():
            continue
        digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
        if cfg.dedup and digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        docs.append(doc)
    if not docs:
        raise LlmlabError("the corpus is empty: no readable UTF-8 text in "
                          f"{len(paths)} file(s) ({stats.skipped_files} skipped, {stats.bad_lines} bad lines)")

    # 2. Tokenizer: given, or trained on a sample of the corpus.
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        tok_source = cfg.tokenizer
    else:
        budget, sample = int(cfg.tokenizer_sample_mb * 1e6), []
        for doc in docs:
            sample.append(doc)
            budget -= len(doc)
            if budget <= 0:
                break
        trained = bpe_train.train_bpe(sample, cfg.vocab_size, special_tokens=DEFAULT_SPECIALS)
        tok = ByteBPE(trained.vocab, trained.merges, trained.pre_steps, trained.special_tokens,
                      eos_id=trained.special_tokens[EOT])  # rebuilt: encode_batch may use the tokenizers library
        tok_source = f"trained here (byte-level BPE, vocab {cfg.vocab_size}, {len(sample)} documents)"
    bpe_train.write_tokenizer(tok, out / "tokenizer.json")
    sep = separator_id(tok)
    dtype = _token_dtype(tok.vocab_size)

    # 3. Split by content hash, tokenize, write.
    counts = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}
    threshold = int(cfg.val_fraction * 2**32)
    split_of = ["val" if int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=4).digest(), "little")
                < threshold else "train" for d in docs]
    if cfg.val_fraction > 0 and "val" not in split_of and len(docs) > 1:
        split_of[-1] = "val"  # a tiny corpus still gets a validation document
    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp, \
            open(train_tmp, "wb") as train_f, open(val_tmp, "wb") as val_f:
        handles = {"train": train_f, "val": val_f}
        bar = tqdm(total=sum(len(d) for d in docs), desc="tokenizing", unit="B", unit_scale=True,
                   disable=not show_progress, leave=False)
        chunk = 256
        for i in range(0, len(docs), chunk):
            batch = docs[i:i + chunk]
            for doc, ids, split in zip(batch, tok.encode_batch(batch), split_of[i:i + chunk]):
                arr = np.asarray([*ids, sep], dtype=dtype)
                handles[split].write(arr.tobytes())
                counts[split] += arr.size
                n_docs[split] += 1
                bar.update(len(doc))
        bar.close()
    meta = {
        "format": "llmlab-shards", "version": 1, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
        "separator_id": sep, "mask_id": tok.special_tokens.get(MASK), "pad_id": tok.special_tokens.get(PAD),
        "tokens": counts, "documents": n_docs, "duplicates_removed": duplicates,
        "corpus": {**asdict(stats), "inputs": cfg.inputs or [f"python stdlib ({len(paths)} files)"]},
        "tokenizer": tok_source, "bytes_per_token": round(stats.bytes / max(1, sum(counts.values())), 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


class TokenShards:
    """Read-only view of a prepared folder: ``batch(step, ...)`` -> (inputs, targets) windows."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = read_json(self.folder / "meta.json", "run 'llmlab data prepare' first")
        if not isinstance(meta, dict) or meta.get("format") != "llmlab-shards":
            raise LlmlabError(f"{self.folder / 'meta.json'}: not a shard folder written by 'llmlab data prepare'")
        self.meta = meta
        dtype = np.dtype(meta["dtype"])
        self.splits: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            path = self.folder / f"{split}.bin"
            expected = meta["tokens"][split] * dtype.itemsize
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                raise LlmlabError(f"{path}: {size} bytes, meta.json says {expected}: the shards are incomplete; "
                                  "run 'llmlab data prepare' again")
            self.splits[split] = (np.memmap(path, dtype=dtype, mode="r") if expected
                                  else np.zeros(0, dtype=dtype))
        self.vocab_size = int(meta["vocab_size"])

    def tokens(self, split: str) -> int:
        return int(self.splits[split].size)

    def check_fits(self, seq_len: int, split: str = "train") -> None:
        n = self.tokens(split)
        if n < seq_len + 1:
            raise LlmlabError(f"the {split} split has {n} tokens, fewer than one window of seq_len+1 = "
                              f"{seq_len + 1}: use a shorter --seq-len or more data")

    def batch(self, step: int, rows: int, seq_len: int, *, seed: int, split: str = "train", first_row: int = 0,
              total_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [first_row, first_row+rows) of the global batch of ``total_rows`` windows for ``step``.

        Returns inputs and next-token targets, both (rows, seq_len) int64."""
        data = self.splits[split]
        self.check_fits(seq_len, split)
        total_rows = rows if total_rows is None else total_rows
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split == "val"))
        starts = torch.randint(0, data.size - seq_len, (total_rows,), generator=g)[first_row:first_row + rows]
        windows = np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts.tolist()])
        w = torch.from_numpy(windows)  # (rows, seq_len + 1)
        return w[:, :-1], w[:, 1:]
