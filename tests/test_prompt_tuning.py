"""Prompt tuning and prefix tuning (nn/prompt_tuning.py) and their peft adapter folders
(formats/peft_prompt.py): logits and gradients equal to peft's on a tiny GQA Llama and its transformers twin
(with negative controls for the positions), folders both ways, masks, generation through the cache equal to
full forwards, a training smoke test and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.formats import peft_prompt
from llmlab.infer.beam import beam_search
from llmlab.infer.generate import generate
from llmlab.models import build_model
from llmlab.models.config import ModelConfig
from llmlab.nn.prompt_tuning import (
    PrefixTunedLM,
    PrefixTuningConfig,
    PromptTunedLM,
    PromptTuningConfig,
    apply_prefix_tuning,
    apply_prompt_tuning,
    load_prompt_state_dict_,
    mark_only_prompt_trainable_,
    prompt_state_dict,
)
from tests.conftest import llama_twins, need

TOL = 1e-5
P = 5


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"arch": "llama", "vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "ffn_dim": 48, "max_seq_len": 64, **kw})
    return build_model(cfg).eval()


def _lively():
    """A tiny model with larger weights than the 0.02 init, whose output depends on its input (varied greedy
    text instead of one repeated token; virtual tokens that can move the loss)."""
    base = _tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return base


def _peft_method(peft, ref, method: str, projection: bool = False):
    if method == "prompt":
        pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:
        pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)
    return peft.get_peft_model(ref, pcfg).eval()


def _ours(model, method: str, projection: bool = False):
    if method == "prompt":
        return apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=P))
    return apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection))


def _real_logits(peft_model, method, ids, mask=None):
    out = peft_model(input_ids=ids, attention_mask=None if mask is None else mask.long()).logits
    return out[:, P:] if method == "prompt" else out  # peft's prompt tuning also returns the virtual positions


def _ragged():
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False  # right padding, as the SFT data
    return ids, mask


# ---- parity with peft ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_logits_and_gradients_match_peft(method):
    transformers, peft = need("transformers"), need("peft")
    ref, base = llama_twins(transformers)
    pm = _peft_method(peft, ref, method)
    ours = _ours(base, method)
    mark_only_prompt_trainable_(ours)
    peft_weight = pm.prompt_encoder.default.embedding.weight
    load_prompt_state_dict_(ours, {"prompt" if method == "prompt" else "prefix": peft_weight.detach()})
    ids, mask = _ragged()
    d = {}
    for m in (None, mask):
        sel = torch.ones_like(mask) if m is None else mask
        want, got = _real_logits(pm, method, ids, m), ours(ids, attention_mask=m)
        d[m is None] = (want - got)[sel].abs().max().item()
        F.cross_entropy(want[sel], ids[sel]).backward()
        F.cross_entropy(got[sel], ids[sel]).backward()
    ours_grad = next(p.grad for p in ours.parameters() if p.requires_grad)
    d_grad = (ours_grad - peft_weight.grad).abs().max().item()
    with torch.no_grad():
        lift = (ours(ids) - base(ids)).abs().max().item()
    print(f"peft {method}: max|dlogits| {d[True]:.1e} (padded {d[False]:.1e}), max|dgrad| {d_grad:.1e}, "
          f"effect of the virtual tokens {lift:.2f}")
    assert d[True] < TOL and d[False] < TOL and d_grad < TOL and lift > 100 * TOL
    # negative control: real tokens at positions 0.. instead of P.. (peft's convention) must fail the check
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])[None].expand(2, -1) - P  # the wrapper adds P back: 0..T-1
        bad = (ours(ids, position_ids=pos) - _real_logits(pm, method, ids)).abs().max().item()
    assert bad > 100 * TOL


@pytest.mark.parametrize("method,projection", [("prompt", False), ("prefix", False), ("prefix", True)])
def test_adapter_written_by_llmlab_loads_in_peft(tmp_path, method, projection):
    transformers, peft = need("transformers"), need("peft")
    ref, base = llama_twins(transformers)
    ours = _ours(base, method, projection)
    folder = peft_prompt.save_prompt_adapter(tmp_path / "a", ours, base_model="tiny-llama")
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    loaded = peft.PeftModel.from_pretrained(ref, folder).eval()
    ids, mask = _ragged()
    with torch.no_grad():
        d = (_real_logits(loaded, method, ids, mask) - ours(ids, attention_mask=mask))[mask].abs().max().item()
    print(f"llmlab {method} (projection={projection}) adapter in peft: max|dlogits| {d:.1e}")
    assert d < TOL


@pytest.mark.parametrize("method,projection", [("prompt", False), ("prefix", False), ("prefix", True)])
def test_adapter_written_by_peft_loads_in_llmlab(tmp_path, method, projection):
    transformers, peft = need("transformers"), need("peft")
    ref, base = llama_twins(transformers)
    pm = _peft_method(peft, ref, method, projection)
    if projection:  # peft's zero-init-free MLP is random already; the saved prefix is its output
        assert any("transform" in k for k, _ in pm.named_parameters())
    pm.save_pretrained(tmp_path / "from_peft")
    ours = peft_prompt.load_prompt_adapter(base, tmp_path / "from_peft")
    assert isinstance(ours, PromptTunedLM if method == "prompt" else PrefixTunedLM)
    ids, mask = _ragged()
    with torch.no_grad():
        d = (_real_logits(pm, method, ids, mask) - ours(ids, attention_mask=mask))[mask].abs().max().item()
    print(f"peft {method} (projection={projection}) adapter in llmlab: max|dlogits| {d:.1e}")
    assert d < TOL


# ---- the wrappers in the llmlab stack -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_masks_and_padding(method):
    """A (B, T, S) per-query mask (what the SFT loss passes) equals the (B, S) key mask; a right-padded row
    equals the row alone; lm_head on the hidden states gives the logits."""
    ours = _ours(_tiny(), method)
    ids = torch.randint(0, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    per_query = causal[None] & mask[:, None, :]  # (B, T, S)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = ours(ids, attention_mask=per_query)
        alone = ours(ids[1:, :6])
        h = ours(ids, attention_mask=per_query, return_hidden=True)
    assert a.shape == (2, 10, 96) and h.shape == (2, 10, 32)
    assert (a - b)[mask].abs().max() < TOL
    assert (a[1, :6] - alone[0]).abs().max() < TOL
    assert (ours.lm_head(h) - b).abs().max() < TOL
    # a packed row (two examples, block-diagonal mask, positions restarting) equals separate forwards: each
    # example sees the virtual tokens at 0..P-1 and itself from P on
    doc = torch.tensor([0] * 4 + [1] * 6)
    packed = (causal & (doc[:, None] == doc[None, :]))[None]  # (1, T, S)
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]  # (1, T)
    with torch.no_grad():
        got = ours(ids[:1], attention_mask=packed, position_ids=pos)
        sep = torch.cat([ours(ids[:1, :4]), ours(ids[:1, 4:])], dim=1)
    assert (got - sep).abs().max() < TOL


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_attention_paths_agree(method):
    """Every attention impl (reference, sdpa, flash) and a short call (the decode path) give the same logits."""
    ours = _ours(_lively(), method)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = ours(ids)
        assert (ours(ids[:, :3]) - want[:, :3]).abs().max() < TOL  # T <= 4 without a cache: grouped_attention
        for impl in ("reference", "flash"):
            ours.set_attn_impl(impl)
            assert (ours(ids) - want).abs().max() < TOL, impl


def _manual_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_equals_full_forwards(method):
    ours = _ours(_lively(), method)
    prompts = [[5, 9, 3, 17, 2, 40, 8], [11, 4, 6]]  # a ragged (left-padded) batch
    outs = generate(ours, prompts, 12)
    for prompt, out in zip(prompts, outs):
        assert out.ids == _manual_greedy(ours, prompt, 12)
    assert outs[0].ids != generate(ours.base_model, prompts[:1], 12)[0].ids  # the virtual tokens matter
    beams = beam_search(ours, prompts[0], 6, num_beams=1)
    assert beams[0].ids[-6:] == _manual_greedy(ours, prompts[0], 6)
    assert ours.config.max_seq_len == 64 - P  # generation's budget leaves room for the virtual tokens
    long = list(range(1, 64 - P))
    assert len(generate(ours, [long], 5)[0].ids) == 1


@pytest.mark.parametrize("method,projection", [("prompt", False), ("prefix", False), ("prefix", True)])
def test_training_reduces_loss_and_changes_only_the_method(method, projection):
    base = _lively().train()
    ours = _ours(base, method, projection)
    n = mark_only_prompt_trainable_(ours)
    expected = {("prompt", False): P * 32, ("prefix", False): P * 2 * 2 * 16,
                ("prefix", True): P * 16 + (16 * 16 + 16) + (16 * 64 + 64)}[(method, projection)]
    assert n == expected
    frozen = {k: v.detach().clone() for k, v in base.state_dict().items()}
    before = {k: v.clone() for k, v in prompt_state_dict(ours).items()}
    ids = torch.randint(0, 96, (4, 16))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        hidden = ours(ids[:, :-1], return_hidden=True)  # (B, T, dim): the SFT loss's call
        loss = F.cross_entropy(ours.lm_head(hidden).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in base.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(not torch.equal(v, before[k]) for k, v in prompt_state_dict(ours).items())


def test_text_init_and_state_round_trip(tmp_path):
    class Tok:
        def encode(self, text):
            return [3, 1, 4]

    base = _tiny()
    ours = apply_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=P, init="text", init_text="abc"),
                               tokenizer=Tok())
    assert torch.equal(ours.prompt, base.embed_tokens.weight[[3, 1, 4, 3, 1]])  # repeated, then cut (peft)
    with pytest.raises(LlmlabError, match="needs the model's tokenizer"):
        apply_prompt_tuning(_tiny(), PromptTuningConfig(init="text", init_text="abc"))
    folder = peft_prompt.save_prompt_adapter(tmp_path / "a", ours)
    again = peft_prompt.load_prompt_adapter(_tiny(), folder)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_prefix_text_init_is_the_text_read_by_the_model():
    """Prefix init "text": at step 0 the model's logits for x are the base model's logits for text + x
    (the text's keys/values are the prefix; x sits at positions P..). Random init is not (negative control)."""

    class Tok:
        def encode(self, text):
            return [7, 2, 9]

    base = _lively()
    ours = apply_prefix_tuning(base, PrefixTuningConfig(num_virtual_tokens=P, init="text", init_text="x"),
                               tokenizer=Tok())
    ids = torch.randint(0, 96, (2, 6))
    text = torch.tensor([[7, 2, 9, 7, 2]]).expand(2, P)
    with torch.no_grad():
        want = base(torch.cat([text, ids], dim=1))[:, P:]
        torch.testing.assert_close(ours(ids), want, rtol=1e-5, atol=1e-5)
        rand = apply_prefix_tuning(_lively(), PrefixTuningConfig(num_virtual_tokens=P))
        assert (rand(ids) - want).abs().max() > 1e-2
    with pytest.raises(LlmlabError, match="needs the model's tokenizer"):
        apply_prefix_tuning(_tiny(), PrefixTuningConfig(init="text", init_text="abc"))


def test_bad_input(tmp_path):
    prefix_folder = peft_prompt.save_prompt_adapter(tmp_path / "prefix", _ours(_tiny(), "prefix"))
    prompt_folder = peft_prompt.save_prompt_adapter(tmp_path / "prompt", _ours(_tiny(), "prompt"))
    # adapters for another base: one line naming the file, the tensor, expected vs got
    with pytest.raises(LlmlabError, match=r"adapter_model.safetensors: prompt_embeddings has shape \(5, 32\), "
                                          r"this model needs \(5, 48\)"):
        peft_prompt.load_prompt_adapter(_tiny(dim=48), prompt_folder)
    with pytest.raises(LlmlabError, match="num_layers 2 but this model has 3"):
        peft_prompt.load_prompt_adapter(_tiny(n_layers=3), prefix_folder)
    with pytest.raises(LlmlabError, match="token_dim 16 but this model's keys are 4 heads x 8 = 32"):
        peft_prompt.load_prompt_adapter(_tiny(n_kv_heads=4), prefix_folder)
    conf_path = prefix_folder / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "num_virtual_tokens": 7}))
    with pytest.raises(LlmlabError, match=r"has shape \(5, 64\), this model needs \(7, 64\)"):
        peft_prompt.load_prompt_adapter(_tiny(), prefix_folder)
    conf_path.write_text(json.dumps({**conf, "peft_type": "LORA"}))
    with pytest.raises(LlmlabError, match="peft_type 'LORA' is not one of .*load_adapter_"):
        peft_prompt.load_prompt_adapter(_tiny(), prefix_folder)
    conf_path.write_text(json.dumps({**conf, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(LlmlabError, match="task_type 'SEQ_2_SEQ_LM' is not supported"):
        peft_prompt.load_prompt_adapter(_tiny(), prefix_folder)
    conf_path.write_text("{not json")
    with pytest.raises(LlmlabError, match="adapter_config.json"):
        peft_prompt.load_prompt_adapter(_tiny(), prefix_folder)
    (prompt_folder / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(LlmlabError, match="not a safetensors file"):
        peft_prompt.load_prompt_adapter(_tiny(), prompt_folder)
    (prompt_folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LlmlabError, match="no adapter_model.safetensors"):
        peft_prompt.load_prompt_adapter(_tiny(), prompt_folder)
    with pytest.raises(LlmlabError, match="num_virtual_tokens must be a positive integer"):
        apply_prefix_tuning(_tiny(), PrefixTuningConfig(num_virtual_tokens=0))
    with pytest.raises(LlmlabError, match="already has prompt or prefix tuning"):
        apply_prompt_tuning(_ours(_tiny(), "prefix"), PromptTuningConfig())
    with pytest.raises(LlmlabError, match="leaves no room"):
        apply_prompt_tuning(_tiny(), PromptTuningConfig(num_virtual_tokens=64))
