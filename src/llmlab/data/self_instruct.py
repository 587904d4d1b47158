"""Self-Instruct / Alpaca: instruction-following data written by a model from a few seed tasks.

Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated Instructions" (arXiv:2212.10560),
bootstraps a task pool: each prompt shows a few tasks of the pool, the model writes new ones, and a new task
joins the pool only if it passes heuristic filters and is novel, its instruction's ROUGE-L F1 (Lin 2004) with
every instruction already in the pool below 0.7 (section 2.3):

    keep(t)  iff  max_{p in pool} ROUGE-L(t, p) < 0.7,   ROUGE-L = 2 P R / (P + R),  P = LCS/|t|, R = LCS/|p|

Stanford Alpaca (Taori et al. 2023) writes instruction, input and output in one completion; this module does the
same (``encode_prompt``: a header, ``num_prompt_instructions`` numbered demonstrations separated by ``###``,
an Input field only where the task has an input, then ``N. Instruction:`` for the model to continue;
``parse_response`` reads back every complete task).

**Cost.** On a CPU the decode steps are the cost (a 135M model: ~85% of the CPU time), so the loop spends them
only on tasks that can pass: by default (``one_task``) a completion ends at the first ``###`` token it writes
(``section_stop_ids``), so it holds one task, never one cut by the token budget, and later tasks never drift
into repeating earlier ones (what Alpaca's 20-tasks-per-completion form does on a small model); each prompt is
sampled ``samples`` times (the engine's ``n``: the prompt's prefill is computed once for all of them, and the
samples differ by temperature sampling, as Alpaca's tasks of one prompt share its demonstrations).

**Seed tasks** are Self-Instruct's format, one JSON object per line: ``{"id", "name", "instruction",
"instances": [{"input", "output"}], "is_classification"}`` (``instruction`` and the first instance's ``output``
non-empty strings, ``input`` a string, possibly empty); ``self_instruct_seeds.jsonl`` beside this file holds
36 written for this project. Demonstrations are drawn from the seeds and, once there are some, from the
generated tasks (Self-Instruct: 6 human + 2 machine of 8; here 2 seeds + 1 generated of 3 by default).

**Filters**, in this order; a candidate is counted under the first one that rejects it (``FILTERS``):

- ``unparsable``: a ``###`` section that is not numbered Instruction, Input, Output fields (Input may be missing),
  or the last section of a completion cut by the token budget (``finish_reason == "length"``; the end-of-turn ids
  are banned, as Alpaca bans <|endoftext|>, so a completion ends at ``###`` or the budget); a section is also
  split before an ``N. Instruction:`` that follows a whole task (the model skipped the ``###``), never
  otherwise;
- instruction heuristics (section 2.3 and the authors' ``bootstrap_instructions.py``, Alpaca's
  ``generate_instruction.py``): ``too_short`` (<= 3 words), ``too_long`` (> 150 words), ``blacklist`` (a word
  a text model cannot act on: image, graph, picture, file, map, draw, plot, go to, video, audio, music,
  flowchart, diagram and their plurals), ``write_a_program`` (starts with "Write a program"),
  ``punctuation`` (starts with a punctuation mark), ``non_ascii`` (starts with a non-ASCII character);
- instance heuristics (the authors' ``prepare_for_finetuning.py``): ``empty_output``, ``input_is_output``
  (input equal to output), ``ends_with_colon`` (input or output ends with ":", an unfinished generation);
- ``duplicate``: the same instruction (whitespace and case folded) already in the pool;
- ``rouge``: not novel by the rule above.

**Fast novelty check.** ROUGE-L F1 is bounded by the bag-of-words overlap: the LCS is a common multiset of words,
so LCS <= |bag(t) & bag(p)| = o, and F = 2 LCS / (|t| + |p|) <= 2 o / (|t| + |p|). A pool entry whose bound is
already below the threshold needs no LCS; only the rest are run through the dynamic program. The decision is
exactly rouge-score's (``tests/test_self_instruct.py``), at a fraction of the LCS work.

Output: one Alpaca record per line, ``{"instruction", "input", "output"}``, which ``llmlab sft`` reads (its
``alpaca`` format), written atomically once the run ends; ``SelfInstructStats`` counts candidates per filter.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from llmlab.common import LlmlabError, atomic_path, read_jsonl_objects
from llmlab.text.rouge import f_measure, lcs_length, rouge_tokens

SEEDS = Path(__file__).with_name("self_instruct_seeds.jsonl")
MAX_SAMPLES = 64  # the engine's max_num_seqs in the data commands (cli: _text_completer)
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST = re.compile(r"\b(" + "|".join(map(re.escape, BLACKLIST)) + r")\b", re.IGNORECASE)
FILTERS = ("unparsable", "too_short", "too_long", "blacklist", "write_a_program", "punctuation", "non_ascii",
           "empty_output", "input_is_output", "ends_with_colon", "duplicate", "rouge")
HEADER = ("You are asked to come up with a set of diverse task instructions for a language model. Each task has "
          "an instruction, an optional input (<noinput> when there is none) and the output a good assistant "
          "would give. Vary the verbs and the kinds of tasks: questions, rewriting, classification, "
          "brainstorming, coding, math. Keep every instruction to one or two sentences.\n\n")


class Task(NamedTuple):
    instruction: str
    input: str
    output: str

    def record(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


# ---- seed tasks ----------------------------------------------------------------------------------------------

def _seed_problem(row: dict) -> str | None:
    if not isinstance(row["instruction"], str) or not row["instruction"].strip():
        return "'instruction' is not a non-empty string"
    inst = row["instances"]
    if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
        return "'instances' is not a non-empty list of {input, output} objects"
    if not isinstance(inst[0].get("input", ""), str):
        return "'instances[0].input' is not a string (use \"\" for none)"
    if not isinstance(inst[0].get("output"), str) or not inst[0]["output"].strip():
        return "'instances[0].output' is missing or empty"
    return None


def read_seed_tasks(path: str | Path | None = None) -> list[Task]:
    """Self-Instruct seed tasks (one JSON object per line) -> Tasks (the first instance of each); a bad line is a
    one-line LlmlabError naming ``path:line``."""
    path = str(path) if path is not None else str(SEEDS)
    tasks = []
    for n, row in read_jsonl_objects(path, ("instruction", "instances")):
        problem = _seed_problem(row)
        if problem:
            raise LlmlabError(f"{path}:{n}: {problem}; a seed task is {{\"instruction\", \"instances\": "
                              "[{\"input\", \"output\"}]}")
        first = row["instances"][0]
        tasks.append(Task(" ".join(row["instruction"].split()), first.get("input", "").strip(),
                          first["output"].strip()))
    return tasks


# ---- prompt and parsing --------------------------------------------------------------------------------------

def encode_prompt(demos: list[Task]) -> str:
    """Alpaca's prompt: the header, each demonstration numbered between ``###`` lines, then the next number."""
    out = [HEADER]
    for i, t in enumerate(demos, 1):
        inp = f"{i}. Input:\n{t.input}\n" if t.input else ""
        out.append(f"###\n{i}. Instruction: {t.instruction.rstrip(':')}\n{inp}{i}. Output:\n{t.output}\n")
    out.append(f"###\n{len(demos) + 1}. Instruction:")
    return "".join(out)


_FIELD = re.compile(r"(?:^|\n)\s*\d+\s*\.\s*(Instruction|Input|Output)\s*:")
SECTION = "###"


def section_stop_ids(tokenizer) -> set[int]:
    """The ids of every token whose text contains ``###`` (SmolLM2: ``###``, `` ###``, ``####``, ...): as stop
    ids they end a completion where its first task ends (``one_task``)."""
    return {i for i in range(tokenizer.vocab_size) if SECTION in tokenizer.decode([i])}


def _fields(section: str) -> tuple[str, list[str], list[str]]:
    """A section -> (text before its first numbered field, field names, stripped values)."""
    parts = _FIELD.split(section)  # [before, name, value, name, value, ...]
    return parts[0], parts[1::2], [v.strip() for v in parts[2::2]]


def _tasks_in(section: str) -> list[str]:
    """A ``###`` section split before each Instruction field that follows a whole task (Instruction ...
    Output, nothing before it): a small model often starts the next task without writing ``###`` (``...5.
    Output: 10\n6. Instruction: ...``). Anything else stays one section, parsed or rejected as a whole."""
    pieces, start = [], 0
    for m in _FIELD.finditer(section):
        if m.group(1) == "Instruction" and m.start() > start:
            before, names, _ = _fields(section[start:m.start()])
            if not before.strip() and names[:1] == ["Instruction"] and "Output" in names:
                pieces.append(section[start:m.start()])
                start = m.start()
    return [*pieces, section[start:]]


def parse_response(text: str, n_demos: int, cut: bool) -> tuple[list[Task], int]:
    """The tasks a completion of ``encode_prompt`` wrote -> (tasks, sections that did not parse). Sections are
    split at ``###`` and before each further ``N. Instruction:`` (``_tasks_in``); one parses when its numbered
    fields are Instruction, Input, Output in that order, or Instruction, Output (no input: small models often
    skip ``<noinput>``), whatever the numbers. ``cut``: the completion ended at the token budget, so its last
    section is unfinished and dropped (counted)."""
    sections = [t for s in f"{n_demos + 1}. Instruction:{text}".split(SECTION) if s.strip() for t in _tasks_in(s)]
    tasks, bad = [], 0
    for k, section in enumerate(sections):
        if k == len(sections) - 1 and cut:
            bad += 1
            continue
        before, names, values = _fields(section)
        if before.strip() or names not in (["Instruction", "Input", "Output"], ["Instruction", "Output"]):
            bad += 1
            continue
        inp = values[1] if len(values) == 3 else ""
        tasks.append(Task(" ".join(values[0].split()), "" if inp.lower() == "<noinput>" else inp, values[-1]))
    return tasks, bad


# ---- filters -------------------------------------------------------------------------------------------------

def instruction_filter(instruction: str) -> str | None:
    """The name of the first instruction heuristic that rejects it, or None."""
    words = len(instruction.split())
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if _BLACKLIST.search(instruction):
        return "blacklist"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "punctuation"
    if not instruction[0].isascii():
        return "non_ascii"
    return None


def instance_filter(task: Task) -> str | None:
    """The name of the first instance heuristic that rejects the input / output, or None."""
    if not task.output:
        return "empty_output"
    if task.input == task.output:
        return "input_is_output"
    if task.input.endswith(":") or task.output.endswith(":"):
        return "ends_with_colon"
    return None


def _key(instruction: str) -> str:
    return " ".join(instruction.lower().split())


class NoveltyPool:
    """Instructions kept so far, for the ROUGE-L novelty rule (module docstring: bound first, LCS only if
    needed). ``lcs_runs`` counts the dynamic programs run, ``comparisons`` the pairs considered."""

    def __init__(self, instructions: list[str] = (), threshold: float = 0.7):
        self.threshold = threshold
        self.entries: list[tuple[list[str], Counter]] = []
        self.keys: set[str] = set()
        self.comparisons = self.lcs_runs = 0
        for inst in instructions:
            self.add(inst)

    def add(self, instruction: str) -> None:
        toks = rouge_tokens(instruction)
        self.entries.append((toks, Counter(toks)))
        self.keys.add(_key(instruction))

    def max_rouge(self, instruction: str, stop_at: float | None = None) -> float:
        """The largest ROUGE-L F1 with a pool entry, exact as far as it decides ``max >= stop_at`` (default: the
        threshold): entries whose bound is below ``stop_at`` or the best so far are skipped, and the scan stops
        once ``stop_at`` is reached. ``stop_at=0`` gives the exact maximum."""
        stop_at = self.threshold if stop_at is None else stop_at
        toks = rouge_tokens(instruction)
        bag, best = Counter(toks), 0.0
        for ptoks, pbag in self.entries:
            self.comparisons += 1
            if not toks or not ptoks:
                continue
            bound = f_measure(sum((bag & pbag).values()), len(toks), len(ptoks))
            if bound <= best or bound < stop_at:
                continue
            self.lcs_runs += 1
            best = max(best, f_measure(lcs_length(ptoks, toks), len(toks), len(ptoks)))
            if 0 < stop_at <= best:
                break
        return best

    def is_novel(self, instruction: str) -> bool:
        return self.max_rouge(instruction) < self.threshold


# ---- the loop ------------------------------------------------------------------------------------------------

class Completer(Protocol):
    """What the loop needs from a model (``serve/offline.py``'s ``TextCompleter`` over the engine)."""

    pending: int
    generating: int  # samples not finished yet (pending requests x n, less those done)

    def submit(self, text: str, n: int = 1, seed: int | None = None) -> int: ...

    def step(self) -> list: ...  # finished ``Completion``s: .handle, .texts, .finish_reasons, .tokens


@dataclass
class SelfInstructConfig:
    seeds: str = field(default="", metadata={
        "help": "Self-Instruct seed tasks: JSONL of {id, name, instruction, instances, is_classification}"})
    out: str = field(default="self_instruct.jsonl", metadata={
        "help": "output JSONL of {instruction, input, output} records, which llmlab sft reads"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "the model that writes the tasks"})
    examples: int = field(default=200, metadata={"help": "stop after this many kept examples"})
    max_minutes: float = field(default=15.0, metadata={"help": "stop after this many minutes even if short"})
    max_prompts: int = field(default=0, metadata={
        "help": "stop after this many prompts even if short; 0 = no limit"})
    num_prompt_instructions: int = field(default=3, metadata={"help": "demonstrations per prompt"})
    machine_demos: int = field(default=1, metadata={
        "help": "of the demonstrations, how many come from generated tasks once there are some"})
    samples: int = field(default=4, metadata={
        "help": "completions sampled from each prompt (the engine's n: they share its KV blocks, so its prefill "
                "is paid once)"})
    in_flight: int = field(default=32, metadata={
        "help": "completions generating at once (the engine's batch; a prompt's --samples count until each "
                "ends)"})
    max_new_tokens: int = field(default=128, metadata={
        "help": "token budget of each completion (a task: median 34 tokens, 9 in 10 under 70, SmolLM2-135M)"})
    one_task: bool = field(default=True, metadata={
        "help": "end each completion at the first '###' it writes: one task per completion, none cut by the "
                "budget (--no-one-task: Alpaca's many tasks per completion, run to the budget)"})
    temperature: float = field(default=0.7, metadata={
        "help": "sampling temperature (Self-Instruct's 0.7; Alpaca's 1.0 derails a 135M model)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    rouge_threshold: float = field(default=0.7, metadata={
        "help": "keep an instruction only if its ROUGE-L with every pool instruction is below this"})
    seed: int = field(default=0, metadata={"help": "seed for demonstration sampling and generation"})
    force: bool = field(default=False, metadata={"help": "overwrite an existing --out"})

    def validate(self) -> SelfInstructConfig:
        if self.max_prompts < 0:
            raise LlmlabError(f"--max-prompts must be >= 0, got {self.max_prompts}")
        for name in ("examples", "num_prompt_instructions", "samples", "in_flight", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.samples > MAX_SAMPLES:
            raise LlmlabError(f"--samples must be at most {MAX_SAMPLES} (the engine's sequences), got {self.samples}")
        if not 0 <= self.machine_demos < self.num_prompt_instructions:
            raise LlmlabError(f"--machine-demos must be in [0, --num-prompt-instructions), got {self.machine_demos}")
        if not 0 < self.rouge_threshold <= 1:
            raise LlmlabError(f"--rouge-threshold must be in (0, 1], got {self.rouge_threshold}")
        if self.max_minutes <= 0:
            raise LlmlabError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if Path(self.out).exists() and not self.force:
            raise LlmlabError(f"{self.out} already exists: pass --force to overwrite it, or --out elsewhere")
        return self


@dataclass
class SelfInstructStats:
    prompts: int = 0  # prompts whose completions were read
    completions: int = 0  # completions read (prompts x samples)
    tokens: int = 0  # tokens generated
    candidates: int = 0  # sections seen (parsed or not)
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): the cost on a machine shared with others
    stopped: str = ""  # "examples" | "time" | "prompts"

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.rejected.items() if v)
        return (f"{self.kept} kept of {self.candidates} candidates from {self.completions} completions of "
                f"{self.prompts} prompts "
                f"({self.tokens} tokens) in {self.seconds:.0f} s ({self.cpu_seconds:.0f} CPU s); "
                f"rejected: {counts or 'none'}")


def judge(task: Task, pool: NoveltyPool) -> str | None:
    """The filter that rejects a parsed task (``FILTERS`` order after ``unparsable``), or None to keep it."""
    reason = instruction_filter(task.instruction) or instance_filter(task)
    if reason:
        return reason
    if _key(task.instruction) in pool.keys:
        return "duplicate"
    return None if pool.is_novel(task.instruction) else "rouge"


def self_instruct(cfg: SelfInstructConfig, completer: Completer, seeds: list[Task],
                  on_update: Callable[[int, SelfInstructStats], None] | None = None
                  ) -> tuple[list[Task], SelfInstructStats]:
    """Keep ``cfg.in_flight`` completions generating (``cfg.samples`` per prompt); as a prompt's completions
    end, parse, filter and pool their tasks and submit a fresh prompt built from the current pool; stop at
    ``cfg.examples`` kept, ``cfg.max_minutes`` or ``cfg.max_prompts`` prompts. ``on_update(kept, stats)`` runs
    after each prompt (a progress bar)."""
    if len(seeds) < cfg.num_prompt_instructions:
        raise LlmlabError(f"{len(seeds)} seed tasks for --num-prompt-instructions {cfg.num_prompt_instructions}: "
                          "give more seed tasks or lower it")
    rng = random.Random(f"self-instruct/{cfg.seed}")
    pool = NoveltyPool([t.instruction for t in seeds], cfg.rouge_threshold)
    kept: list[Task] = []
    stats = SelfInstructStats()
    n_demo = cfg.num_prompt_instructions
    start, cpu0 = time.perf_counter(), time.process_time()
    deadline = start + 60 * cfg.max_minutes
    budget = cfg.max_prompts or float("inf")
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        submitted += 1
        machine = rng.sample(kept, min(cfg.machine_demos, len(kept)))
        demos = machine + rng.sample(seeds, n_demo - len(machine))
        rng.shuffle(demos)
        completer.submit(encode_prompt(demos), cfg.samples, rng.randrange(2**31))

    while len(kept) < cfg.examples and time.perf_counter() < deadline and stats.prompts < budget:
        while completer.generating < cfg.in_flight and submitted < budget:
            submit()
        for c in completer.step():
            stats.prompts += 1
            stats.tokens += c.tokens
            for text, reason in zip(c.texts, c.finish_reasons):
                stats.completions += 1
                tasks, bad = parse_response(text, n_demo, reason == "length")
                stats.candidates += len(tasks) + bad
                stats.rejected["unparsable"] += bad
                for task in tasks:
                    why = judge(task, pool)
                    if why:
                        stats.rejected[why] += 1
                    elif len(kept) < cfg.examples:
                        kept.append(task)
                        pool.add(task.instruction)
            if on_update:
                on_update(len(kept), stats)
    stats.kept = len(kept)
    stats.stopped = ("examples" if len(kept) >= cfg.examples else "prompts" if stats.prompts >= budget else "time")
    stats.seconds, stats.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu0
    return kept, stats


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, written atomically (the old file or the new one, never half)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
