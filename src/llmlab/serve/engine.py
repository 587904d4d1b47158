"""The serving engine: many requests, one model, a paged KV cache, one forward pass per step.

Token ids in, token ids out (text is the edge's job: ``serve/text.py``). Each ``step()``:

1. the scheduler (``serve/scheduler.py``) picks this iteration's work — decodes, chunks of prompts,
   speculative drafts to check — within the token budget and the free KV blocks (Orca, OSDI '22);
2. all of it runs as *one* forward pass: the new tokens of every sequence side by side (1, N), each
   attending to its own block table (``nn/paged_attention.py``; PagedAttention, arXiv:2309.06180), the
   LM head only on the rows that need logits;
3. each sequence that has caught up samples its next token with its own parameters and RNG (seeded
   requests give the same tokens in any batch), and the engine reports the new ids.

Also in the engine, sharing blocks copy-on-write: ``n > 1`` samples fork after the prompt; beam search
(``infer/beam.py``'s bookkeeping, transformers' semantics) forks and drops beams instead of copying a
cache; n-gram speculative decoding (prompt lookup; Leviathan et al. 2023, arXiv:2211.17192 acceptance
rule, exact for greedy and sampled rows) checks up to ``speculative_tokens`` drafts per sequence per step.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from llmlab.common import LlmlabError
from llmlab.infer.beam import Beam, BeamState
from llmlab.infer.sample import SamplingParams, apply_penalties, make_generator, sampling_probs
from llmlab.infer.speculative import NgramDrafter
from llmlab.nn.paged_attention import PagedBatch, PagedKVPool
from llmlab.serve.block_manager import BlockManager
from llmlab.serve.outputs import (
    EngineError,
    EngineFull,
    EngineStats,
    RequestOutput,
    RequestParams,
    SeqOutput,
    TokenLogprob,
)
from llmlab.serve.scheduler import Scheduled, Scheduler
from llmlab.serve.sequence import Request, Sequence, Status

GiB = 1 << 30


@dataclass
class EngineConfig:
    block_size: int = field(default=16, metadata={"help": "positions per KV block"})
    kv_cache_bytes: int | None = field(default=None, metadata={"help": "KV budget in bytes (default 1 GiB)"})
    kv_blocks: int | None = field(default=None, metadata={"help": "KV budget in blocks (overrides bytes)"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences running at once"})
    max_batched_tokens: int = field(default=512, metadata={"help": "tokens per step (prompt chunks + decodes)"})
    max_waiting: int = field(default=256, metadata={"help": "queued requests before new ones are refused"})
    max_n: int = field(default=8, metadata={"help": "largest n (samples per request) accepted"})
    prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prompt prefixes"})
    speculative_tokens: int = field(default=0, metadata={"help": "n-gram draft tokens checked per step; 0 = off"})
    attention: str = field(default="kernel", metadata={"help": "paged attention path: kernel | reference"})

    def validate(self) -> EngineConfig:
        for name in ("block_size", "max_num_seqs", "max_batched_tokens", "max_waiting", "max_n"):
            if getattr(self, name) < 1:
                raise LlmlabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batched_tokens < self.max_num_seqs:
            raise LlmlabError(f"max_batched_tokens ({self.max_batched_tokens}) must be >= max_num_seqs "
                              f"({self.max_num_seqs}) so every running sequence can decode each step")
        if self.speculative_tokens < 0:
            raise LlmlabError(f"speculative_tokens must be >= 0, got {self.speculative_tokens}")
        return self


@dataclass
class Finished:
    """The offline API's result for one request."""

    ids: list[list[int]]  # per output sequence
    finish_reasons: list[str]
    logprobs: list[list[TokenLogprob]] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _params_key(p: SamplingParams) -> tuple:
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
            p.presence_penalty, tuple(sorted(p.logit_bias.items())))


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model.eval()
        self.config = config = (config or EngineConfig()).validate()
        mc = model.config
        p = next(model.parameters())
        per_block = PagedKVPool.bytes_per_block(mc.n_layers, config.block_size, mc.n_kv_heads, mc.head_dim, p.dtype)
        n_blocks = config.kv_blocks or max(1, (config.kv_cache_bytes or GiB) // per_block)
        self.pool = PagedKVPool(mc.n_layers, n_blocks, config.block_size, mc.n_kv_heads, mc.head_dim,
                                dtype=p.dtype, device=p.device)
        self.blocks = BlockManager(n_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens, self.pool.copy_block_)
        self.scheduler.on_cannot_grow = lambda seq: self._finish(seq, "length")
        self.max_model_len = mc.max_seq_len
        self.vocab_size = mc.vocab_size
        self.device = p.device
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._stats = EngineStats(kv_blocks_total=n_blocks)
        self._drafter = NgramDrafter()

    # -- admission -------------------------------------------------------------------------------------------
    def check(self, prompt: list[int], params: RequestParams) -> int:
        """Validate a request without touching any state; -> its max new tokens. Raises EngineError."""
        L, P = self.max_model_len, len(prompt)
        if P == 0:
            raise EngineError("the prompt is empty", param="prompt")
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise EngineError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})",
                              param="prompt")
        if not 1 <= params.n <= self.config.max_n:
            raise EngineError(f"n must be in [1, {self.config.max_n}], got {params.n}", param="n")
        M = params.max_tokens
        if M is None:
            if P >= L:
                raise EngineError(f"the prompt has {P} tokens and the model's context is {L} tokens: no room to "
                                  f"generate; shorten the prompt", param="prompt", code="context_length_exceeded")
            M = L - P
        elif M < 0:
            raise EngineError(f"max_tokens must be >= 0, got {M}", param="max_tokens")
        elif P + M > L:
            raise EngineError(f"the prompt has {P} tokens and max_tokens is {M}: {P + M} exceeds the model's "
                              f"context of {L} tokens; lower max_tokens to {max(0, L - P)} or shorten the prompt",
                              param="max_tokens", code="context_length_exceeded")
        need = self.blocks.blocks_for(P + M)
        if need > self.blocks.num_blocks:
            raise EngineError(f"the prompt ({P} tokens) plus max_tokens ({M}) needs {need} KV blocks and the "
                              f"cache holds {self.blocks.num_blocks}; lower max_tokens or raise the KV budget",
                              param="max_tokens")
        if M == 0 and not params.prompt_logprobs:
            raise EngineError("max_tokens is 0: nothing to generate (use it with echo + logprobs)",
                              param="max_tokens")
        return M

    def add_request(self, request_id: str, prompt: list[int], params: RequestParams,
                    beam: BeamState | None = None) -> None:
        if request_id in self.requests:
            raise EngineError(f"request id {request_id!r} is already running", param="request_id")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineFull(f"{len(self.scheduler.waiting)} requests are waiting (the limit); retry later")
        max_tokens = self.check(prompt, params)
        params.sampling.validate()
        req = Request(request_id, list(prompt), params, next(self._arrivals))
        req.max_tokens = max_tokens
        req.beam = beam
        seq = self._new_seq(req, 0, list(prompt))
        if params.prompt_logprobs:
            req.prompt_logprobs = [None]
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def _new_seq(self, req: Request, index: int, tokens: list[int]) -> Sequence:
        seed = req.params.sampling.seed
        gen = make_generator(seed + index, self.device) if seed is not None else None
        seq = Sequence(next(self._seq_ids), req, index, tokens, generator=gen)
        req.seqs.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1

    def has_unfinished(self) -> bool:
        """Requests whose final output has not been collected yet (an aborted one still owes one)."""
        return bool(self.requests)

    def stats(self) -> EngineStats:
        s = self._stats
        s.waiting, s.running = len(self.scheduler.waiting), len(self.scheduler.running)
        s.kv_blocks_used, s.kv_blocks_free = self.blocks.num_used, self.blocks.num_free
        s.preemptions = self.scheduler.preemptions
        s.prefix_queries, s.prefix_hits = self.blocks.queries, self.blocks.hits
        return dataclasses.replace(s, finished=dict(s.finished))  # a snapshot: other threads read it

    # -- one iteration ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        if self.config.speculative_tokens:
            self._propose_drafts()
        work = self.scheduler.schedule()
        if work:
            self._stats.steps += 1
            logits = self._forward(work)
            self._advance(work, logits)
        return self._collect()

    def _propose_drafts(self) -> None:
        for seq in self.scheduler.running:
            req = seq.request
            seq.draft = []
            if req.beam is not None or seq.to_compute != 1 or not req.forked:
                continue
            p = req.params.sampling
            if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty or p.logit_bias:
                continue  # penalties depend on the accepted tokens: not checked in one pass
            room = min(req.max_tokens - seq.num_generated, self.max_model_len - len(seq.tokens)) - 1
            k = min(self.config.speculative_tokens, room)
            if k > 0:
                seq.draft = self._drafter.propose(seq.tokens, k, p)[0]

    def _forward(self, work: list[Scheduled]) -> list[torch.Tensor | None]:
        """One pass over every scheduled sequence; -> per entry its logits rows (R, V) or None."""
        ids, pos, rows, spans = [], [], [], []
        for w in work:
            seq = w.seq
            start = seq.num_computed
            toks = (seq.tokens + seq.draft)[start:start + w.n_tokens]
            ids.extend(toks)
            pos.extend(range(start, start + w.n_tokens))
            base = len(ids) - w.n_tokens
            caught_up = start + w.n_tokens == len(seq.tokens) + len(seq.draft)
            want_prompt = seq.request.prompt_logprobs is not None and start < seq.prompt_len
            if want_prompt:  # every position of this chunk (prompt log-probs), the last one samples
                first = base
            elif caught_up:
                first = base + w.n_tokens - 1 - len(seq.draft)
            else:
                spans.append(None)
                continue
            spans.append((len(rows), base + w.n_tokens - first))
            rows.extend(range(first, base + w.n_tokens))
        batch = PagedBatch(self.pool, [w.n_tokens for w in work], [w.seq.num_computed + w.n_tokens for w in work],
                           [w.seq.table for w in work], impl=self.config.attention)
        x = torch.tensor([ids], device=self.device)
        hidden = self.model(x, cache=batch, position_ids=torch.tensor([pos], device=self.device),
                            return_hidden=True)  # (1, N, dim)
        logits = self.model.lm_head(hidden[0, rows]).float() if rows else None  # (R, V)
        return [None if s is None else logits[s[0]:s[0] + s[1]] for s in spans]

    def _advance(self, work: list[Scheduled], logits: list[torch.Tensor | None]) -> None:
        ready: list[tuple[Sequence, torch.Tensor]] = []
        for w, lg in zip(work, logits):
            seq = w.seq
            start = seq.num_computed
            if seq.request.prompt_logprobs is not None and start < seq.prompt_len and lg is not None:
                self._record_prompt_logprobs(seq, start, w.n_tokens, lg)
                if start + w.n_tokens < len(seq.tokens):
                    seq.num_computed += w.n_tokens
                    continue
                lg = lg[-1 - len(seq.draft):]
            if start < seq.prompt_len:
                self._stats.prompt_tokens += min(w.n_tokens, seq.prompt_len - start)
            seq.num_computed += w.n_tokens - len(seq.draft)
            if lg is None:
                self._register(seq)
                continue
            ready.append((seq, lg))
        self._sample(ready)

    def _register(self, seq: Sequence) -> None:
        self.blocks.register_full(seq.tokens, seq.table, seq.num_computed, seq.hashes)

    def _record_prompt_logprobs(self, seq: Sequence, start: int, n: int, lg: torch.Tensor) -> None:
        req = seq.request
        if seq.index != 0 or len(req.prompt_logprobs) >= req.prompt_len:
            return  # a recomputation after preemption: already recorded
        lp = torch.log_softmax(lg[:n], dim=-1)  # (n, V): position i predicts token i+1
        k = req.params.logprobs or 0
        for i in range(n):
            p = start + i + 1
            if p >= req.prompt_len:
                break
            req.prompt_logprobs.append(self._token_logprob(lp[i], req.prompt[p], k))

    @staticmethod
    def _token_logprob(lp: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = []
        if k > 0:
            v, i = torch.topk(lp, k)
            top = list(zip(i.tolist(), v.tolist()))
        return TokenLogprob(token, float(lp[token]), top)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _sample(self, ready: list[tuple[Sequence, torch.Tensor]]) -> None:
        plain: list[tuple[Sequence, torch.Tensor]] = []
        for seq, lg in ready:
            req = seq.request
            if req.params.max_tokens == 0:  # echo-only scoring: the prompt's log-probs were the answer
                self._finish(seq, "length")
            elif req.beam is not None:
                seq.last_logprobs = torch.log_softmax(lg[-1], dim=-1)
                self._register(seq)
                self._beam_step(req)
            elif seq.draft:
                self._verify_draft(seq, lg)
            else:
                plain.append((seq, lg[-1]))
        # Rows with the same parameters and no RNG of their own are sampled together.
        groups: dict[tuple, list[tuple[Sequence, torch.Tensor]]] = {}
        for seq, row in plain:
            req = seq.request
            if not req.forked and req.params.n > 1:
                self._fork(seq, row)
                continue
            key = ("seeded", seq.seq_id) if seq.generator is not None else _params_key(req.params.sampling)
            groups.setdefault(key, []).append((seq, row))
        for group in groups.values():
            seqs = [s for s, _ in group]
            rows = torch.stack([r for _, r in group])  # (G, V)
            toks = self._select(seqs, rows)
            for seq, row, tok in zip(seqs, rows, toks.tolist()):
                seq.request.forked = True
                self._append(seq, [tok], row[None])

    def _select(self, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor:
        p = seqs[0].request.params.sampling
        seen = counts = None
        V = rows.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(len(seqs), V, dtype=torch.bool, device=rows.device)
            for i, s in enumerate(seqs):
                seen[i, torch.tensor(s.tokens, device=rows.device)] = True
        if p.frequency_penalty or p.presence_penalty:
            counts = torch.stack([torch.bincount(torch.tensor(s.tokens[s.prompt_len:], dtype=torch.long,
                                                              device=rows.device), minlength=V)[:V].float()
                                  for s in seqs])
        lg = apply_penalties(rows, p, seen, counts)
        if p.greedy:
            return lg.argmax(-1)
        return torch.multinomial(sampling_probs(lg, p), 1, generator=seqs[0].generator).squeeze(-1)

    def _fork(self, parent: Sequence, row: torch.Tensor) -> None:
        """The prompt is computed: make the other n - 1 sequences, sharing its blocks, and sample each."""
        req = parent.request
        req.forked = True
        seqs = [parent]
        for i in range(1, req.params.n):
            child = self._new_seq(req, i, list(parent.tokens))
            child.table = self.blocks.fork(parent.table)
            child.num_computed, child.hashes = parent.num_computed, list(parent.hashes)
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
            seqs.append(child)
        self.scheduler.running.sort(key=lambda s: s.request.arrival)
        for seq in seqs:
            tok = self._select([seq], row[None])
            self._append(seq, tok.tolist(), row[None])

    def _verify_draft(self, seq: Sequence, lg: torch.Tensor) -> None:
        """Leviathan et al.'s rule with a one-hot draft: accept token d with probability p(d); at the first
        rejection sample from p with d removed; after all accepted, one more token from the last row."""
        p = seq.request.params.sampling
        draft, seq.draft = seq.draft, []
        out: list[int] = []
        for i, d in enumerate(draft):
            if p.greedy:
                tok = int(lg[i].argmax())
                out.append(tok)
                if tok != d:
                    break
                continue
            probs = sampling_probs(lg[i:i + 1], p)[0]
            u = torch.rand((), generator=seq.generator, device=probs.device)
            if float(u) < float(probs[d]):
                out.append(d)
                continue
            probs[d] = 0.0
            out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=seq.generator)))
            break
        else:
            out.append(self._select([seq], lg[-1:]).item())
        accepted = len(out) - 1  # drafts kept; their KV is valid
        seq.num_computed += accepted
        self._append(seq, out, lg[:len(out)])

    def _append(self, seq: Sequence, toks: list[int], rows: torch.Tensor) -> None:
        """Add sampled tokens (stopping early at a stop id or the budget) and report them."""
        req = seq.request
        k = req.params.logprobs
        lps = torch.log_softmax(rows, dim=-1) if k is not None else None
        for i, tok in enumerate(toks):
            seq.tokens.append(tok)
            seq.new_ids.append(tok)
            self._stats.generated_tokens += 1
            if lps is not None:
                seq.new_logprobs.append(self._token_logprob(lps[i], tok, k))
            reason = None
            if tok in req.params.stop_ids and not req.params.ignore_eos:
                reason = "stop"
            elif seq.num_generated >= req.max_tokens or len(seq.tokens) >= self.max_model_len:
                reason = "length"
            if reason:
                seq.num_computed = min(seq.num_computed, len(seq.tokens) - 1)
                self._register(seq)
                self._finish(seq, reason)
                return
        seq.num_computed = min(seq.num_computed, len(seq.tokens) - 1)
        self._register(seq)

    # -- beam search ---------------------------------------------------------------------------------------------
    def _beam_step(self, req: Request) -> None:
        live = sorted((s for s in req.seqs if s.status is not Status.FINISHED), key=lambda s: s.index)
        if any(s.last_logprobs is None for s in live):
            return  # another beam is still being (re)computed
        state: BeamState = req.beam
        if len(live) == 1 and state.width > 1:  # first step: every beam starts from the prompt
            live = live * state.width
        log_probs = torch.stack([s.last_logprobs for s in live]).cpu()  # (K, V); the bookkeeping is on the CPU
        src, toks, stop = state.advance(log_probs)
        if stop:
            for s in req.seqs:
                if s.status is not Status.FINISHED:
                    self._finish(s, "stop")
            req.finished_outputs = state.best(state.width)
            return
        # New beam j continues old beam src[j] with toks[j]: the first taker keeps the old sequence, the
        # others fork it (sharing its blocks; the partly filled last one is copied at the next write).
        takers: dict[int, list[int]] = {}
        for j, b in enumerate(src):
            takers.setdefault(id(live[b]), []).append(j)
        new_seqs: list[Sequence | None] = [None] * len(src)
        for seq in live:
            js = takers.pop(id(seq), None)
            if js is None:
                continue
            new_seqs[js[0]] = seq
            for j in js[1:]:
                child = self._new_seq(req, j, list(seq.tokens))
                child.table = self.blocks.fork(seq.table)
                child.num_computed, child.hashes = seq.num_computed, list(seq.hashes)
                child.status = Status.RUNNING
                self.scheduler.running.append(child)
                new_seqs[j] = child
        for seq in {id(s): s for s in live}.values():  # beams nobody continues
            if seq not in new_seqs:
                self.scheduler.remove(seq)
                seq.status, seq.finish_reason, seq.reported = Status.FINISHED, "pruned", True
                req.seqs.remove(seq)
        self.scheduler.running.sort(key=lambda s: s.request.arrival)
        for j, (seq, tok) in enumerate(zip(new_seqs, toks)):
            seq.index, seq.last_logprobs = j, None
            seq.tokens.append(tok)
            seq.num_computed = len(seq.tokens) - 1

    # -- outputs ------------------------------------------------------------------------------------------------
    def _collect(self) -> list[RequestOutput]:
        outs = []
        for rid, req in list(self.requests.items()):
            news = []
            for seq in req.seqs:
                if seq.new_ids or (seq.status is Status.FINISHED and not seq.reported):
                    news.append(SeqOutput(seq.index, seq.new_ids, seq.new_logprobs if req.params.logprobs is not None
                                          else None, seq.finish_reason if seq.status is Status.FINISHED else None))
                    seq.new_ids, seq.new_logprobs = [], []
                    if seq.status is Status.FINISHED:
                        seq.reported = True
            plp = None
            if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and (
                    len(req.prompt_logprobs) >= req.prompt_len or req.finished):
                plp, req.prompt_logprobs_sent = req.prompt_logprobs, True
            done = req.finished
            if news or plp is not None or done:
                outs.append(RequestOutput(rid, news, req.prompt_len, plp, done, req.cached_tokens))
            if done:
                del self.requests[rid]
        return outs

    # -- offline API -----------------------------------------------------------------------------------------
    def generate(self, prompts: Iterable[list[int]], params: RequestParams | list[RequestParams]) -> list[Finished]:
        """Run many prompts to completion through the same scheduler; results in prompt order."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._seq_ids)}" for _ in prompts]
        results: dict[str, Finished] = {}
        pending = list(zip(ids, prompts, plist))
        while pending or self.has_unfinished():
            while pending and len(self.scheduler.waiting) < self.config.max_waiting:
                rid, prompt, p = pending.pop(0)
                self.add_request(rid, prompt, p)
                n = p.n
                results[rid] = Finished([[] for _ in range(n)], [""] * n,
                                        [[] for _ in range(n)] if p.logprobs is not None else None)
            for out in self.step():
                r = results[out.request_id]
                for so in out.outputs:
                    r.ids[so.index].extend(so.new_ids)
                    if so.logprobs is not None and r.logprobs is not None:
                        r.logprobs[so.index].extend(so.logprobs)
                    if so.finish_reason:
                        r.finish_reasons[so.index] = so.finish_reason
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
        return [results[i] for i in ids]

    def beam_search(self, prompt: list[int], num_beams: int, max_tokens: int, *, num_return: int = 1,
                    length_penalty: float = 1.0, early_stopping: bool | str = False,
                    eos_ids: set[int] | None = None) -> list[Beam]:
        """Beam search (``infer/beam.py``'s semantics) on the engine: the beams are sequences sharing KV
        blocks, forked copy-on-write instead of copying a cache. It steps the engine until the search ends, so
        it refuses to run beside other requests (their outputs would go nowhere). -> the ``num_return`` best."""
        if not 1 <= num_return <= num_beams:
            raise EngineError(f"num_return must be in [1, num_beams={num_beams}], got {num_return}", param="n")
        if self.requests:
            raise EngineError(f"{len(self.requests)} requests are in flight: beam_search steps the engine to the end "
                              "of the search, so finish or abort them first")
        budget = min(max_tokens, self.max_model_len - len(prompt))
        if budget < 1:
            raise EngineError("the prompt fills the context", param="prompt")
        rid = f"beam-{next(self._seq_ids)}"
        beam = BeamState(num_beams, budget, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_ids=eos_ids)
        self.add_request(rid, prompt, RequestParams(max_tokens=budget, stop_ids=frozenset(eos_ids or ())), beam=beam)
        req = self.requests[rid]
        while rid in self.requests:
            self.step()
        return req.finished_outputs[:num_return]
