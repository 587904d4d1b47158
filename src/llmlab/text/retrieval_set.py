"""The built-in retrieval set: questions about the Python standard library, answered by its own documentation.

A *pair* comes from one docstring (read by ``text.tasks.clean_docstrings`` in a fresh standard-library-only
interpreter, so it does not depend on what this process imported): the query is its first sentence ("Return
the number of items in the deque."), the relevant document is the rest of it. Pairs whose rest has fewer than
``MIN_DOC_WORDS`` words, whose query has fewer than ``MIN_QUERY_WORDS`` words, or whose query, document or
name occurs twice (an alias, an overload: which one is "relevant" would be a guess) are dropped.

The split is fixed by the CRC-32 of the qualified name (``text.tasks.is_held_out``: 0 mod 5 is test), so it does
not depend on the order Python lists attributes in. The test *corpus* is the test pairs' documents plus
distractors: the paragraphs of the Python help topics (``pydoc_data.topics``, what ``help("FOR")`` prints) of at
least ``MIN_DOC_WORDS`` words, each once; no query is about them, so they only compete. Training uses the train
pairs alone. Counts depend on the Python version (the README states them).
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

from llmlab.text.tasks import clean_docstrings, is_held_out

# modules that import on every CPython build (no tkinter, curses: optional); the public API of each
MODULES = ("abc", "argparse", "array", "ast", "asyncio", "asyncio.streams", "base64", "bdb", "binascii", "bisect",
           "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections", "compileall",
           "concurrent.futures", "configparser", "contextlib", "copy", "cProfile", "csv", "ctypes", "dataclasses",
           "datetime", "decimal", "difflib", "dis", "doctest", "email.headerregistry", "email.message",
           "email.parser", "email.policy", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib",
           "functools", "gc", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
           "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "inspect", "io",
           "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math",
           "mimetypes", "mmap", "modulefinder", "multiprocessing", "multiprocessing.pool", "numbers", "operator",
           "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
           "profile", "pstats", "py_compile", "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy",
           "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
           "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "symtable",
           "sys", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
           "traceback", "tracemalloc", "types", "typing", "unittest", "unittest.mock", "urllib.parse",
           "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "webbrowser",
           "wsgiref.simple_server", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xmlrpc.client",
           "xmlrpc.server", "zipfile", "zipimport", "zlib", "zoneinfo")
MIN_QUERY_WORDS = 4
MIN_DOC_WORDS = 8
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


@dataclass
class RetrievalSet:
    """Queries and a corpus, keyed by id, and each query's relevant document ids (BEIR's qrels, binary)."""
    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]


@dataclass
class Pair:
    key: str  # the qualified name: the split key, and the document's id
    query: str
    document: str


def split_first_sentence(doc: str) -> tuple[str, str]:
    """(first sentence of the first paragraph, the rest of the text); the rest is '' when there is none."""
    para, _, after = doc.partition("\n\n")
    parts = _SENTENCE_END.split(para.strip(), maxsplit=1)
    first = " ".join(parts[0].split())
    rest = (parts[1] if len(parts) > 1 else "") + ("\n\n" + after if after else "")
    return first, rest.strip()


def docstring_pairs(modules: tuple[str, ...] = MODULES) -> list[Pair]:
    """Every usable (query, document) pair of ``modules``, in the order ``clean_docstrings`` lists them."""
    return pairs_of_docstrings(clean_docstrings(tuple(modules)))


def pairs_of_docstrings(rows) -> list[Pair]:
    """(module, qualified name, docstring) rows -> their usable pairs, in order (the filters of the module
    docstring)."""
    pairs = []
    for _, qualname, doc in rows:
        query, rest = split_first_sentence(doc)
        if len(query.split()) >= MIN_QUERY_WORDS and len(rest.split()) >= MIN_DOC_WORDS:
            pairs.append(Pair(qualname, query, rest))
    seen_q, seen_d, seen_k = {}, {}, {}
    for p in pairs:
        for seen, value in ((seen_q, p.query), (seen_d, p.document), (seen_k, p.key)):
            seen[value] = seen.get(value, 0) + 1
    return [p for p in pairs if seen_q[p.query] == seen_d[p.document] == seen_k[p.key] == 1]


def help_topic_paragraphs() -> list[str]:
    """The paragraphs of the Python help topics with at least ``MIN_DOC_WORDS`` words, each once, in topic order."""
    from pydoc_data.topics import topics  # data only: nothing that other imports can patch

    found: dict[str, None] = {}
    for name in sorted(topics):
        for para in re.split(r"\n[ \t]*\n", topics[name]):
            para = para.strip()
            if len(para.split()) >= MIN_DOC_WORDS:
                found.setdefault(para)
    return list(found)


@functools.lru_cache(maxsize=2)
def builtin_split(modules: tuple[str, ...] = MODULES) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, test pairs) of the built-in set."""
    pairs = docstring_pairs(modules)
    return [p for p in pairs if not is_held_out(p.key)], [p for p in pairs if is_held_out(p.key)]


def pairs_to_set(pairs: list[Pair], distractors: list[str] = ()) -> RetrievalSet:
    """Queries ``q:<key>`` with the one relevant document ``<key>``, plus distractor documents ``help:<n>``."""
    corpus = {p.key: p.document for p in pairs}
    known = set(corpus.values())
    corpus.update({f"help:{i}": text for i, text in enumerate(distractors) if text not in known})
    return RetrievalSet({f"q:{p.key}": p.query for p in pairs}, corpus, {f"q:{p.key}": {p.key} for p in pairs})


def is_dev(key: str) -> bool:
    """A tenth of the train split (CRC-32 of the name 1 mod 10; the test split is 0 mod 5) is the dev split: the
    validation loss of ``llmlab embed train`` and the retrieval set to tune recipes on, so the test set is scored
    once. Training leaves it out."""
    return zlib.crc32(key.encode()) % 10 == 1


def builtin_test_set() -> RetrievalSet:
    """The built-in evaluation set: the test queries against their documents and the help-topic distractors."""
    return pairs_to_set(builtin_split()[1], help_topic_paragraphs())


def builtin_dev_set() -> RetrievalSet:
    """The dev queries (``is_dev``) against their documents and the same help-topic distractors."""
    return pairs_to_set([p for p in builtin_split()[0] if is_dev(p.key)], help_topic_paragraphs())


SPLITS = {"test": builtin_test_set, "dev": builtin_dev_set}
