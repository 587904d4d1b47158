"""Shared fixtures: the two embedded real models, loaded once per session, and peer-import helpers.

Parity tests skip with a message when a peer is missing; CI installs the test extra so they run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on the 2-core machine) each worker gets one thread, so the two
# never fight over the cores; a plain `pytest` run gets both. Tests that need a thread count set it themselves.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def need(module: str):
    """Import a peer library or skip the test, saying which one is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"peer {module!r} is not installed (pip install -e '.[test]')")
    return importlib.import_module(module)


def script_env() -> dict[str, str]:
    """The environment for a subprocess that runs a script from the checkout (``python benchmarks/X.py``): this
    interpreter's import path, so the script sees the same llmlab and the benchmarks folder's siblings."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def llama_twins(transformers):
    """A tiny random transformers Llama (GQA: 8 query heads, 2 key/value heads, untied head) and the llmlab
    model with the same weights, for parity tests of adapters (LoRA, prefix and prompt tuning)."""
    from llmlab.formats import hf
    from llmlab.models import build_model

    torch.manual_seed(0)
    hcfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                    rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(hcfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # HF's norms start at 1: random values make parity meaningful
    cfg = hf.config_from_hf(ref.config.to_dict()).validate()
    ours = build_model(cfg).eval()
    ours.load_state_dict(hf.state_from_hf(cfg, ref.state_dict()))
    return ref, ours


def _embedded(name: str):
    from llmlab.common import LlmlabError
    from llmlab.formats.load import embedded_path

    try:
        return embedded_path(name)
    except LlmlabError as e:
        pytest.skip(str(e))


def make_tiny_encoder(folder, seed: int = 0, dim: int = 32) -> str:
    """A random 2-layer BERT (``dim`` wide) with all-MiniLM-L6-v2's tokenizer, written as a Hugging Face folder."""
    import shutil

    from llmlab.formats import hf
    from llmlab.models.bert import BertModel

    src = _embedded("all-minilm-l6-v2")
    cfg = hf.read_config(src)
    cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim = dim, 2, 2, 2, 2 * dim, dim // 2
    torch.manual_seed(seed)
    model = BertModel(cfg)
    hf.write_folder(folder, cfg, model.state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, folder / name)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (dim 32) with all-MiniLM-L6-v2's tokenizer, as a Hugging Face folder."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="session")
def smollm_path():
    return _embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm(smollm_path):
    """transformers' LlamaForCausalLM loading the same GGUF (float32), shared by the parity tests: loading it
    dequantizes the whole file (~20 s)."""
    transformers = need("transformers")
    need("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def minilm_path():
    return _embedded("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from llmlab.api import load

    return load(smollm_path)


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from llmlab.api import load

    return load(minilm_path)


@pytest.fixture(scope="session")
def tiny_chat(smollm_path, tmp_path_factory):
    """A Hugging Face folder: a tiny random Llama (dim 64, 2 blocks, FFN 128: whole GGML blocks) with SmolLM2's
    tokenizer and chat template, for commands that need text (calibration, chat) without the real weights."""
    from dataclasses import replace

    from llmlab.formats.convert import write_loaded
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf
    from llmlab.formats.load import Loaded
    from llmlab.models.registry import build_model, get_preset

    g = GGUFFile(smollm_path)
    tok = tokenizer_from_gguf(g)
    cfg = replace(get_preset("llama-tiny"), vocab_size=len(tok.id_to_token), ffn_dim=128, max_seq_len=1024,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_chat") / "model"
    write_loaded(Loaded(model, cfg, tok, g.metadata.get("tokenizer.chat_template"), str(out), "preset"), out)
    return out


@pytest.fixture
def small_retrieval_set(monkeypatch):
    """The built-in retrieval set cut to 12 queries and their documents plus 30 distractors (embedding its 1,700
    documents is the slow part, and test_retrieval.py tests the set itself)."""
    import llmlab.text.retrieval_set as rs

    full = rs.builtin_test_set()
    qids = list(full.queries)[:12]
    docs = {d for q in qids for d in full.relevant[q]} | set(list(full.corpus)[-30:])
    small = rs.RetrievalSet({q: full.queries[q] for q in qids}, {d: full.corpus[d] for d in full.corpus if d in docs},
                            {q: full.relevant[q] for q in qids})
    monkeypatch.setattr(rs, "builtin_test_set", lambda: small)
    return small
