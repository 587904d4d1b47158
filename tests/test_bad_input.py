"""Malformed model files: a one-line error naming the file and problem, exit code 2, no traceback,
no hang, no huge allocation. The corpus comes from scripts/make_malformed.py."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.formats.load import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("malformed")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_malformed.py"), str(out)], check=True)
    return out


def test_corpus_has_at_least_20_files(corpus):
    assert len(list(corpus.iterdir())) >= 20


def test_every_malformed_file_is_a_clean_error(corpus):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for entry in sorted(corpus.iterdir()):
        t0 = time.perf_counter()
        with pytest.raises(LlmlabError) as err:
            load(entry)
        assert time.perf_counter() - t0 < 5, entry.name
        message = str(err.value)
        assert "\n" not in message, entry.name
        assert entry.name in message or str(corpus) in message, (entry.name, message)
    # nothing allocated anything like the absurd sizes declared (2^40+ elements)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024


@pytest.mark.parametrize("name,needle", [
    ("array_2e63_items.gguf", "declares 9223372036854775807 items"),
    ("absurd_tensor_count.gguf", "more than the file can hold"),
    ("absurd_string_length.gguf", "truncated"),
    ("tensor_past_eof.gguf", "past the end of the file"),
    ("unsupported_q6_k.gguf", "Q6_K"),
    ("unknown_architecture.gguf", "unsupported GGUF architecture 'mamba9'"),
    ("st_header_len_too_big.safetensors", "header length"),
    ("st_header_len_wrong.safetensors", "not valid JSON"),
    ("st_truncated_data.safetensors", "truncated"),
    ("hf_unknown_arch", "unsupported model_type 'mamba9'"),
    ("tok_unigram", "unsupported tokenizer model type 'Unigram'"),
    ("version_99.gguf", "unsupported GGUF version 99"),
])
def test_specific_messages(corpus, name, needle):
    with pytest.raises(LlmlabError, match=None) as err:
        load(corpus / name)
    assert needle in str(err.value)


@pytest.mark.parametrize("name", ["array_2e63_items.gguf", "tensor_past_eof.gguf", "hf_unknown_arch",
                                  "st_header_len_wrong.safetensors", "tok_unigram"])
def test_cli_exit_code_2_no_traceback(corpus, name):
    proc = subprocess.run([sys.executable, "-m", "llmlab", "info", str(corpus / name)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmlab: error:") and name in lines[0]


def test_truncated_real_gguf(smollm_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(smollm_path.stat().st_size // 2))
    with pytest.raises(LlmlabError, match="past the end of the file"):
        load(cut)


def test_truncated_real_safetensors(minilm_path, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(minilm_path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    with pytest.raises(LlmlabError, match="truncated"):
        load(folder)


def test_missing_path_and_unknown_preset():
    with pytest.raises(LlmlabError, match="no such file, folder or preset"):
        load("/nonexistent/model.gguf")
    with pytest.raises(LlmlabError, match="no such file, folder or preset"):
        load("gpt-17")


def test_pickle_is_opened_weights_only(tmp_path):
    """A pytorch_model.bin carrying code is refused, never executed."""
    import json
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8, "n_embd": 8,
                                                    "n_layer": 1, "n_head": 2, "n_positions": 8}))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    torch.save({"x": Evil()}, folder / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(LlmlabError, match="weights_only"):
        load(folder)
    assert not marker.exists()


def test_safetensors_round_trip_with_reference(tmp_path):
    import torch

    from llmlab.formats import safetensors as ours

    st = pytest.importorskip("safetensors.torch", reason="peer 'safetensors' is not installed")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(10, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "e": torch.empty(0, 3)}
    ours.save(tensors, tmp_path / "x.safetensors")
    ref = st.load_file(str(tmp_path / "x.safetensors"))
    st.save_file(tensors, str(tmp_path / "y.safetensors"))
    mine = ours.load(tmp_path / "y.safetensors")
    for k, v in tensors.items():
        assert torch.equal(ref[k], v) and torch.equal(mine[k], v)
