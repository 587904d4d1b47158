"""Hallucinated continuations of a distilled student, measured against its teacher and against the text.

MiniLLM (Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", 2023,
arXiv:2306.08543, section 2.1 and its figure 2) argues that forward KL, KL(p || q_theta) (Hinton's KD), makes a
small student q_theta cover every mode of the teacher p, so it puts "unreasonable probabilities" on the void
regions of p, and free-running generation then samples text the teacher would never write; reverse KL,
KL(q_theta || p), is zero-forcing and keeps the student inside the teacher's support. Two measures of that
failure, on the same continuations: the student continues each prompt (a window of held-out text) for G tokens,
by sampling at temperature 1 (several seeds) and greedily.

(a) **Teacher-unsupported tokens**: the share of continuation tokens the teacher gives probability below
    epsilon (1e-3 by default) in the student's context,

        U = 1/N  sum_{n, t} 1[ p_T(y_t^n | x^n, y_<t^n) < epsilon ],   N = sum_n |y^n|,

    tokens the teacher would essentially never write there (the "void region" of p). Beside it the mean teacher
    surprisal  -1/N sum log p_T(y_t^n | ...), a Monte-Carlo estimate of the cross-entropy H(q_theta, p) =
    KL(q_theta || p) + H(q_theta) over the student's own continuations.

(b) **Ungrounded names**: in the decoded continuation, the identifiers and numbers (``NAME``) that appear neither
    in the prompt, nor in the reference continuation (the text's true next G tokens), nor among Python's keywords,
    builtins, ``self`` and ``cls``, as a share of all the names the continuation writes. A name continuing the
    prompt's last word counts as the whole word; a name the token budget cut off (touching the end of the text) is
    not counted.

Shapes: prompts (B, P) int64; continuations (B, G); teacher hidden states (B, P + G, D) -> the G rows that
predicted each continuation token -> surprisals (B, G).
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
import statistics
from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError
from llmlab.infer.generate import generate
from llmlab.infer.lingua import surprisals
from llmlab.infer.sample import SamplingParams

EPSILON = 1e-3  # a token the teacher gives less than this is one it would essentially never write
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]+)?")
LANGUAGE = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"self", "cls"}  # never hallucinated


def unsupported_share(teacher_logprobs: torch.Tensor, epsilon: float = EPSILON) -> float:
    """U: the share of tokens whose teacher log-probability is below log(epsilon); teacher_logprobs (N,)."""
    if not 0 < epsilon < 1:
        raise LlmlabError(f"--epsilon {epsilon}: give a probability in (0, 1), e.g. 1e-3")
    if teacher_logprobs.numel() == 0:
        raise LlmlabError("no continuation tokens to score: give at least one prompt and --gen-tokens >= 1")
    return float((teacher_logprobs < math.log(epsilon)).float().mean())


@torch.inference_mode()
def teacher_logprobs(teacher, prompts: torch.Tensor, continuations: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """log p_T(y_t | x, y_<t) of every continuation token, (B, G), from one teacher forward per ``batch`` rows
    over prompt + continuation (B, P + G); the output head runs on the G predicting rows only."""
    B, P = prompts.shape
    G = continuations.shape[1]
    device = next(teacher.parameters()).device
    out = []
    for s in range(0, B, batch):
        x = torch.cat([prompts[s:s + batch], continuations[s:s + batch]], dim=1).to(device)  # (b, P + G)
        targets = x[:, P:].reshape(-1).tolist()  # (b G,)
        if hasattr(teacher, "lm_head"):
            rows = teacher(x, return_hidden=True)[:, P - 1:P + G - 1]  # (b, G, D)
            head = teacher.lm_head
        else:
            rows, head = teacher(x)[:, P - 1:P + G - 1], None  # (b, G, V)
        out.append(-surprisals(head, rows.reshape(-1, rows.shape[-1]), targets).view(-1, G))
    return torch.cat(out).cpu()  # (B, G)


def names(text: str, start: int = 0) -> list[str]:
    """The names of ``text`` that contain a character at or after ``start`` and end before the text does."""
    return [m.group() for m in NAME.finditer(text) if m.end() > start and m.end() < len(text)]


def ungrounded(prompt: str, continuation: str, reference: str) -> tuple[int, int]:
    """(ungrounded names, names) the continuation writes: names found neither in the prompt, the reference nor
    Python's keywords and builtins."""
    written = names(prompt + continuation, len(prompt))
    known = set(NAME.findall(prompt)) | set(NAME.findall(prompt + reference)) | LANGUAGE
    return sum(n not in known for n in written), len(written)


@dataclass
class Measured:
    """One decoding mode of one model: U, the mean teacher surprisal and the ungrounded-name share, each the
    median over the seeds (one value for greedy), and the per-seed values."""
    mode: str
    unsupported: float
    surprisal: float
    ungrounded: float
    per_seed: list[tuple[float, float, float]]
    tokens: int  # continuation tokens per seed
    names: int  # names written, summed over the seeds
    examples: list[str] = field(default_factory=list)  # the first rows' continuations (first seed), as text


def measure(student, teacher, tokenizer, prompts: torch.Tensor, references: torch.Tensor, seeds: list[int],
            epsilon: float = EPSILON, batch: int = 8, examples: int = 0) -> list[Measured]:
    """The student continues every prompt (B, P) for G = references.shape[1] tokens, sampled at temperature 1
    with each seed and greedily; both measures on each. ``tokenizer`` decodes for (b). ``examples``: keep the
    first that many rows' continuations of each mode's first run as text."""
    if prompts.ndim != 2 or references.ndim != 2 or prompts.shape[0] != references.shape[0] or not len(prompts):
        raise LlmlabError("prompts (B, P) and references (B, G) need the same B >= 1 rows")
    if not seeds:
        raise LlmlabError("--seeds: give at least one seed")
    G = references.shape[1]
    p_text = [tokenizer.decode(p) for p in prompts.tolist()]
    r_text = [tokenizer.decode(r) for r in references.tolist()]
    results = []
    for mode, runs in (("sampled", [SamplingParams(temperature=1.0, seed=s) for s in seeds]),
                       ("greedy", [SamplingParams(temperature=0.0)])):
        per_seed, n_names, texts = [], 0, []
        for params in runs:
            done = generate(student, prompts.tolist(), G, params)  # no stop ids: every row writes G tokens
            cont = torch.tensor([c.ids for c in done], dtype=torch.long)  # (B, G)
            lp = teacher_logprobs(teacher, prompts, cont, batch)  # (B, G)
            counts = [ungrounded(p, tokenizer.decode(c), r) for p, c, r in zip(p_text, cont.tolist(), r_text)]
            bad, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
            n_names += total
            if not texts:
                texts = [tokenizer.decode(c) for c in cont[:examples].tolist()]
            per_seed.append((unsupported_share(lp.reshape(-1), epsilon), float(-lp.mean()),
                             bad / total if total else 0.0))
        results.append(Measured(mode, *(statistics.median(v[i] for v in per_seed) for i in range(3)), per_seed,
                                int(prompts.shape[0] * G), n_names, texts))
    return results
