"""DPO parity with TRL (train/dpo.py vs trl.DPOTrainer's loss on the same batch and weights, float64).

A tiny random Llama exists twice with the same weights: as a transformers model inside a real ``DPOTrainer``
(with a separate reference model) and as the llmlab model (with the reference log-probabilities precomputed
and stored, llmlab's default). On the same pairs, the loss, the implicit rewards (TRL's logged means of
chosen / rejected rewards, margins and accuracies) and every weight's gradient agree to 1e-6 for the sigmoid
(DPO), label-smoothed (conservative DPO) and IPO losses, and with RPO's NLL term added (``--nll-weight``: TRL's
``loss_type=[..., "sft"]``, ``loss_weights=[1, alpha]``). TRL >= 1.0 has no label smoothing in its sigmoid loss,
so conservative DPO is checked as TRL's sigmoid loss on the pairs, weighted 1 - eps, plus TRL's sigmoid loss on
the swapped pairs, weighted eps (the definition: the label is flipped with probability eps). Skips when trl
is missing (pip install -e '.[test]').
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import llama_twins, need
from llmlab.data.preferences import PreferencePair, tokenize_pair
from llmlab.formats import hf
from llmlab.models import build_model
from llmlab.tokenizer.chat import CHATML, ChatTemplate
from llmlab.train.dpo import DPOConfig, DPOTask, pair_batch, reference_logps

PROMPTS = [("What is 2 + 3?", "5", "6"), ("Reverse abc.", "cba", "cab"), ("Name a color.", "teal", "a cat"),
           ("Say hi twice.", "hi hi", "hello")]


def _tokenizer():
    from test_sft import tiny_tokenizer

    return tiny_tokenizer()


def _twins(transformers):
    """(ref_hf, policy_hf, ref_ours, policy_ours) in float64: the policy is the reference moved by noise."""
    ref_hf, ref_ours = llama_twins(transformers)
    policy_hf = copy.deepcopy(ref_hf)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy_hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    policy_ours = build_model(ref_ours.config)
    policy_ours.load_state_dict(hf.state_from_hf(ref_ours.config, policy_hf.state_dict()))
    return ref_hf.double(), policy_hf.double(), ref_ours.double(), policy_ours.double().train()


def _trl_batch(pairs, pad_id):
    """TRL's collated input for our pairs: [chosen; rejected], right-padded, with attention and completion masks."""
    batch = pair_batch(pairs, pad_id)
    exs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = batch.input_ids.shape[1]
    attention = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in exs])
    completion = torch.tensor([[int(m) for m in e.mask] + [0] * (T - len(e.ids)) for e in exs])
    return {"input_ids": batch.input_ids, "attention_mask": attention, "completion_mask": completion}


def _trl_loss(trl, transformers, policy_hf, ref_hf, tmp_path, loss_type: str, beta: float, inputs, swapped=None,
              eps: float = 0.0, nll: float = 0.0):
    """TRL's loss (sigmoid / ipo; conservative DPO composed as in the module docstring), its backward into
    ``policy_hf``, and TRL's logged metrics of the unswapped batch."""
    from datasets import Dataset
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer().to_hf_json()),
                                               eos_token="<|im_end|>", pad_token="<|im_end|>")
    ds = Dataset.from_dict({"prompt": [p for p, _, _ in PROMPTS], "chosen": [c for _, c, _ in PROMPTS],
                            "rejected": [r for _, _, r in PROMPTS]})
    types, weights = ([loss_type, "sft"], [1.0, nll]) if nll else ([loss_type], None)  # RPO: TRL's sft loss added
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=types, loss_weights=weights,
                         use_cpu=True, bf16=False,
                         fp16=False, report_to="none", precompute_ref_log_probs=False, gradient_checkpointing=False,
                         max_length=None)
    trainer = trl.DPOTrainer(model=policy_hf, ref_model=ref_hf, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    if swapped is not None:
        loss = (1 - eps) * loss + eps * trainer.compute_loss(trainer.model, swapped)
    loss.backward()
    return loss.detach(), metrics


@pytest.mark.parametrize("loss_type, beta, eps, nll", [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0),
                                                       ("ipo", 0.3, 0.0, 0.0), ("sigmoid", 0.1, 0.0, 1.0),
                                                       ("ipo", 0.3, 0.0, 0.5)])
def test_loss_rewards_and_gradients_equal_trl(tmp_path, loss_type, beta, eps, nll):
    transformers = need("transformers")
    trl = need("trl")
    need("datasets")
    need("tokenizers")
    tok = _tokenizer()
    template = ChatTemplate(CHATML)
    raw = [PreferencePair([{"role": "user", "content": p}], [{"role": "assistant", "content": c}],
                          [{"role": "assistant", "content": r}], f"pair {i}") for i, (p, c, r) in enumerate(PROMPTS)]
    pairs = [tokenize_pair(p, tok, template, 128)[0] for p in raw]
    pad_id = tok.eos_id
    ref_hf, policy_hf, ref_ours, policy_ours = _twins(transformers)

    # llmlab: the reference log-probabilities precomputed and stored, then one loss on the policy
    stored = {"train": reference_logps(ref_ours, pairs, pad_id, "float32").double()}
    cfg = DPOConfig(loss=loss_type, beta=beta, label_smoothing=eps, nll_weight=nll, method="full")
    task = DPOTask(policy_ours.requires_grad_(True), _Loaded(policy_ours.config), {"train": pairs}, stored, cfg, 0,
                   pad_id)
    losses, r_w, r_l, _ = task.pair_loss(policy_ours, list(range(len(pairs))))
    ours = losses.mean()
    ours.backward()

    inputs = _trl_batch(pairs, pad_id)
    swapped = None
    if eps:
        flipped = [type(p)(p.rejected, p.chosen, p.prompt_len, p.where) for p in pairs]
        swapped = _trl_batch(flipped, pad_id)
    theirs, metrics = _trl_loss(trl, transformers, policy_hf, ref_hf, tmp_path, loss_type, beta, inputs, swapped, eps,
                                nll)

    ours = ours.detach()
    assert ours.dtype == torch.float64 and abs(float(ours) - float(theirs)) <= 1e-6, (float(ours), float(theirs))
    assert abs(float(r_w.mean()) - metrics["rewards/chosen"]) <= 1e-6
    assert abs(float(r_l.mean()) - metrics["rewards/rejected"]) <= 1e-6
    assert abs(float((r_w - r_l).mean()) - metrics["rewards/margins"]) <= 1e-6
    assert abs(float((r_w > r_l).double().mean()) - metrics["rewards/accuracies"]) <= 1e-6
    assert float(r_w.abs().max()) > 1e-3  # the policy differs from the reference: the rewards are not all zero

    theirs_grads = hf.state_from_hf(policy_ours.config, {k: p.grad for k, p in policy_hf.named_parameters()
                                                         if p.grad is not None})
    checked = 0
    for name, p in policy_ours.named_parameters():
        if name == "lm_head.weight" and name not in theirs_grads:
            continue
        g = theirs_grads[name]
        assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6, rtol=0), \
            (name, float((p.grad - g).abs().max()))
        checked += 1
    assert checked == len(list(policy_ours.parameters()))


class _Loaded:
    """What ``SFTTask`` reads of a loaded model: its config."""

    def __init__(self, config):
        self.config = config
