"""Sampling, exactly: hand-computed masks at the boundaries of every warper and penalty, parity with
transformers' logits processors on a batch, the validation ranges' edges, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.infer.sample import SamplingParams, apply_penalties, make_generator, select, warp
from tests.conftest import need

INF = float("-inf")


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.0}, {"top_p": 1e-6}, {"min_p": 0.0}, {"min_p": 1.0},
    {"repetition_penalty": 1e-3}, {"frequency_penalty": 2.0}, {"frequency_penalty": -2.0},
    {"presence_penalty": 2.0}, {"presence_penalty": -2.0},
])
def test_validate_accepts_the_edges_of_each_range(kwargs):
    p = SamplingParams(**kwargs)
    assert p.validate() is p


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1e-6}, "temperature must be >= 0"), ({"temperature": math.nan}, "temperature must be >= 0"),
    ({"top_k": 1.5}, "top_k must be an integer >= 0"), ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"), ({"top_p": 1.0001}, "top_p must be in (0, 1]"),
    ({"min_p": -1e-6}, "min_p must be in [0, 1]"), ({"min_p": 1.0001}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"frequency_penalty": 2.0001}, "frequency_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -2.0001}, "frequency_penalty must be in [-2, 2]"),
    ({"presence_penalty": 2.0001}, "presence_penalty must be in [-2, 2]"),
    ({"presence_penalty": -2.0001}, "presence_penalty must be in [-2, 2]"),
])
def test_validate_rejects_just_outside_each_range(kwargs, message):
    with pytest.raises(LlmlabError) as err:
        SamplingParams(**kwargs).validate()
    assert str(err.value).startswith(message)


def test_greedy_means_temperature_zero():
    assert SamplingParams().greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_temperature_divides():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert warp(logits, SamplingParams(temperature=0.5)).tolist() == [[4.0, -2.0, 1.0]]


def test_top_k_keeps_exactly_k_per_row_and_all_when_k_covers_the_vocab():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    got = warp(logits, SamplingParams(temperature=1.0, top_k=2))
    assert got.tolist() == [[INF, 5.0, INF, INF, 4.0], [5.0, 4.0, INF, INF, INF]]
    assert warp(logits, SamplingParams(temperature=1.0, top_k=1)).isfinite().sum(-1).tolist() == [1, 1]
    for k in (0, 5, 9):  # off, or as many as the vocabulary: nothing is masked
        assert torch.equal(warp(logits, SamplingParams(temperature=1.0, top_k=k)), logits)


def test_top_p_boundary_is_inclusive_like_transformers():
    # Uniform over 4 tokens: each probability is exactly 0.25, the cumulative sums exactly 0.25 ... 1.0.
    logits = torch.zeros(2, 4)
    kept = [warp(logits, SamplingParams(temperature=1.0, top_p=q)).isfinite().sum(-1).tolist()
            for q in (0.5, 0.75, 0.74, 1e-3)]
    # top_p=0.5: tokens whose cumulative mass (ascending) is <= 0.5 are dropped: exactly two remain.
    assert kept == [[2, 2], [3, 3], [3, 3], [1, 1]]


def test_top_p_always_keeps_the_most_likely_token_and_maps_back_to_vocab_order():
    logits = torch.tensor([[0.0, 9.0, 1.0, 8.0], [7.0, 0.0, 0.0, 0.0]])
    got = warp(logits, SamplingParams(temperature=1.0, top_p=1e-4))
    assert got.tolist() == [[INF, 9.0, INF, INF], [7.0, INF, INF, INF]]
    # mass 0.73 + 0.27 ~ top two of row 0; row 1's top token alone has 0.99+
    got = warp(logits, SamplingParams(temperature=1.0, top_p=0.9))
    assert got.isfinite().tolist() == [[False, True, False, True], [True, False, False, False]]


def test_min_p_threshold_is_relative_to_each_rows_top_probability():
    # probabilities row 0: [0.5, 0.25, 0.25] (ties at the top of row 1)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.4, 0.4, 0.2]]))
    got = warp(logits, SamplingParams(temperature=1.0, min_p=0.6)).isfinite().tolist()
    assert got == [[True, False, False], [True, True, False]]
    # min_p = 1: only tokens tied with the top survive (a token at exactly the threshold is kept)
    got = warp(torch.zeros(2, 3), SamplingParams(temperature=1.0, min_p=1.0))
    assert got.isfinite().all()
    assert warp(logits, SamplingParams(temperature=1.0, min_p=0.0)).isfinite().all()


def test_warpers_match_transformers_on_a_batch_in_order():
    need("transformers")
    from transformers.generation import logits_process as lp

    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    p = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05)
    expected = logits.clone()
    for proc in (lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(30), lp.TopPLogitsWarper(0.9),
                 lp.MinPLogitsWarper(0.05)):
        expected = proc(ids, expected)
    got = warp(logits, p)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.allclose(got[got.isfinite()], expected[expected.isfinite()], atol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    got = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, None)
    assert got.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    # no record of seen tokens, or a penalty of 1: unchanged
    assert apply_penalties(logits, SamplingParams(repetition_penalty=2.0), None, None).tolist() == logits.tolist()
    assert apply_penalties(logits, SamplingParams(), seen, None).tolist() == logits.tolist()


def test_repetition_penalty_matches_transformers():
    need("transformers")
    from transformers.generation import logits_process as lp

    torch.manual_seed(2)
    logits = torch.randn(2, 20) * 3
    ids = torch.tensor([[1, 5, 5, 7], [0, 19, 3, 3]])
    seen = torch.zeros(2, 20, dtype=torch.bool).scatter_(1, ids, True)
    expected = lp.RepetitionPenaltyLogitsProcessor(0.7)(ids, logits.clone())
    assert torch.equal(apply_penalties(logits, SamplingParams(repetition_penalty=0.7), seen, None), expected)


def test_frequency_and_presence_penalties_each_on_their_own():
    logits = torch.zeros(2, 3)
    counts = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    only_presence = apply_penalties(logits, SamplingParams(presence_penalty=0.5), None, counts)
    assert only_presence.tolist() == [[0.0, -0.5, -0.5], [-0.5, 0.0, 0.0]]
    only_frequency = apply_penalties(logits, SamplingParams(frequency_penalty=0.5), None, counts)
    assert only_frequency.tolist() == [[0.0, -0.5, -1.0], [-1.5, 0.0, 0.0]]
    # without counts there is nothing to penalize
    assert apply_penalties(logits, SamplingParams(frequency_penalty=1.0), None, None).tolist() == logits.tolist()


def test_logit_bias_adds_to_every_row_and_leaves_the_input_alone():
    logits = torch.zeros(2, 4)
    got = apply_penalties(logits, SamplingParams(logit_bias={1: 1.5, 3: -2.0}), None, None)
    assert got.tolist() == [[0.0, 1.5, 0.0, -2.0]] * 2
    assert logits.tolist() == [[0.0] * 4] * 2


def test_select_greedy_is_argmax_per_row_after_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 4.9]], dtype=torch.float16)
    assert select(logits, SamplingParams()).tolist() == [1, 0]
    # a bias moves the argmax
    assert select(logits, SamplingParams(logit_bias={2: 0.2})).tolist() == [1, 2]


def test_select_sampling_uses_the_given_generator_and_returns_one_id_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    p = SamplingParams(temperature=1.0)
    a = select(logits, p, make_generator(123, torch.device("cpu")))
    torch.manual_seed(99)  # the global generator must not matter
    b = select(logits, p, make_generator(123, torch.device("cpu")))
    assert a.shape == (3,) and a.dtype == torch.int64 and torch.equal(a, b)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(a, torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1))
    # top_k=1 leaves one choice: sampling returns the argmax
    assert select(logits, SamplingParams(temperature=2.0, top_k=1)).tolist() == logits.argmax(-1).tolist()


def test_make_generator():
    assert make_generator(None, torch.device("cpu")) is None
    g = make_generator(7, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_select_applies_the_seen_tokens_and_counts_it_is_given():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert select(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]  # 2/2 < 1.5
    counts = torch.tensor([[1.0, 0.0, 0.0]])
    assert select(logits, SamplingParams(frequency_penalty=1.0), counts=counts).tolist() == [1]  # 2-1 < 1.5


def test_chat_sampling_layers_defaults_recommended_and_overrides():
    from llmlab.infer import sample

    base = sample.chat_sampling()
    assert (base.temperature, base.top_p, base.repetition_penalty) == (0.7, 0.9, 1.1)
    rec = sample.chat_sampling({"temperature": 0.3, "top_k": 20})
    assert (rec.temperature, rec.top_k, rec.top_p) == (0.3, 20, 0.9)
    over = sample.chat_sampling({"temperature": 0.3}, temperature=0.9, top_p=None)
    assert (over.temperature, over.top_p) == (0.9, 0.9)  # None means "not given"
    greedy = sample.chat_sampling({"temperature": 0.3}, greedy=True, repetition_penalty=1.2)
    assert greedy == SamplingParams(repetition_penalty=1.2) and greedy.greedy
    with pytest.raises(LlmlabError, match="top_p"):
        sample.chat_sampling(top_p=2.0)


def test_top_p_of_one_is_off_even_for_tokens_of_probability_zero():
    logits = torch.tensor([[0.0, -200.0, -1e4]])  # softmax underflows to exactly 0 for the last two
    assert torch.equal(warp(logits, SamplingParams(temperature=1.0, top_p=1.0)), logits)


def test_top_p_fast_path_matches_transformers_on_a_large_vocabulary():
    """The top-k fast path of ``_top_p`` (nucleus inside the 64 or 1,024 most likely tokens) and its sort
    fallback (a flat row) give transformers' nucleus on SmolLM2-sized logits, peaked to flat."""
    need("transformers")
    from transformers.generation import logits_process as lp

    from llmlab.infer import sample

    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    paths = []
    for scale in (0.5, 3.0, 12.0):  # 0.5: the nucleus spans most of the vocabulary (the sort)
        logits = torch.randn(2, 49152, generator=gen) * scale
        for q in (0.5, 0.9):
            expected = lp.TopPLogitsWarper(q)(ids, logits.clone())
            got = warp(logits, SamplingParams(temperature=1.0, top_p=q))
            assert torch.equal(got.isinf(), expected.isinf()), (scale, q)
            paths.append(int(got.isfinite().sum(-1).max()))
    assert min(paths) <= sample.TOP_P_CANDIDATES[0] < max(paths) and max(paths) > sample.TOP_P_CANDIDATES[-1]


def test_top_p_benchmark_readme_command():
    """The README's `python benchmarks/top_p.py` with a tiny budget: real SmolLM2 logits, the same masks as
    transformers (asserted inside), a speedup line printed last."""
    need("transformers")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert "`python benchmarks/top_p.py`" in (root / "README.md").read_text(encoding="utf-8")
    r = subprocess.run([sys.executable, "benchmarks/top_p.py", "--runs", "2"], cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("speedup: ")
