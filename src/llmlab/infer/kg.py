"""Knowledge-graph retrieval: (subject, relation, object) triples extracted from documents, kept in SQLite, and a
question's neighbourhood in the graph given to the chat model as numbered context lines (the GraphRAG idea of
Edge et al. 2024, "From Local to Global: A Graph RAG Approach to Query-Focused Summarization", arXiv:2404.16130,
at its simplest: local search over extracted triples; the triple store of knowledge-base QA, e.g. Yih et al. 2015).

    documents -> paragraphs (the provenance chunks) -> triples, by rules (``rule_triples``) or by the chat model
                 constrained to the triple-list JSON schema (``model_triples``, ``infer/json_constraint.py``)
              -> ``GraphStore`` (``graph.db``: entities, relations, triples with their chunk ids, in transactions)
    question  -> entity linking (graph node names found in the question, longest first)
              -> k-hop expansion: uniform-cost search from the linked nodes, an edge followed forward costs 1 and
                 backward ``back_cost``; nodes with more than ``max_fanout`` incoming edges (hubs such as
                 "Exception") are not expanded backward; triples ranked by cost (ties: forward paths, then id)
              -> each triple one numbered source ("ZeroDivisionError is a subclass of ArithmeticError."), answered
                 through ``infer/rag.py``'s grounded prompt and citation check.

``builtin_documents`` writes the built-in corpus: one text file per exception class that ships with Python (the
builtins and those of twelve standard-library modules), its pydoc header (``class X(Base) in module M``) and its
docstring: real text whose class hierarchy makes multi-hop questions with exact answers (``eval/kg_eval.py``).
"""

from __future__ import annotations

import hashlib
import heapq
import importlib
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmlab.common import LlmlabError, write_text_atomic
from llmlab.infer.index import _transaction, create_database
from llmlab.infer.json_constraint import TokenConstraint, parse_triples
from llmlab.infer.rag import Source
from llmlab.text.chunk import collect_files

FORMAT = "llmlab-kg-1"
DB_NAME = "graph.db"
MODULES = ("json", "subprocess", "urllib.error", "shutil", "configparser", "http.client", "zipfile", "tarfile",
           "pickle", "csv", "email.errors", "concurrent.futures")
SUBCLASS, IN_MODULE, BASE_FOR = "is a subclass of", "is defined in module", "is the base class for"
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
                     text TEXT NOT NULL);
CREATE TABLE entities (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE relations (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE triples (id INTEGER PRIMARY KEY, subject INTEGER NOT NULL, relation INTEGER NOT NULL,
                      object INTEGER NOT NULL, chunk_id INTEGER NOT NULL, extractor TEXT NOT NULL,
                      UNIQUE (subject, relation, object, chunk_id));
CREATE INDEX triples_subject ON triples(subject);
CREATE INDEX triples_object ON triples(object);
"""


# ---- the built-in documents ------------------------------------------------------------------------------------

def exception_classes() -> dict[str, type]:
    """Node name -> class: the builtins' exceptions (bare names; aliases such as IOError left out) and those the
    ``MODULES`` define (``module.Name``)."""
    import builtins

    out = {n: c for n, c in vars(builtins).items()
           if isinstance(c, type) and issubclass(c, BaseException) and c.__name__ == n}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for n, c in sorted(vars(mod).items()):
            if (isinstance(c, type) and issubclass(c, BaseException) and c.__name__ == n and not n.startswith("_")
                    and c.__module__.startswith(mod_name.split(".")[0]) and c not in out.values()):
                out[f"{mod_name}.{n}"] = c
    return out


def class_document(name: str, cls: type, names: dict[type, str]) -> str:
    """pydoc's header for the class (bases by node name) and its docstring."""
    def node(c: type) -> str:
        return names.get(c) or (c.__name__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}")

    module = name.rpartition(".")[0] or "builtins"
    bases = ", ".join(node(b) for b in cls.__bases__)
    doc = " ".join((cls.__doc__ or "").split())
    return f"class {name}({bases}) in module {module}\n\n{doc}\n"


def builtin_documents(folder: Path) -> Path:
    """Write one text file per exception class into ``folder`` (once)."""
    classes = exception_classes()
    names = {c: n for n, c in classes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, cls in sorted(classes.items()):
        path = folder / f"{name}.txt"
        if not path.exists():
            write_text_atomic(path, class_document(name, cls, names))
    return folder


# ---- extraction ------------------------------------------------------------------------------------------------

_CLASS_LINE = re.compile(r"^class ([\w.]+)\(([^)]*)\)(?: in module ([\w.]+))?", re.M)
_SENTENCE_SUBCLASS = re.compile(r"\b([A-Z][\w.]*) is a subclass of ([A-Z][\w.]*)")
_BASE_FOR = re.compile(r"^(?:Common )?[Bb]ase class for ([^.]+)\.")


def rule_triples(text: str, subject: str | None = None) -> list[tuple[str, str, str]]:
    """Triples from patterns: ``class X(A, B) in module M`` (X subclass of A, of B; X defined in M), "X is a subclass
    of Y" in prose, and a docstring that opens "Base class for ..." (X is the base class for ...). ``subject``: the
    class the text is about (for the docstring rule), else the one its class line names."""
    out = []
    for m in _CLASS_LINE.finditer(text):
        subject = subject or m[1]
        out += [(m[1], SUBCLASS, b.strip()) for b in m[2].split(",") if b.strip() and b.strip() != "object"]
        if m[3]:
            out.append((m[1], IN_MODULE, m[3]))
    out += [(m[1], SUBCLASS, m[2].rstrip(".")) for m in _SENTENCE_SUBCLASS.finditer(text)]
    if subject:
        for para in text.split("\n\n")[1:2]:
            m = _BASE_FOR.match(para.strip())
            if m:
                out.append((subject, BASE_FOR, " ".join(m[1].split())))
    return list(dict.fromkeys(out))


EXTRACT_SYSTEM = ("You extract facts from a text as a JSON list of triples, each with a subject, a relation and an "
                  "object. Example: text 'class KeyError(LookupError) in module builtins' gives "
                  '[{"subject": "KeyError", "relation": "is a subclass of", "object": "LookupError"}, '
                  '{"subject": "KeyError", "relation": "is defined in module", "object": "builtins"}]')


def model_triples(llm, texts: list[str], max_new_tokens: int = 96,
                  constraint: TokenConstraint | None = None) -> list[list[tuple[str, str, str]]]:
    """The chat model's triples for each text, decoded greedily under the triple-list constraint (so each reply
    parses and validates; a reply that did not would be an error, not skipped)."""
    from llmlab.infer.generate import generate

    stops = llm.stop_ids()
    constraint = constraint or TokenConstraint.for_tokenizer(llm.tokenizer, stops, llm.config.vocab_size)
    if max_new_tokens < constraint.min_tokens():
        raise LlmlabError(f"--max-new-tokens {max_new_tokens}: the JSON needs at least {constraint.min_tokens()}")
    out = []
    for text in texts:
        messages = [{"role": "system", "content": EXTRACT_SYSTEM},
                    {"role": "user", "content": f"Text: {' '.join(text.split())}\nTriples:"}]
        ids = llm.encode_prompt(llm.render_chat(messages), max_new_tokens, truncate=True)
        done = generate(llm.model, [ids], max_new_tokens, stop_ids=stops, tokenizer=llm.tokenizer,
                        constraint=constraint.allowed)[0]
        try:
            out.append(parse_triples(done.text))
        except ValueError as e:
            raise LlmlabError(f"the model's triples are malformed ({e}): {done.text[:80]!r}") from None
    return out


def paragraphs(text: str, max_chars: int = 1500) -> list[tuple[int, int]]:
    """(start, end) of the text's blank-line-separated paragraphs, merged while they fit in ``max_chars``: the
    provenance chunks."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*\Z)", text, re.S)]
    out: list[list[int]] = []
    for s, e in spans:
        if out and e - out[-1][0] <= max_chars:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


# ---- the store -------------------------------------------------------------------------------------------------

@dataclass
class Triple:
    id: int
    subject: str
    relation: str
    object: str
    path: str  # provenance: the document and the chunk of it the triple came from
    chunk_id: int
    cost: float = 0.0  # retrieval: the path cost from the linked entities

    def sentence(self) -> str:
        return f"{self.subject} {self.relation} {self.object}."


class GraphStore:
    """A graph folder (``graph.db``), opened: ``add`` documents' triples, ``link`` a question, ``neighbourhood``."""

    def __init__(self, folder: Path, db: sqlite3.Connection) -> None:
        self.folder, self.db = folder, db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise LlmlabError(f"{folder}: graph format {meta.get('format')!r}, expected {FORMAT!r}: build it again")
        self._names: list[tuple[str, int]] | None = None

    @classmethod
    def create(cls, folder: str | Path) -> GraphStore:
        folder = Path(folder)
        db = create_database(folder / DB_NAME, _SCHEMA, [("format", FORMAT), ("generation", "0")],
                             "already a graph: pick a new folder (or delete it to rebuild)", "--graph")
        return cls(folder, db)

    @classmethod
    def open(cls, folder: str | Path) -> GraphStore:
        folder = Path(folder)
        path = folder / DB_NAME
        if not path.is_file():
            raise LlmlabError(f"--graph {folder}: no {DB_NAME} (not a graph: make one with 'llmlab kg build')")
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
            problems = [r[0] for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            store = cls(folder, db)
        except sqlite3.DatabaseError as e:
            raise LlmlabError(f"{path}: corrupt or not a graph database ({str(e).splitlines()[0]}): build the graph "
                              "again with 'llmlab kg build'") from None
        if store.count("triples") == 0:
            raise LlmlabError(f"{path}: the graph has no triples (nothing was extracted): build it from other "
                              "documents or with the other extractor")
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def info(self) -> dict:
        return {"graph": str(self.folder), **{t: self.count(t) for t in ("documents", "chunks", "entities",
                                                                           "relations", "triples")}}

    # ---- writing -----------------------------------------------------------------------------------------------

    def add(self, docs: list[tuple[str, str]], extract: Callable[[list[str]], list[list[tuple]]],
            extractor: str) -> dict:
        """(path, text) documents -> their paragraphs' triples by ``extract`` (chunk texts -> triples per chunk),
        written in one transaction (a document already there with the same SHA-256 is left)."""
        known = dict(self.db.execute("SELECT path, sha256 FROM documents"))
        fresh = [(p, t, hashlib.sha256(t.encode()).hexdigest()) for p, t in docs]
        fresh = [d for d in fresh if known.get(d[0]) != d[2]]
        spans = [paragraphs(t) for _, t, _ in fresh]
        found = extract([t[s:e] for (_, t, _), sp in zip(fresh, spans) for s, e in sp])
        n_triples, i = 0, 0
        with _transaction(self.db):
            for (path, text, sha), sp in zip(fresh, spans):
                self._delete(path)
                doc = self.db.execute("INSERT INTO documents (path, sha256) VALUES (?, ?)", (path, sha)).lastrowid
                for s, e in sp:
                    cid = self.db.execute("INSERT INTO chunks (doc_id, start, end, text) VALUES (?, ?, ?, ?)",
                                          (doc, s, e, text[s:e])).lastrowid
                    for subj, rel, obj in found[i]:
                        n_triples += self._insert_triple(subj, rel, obj, cid, extractor)
                    i += 1
            self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        self._names = None
        return {"documents": len(fresh), "unchanged": len(docs) - len(fresh), "triples": n_triples}

    def _id(self, table: str, name: str) -> int:
        self.db.execute(f"INSERT OR IGNORE INTO {table} (name) VALUES (?)", (name,))
        return self.db.execute(f"SELECT id FROM {table} WHERE name = ?", (name,)).fetchone()[0]

    def _insert_triple(self, subj: str, rel: str, obj: str, chunk_id: int, extractor: str) -> int:
        subj, rel, obj = (" ".join(x.split()) for x in (subj, rel, obj))
        if not (subj and rel and obj) or subj == obj:
            return 0
        cur = self.db.execute("INSERT OR IGNORE INTO triples (subject, relation, object, chunk_id, extractor) "
                              "VALUES (?, ?, ?, ?, ?)", (self._id("entities", subj), self._id("relations", rel),
                                                         self._id("entities", obj), chunk_id, extractor))
        return cur.rowcount

    def _delete(self, path: str) -> None:
        row = self.db.execute("SELECT id FROM documents WHERE path = ?", (path,)).fetchone()
        if row is None:
            return
        self.db.execute("DELETE FROM triples WHERE chunk_id IN (SELECT id FROM chunks WHERE doc_id = ?)", (row[0],))
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
        self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))

    # ---- reading -----------------------------------------------------------------------------------------------

    def link(self, question: str) -> list[str]:
        """Entity linking: the graph's node names that occur in the question as whole words (case-insensitive),
        longest first, a name inside a longer match left out; a dotted name also matches by its last part when
        that part is unique ("HTTPError" -> "urllib.error.HTTPError")."""
        if self._names is None:
            rows = self.db.execute("SELECT DISTINCT e.name, e.id FROM entities e JOIN triples t ON e.id = t.subject "
                                   "OR e.id = t.object").fetchall()
            short: dict[str, list] = {}
            for name, eid in rows:
                if "." in name:
                    short.setdefault(name.rpartition(".")[2], []).append((name, eid))
            full = {n for n, _ in rows}
            self._names = rows + [(s, v[0][1]) for s, v in short.items() if len(v) == 1 and s not in full]
            self._names.sort(key=lambda r: -len(r[0]))
        low, taken, found = question.lower(), [], []
        for name, eid in self._names:
            if len(name) < 3:
                continue
            for m in re.finditer(r"(?<![\w.])" + re.escape(name.lower()) + r"(?![\w])", low):
                if not any(s <= m.start() < e for s, e in taken):
                    taken.append((m.start(), m.end()))
                    canonical = self.db.execute("SELECT name FROM entities WHERE id = ?", (eid,)).fetchone()[0]
                    if canonical not in found:
                        found.append(canonical)
        return found

    def neighbourhood(self, seeds: list[str], hops: int = 3, max_triples: int = 12, back_cost: float = 2.0,
                      max_fanout: int = 10) -> list[Triple]:
        """The triples within path cost ``hops`` of the seed entities (forward edge 1, backward ``back_cost``;
        backward edges only from nodes with at most ``max_fanout`` of them), cheapest first, at most
        ``max_triples``."""
        if hops < 1 or max_triples < 1:
            raise LlmlabError(f"--hops {hops} --max-triples {max_triples}: give at least 1 of each")
        ids = [r[0] for s in seeds for r in self.db.execute("SELECT id FROM entities WHERE name = ?", (s,))]
        best: dict[int, float] = {}
        found: dict[int, tuple[float, int]] = {}  # triple id -> (cost, backward edges on the path)
        heap = [(0.0, 0, e) for e in ids]
        while heap:
            cost, back, node = heapq.heappop(heap)
            if best.get(node, float("inf")) <= cost:
                continue
            best[node] = cost
            edges = [(tid, obj, 1.0, 0) for tid, obj in
                     self.db.execute("SELECT id, object FROM triples WHERE subject = ?", (node,))]
            incoming = self.db.execute("SELECT id, subject FROM triples WHERE object = ?", (node,)).fetchall()
            if len(incoming) <= max_fanout:
                edges += [(tid, subj, back_cost, 1) for tid, subj in incoming]
            for tid, other, step, is_back in edges:
                c = cost + step
                if c <= hops and (tid not in found or found[tid] > (c, back + is_back)):
                    found[tid] = (c, back + is_back)
                    heapq.heappush(heap, (c, back + is_back, other))
        order = sorted(found, key=lambda t: (*found[t], t))[:max_triples]
        return [self.triple(t, found[t][0]) for t in order]

    def triple(self, tid: int, cost: float = 0.0) -> Triple:
        s, r, o, cid, path = self.db.execute(
            "SELECT s.name, r.name, o.name, t.chunk_id, d.path FROM triples t JOIN entities s ON s.id = t.subject "
            "JOIN relations r ON r.id = t.relation JOIN entities o ON o.id = t.object JOIN chunks c ON "
            "c.id = t.chunk_id JOIN documents d ON d.id = c.doc_id WHERE t.id = ?", (tid,)).fetchone()
        return Triple(tid, s, r, o, path, cid, cost)


def kg_sources(triples: list[Triple], first: int = 1) -> list[Source]:
    """Triples -> numbered sources for ``infer/rag.py``'s grounded prompt, one context line each."""
    return [Source(first + i, t.path, t.sentence(), -t.cost) for i, t in enumerate(triples)]


def build_graph(folder: str | Path, sources: list[str], extract: Callable, extractor: str) -> dict:
    """A new graph at ``folder`` from the documents of ``sources`` (files or folders, read as ``llmlab index``
    reads them)."""
    docs, _ = collect_files(sources, {})
    if not docs:
        raise LlmlabError(f"{', '.join(sources)}: no documents with text")
    with GraphStore.create(folder) as store:
        summary = store.add([(p, t) for p, t, _ in docs], extract, extractor)
        return {**summary, **store.info()}


def rules_extract(texts: list[str]) -> list[list[tuple[str, str, str]]]:
    return [rule_triples(t) for t in texts]
