"""The vector store (infer/index.py), chunking (text/chunk.py) and BM25 (text/bm25.py): BM25 scores against
rank_bm25, dense hits against brute force, reciprocal rank fusion by hand, incremental add / delete / metadata
filters, HNSW beyond the threshold, a process killed between the database commit and the vectors save, bad input
(empty and binary files, mixed sizes, corrupt files, another model's queries), and the README's commands."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_encoder, need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.infer.index import (
    DB_NAME,
    VECTORS_NAME,
    IndexConfig,
    VectorStore,
    add_files,
    delete_paths,
    fuse_ranks,
    open_encoder,
)
from llmlab.text.bm25 import BM25, bm25_terms
from llmlab.text.chunk import chunk_text, section_starts

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(__file__).resolve().parents[1] / "src"

DOCS = {
    "deque.md": "# Deque\n\nA deque appends and pops from either end in constant time.\n\n## Rotate\n\nRotate the "
                "deque n steps to the right; a negative n rotates to the left.\n",
    "heap.py": "import heapq\n\n\ndef push(heap, item):\n    \"\"\"Push an item onto the heap, keeping the heap "
               "invariant.\"\"\"\n    heapq.heappush(heap, item)\n\n\nclass Queue:\n    \"\"\"A priority queue "
               "built on a binary heap.\"\"\"\n",
    "notes/json.txt": "The json module encodes Python objects as JSON text and decodes JSON text back to objects. "
                      "Dumps returns a string; dump writes to a file.",
    "notes/path.txt": "Join one or more path components; an absolute component discards everything before it.",
}


def _write_docs(root: Path) -> Path:
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def encoder(tiny_encoder):
    return open_encoder(IndexConfig(model=tiny_encoder))


@pytest.fixture
def store(tmp_path, tiny_encoder, encoder):
    config = IndexConfig(model=tiny_encoder, chunk_tokens=16, overlap=4)
    with VectorStore.create(tmp_path / "idx", config, encoder.fingerprint) as s:
        add_files(s, encoder, [str(_write_docs(tmp_path / "docs"))], {"team": "a"})
        yield s


# ---- chunking -----------------------------------------------------------------------------------------------------

def test_chunks_are_exact_slices_within_budget_overlapping_and_cover_every_word():
    text = "  ".join(f"word{i}" for i in range(200))
    chunks = chunk_text(text, max_tokens=20, overlap=5)
    assert all(c.text == text[c.start:c.end] and c.n_tokens <= 20 for c in chunks)
    words = [w for c in chunks for w in c.text.split()]
    assert set(words) == set(text.split())
    for a, b in zip(chunks, chunks[1:]):
        repeated = a.text.split()[-5:]
        assert b.text.split()[:5] == repeated  # the next window starts 5 tokens back
    counts = chunk_text("aaaa bb c", 4, 1, count_tokens=len)  # tokens = characters: a word over budget stays whole
    assert [c.text for c in counts] == ["aaaa", "bb c"]
    assert chunk_text("   \n ", 10, 2) == []
    with pytest.raises(ValueError):
        chunk_text("x", 4, 4)


def test_sections_split_at_markdown_headings_and_python_definitions():
    md = "# A\ntext\n```\n# not a heading\n```\n## B\nmore\n"
    assert [md[i:i + 4] for i in section_starts(md, "markdown")] == ["# A\n", "## B"]
    py = "import os\n\n@cache\ndef f():\n    pass\n\nclass A:\n    def g(self): pass\ndefine = 1\n"
    assert [py[i:].split("\n")[0] for i in section_starts(py, "python")] == ["import os", "@cache", "class A:"]
    chunks = chunk_text(DOCS["deque.md"], 100, 10, kind="markdown")
    assert [c.text.split("\n")[0] for c in chunks] == ["# Deque", "## Rotate"]


# ---- BM25: parity with rank_bm25 ------------------------------------------------------------------------------------

CORPUS = ["the deque rotates the items to the right", "a heap pops the smallest item first",
          "json dumps returns a string of json text", "rotate the heap? no, the deque rotates",
          "items items items in a list", "the path module joins path components"]


def test_bm25_equals_rank_bm25_including_the_negative_idf_floor(tmp_path, encoder):
    rank_bm25 = need("rank_bm25")
    tokens = [bm25_terms(t) for t in CORPUS]
    tokens.append(["deque"] * 2 + ["rotat"] * 3)  # "rotat" and "deque" in 3 of 7 chunks, "item" in 3
    ref = rank_bm25.BM25Okapi(tokens)
    ours = BM25(tokens)
    queries = [["deque", "rotat"], ["item", "item", "heap"], ["json"], ["nowhere"], ["path", "deque"]]
    common = [["x"] * 3, ["x", "y"], ["x", "z"], ["w"]]  # "x" in 3 of 4 documents: a negative idf, floored
    ref_common, ours_common = rank_bm25.BM25Okapi(common), BM25(common)
    assert ours_common.scores(["x"]) != [0.0] * 4
    np.testing.assert_allclose(ours_common.scores(["x", "w"]), ref_common.get_scores(["x", "w"]), rtol=1e-12)
    for q in queries:
        np.testing.assert_allclose(ours.scores(q), ref.get_scores(q), rtol=1e-12, atol=1e-12)

    # The store keeps the same counts in SQLite: its scores equal rank_bm25 over its chunks' terms, also after a
    # delete (document frequencies decremented) and an add.
    store = VectorStore.create(tmp_path / "idx", IndexConfig(model=encoder.name), encoder.fingerprint)
    docs = [(f"d{i}.txt", text, {}) for i, text in enumerate(CORPUS)]
    from llmlab.infer.index import prepare

    store.write(prepare(docs, encoder, store.config), [], encoder.fingerprint)
    extra = prepare([("extra.txt", "deque deque rotate rotate rotate", {})], encoder, store.config)
    store.write(extra, ["d0.txt", "d2.txt"], encoder.fingerprint)  # d0 shares terms with others: df must drop
    rows = store.db.execute("SELECT c.id, c.text FROM chunks c ORDER BY c.id").fetchall()
    ref = rank_bm25.BM25Okapi([bm25_terms(t) for _, t in rows])
    for q in queries:
        expect = ref.get_scores(q)
        got = dict(store.bm25(q, k=100))
        np.testing.assert_allclose([got.get(cid, 0.0) for cid, _ in rows], expect, rtol=1e-12, atol=1e-12)
    store.close()


def test_reciprocal_rank_fusion_by_hand():
    fused = fuse_ranks([[(1, 0.9), (2, 0.8), (3, 0.1)], [(3, 7.0), (1, 5.0)]], k=60)
    assert [cid for cid, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)


# ---- the store ----------------------------------------------------------------------------------------------------

def _all_vectors(store):
    rows = store.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
    return [r[0] for r in rows], np.stack([np.frombuffer(r[1], np.float32) for r in rows])


def test_dense_search_equals_brute_force_and_filters_apply(store, encoder, tmp_path):
    ids, vecs = _all_vectors(store)
    assert store.vectors.ntotal == len(ids) == store.count("chunks") > len(DOCS)  # 16-token chunks: several per doc
    q = encoder.embed(["rotate the deque"])[0]
    hits = store.search("rotate the deque", encoder, k=4, mode="dense", query_vector=q)
    expect = np.argsort(-(vecs @ q), kind="stable")[:4]
    assert [h.chunk_id for h in hits] == [ids[i] for i in expect]
    np.testing.assert_allclose([h.score for h in hits], (vecs @ q)[expect], rtol=1e-5)
    for mode in ("dense", "bm25", "hybrid"):
        only = store.search("heap item json", encoder, k=20, mode=mode, where={"suffix": ".txt"})
        assert only and all(h.path.endswith(".txt") for h in only), mode
        assert store.search("heap item json", encoder, k=3, mode=mode, where={"team": "nobody"}) == []
    top = store.search("smallest heap invariant push", encoder, k=1, mode="bm25")[0]
    assert top.path.endswith("heap.py") and top.metadata["team"] == "a"


def test_incremental_add_replace_delete_and_reopen(store, encoder, tmp_path):
    docs = tmp_path / "docs"
    gen = store.generation()
    assert add_files(store, encoder, [str(docs)], {})["unchanged"] == len(DOCS)  # nothing to do: no commit
    (docs / "notes" / "path.txt").write_text("Return the base name of a path, the part after the last slash.")
    (docs / "new.txt").write_text("Sort a list in place, stable, with an optional key function.")
    s = add_files(store, encoder, [str(docs)], {})
    assert (s["added"], s["replaced"], s["unchanged"]) == (1, 1, len(DOCS) - 1)
    assert store.generation() == gen + 1
    assert delete_paths(store, [str(docs / "notes")]) == 2
    with pytest.raises(LlmlabError, match="not in the index"):
        delete_paths(store, [str(docs / "notes")])
    paths = store.paths()
    assert len(paths) == len(DOCS) - 2 + 1 and not any("notes" in p for p in paths)
    ids, _ = _all_vectors(store)
    folder = store.folder
    store.close()
    with VectorStore.open(folder) as again:
        assert again.vectors.ntotal == len(ids) and sorted(faiss_ids(again)) == ids
        assert again.search("sort a list stable key", None, k=1, mode="bm25")[0].path.endswith("new.txt")


def test_two_writers_on_one_index_keep_every_vector(store, encoder, tmp_path):
    other = VectorStore.open(store.folder)  # opened before the first writer's change
    (tmp_path / "a.txt").write_text("First writer's document about sockets and ports.")
    (tmp_path / "b.txt").write_text("Second writer's document about threads and locks.")
    add_files(store, encoder, [str(tmp_path / "a.txt")], {})
    add_files(other, encoder, [str(tmp_path / "b.txt")], {})  # must take the first writer's vectors along
    other.close()
    with VectorStore.open(store.folder) as again:
        assert sorted(faiss_ids(again)) == _all_vectors(again)[0]


def faiss_ids(store):
    import faiss

    return faiss.vector_to_array(store.vectors.id_map).tolist()


def test_hnsw_beyond_the_threshold_finds_what_exact_search_finds(tmp_path):
    rng = np.random.default_rng(0)
    fp = {"model": "synthetic", "dim": 16, "probe": [1.0] + [0.0] * 15}
    config = IndexConfig(model="synthetic", hnsw_above=300, hnsw_m=16, ef_search=64)
    store = VectorStore.create(tmp_path / "idx", config, fp)
    from llmlab.text.chunk import Chunk

    def doc(i):
        v = rng.standard_normal((1, 16)).astype(np.float32)
        return (f"d{i}", "x", {}, [Chunk(0, 1, f"text {i}", 2)], v / np.linalg.norm(v))

    store.write([doc(i) for i in range(200)], [], fp)
    assert type(__import__("faiss").downcast_index(store.vectors.index)).__name__ == "IndexFlatIP"
    store.write([doc(i) for i in range(200, 500)], [], fp)
    assert store.info()["faiss"] == "IndexHNSWFlat" and store.vectors.ntotal == 500
    store.write([], [f"d{i}" for i in range(0, 100)], fp)  # HNSW cannot remove: rebuilt from the database
    assert store.vectors.ntotal == 400 == store.count("chunks")
    ids, vecs = _all_vectors(store)
    found = 0
    for q in rng.standard_normal((20, 16)).astype(np.float32):
        exact = {ids[i] for i in np.argsort(-(vecs @ q))[:10]}
        found += len(exact & {cid for cid, _ in store.dense(q, fp, 10)})
    assert found / 200 >= 0.95
    allowed = set(ids[::7])  # a metadata filter reaches inside the graph search too
    assert {cid for cid, _ in store.dense(q, fp, 10, allowed)} <= allowed and len(store.dense(q, fp, 10, allowed)) == 10
    store.close()


# ---- a crash between the database commit and the vectors save ----------------------------------------------------

CRASH = """
import sys, time
from pathlib import Path
from llmlab.infer import index

def stop_here():
    Path(sys.argv[3]).write_text("committed")
    time.sleep(300)

index.after_commit = stop_here
store = index.VectorStore.open(sys.argv[1])
index.add_files(store, index.open_encoder(store), [sys.argv[2]], {})
"""


def test_a_process_killed_after_the_commit_is_recovered_on_open(store, tmp_path):
    new = tmp_path / "late.txt"
    new.write_text("Recovered after a crash between the two writes: the vectors are rebuilt from the database.")
    marker = tmp_path / "marker"
    folder = store.folder
    before = store.count("chunks")
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", CRASH, str(folder), str(new), str(marker)],
                            env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the writer never reached the commit"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from llmlab.infer.index import _read_vectors

    saved_generation, stale = _read_vectors(folder / VECTORS_NAME)  # intact, only stale
    assert stale.ntotal == before  # the kill came before the vectors were saved
    with VectorStore.open(folder) as again:
        assert again.generation() == saved_generation + 1
        assert again.count("chunks") > before and again.vectors.ntotal == again.count("chunks")
        assert sorted(faiss_ids(again)) == _all_vectors(again)[0]
        ids, vecs = _all_vectors(again)
        late = again.db.execute("SELECT c.id FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE d.path = ?",
                                (str(new.resolve()),)).fetchone()[0]
        assert again.dense(vecs[ids.index(late)], again.fingerprint, 1)[0][0] == late
    assert _read_vectors(folder / VECTORS_NAME)[0] == saved_generation + 1  # the rebuilt vectors were saved


# ---- bad input ----------------------------------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_encoder, capsys):
    docs = _write_docs(tmp_path / "docs")
    idx = str(tmp_path / "idx")
    assert main(["index", "build", str(docs), "--index", idx, "--model", tiny_encoder, "--threads", "1"]) == 0
    empty, binary, latin = tmp_path / "empty.txt", tmp_path / "blob.txt", tmp_path / "latin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    latin.write_bytes("caf\xe9".encode("latin-1"))
    other = make_tiny_encoder(tmp_path / "other", seed=1)
    narrow = make_tiny_encoder(tmp_path / "narrow", seed=0, dim=16)
    capsys.readouterr()
    cases = {
        "empty document": ["index", "add", str(empty), "--index", idx],
        "a binary file": ["index", "add", str(binary), "--index", idx],
        "not UTF-8": ["index", "add", str(latin), "--index", idx],
        "no such file": ["index", "add", str(tmp_path / "missing.txt"), "--index", idx],
        "come from": ["index", "query", "rotate", "--index", idx, "--model", other],
        "16-d": ["index", "query", "rotate", "--index", idx, "--model", narrow],
        "no index.db": ["index", "query", "rotate", "--index", str(tmp_path / "nothing")],
        "already an index": ["index", "build", str(docs), "--index", idx, "--model", tiny_encoder],
        "KEY=VALUE": ["index", "query", "rotate", "--index", idx, "--where", "team"],
        "query is empty": ["index", "query", " ", "--index", idx],
        "--k 0": ["index", "query", "x", "--index", idx, "--k", "0"],
        "--chunk-tokens 4": ["index", "build", str(docs), "--index", str(tmp_path / "i2"), "--chunk-tokens", "4"],
    }
    for expect, argv in cases.items():
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and expect in err and err.count("\n") == 1 and "Traceback" not in err, (expect, err)
    # a folder with an empty file skips it and says so; one with a binary file under a text suffix is refused
    (docs / "blank.md").write_text("")
    assert main(["index", "add", str(docs), "--index", idx]) == 0
    assert "skipped 1 empty" in capsys.readouterr().err
    (docs / "x.txt").write_bytes(b"\0\1\2")
    assert _cli(capsys, "index", "add", str(docs), "--index", idx)[0] == 2


def test_mixed_embedding_sizes_are_refused(store, encoder):
    from llmlab.text.chunk import Chunk

    bad = ("odd.txt", "x", {}, [Chunk(0, 1, "x", 1)], np.ones((1, encoder.dim + 1), np.float32))
    with pytest.raises(LlmlabError, match="mixed embedding sizes"):
        store.write([bad], [], encoder.fingerprint)
    with pytest.raises(LlmlabError, match="shape"):
        store.dense(np.ones(encoder.dim - 1, np.float32), encoder.fingerprint, 3)
    assert store.count("documents") == len(DOCS)  # nothing half-written


def test_corrupt_or_truncated_files_are_detected(store, capsys):
    folder = store.folder
    chunks = store.count("chunks")
    store.close()
    vectors = (folder / VECTORS_NAME).read_bytes()
    for broken, expect in ((vectors[:len(vectors) // 2], "checksum mismatch"), (b"junk" + vectors, "bad header"),
                           (vectors[:-8] + bytes(8), "checksum mismatch")):
        (folder / VECTORS_NAME).write_bytes(broken)
        rc, err = _cli(capsys, "index", "query", "deque", "--index", str(folder), "--mode", "bm25")
        assert rc == 2 and expect in err and "index repair" in err and err.count("\n") == 1, err
    assert main(["index", "repair", "--index", str(folder)]) == 0  # the vectors rebuilt from the database
    with VectorStore.open(folder) as again:
        assert again.vectors.ntotal == chunks
    db = (folder / DB_NAME).read_bytes()
    for broken in (db[:len(db) // 2], b"not a database" * 100, db[:100] + bytes(len(db) - 100)):
        (folder / DB_NAME).write_bytes(broken)
        rc, err = _cli(capsys, "index", "info", "--index", str(folder))
        assert rc == 2 and "corrupt or not an index database" in err and err.count("\n") == 1, err


# ---- the README's commands ----------------------------------------------------------------------------------------

def _readme_index_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Vector store"):]
    section = section[:section.index("\n## ", 4)]
    return [line.strip() for block in section.split("```")[1::2] for line in block.splitlines()
            if line.strip().startswith("llmlab index")]


def test_readme_index_commands_as_written(tmp_path, monkeypatch, capsys, tiny_encoder):
    """Each README command, with a tiny random encoder in place of MiniLM (the README's folders copied in)."""
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    _write_docs(tmp_path / "docs")
    (tmp_path / "README.md").write_text((root / "README.md").read_text())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cli.py").write_text((root / "src" / "llmlab" / "cli.py").read_text())
    commands = _readme_index_commands()
    assert {c.split()[2] for c in commands} >= {"build", "add", "delete", "info", "query", "eval"}
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        if argv[1] in ("build", "eval"):
            argv += ["--model", tiny_encoder] + (["--limit", "12"] if argv[1] == "eval" else [])
        assert main([*argv, "--threads", "1"]) == 0, command
        out = capsys.readouterr().out
        if argv[1] == "query" and "--json" in argv:
            hits = [json.loads(line) for line in out.splitlines()]
            assert hits and all({"path", "chunk", "score"} <= h.keys() for h in hits)
        if argv[1] == "eval":
            assert "| hybrid |" in out and "| bm25 |" in out


def test_help_gives_every_flag_a_default(capsys):
    import re

    for name in ("build", "add", "delete", "info", "repair", "query", "eval"):
        with pytest.raises(SystemExit):
            main(["index", name, "--help"])
        body = capsys.readouterr().out.split("options:", 1)[1]
        entries = re.split(r"\n  (?=-)", "\n" + body)[1:]
        assert len(entries) >= 2
        for entry in entries:
            if not entry.startswith("-h"):
                text = " ".join(entry.split())
                assert "(default:" in text or "(required)" in text, (name, entry)


def test_minilm_by_default_finds_the_right_file(tmp_path, minilm_path, capsys):
    """The real all-MiniLM-L6-v2 (the default model): each question finds its file first."""
    docs = _write_docs(tmp_path / "docs")
    idx = str(tmp_path / "idx")
    assert main(["index", "build", str(docs), "--index", idx, "--threads", "1"]) == 0
    capsys.readouterr()
    for question, expect in (("how do I rotate a deque to the left", "deque.md"),
                             ("serialize python objects into a string", "json.txt"),
                             ("priority queue insertion", "heap.py")):
        assert main(["index", "query", question, "--index", idx, "--mode", "dense", "--k", "1", "--json"]) == 0
        hit = json.loads(capsys.readouterr().out)
        assert hit["path"].endswith(expect), (question, hit)
