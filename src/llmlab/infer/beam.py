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


class BeamState:
    """The search's bookkeeping, apart from the model: ``advance`` takes the K live beams' next-token
    log-probs and says which beam each new beam continues, with which token, and whether to stop.
    Used by ``beam_search`` below (one static cache, reordered) and by the serving engine (paged blocks,
    forked copy-on-write instead of copied)."""

    def __init__(self, width: int, budget: int, *, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, eos_ids: set[int] | None = None, device="cpu"):
        if width < 1:
            raise ValueError(f"num_beams must be >= 1, got {width}")
        K = self.width = width
        self.budget, self.length_penalty, self.early_stopping = budget, length_penalty, early_stopping
        self.eos = torch.tensor(sorted(eos_ids or ()), device=device, dtype=torch.long)
        self.keep = max(2, 1 + len(self.eos)) * K  # candidates ranked per step
        self.top_k_mask = torch.arange(self.keep, device=device) < K  # only the top K candidates may finish
        self.running = torch.zeros(K, budget, dtype=torch.long, device=device)  # (K, budget) generated ids
        self.running_scores = torch.full((K,), NEG, device=device)
        self.running_scores[0] = 0.0  # all beams start identical: only one may expand at first
        self.done_seqs = torch.zeros(K, budget, dtype=torch.long, device=device)
        self.done_lens = torch.zeros(K, dtype=torch.long, device=device)
        self.done_scores = torch.full((K,), NEG, device=device)
        self.done_flags = torch.zeros(K, dtype=torch.bool, device=device)
        self.improvable = True
        self.t = 0

    def advance(self, log_probs: torch.Tensor, trace: list | None = None) -> tuple[list[int], list[int], bool]:
        """log_probs (K, V) of the live beams -> (source beam per new beam, its token, stop?)."""
        K, t, device = self.width, self.t, log_probs.device
        V = log_probs.shape[-1]
        total = (log_probs.float() + self.running_scores[:, None]).reshape(-1)  # (K*V,)
        cand_scores, cand_idx = torch.topk(total, self.keep)  # (keep,)
        src = cand_idx // V  # which beam each candidate extends
        tok = cand_idx % V
        cand = self.running[src].clone()
        cand[:, t] = tok
        hits = torch.isin(tok, self.eos) if len(self.eos) else torch.zeros(self.keep, dtype=torch.bool, device=device)
        if t + 1 == self.budget:
            hits = torch.ones_like(hits)  # the budget ends every candidate

        # Live beams for the next step: the best K candidates that did not finish.
        live_scores = cand_scores + hits.float() * NEG
        order = torch.topk(live_scores, K).indices
        self.running, self.running_scores, beam_src = cand[order], live_scores[order], src[order]
        if trace is not None:
            finished_now = [(int(src[i]), int(tok[i]), float(cand_scores[i])) for i in range(self.keep)
                            if bool(hits[i]) and bool(self.top_k_mask[i]) and float(cand_scores[i]) > NEG / 2]
            trace.append({"live": [(int(beam_src[j]), int(self.running[j, t]), float(self.running_scores[j]))
                                   for j in range(K) if float(self.running_scores[j]) > NEG / 2],
                          "finished": finished_now})

        # Finished hypotheses: merge newly finished top-K candidates into the K best so far.
        fin = cand_scores / ((t + 1) ** self.length_penalty)
        if self.early_stopping is True and bool(self.done_flags.all()):
            fin = fin + NEG
        if not self.improvable:
            fin = fin + NEG
        just_done = hits & self.top_k_mask
        fin = fin + (~just_done).float() * NEG
        merged_scores = torch.cat([self.done_scores, fin])
        best = torch.topk(merged_scores, K).indices
        merged_seqs = torch.cat([self.done_seqs, cand])
        merged_lens = torch.cat([self.done_lens, torch.full((self.keep,), t + 1, device=device)])
        merged_flags = torch.cat([self.done_flags, just_done])
        self.done_seqs, self.done_scores = merged_seqs[best], merged_scores[best]
        self.done_lens, self.done_flags = merged_lens[best], merged_flags[best]

        # Can a live beam still beat the worst finished hypothesis?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.budget
        else:
            best_len = t + 1
        best_live = self.running_scores[0] / (best_len ** self.length_penalty)
        worst_done = self.done_scores.min() if bool(self.done_flags.all()) else torch.tensor(NEG)
        self.improvable = self.improvable and bool(best_live > worst_done)
        stop = (not self.improvable or (bool(self.done_flags.all()) and self.early_stopping is True)
                or bool(hits.all()))
        self.t += 1
        return beam_src.tolist(), self.running[:, t].tolist(), stop

    def best(self, n: int) -> list[Beam]:
        """The ``n`` best finished hypotheses, best first."""
        return [Beam(self.done_seqs[i, :int(self.done_lens[i])].tolist(), float(self.done_scores[i]))
                for i in range(n)]


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
    device = next(model.parameters()).device
    state = BeamState(K, budget, length_penalty=length_penalty, early_stopping=early_stopping, eos_ids=eos_ids,
                      device=device)

    # Prefill the prompt once and copy its cache to every beam.
    one = model.new_cache(1, P + budget)
    logits = model(torch.tensor([prompt], device=device), cache=one)[:, -1].expand(K, -1)  # (K, V)
    cache = model.new_cache(K, P + budget)
    cache.copy_rows_from(one, torch.zeros(K, dtype=torch.long, device=device))  # every beam: row 0's cache

    for t in range(budget):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (K, V)
        if no_repeat_ngram_size > 0:
            seqs = [prompt + state.running[b, :t].tolist() for b in range(K)]
            log_probs = _ban_repeated_ngrams(log_probs, seqs, no_repeat_ngram_size)
        beam_src, tokens, stop = state.advance(log_probs, trace)
        if stop:
            break
        # Reorder the cache so row b holds the history of the beam it now continues.
        src = torch.tensor(beam_src, device=device)
        cache.k = cache.k[:, src]
        cache.v = cache.v[:, src]
        logits = model(torch.tensor(tokens, device=device)[:, None], cache=cache)[:, -1]

    return state.best(num_return)
