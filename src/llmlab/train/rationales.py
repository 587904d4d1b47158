"""``llmlab data rationales``: distilling abilities through text. A teacher answers a built-in task's training
questions; its replies, as chat JSONL, are what ``llmlab sft`` fine-tunes a (smaller) student on. Two modes:

**cot**: Fine-tune-CoT (Ho, Schmid & Yun 2022, "Large Language Models Are Reasoning Teachers",
arXiv:2212.10071). For each question q with known answer a:

1. reasoning: the teacher's reply is started with Zero-shot-CoT's trigger "Let's think step by step." (Kojima
   et al. 2022, "Large Language Models are Zero-Shot Reasoners", arXiv:2205.11916) and continued by sampling, so
   the rationale r is the teacher's own. The task's answer-format instruction ("Reply with the number only.")
   is dropped from the teacher's question: it would ask for no reasoning;
2. diverse reasoning (Ho et al. section 3.2): ``--k`` rationales per question, sampled at ``--temperature``;
3. answer: "Therefore, the answer is" is appended after r and the teacher continues greedily (Kojima's
   answer extraction), to the end of the line: the prediction y;
4. filter: a sample is kept when the task's own scorer accepts y, score(y, a) (exact match after
   ``data/tasks.extract_answer``); duplicates of a kept (q, reply) are dropped;
5. the student's training pair is (q as the task asks it, zero-shot, "Let's think step by step. r\\nTherefore,
   the answer is y."), trained with the ordinary SFT loss: -sum_t log p_S(reply_t | q, reply_<t).

``--teacher tool`` replaces steps 1-3 by an exact rationale program (``data/scratchpads.py``): for tasks
where the small teacher's own reasoning rarely verifies (the counts are printed: "V of N*k rationales verify").

**icl**: in-context-learning distillation (context distillation: Snell, Klein & Zhong 2022, "Learning by
Distilling Context", arXiv:2209.15189; Huang et al. 2022, "In-context Learning Distillation", arXiv:2212.10670).
The teacher sees ``--shots`` demonstrations (other training questions with their exact answers, as earlier chat
turns) before q and answers greedily; the pair (q alone, the teacher's reply) teaches the student zero-shot what
the teacher does with the context in front of it: sequence-level distillation (Kim & Rush 2016,
arXiv:1606.07947), the teacher's argmax sequence standing in for its distribution. By default every reply is
kept (``--keep all``: the teacher's behaviour, right or wrong, an empty one included); ``--keep verified`` keeps
the correct ones.

The output (``--out``, written atomically) is JSONL in the ``messages`` format ``llmlab sft`` reads, one record
per kept reply: ``{"messages": [user q, assistant reply], "task", "answer", "verified", "teacher", "mode"}``.
With ``--student`` the student is loaded and must share the teacher's tokenizer (``train/distill.py``'s check):
the teacher's text is what the student is trained to produce token by token.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError, write_text_atomic
from llmlab.data.scratchpads import ANSWER_TRIGGER, COT_TRIGGER, scratchpad
from llmlab.data.tasks import Example, VerifiableTask, get_task
from llmlab.formats.load import Loaded, chat_template_of, load_model
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.sample import SamplingParams

MODES = ("cot", "icl")
KEEP = ("verified", "all")
TOOL = "tool"
_FORMAT_ONLY = re.compile(r"\s*Reply with [^.]*\bonly\.\s*$")  # the tasks' closing answer-format instruction


@dataclass
class RationalesConfig:
    task: str = field(default="letter_count", metadata={
        "help": "built-in verifiable task whose training questions the teacher answers"})
    mode: str = field(default="cot", metadata={
        "help": "cot: sampled chain-of-thought rationales, filtered by the verified answer (Fine-tune-CoT); icl: "
                "the teacher answers after --shots demonstrations, the student learns it zero-shot",
        "choices": MODES})
    teacher: str = field(default="smollm2-135m-instruct", metadata={
        "help": "teacher: an embedded name, a GGUF file, a Hugging Face folder, an sft run folder; or 'tool' (cot "
                "only): exact step-by-step rationales written by a program"})
    examples: int = field(default=32, metadata={"help": "training questions the teacher answers"})
    k: int = field(default=4, metadata={"help": "cot: rationales sampled per question (diverse reasoning)"})
    temperature: float = field(default=0.7, metadata={"help": "cot: sampling temperature of the rationales"})
    max_tokens: int = field(default=96, metadata={"help": "cot: new tokens per rationale; icl: per reply"})
    shots: int = field(default=4, metadata={"help": "icl: demonstrations before each question"})
    keep: str = field(default="auto", metadata={
        "help": "which replies become training records: verified (the answer checks out) or all; auto = "
                "verified for cot, all for icl", "choices": ("auto", *KEEP)})
    student: str = field(default="", metadata={
        "help": "the student the data is for (a model folder or preset); checked to share the teacher's "
                "tokenizer; empty = no check"})
    batch_size: int = field(default=16, metadata={"help": "sequences the teacher generates at once"})
    seed: int = field(default=0, metadata={"help": "seed of the question draw, the demonstrations and sampling"})
    out: str = field(default="data/rationales.jsonl", metadata={"help": "output JSONL (llmlab sft FILE reads it)"})

    def validate(self) -> RationalesConfig:
        if self.mode not in MODES:
            raise LlmlabError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        get_task(self.task)
        if self.keep not in ("auto", *KEEP):
            raise LlmlabError(f"--keep {self.keep!r}: use one of {', '.join(KEEP)}")
        for name in ("examples", "k", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.shots < 0:
            raise LlmlabError(f"--shots must be >= 0, got {self.shots}")
        if not self.temperature > 0:
            raise LlmlabError(f"--temperature must be > 0 (the k rationales are sampled), got {self.temperature}")
        if self.teacher == TOOL and self.mode != "cot":
            raise LlmlabError("--teacher tool writes chain-of-thought rationales: use it with --mode cot, or name a "
                              "model teacher for --mode icl")
        if self.teacher == TOOL and self.student:
            raise LlmlabError("--student checks the student's tokenizer against a model teacher's; --teacher tool "
                              "has no tokenizer: drop --student")
        return self

    @property
    def kept(self) -> str:
        return self.keep if self.keep != "auto" else ("verified" if self.mode == "cot" else "all")


def teacher_question(prompt: str) -> str:
    """The question without its answer-format instruction ("Reply with the number only."), for the CoT teacher."""
    return _FORMAT_ONLY.sub("", prompt)


def icl_messages(question: str, demos: list[Example]) -> list[dict[str, str]]:
    """The few-shot chat: each demonstration a (user, assistant) turn with its exact answer, then the question."""
    turns = [m for d in demos for m in d.messages()]
    return [*turns, {"role": "user", "content": question}]


def _replies(teacher: Loaded, prompts: list[list[int]], max_tokens: int, params: SamplingParams,
             batch_size: int, stop_strings: list[str] | None = None) -> list[str]:
    """The teacher's decoded continuations of ``prompts`` (ids), end-of-turn and stop strings cut off."""
    tok, stops = teacher.tokenizer, chat_stop_ids(teacher.config, teacher.tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        done = generate(teacher.model, prompts[i:i + batch_size], max_tokens, params, stop_ids=stops,
                        stop_strings=stop_strings, tokenizer=tok)
        out += [c.text if c.text is not None else tok.decode([t for t in c.ids if t not in stops],
                                                             skip_special=True) for c in done]
    return out


def cot_replies(teacher: Loaded, questions: list[Example], k: int, max_tokens: int, temperature: float, seed: int,
                batch_size: int) -> list[list[str]]:
    """Steps 1-3 of the module docstring: k replies per question, each "Let's think step by step. r\\nTherefore,
    the answer is y."; list (questions) of lists (k)."""
    template, tok = chat_template_of(teacher), teacher.tokenizer
    heads = [template.render([{"role": "user", "content": teacher_question(q.prompt)}], add_generation_prompt=True)
             + COT_TRIGGER for q in questions]
    prompts = [tok.encode(h) for h in heads]
    replies: list[list[str]] = [[] for _ in questions]
    for j in range(k):  # one seed per pass: a seeded row samples alike in any batch, so copies would repeat
        rationales = _replies(teacher, prompts, max_tokens, SamplingParams(temperature=temperature, seed=seed + j),
                              batch_size, stop_strings=[ANSWER_TRIGGER])  # a "Therefore..." of its own is redone
        tails = [f"{COT_TRIGGER} {r.strip()}\n{ANSWER_TRIGGER}" if r.strip() else f"{COT_TRIGGER}\n{ANSWER_TRIGGER}"
                 for r in rationales]
        answer_prompts = [tok.encode(h[: -len(COT_TRIGGER)] + t) for h, t in zip(heads, tails)]
        answers = _replies(teacher, answer_prompts, 16, SamplingParams(), batch_size, stop_strings=["\n"])
        for row, t, a in zip(replies, tails, answers):
            row.append(f"{t} {a.strip()}")
    return replies


def icl_replies(teacher: Loaded, questions: list[Example], pool: list[Example], shots: int,
                max_tokens: int, seed: int, batch_size: int) -> list[list[str]]:
    """The teacher's greedy reply to each question after ``shots`` demonstrations drawn from ``pool`` (a fixed
    draw per question index and seed); list of one-element lists."""
    template, tok = chat_template_of(teacher), teacher.tokenizer
    prompts = []
    for i, q in enumerate(questions):
        demos = random.Random(f"{seed}/{i}").sample(pool, shots)
        prompts.append(tok.encode(template.render(icl_messages(q.prompt, demos), add_generation_prompt=True)))
    return [[r.strip()] for r in _replies(teacher, prompts, max_tokens, SamplingParams(), batch_size)]


def records(task: VerifiableTask, questions: list[Example], replies: list[list[str]], keep: str, teacher: str,
            mode: str) -> tuple[list[dict], dict]:
    """Step 4: score every reply with the task, keep the verified ones (or all), drop duplicate (question, reply)
    pairs. Returns (records, counts: questions, replies, verified, questions_verified, kept)."""
    out, seen = [], set()
    counts = {"questions": len(questions), "replies": 0, "verified": 0, "questions_verified": 0, "kept": 0}
    for q, rs in zip(questions, replies):
        oks = [task.score(r, q.answer) for r in rs]
        counts["replies"] += len(rs)
        counts["verified"] += sum(oks)
        counts["questions_verified"] += any(oks)
        for r, ok in zip(rs, oks):
            if (keep == "all" or ok) and (q.prompt, r) not in seen:  # all: an empty reply (the turn ended) too
                seen.add((q.prompt, r))
                out.append({"messages": [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": r}],
                            "task": task.name, "answer": q.answer, "verified": ok, "teacher": teacher, "mode": mode})
    counts["kept"] = len(out)
    return out, counts


def check_student(cfg: RationalesConfig, teacher: Loaded) -> None:
    from llmlab.train.distill import check_same_tokenizer

    student = load_model(cfg.student)
    if not student.config.is_causal:
        raise LlmlabError(f"student {cfg.student}: the rationales train a causal language model")
    check_same_tokenizer(teacher, student)


def run_rationales(cfg: RationalesConfig) -> dict:
    """Draw the questions, let the teacher answer, filter, write the JSONL. Returns the counts (+ seconds, out)."""
    cfg.validate()
    t0 = time.perf_counter()
    task = get_task(cfg.task)
    n_pool = max(cfg.shots, 1) * 8 if cfg.mode == "icl" else 0
    drawn = task.examples("train", cfg.examples + n_pool, seed=cfg.seed)  # the first n are the questions
    questions, pool = drawn[:cfg.examples], drawn[cfg.examples:]
    if cfg.teacher == TOOL:
        replies = [[scratchpad(cfg.task, q.prompt, q.answer)] for q in questions]
    else:
        teacher = load_model(cfg.teacher)
        if not teacher.config.is_causal or teacher.tokenizer is None:
            raise LlmlabError(f"teacher {cfg.teacher}: a causal language model with a tokenizer is needed")
        if cfg.student:
            check_student(cfg, teacher)
        teacher.model.eval()
        with torch.no_grad():
            if cfg.mode == "cot":
                replies = cot_replies(teacher, questions, cfg.k, cfg.max_tokens, cfg.temperature, cfg.seed,
                                      cfg.batch_size)
            else:
                replies = icl_replies(teacher, questions, pool, cfg.shots, cfg.max_tokens, cfg.seed,
                                      cfg.batch_size)
    rows, counts = records(task, questions, replies, cfg.kept, cfg.teacher, cfg.mode)
    if not rows:
        raise LlmlabError(f"none of the teacher's {counts['replies']} replies verified on {cfg.task}: nothing to "
                          "train on; raise --k or --examples, use --keep all, or --teacher tool")
    write_text_atomic(Path(cfg.out), "".join(json.dumps(r) + "\n" for r in rows))
    return {**counts, "keep": cfg.kept, "seconds": time.perf_counter() - t0, "out": cfg.out}
