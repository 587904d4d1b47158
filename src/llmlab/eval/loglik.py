"""Batched log-likelihood of continuations given contexts: the scoring under multiple-choice evaluation.

A request is (context, continuation) text; its score is sum_t log p(continuation token t | context, earlier
continuation tokens), and *greedy* says whether every continuation token was the model's top choice. The
tokenisation boundary is handled as lm-evaluation-harness does (Gao et al. 2023, "A framework for few-shot
language model evaluation", ``HFLM._encode_pair``): trailing spaces of the context move to the front of the
continuation, the joined text is encoded whole, and the continuation is the tokens past the context's own
encoding -- so " Paris" scores as the tokens the model would see in "...is Paris", not as " Paris" encoded
alone. An empty context scores after the BOS (else EOS) token. No BOS is added otherwise (the harness's default
for causal models). A request longer than the model's context keeps its last ``max_seq_len`` tokens.

The choices of one question share its context, so each context runs once: a row holds the context and then
every continuation of it (less its last token, only a target) side by side, each attending to the context and to
itself through a (T, T) mask, its positions counting on from the context's end -- the same numbers as one row per
request, for a quarter of the tokens on four choices. Rows run longest first, right-padded (a padding position
sees only itself), one forward per batch of rows; the output head runs only on the positions that predict a
continuation token (``DecoderLM(return_hidden=True)``); identical requests are scored once.

Shapes: a batch (B, T) int64, mask (B, T, T) bool -> hidden (B, T, dim) -> the predicting rows (n_cont, dim) ->
logits (n_cont, V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.models.decoder import DecoderLM


class Scored(NamedTuple):
    logprob: float  # summed over the continuation's tokens (nats)
    greedy: bool  # every continuation token was the argmax
    tokens: int  # continuation tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split from the encoding of the joined text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not continuation:
        raise LlmlabError("a continuation to score is empty: every choice needs some text")
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise LlmlabError("an empty context needs a BOS or EOS token to condition on; this tokenizer has neither")
        return [prefix], tokenizer.encode(continuation, add_bos=False)
    whole = tokenizer.encode(context + continuation, add_bos=False)
    ctx = tokenizer.encode(context, add_bos=False)
    if len(ctx) >= len(whole):  # the continuation merged into the context's last token (rare, e.g. "a" + "b")
        ctx = ctx[:-1]
    return ctx, whole[len(ctx):]


def check_scorer(model, what: str) -> None:
    """An encoder has no next-token distribution: a one-line error instead of a shape error later."""
    if not model.config.is_causal:
        raise LlmlabError(f"{what}: this model is an encoder ({model.config.arch}) and cannot score log-likelihoods; "
                          "give a causal language model, or encoder tasks (retrieval, sts:FILE)")


def pack_rows(groups: dict[tuple[int, ...], list[tuple[int, ...]]], max_len: int) -> list[tuple[tuple, list, list]]:
    """{context ids: continuations} -> rows (key, context, continuations) of at most ``max_len`` input tokens: the
    context once, then each continuation but its last token (which is only a target). A context too long for its
    longest continuation keeps its end; a group too long for one row is split over several."""
    rows = []
    for ctx, conts in groups.items():
        longest = max(len(c) for c in conts)
        if longest > max_len:
            raise LlmlabError(f"a continuation of {longest} tokens does not fit the model's {max_len}-token context")
        kept = list(ctx[-(max_len + 1 - longest):])
        row: list = []
        for c in sorted(conts, key=len):
            if row and len(kept) + sum(len(x) - 1 for x in row) + len(c) - 1 > max_len:
                rows.append((ctx, kept, row))
                row = []
            row.append(c)
        rows.append((ctx, kept, row))
    return rows


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> list[Scored]:
    """Score each (context, continuation); results in the order given."""
    check_scorer(model, "log-likelihood scoring")
    pairs = {req: encode_pair(tokenizer, *req) for req in dict.fromkeys(requests)}
    by_request = dict(zip(pairs, token_loglikelihoods(model, list(pairs.values()), batch_size)))
    return [by_request[r] for r in requests]


@torch.inference_mode()
def token_loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[Scored]:
    """Score each (context ids, continuation ids) pair, both non-empty; results in the order given."""
    check_scorer(model, "log-likelihood scoring")
    if any(not ctx or not cont for ctx, cont in pairs):
        raise LlmlabError("a context or continuation to score has no tokens")
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ctx, cont in pairs:
        conts = groups.setdefault(tuple(ctx), [])
        if tuple(cont) not in conts:
            conts.append(tuple(cont))
    rows = sorted(pack_rows(groups, model.config.max_seq_len),
                  key=lambda r: -(len(r[1]) + sum(len(c) - 1 for c in r[2])))
    device = next(model.parameters()).device
    found: dict[tuple[tuple[int, ...], tuple[int, ...]], Scored] = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(ctx) + sum(len(c) - 1 for c in conts) for _, ctx, conts in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T)
        pos = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T)
        mask = torch.eye(T, dtype=torch.bool).repeat(len(chunk), 1, 1)  # (B, T, T): padding sees itself only
        where, targets, spans = [], [], []
        for b, (key, ctx, conts) in enumerate(chunk):
            n = len(ctx)
            ids[b, :n], pos[b, :n] = torch.tensor(ctx), torch.arange(n)
            mask[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            off = n
            for c in conts:
                k = len(c) - 1  # a continuation's inputs: all of it but the last token
                ids[b, off:off + k] = torch.tensor(c[:-1], dtype=torch.long)
                pos[b, off:off + k] = torch.arange(n, n + k)  # as if the continuation followed the context alone
                mask[b, off:off + k, :n] = True  # the context ...
                mask[b, off:off + k, off:off + k] = torch.ones(k, k, dtype=torch.bool).tril()  # ... and itself
                rows_of_c = [n - 1, *range(off, off + k)]  # the positions that predict c's tokens
                where += [(b, p) for p in rows_of_c]
                targets += list(c)
                spans.append((key, c))
                off += k
        where_t = torch.tensor(where, device=device)  # (n_cont, 2): (row, position)
        kwargs = dict(attention_mask=mask.to(device), position_ids=pos.to(device))
        if isinstance(model, DecoderLM):
            hidden = model(ids.to(device), return_hidden=True, **kwargs)  # (B, T, dim), after the final norm
            logits = model.lm_head(hidden[where_t[:, 0], where_t[:, 1]])  # (n_cont, V)
        else:
            logits = model(ids.to(device), **kwargs)[where_t[:, 0], where_t[:, 1]]  # (n_cont, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(targets, device=device)  # (n_cont,)
        token_lp = logp.gather(1, target[:, None])[:, 0]  # (n_cont,)
        top = logp.argmax(-1) == target
        at = 0
        for key, c in spans:
            found[(key, c)] = Scored(float(token_lp[at:at + len(c)].sum()), bool(top[at:at + len(c)].all()),
                                            len(c))
            at += len(c)
    return [found[(tuple(ctx), tuple(cont))] for ctx, cont in pairs]
