"""Houlsby bottleneck adapters (nn/bottleneck.py) and their llmlab adapter folder (formats/peft_prompt.py):
identity at init, the paper's formula (with a negative control), placement after each sublayer output,
gradients only on adapters (+ norms), save/load round trip, a training smoke test and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.formats import peft_prompt
from llmlab.models import build_model
from llmlab.models.config import ModelConfig
from llmlab.nn.bottleneck import (
    BottleneckConfig,
    BottleneckLinear,
    apply_bottleneck_,
    bottleneck_modules,
    bottleneck_reference,
    bottleneck_state_dict,
    mark_only_bottleneck_trainable_,
)

TOL = 1e-5


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"arch": "llama", "vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "ffn_dim": 48, "max_seq_len": 64, **kw})
    return build_model(cfg).eval()


def _randomize_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bottleneck_modules(model).values():
            for p in m.adapter_up.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            m.adapter_down.bias.copy_(torch.randn(m.adapter_down.bias.shape, generator=g) * 0.1)


def test_layer_is_identity_at_init_and_equals_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = BottleneckLinear(base, dim=8, activation="relu")
    assert layer.base_layer is base and not base.weight.requires_grad
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))  # W_up = 0, b_up = 0: exactly the base
    with torch.no_grad():
        for p in layer.adapter_up.parameters():
            p.normal_()
        layer.adapter_down.bias.normal_()
    d, u = layer.adapter_down, layer.adapter_up
    want = bottleneck_reference(base(x), d.weight, d.bias, u.weight, u.bias, "relu")
    assert (layer(x) - want).abs().max() < TOL
    # negative control: dropping the internal skip connection (h + ...) must fail the same check
    assert (u(torch.relu(d(base(x)))) - want).abs().max() > 100 * TOL


def test_adapters_sit_after_each_sublayer_output_and_start_as_identity():
    model = _tiny()
    ids = torch.randint(0, 96, (2, 9))
    before = model(ids)
    paths = apply_bottleneck_(model, BottleneckConfig(dim=8))
    assert paths == ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj",
                     "layers.1.self_attn.o_proj", "layers.1.mlp.down_proj"]
    assert torch.equal(model(ids), before)  # exact identity at init
    assert apply_bottleneck_(_tiny(), BottleneckConfig(sublayers=["mlp"])) == ["layers.0.mlp.down_proj",
                                                                              "layers.1.mlp.down_proj"]
    # the adapter acts on the attention output before the residual add: x + adapter(attn(norm(x)))
    _randomize_(model)
    block = model.layers[0]
    x = torch.randn(1, 4, 32)
    rope = model.rotary(torch.arange(4)[None], x.dtype)
    attn_out = block.self_attn(block.input_layernorm(x), rope=rope, key_mask=None, cache=None, layer=0, start=0)
    m = block.self_attn.o_proj
    h = m.base_layer(_attn_context(block, x, rope))  # o_proj's own output, then the formula by hand
    want = bottleneck_reference(h, m.adapter_down.weight, m.adapter_down.bias, m.adapter_up.weight,
                                m.adapter_up.bias, "gelu")
    assert (attn_out - want).abs().max() < TOL


def _attn_context(block, x, rope):
    """The attention's input to o_proj, (B, T, H*D), by capturing it with a hook."""
    seen = {}
    handle = block.self_attn.o_proj.base_layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    block.self_attn(block.input_layernorm(x), rope=rope, key_mask=None, cache=None, layer=0, start=0)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("train_norms", [True, False])
def test_gradients_only_on_adapters_and_norms(train_norms):
    model = _tiny()
    apply_bottleneck_(model, BottleneckConfig(dim=8))
    _randomize_(model)
    n = mark_only_bottleneck_trainable_(model, train_norms=train_norms)
    per_adapter = (8 * 32 + 8) + (32 * 8 + 32)  # down (8, 32) + bias 8, up (32, 8) + bias 32
    norms = (2 * 2 + 1) * 32  # two RMSNorms per layer and the final one
    assert n == 4 * per_adapter + (norms if train_norms else 0)
    ids = torch.randint(0, 96, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        is_adapter = ".adapter_" in name
        is_norm = "norm" in name
        if is_adapter or (train_norms and is_norm):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_training_reduces_loss_and_changes_only_the_method_parameters():
    model = _tiny().train()
    apply_bottleneck_(model, BottleneckConfig(dim=8))
    mark_only_bottleneck_trainable_(model, train_norms=False)
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapter_" not in k}
    ids = torch.randint(0, 96, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.state_dict().items():
        if ".adapter_" not in k:
            assert torch.equal(v, frozen[k]), k


def test_save_load_round_trip(tmp_path):
    model = _tiny()
    apply_bottleneck_(model, BottleneckConfig(dim=8, activation="silu"))
    _randomize_(model)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # a trained norm travels with the adapter
    folder = peft_prompt.save_prompt_adapter(tmp_path / "a", model, base_model="tiny")
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["dim"], conf["activation"], conf["sublayers"]) == ("BOTTLENECK", 8, "silu",
                                                                                       ["attn", "mlp"])
    fresh = _tiny()
    got = peft_prompt.load_prompt_adapter(fresh, folder)
    assert got is fresh
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(got(ids), model(ids))
    assert set(bottleneck_state_dict(got)) == set(bottleneck_state_dict(model))


def test_bad_adapter_folders(tmp_path):
    model = _tiny()
    apply_bottleneck_(model, BottleneckConfig(dim=8))
    folder = peft_prompt.save_prompt_adapter(tmp_path / "a", model)
    wider = _tiny(dim=48, n_heads=4)  # another base: the message names the file, tensor, expected vs got
    with pytest.raises(LlmlabError, match=r"adapter_model.safetensors: .*has shape \(.*\), this model needs"):
        peft_prompt.load_prompt_adapter(wider, folder)
    assert not bottleneck_modules(wider)  # a failed load changes nothing
    deeper = _tiny(n_layers=3)
    with pytest.raises(LlmlabError, match="do not cover this model"):
        peft_prompt.load_prompt_adapter(deeper, folder)
    assert not bottleneck_modules(deeper)
    conf = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
    with pytest.raises(LlmlabError, match="peft_type 'IA3' is not one of"):
        peft_prompt.load_prompt_adapter(_tiny(), folder)
    (folder / "adapter_config.json").write_text(json.dumps({**conf, "activation": "swish"}))
    with pytest.raises(LlmlabError, match="activation 'swish' is unknown"):
        peft_prompt.load_prompt_adapter(_tiny(), folder)
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    (folder / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(LlmlabError, match="safetensors"):
        peft_prompt.load_prompt_adapter(_tiny(), folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LlmlabError, match="no adapter_model.safetensors"):
        peft_prompt.load_prompt_adapter(_tiny(), folder)
    with pytest.raises(LlmlabError, match="no adapter_config.json"):
        peft_prompt.load_prompt_adapter(_tiny(), tmp_path / "missing")
    with pytest.raises(LlmlabError, match="nothing to save|no prompt tuning"):
        peft_prompt.save_prompt_adapter(tmp_path / "b", _tiny())
    with pytest.raises(LlmlabError, match="dim must be a positive integer"):
        apply_bottleneck_(_tiny(), BottleneckConfig(dim=0))
    with pytest.raises(LlmlabError, match="no mlp.down_proj"):
        apply_bottleneck_(_tiny(n_experts=2, experts_per_token=1), BottleneckConfig(sublayers=["mlp"]))
