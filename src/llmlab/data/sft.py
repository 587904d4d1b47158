"""Instruction-tuning (SFT) data: chat files -> token rows whose loss falls only on the assistant's tokens.

Supervised fine-tuning on demonstrations (InstructGPT: Ouyang et al. 2022, "Training language models to
follow instructions with human feedback", arXiv:2203.02155; Alpaca and Vicuna in 2023) trains a chat model
on the replies of example conversations. This module turns conversations into training rows in four steps.

1. **Read.** Every record becomes a list of ``{"role", "content"}`` messages with roles system, user and
   assistant. ``SFTDataConfig.format`` names the schema; "auto" (the default) picks it per file from the
   keys of the file's first record that matches one:

   ==================  ============================================  ======================================
   format              keys                                          messages
   ==================  ============================================  ======================================
   messages            ``messages: [{role, content}]`` (OpenAI)      as given (content parts: text joined)
   sharegpt            ``conversations: [{from, value}]``            from human/gpt/system -> user/...
   alpaca              ``instruction``, optional ``input``,          user: instruction + "\\n\\n" + input;
                       ``output`` (optional ``system``)              assistant: output
   prompt_completion   ``prompt``, ``completion`` (strings, or       user: prompt; assistant: completion
                       message lists as in TRL)
   ==================  ============================================  ======================================

   Files: ``.jsonl`` (one record per line), ``.json`` (a JSON array of records, or JSONL), ``.parquet``
   (one record per row, the same columns; needs pyarrow, the ``data`` extra). A folder means every such
   file in it. A malformed record is reported as ``file:line: problem`` (for a JSON array or Parquet file
   the number counts records from 1) and is skipped and counted, or is fatal, by ``on_bad_line``.
   The built-in verifiable tasks (``data/tasks.py``) are a source too: ``task`` trains on one, no file.

2. **Render and mark.** The conversation is rendered through the model's own chat template. The text a
   reply must produce is read off the template itself, prefix by prefix: for the assistant message ``i``,
   its span starts where ``render(messages[:i], add_generation_prompt=True)`` ends (the prompt the model
   sees at inference, role header included) and ends where ``render(messages[:i+1])`` ends, less trailing
   whitespace (the separator before the next turn). So the span holds the reply and its end-of-turn token
   (ChatML: ``Hello<|im_end|>``), never the header ``<|im_start|>assistant\\n``, for any template, with no
   guessing of token patterns. A template that does not render prefix by prefix is a reported bad record.

3. **Tokenize.** Each span and each gap between spans is encoded on its own, so no token straddles a
   boundary, and the reply's first token is the one the model would emit after the generation prompt.
   The loss mask is True exactly on the span tokens.

4. **Rows.** Packing (the default) puts several examples in one row of ``seq_len`` tokens, best-fit
   decreasing, never splitting an example: no compute is spent on padding. Each token carries its
   example's ``position_ids`` (restarting at 0) and a ``doc_ids`` entry, from which ``SFTBatch.
   attention_mask`` builds the block-diagonal causal mask, so no token attends across examples. Padding
   (``packing=False``) is one example per row, padded to the longest in the batch: simpler (any model
   forward works, with a key-padding mask), at the cost of the padding's compute. An example longer than
   ``seq_len`` is cut to its first ``seq_len`` tokens and counted, or is an error, by ``on_overlong``.

Shapes: ``SFTBatch`` holds int64 tensors ``input_ids``, ``labels``, ``position_ids``, ``doc_ids``, all
(B, T). ``labels[b, t]`` is the next-token target at position t (as ``TokenShards.batch`` returns):
``input_ids[b, t+1]`` when that token is an assistant token of the same example, else -100. Padding has
``doc_ids`` -1. ``attention_mask()`` is (B, T, T) bool, True where query t may attend to key s.
"""

from __future__ import annotations

import bisect
import glob
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError
from llmlab.data.tasks import get_task

IGNORE = -100
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SUFFIXES = (".jsonl", ".json", ".parquet")
REPORTED = 5  # problems kept verbatim for the report; the rest are only counted


@dataclass
class SFTDataConfig:
    paths: list[str] = field(default_factory=list, metadata={
        "cli": False, "help": "JSON / JSONL / Parquet files or folders of conversations"})
    task: str | None = field(default=None, metadata={
        "help": "train on a built-in verifiable task (addition, reversal, ...) instead of files"})
    task_examples: int = field(default=1000, metadata={"help": "training examples drawn from --task"})
    format: str = field(default="auto", metadata={
        "help": "record schema; auto = from the keys of each file's first record", "choices": FORMATS})
    seq_len: int = field(default=512, metadata={"help": "tokens per training row"})
    packing: bool = field(default=True, metadata={
        "help": "pack several examples per row (no padding compute); --no-packing pads one per row"})
    on_overlong: str = field(default="truncate", metadata={
        "help": "an example longer than --seq-len: keep its first tokens (counted) or stop with an error",
        "choices": ("truncate", "error")})
    on_bad_line: str = field(default="skip", metadata={
        "help": "a malformed record: skip it (counted, first few reported) or stop with an error",
        "choices": ("skip", "error")})
    val_fraction: float = field(default=0.05, metadata={
        "help": "fraction of file examples held out for validation (a task uses its held-out split)"})
    seed: int = field(default=0, metadata={"help": "seed for the validation split, task sampling and row order"})

    def validate(self) -> SFTDataConfig:
        for name, choices in (("format", FORMATS), ("on_overlong", ("truncate", "error")),
                              ("on_bad_line", ("skip", "error"))):
            if getattr(self, name) not in choices:
                raise LlmlabError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: use one of "
                                  f"{', '.join(choices)}")
        if self.seq_len < 2:
            raise LlmlabError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LlmlabError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.task_examples < 1:
            raise LlmlabError(f"--task-examples must be >= 1, got {self.task_examples}")
        return self


@dataclass
class SFTStats:
    records: int = 0  # records read (good or bad)
    bad_lines: int = 0  # malformed records, skipped
    no_assistant: int = 0  # well-formed records without an assistant message, skipped
    examples: int = 0  # examples kept (train + val)
    truncated: int = 0  # over-long examples cut to seq_len
    dropped: int = 0  # truncated so far that no assistant token was left, skipped
    tokens: int = 0  # tokens in kept examples
    trained_tokens: int = 0  # of which are loss targets
    problems: list[str] = field(default_factory=list)  # the first few, verbatim

    def note(self, message: str) -> None:
        if len(self.problems) < REPORTED:
            self.problems.append(message)

    def summary(self) -> str:
        skipped = [f"{getattr(self, k)} {k.replace('_', ' ')}" for k in ("bad_lines", "no_assistant", "truncated",
                                                                         "dropped") if getattr(self, k)]
        return ", ".join([f"{self.examples} examples from {self.records} records",
                          f"{self.tokens} tokens ({self.trained_tokens} trained)", *skipped])


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "file:line" or "task NAME/SPLIT #i", named in every problem


@dataclass
class TokenizedExample:
    ids: list[int]
    mask: list[bool]  # True on assistant tokens (the reply and its end-of-turn token)
    where: str


class BadRecord(Exception):
    """One record's problem; becomes ``file:line: problem``."""


# ---- 1. read: records -> messages ------------------------------------------------------------------------

def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _text(record: dict, key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"missing {key!r}")
        return ""
    if not isinstance(record[key], str):
        raise BadRecord(f"{key!r} is a {type(record[key]).__name__}, not a string")
    return record[key]


def _content(value, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord(f"message {i}: content part of type {kind!r} is not text")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRecord(f"message {i}: content is a {type(value).__name__}, not a string")


def _messages(value, key: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{key!r} must be a non-empty list of messages")
    roles = roles or {r: r for r in ROLES}
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"{key!r} message {i} is a {type(m).__name__}, not an object")
        role = m.get(role_key)
        if role not in roles:
            raise BadRecord(f"{key!r} message {i}: {role_key} {role!r} is not one of {', '.join(roles)}")
        if content_key not in m:
            raise BadRecord(f"{key!r} message {i}: missing {content_key!r}")
        out.append({"role": roles[role], "content": _content(m[content_key], i)})
    return out


def record_to_messages(record, fmt: str) -> list[dict[str, str]]:
    """One record of format ``fmt`` -> messages; raises BadRecord naming the problem."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got a {type(record).__name__}")
    if fmt == "messages":
        return _messages(record.get("messages"), "messages")
    if fmt == "sharegpt":
        return _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
        system = _text(record, "system", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise BadRecord(f"missing {key!r}")
        prompt, completion = record["prompt"], record["completion"]
        head = (_messages(prompt, "prompt") if isinstance(prompt, list)
                else [{"role": "user", "content": _text(record, "prompt")}])
        tail = (_messages(completion, "completion") if isinstance(completion, list)
                else [{"role": "assistant", "content": _text(record, "completion")}])
        return head + tail
    raise LlmlabError(f"unknown SFT format {fmt!r}: use one of {', '.join(FORMATS)}")


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders -> their .jsonl/.json/.parquet files; globs expanded. Sorted within each."""
    out: list[Path] = []
    for item in paths:
        if any(ch in item for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not found:
                raise LlmlabError(f"{item}: the pattern matches no files")
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise LlmlabError(f"{item}: no such file or folder")
            found = (sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
                     if path.is_dir() else [path])
            if not found:
                raise LlmlabError(f"{item}: the folder holds no .jsonl, .json or .parquet files")
        out.extend(found)
    return list(dict.fromkeys(out))


def _parquet_records(path: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmlabError(f"{path}: reading Parquet needs pyarrow: pip install 'llmlab[data]'") from None
    try:
        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        yield from enumerate(rows, 1)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError subclass these
        raise LlmlabError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line or record number, parsed record or a BadRecord) for every record of one file."""
    if path.suffix.lower() == ".parquet":
        yield from _parquet_records(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmlabError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmlabError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
        yield from enumerate(records, 1)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord(f"invalid JSON ({e.msg}, column {e.colno})")


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    first_keys = None
    for _, record in iter_records(path):
        if isinstance(record, dict):
            found = detect_format(record)
            if found:
                return found
            first_keys = first_keys or sorted(record)
    if first_keys is None:
        raise LlmlabError(f"{path}: holds no JSON object records")
    raise LlmlabError(f"{path}: cannot tell the format from the keys {first_keys}: expected messages, "
                      "conversations, instruction/output or prompt/completion (or pass --format)")


def report_bad(stats: SFTStats, on_bad_line: str, where: str, problem: str) -> None:
    message = f"{where}: {problem}"
    if on_bad_line == "error":
        raise LlmlabError(f"{message} (fix it, or pass --on-bad-line skip to skip such records)")
    stats.bad_lines += 1
    stats.note(message)


def read_conversations(paths: list[str], fmt: str = "auto", on_bad_line: str = "skip",
                       stats: SFTStats | None = None) -> list[Conversation]:
    """Every record of every file as a Conversation; bad records reported (see the module docstring)."""
    stats = stats if stats is not None else SFTStats()
    out = []
    for path in expand_paths(paths):
        file_fmt = _file_format(path, fmt)
        for n, record in iter_records(path):
            stats.records += 1
            where = f"{path}:{n}"
            try:
                if isinstance(record, BadRecord):
                    raise record
                messages = record_to_messages(record, file_fmt)
            except BadRecord as e:
                report_bad(stats, on_bad_line, where, str(e))
                continue
            out.append(Conversation(messages, where))
    return out


def task_conversations(name: str, split: str, n: int, seed: int) -> list[Conversation]:
    """``n`` examples of a built-in verifiable task as conversations (user question, assistant answer)."""
    return [Conversation(ex.messages(), f"task {name}/{split} #{i}")
            for i, ex in enumerate(get_task(name).examples(split, n, seed))]


# ---- 2 and 3. render, mark the assistant spans, tokenize -------------------------------------------------

def assistant_spans(messages: list[dict[str, str]], template) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant reply."""
    text = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = template.render(messages[:i], add_generation_prompt=True)
        turn = template.render(messages[:i + 1])
        if not (text.startswith(head) and text.startswith(turn) and len(head) <= len(turn)):
            raise BadRecord(f"the chat template does not render this conversation prefix by prefix (message {i}), "
                            "so its assistant tokens cannot be located")
        spans.append((len(head), max(len(head), len(turn.rstrip()))))
    return text, spans


def tokenize_conversation(messages: list[dict[str, str]], tokenizer, template, where: str = "") -> TokenizedExample:
    """Render with ``template`` (a ``ChatTemplate``), encode with ``tokenizer`` (a ``ByteBPE``: ``encode(text,
    add_bos=False)``, ``add_bos``, ``bos_id``), mask the assistant spans. Raises BadRecord."""
    text, spans = assistant_spans(messages, template)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans:
        pieces += [(text[pos:start], False), (text[start:end], True)]
        pos = end
    pieces.append((text[pos:], False))
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trained in pieces:
        if piece:
            got = tokenizer.encode(piece, add_bos=False)
            ids += got
            mask += [trained] * len(got)
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
        ids, mask = [bos, *ids], [False, *mask]  # the template did not write the BOS token itself
    return TokenizedExample(ids, mask, where)


def tokenize_conversations(conversations: list[Conversation], tokenizer, template, cfg: SFTDataConfig,
                           stats: SFTStats) -> list[TokenizedExample]:
    """Tokenize, skip examples with no assistant reply, and cut or refuse over-long ones (counted in stats)."""
    out = []
    for conv in conversations:
        if not any(m["role"] == "assistant" for m in conv.messages):
            stats.no_assistant += 1
            stats.note(f"{conv.where}: no assistant message (nothing to learn from)")
            continue
        try:
            ex = tokenize_conversation(conv.messages, tokenizer, template, conv.where)
        except (BadRecord, LlmlabError) as e:  # LlmlabError: the template refused this conversation
            report_bad(stats, cfg.on_bad_line, conv.where, str(e))
            continue
        if len(ex.ids) > cfg.seq_len:
            if cfg.on_overlong == "error":
                raise LlmlabError(f"{conv.where}: {len(ex.ids)} tokens, more than --seq-len {cfg.seq_len}: raise "
                                  "--seq-len, shorten the example, or pass --on-overlong truncate")
            stats.truncated += 1
            ex = TokenizedExample(ex.ids[:cfg.seq_len], ex.mask[:cfg.seq_len], ex.where)
            if not any(ex.mask[1:]):
                stats.dropped += 1
                stats.note(f"{conv.where}: no assistant token left after truncation to {cfg.seq_len} tokens")
                continue
        stats.examples += 1
        stats.tokens += len(ex.ids)
        stats.trained_tokens += sum(ex.mask[1:])  # the first token is never a target
        out.append(ex)
    return out


# ---- 4. rows and batches ---------------------------------------------------------------------------------

def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: example indices per row, each row's lengths summing to <= seq_len.

    Longest first, each into the fullest row that still has room (a new row when none has). Every length
    must be <= seq_len; no example is split."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the tightest fit
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k == len(rooms):
            rows.append([i])
            room, r = seq_len - n, len(rows) - 1
        else:
            room, r = rooms.pop(k)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(rooms, (room, r))
    return rows


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE (-100) where no loss
    position_ids: torch.Tensor  # (B, T) restarting at 0 for each example
    doc_ids: torch.Tensor  # (B, T) example number within the row, -1 on padding

    def to(self, device) -> SFTBatch:
        return SFTBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.position_ids, self.doc_ids)))

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def attention_mask(self) -> torch.Tensor:
        """(B, T, T) bool: query t sees key s iff s <= t within the same example. A padding position sees only
        itself, so no softmax row is empty (its loss is ignored anyway)."""
        T = self.doc_ids.shape[1]
        real = self.doc_ids >= 0  # (B, T)
        same = (self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) & real[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=self.doc_ids.device)
        return (same & causal) | eye


def make_row(examples: list[TokenizedExample], length: int, pad_id: int) -> tuple[list[int], ...]:
    """Concatenate examples into one row of ``length``: ids, labels, position ids, doc ids (lists)."""
    ids, labels, pos, docs = [], [], [], []
    for d, ex in enumerate(examples):
        n = len(ex.ids)
        ids += ex.ids
        # the target at t is token t+1 of the same example; the example's last position predicts nothing
        labels += [ex.ids[t + 1] if ex.mask[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
        pos += range(n)
        docs += [d] * n
    pad = length - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + [0] * pad, docs + [-1] * pad


def epoch_order(n: int, step: int, rows: int, *, seed: int, val: bool = False, first_row: int = 0,
                total_rows: int | None = None) -> list[int]:
    """Item indices [first_row, first_row+rows) of the global batch of ``total_rows`` items for ``step``, out
    of ``n`` items: a fresh permutation each epoch, so every item is seen once per epoch; a function of (seed,
    step) only, so a resumed run reads the same batches."""
    total_rows = rows if total_rows is None else total_rows
    orders: dict[int, list[int]] = {}  # epoch -> its permutation
    chosen = []
    for j in range(first_row, first_row + rows):
        epoch, k = divmod(step * total_rows + j, n)
        if epoch not in orders:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + val)
            orders[epoch] = torch.randperm(n, generator=g).tolist()
        chosen.append(orders[epoch][k])
    return chosen


class SFTData:
    """Train and validation rows, served as SFTBatch by (seed, step, rows) as ``train.loop`` requires."""

    def __init__(self, train: list[TokenizedExample], val: list[TokenizedExample], seq_len: int, packing: bool,
                 pad_id: int, stats: SFTStats):
        self.seq_len, self.packing, self.pad_id, self.stats = seq_len, packing, pad_id, stats
        self.examples = {"train": train, "val": val}
        self.rows = {split: (pack_rows([len(e.ids) for e in exs], seq_len) if packing else
                             [[i] for i in range(len(exs))]) for split, exs in self.examples.items()}

    def fill(self, split: str = "train") -> float:
        """Fraction of row tokens that are real tokens (1.0 = no padding at all)."""
        rows = self.rows[split]
        return sum(len(e.ids) for e in self.examples[split]) / (len(rows) * self.seq_len) if rows else 0.0

    def batch(self, step: int, rows: int, *, seed: int, split: str = "train", first_row: int = 0,
              total_rows: int | None = None) -> SFTBatch:
        """Rows [first_row, first_row+rows) of the global batch of ``total_rows`` rows for ``step``: the
        row order is a fresh permutation each epoch, so every row is seen once per epoch."""
        if split not in self.rows:
            raise LlmlabError(f"unknown split {split!r}: use train or val")
        n = len(self.rows[split])
        if n == 0:
            raise LlmlabError(f"the SFT data has no {split} examples: raise --val-fraction or add examples")
        chosen = epoch_order(n, step, rows, seed=seed, val=split == "val", first_row=first_row, total_rows=total_rows)
        exs = self.examples[split]
        groups = [[exs[i] for i in self.rows[split][r]] for r in chosen]
        length = self.seq_len if self.packing else max(sum(len(e.ids) for e in grp) for grp in groups)
        cols = list(zip(*(make_row(grp, length, self.pad_id) for grp in groups)))
        return SFTBatch(*(torch.tensor(c, dtype=torch.long) for c in cols))


def build_sft_data(cfg: SFTDataConfig, tokenizer, template) -> SFTData:
    """Files (or a built-in task) -> tokenized, masked, packed or padded rows, with the counts in ``.stats``."""
    cfg.validate()
    stats = SFTStats()
    if cfg.paths:
        where = ", ".join(cfg.paths)
        convs = read_conversations(cfg.paths, cfg.format, cfg.on_bad_line, stats)
        random.Random(cfg.seed).shuffle(convs)
        n_val = min(len(convs) - 1, max(1, round(len(convs) * cfg.val_fraction))) if cfg.val_fraction else 0
        val_convs, train_convs = convs[:max(0, n_val)], convs[max(0, n_val):]
    elif cfg.task:
        where = f"task {cfg.task}"
        n_val = max(1, round(cfg.task_examples * cfg.val_fraction)) if cfg.val_fraction else 0
        train_convs = task_conversations(cfg.task, "train", cfg.task_examples, cfg.seed)
        val_convs = task_conversations(cfg.task, "heldout", n_val, cfg.seed)
        stats.records = len(train_convs) + len(val_convs)
    else:
        raise LlmlabError("no SFT data: pass JSON / JSONL / Parquet files or a built-in task (--task NAME)")
    train = tokenize_conversations(train_convs, tokenizer, template, cfg, stats)
    val = tokenize_conversations(val_convs, tokenizer, template, cfg, stats)
    if not train:
        readable = stats.records - stats.bad_lines
        if readable and stats.no_assistant == readable:
            raise LlmlabError(f"{where}: none of the {readable} examples has an assistant message: SFT trains only "
                              "on assistant replies, so add them (an output / completion field, or role assistant)")
        raise LlmlabError(f"{where}: no usable training examples ({stats.summary()}"
                          + (f"; first problem: {stats.problems[0]}" if stats.problems else "") + ")")
    pad_id = next((i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
                   if i is not None), 0)
    return SFTData(train, val, cfg.seq_len, cfg.packing, pad_id, stats)
