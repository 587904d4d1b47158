"""More training pairs of the built-in set's kind: the standard-library modules the set does not use, and torch.

The built-in retrieval set (``text/retrieval_set.py``) reads the docstrings of the 150 modules in ``MODULES``;
its 1,060 training pairs are few for moving an encoder's information into its first coordinates (Matryoshka
training: Kusupati et al. 2022, arXiv:2205.13147, ``train/contrastive.py``). Every other module of the standard
library -- submodules such as ``asyncio.events``, ``email.mime.text`` or ``json.decoder``, and top-level modules
such as ``graphlib`` or ``netrc`` -- gives more (first sentence, rest) pairs, made by the same
``pairs_of_docstrings`` with the same filters. ``stdlib+torch`` adds the docstrings of ``TORCH_MODULES`` (torch
is a dependency of llmlab, so always installed): the same kind of text about another library; a first paragraph
that is only a call signature (``add(input, other, *, alpha=1) -> Tensor``, as torch's C functions document
themselves) is dropped first, so the query is the first sentence of the prose. Extra pairs only ever *train*: the
split of the built-in set (test = CRC-32 of the name 0 mod 5, dev = 1 mod 10) is unchanged, and an extra pair is
dropped when its text could leak a dev or test answer into training. With ``n(.)`` = whitespace collapsed and
case folded, an extra pair (name k, query q, document d) is dropped, counted under the first rule that applies,
when

    same_text:  n(q) or n(d) is in H = {n(t) : t a dev or test query or document, or a help-topic paragraph}
    contained:  n(d) contains, or is contained in, some t in H with at least ``MIN_DOC_WORDS`` words
    same_name:  the name after the module (``get_event_loop``, ``Queue.put``) is a dev or test pair's: a
                re-export (``asyncio.events.get_event_loop`` is ``asyncio.get_event_loop``) or its twin
    in_train:   n(q) or n(d) is a built-in train pair's (a repeat adds nothing)

Modules are listed, and probed by importing them, in a fresh standard-library-only interpreter (``python -I``,
like ``text.tasks.clean_docstrings``): a module that fails to import, or that prints when imported, is left out,
and so are ``SKIP`` (side effects: ``antigravity`` opens a browser, ``this`` prints, ``lib2to3`` writes grammar
caches; GUIs; the test suites) and every private (``_``-prefixed) name. The counts depend on the Python (and
torch) version.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections import Counter

from llmlab.common import LlmlabError
from llmlab.text.retrieval_set import (
    MIN_DOC_WORDS,
    MODULES,
    Pair,
    builtin_split,
    help_topic_paragraphs,
    is_dev,
    pairs_of_docstrings,
)
from llmlab.text.tasks import clean_docstrings

SOURCES = ("none", "stdlib", "stdlib+torch")
TORCH_MODULES = ("torch", "torch.amp", "torch.autograd", "torch.backends", "torch.cpu", "torch.distributed",
                 "torch.distributions", "torch.export", "torch.fft", "torch.func", "torch.fx", "torch.hub", "torch.jit",
                 "torch.library", "torch.linalg", "torch.masked", "torch.nested", "torch.nn", "torch.nn.functional",
                 "torch.nn.init", "torch.nn.utils", "torch.onnx", "torch.optim", "torch.optim.lr_scheduler",
                 "torch.overrides", "torch.profiler", "torch.random", "torch.serialization", "torch.sparse",
                 "torch.special", "torch.testing", "torch.utils.checkpoint", "torch.utils.data")
_SIGNATURE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?", re.S)
SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "lib2to3", "ensurepip",
        "venv", "pydoc_data", "__main__", "__hello__", "__phello__")
RULES = ("same_text", "contained", "same_name", "in_train")

# lists the importable public standard-library modules and their submodules, sorted; nothing but the stdlib
_PROBE = r"""
import contextlib, importlib, io, pkgutil, sys, warnings
warnings.simplefilter("ignore")
skip = set(sys.argv[1].split(","))
found = []
def visit(name):
    if any(part.startswith("_") or part in skip for part in name.split(".")):
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(name)
    except BaseException:
        return
    if printed.getvalue():
        return
    found.append(name)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", None) or []):
        visit(name + "." + info.name)
for top in sorted(sys.stdlib_module_names):
    visit(top)
print("\n".join(sorted(found)))
"""


@functools.lru_cache(maxsize=1)
def stdlib_modules() -> tuple[str, ...]:
    """Every importable public standard-library module and submodule, sorted (``SKIP`` and private ones left out)."""
    r = subprocess.run([sys.executable, "-I", "-c", _PROBE, ",".join(SKIP)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise LlmlabError(f"could not list the standard-library modules: "
                          f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return tuple(r.stdout.split())


def extra_modules() -> tuple[str, ...]:
    """The standard-library modules the built-in set does not read."""
    return tuple(m for m in stdlib_modules() if m not in MODULES)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _tail(key: str, module: str) -> str:
    """The name after the module: ``asyncio.events.Queue.put`` in ``asyncio.events`` -> ``Queue.put``; a module's
    own docstring -> its last component."""
    return key[len(module) + 1:] if key != module else module.rsplit(".", 1)[-1]


def filter_leaks(extra: list[Pair], extra_modules_of: dict[str, str], held_out: list[Pair], held_out_modules_of:
                 dict[str, str], train: list[Pair], distractors: list[str]) -> tuple[list[Pair], Counter]:
    """(the extra pairs that pass every rule of the module docstring, in order; how many each rule dropped)."""
    held = {_norm(t) for p in held_out for t in (p.query, p.document)} | {_norm(t) for t in distractors}
    long_held = sorted(t for t in held if len(t.split()) >= MIN_DOC_WORDS)
    joined = "\0".join(long_held)  # one substring search per extra document, not one per (extra, held) pair
    held_names = {_tail(p.key, held_out_modules_of[p.key]) for p in held_out}
    trained = {_norm(t) for p in train for t in (p.query, p.document)}
    kept, dropped = [], Counter({rule: 0 for rule in RULES})
    docs = [_norm(p.document) for p in extra]
    joined_docs = "\0".join(docs)
    inside_extra = {t for t in long_held if t in joined_docs}  # held-out texts that occur inside some extra doc
    for p, d in zip(extra, docs):
        q = _norm(p.query)
        if q in held or d in held:
            dropped["same_text"] += 1
        elif d in joined or any(t in d for t in inside_extra):
            dropped["contained"] += 1
        elif _tail(p.key, extra_modules_of[p.key]) in held_names:
            dropped["same_name"] += 1
        elif q in trained or d in trained:
            dropped["in_train"] += 1
        else:
            kept.append(p)
    return kept, dropped


def _modules_of(modules: tuple[str, ...]) -> dict[str, str]:
    return {key: module for module, key, _ in clean_docstrings(modules)}


def without_signature(doc: str) -> str:
    """A docstring without a first paragraph that is only a call signature; others unchanged."""
    first, _, rest = doc.partition("\n\n")
    return rest.strip() if rest and _SIGNATURE.fullmatch(first.strip()) else doc


def source_modules(source: str) -> tuple[str, ...]:
    """The modules an ``--extra-pairs`` source reads: none, ``extra_modules()``, or those and ``TORCH_MODULES``."""
    if source not in SOURCES:
        raise LlmlabError(f"--extra-pairs must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "none":  # no probe subprocess: --extra-pairs none is every embed run's default
        return ()
    return extra_modules() + (TORCH_MODULES if source == "stdlib+torch" else ())


@functools.lru_cache(maxsize=4)
def extra_train_pairs(modules: tuple[str, ...], base: tuple[str, ...] = MODULES) -> tuple[list[Pair], dict[str, int]]:
    """(extra training pairs from ``modules`` (those not in ``base``), in ``pairs_of_docstrings`` order, with every
    pair that could leak a dev or test answer of the built-in set over ``base`` dropped; {rule: pairs dropped},
    plus ``read``: the usable pairs before the rules)."""
    modules = tuple(m for m in modules if m not in base)
    if not modules:
        return [], {"read": 0, **{rule: 0 for rule in RULES}}
    extra = pairs_of_docstrings((m, k, without_signature(d)) for m, k, d in clean_docstrings(modules))
    train, test = builtin_split(base)
    held_out = test + [p for p in train if is_dev(p.key)]
    kept, dropped = filter_leaks(extra, _modules_of(modules), held_out, _modules_of(base),
                                 [p for p in train if not is_dev(p.key)], help_topic_paragraphs())
    return kept, {"read": len(extra), **dropped}

