"""Knowledge-graph retrieval: the triple-list JSON constraint (infer/json_constraint.py) against a brute-force
search on a tiny vocabulary and the jsonschema library, and on SmolLM2's real vocabulary; rule extraction; the
SQLite graph store and its neighbourhood search on hand-built graphs; the built-in multi-hop questions
(eval/kg_eval.py); `llmlab kg` end to end, its README lines and its bad input."""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.eval.kg_eval import builtin_questions, evaluate, kg_recall, mentions
from llmlab.infer.generate import generate
from llmlab.infer.index import IndexConfig, VectorStore, add_files, open_encoder
from llmlab.infer.json_constraint import (
    TRIPLES_SCHEMA,
    TokenConstraint,
    TripleGrammar,
    parse_triples,
    triples_schema,
    validate_triples,
)
from llmlab.infer.kg import (
    SUBCLASS,
    GraphStore,
    build_graph,
    builtin_documents,
    kg_sources,
    model_triples,
    rule_triples,
    rules_extract,
)
from llmlab.infer.rag import Source

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parent.parent


# ---- the constraint --------------------------------------------------------------------------------------------

def accepted(data: bytes, keys: tuple[str, ...], max_items: int) -> bool:
    """The reference language, independent of the automaton: parses, validates against the schema (jsonschema),
    and is json.dumps's own layout."""
    if not (data.startswith(b"[") and data.endswith(b"]")):
        return False
    try:
        text = data.decode("utf-8")
        obj = json.loads(text)
        jsonschema.validate(obj, triples_schema(keys, max_items))
    except (UnicodeDecodeError, ValueError, jsonschema.ValidationError):
        return False
    return json.dumps(obj) == text


# Every byte the language uses as a token of its own (as byte-level BPE has), and longer pieces that finish fast.
TINY = [b"[", b"]", b'{"s": "', b"a", b'"}', b", ", b'a"}]', b'a"}, {"s": "', b"\xc3\xa9", b'"', b"{", b"}", b":",
        b",", b" ", b"s"]


@pytest.mark.parametrize("max_items", [1, 2])
def test_constraint_against_brute_force_on_a_tiny_vocabulary(max_items):
    """Every sequence of up to 4 tokens of a 16-token vocabulary (plus a stop id) is enumerated and judged by
    ``accepted``. With ``left`` tokens to go, the constraint allows only tokens that some accepted sequence within
    the budget continues the prefix with (sound: its budget rule counts one byte per token, so it may allow fewer,
    never more), at least one while the budget covers the bytes still needed, every such token when the budget is
    not tight (complete), and the stop id exactly on an accepted prefix."""
    keys, depth, stop, far = ("s",), 4, len(TINY), 99
    need: dict[tuple, int] = {}  # (prefix, next token) -> shortest accepted sequence length through it
    accepted_seqs = set()
    for n in range(1, depth + 1):
        for seq in itertools.product(range(len(TINY)), repeat=n):
            if accepted(b"".join(TINY[t] for t in seq), keys, max_items):
                accepted_seqs.add(seq)
                for i in range(n):
                    need[seq[:i], seq[i]] = min(need.get((seq[:i], seq[i]), far), n)
    assert ((0, 1) in accepted_seqs and ((0, 2, 7, 6) in accepted_seqs) == (max_items == 2))  # "[]", 2 triples
    constraint = TokenConstraint(TripleGrammar(keys, max_items), [*TINY, b""], {stop})
    checked, todo = 0, [()]
    while todo:
        prefix = todo.pop()
        for left in [*range(1, depth - len(prefix) + 1), far]:
            allowed = set(torch.nonzero(constraint.allowed(0, list(prefix), left))[:, 0].tolist())
            possible = {t for t in range(len(TINY)) if (prefix, t) in need and need[prefix, t] <= len(prefix) + left}
            assert (stop in allowed) == (prefix in accepted_seqs), prefix
            if left < far:
                assert allowed - {stop} <= possible, (prefix, left)
                live = left >= constraint.grammar.dist(constraint.state_of(0, list(prefix)))  # what decoding keeps
                assert allowed or not live, (prefix, left)
            else:
                assert possible <= allowed, prefix
            checked += 1
        todo += [prefix + (t,) for t in range(len(TINY)) if need.get((prefix, t), far) <= depth]
    assert checked > 30
    one_triple = [0, 2, 3, 4]  # [{"s": "a"}  : a comma (a second triple) only when max_items allows it
    allowed = constraint.allowed(1, one_triple, far)
    assert bool(allowed[5]) == bool(allowed[13]) == (max_items == 2) and bool(allowed[1])
    assert accepted(b'[{"s": "a"}, {"s": "a"}]', keys, max_items) == (max_items == 2)


def test_states_that_differ_only_in_the_item_count_share_masks():
    """The mask cache keys triples 1 .. max_items - 2 (for this vocabulary) as one; each equals its own walk."""
    grammar = TripleGrammar(("s",), max_items=5)
    shared, exact = TokenConstraint(grammar, TINY, set()), TokenConstraint(grammar, TINY, set())
    exact._same_up_to = 0
    assert shared._same_up_to == 3
    for item in range(1, 6):
        for piece, text in enumerate(grammar.pieces):
            for off in range(len(text) if text else 2):
                state = (item, piece, off)
                assert torch.equal(shared.dist_after(state), exact.dist_after(state)), state
        for piece in (grammar.SEP, grammar.COMMA, grammar.NEXT):
            assert torch.equal(shared.dist_after((item, piece, 0)), exact.dist_after((item, piece, 0)))


def test_validator_agrees_with_jsonschema_and_names_the_problem():
    cases = [[], [{"subject": "a", "relation": "b", "object": "c"}], [{"subject": "a", "relation": "b"}],
             [{"subject": "", "relation": "b", "object": "c"}], [{"subject": "a", "relation": "b", "object": 3}],
             [{"subject": "a", "relation": "b", "object": "c", "x": "y"}], {"subject": "a"}, "text",
             [{"subject": "a\"b", "relation": "b", "object": "c"}], [{"subject": "é", "relation": "b", "object": "c"}],
             [{"subject": "a", "relation": "b", "object": "c"}] * 9, [["a", "b", "c"]]]
    for obj in cases:
        ok = jsonschema.Draft202012Validator(TRIPLES_SCHEMA).is_valid(obj)
        try:
            validate_triples(obj)
            mine = True
        except ValueError:
            mine = False
        assert mine == ok, obj
    assert parse_triples('[{"subject": "a", "relation": "b", "object": "c"}]') == [("a", "b", "c")]
    for text, message in [("[{", "not JSON"), ("{}", "expected a JSON array"),
                          ('[{"subject": "a"}]', "exactly the keys"),
                          ('[{"subject": "", "relation": "b", "object": "c"}]', "subject must be a non-empty")]:
        with pytest.raises(ValueError, match=message):
            parse_triples(text)


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_path):
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(smollm_path))


def test_every_constrained_output_parses_on_the_real_vocabulary(smollm_tokenizer):
    """Random logits through the masks over SmolLM2's 49,152 tokens, budgets from the least (2) up: each output
    is complete JSON that validates, whatever the budget."""
    tok = smollm_tokenizer
    stop = {tok.eos_id}
    constraint = TokenConstraint.for_tokenizer(tok, stop, len(tok.id_to_token))
    g = torch.Generator().manual_seed(0)
    for budget in (2, 3, 17, 70):
        ids = []
        for step in range(budget):
            mask = constraint.allowed(budget, ids, budget - step)
            assert mask.any()
            scores = torch.rand(mask.shape, generator=g).masked_fill(~mask, -1.0)  # a random allowed token
            scores[sorted(stop)] *= 0.5  # end now and then, as soon as the JSON allows
            ids.append(int(scores.argmax()))
            if ids[-1] in stop:
                break
        text = tok.decode([t for t in ids if t not in stop])
        jsonschema.validate(json.loads(text), TRIPLES_SCHEMA)
        assert json.dumps(json.loads(text)) == text and parse_triples(text) is not None


def test_generate_with_a_constraint_matches_the_mask(smollm_tokenizer, tiny_chat):
    """generate(constraint=...) on a tiny random model: greedy under the mask is the argmax of masked logits."""
    from llmlab.api import load

    llm = load(str(tiny_chat))
    stop = llm.stop_ids()
    constraint = TokenConstraint.for_tokenizer(llm.tokenizer, stop, llm.config.vocab_size)
    prompt = llm.tokenizer.encode("Text: KeyError is a subclass of LookupError.\nTriples:")
    out = generate(llm.model, [prompt, prompt[:5]], 40, stop_ids=stop, tokenizer=llm.tokenizer,
                   constraint=constraint.allowed)
    for c in out:
        triples = parse_triples(c.text)
        assert isinstance(triples, list)
    plain = generate(llm.model, [prompt], 40, stop_ids=stop, tokenizer=llm.tokenizer)[0]
    assert plain.text != out[0].text  # the random model alone does not write JSON


# ---- extraction, the store, retrieval ----------------------------------------------------------------------

def test_rule_triples_from_a_class_line_prose_and_a_docstring():
    text = "class A.B(C, object) in module A\n\nBase class for  many\nerrors. Also X is a subclass of Y."
    assert rule_triples(text) == [("A.B", SUBCLASS, "C"), ("A.B", "is defined in module", "A"),
                                  ("X", SUBCLASS, "Y"), ("A.B", "is the base class for", "many errors")]
    assert rule_triples("no facts here") == []


def hand_graph(folder: Path, triples: list[tuple[str, str, str]]) -> GraphStore:
    """A graph whose documents are named after their triples' subjects, one triple per document."""
    store = GraphStore.create(folder)
    docs = [(f"/docs/{i}-{s}.txt", f"{s} {r} {o}") for i, (s, r, o) in enumerate(triples)]
    table = {t: [tr] for t, tr in zip((d[1] for d in docs), triples)}
    store.add(docs, lambda texts: [table[t] for t in texts], "hand")
    return store


def test_neighbourhood_on_a_hand_built_graph(tmp_path):
    chain = [("D", "sub", "C"), ("C", "sub", "B"), ("B", "sub", "A"), ("A", "sub", "Root")]
    hub = [(f"K{i}", "sub", "A") for i in range(11)]  # A: 12 incoming edges, a hub
    store = hand_graph(tmp_path / "g", chain + hub + [("E", "sub", "C"), ("F", "sub", "E")])
    with store:
        got = [(t.subject, t.object, t.cost) for t in store.neighbourhood(["D"], hops=3, max_triples=20)]
        # forward D->C (1), C->B (2), B->A (3); backward C<-E costs 1 + 2; nothing through the hub A backward
        assert got == [("D", "C", 1.0), ("C", "B", 2.0), ("B", "A", 3.0), ("E", "C", 3.0)]
        assert [t.subject for t in store.neighbourhood(["D"], hops=3, max_triples=2)] == ["D", "C"]
        wide = store.neighbourhood(["A"], hops=2, max_fanout=20, max_triples=50)
        assert {(t.subject, t.object) for t in wide} >= {("A", "Root"), ("K0", "A"), ("B", "A")}
        assert store.neighbourhood(["nobody"]) == []
        with pytest.raises(LlmlabError, match="--hops"):
            store.neighbourhood(["D"], hops=0)
        again = store.add([("/docs/0-D.txt", "D sub C")], lambda texts: [[("D", "sub", "C")]], "hand")
        assert again == {"documents": 0, "unchanged": 1, "triples": 0}
        assert store.info()["triples"] == len(chain) + len(hub) + 2
        sources = kg_sources(store.neighbourhood(["F"], hops=1))
        assert [(s.number, s.text, Path(s.path).name) for s in sources] == [(1, "F sub E.", "16-F.txt")]


def test_entity_linking_longest_match_and_dotted_names(tmp_path):
    store = hand_graph(tmp_path / "g", [("urllib.error.HTTPError", "sub", "urllib.error.URLError"),
                                        ("OSError", "sub", "Exception"), ("ConnectionError", "sub", "OSError"),
                                        ("x.Error", "sub", "Exception"), ("y.Error", "sub", "Exception")])
    with store:
        assert store.link("Is HTTPError an OSError?") == ["urllib.error.HTTPError", "OSError"]
        assert store.link("the base of urllib.error.URLError") == ["urllib.error.URLError"]
        assert store.link("ConnectionError vs OSErrors") == ["ConnectionError"]  # whole words only
        assert store.link("what is an Error?") == []  # "Error" is ambiguous: x.Error or y.Error
        assert store.link("nothing known") == []


def test_store_bad_input(tmp_path):
    with pytest.raises(LlmlabError, match="no graph.db"):
        GraphStore.open(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "graph.db").write_bytes(b"not a database" * 100)
    with pytest.raises(LlmlabError, match="corrupt or not a graph database"):
        GraphStore.open(tmp_path / "bad")
    GraphStore.create(tmp_path / "empty").close()
    with pytest.raises(LlmlabError, match="no triples"):
        GraphStore.open(tmp_path / "empty")
    with pytest.raises(LlmlabError, match="already a graph"):
        GraphStore.create(tmp_path / "empty")
    with pytest.raises(LlmlabError, match="no documents"):
        build_graph(tmp_path / "g2", [str(tmp_path / "bad")], rules_extract, "rules")


# ---- the built-in corpus and questions ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("kg")
    docs = builtin_documents(root / "docs")
    build_graph(root / "graph", [str(docs)], rules_extract, "rules")
    return root


def test_builtin_questions_are_fixed_and_grounded(builtin_graph):
    qs = builtin_questions()
    dev, test = builtin_questions("dev"), builtin_questions("test")
    assert len(test) >= 30 and len(dev) >= 30 and len(dev) + len(test) == len(qs)
    assert {q.id for q in dev}.isdisjoint(q.id for q in test)
    q = next(q for q in qs if q.id == "ZeroDivisionError/2")
    assert (q.question, q.answer, q.split) == ("What is the base class of the base class of ZeroDivisionError? "
                                               "Answer with the class name.", "Exception", "dev")
    assert q.path == [("ZeroDivisionError", "ArithmeticError"), ("ArithmeticError", "Exception")]
    text = (builtin_graph / "docs" / "ZeroDivisionError.txt").read_text()
    assert text.startswith("class ZeroDivisionError(ArithmeticError) in module builtins\n\n")
    with GraphStore.open(builtin_graph / "graph") as graph:  # every gold hop is a triple of the rule graph
        lines = {f"{a} {r} {b}." for a, r, b in (graph.db.execute(
            "SELECT s.name, r.name, o.name FROM triples t JOIN entities s ON s.id = t.subject JOIN relations r "
            "ON r.id = t.relation JOIN entities o ON o.id = t.object"))}
        assert all(kg_recall(q, [Source(1, "p", line, 0.0) for line in lines]) for q in qs)


def test_evaluate_recall_on_the_builtin_graph(builtin_graph):
    """KG retrieval finds both hops; a RAG stand-in that returns the question's own document finds only the
    first, so its recall is 0 on 2-hop questions; a chat stand-in that echoes the last context line."""
    qs = [q for q in builtin_questions("dev") if q.id.endswith("/2")][:6]
    def rag(question):  # noqa: E306
        name = question.split("base class of ")[-1].split("?")[0]
        return [Source(1, f"/docs/{name}.txt", f"class {name}", 1.0)]

    with GraphStore.open(builtin_graph / "graph") as graph:
        result = evaluate(qs, graph, rag, chat=lambda messages: messages[1]["content"])
    assert result["modes"]["kg"]["recall"] == 1.0 and result["modes"]["rag"]["recall"] == 0.0
    assert result["modes"]["both"]["recall"] == 1.0 and result["unlinked"] == 0
    assert result["modes"]["kg"]["accuracy"] == 1.0  # the echo contains every context line, the answer among them
    assert mentions("It is OSError.", "OSError") and not mentions("OSErrors", "OSError")


def test_model_extraction_with_the_real_smollm2_parses(smollm):
    """The one real-model test: SmolLM2 extracts triples from a class document under the constraint, with a
    budget too small for free text to close its JSON."""
    text = "class KeyError(LookupError) in module builtins\n\nMapping key not found."
    [triples] = model_triples(smollm, [text], max_new_tokens=30)
    assert isinstance(triples, list) and all(len(t) == 3 for t in triples)
    with pytest.raises(LlmlabError, match="at least 2"):
        model_triples(smollm, [text], max_new_tokens=1)


# ---- the command line --------------------------------------------------------------------------------------

def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "kg", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_encoder, builtin_graph):
    """A plain-RAG index of twelve built-in documents with the tiny encoder (the default index takes minutes)."""
    root = tmp_path_factory.mktemp("kgindex")
    (root / "docs").mkdir()
    for p in sorted((builtin_graph / "docs").iterdir())[:12]:
        shutil.copy(p, root / "docs" / p.name)
    config = IndexConfig(model=tiny_encoder, chunk_tokens=32, overlap=8)
    encoder = open_encoder(config)
    with VectorStore.create(root / "index", config, encoder.fingerprint) as store:
        add_files(store, encoder, [str(root / "docs")], {})
    return root / "index"


def test_readme_commands(small_index, tiny_chat, tmp_path, monkeypatch, capsys):
    """The README's kg lines as written, in a fresh folder (the graph is built there on first use), the small
    index standing in for the built-in one, the tiny random chat model and a 4-token budget appended where a
    chat model answers, eval limited to 3 questions. In-process (``main``): the same code path as the command
    without a Python start-up per line."""
    from llmlab.cli import main

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line.split(" #")[0] for line in readme.splitlines() if line.startswith("llmlab kg ")]
    assert len(lines) >= 4
    shutil.copytree(small_index, tmp_path / "data" / "kg-index")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.txt").write_text("class KeyError(LookupError) in module builtins\n")
    for line in lines:
        args = shlex.split(line)[2:]
        if args[0] in ("ask", "eval") and "--no-answer" not in args or "model" in args:
            args += ["--model", str(tiny_chat), "--max-new-tokens", "4"]
        if args[0] == "eval":
            args += ["--limit", "3"]  # the last --limit wins
        monkeypatch.chdir(tmp_path)
        assert main(["kg", *args]) == 0, line
        assert "index of" not in capsys.readouterr().err  # the default index was not rebuilt
    assert (tmp_path / "data" / "kg-graph" / "graph.db").exists()
    assert (tmp_path / "runs" / "graph" / "graph.db").exists()


def test_cli_end_to_end_and_bad_input(builtin_graph, small_index, tiny_chat, tmp_path, capsys):
    from llmlab.cli import main

    graph = str(builtin_graph / "graph")
    assert main(["kg", "query", "What is the base class of the base class of ZeroDivisionError?", "--graph", graph,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["linked"] == ["ZeroDivisionError"] and out["triples"][0]["object"] == "ArithmeticError"
    r = run_cli("ask", "Which class is the parent of the parent?", "--graph", graph, "--index", str(small_index),
                "--model", str(tiny_chat), "--max-new-tokens", "4", "--json")
    assert r.returncode == 0 and "no entity of the graph occurs in the question" in r.stderr, r.stderr
    assert json.loads(r.stdout)["sources"][0]["path"].endswith(".txt")  # RAG's chunks instead
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "graph.db").write_bytes(b"x" * 4096)
    for args, message in [(("query", "q", "--graph", str(tmp_path / "bad")), "corrupt or not a graph database"),
                          (("query", "q", "--graph", str(tmp_path / "none")), "no graph there"),
                          (("ask", "", "--graph", graph), "the question is empty"),
                          (("eval", "--limit", "-1"), "--limit -1"),
                          (("build", str(tmp_path / "nothing")), "no such file or folder")]:
        assert main(["kg", *args]) == 2  # in-process: the same one-line error path as the subprocess above
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert main(["kg", "query", "nothing linked", "--graph", graph]) == 0
    assert "no entity of the graph occurs in the question" in capsys.readouterr().err
