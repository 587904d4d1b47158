"""Decoding: sampling warpers vs transformers, batched = solo, stop strings, beam search vs transformers,
speculative decoding (greedy identical; sampled distribution equals the target's)."""

from __future__ import annotations

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.infer.beam import beam_search
from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams, apply_penalties, warp
from llmlab.infer.speculative import ModelDrafter, NgramDrafter, layer_skip_draft, speculative_generate
from llmlab.models import build_model, get_preset
from tests.conftest import need


@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"), ({"presence_penalty": -2.5}, "presence_penalty"),
])
def test_invalid_sampling_parameters(kwargs, needle):
    with pytest.raises(LlmlabError, match=needle):
        SamplingParams(**kwargs).validate()


def test_warpers_match_transformers():
    transformers = need("transformers")
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    ids = torch.randint(0, 100, (4, 7))
    cases = [
        (SamplingParams(temperature=0.7), [lp.TemperatureLogitsWarper(0.7)]),
        (SamplingParams(temperature=1.0, top_k=10), [lp.TopKLogitsWarper(10)]),
        (SamplingParams(temperature=1.0, top_p=0.8), [lp.TopPLogitsWarper(0.8)]),
        (SamplingParams(temperature=1.0, min_p=0.1), [lp.MinPLogitsWarper(0.1)]),
        (SamplingParams(temperature=0.5, top_k=20, top_p=0.9),
         [lp.TemperatureLogitsWarper(0.5), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9)]),
    ]
    assert transformers is not None
    for params, procs in cases:
        expected = logits.clone()
        for proc in procs:
            expected = proc(ids, expected)
        got = warp(logits, params)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), params  # the same tokens masked
        assert torch.equal(got, expected), params  # and the same values, bit for bit
    # repetition penalty: seen = tokens in ids
    seen = torch.zeros(4, 100, dtype=torch.bool)
    seen.scatter_(1, ids, True)
    expected = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    got = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), seen, None)
    assert torch.equal(got, expected)


def test_frequency_presence_penalty_and_bias_formula():
    logits = torch.zeros(1, 5)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0, 0.0]])
    got = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={4: 2.0}),
                          None, counts)
    assert got.tolist() == [[0.0, -1.5, -2.5, 0.0, 2.0]]


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
           "Here is a list of ten fruits, one per line:\n1. Apple\n2."]


@pytest.mark.slow
def test_batched_rows_equal_solo_greedy_and_seeded(smollm):
    ids = [smollm.tokenizer.encode(p) for p in PROMPTS]
    for params in (SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95, seed=7)):
        solo = [generate(smollm.model, [p], 20, params)[0].ids for p in ids]
        batch = [c.ids for c in generate(smollm.model, ids, 20, params)]
        assert batch == solo
    again = [c.ids for c in generate(smollm.model, ids, 20, SamplingParams(temperature=0.9, top_p=0.95, seed=7))]
    assert again == batch


@pytest.mark.slow
def test_stop_string_spanning_tokens(smollm):
    tok = smollm.tokenizer
    ids = tok.encode(PROMPTS[2])
    full = generate(smollm.model, [ids], 30, tokenizer=tok)[0]
    assert "\n4." in full.text
    stop = "Grape"  # a word that spans several tokens in this output
    pieces = [tok.decode([i]) for i in full.ids]
    assert "".join(pieces) == full.text and stop in full.text
    ends = [sum(len(x) for x in pieces[:k + 1]) for k in range(len(pieces))]  # end offset of each token
    first = next(k for k, e in enumerate(ends) if e > full.text.index(stop))
    last = next(k for k, e in enumerate(ends) if e >= full.text.index(stop) + len(stop))
    assert last > first, pieces[first]  # no single token holds the stop string: the matcher must join tokens
    cut = generate(smollm.model, [ids], 30, stop_strings=[stop, "\n4."], tokenizer=tok)[0]
    assert cut.finish_reason == "stop" and "\n4." not in cut.text and full.text.startswith(cut.text)
    assert len(cut.ids) < len(full.ids)


@pytest.mark.slow
def test_beam_search_matches_transformers(smollm, hf_smollm):
    tok = smollm.tokenizer
    chat = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"
    for k, prompt in ((2, PROMPTS[0]), (4, PROMPTS[1]), (4, chat)):
        ids = tok.encode(prompt)
        ours = beam_search(smollm.model, ids, 20, k, eos_ids={tok.eos_id})[0].ids
        with torch.inference_mode():
            ref = hf_smollm.generate(torch.tensor([ids]), num_beams=k, max_new_tokens=20, do_sample=False,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2,
                                     eos_token_id=tok.eos_id)[0, len(ids):].tolist()
        assert ours == ref, (k, prompt)


def test_beam_search_options_on_tiny_model():
    torch.manual_seed(0)
    model = build_model(get_preset("llama-tiny")).eval()
    prompt = [1, 2, 3, 4]
    beams = beam_search(model, prompt, 12, 4, num_return=3, no_repeat_ngram_size=2)
    assert len(beams) == 3 and beams[0].score >= beams[1].score >= beams[2].score
    for b in beams:
        seq = prompt + b.ids
        bigrams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert len(bigrams) == len(set(bigrams))
    # beam width 1 is greedy
    assert beam_search(model, prompt, 10, 1)[0].ids == generate(model, [prompt], 10)[0].ids


@pytest.mark.slow
def test_speculative_greedy_is_token_identical(smollm):
    tok = smollm.tokenizer
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun."
    ids = tok.encode(smollm.render_chat("Repeat this sentence exactly:\n" + text))
    plain = generate(smollm.model, [ids], 40, stop_ids={tok.eos_id, 2})[0].ids
    for drafter in (NgramDrafter(), ModelDrafter(layer_skip_draft(smollm.model, 3), 512)):
        out, stats = speculative_generate(smollm.model, ids, 40, drafter, gamma=5, stop_ids={tok.eos_id, 2},
                                          adaptive=False)  # every step drafts
        assert out == plain
    assert stats.target_calls > 0


def _tiny(seed: int, vocab: int = 8):
    cfg = get_preset("llama-tiny")
    cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim = vocab, 16, 2, 1, 8, 32
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # spread but dissimilar laws (TV 0.34 between the two) make the test sensitive
    return model


def test_speculative_sampling_matches_target_distribution():
    """Empirical joint law of 2 tokens from speculative sampling vs the exact target law (TV distance)."""
    target, draft = _tiny(0), _tiny(1)
    prompt = [1, 2, 3]
    with torch.inference_mode():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.stack([p1[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(8)])
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
        q_joint = torch.stack([q1[a] * draft(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(8)])
    # the test has power: the draft's own law is far from the target's
    assert 0.5 * (q_joint - exact).abs().sum() > 0.3
    n = 2500
    counts = torch.zeros(8, 8)
    g = torch.Generator().manual_seed(0)
    drafter = ModelDrafter(draft, 16)
    for _ in range(n):
        drafter.cache.length = 0
        out, _ = speculative_generate(target, prompt, 2, drafter, gamma=2, adaptive=False,  # always drafts
                                      params=SamplingParams(temperature=1.0, seed=int(torch.randint(0, 2**31, (1,),
                                                                                                      generator=g))))
        counts[out[0], out[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.06, tv


def test_speculative_rejects_bad_settings():
    model = _tiny(0)
    with pytest.raises(ValueError, match="penalties"):
        speculative_generate(model, [1, 2], 4, NgramDrafter(), params=SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(model, [1, 2], 4, NgramDrafter(), gamma=0)


@pytest.mark.slow
def test_explore_report(smollm, tmp_path):
    from llmlab.infer.explore import explore, write_report

    tok = smollm.tokenizer
    ids = tok.encode("The capital of France is")
    ex = explore(smollm.model, tok, ids, "The capital of France is", steps=6, top=5, num_beams=3,
                 stop_ids=smollm.stop_ids())
    greedy = generate(smollm.model, [ids], 6, stop_ids=smollm.stop_ids())[0].ids
    assert "".join(s["chosen"] for s in ex.steps) == tok.decode(greedy)
    for step in ex.steps:
        probs = [p for _, p in step["candidates"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    best = beam_search(smollm.model, ids, 6, 3, eos_ids=smollm.stop_ids())[0]
    assert ex.beams[0][0] == tok.decode(best.ids, skip_special=True)
    assert all(len(step["live"]) <= 3 for step in ex.beam_trace)
    paths = write_report(ex, tmp_path / "out")
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    for key in ("steps", "beams"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
