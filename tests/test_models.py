"""Architecture parity with transformers on tiny random models, moved through HF folders both ways."""

from __future__ import annotations

import pytest
import torch

from llmlab.formats import hf
from llmlab.formats.load import load_model
from llmlab.models import build_model, get_preset
from llmlab.models.config import ModelConfig
from tests.conftest import need


def _hf_model(kind: str, transformers):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                       rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    return transformers.BertModel(cfg)


def _randomize_(model):
    # HF initialises norms to 1 and biases to 0; random values make the parity test meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_hf_parity_and_round_trip(kind, tmp_path):
    transformers = need("transformers")
    ref = _hf_model(kind, transformers).eval()
    _randomize_(ref)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").model
    ids = torch.randint(0, 300, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 12:] = 0
    with torch.inference_mode():
        if kind == "bert":
            expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours(ids, attention_mask=mask)
            keep = mask.bool()
            assert (got[keep] - expected[keep]).abs().max() < 1e-4
            assert (ours.pooled(got) - ref(input_ids=ids, attention_mask=mask).pooler_output).abs().max() < 1e-4
        else:
            expected = ref(input_ids=ids).logits
            got = ours(ids)
            assert (got - expected).abs().max() < 1e-4
    # and back: our folder loads in transformers with the same outputs
    cfg = ours.config
    hf.write_folder(tmp_path / "ours", cfg, ours.state_dict())
    back = type(ref).from_pretrained(tmp_path / "ours").eval()
    with torch.inference_mode():
        if kind == "bert":
            again = back(input_ids=ids, attention_mask=mask).last_hidden_state
            assert (again[mask.bool()] - expected[mask.bool()]).abs().max() < 1e-5
        else:
            assert (back(input_ids=ids).logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_kv_cache_matches_full_forward(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(2, 32)
        first = model(ids[:, :12], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    inc = torch.cat([first, *steps], dim=1)
    assert (inc - full).abs().max() < 1e-5
    assert cache.length == 20


@pytest.mark.parametrize("preset", ["smollm2-135m", "gpt2", "minilm-l6", "llama-tiny", "bert-tiny"])
def test_num_params_formula(preset):
    cfg = get_preset(preset)
    if cfg.dim > 256:
        with torch.device("meta"):
            model = build_model(cfg)
    else:
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_known_sizes():
    assert abs(get_preset("smollm2-135m").num_params() - 134_515_008) == 0
    assert get_preset("gpt2").num_params() == 124_439_808


def test_config_validation_messages():
    from llmlab.common import LlmlabError

    with pytest.raises(LlmlabError, match="not a multiple"):
        ModelConfig(n_heads=8, n_kv_heads=3).validate()
    with pytest.raises(LlmlabError, match="unknown architecture"):
        ModelConfig(arch="mamba").validate()
    with pytest.raises(LlmlabError, match="positive"):
        ModelConfig(n_layers=0).validate()
