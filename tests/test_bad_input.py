"""Malformed model files: a one-line error naming the file and problem, exit code 2, no traceback,
no hang, no huge allocation. The corpus comes from scripts/make_malformed.py; its ``fz_*`` entries are
the failure classes found by fuzzing (scripts/fuzz.py, tests/test_fuzz.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.formats.load import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("malformed")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_malformed.py"), str(out)], check=True)
    return out


def test_corpus_has_at_least_60_files(corpus):
    entries = list(corpus.iterdir())
    assert len(entries) >= 60
    # the failure classes scripts/fuzz.py found (GGUF metadata, tokenizer.json, safetensors headers)
    assert len([e for e in entries if e.name.startswith("fz_")]) >= 30


def test_every_malformed_file_is_a_clean_error(corpus):
    """Through ``llmlab.api.load``, what every command does (it also compiles the chat template)."""
    from llmlab.api import load as api_load

    for entry in sorted(corpus.iterdir()):
        t0 = time.perf_counter()
        with pytest.raises(LlmlabError) as err:
            api_load(entry)
        assert time.perf_counter() - t0 < 5, entry.name
        message = str(err.value)
        assert "\n" not in message, entry.name
        assert entry.name in message or str(corpus) in message, (entry.name, message)


# Loads every corpus file in a fresh process and prints how far its peak RSS rose: in this process the peak
# is whatever earlier tests reached (a loaded SmolLM2 alone is ~600 MB), which would hide a big allocation.
_PEAK_RSS = """
import resource, sys
from pathlib import Path
from llmlab.api import load
from llmlab.common import LlmlabError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for entry in sorted(Path(sys.argv[1]).iterdir()):
    try:
        load(entry)
    except LlmlabError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_malformed_files_allocate_nothing_absurd(corpus):
    """Nothing allocates anything like the absurd sizes declared (2^40+ elements), measured in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(corpus)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 512 * 1024  # KiB


@pytest.mark.parametrize("name,needle", [
    ("array_2e63_items.gguf", "declares 9223372036854775807 items"),
    ("absurd_tensor_count.gguf", "more than the file can hold"),
    ("absurd_string_length.gguf", "truncated"),
    ("tensor_past_eof.gguf", "past the end of the file"),
    ("unsupported_q3_k.gguf", "Q3_K"),
    ("unknown_architecture.gguf", "unsupported GGUF architecture 'mamba9'"),
    ("st_header_len_too_big.safetensors", "header length"),
    ("st_header_len_wrong.safetensors", "not valid JSON"),
    ("st_truncated_data.safetensors", "truncated"),
    ("hf_unknown_arch", "unsupported model_type 'mamba9'"),
    ("tok_unigram", "unsupported tokenizer model type 'Unigram'"),
    ("version_99.gguf", "unsupported GGUF version 99"),
    ("fz_merge_token_missing.gguf", "tokenizer.ggml.merges[1] = 'h qz' names 'qz', which is not in"),
    ("fz_tok_merge_token_missing", "model.merges[0] = 'Ġ qz' names 'qz', which is not in model.vocab"),
    ("fz_embedding_length_huge.gguf", "parameters but the file holds 2744 weights"),
    ("fz_bos_id_is_array.gguf", "tokenizer.ggml.bos_token_id = [1, 2] is not a token id"),
])
def test_specific_messages(corpus, name, needle):
    with pytest.raises(LlmlabError, match=None) as err:
        load_model(corpus / name)
    assert needle in str(err.value)


def test_cli_info_every_file_exit_2_one_line(corpus, capsys):
    """`llmlab info FILE` on every corpus entry, in-process: exit code 2, one stderr line naming the file."""
    from llmlab.cli import main

    for entry in sorted(corpus.iterdir()):
        assert main(["info", str(entry)]) == 2, entry.name
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmlab: error:") and entry.name in lines[0], (entry.name,
                                                                                                       out.err)
        assert out.out == "", entry.name


@pytest.mark.parametrize("name", ["array_2e63_items.gguf", "tensor_past_eof.gguf", "hf_unknown_arch",
                                  "st_header_len_wrong.safetensors", "tok_unigram", "fz_merge_token_missing.gguf",
                                  "fz_tok_merge_token_missing"])
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
        load_model(cut)


def test_truncated_real_safetensors(minilm_path, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(minilm_path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    with pytest.raises(LlmlabError, match="truncated"):
        load_model(folder)


def test_missing_path_and_unknown_preset():
    with pytest.raises(LlmlabError, match="no such file, folder or preset"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(LlmlabError, match="no such file, folder or preset"):
        load_model("gpt-17")


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
        load_model(folder)
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
