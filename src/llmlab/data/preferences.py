"""Preference pairs for DPO: TRL-style ``prompt`` / ``chosen`` / ``rejected`` JSONL, or pairs built from a
built-in verifiable task, tokenized through the model's chat template.

Direct preference optimization (Rafailov et al. 2023, arXiv:2305.18290) learns from pairs: one prompt, a
preferred reply (chosen) and a dispreferred one (rejected). This module reads and checks them.

**File format** (TRL's preference datasets, one JSON object per line of a ``.jsonl`` file, or a ``.json``
array; read by ``data/sft.py``'s ``iter_records``):

- standard: ``{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}`` (strings);
- conversational: ``prompt`` a list of ``{role, content}`` messages (system / user / assistant turns before
  the reply), ``chosen`` and ``rejected`` each a list holding the assistant message(s) of the reply.

Every problem stops the run with ``file:line: problem`` and the fix: invalid JSON, a record that is not an
object, a missing field, a field of the wrong type, an empty reply (only whitespace), chosen identical to
rejected (nothing to prefer), and a prompt that leaves no room for a reply in ``seq_len`` tokens (the
context). A reply longer than the room left is cut to it (counted), as TRL's ``max_length`` does.

**Built-in pairs** (``task_pairs``): questions of a verifiable task (``data/tasks.py``); chosen = the exact
answer, rejected = the answer perturbed (``perturb_answer``: a number moved by a small offset, one letter of a
string changed or two swapped, one value of a JSON object changed), kept only when the task's own scorer says
it is wrong. Cheap (no sampling), and the pair differs in the few tokens that make the answer wrong.

**Tokenize** (``tokenize_pair``): ``prompt + chosen`` and ``prompt + rejected`` are each rendered and masked
by ``data/sft.py``'s ``tokenize_conversation`` (the reply's tokens, end-of-turn included, are the trained
span); both start with the same prompt tokens. Shapes: ``TokenizedPair.chosen`` / ``.rejected`` are
``TokenizedExample`` (ids, mask: lists of length <= seq_len).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmlab.common import LlmlabError
from llmlab.data.sft import (
    BadRecord,
    TokenizedExample,
    _messages,
    expand_paths,
    iter_records,
    tokenize_conversation,
)
from llmlab.data.tasks import get_task, parse_number

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # messages before the reply (at least one user turn)
    chosen: list[dict[str, str]]  # the preferred reply: assistant message(s)
    rejected: list[dict[str, str]]  # the dispreferred reply
    where: str  # "file:line" or "task NAME/SPLIT #i"


@dataclass
class TokenizedPair:
    chosen: TokenizedExample  # prompt + chosen; mask True on the reply tokens
    rejected: TokenizedExample  # prompt + rejected
    prompt_len: int  # tokens before the reply, the same in both
    where: str


# ---- read and check -------------------------------------------------------------------------------------

def _reply(value, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        messages = _messages(value, key)
        if any(m["role"] != "assistant" for m in messages):
            raise BadRecord(f"{key!r} must hold only assistant messages (the reply), found "
                            f"{', '.join(sorted({m['role'] for m in messages if m['role'] != 'assistant'}))}")
    else:
        raise BadRecord(f"{key!r} is a {type(value).__name__}: use a string or a list of assistant messages")
    if not "".join(m["content"] for m in messages).strip():
        raise BadRecord(f"{key!r} is empty: every pair needs a non-empty chosen and rejected reply")
    return messages


def prompt_messages(prompt) -> list[dict[str, str]]:
    """A TRL ``prompt`` (a string: one user turn; or a list of messages) -> messages; raises BadRecord."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRecord("'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(prompt, "prompt")
    raise BadRecord(f"'prompt' is a {type(prompt).__name__}: use a string or a list of messages")


def record_to_pair(record, where: str) -> PreferencePair:
    """One TRL preference record -> a PreferencePair; raises BadRecord naming the problem."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object with {', '.join(FIELDS)}, got a {type(record).__name__}")
    missing = [k for k in FIELDS if record.get(k) is None]
    if missing:
        raise BadRecord(f"missing {', '.join(repr(k) for k in missing)} (a preference record needs "
                        f"{', '.join(FIELDS)})")
    prompt_msgs = prompt_messages(record["prompt"])
    chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    if chosen == rejected:
        raise BadRecord("'chosen' and 'rejected' are identical: a pair needs two different replies")
    return PreferencePair(prompt_msgs, chosen, rejected, where)


def read_each(paths: list[str], convert, what: str) -> list:
    """``convert(record, "file:line")`` over every record of every file; the first BadRecord stops with
    ``file:line: problem``, and no records at all with ``paths: no WHAT``."""
    out = []
    for path in expand_paths(paths):
        for n, record in iter_records(path):
            try:
                if isinstance(record, BadRecord):
                    raise record
                out.append(convert(record, f"{path}:{n}"))
            except BadRecord as e:
                raise LlmlabError(f"{path}:{n}: {e}; fix the record or remove it") from None
    if not out:
        raise LlmlabError(f"{', '.join(paths)}: no {what}")
    return out


def read_preferences(paths: list[str]) -> list[PreferencePair]:
    """Every record of every file as a PreferencePair; the first bad record stops with ``file:line: problem``."""
    return read_each(paths, record_to_pair, f"preference records (expected JSON objects with {', '.join(FIELDS)})")


# ---- pairs from a built-in verifiable task ----------------------------------------------------------------

def _perturb_text(s: str, rng: random.Random) -> str:
    """One letter changed, or two different neighbours swapped."""
    if len(s) >= 2 and rng.random() < 0.5:
        spots = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
        if spots:
            i = rng.choice(spots)
            return s[:i] + s[i + 1] + s[i] + s[i + 2:]
    i = rng.randrange(len(s)) if s else 0
    letters = "abcdefghijklmnopqrstuvwxyz" if not s or s[i].islower() else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return s[:i] + rng.choice([c for c in letters if s[i:i + 1] != c]) + s[i + 1:]


def _perturb_value(v, rng: random.Random):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + rng.choice([-10, -2, -1, 1, 2, 10])
    if isinstance(v, str):
        return _perturb_text(v, rng)
    return None


def perturb_answer(answer: str, rng: random.Random) -> str:
    """A near miss of ``answer``: a number moved by a small offset, a JSON object with one value changed, or a
    string with one letter changed or two swapped. The caller checks it with the task's scorer."""
    number = parse_number(answer)
    if number is not None:
        moved = number + rng.choice([-10, -2, -1, 1, 2, 10])
        return str(moved) if number == number.to_integral_value() else format(moved, "f")
    if answer.startswith("{"):
        obj = json.loads(answer)
        key = rng.choice(sorted(obj))
        return json.dumps({**obj, key: _perturb_value(obj[key], rng)})
    return _perturb_text(answer, rng)


def task_pairs(name: str, split: str, n: int, seed: int) -> list[PreferencePair]:
    """``n`` pairs from a built-in task: chosen = the exact answer, rejected = ``perturb_answer`` (scored wrong)."""
    task = get_task(name)
    rng = random.Random(f"pairs/{name}/{split}/{seed}")
    out = []
    for i, ex in enumerate(task.examples(split, n, seed)):
        for _ in range(20):
            wrong = perturb_answer(ex.answer, rng)
            if wrong.strip() and not task.score(wrong, ex.answer):
                break
        else:
            raise LlmlabError(f"task {name}: no wrong answer found for {ex.prompt!r}")
        out.append(PreferencePair([{"role": "user", "content": ex.prompt}],
                                  [{"role": "assistant", "content": ex.answer}],
                                  [{"role": "assistant", "content": wrong}], f"task {name}/{split} #{i}"))
    return out


# ---- tokenize ------------------------------------------------------------------------------------------

def tokenize_pair(pair: PreferencePair, tokenizer, template, seq_len: int) -> tuple[TokenizedPair, bool]:
    """Both conversations through the chat template, replies masked; (pair, whether a reply was cut to
    ``seq_len``). A prompt with no room for a reply token is an error naming the record."""
    try:
        chosen = tokenize_conversation(pair.prompt + pair.chosen, tokenizer, template, pair.where)
        rejected = tokenize_conversation(pair.prompt + pair.rejected, tokenizer, template, pair.where)
    except BadRecord as e:
        raise LlmlabError(f"{pair.where}: {e}") from None
    prompt_len = chosen.mask.index(True)
    if rejected.ids[:prompt_len] != chosen.ids[:prompt_len] or rejected.mask.index(True) != prompt_len:
        raise LlmlabError(f"{pair.where}: the chat template renders the prompt differently before the two replies")
    if prompt_len >= seq_len:
        raise LlmlabError(f"{pair.where}: the prompt is {prompt_len} tokens, no room for a reply in --seq-len "
                          f"{seq_len} (the context): shorten the prompt or raise --seq-len")
    cut = max(len(chosen.ids), len(rejected.ids)) > seq_len
    chosen, rejected = (TokenizedExample(e.ids[:seq_len], e.mask[:seq_len], e.where) for e in (chosen, rejected))
    if chosen.ids == rejected.ids:
        raise LlmlabError(f"{pair.where}: chosen and rejected are the same {seq_len} tokens after the cut to "
                          "--seq-len: raise --seq-len")
    return TokenizedPair(chosen, rejected, prompt_len, pair.where), cut


def load_pairs(paths: list[str], task: str | None, n: int, seed: int) -> tuple[list[PreferencePair], str]:
    """Pairs from files, else from a built-in task's train split; (pairs, where they came from)."""
    if paths:
        return read_preferences(paths), ", ".join(str(Path(p)) for p in paths)
    if not task:
        raise LlmlabError("no preference data: pass JSONL files (prompt / chosen / rejected) or --task NAME")
    return task_pairs(task, "train", n, seed), f"task {task}"


def pad_id_of(tok) -> int:
    """The id that pads a batch of pairs: the tokenizer's pad id, else its end-of-text id, else 0."""
    return next((i for i in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)) if i is not None), 0)


def train_val_pairs(paths: list[str], task: str | None, n: int, n_val: int, seed: int
                    ) -> tuple[list[PreferencePair], list[PreferencePair], str]:
    """(train, validation, where): from files, a seeded shuffle with the first ``n_val`` held out (one pair at
    least left to train on); from a built-in task, its train split and ``n_val`` pairs of its held-out split."""
    raw, where = load_pairs(paths, task, n, seed)
    if paths:
        random.Random(seed).shuffle(raw)
        n_val = min(n_val, len(raw) - 1)
        return raw[n_val:], raw[:n_val], where
    return raw, task_pairs(task, "heldout", n_val, seed), where


# ---- pairs from sampled replies (llmlab data preferences) --------------------------------------------------

@dataclass
class PromptItem:
    prompt: list[dict[str, str]]  # messages before the reply
    answer: str | None  # the task's exact answer (verifier), None for prompts from files
    where: str


@dataclass
class SampleStats:
    prompts: int = 0
    samples: int = 0  # replies sampled (prompts x k)
    empty: int = 0  # replies with no text, left out of the ranking
    ties: int = 0  # prompts whose replies all scored the same (or fewer than 2 non-empty): no pair
    pairs: int = 0

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts x {self.samples // max(self.prompts, 1)} samples; "
                f"{self.ties} prompts without a pair (all replies scored alike), {self.empty} empty replies dropped")


def task_prompts(name: str, split: str, n: int, seed: int) -> list[PromptItem]:
    """``n`` questions of a built-in task with their answers, for the verifier."""
    return [PromptItem([{"role": "user", "content": ex.prompt}], ex.answer, f"task {name}/{split} #{i}")
            for i, ex in enumerate(get_task(name).examples(split, n, seed))]


def _prompt_item(record, where: str) -> PromptItem:
    if not isinstance(record, dict) or record.get("prompt") is None:
        raise BadRecord("no 'prompt' (each record needs a prompt: a string or a list of messages)")
    return PromptItem(prompt_messages(record["prompt"]), None, where)


def read_prompts(paths: list[str]) -> list[PromptItem]:
    """The ``prompt`` of every record of TRL-style JSONL files (prompt-only or preference records; other fields are
    ignored); a bad record stops with ``file:line: problem``."""
    return read_each(paths, _prompt_item, "prompts (expected JSON objects with a 'prompt')")


def verifier_scores(name: str):
    """A scorer for ``rank_replies``: 1.0 where the task's verifier accepts the reply, else 0.0."""
    task = get_task(name)
    return lambda item, replies: [float(task.score(r, item.answer)) for r in replies]


def rank_replies(item: PromptItem, replies: list[str], scores: list[float], stats: SampleStats) -> dict | None:
    """Best- vs worst-scored reply as one TRL record (``prompt`` a string when it is one user turn, else messages;
    ``score_chosen`` / ``score_rejected`` kept); None when fewer than two non-empty replies or all score alike."""
    kept = [(s, r) for r, s in zip(replies, scores) if r.strip()]
    stats.empty += len(replies) - len(kept)
    if len(kept) < 2:
        stats.ties += 1
        return None
    order = sorted(range(len(kept)), key=lambda i: -kept[i][0])  # stable: the earliest sample wins a tie
    (best, chosen), (worst, rejected) = kept[order[0]], kept[order[-1]]
    if best == worst or chosen.strip() == rejected.strip():
        stats.ties += 1
        return None
    stats.pairs += 1
    one_turn = len(item.prompt) == 1 and item.prompt[0]["role"] == "user"
    if one_turn:
        return {"prompt": item.prompt[0]["content"], "chosen": chosen, "rejected": rejected,
                "score_chosen": best, "score_rejected": worst}
    return {"prompt": item.prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "score_chosen": best, "score_rejected": worst}


def sample_preferences(items: list[PromptItem], k: int, sample, score) -> tuple[list[dict], SampleStats]:
    """``sample(prompts, k)`` -> k replies per prompt; ``score(item, replies)`` -> one number each (higher is
    better: a verifier's 0/1 or a reward model's r); each prompt gives at most one pair, best vs worst."""
    if k < 2:
        raise LlmlabError(f"--k {k}: a pair needs at least 2 samples per prompt (use --k 2 or more)")
    stats = SampleStats(prompts=len(items))
    replies = sample([it.prompt for it in items], k)
    records = []
    for item, rs in zip(items, replies):
        stats.samples += len(rs)
        record = rank_replies(item, rs, list(score(item, rs)), stats)
        if record is not None:
            records.append(record)
    return records, stats
