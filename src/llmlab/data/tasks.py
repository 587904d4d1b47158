"""Built-in verifiable tasks: questions generated locally, each with one exact answer and a scorer.

Fine-tuning, alignment, compression and evaluation all need data whose answers can be checked without
a judge model or a download. Each ``VerifiableTask`` is a generator (a seeded ``random.Random`` -> a
question and its answer) plus an exact-match scorer; the registry ``TASKS`` holds the built-in ones:

=================  ==========================================================  ================
name               question (user message)                                     answer
=================  ==========================================================  ================
addition           What is 482 + 1937? ...                                     2419
reversal           Reverse the string "kqzmt". ...                             tmzqk
letter_count       How many times does the letter "r" appear in "rbtrea"? ...  2
unit_conversion    Convert 3.5 km to m. ...                                    3500
json_format        Write a JSON object with exactly these keys: ... ...        {"city": "Lima", "year": 1987}
=================  ==========================================================  ================

Splits. An example belongs to ``train`` or ``heldout`` by a hash of its question text (SHA-256, 20% held
out), fixed for all time: no seed, process or Python version moves a question from one split to the
other, so held-out questions never appear in any training sample. ``examples(split, n, seed)`` draws ``n``
distinct questions of that split; the seed only chooses which.

Scoring (``VerifiableTask.score(prediction, answer)``) extracts the reply's final answer, then compares it
exactly. Extraction (``extract_answer``), the same for every task:

1. if the reply contains "answer:", "answer is" or "answer is:" (any case), keep the text after the last one;
2. keep its first non-empty line;
3. strip whitespace, then surrounding Markdown bold/code marks (``**``, backticks) and quotes, then one
   trailing period.

Then numbers (addition, letter_count, unit_conversion) are compared as exact decimals after dropping one
trailing word (a unit: "3500 m" = "3500", "2 times" = "2") and thousands commas ("2,419" = "2419");
"3500.0" = "3500". Strings (reversal) are compared exactly, case included. JSON (json_format) is read from
the whole reply (a ```json fence or the first "{" to the last "}"), must parse to an object, and must have
exactly the answer's keys with equal values of the same JSON type (1 is not "1" and not true).

Shapes: ``examples`` -> list of ``Example(prompt, answer)`` (a NamedTuple of two strings); ``score`` ->
bool; ``Example.messages()`` -> the chat (user, assistant) pair for the model's chat template.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from llmlab.common import LlmlabError

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20


class Example(NamedTuple):
    prompt: str  # the user message
    answer: str  # the exact answer, as a model should reply

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class VerifiableTask:
    """A question generator with exact answers and a scorer (see the module docstring).

    ``make(rng)`` returns (prompt, answer); ``scorer(prediction, answer)`` decides exact match.
    """

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    scorer: Callable[[str, str], bool]

    def split_of(self, prompt: str) -> str:
        """'heldout' for 20% of questions chosen by a hash of the text, 'train' for the rest."""
        digest = hashlib.sha256(f"{self.name}\n{prompt}".encode()).digest()
        return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT else "train"

    def examples(self, split: str = "train", n: int = 100, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split``, the same list for the same (split, n, seed)."""
        if split not in SPLITS:
            raise LlmlabError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if n < 0:
            raise LlmlabError(f"number of examples must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{split}/{seed}")  # str seeds hash with SHA-512: stable everywhere
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            prompt, answer = self.make(rng)
            if prompt not in seen and self.split_of(prompt) == split:
                seen.add(prompt)
                out.append(Example(prompt, answer))
        if len(out) < n:
            raise LlmlabError(f"task {self.name}: found only {len(out)} distinct {split} examples, {n} asked")
        return out

    def score(self, prediction: str, answer: str) -> bool:
        return self.scorer(prediction, answer)

    def accuracy(self, predictions: Sequence[str], answers: Sequence[str]) -> float:
        """Fraction of exact matches (0.0 for no examples)."""
        if len(predictions) != len(answers):
            raise LlmlabError(f"{len(predictions)} predictions for {len(answers)} answers")
        return sum(map(self.score, predictions, answers)) / len(answers) if answers else 0.0


# ---- answer extraction and comparison ------------------------------------------------------------------

_MARKER = re.compile(r"answer\s*(?::|is\b\s*:?)", re.IGNORECASE)
_WRAPPERS = ("**", "`", '"', "'")


def extract_answer(text: str) -> str:
    """The final answer in a reply (rules 1-3 of the module docstring)."""
    marks = list(_MARKER.finditer(text))
    if marks:
        text = text[marks[-1].end():]
    text = next((line for line in text.splitlines() if line.strip()), "").strip()
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if len(text) >= 2 * len(w) and text.startswith(w) and text.endswith(w):
                text, changed = text[len(w):-len(w)].strip(), True
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[-+]?\.\d+")


def parse_number(text: str) -> Decimal | None:
    """An exact decimal from an extracted answer ("2,419", "3500 m", "-0.5"), or None."""
    text = re.sub(r"\s+[A-Za-z]+\.?$", "", text.strip())  # one trailing unit word
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def score_number(prediction: str, answer: str) -> bool:
    got = parse_number(extract_answer(prediction))
    return got is not None and got == Decimal(answer)


def score_string(prediction: str, answer: str) -> bool:
    return extract_answer(prediction) == answer


def _json_object(text: str) -> dict | None:
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _same_json(a, b) -> bool:
    """Equal values of the same JSON type (Python's 1 == True == 1.0 would blur bool and number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    return type(a) is type(b) and a == b


def score_json(prediction: str, answer: str) -> bool:
    got = _json_object(prediction)
    return got is not None and _same_json(got, json.loads(answer))


# ---- the built-in tasks --------------------------------------------------------------------------------

_NUMBER_ONLY = "Reply with the number only."


def _number_text(d: Decimal) -> str:
    """Plain decimal text without exponent or trailing zeros: 3.5E+3 -> '3500', 0.0350 -> '0.035'."""
    s = format(d.normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def addition_task(min_digits: int = 2, max_digits: int = 4) -> VerifiableTask:
    def make(rng: random.Random) -> tuple[str, str]:
        a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1)
                for d in (rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)))
        return f"What is {a} + {b}? {_NUMBER_ONLY}", str(a + b)

    return VerifiableTask("addition", f"add two integers of {min_digits} to {max_digits} digits", make, score_number)


def reversal_task(min_len: int = 4, max_len: int = 8) -> VerifiableTask:
    def make(rng: random.Random) -> tuple[str, str]:
        s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(min_len, max_len)))
        return f'Reverse the string "{s}". Reply with the reversed string only.', s[::-1]

    return VerifiableTask("reversal", f"reverse a string of {min_len} to {max_len} random letters", make,
                          score_string)


def letter_count_task(min_len: int = 6, max_len: int = 12) -> VerifiableTask:
    def make(rng: random.Random) -> tuple[str, str]:
        # a small alphabet so that letters repeat; the asked letter is usually present (counts 0..4 or so)
        s = "".join(rng.choices("abcdefghijklmnoprstu", k=rng.randint(min_len, max_len)))
        letter = rng.choice(s) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        return f'How many times does the letter "{letter}" appear in "{s}"? {_NUMBER_ONLY}', str(s.count(letter))

    return VerifiableTask("letter_count", "count one letter in a random string", make, score_number)


# (from, to, factor): powers of ten both ways are exact in decimal; time units only multiply.
_CONVERSIONS = [
    ("km", "m", Decimal(1000)), ("m", "km", Decimal("0.001")), ("m", "cm", Decimal(100)),
    ("cm", "m", Decimal("0.01")), ("cm", "mm", Decimal(10)), ("mm", "cm", Decimal("0.1")),
    ("kg", "g", Decimal(1000)), ("g", "kg", Decimal("0.001")), ("g", "mg", Decimal(1000)),
    ("L", "mL", Decimal(1000)), ("mL", "L", Decimal("0.001")),
    ("hours", "minutes", Decimal(60)), ("minutes", "seconds", Decimal(60)), ("days", "hours", Decimal(24)),
]


def unit_conversion_task() -> VerifiableTask:
    def make(rng: random.Random) -> tuple[str, str]:
        src, dst, factor = rng.choice(_CONVERSIONS)
        value = Decimal(rng.randint(1, 999)) if rng.random() < 0.6 else Decimal(rng.randint(1, 999)) / 10
        return f"Convert {_number_text(value)} {src} to {dst}. {_NUMBER_ONLY}", _number_text(value * factor)

    return VerifiableTask("unit_conversion", "convert a quantity between metric or time units", make, score_number)


_FIELDS: dict[str, Callable[[random.Random], object]] = {
    "name": lambda r: r.choice(["Alice", "Bob", "Chen", "Dara", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Juno"]),
    "city": lambda r: r.choice(["Lima", "Oslo", "Cairo", "Hanoi", "Quito", "Perth", "Dakar", "Porto", "Riga"]),
    "color": lambda r: r.choice(["red", "teal", "amber", "violet", "olive", "navy", "coral", "white"]),
    "animal": lambda r: r.choice(["otter", "heron", "lynx", "gecko", "bison", "koala", "raven", "tapir"]),
    "age": lambda r: r.randint(18, 90),
    "year": lambda r: r.randint(1900, 2030),
    "count": lambda r: r.randint(0, 999),
    "active": lambda r: r.random() < 0.5,
}


def json_format_task(min_keys: int = 2, max_keys: int = 4) -> VerifiableTask:
    def make(rng: random.Random) -> tuple[str, str]:
        keys = rng.sample(sorted(_FIELDS), rng.randint(min_keys, max_keys))
        obj = {k: _FIELDS[k](rng) for k in keys}
        spec = ", ".join(f'"{k}" set to {json.dumps(v)}' for k, v in obj.items())
        prompt = f"Write a JSON object with exactly these keys: {spec}. Reply with the JSON object only."
        return prompt, json.dumps(obj)

    return VerifiableTask("json_format", "answer as a JSON object with given keys and values", make, score_json)


TASKS: dict[str, VerifiableTask] = {}


def register_task(task: VerifiableTask) -> VerifiableTask:
    if task.name in TASKS:
        raise LlmlabError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> VerifiableTask:
    if name not in TASKS:
        raise LlmlabError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


for _task in (addition_task(), reversal_task(), letter_count_task(), unit_conversion_task(), json_format_task()):
    register_task(_task)
