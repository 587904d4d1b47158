"""Property-based fuzzing of the file parsers (GGUF, safetensors, tokenizer.json, chat templates).

Seeds are real, valid files (tiny random models written by llmlab's writers, a cut of the SmolLM2 GGUF's
vocabulary and metadata, a Hugging Face folder, real chat templates); hypothesis mutates their bytes,
GGUF metadata values and JSON structure. Every input must end in a one-line LlmlabError naming the file,
or in a model and tokenizer that work. The seeds, mutators and checks live in scripts/fuzz.py, which also
runs the longer, unbounded search. Bounded here (~1,000 inputs, derandomized) so CI stays reproducible.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest

from llmlab.common import LlmlabError

hypothesis = pytest.importorskip("hypothesis", reason="pip install -e '.[test]' (hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llmlab_fuzz", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["llmlab_fuzz"] = fuzz  # dataclasses look their module up there
_spec.loader.exec_module(fuzz)

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
OPS = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
               min_size=1, max_size=4)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return fuzz.make_cases(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-work")


def test_seeds_are_valid(cases, work):
    """The unmutated seeds load and work: the fuzzing starts from real files."""
    assert len(cases["gguf"]) >= 2 and cases["safetensors"] and cases["tokenizer"] and cases["template"]
    for target, items in cases.items():
        for case in items:
            assert fuzz.check(target, case.place(work, case.data)) == "ok", (target, case.seed.name)


def _run(target: str, cases, work, data_strategy) -> None:
    @settings(max_examples=EXAMPLES[target], **SETTINGS)
    @given(st.data())
    def one(data):
        case = data.draw(st.sampled_from(cases[target]), label="seed")
        ops = data.draw(OPS, label="ops")
        mode = data_strategy(data)
        path = case.place(work, case.mutate(ops, mode))
        fuzz.check(target, path, time_limit=10.0)  # raises Finding on a broken contract

    one()
    # Allocation bounds are checked per input with tracemalloc (test_header_parsers_allocate_little);
    # a peak-RSS check here would depend on what earlier tests had already allocated.


EXAMPLES = {"gguf": 200, "safetensors": 200, "tokenizer": 250, "template": 250}


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_fuzz_parser(target, cases, work):
    _run(target, cases, work, lambda data: data.draw(st.integers(0, 2), label="mode"))


@settings(max_examples=150, **SETTINGS)
@given(seed=st.integers(0, 10), ops=OPS)
def test_header_parsers_allocate_little(tmp_path_factory, seed, ops):
    """Parsing a mutated GGUF / safetensors header allocates at most ~4x the file's size (Python heap):
    every count and length is checked against the bytes left before anything is built."""
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.safetensors import read_header

    global _HEADER_CASES
    if _HEADER_CASES is None:
        _HEADER_CASES = fuzz.make_cases(tmp_path_factory.mktemp("fuzz-header-seeds"))
    items = _HEADER_CASES["gguf"] + _HEADER_CASES["safetensors"]
    case = items[seed % len(items)]
    path = tmp_path_factory.getbasetemp() / f"h-{case.seed.name}"
    data = case.mutate(ops, 0)
    path.write_bytes(data)
    tracemalloc.start()
    try:
        (GGUFFile if case.target == "gguf" else read_header)(path)
    except LlmlabError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 4 * len(data) + (1 << 20), (case.seed.name, peak, len(data))


_HEADER_CASES = None


# ---- the defects fuzzing found, each pinned -------------------------------------------------------
def _rewrite(src: Path, dst: Path, **changes) -> Path:
    from llmlab.formats.gguf import GGUFFile, write_gguf

    g = GGUFFile(src)
    md = dict(g.metadata)
    md.update(changes)
    types = {"tokenizer.ggml.tokens": (9, 8), "tokenizer.ggml.merges": (9, 8), "tokenizer.ggml.token_type": (9, 5)}
    write_gguf(dst, md, {n: (bytes(g.raw(i)), i.shape, i.ggml_type) for n, i in g.tensors.items()}, types)
    return dst


def test_merge_naming_a_missing_token_is_a_clean_error(cases, tmp_path):
    """The known defect: a merge naming a token missing from the vocabulary escaped from `tokenizers` as a bare
    Exception with a traceback (about one SmolLM2-metadata mutation in five)."""
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf

    seed = cases["gguf"][-1].seed
    merges = GGUFFile(seed).metadata["tokenizer.ggml.merges"]
    bad = _rewrite(seed, tmp_path / "bad.gguf", **{"tokenizer.ggml.merges": ["Ġ qz", *merges[1:]]})
    with pytest.raises(LlmlabError, match=r"bad\.gguf: tokenizer\.ggml\.merges\[0\] = 'Ġ qz' names 'qz'"):
        tokenizer_from_gguf(GGUFFile(bad))
    with pytest.raises(LlmlabError, match="not in tokenizer.ggml.tokens"):
        fuzz._check_gguf(bad)


def test_negative_control_fuzz_check_catches_a_removed_validation(cases, tmp_path, monkeypatch):
    """Teeth: with the merge validation switched off, the same input is a Finding, not a clean error."""
    import llmlab.formats.gguf_model as gm

    seed = cases["gguf"][-1].seed
    bad = _rewrite(seed, tmp_path / "bad.gguf", **{"tokenizer.ggml.merges": ["Ġ qz", "a b"]})
    assert fuzz.check("gguf", bad) == "error"
    monkeypatch.setattr(gm, "check_bpe", lambda *a, **k: None)
    with pytest.raises(fuzz.Finding):
        fuzz.check("gguf", bad)


@pytest.mark.parametrize("changes,needle", [
    ({"tokenizer.ggml.bos_token_id": 10**6}, "tokenizer.ggml.bos_token_id = 1000000 is not a token id"),
    ({"tokenizer.ggml.pre": ["a"]}, "unsupported pre-tokenizer"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count = 0 is not a positive integer"),
    ({"llama.rope.freq_base": "x"}, "llama.rope.freq_base = 'x' is not a positive number"),
    ({"llama.embedding_length": 2**20}, "parameters but the file holds"),
    ({"tokenizer.ggml.tokens": ["a", "b"]}, "names 'Ġ', which is not in tokenizer.ggml.tokens"),
    ({"tokenizer.chat_template": "{% for %}"}, "bad.gguf: chat template does not parse"),
    ({"tokenizer.chat_template": "{{ messages + 1 }}"}, "bad.gguf: chat template failed: TypeError"),
])
def test_metadata_defects_found_by_fuzzing(cases, tmp_path, changes, needle):
    bad = _rewrite(cases["gguf"][0].seed, tmp_path / "bad.gguf", **changes)
    with pytest.raises(LlmlabError) as err:
        fuzz._check_gguf(bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec,needle", [
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a qz"], "pre_tokenizer": {"type": "ByteLevel"}}},
     "model.merges[0] = 'a qz' names 'qz', which is not in model.vocab"),
    ({"model": {"type": "WordPiece", "vocab": 3}}, "model.vocab is not a JSON object"),
    ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "unk_token '[UNK]' is not in model.vocab"),
    ({"model": {"type": "BPE", "vocab": {}}, "added_tokens": [{"id": "x", "content": "<s>"}]}, "non-negative"),
    ({"model": {"type": "BPE", "vocab": {}}, "normalizer": 7}, "unsupported normalizer 7"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": 5}, "pre_tokenizer": {"type": "ByteLevel"}}, "not a list"),
])
def test_tokenizer_json_defects_found_by_fuzzing(tmp_path, spec, needle):
    from llmlab.tokenizer.hf_json import load_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LlmlabError, match=None) as err:
        load_tokenizer_json(tmp_path)
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_non_utf8_json_and_unhashable_dtype(tmp_path):
    from llmlab.formats.safetensors import read_header
    from llmlab.tokenizer.hf_json import load_tokenizer_json

    (tmp_path / "tokenizer.json").write_bytes(b'{"model": "\xff"}')
    with pytest.raises(LlmlabError, match="not UTF-8"):
        load_tokenizer_json(tmp_path)
    h = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(LlmlabError, match="unsupported dtype"):
        read_header(tmp_path / "x.safetensors")
