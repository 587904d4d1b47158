"""LoRA (nn/lora.py) and PEFT adapter folders (formats/peft.py): the formula, merge/unmerge, targeting,
bad input, and parity with peft on a tiny random Llama and its transformers twin (forward logits,
LoRA gradients, adapter folders both ways), with a negative control for the scaling."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.formats import hf
from llmlab.formats import peft as peft_io
from llmlab.models import build_model
from llmlab.nn.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora_,
    lora_disabled,
    lora_modules,
    lora_reference_forward,
    lora_state_dict,
    mark_only_lora_trainable_,
    matches_target,
    merge_lora_,
    remove_lora_,
    unmerge_lora_,
)
from llmlab.nn.nf4 import NF4Linear, quantize_linears_nf4_
from tests.conftest import llama_twins, need

TOL = 1e-5
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama():
    from llmlab.models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=64)
    return build_model(cfg).eval()


def _randomize_lora_(model, seed=1):
    # B starts at zero; random B makes the update (and every parity check below) non-trivial.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


# ---- the module on its own -----------------------------------------------------------------------------


def test_lora_linear_formula_init_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    w0 = base.weight.detach().clone()
    lora = LoRALinear(base, r=4, alpha=8)
    assert lora.base_layer is base and lora.base_layer.weight is base.weight  # wrapped, not copied
    assert not base.weight.requires_grad and lora.lora_A.weight.requires_grad
    assert torch.count_nonzero(lora.lora_B.weight) == 0 and torch.count_nonzero(lora.lora_A.weight) > 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert lora.lora_A.weight.abs().max() <= bound
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))  # B = 0: the wrapped model computes what it did
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    want = lora_reference_forward(x, w0, lora.lora_A.weight, lora.lora_B.weight, 8 / 4, base.bias)
    assert (lora(x) - want).abs().max() < 1e-5
    ptr = base.weight.data_ptr()
    lora.merge()
    lora.merge()  # idempotent
    assert base.weight.data_ptr() == ptr and lora.merged  # in place
    assert (lora(x) - want).abs().max() < 1e-5
    assert (base.weight - (w0 + 2.0 * lora.lora_B.weight @ lora.lora_A.weight)).abs().max() < 1e-6
    lora.unmerge()
    lora.unmerge()
    assert (base.weight - w0).abs().max() < 1e-6 and not lora.merged
    assert (lora(x) - want).abs().max() < 1e-5


def test_dropout_acts_on_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    lora = LoRALinear(base, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(6, 16)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    with torch.no_grad():
        assert (lora.eval()(x) - lora_reference_forward(x, base.weight, a, b, 1.0, base.bias)).abs().max() < 1e-5
        torch.manual_seed(5)
        got = lora.train()(x)
        torch.manual_seed(5)
        dropped = F.dropout(x, 0.5, training=True)  # the same mask: same generator state and shape
        want = base(x) + F.linear(F.linear(dropped, a), b)  # the base path sees all of x
        assert (got - want).abs().max() < 1e-5 and (got - lora.eval()(x)).abs().max() > 1e-3


def test_rslora_scaling_and_config_checks():
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0
    assert LoRALinear(nn.Linear(4, 4), r=4, alpha=8, use_rslora=True).scaling == 4.0
    for bad in (0, -2):
        with pytest.raises(LlmlabError, match="rank r must be a positive integer"):
            apply_lora_(_tiny_llama(), LoRAConfig(r=bad))
    with pytest.raises(LlmlabError, match="dropout"):
        LoRAConfig(dropout=1.0).validate()


def test_targets_by_names_regex_and_all_linear():
    m = _tiny_llama()
    assert apply_lora_(m, LoRAConfig(target_modules=["q_proj", "v_proj"])) == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj"]
    m = _tiny_llama()
    assert apply_lora_(m, LoRAConfig(target_modules=r"layers\.1\.mlp\.(up|down)_proj")) == [
        "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    m = _tiny_llama()
    wrapped = apply_lora_(m, LoRAConfig(target_modules="all-linear"))
    assert len(wrapped) == 2 * 7 and "lm_head" not in wrapped
    with pytest.raises(LlmlabError, match="already has LoRA"):
        apply_lora_(m, LoRAConfig(target_modules="all-linear"))


def test_no_match_lists_available_names():
    with pytest.raises(LlmlabError, match="match no linear layer.*down_proj, gate_proj, k_proj, lm_head, o_proj"):
        apply_lora_(_tiny_llama(), LoRAConfig(target_modules=["query"]))


def test_only_lora_trains_and_state_dict():
    m = _tiny_llama()
    apply_lora_(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    n = mark_only_lora_trainable_(m)
    assert n == 2 * (2 * 32 + 32 * 2)
    trainable = sorted(k for k, p in m.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_state_dict(m))
    assert trainable[0] == "layers.0.self_attn.q_proj.lora_A.weight"


def test_model_merge_remove_and_disable():
    m = _tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = m(ids)
    apply_lora_(m, LoRAConfig(r=4, target_modules="all-linear"))
    _randomize_lora_(m)
    with torch.no_grad():
        adapted = m(ids)
        with lora_disabled(m):
            assert torch.equal(m(ids), before)
        merge_lora_(m)
        assert (m(ids) - adapted).abs().max() < 1e-5
        with pytest.raises(LlmlabError, match="unmerge"), lora_disabled(m):
            pass
        unmerge_lora_(m)
        assert (m(ids) - adapted).abs().max() < 1e-5
        remove_lora_(m, merge=True)
        assert not lora_modules(m) and isinstance(m.layers[0].self_attn.q_proj, nn.Linear)
        assert (m(ids) - adapted).abs().max() < 1e-5


def test_tied_head_is_refused():
    from llmlab.models.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16,
                      tie_embeddings=True)
    with pytest.raises(LlmlabError, match="tied"):
        apply_lora_(build_model(cfg), LoRAConfig(target_modules=["lm_head"]))


def test_lora_on_nf4_base_trains_the_adapter_only():
    m = _tiny_llama()
    quantize_linears_nf4_(m)
    apply_lora_(m, LoRAConfig(r=4, target_modules="all-linear"))
    assert isinstance(m.layers[0].mlp.up_proj.base_layer, NF4Linear)
    mark_only_lora_trainable_(m)
    _randomize_lora_(m)
    loss = m(torch.randint(0, 128, (2, 7))).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for k, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(LlmlabError, match="dequantize"):
        merge_lora_(m)


# ---- parity with peft ----------------------------------------------------------------------------------


def _peft_lora(peft, ref, lora: LoRAConfig):
    pcfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, use_rslora=lora.use_rslora)
    model = peft.get_peft_model(ref, pcfg).eval()
    _randomize_lora_peft_(model)
    return model


def _randomize_lora_peft_(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _copy_peft_weights_(peft_model, ours):
    """peft's A/B (keys of its own state dict, adapter name 'default') into our LoRA layers."""
    sd = {k.removeprefix("base_model.model.model.").replace(".default", ""): v
          for k, v in peft_model.state_dict().items() if ".lora_" in k}
    ours_sd = lora_state_dict(ours)
    assert set(sd) == set(ours_sd)
    with torch.no_grad():
        for k, v in sd.items():
            ours_sd[k].copy_(v)


def _max_diffs(peft_model, ours, ids):
    """max |logits difference| and max |LoRA gradient difference| for one forward/backward."""
    peft_model.zero_grad()
    ours.zero_grad()
    ref_logits = peft_model(input_ids=ids).logits
    our_logits = ours(ids)
    target = torch.roll(ids, -1, dims=1)
    for logits in (ref_logits, our_logits):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    d_logits = (ref_logits - our_logits).abs().max().item()
    ref_grads = {k.removeprefix("base_model.model.model.").replace(".default", ""): p.grad
                 for k, p in peft_model.named_parameters() if ".lora_" in k}
    d_grads = max((p.grad - ref_grads[k]).abs().max().item() for k, p in ours.named_parameters() if p.requires_grad)
    return d_logits, d_grads


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "v_proj"], False), ("all-linear", True)])
def test_forward_and_gradients_match_peft(targets, rslora):
    transformers, peft = need("transformers"), need("peft")
    ref, ours = llama_twins(transformers)
    lora = LoRAConfig(r=4, alpha=8, target_modules=targets, use_rslora=rslora)
    peft_model = _peft_lora(peft, ref, lora)
    apply_lora_(ours, lora)
    mark_only_lora_trainable_(ours)
    _copy_peft_weights_(peft_model, ours)
    ids = torch.randint(0, 300, (2, 13))
    d_logits, d_grads = _max_diffs(peft_model, ours, ids)
    print(f"peft parity {targets} rslora={rslora}: max|dlogits|={d_logits:.2e} max|dgrad|={d_grads:.2e}")
    assert d_logits < TOL and d_grads < TOL
    # negative control: alpha in place of alpha / r (the classic scaling slip) must fail the same check
    for m in lora_modules(ours).values():
        m.scaling = lora.alpha
    d_logits_bad, d_grads_bad = _max_diffs(peft_model, ours, ids)
    assert d_logits_bad > 100 * TOL and d_grads_bad > 100 * TOL


def test_adapter_written_by_llmlab_loads_in_peft(tmp_path):
    transformers, peft = need("transformers"), need("peft")
    ref, ours = llama_twins(transformers)
    lora = LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora_(ours, lora)
    _randomize_lora_(ours)
    peft_io.save_adapter(tmp_path / "adapter", ours, lora, base_model="tiny-llama")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "v_proj", "down_proj"] and conf["lora_alpha"] == 16
    loaded = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        d = (loaded(input_ids=ids).logits - ours(ids)).abs().max().item()
        with loaded.disable_adapter():
            lift = (loaded(input_ids=ids).logits - ours(ids)).abs().max().item()
    print(f"llmlab adapter in peft: max|dlogits|={d:.2e} (adapter's own effect {lift:.2e})")
    assert d < TOL and lift > 100 * TOL  # the adapter loaded and changes the output


def test_adapter_written_by_peft_loads_in_llmlab(tmp_path):
    transformers, peft = need("transformers"), need("peft")
    ref, ours = llama_twins(transformers)
    lora = LoRAConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True)
    peft_model = _peft_lora(peft, ref, lora)
    peft_model.save_pretrained(tmp_path / "from_peft")
    got = peft_io.load_adapter_(ours, tmp_path / "from_peft")
    assert (got.r, got.alpha, got.use_rslora, len(got.target_modules)) == (8, 4.0, True, 14)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        d = (peft_model(input_ids=ids).logits - ours(ids)).abs().max().item()
        with lora_disabled(ours):
            lift = (peft_model(input_ids=ids).logits - ours(ids)).abs().max().item()
    print(f"peft adapter in llmlab: max|dlogits|={d:.2e} (adapter's own effect {lift:.2e})")
    assert d < TOL and lift > 100 * TOL
    # and out again: the same tensors under the same keys
    peft_io.save_adapter(tmp_path / "again", ours, got)
    from llmlab.formats import safetensors as st

    a, b = (st.load(tmp_path / d / "adapter_model.safetensors") for d in ("from_peft", "again"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    theirs, again = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("from_peft", "again"))
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora"):
        assert again[key] == theirs[key], key
    # target_modules may be spelled differently (peft expands all-linear); they must select the same modules
    hf_names = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
    chosen = [[n for n in hf_names if matches_target(n, c["target_modules"], nn.Linear(1, 1))] for c in (theirs, again)]
    assert chosen[0] == chosen[1] == hf_names[:-1]


def test_regex_targets_are_written_as_explicit_paths(tmp_path):
    ours = _tiny_llama()
    lora = LoRAConfig(r=2, target_modules=r"layers\.0\.self_attn\.[qk]_proj")
    apply_lora_(ours, lora)
    peft_io.save_adapter(tmp_path / "a", ours, lora)
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    fresh = _tiny_llama()
    got = peft_io.load_adapter_(fresh, tmp_path / "a")
    assert got.target_modules == ["layers.0.self_attn.k_proj", "layers.0.self_attn.q_proj"]


def test_bad_adapters_are_clear_errors(tmp_path):
    ours = _tiny_llama()
    lora = LoRAConfig(r=2, target_modules=["q_proj"])
    apply_lora_(ours, lora)
    folder = peft_io.save_adapter(tmp_path / "a", ours, lora)
    # an adapter for another base: a model with another width
    from llmlab.models.config import ModelConfig

    other = build_model(ModelConfig(arch="llama", vocab_size=128, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=48, max_seq_len=64))
    with pytest.raises(LlmlabError, match="another base model"):
        peft_io.load_adapter_(other, folder)
    assert not lora_modules(other)  # a failed load leaves the model as it was
    with pytest.raises(LlmlabError, match="no adapter_config.json"):
        peft_io.load_adapter_(_tiny_llama(), tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(LlmlabError, match="not a safetensors file"):
        peft_io.load_adapter_(_tiny_llama(), folder)
    conf = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(LlmlabError, match="use_dora"):
        peft_io.load_adapter_(_tiny_llama(), folder)


def test_gpt2_adapter_from_peft_and_fused_qkv_refused(tmp_path):
    transformers, peft = need("transformers"), need("peft")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                                               n_positions=64, resid_pdrop=0, embd_pdrop=0,
                                                               attn_pdrop=0)).eval()
    cfg = hf.config_from_hf(ref.config.to_dict()).validate()
    ours = build_model(cfg).eval()
    ours.load_state_dict(hf.state_from_hf(cfg, ref.state_dict()), strict=False)  # tied head: one tensor
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"],
                                                  fan_in_fan_out=True)).eval()
    _randomize_lora_peft_(pm)
    pm.save_pretrained(tmp_path / "gpt2")
    got = peft_io.load_adapter_(ours, tmp_path / "gpt2")
    assert got.target_modules == [f"layers.{i}.{p}" for i in range(2)
                                  for p in ("mlp.down_proj", "mlp.up_proj", "self_attn.o_proj")]
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        d = (pm(input_ids=ids).logits - ours(ids)).abs().max().item()
    assert d < TOL
    fresh = build_model(cfg)
    lora = LoRAConfig(r=2, target_modules=["q_proj"])
    apply_lora_(fresh, lora)
    with pytest.raises(LlmlabError, match="c_attn"):
        peft_io.save_adapter(tmp_path / "qkv", fresh, lora)
