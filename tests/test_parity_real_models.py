"""Parity with the reference libraries on the two real embedded models."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import need

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 17 * 23? Explain step by step.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a village far away, there lived a curious robot named",
    "Here is a list of ten fruits, one per line:\n1. Apple\n2.",
]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm, hf_smollm):
    tok = smollm.tokenizer
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            ours = smollm.model(ids)
            ref = hf_smollm(ids).logits
        err = (ours - ref).abs().max().item()
        # the same float32 operations in the same order: bit-identical (measured; the goal was <= 1e-3)
        assert torch.equal(ours, ref), f"max |Δlogit| = {err} for {prompt!r}"


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_identical(smollm, hf_smollm):
    from llmlab.infer.generate import greedy_generate

    tok = smollm.tokenizer
    full_runs = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = greedy_generate(smollm.model, ids, 32, stop_ids={tok.eos_id})
        with torch.inference_mode():
            ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=2)
        assert ours == ref[0, len(ids):].tolist(), prompt
        full_runs += len(ours) == 32
    assert full_runs >= 3, "most prompts must run the full 32 tokens without hitting EOS"


@pytest.mark.slow
def test_smollm2_reference_attention_agrees(smollm):
    ids = torch.tensor([smollm.tokenizer.encode(PROMPTS[1])])
    with torch.inference_mode():
        fast = smollm.model(ids)
        smollm.model.set_attn_impl("reference")
        try:
            ref = smollm.model(ids)
        finally:
            smollm.model.set_attn_impl("sdpa")
    assert (fast - ref).abs().max().item() < 1e-4


SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome",
    "The cat sits outside", "A man is playing guitar", "I love pasta", "Do you like pizza?",
    "The new opera is nice", "Python is a programming language.", "Paris is the capital of France.",
    "Café au lait, s'il vous plaît!", "日本語の文章もあります。", "Emoji 🚀 and numbers 1234567890",
    "Short", "A considerably longer sentence that goes on for a while, mentioning transformers, embeddings, "
    "retrieval-augmented generation and vector search, so that padding inside a batch really matters here.",
]


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers(minilm, minilm_path):
    st = need("sentence_transformers")
    ref_model = st.SentenceTransformer(str(minilm_path), device="cpu")
    ref = torch.tensor(ref_model.encode(SENTENCES, batch_size=8))
    ours = minilm.embed(SENTENCES, batch_size=8)  # precision auto: bf16 matmuls on a CPU with bf16 units
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert len(SENTENCES) >= 20
    assert cos.min().item() >= 0.9999, cos
    fp32 = minilm.embed(SENTENCES, batch_size=8, precision="float32")
    assert torch.nn.functional.cosine_similarity(fp32, ref, dim=-1).min().item() >= 0.999999
