"""``--extra-pairs``: more training pairs from the standard library (and torch) with every possible dev / test
leak dropped. The leak rules against hand-made pairs (each planted leak caught by the rule meant for it), the rules
on a small real module subset (no extra text is a dev or test text), determinism across processes, the module
listing, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.text.extra_pairs import (
    RULES,
    SKIP,
    extra_modules,
    extra_train_pairs,
    filter_leaks,
    source_modules,
    stdlib_modules,
    without_signature,
)
from llmlab.text.retrieval_set import MODULES, Pair, builtin_split, is_dev

SRC = Path(__file__).resolve().parents[1] / "src"
# a small built-in set and the submodules it does not read (a subprocess each: about a second in all)
BASE = ("asyncio", "email.message", "json", "logging", "concurrent.futures")
EXTRA = ("asyncio", "asyncio.events", "asyncio.queues", "concurrent.futures.process", "concurrent.futures.thread",
         "email.charset", "email.generator", "email.header", "email.mime.multipart", "email.mime.text", "json.decoder",
         "json.encoder", "json.scanner", "logging.config", "logging.handlers")
DOC = "the rest of a docstring, long enough to be a document of the set"


def _p(key: str, query: str, document: str) -> Pair:
    return Pair(key, query, document)


def test_each_planted_leak_is_dropped_by_its_rule():
    held = [_p("m.alpha", "Return the alpha value now.", "Alpha " + DOC),
            _p("m.Box.put", "Put an item into the box.", "Box " + DOC)]
    train = [_p("m.gamma", "Return the gamma value now.", "Gamma " + DOC)]
    help_para = "A help topic paragraph that only competes as a distractor in the corpus."
    extra = [
        _p("x.one", "  return THE alpha\nvalue now. ", "fresh " + DOC),  # a held-out query, case and spaces apart
        _p("x.two", "A new query of four words.", "Box  the rest of a docstring, long enough to be a document of "
                                                  "the set"),  # a held-out document, spaces apart
        _p("x.three", "Another query with words.", help_para.upper()),  # a help-topic paragraph
        _p("x.four", "Yet another fresh query.", "Alpha " + DOC + " and one more sentence after it."),  # contains
        _p("x.five", "Some further fresh query.", DOC[4:]),  # contained in a held-out document
        _p("x.sub.Box.put", "Add an item to a box.", "Other words entirely for a box of things here."),  # re-export
        _p("x.six", "Return the gamma value now.", "Unrelated words enough to count as a document."),  # in train
        _p("x.seven", "A clean query for training.", "Words that no held-out text has, so the pair is kept."),
    ]
    modules = {"m.alpha": "m", "m.Box.put": "m", **{p.key: p.key.rsplit(".", 1)[0] for p in extra}}
    modules["x.sub.Box.put"] = "x.sub"
    kept, dropped = filter_leaks(extra, modules, held, modules, train, [help_para])
    assert [p.key for p in kept] == ["x.seven"]
    assert dict(dropped) == {"same_text": 3, "contained": 2, "same_name": 1, "in_train": 1}
    assert tuple(dropped) == RULES


def test_without_signature():
    assert without_signature("add(input, other, *, alpha=1) -> Tensor\n\nAdds other to input.") == \
        "Adds other to input."
    assert without_signature("linalg.svdvals(A, *,\n driver=None) -> Tensor\n\nComputes it.") == "Computes it."
    assert without_signature("Return x. More.\n\nEven more.") == "Return x. More.\n\nEven more."
    assert without_signature("f(x)") == "f(x)"  # nothing after it: left as it is (then too short to be a pair)


def _norm(t: str) -> str:
    return " ".join(t.split()).casefold()


def test_real_subset_has_no_dev_or_test_text_and_is_the_same_in_a_fresh_process():
    kept, dropped = extra_train_pairs(EXTRA, BASE)
    assert len(kept) >= 40 and dropped["read"] == len(kept) + sum(dropped[r] for r in RULES)
    assert dropped["same_text"] + dropped["same_name"] > 0  # the submodules re-export the packages' names
    assert not any(p.key.startswith("asyncio.") and p.key.count(".") == 1 for p in kept)  # "asyncio" is in BASE
    train, test = builtin_split(BASE)
    held = test + [p for p in train if is_dev(p.key)]
    held_texts = {_norm(t) for p in held for t in (p.query, p.document)}
    for p in kept:
        q, d = _norm(p.query), _norm(p.document)
        assert q not in held_texts and d not in held_texts, p.key
        assert not any(d in t or t in d for t in held_texts if len(t.split()) >= 8), p.key
    code = ("import sys, json, hashlib; sys.path.insert(0, sys.argv[1]); "
            "from llmlab.text.extra_pairs import extra_train_pairs; "
            f"kept, dropped = extra_train_pairs({EXTRA!r}, {BASE!r}); "
            "print(hashlib.sha256(json.dumps([[p.key, p.query, p.document] for p in kept] + [dropped]).encode())"
            ".hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code, str(SRC)], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    here = hashlib.sha256(json.dumps([[p.key, p.query, p.document] for p in kept] + [dropped]).encode()).hexdigest()
    assert fresh.stdout.strip() == here


def test_none_starts_no_probe():
    """--extra-pairs none, every embed run's default, lists no modules (no interpreter is started)."""
    stdlib_modules.cache_clear()
    assert source_modules("none") == () and stdlib_modules.cache_info().misses == 0


def test_module_listing():
    names = stdlib_modules()
    assert names == tuple(sorted(names)) and {"json.decoder", "email.mime.text", "asyncio.events"} <= set(names)
    assert not any(part.startswith("_") or part in SKIP for n in names for part in n.split("."))
    extra = extra_modules()
    assert not set(extra) & set(MODULES) and len(extra) > 200
    assert source_modules("none") == () and set(source_modules("stdlib")) < set(source_modules("stdlib+torch"))
    with pytest.raises(LlmlabError, match="--extra-pairs must be one of none, stdlib, stdlib\\+torch"):
        source_modules("torch")


def test_bad_extra_pairs_flag_exits_2(tmp_path, tiny_encoder, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"query": "a question", "document": "an answer"}) + "\n")
    assert main(["embed", "train", "--model", tiny_encoder, "--pairs", str(pairs), "--extra-pairs", "stdlib",
                 "--eval-dims", "32", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--extra-pairs adds to the built-in train split, not to a --pairs file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it, as the command line does
        main(["embed", "train", "--extra-pairs", "torch", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--extra-pairs: invalid choice: 'torch'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
