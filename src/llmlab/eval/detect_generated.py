"""Detection of machine-generated text from the scoring model's own next-token distributions, zero-shot.

A text x_1..x_n is scored token by token under a causal LM, p_t = p(. | x_<t) (V,); four statistics per text,
each oriented as the reference code orients it (Bao et al.'s ``baselines.py``): **higher = more machine-like**.

- likelihood: (1/n) sum_t log p_t(x_t) (Solaiman et al. 2019, arXiv:1908.09203; Gehrmann et al. 2019).
- log-rank: -(1/n) sum_t log r_t, r_t = 1 + #{v : p_t(v) > p_t(x_t)} (GLTR, Gehrmann, Strobelt & Rush 2019,
  arXiv:1906.04043; the log-rank baseline of DetectGPT, Mitchell et al. 2023, arXiv:2301.11305).
- entropy: (1/n) sum_t H_t, H_t = -sum_v p_t(v) log p_t(v) (the entropy baseline of the same papers).
- fast-detectgpt: the analytic conditional probability curvature of Fast-DetectGPT (Bao, Zhao, Teng, Yang &
  Zhang 2024, arXiv:2310.05130, eqs. 5-6 and their ``get_sampling_discrepancy_analytic``), with one model as both
  the sampling and the scoring model:

      d(x) = (sum_t log p_t(x_t) - sum_t mu_t) / sqrt(sum_t var_t),
      mu_t  = E_{v ~ p_t}[log p_t(v)] = sum_v p_t(v) log p_t(v)        (= -H_t)
      var_t = E_{v ~ p_t}[(log p_t(v))^2] - mu_t^2

  the mean and variance of log p(x~) over texts x~ whose every token is drawn from p_t given the *observed*
  prefix x_<t, in closed form from the one forward pass (no sampled perturbations). For text sampled from the
  model itself d is about N(0, 1); human text, less likely than the model's own choices, lands below it.

The built-in set (``builtin_passages``): human texts are docstrings of the Python standard library (the modules
of the built-in retrieval set, read by ``text/tasks.clean_docstrings`` in a fresh interpreter), those with at
least ``prefix_tokens + new_tokens`` tokens, in the fixed order of the CRC-32 of their qualified names; each is
cut to its first ``prefix_tokens`` (the prompt, shared by both texts of a pair) and the next ``new_tokens`` (the
human continuation). The machine continuation is the model's own sample from the same prompt, ``new_tokens``
tokens, temperature 1 and top-p 1 by default (the papers' main setting), special tokens masked out, seeded per
passage (the CRC-32 of ``seed:name``). Both continuations are scored *given the prompt*, on the continuation
tokens only (the prompt is the same in both, so it only adds noise), as ``eval/loglik.encode_pair`` splits
prompt + continuation text. Samples are cached in the output folder (``continuations.jsonl``), so a rerun with the
same settings only scores.

Shapes: ids (T,) -> log-probs (T, V) (``infer/lingua.window_logprobs``) -> the n rows that predict the scored
tokens (n, V) -> per-token statistics (n,) -> one number per text.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmlab.common import LlmlabError, read_json, save_png, write_text_atomic
from llmlab.eval.loglik import check_scorer, encode_pair
from llmlab.infer.lingua import window_logprobs

STATISTICS = ("likelihood", "log-rank", "entropy", "fast-detectgpt")
LABELS = {"likelihood": "log-likelihood", "log-rank": "log-rank", "entropy": "entropy",
          "fast-detectgpt": "Fast-DetectGPT curvature"}
CACHE = "continuations.jsonl"


# ---- the statistics --------------------------------------------------------------------------------------------

def analytic_moments(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of log p(v) under v ~ p, per row: logp (n, V) log-probabilities -> mu (n,), var (n,)."""
    p = logp.exp()  # (n, V)
    mu = (p * logp).sum(-1)  # (n,)
    var = (p * logp.square()).sum(-1) - mu.square()  # (n,)
    return mu, var.clamp_min(0.0)


def log_ranks(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log r_t with r_t = 1 + the number of tokens strictly more likely than the target: (n, V), (n,) -> (n,)."""
    chosen = logp.gather(1, target[:, None])  # (n, 1)
    return (1 + (logp > chosen).sum(-1)).double().log()  # (n,)


def statistics(logp: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The four statistics of one text: ``logp`` (n, V) the log-probabilities of the rows that predict the scored
    tokens ``target`` (n,)."""
    logp = logp.double()
    token_lp = logp.gather(1, target[:, None])[:, 0]  # (n,)
    mu, var = analytic_moments(logp)
    return {"likelihood": float(token_lp.mean()),
            "log-rank": -float(log_ranks(logp, target).mean()),
            "entropy": -float(mu.mean()),
            "fast-detectgpt": float((token_lp.sum() - mu.sum()) / var.sum().clamp_min(1e-12).sqrt()),
            "tokens": int(target.numel())}


def score_ids(model, context: list[int], scored: list[int]) -> dict[str, float]:
    """Statistics of the tokens ``scored`` given ``context`` (at least one token): one forward pass."""
    if not context or not scored:
        raise LlmlabError("a text to score needs at least 2 tokens (one to condition on, one to score)")
    ids = context + scored
    if len(ids) > model.config.max_seq_len:
        raise LlmlabError(f"the text is {len(ids)} tokens and the model's context holds {model.config.max_seq_len}: "
                          "give a shorter text")
    logp = window_logprobs(model, ids)[len(context) - 1:len(ids) - 1]  # (n, V): the rows predicting ``scored``
    return statistics(logp, torch.tensor(scored, device=logp.device))


def score_text(model, tokenizer, text: str, context_tokens: int = 30) -> dict[str, float]:
    """Statistics of a text as ``evaluate`` scores a continuation: its first ``context_tokens`` tokens (half of a
    shorter text, at least one) are context only, the rest is scored (no BOS added)."""
    check_scorer(model, "llmlab detect")
    if not text.strip():
        raise LlmlabError("the text is empty: give some text (an argument, --file FILE or standard input)")
    ids = tokenizer.encode(text, add_bos=False)
    if len(ids) < 2:
        raise LlmlabError(f"the text is {len(ids)} token: the statistics need at least 2 (one to condition on, "
                          "one to score); give a longer text")
    k = max(1, min(context_tokens, len(ids) // 2))
    return score_ids(model, ids[:k], ids[k:])


def score_continuation(model, tokenizer, prompt: str, continuation: str) -> dict[str, float]:
    """Statistics of ``continuation``'s tokens given ``prompt``, split as ``eval/loglik.encode_pair`` does."""
    return score_ids(model, *encode_pair(tokenizer, prompt, continuation))


# ---- ROC -------------------------------------------------------------------------------------------------------

def _check_labels(scores: list[float], labels: list[int]) -> None:
    if len(scores) != len(labels) or not set(labels) <= {0, 1} or len(set(labels)) < 2:
        raise LlmlabError("ROC needs one score per label and both labels (0 = human, 1 = machine) present")


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic: the probability that a random positive (label 1)
    scores above a random negative, ties counting one half (midranks). Equal to the trapezoid area."""
    _check_labels(scores, labels)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # the midrank of the tie group, 1-based
        i = j + 1
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    r_pos = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(scores: list[float], labels: list[int]) -> tuple[list[float], list[float], list[float]]:
    """(false-positive rates, true-positive rates, thresholds): "machine" when score >= threshold, one point per
    distinct score from the highest down, starting at (0, 0) with threshold +inf."""
    _check_labels(scores, labels)
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    fpr, tpr, thr = [0.0], [0.0], [math.inf]
    tp = fp = 0
    pairs = sorted(zip(scores, labels), key=lambda sl: -sl[0])
    for i, (s, y) in enumerate(pairs):
        tp += y
        fp += 1 - y
        if i + 1 == len(pairs) or pairs[i + 1][0] != s:
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
            thr.append(s)
    return fpr, tpr, thr


def best_threshold(scores: list[float], labels: list[int]) -> tuple[float, float]:
    """(threshold, accuracy) of the rule "machine when score >= threshold" that is right most often on the
    (scores, labels) given; the threshold is the midpoint between the two scores it separates."""
    fpr, tpr, thr = roc_curve(scores, labels)
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    acc = [(t * n_pos + (1 - f) * n_neg) / len(labels) for f, t in zip(fpr, tpr)]
    k = max(range(len(acc)), key=lambda i: acc[i])
    below = [s for s in scores if s < thr[k]]
    cut = thr[k] if not below or math.isinf(thr[k]) else (thr[k] + max(below)) / 2
    return cut, acc[k]


# ---- the built-in set ------------------------------------------------------------------------------------------

@dataclass
class Passage:
    key: str  # the docstring's qualified name
    prompt: str  # its first prefix_tokens tokens, decoded
    human: str  # the next new_tokens tokens, decoded


def builtin_passages(tokenizer, prefix_tokens: int = 30, new_tokens: int = 96,
                     limit: int | None = None) -> list[Passage]:
    """The usable standard-library docstrings (the first ``limit``; None: all), cut into (prompt, human
    continuation), in the fixed CRC-32 order."""
    from llmlab.text.retrieval_set import MODULES
    from llmlab.text.tasks import clean_docstrings

    if prefix_tokens < 1 or new_tokens < 1:
        raise LlmlabError(f"--prefix-tokens {prefix_tokens}, --new-tokens {new_tokens}: give at least 1 of each")
    seen, out = set(), []
    for _, key, doc in sorted(clean_docstrings(MODULES), key=lambda r: (zlib.crc32(r[1].encode()), r[1])):
        if len(doc.encode()) < prefix_tokens + new_tokens or doc in seen:  # a token holds at least one byte
            continue
        ids = tokenizer.encode(doc, add_bos=False)
        if len(ids) < prefix_tokens + new_tokens:
            continue
        seen.add(doc)
        prompt, human = tokenizer.decode(ids[:prefix_tokens]), tokenizer.decode(ids[prefix_tokens:][:new_tokens])
        if prompt + human == tokenizer.decode(ids[:prefix_tokens + new_tokens]) and "\ufffd" not in prompt + human:
            out.append(Passage(key, prompt, human))  # not cut inside a multi-byte character
        if limit is not None and len(out) == limit:
            break
    return out


@dataclass
class SampleConfig:
    prefix_tokens: int = 30
    new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def passage_seed(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


def _read_cache(path: Path) -> list[dict]:
    """The cached samples: one JSON object per line (key, model, the ``SampleConfig`` fields, prompt, machine)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() if path.exists() else [], 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise LlmlabError(f"{path}:{n}: not JSON: delete the file to sample the continuations again") from None
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("machine"), str)]


def machine_continuations(model, tokenizer, passages: list[Passage], cfg: SampleConfig, cache: Path,
                          model_name: str, progress: Callable[[], None] | None = None) -> list[str]:
    """The model's continuation of each passage's prompt, from ``cache`` when it holds one of the same prompt made
    with the same model and settings, else sampled (and the cache rewritten, atomically, after each)."""
    from llmlab.infer.generate import generate
    from llmlab.infer.sample import SamplingParams

    rows = _read_cache(cache)
    want = {"model": model_name, **asdict(cfg)}
    done = {(r.get("key"), r.get("prompt")): r["machine"] for r in rows if all(r.get(k) == v for k, v in want.items())}
    banned = {i: float("-inf") for i in tokenizer.special_tokens.values() if i < model.config.vocab_size}
    out = []
    for p in passages:
        if (p.key, p.prompt) not in done:
            prompt = tokenizer.encode(p.prompt, add_bos=False)
            params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, logit_bias=banned,
                                    seed=passage_seed(cfg.seed, p.key))
            ids = generate(model, [prompt], cfg.new_tokens, params)[0].ids
            done[(p.key, p.prompt)] = tokenizer.decode(ids)
            rows.append({"key": p.key, **want, "prompt": p.prompt, "machine": done[(p.key, p.prompt)]})
            write_text_atomic(cache, "".join(json.dumps(r) + "\n" for r in rows))
        out.append(done[(p.key, p.prompt)])
        if progress is not None:
            progress()
    return out


def eval_passages(tokenizer, n: int, cfg: SampleConfig) -> list[Passage]:
    """The first ``n`` built-in passages; a one-line error when there are fewer."""
    if n < 1:
        raise LlmlabError(f"--n {n}: give a number of passages >= 1")
    passages = builtin_passages(tokenizer, cfg.prefix_tokens, cfg.new_tokens, limit=n)
    if n > len(passages):
        raise LlmlabError(f"--n {n}: the built-in set has {len(passages)} passages of at least "
                          f"{cfg.prefix_tokens + cfg.new_tokens} tokens; give --n {len(passages)} or less, or lower "
                          "--new-tokens / --prefix-tokens")
    return passages


def evaluate(model, tokenizer, passages: list[Passage], cfg: SampleConfig, out: Path, model_name: str,
             progress: Callable[[], None] | None = None) -> dict:
    """The ROC-AUC of each statistic on the human and the machine continuations of ``passages`` (``eval_passages``);
    per-text scores, the best-accuracy threshold of each statistic; written to ``out/detect.json``. ``progress``
    is called twice per passage: sampled (or read from the cache), scored."""
    check_scorer(model, "llmlab detect --eval")
    machine = machine_continuations(model, tokenizer, passages, cfg, Path(out) / CACHE, model_name, progress)
    texts, labels = [], []
    for p, m in zip(passages, machine):
        for label, cont in ((0, p.human), (1, m)):
            texts.append({"key": p.key, "label": label, **score_continuation(model, tokenizer, p.prompt, cont)})
            labels.append(label)
        if progress is not None:
            progress()
    result = {"model": model_name, "n": len(passages), "settings": asdict(cfg), "auc": {}, "thresholds": {},
              "accuracy": {}, "roc": {}}
    for s in STATISTICS:
        scores = [t[s] for t in texts]
        result["auc"][s] = roc_auc(scores, labels)
        cut, result["accuracy"][s] = best_threshold(scores, labels)
        result["thresholds"][s] = None if math.isinf(cut) else cut  # None: calling every text human is best
        fpr, tpr, _ = roc_curve(scores, labels)
        result["roc"][s] = {"fpr": fpr, "tpr": tpr}
    result["texts"] = texts
    write_text_atomic(Path(out) / "detect.json", json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    rows = ["| statistic | ROC-AUC | best accuracy | at threshold |", "|---|---:|---:|---:|"]
    for s in STATISTICS:
        cut = result["thresholds"][s]
        rows.append(f"| {LABELS[s]} | {result['auc'][s]:.3f} | {result['accuracy'][s]:.3f} | "
                    f"{'none' if cut is None else f'{cut:.4g}'} |")
    return "\n".join(rows)


def plot_roc(result: dict, path: Path) -> Path:
    """The ROC curve of each statistic, AUC in the legend. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6))
    for s in STATISTICS:
        ax.plot(result["roc"][s]["fpr"], result["roc"][s]["tpr"], label=f"{LABELS[s]} (AUC {result['auc'][s]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
    ax.set_xlabel("false-positive rate (human called machine)")
    ax.set_ylabel("true-positive rate (machine called machine)")
    cfg = result["settings"]
    ax.set_title(f"{result['model']}: {result['n']} human vs {result['n']} sampled continuations\n"
                 f"of stdlib docstrings ({cfg['prefix_tokens']}-token prompt, {cfg['new_tokens']} tokens, "
                 f"T={cfg['temperature']:g}, top-p {cfg['top_p']:g})", fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


# ---- verdicts on one text --------------------------------------------------------------------------------------

# Best-accuracy thresholds of the embedded SmolLM2-135M-Instruct on the built-in set (the README's Evaluation run:
# ``llmlab detect --eval --n 100``, 76.5% and 72.0% right); likelihood and log-rank have none there (their AUCs are
# below 0.5: the stdlib's docstrings are more likely to the model than its own samples). Another model's come from
# its own ``llmlab detect --eval`` (detect.json, ``--thresholds``).
DEFAULT_THRESHOLDS: dict[str, float] = {"entropy": 2.9928, "fast-detectgpt": -0.2681}


def read_thresholds(path: str) -> dict[str, float]:
    """The thresholds of an ``llmlab detect --eval`` run: its detect.json (or the folder holding it)."""
    file = Path(path) / "detect.json" if Path(path).is_dir() else Path(path)
    data = read_json(file, missing="give the detect.json of an 'llmlab detect --eval' run")
    if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict):
        raise LlmlabError(f"{file}: no 'thresholds' object: give the detect.json of an 'llmlab detect --eval' run")
    return {k: float(v) for k, v in data["thresholds"].items() if k in STATISTICS and v is not None}


def verdicts(stats: dict[str, float], thresholds: dict[str, float]) -> list[tuple[str, float, float | None, str]]:
    """(statistic, value, threshold, "machine" | "human" | "-") for each statistic; "-" without a threshold."""
    rows = []
    for s in STATISTICS:
        t = thresholds.get(s)
        rows.append((s, stats[s], t, "-" if t is None else ("machine" if stats[s] >= t else "human")))
    return rows
