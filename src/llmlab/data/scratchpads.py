"""Exact step-by-step rationales for the built-in tasks: the tool-assisted teacher of ``llmlab data rationales``.

A small language model's own chains of thought on letter counting or multi-digit addition are mostly wrong,
so few survive Fine-tune-CoT's answer filter (Ho et al. 2022, arXiv:2212.10071). This teacher writes the
reasoning with a program instead: the intermediate steps as text (a scratchpad, Nye et al. 2021, "Show Your
Work: Scratchpads for Intermediate Computation with Language Models", arXiv:2112.00114), worked out exactly,
each step local enough that a small student can copy it token by token. Every rationale starts with
Zero-shot-CoT's trigger and ends with its answer-extraction phrase (Kojima et al. 2022, arXiv:2205.11916), as
the language-model teacher's do, so the two kinds of training data look alike:

===============  ============================================================================================
task             rationale (the answer follows "Therefore, the answer is")
===============  ============================================================================================
addition         column sums from the units up with the carry: "7 + 3 = 10, write 0, carry 1. ..."
reversal         the letters, then the same letters from last to first: "k, q, z -> z, q, k"
letter_count     every letter with a running count of the asked one: "r (1), b, t, r (2), e, a"
unit_conversion  the factor, then the product: "1 km = 1000 m, so 3.5 km = 3.5 x 1000 m = 3500 m"
===============  ============================================================================================

json_format has no reasoning to write down (the reply is the object); it has no tool rationale.
``scratchpad(task, prompt, answer)`` parses the question (the task generator's wording, ``data/tasks.py``)
and checks its own result against ``answer``, so a wording change fails loudly instead of teaching errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

from llmlab.common import LlmlabError
from llmlab.data.tasks import _CONVERSIONS, _number_text, get_task

COT_TRIGGER = "Let's think step by step."  # Kojima et al. 2022, stage 1 (reasoning extraction)
ANSWER_TRIGGER = "Therefore, the answer is"  # Kojima et al. 2022, stage 2 (answer extraction)


def _addition(prompt: str) -> tuple[str, str]:
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups()
    width = max(len(a), len(b))
    da, db = a.zfill(width)[::-1], b.zfill(width)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(width):
        x, y = int(da[i]), int(db[i])
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(s, 10)
        digits.append(str(digit))
        steps.append(f"{terms} = {s}, write {digit}" + (f", carry {carry}." if carry else "."))
    if carry:
        digits.append(str(carry))
        steps.append(f"Write the last carry {carry}.")
    total = "".join(reversed(digits))
    return f"Add {a} and {b} column by column from the right. " + " ".join(steps), total


def _reversal(prompt: str) -> tuple[str, str]:
    s = re.search(r'Reverse the string "([a-z]+)"', prompt).group(1)
    return (f'The letters of "{s}" are {", ".join(s)}. From last to first: {", ".join(reversed(s))}.', s[::-1])


def _letter_count(prompt: str) -> tuple[str, str]:
    letter, s = re.search(r'the letter "([a-z])" appear in "([a-z]+)"', prompt).groups()
    marks, n = [], 0
    for c in s:
        n += c == letter
        marks.append(f"{c} ({n})" if c == letter else c)
    return f'Go through "{s}" counting "{letter}": {", ".join(marks)}.', str(n)


def _unit_conversion(prompt: str) -> tuple[str, str]:
    value, src, dst = re.search(r"Convert ([\d.]+) (\S+) to (\S+)\.", prompt).groups()
    factor = next(f for a, b, f in _CONVERSIONS if (a, b) == (src, dst))
    result = _number_text(Decimal(value) * factor)
    return (f"1 {src} = {_number_text(factor)} {dst}, so {value} {src} = {value} x {_number_text(factor)} {dst} "
            f"= {result} {dst}.", result)


SCRATCHPADS: dict[str, Callable[[str], tuple[str, str]]] = {
    "addition": _addition, "reversal": _reversal, "letter_count": _letter_count, "unit_conversion": _unit_conversion}


def scratchpad(task: str, prompt: str, answer: str) -> str:
    """The exact rationale for one question of a built-in task: trigger, steps, "Therefore, the answer is X."."""
    get_task(task)
    if task not in SCRATCHPADS:
        raise LlmlabError(f"--teacher tool has no rationale writer for task {task!r} (it has one for "
                          f"{', '.join(SCRATCHPADS)}): use a model teacher")
    try:
        steps, result = SCRATCHPADS[task](prompt)
    except (AttributeError, StopIteration):  # no regex match / unknown unit pair
        raise LlmlabError(f"--teacher tool cannot read this {task} question: {prompt!r}") from None
    if not get_task(task).score(result, answer):
        raise LlmlabError(f"--teacher tool worked out {result!r} for {prompt!r}, the task says {answer!r}")
    return f"{COT_TRIGGER} {steps}\n{ANSWER_TRIGGER} {result}."
