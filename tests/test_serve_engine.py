"""The serving engine on a tiny random model: every feature gives exactly the tokens of the plain
generation loop (``infer/generate.py``) or of ``infer/beam.py``, under preemption, forks and drafts."""

from __future__ import annotations

import pytest
import torch

from llmlab.infer.beam import beam_search
from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams
from llmlab.models import build_model, get_preset
from llmlab.serve.block_manager import BlockManager
from llmlab.serve.engine import Engine, EngineConfig
from llmlab.serve.outputs import EngineError, EngineFull, RequestParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(get_preset("llama-tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # sharper distributions than the init: fewer near-ties
    return m


def _prompts(n, lo=3, hi=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def _engine(model, **kw):
    cfg = dict(block_size=4, kv_blocks=512, max_num_seqs=8, max_batched_tokens=32)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


@pytest.mark.parametrize("attention", ["kernel", "reference"])
def test_greedy_batch_equals_one_at_a_time(model, attention):
    prompts = _prompts(12)
    want = [generate(model, [p], 20)[0].ids for p in prompts]
    eng = _engine(model, attention=attention)
    got = [r.ids[0] for r in eng.generate(prompts, RequestParams(max_tokens=20))]
    assert got == want
    s = eng.stats()
    assert s.kv_blocks_used == 0 and s.running == 0 and s.waiting == 0 and s.finished == {"length": 12}


def test_kv_pressure_preempts_and_still_matches(model):
    """30 blocks of 4 positions cannot hold 8 running sequences of ~45 tokens: preemption happens (recompute),
    the pool is never exceeded, and every output equals its lone run."""
    prompts = _prompts(16, 10, 30, seed=2)
    want = [generate(model, [p], 24)[0].ids for p in prompts]
    eng = _engine(model, kv_blocks=30)
    peak = 0
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, RequestParams(max_tokens=24))
    got = {str(i): [] for i in range(16)}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id] += out.outputs[0].new_ids if out.outputs else []
        peak = max(peak, eng.blocks.num_used)
    assert [got[str(i)] for i in range(16)] == want
    assert eng.stats().preemptions > 0 and peak <= 30 and eng.blocks.num_free == 30


def test_prefix_cache_reuses_a_shared_system_prompt(model):
    system = _prompts(1, 40, 41, seed=3)[0]
    prompts = [system + q for q in _prompts(4, 3, 8, seed=4)]
    want = [generate(model, [p], 8)[0].ids for p in prompts]
    eng = _engine(model)
    first = eng.generate(prompts[:1], RequestParams(max_tokens=8))
    before = eng.stats().prompt_tokens
    rest = eng.generate(prompts[1:], RequestParams(max_tokens=8))
    assert [r.ids[0] for r in first + rest] == want
    s = eng.stats()
    assert s.prefix_hits >= 3 * (40 // 4)  # every later prompt found the 10 system blocks
    assert s.prompt_tokens - before <= sum(len(p) for p in prompts[1:]) - 3 * 40


def test_n_samples_fork_and_seeds_reproduce(model):
    p = _prompts(1, 12, 13, seed=5)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    eng = _engine(model)
    a = eng.generate([p], RequestParams(max_tokens=12, n=3, sampling=sp))[0]
    b = eng.generate([p, _prompts(1, 5, 6)[0]], [RequestParams(max_tokens=12, n=3, sampling=sp),
                                                   RequestParams(max_tokens=5)])[0]
    assert a.ids == b.ids and len({tuple(x) for x in a.ids}) > 1  # same samples in any batch; 3 differ
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_beam_search_in_engine_matches_reference(model):
    eng = _engine(model)
    for p in _prompts(3, 4, 20, seed=6):
        want = beam_search(model, p, 10, 4, num_return=2)
        got = eng.beam_search(p, 4, 10, num_return=2)
        assert [b.ids for b in got] == [b.ids for b in want]
        assert [round(b.score, 4) for b in got] == [round(b.score, 4) for b in want]
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_ngram_speculation_is_exact_for_greedy(model):
    prompts = [[5, 6, 7, 8, 9] * 3] + _prompts(3, 5, 20, seed=8)
    want = [generate(model, [p], 30)[0].ids for p in prompts]
    plain = _engine(model)
    plain.generate(prompts, RequestParams(max_tokens=30))
    eng = _engine(model, speculative_tokens=4)
    got = [r.ids[0] for r in eng.generate(prompts, RequestParams(max_tokens=30))]
    assert got == want
    assert eng.stats().steps < plain.stats().steps  # drafts were accepted


def test_prompt_logprobs_and_token_logprobs(model):
    p = _prompts(1, 9, 10, seed=9)[0]
    eng = _engine(model)
    r = eng.generate([p], RequestParams(max_tokens=3, logprobs=2, prompt_logprobs=True))[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + r.ids[0]]))[0].float(), -1)  # (T, V)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        assert r.prompt_logprobs[i].token == p[i]
        assert r.prompt_logprobs[i].logprob == pytest.approx(float(lp[i - 1, p[i]]), abs=1e-4)
    for j, t in enumerate(r.logprobs[0]):
        assert t.logprob == pytest.approx(float(lp[len(p) - 1 + j, r.ids[0][j]]), abs=1e-4)
        assert t.top[0][0] == r.ids[0][j] and len(t.top) == 2  # greedy: the chosen token is the top one
    echo = eng.generate([p], RequestParams(max_tokens=0, prompt_logprobs=True))[0]
    assert echo.ids == [[]] and [x and x.logprob for x in echo.prompt_logprobs] == pytest.approx(
        [x and x.logprob for x in r.prompt_logprobs], abs=1e-5)


def test_abort_frees_blocks_and_stop_ids_end_sequences(model):
    eng = _engine(model)
    prompts = _prompts(4, 10, 20, seed=10)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, RequestParams(max_tokens=50))
    eng.step()
    eng.step()
    eng.abort("1")
    outs = eng.step()
    assert any(o.request_id == "1" and o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_free == eng.blocks.num_blocks
    first = generate(model, [prompts[0]], 5)[0].ids
    stop = first[2]
    r = eng.generate([prompts[0]], RequestParams(max_tokens=20, stop_ids=frozenset({stop})))[0]
    assert r.ids[0] == first[:first.index(stop) + 1] and r.finish_reasons == ["stop"]


def test_admission_errors_name_the_numbers(model):
    eng = _engine(model, max_waiting=2)
    L = model.config.max_seq_len
    with pytest.raises(EngineError, match=rf"{L - 10} tokens and max_tokens is 20: {L + 10} exceeds .* {L} tokens"):
        eng.check([1] * (L - 10), RequestParams(max_tokens=20))
    with pytest.raises(EngineError, match=rf"{L} tokens and the model's context is {L}") as e:
        eng.check([1] * L, RequestParams(max_tokens=None))
    assert e.value.param == "prompt"
    assert eng.check([1] * (L - 1), RequestParams(max_tokens=None)) == 1
    with pytest.raises(EngineError, match="outside the vocabulary") as e:
        eng.check([1, 512], RequestParams())
    with pytest.raises(EngineError, match=r"n must be in \[1, 8\]") as e:
        eng.check([1], RequestParams(n=9))
    assert e.value.param == "n"
    small = _engine(model, kv_blocks=4)
    with pytest.raises(EngineError, match="needs 5 KV blocks and the cache holds 4"):
        small.check([1] * 10, RequestParams(max_tokens=10))
    eng.add_request("a", [1, 2], RequestParams())
    eng.add_request("b", [1, 2], RequestParams())
    with pytest.raises(EngineFull):
        eng.add_request("c", [1, 2], RequestParams())


def test_block_manager_refcounts_cow_and_lru():
    bm = BlockManager(4, 2)
    copies = []
    a = []
    bm.grow(a, 3, 0, lambda *x: copies.append(x))  # 2 blocks
    bm.register_full([1, 2, 3], a, 3, [])
    b = bm.fork(a)
    assert bm.ref[a[0]] == 2 and bm.num_free == 2
    bm.grow(b, 4, 3, lambda *x: copies.append(x))  # writes into the shared, partly filled block: copy it
    assert copies == [(a[1], b[1], 1)] and b[0] == a[0] and b[1] != a[1]
    bm.release(a)
    bm.release(b)
    assert bm.num_free == 4
    t = []
    assert bm.match_prefix([1, 2, 3], t) == 2 and bm.hits == 1  # the freed block is still cached
    bm.release(t)
    for _ in range(4):  # handing every block out again evicts the cached one
        bm._take()
    assert bm.match_prefix([1, 2, 3], []) == 0


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1e-300),
                                SamplingParams(temperature=1.0, repetition_penalty=5e-324),
                                SamplingParams(temperature=5e-324, top_p=0.5, seed=3)])
def test_extreme_valid_sampling_parameters_reach_their_limit(model, sp):
    """A temperature or repetition penalty near 0 overflows to inf/NaN; the row becomes its limit (the argmax
    of the penalized logits) instead of failing the step for every request in it (schemathesis found this)."""
    p = _prompts(1, 6, 7, seed=11)[0]
    eng = _engine(model)
    got = eng.generate([p], RequestParams(max_tokens=6, sampling=sp))[0]
    assert got.finish_reasons == ["length"] and len(got.ids[0]) == 6
    if sp.repetition_penalty == 1.0:  # temperature -> 0 is greedy
        assert got.ids[0] == generate(model, [p], 6)[0].ids


def test_beam_search_refuses_to_run_beside_other_requests(model):
    eng = _engine(model)
    eng.add_request("other", [1, 2, 3], RequestParams(max_tokens=4))
    with pytest.raises(EngineError, match="1 requests are in flight"):
        eng.beam_search([1, 2, 3], 2, 4)
