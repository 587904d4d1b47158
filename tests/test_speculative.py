"""Speculative decoding on the packed fast path (infer/speculative.py through models/native_step.py): token-identical
to plain greedy, rejected drafts rolled back in the KV cache, the adaptive draft length and the longest-match
prompt lookup against hand-computed values, the layer-skip draft on its own native step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams
from llmlab.infer.speculative import DraftLength, ModelDrafter, NgramDrafter, layer_skip_draft, speculative_generate
from test_native_step import _tiny

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def packed():
    """The tiny random Llama of test_native_step, Q8_0-packed, blocks in C."""
    return _tiny(0)


def _prompt() -> list[int]:
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, 256, (20,), generator=g).tolist()
    return text + [7, 8] + text[:6]  # the text again, cut short: prompt lookup has something to copy


class ScriptedDrafter:
    """Drafts the reference greedy continuation, with every ``wrong``-th drafted token replaced: accepted runs,
    rejections at known places (a random tiny model copies nothing, so prompt lookup alone would draft few)."""

    cost_per_token = 0.0

    def __init__(self, prompt: list[int], reference: list[int], wrong: int = 5):
        self.n, self.reference, self.wrong, self.count = len(prompt), reference, wrong, 0

    def propose(self, seq, gamma, params, generator=None):
        draft = self.reference[len(seq) - self.n:len(seq) - self.n + gamma]
        for i in range(len(draft)):
            self.count += 1
            if self.count % self.wrong == 0:
                draft[i] = (draft[i] + 1) % 256
        return draft, None

    def rollback(self, length: int) -> None:
        pass


@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_token_identical_on_the_native_step(packed, adaptive, monkeypatch):
    calls = []
    real = packed.native_step.blocks
    monkeypatch.setattr(packed.native_step, "blocks", lambda x, *a: calls.append(x.shape[1]) or real(x, *a))
    prompt = _prompt()
    plain = generate(packed, [prompt], 60)[0].ids
    for drafter in (ScriptedDrafter(prompt, plain), NgramDrafter()):
        calls.clear()
        out, stats = speculative_generate(packed, prompt, 60, drafter, gamma=6, adaptive=adaptive)
        assert out == plain
        # one target call per iteration (the last token and its draft together), every one of them in C
        assert len(calls) == stats.target_calls and sum(calls) == len(prompt) + stats.rows
        assert stats.rows == stats.target_calls - 1 + stats.drafted  # 1 + k rows per call after the prompt
        if isinstance(drafter, ScriptedDrafter):
            assert stats.accepted > 30 and stats.drafted > stats.accepted, stats  # accepted runs and rejections
            assert max(calls[1:]) > 3  # verifications of several rows ran through the native step
            assert stats.target_calls < 30


@torch.inference_mode()
def test_rejected_drafts_are_rolled_back(packed):
    """A verification writes K/V for its rejected rows too; moving ``cache.length`` back and writing the correction
    there gives bit for bit the logits of a run that never saw the rejected tokens."""
    prompt = _prompt()
    a, b = packed.new_cache(1, 64), packed.new_cache(1, 64)
    packed(torch.tensor([prompt]), cache=a)
    packed(torch.tensor([prompt]), cache=b)
    n = len(prompt)
    packed(torch.tensor([[11, 12, 13, 14]]), cache=a, start=n)  # 11 accepted, 12..14 rejected
    a.length = n + 1
    after_rollback = packed(torch.tensor([[99, 5]]), cache=a)[0]
    packed(torch.tensor([[11]]), cache=b)
    straight = torch.cat([packed(torch.tensor([[t]]), cache=b)[0] for t in (99, 5)])
    assert a.length == b.length == n + 3
    assert torch.equal(after_rollback, straight)
    assert torch.equal(a.k[:, :, :, :n + 3], b.k[:, :, :, :n + 3])


def test_layer_skip_draft_gets_its_own_native_step(packed):
    draft = layer_skip_draft(packed, 2)  # layers 0 and 2 of 3
    assert draft.native_step is not None and draft.native_step is not packed.native_step
    assert len(draft.native_step.structs) == 2
    # the target's step refuses the draft (other layers, a smaller cache) instead of writing past its cache
    x = torch.zeros(1, 1, 64)
    with torch.inference_mode():  # (with a gradient it refuses anyway)
        assert not packed.native_step.accepts(draft, x, draft.new_cache(1, 8), None)
        assert not packed.native_step.accepts(draft, x, packed.new_cache(1, 8), None)  # other modules, same depth
        assert not packed.native_step.accepts(packed, x, draft.new_cache(1, 8), None)  # a cache of 2 layers, not 3
        assert packed.native_step.accepts(packed, x, packed.new_cache(1, 8), None)
    prompt = _prompt()
    out, stats = speculative_generate(packed, prompt, 30, ModelDrafter(draft, 80), gamma=3)
    assert out == generate(packed, [prompt], 30)[0].ids
    assert stats.drafted > 0


def test_draft_length_hand_computed():
    """k maximises (1 + a + ... + a^k) / (1 + c k); a = hits / (hits + misses), each old outcome weighted by decay."""
    dl = DraftLength(8, row_cost=0.35)
    # prior a = 0.5: k=1 1.5/1.35 = 1.111 > k=2 1.75/1.70 = 1.029 > k=0 1.0
    assert dl.rate == 0.5 and dl.next() == 1
    dl.observe(8, False)  # hits 0.7 + 8 = 8.7, misses 0.7: a = 0.9255
    assert dl.rate == pytest.approx(8.7 / 9.4)
    assert dl.next() == 5  # k=4 4.309/2.40 = 1.795, k=5 4.988/2.75 = 1.814, k=6 5.616/3.10 = 1.812
    dl.observe(0, True)
    dl.observe(0, True)  # hits 4.263, misses 0.343 + 0.7 + 1 = 2.043: a = 0.676
    assert dl.rate == pytest.approx(4.263 / (4.263 + 2.043))
    assert dl.next() == 2  # k=1 1.676/1.35 = 1.241, k=2 2.133/1.70 = 1.255, k=3 2.442/2.05 = 1.191
    for _ in range(6):
        dl.observe(0, True)  # a = 0.136: k=1 1.136/1.35 = 0.84 < 1, a plain step
    assert dl.next() == 0


def test_ngram_drafter_prefers_the_longest_match():
    seq = [4, 1, 2, 3, 9, 0, 1, 2, 3, 7, 4, 1, 2, 3]
    # (4, 1, 2, 3) matched at 0..3 (followed by 9) beats the more recent (1, 2, 3) at 6..8 (followed by 7)
    assert NgramDrafter().propose(seq, 3, GREEDY)[0] == [9, 0, 1]
    assert NgramDrafter(max_ngram=3).propose(seq, 2, GREEDY)[0] == [7, 4]  # capped at 3: the most recent
    assert NgramDrafter().propose([5, 1, 2, 9, 6, 1, 2, 7, 8, 1, 2], 2, GREEDY)[0] == [7, 8]  # a tie: the most recent
    assert NgramDrafter(min_ngram=5).propose(seq, 2, GREEDY)[0] == []
    assert NgramDrafter().propose([5, 6], 4, GREEDY)[0] == []


def test_bad_settings(packed):
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(packed, [1, 2], 4, NgramDrafter(), gamma=0)
    with pytest.raises(ValueError, match="fills the context"):
        speculative_generate(packed, list(range(128)), 4, NgramDrafter())


def test_benchmark_command_on_the_real_model():
    """The README's command (benchmarks/speculative.py) with a small budget: SmolLM2-135M on the packed path quotes a
    paragraph, prompt lookup's drafts are accepted and the text is greedy's (the script exits non-zero otherwise)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "speculative.py"), "--runs", "1", "--new-tokens", "24",
           "--prompts", "quote a paragraph", "--no-layer-skip", "--cost-reps", "1", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("quote a paragraph")]
    assert len(rows) == 2 and all(row[-1] == "True" for row in rows), r.stdout
    accepted, drafted = map(int, rows[0][6].split("/"))  # quote a paragraph ngram adaptive TOKENS ACC/DRAFTED
    assert accepted >= 16 and accepted == drafted, r.stdout
    assert r.stdout.strip().splitlines()[-1].lstrip().startswith("ngram fixed 16:")
