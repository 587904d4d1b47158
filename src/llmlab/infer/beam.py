"""Beam search: keep the ``k`` best partial sequences by summed log-probability, extend each by every
token, keep the best ``k`` again (Graves 2012, arXiv:1211.3711; Sutskever et al. 2014, arXiv:1409.3215).

Finished hypotheses are scored sum_logprob / generated_len ** length_penalty (Wu et al. 2016,
arXiv:1609.08144 use a similar normaliser). The bookkeeping follows transformers' vectorised beam search
so the same prompt gives the same text (tested): each step ranks 2k candidates (more with several
EOS ids) so that k live beams survive even when some candidates finish; the search stops when no
live beam can still beat the worst finished one (``early_stopping=False``: judged at the current
length), when k hypotheses are finished (``early_stopping=True``), or at the token budget.

Shapes: one prompt; the k beams form the batch dimension of the model and KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9  # "impossible" score, added rather than -inf so arithmetic stays finite (as transformers)


@dataclass
class Beam:
    ids: list[int]  # generated ids (EOS included when the hypothesis finished with it)
    score: float  # sum of log-probs / len ** length_penalty


def _ban_repeated_ngrams(log_probs: torch.Tensor, seqs: list[list[int]], n: int) -> torch.Tensor:
    """No token that would complete an n-gram already present in the row (Paulus et al. 2017)."""
    for row, seq in enumerate(seqs):
        if len(seq) + 1 < n:
            continue
        prefix = tuple(seq[len(seq) - n + 1:])
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
        if banned:
            log_probs[row, banned] = float("-inf")
    return log_probs


@torch.inference_mode()
def beam_search(model, prompt: list[int], max_new_tokens: int, num_beams: int = 4, *,
                length_penalty: float = 1.0, early_stopping: bool | str = False, eos_ids: set[int] | None = None,
                num_return: int = 1, no_repeat_ngram_size: int = 0, trace: list | None = None) -> list[Beam]:
    """The ``num_return`` best finished hypotheses, best first. With ``trace``, one dict per step is
    appended: the surviving live beams as (parent beam, token, score) and the candidates that finished."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return must be in [1, num_beams={num_beams}], got {num_return}")
    K, P = num_beams, len(prompt)
    budget = min(max_new_tokens, model.config.max_seq_len - P)
    if budget < 1:
        raise ValueError("the prompt fills the context")
    eos = sorted(eos_ids or ())
    device = next(model.parameters()).device
    keep = max(2, 1 + len(eos)) * K  # candidates ranked per step
    top_k_mask = torch.arange(keep, device=device) < K  # only the top K candidates may finish

    # Prefill the prompt once and copy its cache to every beam.
    one = model.new_cache(1, P + budget)
    logits = model(torch.tensor([prompt], device=device), cache=one)[:, -1].expand(K, -1)  # (K, V)
    cache = model.new_cache(K, P + budget)
    cache.k.copy_(one.k.expand_as(cache.k))
    cache.v.copy_(one.v.expand_as(cache.v))
    cache.length = P

    running = torch.zeros(K, budget, dtype=torch.long, device=device)  # (K, budget) generated ids
    running_scores = torch.full((K,), NEG, device=device)
    running_scores[0] = 0.0  # all beams start identical: only one may expand at first
    done_seqs = torch.zeros(K, budget, dtype=torch.long, device=device)
    done_lens = torch.zeros(K, dtype=torch.long, device=device)
    done_scores = torch.full((K,), NEG, device=device)
    done_flags = torch.zeros(K, dtype=torch.bool, device=device)
    improvable = True
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)

    for t in range(budget):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
        if no_repeat_ngram_size > 0:
            seqs = [prompt + running[b, :t].tolist() for b in range(K)]
            log_probs = _ban_repeated_ngrams(log_probs, seqs, no_repeat_ngram_size)
        V = log_probs.shape[-1]
        total = (log_probs + running_scores[:, None]).reshape(-1)  # (K*V,)
        cand_scores, cand_idx = torch.topk(total, keep)  # (keep,)
        src = cand_idx // V  # which beam each candidate extends
        tok = cand_idx % V
        cand = running[src].clone()
        cand[:, t] = tok
        hits = torch.isin(tok, eos_t) if eos else torch.zeros(keep, dtype=torch.bool, device=device)
        if t + 1 == budget:
            hits = torch.ones_like(hits)  # the budget ends every candidate

        # Live beams for the next step: the best K candidates that did not finish.
        live_scores = cand_scores + hits.float() * NEG
        order = torch.topk(live_scores, K).indices
        running, running_scores, beam_src = cand[order], live_scores[order], src[order]
        if trace is not None:
            finished_now = [(int(src[i]), int(tok[i]), float(cand_scores[i])) for i in range(keep)
                            if bool(hits[i]) and bool(top_k_mask[i]) and float(cand_scores[i]) > NEG / 2]
            trace.append({"live": [(int(beam_src[j]), int(running[j, t]), float(running_scores[j]))
                                   for j in range(K) if float(running_scores[j]) > NEG / 2],
                          "finished": finished_now})

        # Finished hypotheses: merge newly finished top-K candidates into the K best so far.
        fin = cand_scores / ((t + 1) ** length_penalty)
        if early_stopping is True and bool(done_flags.all()):
            fin = fin + NEG
        if not improvable:
            fin = fin + NEG
        just_done = hits & top_k_mask
        fin = fin + (~just_done).float() * NEG
        merged_scores = torch.cat([done_scores, fin])
        best = torch.topk(merged_scores, K).indices
        merged_seqs = torch.cat([done_seqs, cand])
        merged_lens = torch.cat([done_lens, torch.full((keep,), t + 1, device=device)])
        merged_flags = torch.cat([done_flags, just_done])
        done_seqs, done_scores = merged_seqs[best], merged_scores[best]
        done_lens, done_flags = merged_lens[best], merged_flags[best]

        # Can a live beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = budget
        else:
            best_len = t + 1
        best_live = running_scores[0] / (best_len ** length_penalty)
        worst_done = done_scores.min() if bool(done_flags.all()) else torch.tensor(NEG)
        improvable = improvable and bool(best_live > worst_done)
        all_hit = bool(hits.all())
        if not improvable or (bool(done_flags.all()) and early_stopping is True) or all_hit:
            break
        # Reorder the cache so row b holds the history of the beam it now continues.
        cache.k = cache.k[:, beam_src]
        cache.v = cache.v[:, beam_src]
        logits = model(running[:, t:t + 1], cache=cache)[:, -1]

    return [Beam(done_seqs[i, :int(done_lens[i])].tolist(), float(done_scores[i])) for i in range(num_return)]
