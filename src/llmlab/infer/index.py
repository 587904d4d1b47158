"""A persistent vector store: documents -> chunks -> embeddings, searched densely (FAISS), by BM25, or both fused.

One index is a folder:

- ``index.db`` (SQLite, write-ahead log): the documents (path, SHA-256, metadata JSON), their chunks (offsets,
  text, the embedding as float32 bytes), the BM25 postings (term, chunk, tf) and document frequencies, and
  ``meta``: the format, the ``IndexConfig``, the encoder's fingerprint and the **generation**, a counter every
  write transaction increments. The database is the record: whatever it holds was committed whole.
- ``vectors.faiss``: the same embeddings as a FAISS index keyed by chunk id (Johnson, Douze & Jegou 2017,
  "Billion-scale similarity search with GPUs", arXiv:1702.08734): exact inner product (``IndexFlatIP``) up to
  ``hnsw_above`` vectors, an HNSW graph beyond (Malkov & Yashunin 2016, arXiv:1603.09320). The file is a header
  line (the generation it reflects, its SHA-256) and ``faiss.serialize_index``'s bytes, replaced atomically.

A write commits the database first, then saves the vectors. A crash between the two leaves ``vectors.faiss`` at
an older generation; opening the index sees that and rebuilds the FAISS index from the embeddings in the database
(the recovery check; tests/test_index.py kills a process there). A vectors file that is damaged, not stale (bad
header, wrong checksum, unreadable by FAISS, a count unlike the database's), and a database that fails SQLite's
``quick_check`` are one-line errors; ``repair`` rebuilds the vectors from the database.

The encoder's fingerprint is its embedding of a fixed probe sentence: a query embedded by a model whose probe
vector differs (cosine < 0.999) or whose size differs is refused, whatever the model is called. Hybrid search fuses
the dense and the BM25 rankings by reciprocal rank fusion (Cormack, Clarke & Buettcher 2009, "Reciprocal Rank
Fusion outperforms Condorcet and individual Rank Learning Methods", SIGIR): score = sum over the two lists of
1 / (60 + rank). Shapes: texts (N,) -> embeddings (N, D) float32, L2-normalised; a query (D,) -> hits (k,).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmlab.common import LlmlabError, atomic_path
from llmlab.infer.embed import MAX_TOKENS, embed_texts
from llmlab.text.bm25 import bm25_terms, floored_idf, mean_idf, term_weight
from llmlab.text.chunk import chunk_text, collect_files, kind_of

log = logging.getLogger("llmlab")

FORMAT = "llmlab-index-1"
DB_NAME, VECTORS_NAME = "index.db", "vectors.faiss"
_MAGIC = b"llmlab-faiss-1\n"
PROBE = "The quick brown fox jumps over the lazy dog. def main(): return 0"
RRF_K = 60
MODES = ("dense", "bm25", "hybrid")
_META_KEY = re.compile(r"[A-Za-z_][\w-]*")
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL,
                        metadata TEXT NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
                     text TEXT NOT NULL, n_terms INTEGER NOT NULL, vector BLOB NOT NULL);
CREATE INDEX chunks_doc ON chunks(doc_id);
CREATE TABLE postings (term TEXT NOT NULL, chunk_id INTEGER NOT NULL, tf INTEGER NOT NULL,
                       PRIMARY KEY (term, chunk_id)) WITHOUT ROWID;
CREATE INDEX postings_chunk ON postings(chunk_id);
CREATE TABLE terms (term TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;
"""

# Called between the database commit and the vectors save (None in normal use): the crash test stops a process here.
after_commit: Callable[[], None] | None = None


@dataclass
class IndexConfig:
    """How documents are cut and which FAISS index holds their vectors (saved in the index)."""
    model: str = field(default="all-minilm-l6-v2", metadata={"help": "the encoder: an embedded name or a Hugging "
                                                                      "Face BERT folder"})
    chunk_tokens: int = field(default=128, metadata={"help": "encoder tokens per chunk, at most"})
    overlap: int = field(default=32, metadata={"help": "tokens a chunk repeats from the one before"})
    hnsw_above: int = field(default=50_000, metadata={"help": "vectors searched exactly (IndexFlatIP) up to this "
                                                              "count, by an HNSW graph beyond"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW neighbours per node"})
    ef_search: int = field(default=128, metadata={"help": "HNSW candidates kept while searching"})

    def check(self) -> None:
        if self.chunk_tokens < 8 or not 0 <= self.overlap < self.chunk_tokens:
            raise LlmlabError(f"--chunk-tokens {self.chunk_tokens} --overlap {self.overlap}: give chunk tokens >= 8 "
                              "and 0 <= overlap < chunk tokens")
        if self.hnsw_above < 1 or self.hnsw_m < 2 or self.ef_search < 1:
            raise LlmlabError("--hnsw-above, --hnsw-m and --ef-search must be positive (--hnsw-m >= 2)")


@dataclass
class Hit:
    path: str
    text: str
    score: float
    start: int
    end: int
    chunk_id: int
    metadata: dict = field(default_factory=dict)


class Encoder:
    """A BERT encoder as the index uses it: token counts for chunking, normalised embeddings, a fingerprint."""

    def __init__(self, source: str, max_tokens: int) -> None:
        from llmlab.formats.load import load_model

        loaded = load_model(source)
        if loaded.config.arch != "bert" or loaded.tokenizer is None:
            raise LlmlabError(f"{source}: not an encoder with a tokenizer (e.g. all-minilm-l6-v2)")
        self.name, self.model, self.tokenizer = source, loaded.model.eval(), loaded.tokenizer
        self.dim, self.max_tokens = loaded.config.dim, min(max_tokens, loaded.config.max_seq_len)
        probe = embed_texts(self.model, self.tokenizer, [PROBE], max_tokens=MAX_TOKENS)[0]  # whatever max_tokens is
        self.fingerprint = {"model": source, "dim": self.dim, "probe": probe.tolist()}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N,) texts -> (N, D) float32, L2-normalised."""
        return embed_texts(self.model, self.tokenizer, texts, max_tokens=self.max_tokens).numpy()


def check_same_model(index_fp: dict, query_fp: dict) -> None:
    """Refuse vectors from an encoder other than the one that built the index."""
    a, b = np.asarray(index_fp["probe"]), np.asarray(query_fp["probe"])
    if a.shape != b.shape or float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12) < 0.999:
        raise LlmlabError(f"these vectors come from {query_fp['model']} ({b.shape[0]}-d), but the index holds "
                          f"{index_fp['model']} embeddings ({a.shape[0]}-d): use --model {index_fp['model']}")


def _read_vectors(path: Path) -> tuple[int, object]:
    """vectors.faiss -> (generation, FAISS index); a damaged file is an LlmlabError."""
    import faiss

    fix = f"rebuild it from the database with 'llmlab index repair --index {path.parent}'"
    raw = path.read_bytes()
    head, _, payload = raw[len(_MAGIC):].partition(b"\n")
    try:
        if not raw.startswith(_MAGIC):
            raise ValueError("no magic")
        header = json.loads(head)
        generation, digest = int(header["generation"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise LlmlabError(f"{path}: not an llmlab vectors file (bad header): {fix}") from None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise LlmlabError(f"{path}: checksum mismatch ({len(payload)} bytes, truncated or corrupt): {fix}")
    try:
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8).copy())
    except RuntimeError as e:
        raise LlmlabError(f"{path}: FAISS cannot read it ({str(e).splitlines()[0]}): {fix}") from None
    return generation, index


def _write_vectors(path: Path, index, generation: int) -> None:
    import faiss

    payload = faiss.serialize_index(index).tobytes()
    header = json.dumps({"generation": generation, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(_MAGIC + header + b"\n" + payload)


def create_database(path: Path, schema: str, meta: list[tuple[str, str]], exists: str, flag: str) -> sqlite3.Connection:
    """A new store's SQLite file ``path`` (its folder made if missing) in WAL mode: ``schema``'s statements and
    the ``meta`` rows in one transaction. ``exists``: the error's text when the folder already holds one;
    ``flag``: the command-line flag that named the folder."""
    folder = path.parent
    if path.exists():
        raise LlmlabError(f"{folder}: {exists}")
    if folder.exists() and not folder.is_dir():
        raise LlmlabError(f"{flag} {folder}: a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    with _transaction(db):
        for statement in schema.split(";"):
            if statement.strip():
                db.execute(statement)
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    return db


class VectorStore:
    """An index folder, opened: ``add`` / ``delete`` documents, ``search`` them, ``info``."""

    def __init__(self, folder: str | Path, db: sqlite3.Connection) -> None:
        self.folder, self.db = Path(folder), db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise LlmlabError(f"{self.folder}: index format {meta.get('format')!r}, expected {FORMAT!r}: build the "
                              "index again with this version of llmlab")
        self.config = IndexConfig(**json.loads(meta["config"]))
        self.fingerprint = json.loads(meta["fingerprint"])
        self.dim = int(self.fingerprint["dim"])
        self._idf_cache: tuple[int, float] | None = None
        self._vectors_generation: int | None = None  # the generation self.vectors reflects
        self._lock_depth = 0

    # ---- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | Path, config: IndexConfig, fingerprint: dict) -> VectorStore:
        config.check()
        folder = Path(folder)
        db = create_database(folder / DB_NAME, _SCHEMA, [
            ("format", FORMAT), ("config", json.dumps(asdict(config))), ("fingerprint", json.dumps(fingerprint)),
            ("generation", "0")], "already an index: add files with 'llmlab index add', or pick a new folder",
            "--index")
        store = cls(folder, db)
        store.vectors = store._build_faiss(np.zeros((0, store.dim), np.float32), np.zeros(0, np.int64))
        store._save_vectors()
        return store

    @classmethod
    def open(cls, folder: str | Path, repair: bool = False) -> VectorStore:
        folder = Path(folder)
        path = folder / DB_NAME
        if not path.is_file():
            raise LlmlabError(f"--index {folder}: no {DB_NAME} (not an index: make one with 'llmlab index build "
                              "FILES --index DIR')")
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            problems = [r[0] for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            store = cls(folder, db)
        except (sqlite3.DatabaseError, KeyError, ValueError, TypeError) as e:
            raise LlmlabError(f"{path}: corrupt or not an index database ({str(e).splitlines()[0]}): build the "
                              "index again") from None
        store._load_vectors(repair)
        return store

    def _load_vectors(self, repair: bool) -> None:
        """Read vectors.faiss; when it is behind the database (an interrupted write), rebuild it, under the write
        lock so that a writer finishing its save is waited for rather than raced."""
        if not repair and self._read_saved() == self.generation():
            return
        with self._lock():
            generation = self.generation()
            if not repair:
                saved = self._read_saved()
                if saved == generation:
                    return
                log.warning(f"{self.folder}: the vectors are at generation {saved}, the database at {generation} "
                            "(a write was interrupted): rebuilding them from the database")
            self._rebuild_vectors()

    def _read_saved(self) -> int | None:
        """Load vectors.faiss into ``self.vectors`` -> the generation it reflects (None: no file)."""
        path = self.folder / VECTORS_NAME
        if not path.exists():
            return None
        saved, self.vectors = _read_vectors(path)
        self._vectors_generation = saved
        fix = f"rebuild them with 'llmlab index repair --index {self.folder}'"
        if saved == self.generation():
            count = self.count("chunks")
            if self.vectors.ntotal != count:
                raise LlmlabError(f"{path}: {self.vectors.ntotal} vectors for {count} chunks in the database: {fix}")
            if self.vectors.d != self.dim:
                raise LlmlabError(f"{path}: {self.vectors.d}-d vectors in a {self.dim}-d index: {fix}")
        return saved

    def _rebuild_vectors(self) -> None:
        rows = self.db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        self.vectors = self._build_faiss(vecs, ids)
        self._save_vectors()

    def _save_vectors(self) -> None:
        self._vectors_generation = self.generation()
        _write_vectors(self.folder / VECTORS_NAME, self.vectors, self._vectors_generation)

    def _build_faiss(self, vecs: np.ndarray, ids: np.ndarray):
        import faiss

        if len(ids) > self.config.hnsw_above:
            inner = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.config.ef_search
        else:
            inner = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap2(inner)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs), ids)
        return index

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading -----------------------------------------------------------------------------------------------

    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def paths(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM documents ORDER BY path")]

    def info(self) -> dict:
        import faiss

        inner = faiss.downcast_index(self.vectors.index)
        return {"index": str(self.folder), "documents": self.count("documents"), "chunks": self.count("chunks"),
                "terms": self.count("terms"), "model": self.fingerprint["model"], "dim": self.dim,
                "faiss": type(inner).__name__, "generation": self.generation(), "config": asdict(self.config),
                "bytes": {p.name: p.stat().st_size for p in sorted(self.folder.iterdir())
                          if p.is_file() and not p.name.startswith(".")}}

    def allowed_chunks(self, where: dict[str, str]) -> set[int] | None:
        """Chunk ids whose document's metadata has every ``key: value`` of ``where``; None without a filter."""
        if not where:
            return None
        sql, args = "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE 1", []
        for key, value in where.items():
            if not _META_KEY.fullmatch(key):
                raise LlmlabError(f"--where {key}={value}: a key is letters, digits, _ and -")
            sql += f" AND json_extract(d.metadata, '$.\"{key}\"') = ?"
            args.append(value)
        return {r[0] for r in self.db.execute(sql, args)}

    def dense(self, query: np.ndarray, fingerprint: dict, k: int, allowed: set[int] | None = None) -> list[tuple]:
        """A (D,) query vector -> [(chunk id, inner product)], best first."""
        import faiss

        check_same_model(self.fingerprint, fingerprint)
        if query.shape != (self.dim,):
            raise LlmlabError(f"a query vector of shape {tuple(query.shape)}: the index holds {self.dim}-d vectors")
        params = None
        if allowed is not None:
            if not allowed:
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.fromiter(allowed, np.int64)))
        scores, ids = self.vectors.search(query.reshape(1, -1).astype(np.float32), k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def bm25(self, terms: list[str], k: int, allowed: set[int] | None = None) -> list[tuple]:
        """Query terms -> [(chunk id, BM25 score)], best first (ties: lower chunk id first); text/bm25.py."""
        n_docs, total = self.db.execute("SELECT COUNT(*), COALESCE(SUM(n_terms), 0) FROM chunks").fetchone()
        if not n_docs or not total:
            return []
        generation = self.generation()
        if self._idf_cache is None or self._idf_cache[0] != generation:
            dfs = (r[0] for r in self.db.execute("SELECT df FROM terms"))
            self._idf_cache = (generation, mean_idf(n_docs, dfs))
        avgdl, scores = total / n_docs, Counter()
        for term, repeats in Counter(terms).items():
            row = self.db.execute("SELECT df FROM terms WHERE term = ?", (term,)).fetchone()
            if row is None:
                continue
            weight = repeats * floored_idf(n_docs, row[0], self._idf_cache[1])
            for cid, tf, length in self.db.execute("SELECT p.chunk_id, p.tf, c.n_terms FROM postings p JOIN chunks "
                                                   "c ON c.id = p.chunk_id WHERE p.term = ?", (term,)):
                if allowed is None or cid in allowed:
                    scores[cid] += weight * term_weight(tf, length, avgdl)
        return sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:k]

    def search(self, query: str, encoder: Encoder | None, *, k: int = 5, mode: str = "hybrid",
               where: dict[str, str] | None = None, query_vector: np.ndarray | None = None,
               depth: int = 100) -> list[Hit]:
        """The ``k`` best chunks for ``query``: dense (needs ``encoder`` or ``query_vector`` from it), bm25, or
        hybrid (both lists, ``depth`` deep, fused by reciprocal rank)."""
        if mode not in MODES:
            raise LlmlabError(f"--mode {mode}: use one of {', '.join(MODES)}")
        if k < 1:
            raise LlmlabError(f"--k {k}: give at least 1")
        if not query.strip():
            raise LlmlabError("the query is empty: give some text")
        allowed = self.allowed_chunks(where or {})
        lists = []
        if mode != "bm25":
            if query_vector is None:
                if encoder is None:
                    raise ValueError("dense and hybrid search need the encoder or a query vector")
                query_vector = encoder.embed([query])[0]
            lists.append(self.dense(query_vector, encoder.fingerprint if encoder else self.fingerprint,
                                    k if mode == "dense" else max(k, depth), allowed))
        if mode != "dense":
            lists.append(self.bm25(bm25_terms(query), k if mode == "bm25" else max(k, depth), allowed))
        ranked = lists[0] if len(lists) == 1 else fuse_ranks(lists)[:k]
        return self._hits(ranked[:k])

    def _hits(self, ranked: list[tuple]) -> list[Hit]:
        hits = []
        for cid, score in ranked:
            path, text, start, end, meta = self.db.execute(
                "SELECT d.path, c.text, c.start, c.end, d.metadata FROM chunks c JOIN documents d ON d.id = c.doc_id "
                "WHERE c.id = ?", (cid,)).fetchone()
            hits.append(Hit(path, text, score, start, end, cid, json.loads(meta)))
        return hits

    # ---- writing -----------------------------------------------------------------------------------------------

    def write(self, added: list[tuple], deleted: list[str], fingerprint: dict) -> None:
        """One transaction: remove the documents at ``deleted`` paths and add ``added`` ones, each (path,
        sha256, metadata, chunks, (n_chunks, D) vectors); then the FAISS index, saved with the new generation."""
        check_same_model(self.fingerprint, fingerprint)
        for path, _, _, chunks, vecs in added:
            if vecs.ndim != 2 or vecs.shape != (len(chunks), self.dim):
                raise LlmlabError(f"{path}: vectors of shape {tuple(vecs.shape)}, the index holds {self.dim}-d "
                                  f"vectors ({len(chunks)} chunks): mixed embedding sizes cannot share an index")
        with self._lock():
            if self._vectors_generation != self.generation():  # another process wrote since these were read
                self._load_vectors(repair=False)
            with _transaction(self.db):
                gone, new_ids, new_vecs = self._insert(added, deleted)
            if after_commit is not None:
                after_commit()
            total = self.count("chunks")
            hnsw_now, hnsw_next = self.vectors.ntotal > self.config.hnsw_above, total > self.config.hnsw_above
            if (gone and hnsw_now) or hnsw_now != hnsw_next:
                self._rebuild_vectors()  # HNSW cannot remove vectors; crossing the threshold changes the kind
                return
            if gone:
                self.vectors.remove_ids(np.array(gone, dtype=np.int64))
            if new_ids:
                self.vectors.add_with_ids(np.stack(new_vecs), np.array(new_ids, dtype=np.int64))
            self._save_vectors()

    def _insert(self, added: list[tuple], deleted: list[str]) -> tuple[list[int], list[int], list[np.ndarray]]:
        """The database half of ``write`` (inside its transaction) -> (chunk ids removed, chunk ids added, their
        vectors)."""
        gone = self._delete_rows(deleted + [a[0] for a in added])
        new_ids, new_vecs = [], []
        for path, sha, meta, chunks, vecs in added:
            doc = self.db.execute("INSERT INTO documents (path, sha256, metadata) VALUES (?, ?, ?)",
                                  (path, sha, json.dumps(meta))).lastrowid
            for c, v in zip(chunks, vecs.astype(np.float32)):
                terms = Counter(bm25_terms(c.text))
                cid = self.db.execute("INSERT INTO chunks (doc_id, start, end, text, n_terms, vector) VALUES "
                                      "(?, ?, ?, ?, ?, ?)", (doc, c.start, c.end, c.text, sum(terms.values()),
                                                             v.tobytes())).lastrowid
                self.db.executemany("INSERT INTO postings VALUES (?, ?, ?)",
                                    [(t, cid, n) for t, n in terms.items()])
                self.db.executemany("INSERT INTO terms VALUES (?, 1) ON CONFLICT(term) DO UPDATE SET df = df + 1",
                                    [(t,) for t in terms])
                new_ids.append(cid)
                new_vecs.append(v)
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return gone, new_ids, new_vecs

    def _delete_rows(self, paths: list[str]) -> list[int]:
        """Delete the documents at ``paths`` (those present) with their chunks, postings and term counts."""
        gone = []
        for path in paths:
            row = self.db.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
            if row is None:
                continue
            ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (row[0],))]
            for cid in ids:
                terms = [r[0] for r in self.db.execute("SELECT term FROM postings WHERE chunk_id = ?", (cid,))]
                self.db.executemany("UPDATE terms SET df = df - 1 WHERE term = ?", [(t,) for t in terms])
                self.db.execute("DELETE FROM postings WHERE chunk_id = ?", (cid,))
            self.db.execute("DELETE FROM terms WHERE df <= 0")
            self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
            self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            gone += ids
        return gone

    @contextlib.contextmanager
    def _lock(self):
        """One writer at a time across processes (the database and the vectors file move together); reentrant."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with open(self.folder / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def fuse_ranks(lists: list[list[tuple]], k: int = RRF_K) -> list[tuple]:
    """Reciprocal rank fusion: [(id, score)] rankings -> [(id, sum of 1 / (k + rank))], best first (rank from 1;
    ties: lower id first)."""
    fused: Counter = Counter()
    for ranking in lists:
        for rank, (cid, _) in enumerate(ranking, 1):
            fused[cid] += 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda x: (-x[1], x[0]))


# ---- documents -> chunks -> vectors ----------------------------------------------------------------------------

def prepare(docs: list[tuple[str, str, dict]], encoder: Encoder, config: IndexConfig) -> list[tuple]:
    """(path, text, metadata) documents -> ``VectorStore.write``'s ``added`` rows: chunked by the encoder's tokens
    (sections by file kind), embedded in one pass."""
    rows, texts = [], []
    for path, text, meta in docs:
        if not text.strip():
            raise LlmlabError(f"{path}: empty document (no text to index): leave it out")
        chunks = chunk_text(text, config.chunk_tokens, config.overlap, kind=kind_of(path),
                            count_tokens=encoder.count_tokens)
        rows.append((path, hashlib.sha256(text.encode()).hexdigest(), meta, chunks))
        texts += [c.text for c in chunks]
    vecs = encoder.embed(texts) if texts else np.zeros((0, encoder.dim), np.float32)
    out, i = [], 0
    for path, sha, meta, chunks in rows:
        out.append((path, sha, meta, chunks, vecs[i:i + len(chunks)]))
        i += len(chunks)
    return out


def parse_meta(items: list[str], flag: str) -> dict[str, str]:
    """["lang=en", "team=ml"] -> {"lang": "en", "team": "ml"}."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not _META_KEY.fullmatch(key):
            raise LlmlabError(f"{flag} {item!r}: give KEY=VALUE, the key letters, digits, _ and -")
        out[key] = value
    return out


def add_files(store: VectorStore, encoder: Encoder, sources: list[str], meta: dict[str, str]) -> dict:
    """Index the files of ``sources``: new ones added, changed ones replaced, unchanged ones (same SHA-256) left."""
    docs, skipped = collect_files(sources, meta)
    known = dict(store.db.execute("SELECT path, sha256 FROM documents"))
    fresh = [d for d in docs if known.get(d[0]) != hashlib.sha256(d[1].encode()).hexdigest()]
    added = prepare(fresh, encoder, store.config)
    if added:
        store.write(added, [], encoder.fingerprint)
    return {"added": sum(d[0] not in known for d in fresh), "replaced": sum(d[0] in known for d in fresh),
            "unchanged": len(docs) - len(fresh), "skipped_empty": skipped,
            "chunks": sum(len(a[3]) for a in added)}


def delete_paths(store: VectorStore, sources: list[str]) -> int:
    """Remove the documents at these paths (a folder: every document under it) -> how many were removed."""
    known, gone = store.paths(), []
    for source in sources:
        root = str(Path(source).expanduser().resolve())
        hits = [p for p in known if p == root or p.startswith(root.rstrip("/") + "/")]
        if not hits:
            raise LlmlabError(f"{source}: not in the index (see 'llmlab index info --index {store.folder} --files')")
        gone += hits
    store.write([], sorted(set(gone)), store.fingerprint)
    return len(set(gone))


def open_encoder(store_or_config, model: str | None = None) -> Encoder:
    """The encoder for an index: ``model`` if given (it must be the index's own to query it), else the index's."""
    config = store_or_config.config if isinstance(store_or_config, VectorStore) else store_or_config
    return Encoder(model or config.model, config.chunk_tokens + 2)
