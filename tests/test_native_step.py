"""The native decode step (models/native_step.py, nn/csrc/llama_block.c) against the eager PyTorch blocks on the
same packed int8 layers: the eager model is the reference, the C step must give its numbers and its text."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.infer.generate import chat_stop_ids, generate
from llmlab.infer.sample import SamplingParams
from llmlab.models.config import ModelConfig
from llmlab.models.native_step import enable_native_step_
from llmlab.models.registry import build_model
from llmlab.nn.lora import LoRAConfig, apply_lora_
from llmlab.nn.packed_linear import pack_linears_q8_0_, set_impl_

TINY = ModelConfig(arch="llama", vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128,
                   max_seq_len=128, rope_theta=10000.0)


def _tiny(seed: int = 0, impl: str = "int8"):
    torch.manual_seed(seed)
    model = build_model(TINY).eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so activations have some spread
        for p in model.parameters():
            p.mul_(20 if p.dim() == 2 else 1)
    pack_linears_q8_0_(model, impl)
    status = enable_native_step_(model)
    if model.native_step is None:
        pytest.skip(status)
    assert status.startswith("native step: C kernel")
    return model


def _both(model, fn):
    """fn() with the native step, then with the eager blocks."""
    native = model.native_step
    try:
        a = fn()
        model.native_step = None
        b = fn()
    finally:
        model.native_step = native
    return a, b


def _calls(model, monkeypatch) -> list[int]:
    """Counts native block calls."""
    calls: list[int] = []
    real = model.native_step.blocks
    monkeypatch.setattr(model.native_step, "blocks", lambda *a: calls.append(1) or real(*a))
    return calls


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float16, torch.float32])
@pytest.mark.parametrize("impl", ["int8", "int8r", "int8x2"])
def test_steps_match_the_eager_blocks(monkeypatch, impl, kv):
    """Prefill chunks and decode steps, with and without a key mask: logits within 1e-3 of the eager blocks of the
    same integer impl (one or two Q8 rows per activation row), on a float16 cache (the native step's default) and
    a float32 one."""
    model = _tiny(impl=impl)
    model.kv_cache_dtype = kv
    calls = _calls(model, monkeypatch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :5] = False  # row 1 left-padded by 5

    def run():
        cache = model.new_cache(2, 32)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        outs = [model(ids[:, :9], cache=cache, attention_mask=mask[:, :9], position_ids=pos[:, :9])]
        for t in range(9, 24, 5):  # chunks of 5: a speculative verification's shape
            outs.append(model(ids[:, t:t + 5], cache=cache, attention_mask=mask[:, :t + 5],
                              position_ids=pos[:, t:t + 5]))
        return torch.cat(outs, 1), cache

    (a, ca), (b, cb) = _both(model, run)
    assert calls, "the native step never ran"
    if impl == "int8r":  # a last-bit difference in the norms can flip a block's outlier flag, so one path alone
        # adds that block's residual (about one int8 rounding step of the block): a few positions move by ~5e-3, the
        # rest agree to float rounding; a wrong residual moves every position by O(1)
        per_position = ((a - b).abs().amax(-1) / b.abs().max()).flatten()
        assert per_position.max() < 1e-2 and per_position.median() < 1e-5, per_position
    else:
        assert (a - b).abs().max() < 1e-3 * b.abs().max()
    # int8x2's second row quantizes the first one's rounding error (~1/254 of a block's scale), so the eager and C
    # paths' last-bit differences in the norms flip some of its int8 values: ~1e-4 of the cache's scale, not 1e-6
    tol = 1e-4 if impl == "int8" else 2e-4 * cb.k.abs().max().item()
    if impl == "int8r":  # as the logits: per (sequence, position), over layers, heads and dims
        for x, y in ((ca.k, cb.k), (ca.v, cb.v)):
            per_position = ((x - y).abs().amax((0, 2, 4)) / y.abs().max()).flatten()  # (B * S)
            assert per_position.max() < 1e-2 and per_position.median() < 1e-5, per_position
    else:  # a half cache: the two paths' last-bit differences can round to neighbouring halves (2^-10 apart)
        rtol = 2 ** -10 if kv == torch.float16 else 1e-5
        assert torch.allclose(ca.k.float(), cb.k.float(), atol=tol, rtol=rtol)
        assert torch.allclose(ca.v.float(), cb.v.float(), atol=tol, rtol=rtol)
    assert ca.k.dtype == cb.k.dtype == kv and ca.length == cb.length == 24


@pytest.mark.parametrize("impl", ["int8", "int8r", "int8x2"])
def test_generate_batched_equals_solo(monkeypatch, impl):
    """A row gives the same bits alone or in a ragged batch (the kernels' sums do not depend on the batch), so
    the same text; the eager comparison is the test above (a random model's near-ties would make text flaky)."""
    model = _tiny(2, impl)
    calls = _calls(model, monkeypatch)
    prompts = [[5, 9, 12], [7] * 11, list(range(30, 50)), [1, 2]]
    batched = [c.ids for c in generate(model, prompts, 16)]
    assert batched == [generate(model, [p], 16)[0].ids for p in prompts]
    assert calls


def test_a_repeated_prompt_is_prefilled_once():
    """GRPO's groups: prompts given several times are prefilled once each (2 rows here, not 5) and every copy
    continues from the copied cache rows exactly as the prompt does alone, greedy and seeded."""
    model = _tiny(2, "int8r")
    rows = []
    hook = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    a, b = [5, 9, 12], list(range(30, 50))
    prompts = [a, b, a, a, b]
    for params in (SamplingParams(), SamplingParams(temperature=0.9, seed=3)):
        rows.clear()
        got = [c.ids for c in generate(model, prompts, 16, params)]
        assert rows[0] == 2 and set(rows[1:]) == {5}, rows  # the prefill, then 15 steps of every row
        solo = {tuple(p): generate(model, [p], 16, params)[0].ids for p in (a, b)}
        assert got == [solo[tuple(p)] for p in prompts]
    hook.remove()


@torch.inference_mode()
def test_chunked_prefill_gives_the_same_bits(monkeypatch):
    from llmlab.models import native_step

    model = _tiny(4)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    whole = model(ids, cache=model.new_cache(3, 48))
    monkeypatch.setattr(native_step, "CHUNK_ROWS", 7)  # 2 positions of 3 rows per call
    assert torch.equal(model(ids, cache=model.new_cache(3, 48)), whole)


@torch.inference_mode()
@pytest.mark.parametrize("impl", ["int8", "int8r"])
def test_any_thread_count_gives_the_same_bits(impl):
    """A prefill of 8 x 11 rows and a decode step of 8 rows through the C blocks at 1, 2 and 3 threads: the same
    logits and cache, bit for bit. From 8 rows every step of a block is a parallel loop (the quantization, the
    products in spans of whole pairs, RoPE and the cache write, the attention, SwiGLU), and each writes its own
    rows or columns, so no thread count may change a result."""
    model = _tiny(5, impl)
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(3))

    def run():
        cache = model.new_cache(8, 16)
        prefill = model(ids[:, :11], cache=cache)
        step = model(ids[:, 11:], cache=cache)
        return prefill, step, cache.k.clone(), cache.v.clone()

    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(run())
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_the_step_steps_aside_when_the_model_changes(monkeypatch):
    """A LoRA wrapper, another impl, gradients, bfloat16, a copy: the eager blocks run (and agree with themselves)."""
    model = _tiny(3)
    calls = _calls(model, monkeypatch)
    ids = torch.randint(0, 256, (1, 6))
    with torch.inference_mode():
        model(ids, cache=model.new_cache(1, 16))
    assert len(calls) == 1
    model(ids, cache=model.new_cache(1, 16))  # gradients on: eager
    with torch.inference_mode():
        model(ids)  # no cache: eager
    assert len(calls) == 1
    for impl in ("float", "int8x2"):  # a step built for int8 does not run int8x2 layers (another struct)
        set_impl_(model, impl)
        with torch.inference_mode():
            model(ids, cache=model.new_cache(1, 16))
    set_impl_(model, "int8")
    assert len(calls) == 1
    assert copy.deepcopy(model).native_step is None
    apply_lora_(model, LoRAConfig(r=2, alpha=4.0, target_modules=["q_proj"]))
    with torch.inference_mode():
        model(ids, cache=model.new_cache(1, 16))
    assert len(calls) == 1


@pytest.mark.slow
def test_smollm2_native_step(smollm, smollm_path):
    """The real model: each block equals the eager block from the same input; the greedy text equals the eager
    int8 blocks' text; teacher-forced on 200 tokens, the perplexity is within 1% of the fp32 reference and the
    argmax agrees on >= 95% of positions (benchmarks/quality.py: +0.2% and 97% on 512 tokens)."""
    import inspect
    import json
    import math

    from llmlab.api import load

    llm = load(smollm_path, packed=True)
    model = llm.model
    assert llm.loaded.native_step.startswith("native step") and model.native_step is not None
    tok = llm.tokenizer
    with torch.inference_mode():  # block by block from the same input
        x = model.embed_tokens(torch.tensor([tok.encode("The capital of France is Paris, and")]))
        T = x.shape[1]
        rope = model.rotary(torch.arange(T)[None], x.dtype)
        cache_e, cache_n = model.new_cache(1, 16), model.new_cache(1, 16)
        errors = []
        for i, block in enumerate(model.layers):
            want = block(x, rope=rope, key_mask=None, cache=cache_e, layer=i, start=0)
            native = model.native_step
            structs, native.structs = native.structs, native.structs[i:i + 1]
            k, v = cache_n.k, cache_n.v
            cache_n.k, cache_n.v = k[i:i + 1], v[i:i + 1]
            try:
                got = native.blocks(x, rope, cache_n, 0, None)
            finally:
                native.structs, cache_n.k, cache_n.v = structs, k, v
            errors.append(((got - want).abs().max() / want.abs().max()).item())
            x = want
    # float rounding differs (torch's RMSNorm, SDPA vs C) and now and then flips one activation's int8 rounding:
    # ~1e-2 of the output where that happens, ~1e-8 where not. A wrong step is off by O(1).
    assert max(errors) < 2e-2 and sorted(errors)[len(errors) * 9 // 10] < 1e-4, errors
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
               "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"]
    ids = [tok.encode(p) for p in prompts]
    # up to the end of the turn, as chat does: past <|im_end|> the model rambles through near-ties, where one
    # flipped int8 rounding picks the other word (seen on an AVX512-VNNI machine, 20 tokens into the ramble)
    # and even before it, a near-tie can go either way: the C step's e^x and sums round differently from torch's
    # (seen: "def fibonacci" 22 tokens in, the two candidates 0.01 logit apart). So the texts must agree, or part
    # where the reference's own two candidates are within 0.05 logit; a wrong step parts early and by far more.
    stops = chat_stop_ids(model.config, tok)
    native, eager = _both(model, lambda: [generate(model, [i], 24, stop_ids=stops)[0].ids for i in ids])
    for prompt, a, b in zip(ids, native, eager):
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert k >= 8 and k < min(len(a), len(b)), (k, a, b)
        with torch.inference_mode():
            step, model.native_step = model.native_step, None
            try:
                logits = model(torch.tensor([prompt + b[:k]]))[0, -1]  # the eager reference's
            finally:
                model.native_step = step
        assert abs(logits[a[k]] - logits[b[k]]).item() < 0.05, (k, a, b)
    assert sum(a == b for a, b in zip(native, eager)) >= 2
    text = torch.tensor([tok.encode(inspect.getdoc(json))[:200]])  # the quality benchmark's text

    @torch.inference_mode()
    def forced(m):
        cache = m.new_cache(1, text.shape[1])
        return torch.cat([m(text[:, t:t + 8], cache=cache) for t in range(0, text.shape[1], 8)], 1)[0]

    got, ref = forced(model), forced(smollm.model)
    ppl = [math.exp(torch.nn.functional.cross_entropy(lg[:-1], text[0, 1:]).item()) for lg in (got, ref)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.01, ppl
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@torch.inference_mode()
def test_smollm2_half_kv_cache(smollm, smollm_path):
    """``kv_dtype="float16"``: the C step writes and reads a half cache (the native step runs on it), and the real
    model teacher-forced on 200 tokens stays within 1% perplexity of the fp32 reference, the argmax the same on
    >= 95% of positions (benchmarks/quality.py on 1,164 tokens: +0.03%, 98.7%)."""
    import inspect
    import json
    import math

    from llmlab.api import load

    model = load(smollm_path, packed=True, kv_dtype="float16").model
    text = torch.tensor([smollm.tokenizer.encode(inspect.getdoc(json))[:200]])
    cache = model.new_cache(1, text.shape[1])
    assert cache.k.dtype == cache.v.dtype == torch.float16
    assert model.native_step.accepts(model, torch.zeros(1, 1, model.config.dim), cache, None)
    got = torch.cat([model(text[:, t:t + 8], cache=cache) for t in range(0, text.shape[1], 8)], 1)[0]
    ref = smollm.model(text)[0]
    ppl = [math.exp(torch.nn.functional.cross_entropy(lg[:-1], text[0, 1:]).item()) for lg in (got, ref)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.01, ppl
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    with pytest.raises(LlmlabError, match="kv_dtype must be one of float32, float16"):
        load(smollm_path, kv_dtype="bfloat16")


def test_half_conversion_matches_pytorch(monkeypatch):
    """The cache write's float -> half (llama_block.c) rounds as PyTorch's .to(float16) in every build this CPU
    runs, the portable integer version included: ties to even, subnormals, overflow to inf, signed zeros."""
    import ctypes

    from llmlab.models import native_step
    from llmlab.nn.cpu_kernels import runnable_variants

    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, float("inf"),
                            float("-inf"), 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001, 3 * 2.0 ** -26,
                            2.0 ** -24 * 1.5, 2.0 ** -24 * 2.5, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1e-30, -6e-8])
    x = torch.cat([special, torch.randn(4000, generator=g) * 10.0 ** torch.randint(-9, 6, (4000,), generator=g),
                   (torch.randint(-2 ** 11, 2 ** 11, (2000,), generator=g) + 0.5) * 2.0 ** -10]).float()  # ties
    want = x.to(torch.float16).view(torch.int16)
    try:
        for v in runnable_variants():
            monkeypatch.setenv("LLMLAB_CPU_VARIANT", v)
            native_step.kernel_build.cache_clear()
            build = native_step.kernel_build()
            if build.fn is None:
                pytest.skip(build.status)
            out = torch.empty(len(x), dtype=torch.int16)
            build.lib.float_to_half_rows(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), len(x))
            bad = (out != want).nonzero().flatten()
            assert len(bad) == 0, (v, x[bad[:5]].tolist(), out[bad[:5]].tolist(), want[bad[:5]].tolist())
    finally:
        monkeypatch.delenv("LLMLAB_CPU_VARIANT")
        native_step.kernel_build.cache_clear()


@torch.inference_mode()
def test_a_float_head_stays_in_pytorch():
    """Blocks packed, the head a plain float layer: the blocks run in C, the head in PyTorch."""
    torch.manual_seed(5)
    model = build_model(TINY).eval()
    head = model.lm_head
    pack_linears_q8_0_(model)
    model.lm_head = head  # (the tied float head back)
    assert enable_native_step_(model).startswith("native step")
    ids = torch.randint(0, 256, (1, 7))
    got = model(ids, cache=model.new_cache(1, 8))
    model.native_step = None
    want = model(ids, cache=model.new_cache(1, 8))
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (1, 1)])  # head_dim 16 (scalar tails), 64 (8 keys a pass, 32-column sums)
def test_every_cpu_build_gives_the_same_bits(monkeypatch, heads, kv):
    """The C step's attention (eight keys per score pass and one horizontal-add tree, two queries' values summed
    in vector registers, the polynomial e^x) and the half cache's conversions do the same IEEE operations in every
    build: prefill chunks with a padded row, then decode steps, give bit-identical logits on each variant this CPU
    runs, down to the portable C."""
    from llmlab.models import native_step
    from llmlab.nn import packed_linear
    from llmlab.nn.cpu_kernels import runnable_variants

    global TINY
    variants, tiny = runnable_variants(), TINY
    if len(variants) < 2:
        pytest.skip(f"this CPU runs one kernel variant only ({variants})")
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, :3] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    outs = []
    try:
        TINY = dataclasses.replace(tiny, n_heads=heads[0], n_kv_heads=heads[1], head_dim=tiny.dim // heads[0])
        for v in variants:
            monkeypatch.setenv("LLMLAB_CPU_VARIANT", v)
            native_step.kernel_build.cache_clear()
            packed_linear.kernel_build.cache_clear()
            model = _tiny()
            cache = model.new_cache(2, 32, dtype=kv)
            with torch.inference_mode():
                got = [model(ids[:, :13], cache=cache, attention_mask=mask[:, :13], position_ids=pos[:, :13])]
                for t in range(13, 21):
                    got.append(model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1],
                                     position_ids=pos[:, t:t + 1]))
            outs.append(torch.cat(got, 1))
    finally:
        TINY = tiny
        monkeypatch.delenv("LLMLAB_CPU_VARIANT")
        native_step.kernel_build.cache_clear()
        packed_linear.kernel_build.cache_clear()
    for v, out in zip(variants[1:], outs[1:]):
        assert torch.equal(out, outs[0]), (variants[0], v)
