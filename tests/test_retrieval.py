"""Sentence embeddings and retrieval: the metrics against sentence-transformers' InformationRetrievalEvaluator, the
MNRL and Matryoshka losses against its losses (values and gradients), the built-in retrieval set, pooling and
truncation, bad input, and the README's commands (as written, with a tiny random encoder and a small budget)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.eval.retrieval import check_set, evaluate_embeddings, rank, read_retrieval_files
from llmlab.infer.embed import parse_dims, truncate
from llmlab.models.bert import pool
from llmlab.text.retrieval_set import (
    RetrievalSet,
    builtin_dev_set,
    builtin_split,
    builtin_test_set,
    help_topic_paragraphs,
    is_dev,
    split_first_sentence,
)
from llmlab.text.tasks import is_held_out
from llmlab.train.contrastive import matryoshka_loss, mnrl_loss

README = Path(__file__).resolve().parents[1] / "README.md"
KS = {"ndcg": (1, 3, 10), "recall": (1, 3, 10), "mrr": (1, 10), "map": (3, 100), "precision": (1, 3, 10)}


# ---- metrics: parity with sentence-transformers ------------------------------------------------------------------

def _toy_set(seed: int = 0):
    """40 queries, 120 documents, 1-4 relevant each; integer-valued embeddings, so many scores tie exactly, and
    document ids whose string order differs from the corpus order (the tie order matters)."""
    g = torch.Generator().manual_seed(seed)
    corpus_ids = [f"d{(i * 37) % 120}" for i in range(120)]
    q = torch.randint(-2, 3, (40, 6), generator=g).float()
    d = torch.randint(-2, 3, (120, 6), generator=g).float()
    d[60:70] = d[50:60]  # exact duplicates: equal scores
    relevant = {f"q{i}": {corpus_ids[int(j)] for j in torch.randint(0, 120, (1 + i % 4,), generator=g)}
                for i in range(40)}
    rset = RetrievalSet({f"q{i}": f"query {i}" for i in range(40)},
                        {cid: f"doc {cid}" for cid in corpus_ids}, relevant)
    return rset, q, d


def _st_metrics(rset, q, d):
    need("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    ev = InformationRetrievalEvaluator(
        rset.queries, rset.corpus, rset.relevant, mrr_at_k=list(KS["mrr"]), ndcg_at_k=list(KS["ndcg"]),
        accuracy_at_k=[1], precision_recall_at_k=list(KS["precision"]), map_at_k=list(KS["map"]),
        score_functions={"cos": cos_sim}, show_progress_bar=False, corpus_chunk_size=len(rset.corpus))
    # one chunk: the same matrix product as ours, so equal scores are equal to the last bit (a product per chunk
    # can round a tie differently, and then the order of two equal documents is decided by rounding, not by id)
    ev.embed_inputs = lambda model, sentences, **kw: q  # the queries' embeddings; the corpus comes precomputed
    return ev.compute_all_metrics(None, corpus_embeddings=d)["cos"]


def test_metrics_equal_sentence_transformers_information_retrieval_evaluator():
    for seed in range(3):
        rset, q, d = _toy_set(seed)
        ref = _st_metrics(rset, q, d)
        ours = evaluate_embeddings(q, d, rset, KS)
        for metric, ks in KS.items():
            for k in ks:
                assert ours[f"{metric}@{k}"] == pytest.approx(float(ref[f"{metric}@k"][k]), abs=1e-6), (seed, metric, k)


def test_tie_order_is_by_document_id_and_map_divides_by_min_k_relevant():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    assert rank(scores, ["c", "z", "a", "b"], 4).tolist() == [[1, 2, 3, 0]]  # z, then a < b < c
    rset = RetrievalSet({"q": "x"}, {"a": "1", "b": "2", "c": "3"}, {"q": {"b", "c"}})
    m = evaluate_embeddings(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), rset,
                            {"map": (1, 3), "mrr": (1, 3), "ndcg": (3,)})
    # ranking a, b, c: relevant at ranks 2 and 3
    assert m["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2) and m["map@1"] == 0.0
    assert m["mrr@3"] == pytest.approx(0.5) and m["mrr@1"] == 0.0
    assert m["ndcg@3"] == pytest.approx((1 / 1.5849625 + 1 / 2) / (1 + 1 / 1.5849625), abs=1e-6)


# ---- losses: parity with sentence-transformers -------------------------------------------------------------------

class _Linear(nn.Module):
    """A sentence-transformers module whose 'sentence_embedding' is a linear map of the input features."""

    def __init__(self, weight):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, features):
        features["sentence_embedding"] = self.proj(features["x"])
        return features


@pytest.mark.parametrize("kind", ["mnrl", "mnrl+negatives", "matryoshka", "matryoshka weighted"])
def test_losses_and_gradients_equal_sentence_transformers(kind):
    st = need("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 10, generator=g)
    a, p, n = (torch.randn(6, 10, generator=g) for _ in range(3))
    dims, weights = [24, 12, 6, 3], ([1.0, 0.5, 2.0, 1.0] if kind.endswith("weighted") else None)
    model = st.SentenceTransformer(modules=[_Linear(w)], device="cpu")
    ref_loss = MultipleNegativesRankingLoss(model, scale=20.0)
    if kind.startswith("matryoshka"):
        ref_loss = MatryoshkaLoss(model, ref_loss, dims, matryoshka_weights=weights)
    columns = [{"x": a}, {"x": p}] + ([{"x": n}] if kind == "mnrl+negatives" else [])
    ref = ref_loss(columns, None)
    ref.backward()
    ref_grad = model[0].proj.weight.grad.clone()

    ours_w = w.clone().requires_grad_()
    ea, ep, en = a @ ours_w.T, p @ ours_w.T, n @ ours_w.T  # (B, 24)
    if kind.startswith("matryoshka"):
        ours = matryoshka_loss(ea, ep, dims, weights)
    else:
        ours = mnrl_loss(ea, ep, en if kind == "mnrl+negatives" else None, scale=20.0)
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(ours_w.grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_mnrl_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = 20 * torch.tensor([[1.0, 0.5 ** 0.5], [0.0, 0.5 ** 0.5]])
    want = ((torch.logsumexp(s[0], 0) - s[0, 0]) + (torch.logsumexp(s[1], 0) - s[1, 1])) / 2
    assert mnrl_loss(a, p).item() == pytest.approx(want.item(), abs=1e-6)


# ---- pooling and truncation ---------------------------------------------------------------------------------------

def test_pooling_and_truncation():
    h = torch.arange(24, dtype=torch.float).reshape(2, 3, 4)  # (B, T, D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    e = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(truncate(e, 2), torch.tensor([[0.6, 0.8]]))
    assert parse_dims("64,384, 64", 384) == [384, 64]
    for bad in ("385", "0", "-3", "x", ""):
        with pytest.raises(LlmlabError, match="--dims"):
            parse_dims(bad, 384)


# ---- the built-in set -------------------------------------------------------------------------------------------

def test_builtin_set_is_fixed_split_and_large_enough():
    train, test = builtin_split()
    assert all(not is_held_out(p.key) for p in train) and all(is_held_out(p.key) for p in test)
    assert len(test) >= 250 and len(train) >= 1000
    queries = [p.query for p in train + test]
    assert len(set(queries)) == len(queries)
    rset = builtin_test_set()
    assert len(rset.queries) == len(test) and len(rset.corpus) >= 1000
    check_set(rset)
    dev = builtin_dev_set()  # a tenth of train, left out of training: no query in test, the same distractors
    assert 100 <= len(dev.queries) <= len(train) // 5 and not set(dev.queries) & set(rset.queries)
    assert {k for k in dev.corpus if k.startswith("help:")} == {k for k in rset.corpus if k.startswith("help:")}
    assert all(is_dev(q[2:]) and not is_held_out(q[2:]) for q in dev.queries)
    check_set(dev)
    assert len(help_topic_paragraphs()) > 1000
    assert split_first_sentence("Return x. The rest is here.\n\nMore.") == ("Return x.", "The rest is here.\n\nMore.")
    assert split_first_sentence("No sentence end") == ("No sentence end", "")


def _digest(rset) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([rset.queries, rset.corpus, {q: sorted(r) for q, r in rset.relevant.items()}],
                                     sort_keys=True).encode()).hexdigest()


def test_builtin_set_does_not_depend_on_what_the_process_imported():
    """This process has imported torch and sentence-transformers (which patch the standard library); a fresh
    interpreter that imports nothing else builds the same set."""
    import subprocess
    import sys

    import transformers  # noqa: F401  (adds logging.Logger.warning_once)

    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys, json, hashlib; sys.path.insert(0, sys.argv[1]); "
            "from llmlab.text.retrieval_set import builtin_test_set; r = builtin_test_set(); "
            "print(hashlib.sha256(json.dumps([r.queries, r.corpus, {q: sorted(v) for q, v in r.relevant.items()}], "
            "sort_keys=True).encode()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == _digest(builtin_test_set())


# ---- bad input ----------------------------------------------------------------------------------------------------

def _write(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_retrieval_files(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}])
    good = {"id": "q1", "query": "first", "relevant": ["a"]}
    cases = {
        "missing field 'relevant'": [good, {"id": "q2", "query": "x"}],
        "q.jsonl:2: not JSON": [good, "{oops"],
        "query 'q2' is empty": [good, {"id": "q2", "query": "  ", "relevant": ["a"]}],
        "not in the corpus": [{"id": "q1", "query": "first", "relevant": ["zz"]}],
        "non-empty list": [{"id": "q1", "query": "first", "relevant": []}],
    }
    for message, rows in cases.items():
        with pytest.raises(LlmlabError, match=re.escape(message)):
            read_retrieval_files(_write(tmp_path / "q.jsonl", rows), corpus)
    with pytest.raises(LlmlabError, match=re.escape("q.jsonl:2: missing field 'relevant'")):
        read_retrieval_files(_write(tmp_path / "q.jsonl", cases["missing field 'relevant'"]), corpus)
    empty_doc = _write(tmp_path / "c2.jsonl", [{"id": "a", "text": ""}])
    with pytest.raises(LlmlabError, match="document 'a' is empty"):
        read_retrieval_files(_write(tmp_path / "q.jsonl", [good]), empty_doc)
    assert len(read_retrieval_files(_write(tmp_path / "q.jsonl", [good]), corpus).queries) == 1


def test_api_embed_pooling_and_nested_size(tiny_encoder):
    import llmlab

    llm = llmlab.load(tiny_encoder)
    texts = ["Return the number of items.", "A much longer sentence, so that the batch is padded."]
    full = llm.embed(texts, precision="float32")
    torch.testing.assert_close(llm.embed(texts, dim=16, precision="float32"), truncate(full, 16))
    from llmlab.infer.embed import tokenize_batch

    ids, mask = tokenize_batch(llm.loaded.tokenizer, texts)
    with torch.no_grad():
        hidden = llm.model(ids, mask)  # (B, T, 32)
    torch.testing.assert_close(llm.embed(texts, pooling="cls", precision="float32"),
                               torch.nn.functional.normalize(hidden[:, 0], dim=-1))
    torch.testing.assert_close(full, torch.nn.functional.normalize(pool(hidden, mask), dim=-1))
    with pytest.raises(LlmlabError, match="dimension 33 is not in 1..32"):
        llm.embed(texts, dim=33)


def test_embed_batching_order_mask_and_precision(tiny_encoder):
    """Texts sorted by token count, any batch size, unpadded batches without a mask: the same vectors, in the
    order given; bfloat16 autocast stays close to float32, and ``auto`` picks bf16 only where the CPU has bf16
    units."""
    import llmlab
    from llmlab.infer.embed import embed_dtype, tokenize_batch
    from llmlab.nn.autocast import cpu_has_native

    llm = llmlab.load(tiny_encoder)
    texts = ["Short.", "A much longer sentence, so that a batch of two is padded.", "Two words", "Short.",
             "Return the number of items in the deque, counting from the left end."]
    one = torch.cat([llm.embed([t], precision="float32") for t in texts])  # no padding, no mask
    ids, mask = tokenize_batch(llm.loaded.tokenizer, texts)
    with torch.no_grad():  # every text padded to the longest, with the mask: the plain path
        ref = torch.nn.functional.normalize(pool(llm.model(ids, mask), mask), dim=-1)
    for bs in (1, 2, 32):
        torch.testing.assert_close(llm.embed(texts, batch_size=bs, precision="float32"), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(one, ref, atol=2e-6, rtol=0)
    bf16 = llm.embed(texts, precision="bfloat16")
    assert bf16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(bf16, ref).min() > 0.999
    cpu = torch.device("cpu")
    assert embed_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native(torch.bfloat16) else torch.float32)
    assert embed_dtype("float32", cpu) == torch.float32 and embed_dtype("auto", torch.device("meta")) == torch.float32
    with pytest.raises(LlmlabError, match="precision must be one of auto, float32, bfloat16, got 'fp8'"):
        llm.embed(texts, precision="fp8")


def test_matryoshka_weights_follow_the_dims_as_written():
    from llmlab.train.contrastive import parse_weights

    assert parse_weights("", "384,64", [384, 64]) == [1.0, 1.0]
    assert parse_weights("2,1", "64,384", [384, 64]) == [1.0, 2.0]  # the weight of 64 is 2 whichever order
    for text, message in (("1,x", "comma-separated numbers"), ("1", "one weight per --matryoshka-dims size"),
                          ("0,0", "at least one > 0"), ("1,-1", "weights must be >= 0")):
        with pytest.raises(LlmlabError, match=message):
            parse_weights(text, "384,64", [384, 64])


def test_train_on_a_pairs_file_moves_the_loss(tmp_path, tiny_encoder):
    from llmlab.train.contrastive import EmbedConfig, EmbedTrainConfig, run_embed_train

    pairs = _write(tmp_path / "p.jsonl", [{"query": f"what is item {i}?", "document": f"item {i} is number {i}"}
                                         for i in range(8)])
    cfg = EmbedConfig(model=tiny_encoder, out=str(tmp_path / "run"), pairs=pairs, matryoshka_dims="32,8",
                      max_tokens=16)
    s = run_embed_train(cfg, EmbedTrainConfig(steps=6, batch_size=8, lr=3e-3, warmup=0, progress=False))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])["loss"]
    assert s["dims"] == [32, 8] and s["train_loss"] < first, (first, s)
    assert Path(s["saved"], "config.json").exists() and Path(s["saved"], "tokenizer.json").exists()
    # more steps on the same folder resume from its last checkpoint (the unused tanh pooler is frozen: a trainable
    # parameter without a gradient has no optimizer state to resume)
    s = run_embed_train(cfg, EmbedTrainConfig(steps=8, batch_size=8, lr=3e-3, warmup=0, progress=False))
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 8 and 8 in steps and steps.count(1) == 1, steps  # steps 1-6 not run again


def test_cli_bad_input_exits_2(tmp_path, tiny_encoder, capsys):
    corpus = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "alpha"}])
    queries = _write(tmp_path / "q.jsonl", [{"id": "q1", "query": "alpha?", "relevant": ["a"]}, {"id": "q2"}])
    cases = [
        (["--dims", "64"], "dimension 64 is not in 1..32"),
        (["--dims", "0"], "dimension 0 is not in 1..32"),
        (["--queries", queries, "--corpus", corpus], "q.jsonl:2: missing field 'query'"),
        (["--queries", queries], "give both --queries and --corpus"),
    ]
    good = _write(tmp_path / "good.jsonl", [{"id": "q1", "query": "alpha?", "relevant": ["a"]}])
    assert main(["embed", "eval", "--model", tiny_encoder, "--queries", good, "--corpus", corpus, "--dims", "32,8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"32", "8"} and out["8"]["recall@1"] == 1.0  # one document: always found
    for extra, message in cases:
        assert main(["embed", "eval", "--model", tiny_encoder, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    empty = _write(tmp_path / "pairs.jsonl", [{"query": "a", "document": ""}])
    assert main(["embed", "train", "--model", tiny_encoder, "--pairs", empty, "--loss", "mnrl", "--eval-dims", "32",
                 "--out", str(tmp_path / "r")]) == 2
    assert "empty document" in capsys.readouterr().err
    assert main(["embed", "train", "--model", tiny_encoder, "--matryoshka-dims", "64,16", "--eval-dims", "32",
                 "--out", str(tmp_path / "r")]) == 2
    assert "dimension 64 is not in 1..32" in capsys.readouterr().err
    assert main(["embed", "train", "--model", tiny_encoder, "--eval-dims", "32,0", "--out", str(tmp_path / "r")]) == 2
    assert "--eval-dims: dimension 0 is not in 1..32" in capsys.readouterr().err
    assert main(["embed", "train", "--model", tiny_encoder, "--matryoshka-dims", "32,16", "--matryoshka-weights", "1",
                 "--eval-dims", "32", "--out", str(tmp_path / "r")]) == 2
    assert "one weight per --matryoshka-dims size (2: 32,16)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before training


def test_help_gives_every_flag_a_default(capsys):
    for name in ("train", "eval"):
        with pytest.raises(SystemExit):
            main(["embed", name, "--help"])
        body = capsys.readouterr().out.split("options:", 1)[1]
        entries = re.split(r"\n  (?=-)", "\n" + body)[1:]
        assert len(entries) >= 8
        for entry in entries:
            if not entry.startswith("-h"):
                assert "(default:" in " ".join(entry.split()), (name, entry)


def test_empty_query_and_document_are_refused():
    with pytest.raises(LlmlabError, match="query 2 is empty"):
        check_set(RetrievalSet({"a": "x", "b": ""}, {"d": "y"}, {"a": {"d"}, "b": {"d"}}))
    with pytest.raises(LlmlabError, match="document 1 is empty"):
        check_set(RetrievalSet({"a": "x"}, {"d": " "}, {"a": {"d"}}))


# ---- the README's commands -------------------------------------------------------------------------------------

def _readme_embed_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Embeddings and retrieval"):]
    section = section[:section.index("\n## ", 4)]
    return [line.strip() for block in section.split("```")[1::2] for line in block.splitlines()
            if line.strip().startswith("llmlab embed")]


@pytest.mark.slow
def test_readme_embed_commands_as_written(tmp_path, monkeypatch, capsys, tiny_encoder, small_retrieval_set):
    """Each README command, with a tiny random encoder in place of MiniLM, a budget of one step, and the built-in
    test set cut to 12 queries (for --split / --eval-split dev too: scoring 1,700 documents twice per command was
    most of the time; test_builtin_set_is_fixed_split_and_large_enough tests the sets themselves)."""
    import llmlab.text.retrieval_set as rs

    for split in ("test", "dev"):
        monkeypatch.setitem(rs.SPLITS, split, lambda: small_retrieval_set)
    monkeypatch.chdir(tmp_path)
    commands = [c for c in _readme_embed_commands() if c.split()[2] != "distill"]  # tests/test_encoder_distill.py
    assert {c.split()[2] for c in commands} == {"train", "eval"}
    small = ["--max-tokens", "8", "--threads", "1"]
    trained = []
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        if argv[1] == "train":
            argv += [*small, "--model", tiny_encoder, "--steps", "1", "--batch-size", "4", "--matryoshka-dims",
                     "32,16", "--eval-dims", "32,16", "--no-progress"]
            if "--matryoshka-weights" in argv:  # one weight per size: the two sizes above
                argv += ["--matryoshka-weights", "1,2"]
        else:
            argv += [*small, "--dims", "32,16"]
            if "--model" in argv:  # a model the README trained: the tiny one trained above
                argv[argv.index("--model") + 1] = trained[-1]
            else:
                argv += ["--model", tiny_encoder]
        assert main(argv) == 0, command
        out = capsys.readouterr().out
        assert "| 16 |" in out, (command, out)
        if argv[1] == "train":
            trained.append(str(Path(argv[argv.index("--out") + 1]) / "model"))
            assert Path(trained[-1], "config.json").exists()
