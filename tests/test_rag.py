"""RAG (infer/rag.py): the grounded prompt and its numbering, citation parsing, the log-likelihood re-ranker on
the real SmolLM2, retrieval with and without re-ranking over a real index, `llmlab rag` end to end and its bad
input."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.infer.index import IndexConfig, VectorStore, add_files, open_encoder
from llmlab.infer.rag import Source, answer, builtin_documents, citations, grounded_messages, question_loglik, retrieve

DOCS = {"paris.txt": "Paris is the capital of France. The Louvre is in Paris.",
        "bananas.txt": "Bananas are yellow fruit that grow in tropical places.",
        "python.md": "# Python\n\nThe with statement calls __exit__ even when the block raises an exception."}


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("rag")
    for name, text in DOCS.items():
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs" / name).write_text(text)
    config = IndexConfig(model=tiny_encoder, chunk_tokens=32, overlap=8)
    encoder = open_encoder(config)
    with VectorStore.create(root / "index", config, encoder.fingerprint) as store:
        add_files(store, encoder, [str(root / "docs")], {})
    return root / "index"


def test_grounded_prompt_numbers_the_sources():
    sources = [Source(1, "/a/x.txt", "first\n text", 0.5), Source(2, "/b/y.md", "second", 0.4)]
    system, user = grounded_messages("  What?  ", sources)
    assert system["role"] == "system" and "only the numbered sources" in system["content"]
    assert user["content"] == ("Sources:\n\n[1] (x.txt)\nfirst text\n\n[2] (y.md)\nsecond\n\n"
                               "Question: What?\nAnswer, citing the sources:")
    with pytest.raises(LlmlabError, match="the question is empty"):
        grounded_messages(" ", sources)


def test_citations_valid_in_order_and_invalid():
    assert citations("See [3] and [1]; also [3], [7] and [0].", 4) == ([3, 1], [7, 0])
    assert citations("no citation", 2) == ([], [])
    result = answer("q?", [Source(1, "p", "t", 1.0)], lambda messages: " It is [1] and [2]. ")
    assert result.answer == "It is [1] and [2]." and result.cited == [1] and result.invalid == [2]
    assert json.loads(json.dumps(result.to_json()))["sources"][0]["path"] == "p"


def test_retrieve_with_and_without_a_reranker(small_index, tiny_encoder):
    with VectorStore.open(small_index) as store:
        encoder = open_encoder(store)
        plain = retrieve(store, encoder, "capital of France", k=2, mode="bm25")
        assert [s.number for s in plain] == [1] and plain[0].path.endswith("paris.txt")  # BM25: only term matches
        # a re-ranker decides the order and which k of the candidates survive
        ranked = retrieve(store, encoder, "capital of France", k=2, mode="hybrid",
                          rerank=lambda q, ps: [3.0 if "Bananas" in p else 2.0 if "with" in p else 1.0 for p in ps])
        assert [s.path.rsplit("/", 1)[-1] for s in ranked] == ["bananas.txt", "python.md"]
        assert [s.score for s in ranked] == [3.0, 2.0] and [s.number for s in ranked] == [1, 2]
        with pytest.raises(LlmlabError, match="--k must be at least 1"):
            retrieve(store, encoder, "x", k=0)


def test_loglik_reranker_prefers_the_passage_that_answers(smollm):
    passages = ["Bananas are yellow fruit that grow in tropical places.",
                "Paris is the capital of France, and its largest city."]
    scores = question_loglik(smollm.model, smollm.tokenizer, "What is the capital of France?", passages)
    assert len(scores) == 2 and scores[1] > scores[0] + 0.1


def test_builtin_documents_are_the_python_help_topics(tmp_path):
    folder = builtin_documents(tmp_path / "topics")
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) > 50 and "with.txt" in files
    assert "__exit__" in (folder / "with.txt").read_text()


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "rag", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_readme_commands(small_index, tmp_path):
    """The README's two rag lines as written (a 16-token answer appended), the small index standing in for the
    built-in one (its build is VectorStore.create + add_files over builtin_documents, tested above and in
    test_index.py) and for runs/index."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith("llmlab rag ")]
    assert len(lines) == 2
    for where in ("data/pydoc-index", "runs/index"):
        shutil.copytree(small_index, tmp_path / where)
    for line in lines:
        r = run_cli(*shlex.split(line.split(" #")[0])[2:], "--max-new-tokens", "16", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "building" not in r.stderr
    assert json.loads(r.stdout)["sources"][0]["number"] == 1  # the second line asks for --json
    assert not (tmp_path / "data" / "pydoc-topics").exists()


def test_cli_end_to_end_and_bad_input(small_index, tmp_path):
    r = run_cli("What does the with statement call when the block raises?", "--index", str(small_index), "--k", "2",
                "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"] and len(out["sources"]) == 2 and out["sources"][0]["number"] == 1
    assert all(1 <= k <= 2 for k in out["cited"])
    for args, message in [(("",), "the question is empty"),
                          (("q", "--k", "0"), "--k and --max-new-tokens must be at least 1"),
                          (("q", "--index", str(tmp_path / "none")), "no index there: build one with")]:
        r = run_cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
