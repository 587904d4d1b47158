"""Built-in text from the Python standard library: a topic-classification task and a language-model corpus.

Every machine with Python has these docstrings, so the first ``llmlab text ...`` command needs no download.
An *example* is one docstring: of a module, of a public class or function, or of a method a class defines
itself (not inherited). Its *label* is the top-level module it belongs to ("which module does this docstring
come from?"). Texts that occur under two labels are dropped, repeats under one label kept once. The split is
fixed: an example is held out when the CRC-32 of ``module:qualified name`` is 0 mod 5, so it does not depend on
the order Python lists attributes in. The counts depend on the Python version (the README states it).

The docstrings are read in a fresh interpreter (``python -I``: standard library only), because libraries patch the
standard library when they are imported -- torch replaces ``inspect.getfile``, transformers adds
``logging.Logger.warning_once`` -- and the corpus must not depend on what this process imported before.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import subprocess
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

TASK_MODULES = ("argparse", "asyncio", "collections", "datetime", "decimal", "email.message", "http.client",
                "inspect", "logging", "pathlib", "socket", "sqlite3", "subprocess", "tarfile", "threading", "typing",
                "unittest", "urllib.request", "zipfile")
MIN_WORDS = 4
# attributes a module imports on first access (a module-level __getattr__): whether vars() holds them depends on
# what ran before in the process, so they are left out and the corpus is the same in every process
LAZY = {("unittest", "IsolatedAsyncioTestCase")}


@dataclass
class TextTask:
    """Documents and their integer labels (indices into ``labels``), as a fixed train / test split."""
    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def _own_doc(obj) -> str | None:
    with warnings.catch_warnings():  # typing.io and typing.re warn when any attribute is read
        warnings.simplefilter("ignore", DeprecationWarning)
        doc = getattr(obj, "__doc__", None)
    doc = doc if isinstance(doc, str) else None
    return inspect.cleandoc(doc) if doc else None


def module_docstrings(name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of module ``name``, its public classes and functions, and the methods its
    classes define themselves; in sorted attribute order."""
    mod = importlib.import_module(name)
    top = name.split(".")[0]
    found = [(name, _own_doc(mod))]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)) or (name, attr) in LAZY:
            continue
        if (getattr(obj, "__module__", None) or "").split(".")[0] != top:
            continue  # re-exported from another module
        found.append((f"{name}.{attr}", _own_doc(obj)))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                member = vars(obj)[meth]
                if not meth.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    found.append((f"{name}.{attr}.{meth}", _own_doc(member)))
    return [(q, d) for q, d in found if d and len(d.split()) >= MIN_WORDS]


def is_held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0


# the child imports this file alone (not the llmlab package, whose common module imports torch)
_CHILD = ("import json, sys, runpy; module_docstrings = runpy.run_path(sys.argv[1])['module_docstrings']; "
          "print(json.dumps([[n, q, d] for n in sys.argv[2:] for q, d in module_docstrings(n)]))")


@functools.lru_cache(maxsize=8)
def clean_docstrings(modules: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """(module, qualified name, docstring) rows of ``modules``, read in a fresh standard-library-only interpreter."""
    r = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(Path(__file__).resolve()), *modules],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        from llmlab.common import LlmlabError  # not at the top: the child must import nothing but the stdlib

        raise LlmlabError(f"could not read the docstrings of {', '.join(modules)}: "
                          f"{(r.stderr.strip().splitlines() or ['?'])[-1]}; pass module names Python can import")
    return tuple(tuple(row) for row in json.loads(r.stdout))


def docstring_task(modules: tuple[str, ...] = TASK_MODULES) -> TextTask:
    """Which standard-library module does a docstring come from? Labels are ``modules`` in the given order."""
    owners: dict[str, set[str]] = {}
    rows = clean_docstrings(tuple(modules))
    for name, _, doc in rows:
        owners.setdefault(doc, set()).add(name)
    task = TextTask(list(modules), [], [], [], [])
    seen = set()
    for name, qualname, doc in rows:
        if len(owners[doc]) > 1 or doc in seen:
            continue  # ambiguous label, or the same text again (an alias)
        seen.add(doc)
        texts, labels = ((task.test_texts, task.test_labels) if is_held_out(qualname)
                         else (task.train_texts, task.train_labels))
        texts.append(doc)
        labels.append(modules.index(name))
    return task


def lm_corpus() -> tuple[str, str]:
    """(training text, held-out text) for the n-gram language model: the task's train and test documents."""
    task = docstring_task()
    return "\n\n".join(task.train_texts), "\n\n".join(task.test_texts)


def read_documents(paths: list[str]) -> list[str]:
    """Documents from files: a ``.jsonl`` file gives each line's ``text``; any other file is UTF-8 text cut
    into documents at blank lines."""
    import re

    from llmlab.common import LlmlabError, jsonl_texts, read_text_file

    docs: list[str] = []
    for name in paths:
        raw = read_text_file(name, name, "UTF-8 text or JSONL files")
        if Path(name).suffix != ".jsonl":
            docs.extend(d.strip() for d in re.split(r"\n[ \t]*\n", raw) if d.strip())
            continue
        docs.extend(jsonl_texts(raw, name))
    if not any(d.strip() for d in docs):
        raise LlmlabError(f"{', '.join(paths)}: the corpus is empty (no text found)")
    return docs
