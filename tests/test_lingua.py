"""Prompt compression (infer/lingua.py, eval/needle.py, `llmlab compress-prompt`, `llmlab rag --compress`): the
iterative token selection against a hand-written reference without a KV cache, the budget controller and
LongLLMLingua's dynamic ratios against the paper's / package's values, ratios reached, the needle set, the CLI
end to end, bad input, and one run of the real SmolLM2."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.infer.lingua import (
    compress,
    compress_tokens,
    dynamic_offsets,
    paragraphs,
    select_documents,
    window_logprobs,
)

TEXT = ("The with statement wraps a block in a context manager. It calls __enter__ first and __exit__ at the end, "
        "even when the block raises.\n\nThe for statement iterates over the items of a sequence or iterable. The "
        "else clause runs when the loop ends without break.\n\nThe access code of the while section is 4821. A "
        "while loop repeats while its expression is true.")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run op by op: on a shared, loaded machine one thread beats two that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_chat):
    from llmlab.api import load

    return load(str(tiny_chat))


def reference_keep(model, docs, ratios, window, sep, question=None):
    """Eq. 5 (and Eq. 3 with a question) written out with whole forwards and no cache: every window's surprisals
    from one forward of (question +) the compressed text so far + the window; each document keeps its top
    round(ratio * tokens seen) - taken."""
    seq = []
    for k, ids in enumerate(docs):
        if k:
            seq += [(t, -1, 0) for t in sep]
        seq += [(t, k, i) for i, t in enumerate(ids)]

    def surprisal(prefix, part):
        ids = prefix + part
        logp = window_logprobs(model, ids)  # (T, V)
        out = [float("inf") if p == 0 else -float(logp[p - 1, ids[p]]) for p in range(len(prefix), len(ids))]
        return out

    done, kept = [], [[] for _ in docs]
    seen, taken = [0] * len(docs), [0] * len(docs)
    for a in range(0, len(seq), window):
        part = seq[a:a + window]
        toks = [t for t, _, _ in part]
        s = surprisal(done, toks)
        if question:
            s = [x - y for x, y in zip(s, surprisal(question + done, toks))]
        keep = {r for r, (_, k, _) in enumerate(part) if k < 0}
        for k in sorted({k for _, k, _ in part if k >= 0}):
            rows = [r for r, (_, d, _) in enumerate(part) if d == k]
            seen[k] += len(rows)
            n = max(0, min(len(rows), round(ratios[k] * seen[k]) - taken[k]))
            keep |= set(sorted(rows, key=lambda r: (-s[r], r))[:n])
            taken[k] += n
        for r in sorted(keep):
            done.append(part[r][0])
            if part[r][1] >= 0:
                kept[part[r][1]].append(part[r][2])
    return kept


@pytest.fixture(scope="module")
def small_lm():
    """llama-tiny (vocab 512) with random weights: surprisals without a 49k-way softmax."""
    from llmlab.models.registry import build_model, get_preset

    torch.manual_seed(0)
    return build_model(get_preset("llama-tiny")).eval()


def test_token_selection_matches_the_cacheless_reference(small_lm):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (23, 17, 30)]
    sep, q = [1, 2], [7, 8, 9, 10, 2]
    for ratios, window, question in [([0.8, 0.5, 0.2], 7, None), ([0.6, 0.3, 0.4], 16, q)]:
        got = compress_tokens(small_lm, docs, ratios, window, sep, question)
        assert got == reference_keep(small_lm, docs, ratios, window, sep, question), (ratios, window)
        for k, ids in enumerate(docs):
            assert len(got[k]) == round(ratios[k] * len(ids))  # every document meets its ratio exactly


def test_budget_controller_and_dynamic_ratios():
    # documents walked best score first; the one that crosses the budget is kept (llmlingua's control_context_budget)
    assert select_documents([10, 20, 30, 40], [0.1, 0.9, 0.5, 0.7], budget=50) == [1, 3, ]
    assert select_documents([10, 20, 30, 40], [0.1, 0.9, 0.5, 0.7], budget=60) == [1, 3, 2]
    assert select_documents([10, 20], [1.0, 1.0], budget=1000) == [0, 1]
    # Eq. 4 / the package's [i * delta / (N - 1) for i in range(-(N - 1), N, 2)][::-1]
    for n in (1, 2, 3, 4, 7):
        package = [i * (0.3 / (n - 1)) if n > 1 else 0 for i in range(-(n - 1), n, 2)][::-1]
        assert dynamic_offsets(n, 0.3) == pytest.approx(package)
    assert dynamic_offsets(3, 0.3) == pytest.approx([0.3, 0.0, -0.3])


def test_compress_ratios_order_and_bad_input(tiny):
    m, tok = tiny.model, tiny.tokenizer
    docs = paragraphs(TEXT)
    one = compress(m, tok, docs[0], 0.5, window=32)
    assert one.order == [0] and 0.4 < one.ratio < 0.6 and one.text == one.documents[0]
    full = compress(m, tok, docs, 1.0, question="What is the code?", instruction="Answer.")
    assert full.text == "\n\n".join(["Answer.", *docs, "What is the code?"]) and full.ratio == pytest.approx(1.0)
    long = compress(m, tok, docs, 0.4, question="What is the access code of the while section?",
                    method="longllmlingua")
    assert long.text.endswith("What is the access code of the while section?") and long.ratio < 0.7
    assert sorted(long.order) == sorted(set(long.order)) and len(long.documents) == len(long.order)
    assert json.loads(json.dumps(long.to_json()))["compressed_tokens"] == long.compressed_tokens
    for kwargs, message in [(dict(ratio=0), r"--ratio 0: give the fraction .* in \(0, 1\]"),
                            (dict(ratio=1.5), r"--ratio 1.5"), (dict(ratio=-0.2), r"--ratio -0.2"),
                            (dict(documents=["  ", ""]), "the prompt is empty"),
                            (dict(method="longllmlingua"), "give --question"),
                            (dict(method="gzip"), "choose one of llmlingua, longllmlingua"),
                            (dict(documents=["word " * 1100]), "the compressor's context holds 1024")]:
        args = dict(documents=docs, ratio=0.5) | kwargs
        with pytest.raises(LlmlabError, match=message):
            compress(m, tok, args.pop("documents"), **args)
    with pytest.raises(LlmlabError, match="--window 0"):
        compress(m, tok, docs, 0.5, window=0)


def test_needle_set_hides_one_answer_per_item():
    from llmlab.eval.needle import needle_set, table

    items = needle_set(3, docs=3, chars=300, seed=1)
    assert len(items) == 3 and items == needle_set(3, docs=3, chars=300, seed=1)
    for item in items:
        assert len(item.documents) == 3 and sum(item.answer in d for d in item.documents) == 1
        assert item.question.startswith("What is the ")
    assert "| none | 1.00 | 1.00 | 0.50 (1/2) | - |" in table([{"method": "none", "ratio": 1.0, "reached": 1.0,
                                                               "accuracy": 0.5, "n": 2}])
    with pytest.raises(LlmlabError, match="--limit 0"):
        needle_set(0)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "compress-prompt", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_readme_commands(tiny_chat, tmp_path):
    """The README's compress-prompt lines as written, on the tiny model, --eval on one short question."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith("llmlab compress-prompt ")]
    assert len(lines) == 3
    (tmp_path / "notes.txt").write_text(TEXT)
    for line in lines:
        args = shlex.split(line.split(" #")[0])[2:] + ["--model", str(tiny_chat)]
        if "--eval" in args:
            args += ["--limit", "1", "--docs", "2", "--chars", "120", "--ratios", "1,0.5", "--max-new-tokens", "2"]
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (line, r.stderr)
    assert "| rag+longllmlingua | 0.50 |" in r.stdout and "| longllmlingua | 0.50 |" in r.stdout


def test_cli_end_to_end_and_bad_input(tiny_chat, tmp_path, capsys, monkeypatch):
    from llmlab.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert main(["compress-prompt", "--ratio", "0.5", "--question", "What is the code?", "--method", "longllmlingua",
                 "--json", "--model", str(tiny_chat)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compressed_prompt"].endswith("What is the code?") and out["ratio"] < 0.8
    (tmp_path / "p.txt").write_text(TEXT)
    assert main(["compress-prompt", "--file", str(tmp_path / "p.txt"), "--model", str(tiny_chat), "--ratio",
                 "0.3"]) == 0
    assert "tokens (ratio 0." in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for args, message in [(["x", "--ratio", "0"], "--ratio 0.0: give the fraction"),
                          (["x", "--ratio", "1.01"], "--ratio 1.01"),
                          (["--file", str(empty)], "the prompt is empty"),
                          (["--file", str(tmp_path / "none.txt")], "no such file"),
                          (["x", "--file", str(empty)], "not both"),
                          (["word " * 1100], "the compressor's context holds 1024"),
                          (["--eval", "--ratios", "1,2"], "--ratios 2.0"),
                          (["--eval", "--ratios", "a"], "--ratios takes comma-separated numbers")]:
        assert main(["compress-prompt", *args, "--model", str(tiny_chat)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert main(["rag", "q", "--compress", "0", "--model", str(tiny_chat)]) == 2
    assert "--compress 0.0: give the fraction" in capsys.readouterr().err


def test_real_smollm2_keeps_the_needle(smollm):
    """LongLLMLingua on the real compressor at half the tokens: the question-relevant paragraph ranks first."""
    docs = ["The for statement iterates over the items of a sequence.",
            "The access code of the while section is 4821. A while loop repeats while its expression is true."]
    c = compress(smollm.model, smollm.tokenizer, docs, 0.5, question="What is the access code of the while section?",
                 method="longllmlingua", slack=0)
    # the needle's paragraph alone survives the coarse step and its sentence the fine one; the number's first digit
    # does not (its surprisal is as high with the question as without, so its contrast is small): "... is 821"
    assert c.order == [1] and "The access code of the while section is" in c.text and c.ratio < 0.8


# --- the fast paths (issue 16): one forward per window, reused ranking forwards, int8 / bf16 compressors ---------

def packed_copy(model):
    """The model on Q8_0 blocks through the int8 kernels and the C decoder blocks (as ``load(packed=True)``)."""
    import copy

    from llmlab.models.native_step import enable_native_step_
    from llmlab.nn.packed_linear import pack_linears_q8_0_

    m = pack_linears_q8_0_(copy.deepcopy(model))
    enable_native_step_(m)
    return m


def test_no_ranking_forwards_when_every_document_fits(tiny):
    """LLMLingua keeps every document, in order, when the budget holds all of them but the shortest whatever
    their perplexities: then no ranking forward runs (fewer rows), and the kept tokens equal those of the ranked
    path, where the first document's ranking forward only seeds the stream's cache."""
    from llmlab.infer.lingua import SEPARATOR, perplexity_scores

    m, tok = tiny.model, tiny.tokenizer
    docs = paragraphs(TEXT)
    ids = [tok.encode(d, add_bos=False) for d in docs]
    rows = []
    hook = m.register_forward_hook(lambda mod, args, out: rows.append(args[0].numel()))
    try:
        got = compress(m, tok, docs, 0.5, window=32, slack=10**6)
        skipped = sum(rows)
        rows.clear()
        _, runs = perplexity_scores(m, ids)
        want = compress_tokens(m, ids, [0.5] * len(ids), 32, tok.encode(SEPARATOR, add_bos=False), seed=runs[0])
    finally:
        hook.remove()
    assert got.order == list(range(len(docs))) and got.kept == want and skipped < sum(rows)


@pytest.fixture(scope="module")
def peaked_lm():
    """A Llama with whole Q8_0 blocks (dim 64, FFN 128, vocab 512), weights drawn wider than at init so its
    surprisals spread (std 0.46 nats against 0.17, fewer near-ties), and its int8 copy."""
    from dataclasses import replace

    from llmlab.models.registry import build_model, get_preset

    torch.manual_seed(3)
    model = build_model(replace(get_preset("llama-tiny"), ffn_dim=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model, packed_copy(model)


def recomputed(model, ids: list[int], a: int) -> torch.Tensor:
    """-log p(ids[i] | ids[:i]) for i >= a from one forward of ``ids`` from position 0 (inf for i = 0), with a
    fresh cache so the int8 model runs the same C blocks as its streams."""
    logp = window_logprobs(model, ids, model.new_cache(1, max_len=len(ids)), 0)  # (T, V)
    return torch.tensor([float("inf") if i == 0 else -float(logp[i - 1, ids[i]]) for i in range(a, len(ids))])


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_stream_reuse_gives_the_recomputed_scores(peaked_lm, kind):
    """_Stream's cache reuse (kept tokens run at the front of the next window, a kept lead left in place, a seeded
    start from another forward) against a whole forward of prefix + compressed text + window, to 1e-5."""
    from llmlab.infer.lingua import _Stream, run_alone

    model = peaked_lm[kind == "int8"]
    g = torch.Generator().manual_seed(5)
    text = torch.randint(3, 512, (70,), generator=g).tolist()
    masks = [[True] * 4 + [False] + [True] * 6, [False] * 11, [True] * 11, [True, False] * 5 + [True]]
    seeds = run_alone(model, [text[:30] + [9, 9, 9], text[:5]])
    for prefix, seed in [([], None), ([7, 8, 2], None), ([], seeds[0]), ([], seeds[1])]:
        stream = _Stream(model, prefix, len(text), seed, text)
        done = list(prefix)
        for j, a in enumerate(range(0, len(text), 11)):
            window, keep = text[a:a + 11], masks[j % len(masks)][:len(text[a:a + 11])]
            got = stream.surprisals(window)
            want = recomputed(model, done + window, len(done))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{kind} {prefix} seed {seed is not None}")
            stream.keep(window, keep)
            done += [t for t, k in zip(window, keep) if k]


def test_ranking_forwards_batched_equal_alone(peaked_lm):
    """Padded batches (lengths within an eighth) give each document's perplexity and Eq. 2 score as its own
    forward does, to 1e-5."""
    from llmlab.infer.lingua import perplexity_scores, question_scores, run_alone

    model = peaked_lm[0]
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (40, 37, 12, 39, 1)]
    assert len({id(r.cache) for r in run_alone(model, docs)}) == 3  # 40+39+37 batched; 12 and 1 alone
    ppl, _ = perplexity_scores(model, docs)
    want = [float(recomputed(model, d, 1).mean()) if len(d) > 1 else 0.0 for d in docs]
    assert ppl == pytest.approx(want, abs=1e-5)
    sep, q = [1, 2], [7, 8, 9, 10]
    got, _ = question_scores(model, docs, sep, q)
    want = [-float(recomputed(model, d + sep + q, len(d + sep)).mean()) for d in docs]
    assert got == pytest.approx(want, abs=1e-5)


def test_fast_compressors_select_like_fp32(peaked_lm):
    """The int8 (Q8_0 blocks, C blocks) and bf16 compressors keep nearly the tokens the fp32 one keeps: at least
    90% of the kept positions in common (measured 0.97-1.00 on this model), and the same documents."""
    import copy

    from llmlab.infer.lingua import COMPUTES, fast_compute, load_options

    fp32, int8 = peaked_lm
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (60, 45, 70)]
    for method_q in (None, [7, 8, 9, 10, 2]):
        ref = compress_tokens(fp32, docs, [0.5, 0.3, 0.6], 50, [1, 2], method_q)
        for model in (int8, bf16):
            got = compress_tokens(model, docs, [0.5, 0.3, 0.6], 50, [1, 2], method_q)
            common = sum(len(set(a) & set(b)) for a, b in zip(got, ref))
            assert common >= 0.9 * sum(len(b) for b in ref), (method_q, common)
    assert fast_compute() in COMPUTES[1:] and load_options("fp32") == {"packed": False, "dtype": "float32"}
    assert load_options("int8") == {"packed": True, "packed_kernel": "int8", "dtype": "float32"}
    assert load_options("int8r")["packed_kernel"] == "int8r"
    assert load_options("bf16")["dtype"] == "bfloat16"
    with pytest.raises(LlmlabError, match="--compute 'gpu': choose one of auto, int8, int8r, bf16, fp32"):
        load_options("gpu")
