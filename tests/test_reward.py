"""The reward model (train/reward.py): the Bradley-Terry loss by hand, parity with TRL's RewardTrainer loss on
transformers' LlamaForSequenceClassification with the same weights, the head reading the last real token
(padding changes nothing), and the command's bad input (one line, exit 2). The README's `llmlab reward` line
runs in tests/test_ppo.py (before the PPO line that uses its result)."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from conftest import llama_twins, need
from llmlab.common import LlmlabError
from llmlab.train.reward import RewardLM, bradley_terry_loss, load_reward_model, sequences_batch
from test_sft import tiny_folder  # noqa: F401  (a fixture)


def test_bradley_terry_by_hand():
    losses, correct = bradley_terry_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 2.0]))
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0)), math.log(2.0)]
    assert all(math.isclose(float(a), b, rel_tol=1e-6) for a, b in zip(losses, expected))
    assert correct.tolist() == [1.0, 0.0, 0.0]  # a tie is not a correct ranking


def test_head_reads_the_last_real_token():
    """A sequence scores the same alone and right-padded inside a batch of longer ones."""
    from llmlab.models.decoder import DecoderLM
    from test_sft import tiny_config

    torch.manual_seed(0)
    net = RewardLM(DecoderLM(tiny_config()), 64).double().eval()
    seqs = [[5, 6, 7], [5, 6, 7, 8, 9, 10], [1, 2]]
    ids, lengths = sequences_batch(seqs, 0)
    together = net(ids, lengths)
    alone = torch.cat([net(*sequences_batch([s], 0)) for s in seqs])
    assert torch.allclose(together, alone, atol=1e-10) and len(set(together.tolist())) == 3


def test_loss_and_gradients_equal_trl_reward_trainer():
    """TRL 1.16's RewardTrainer.compute_loss on transformers' LlamaForSequenceClassification (the model TRL trains:
    a ``score`` head on the last non-pad token) and RewardLM on the same weights, float64: the same rewards, loss
    and gradients (head and every base weight). TRL's trainer is replaced by a namespace with the attributes
    that method reads."""
    transformers = need("transformers")
    trl_reward = need("trl.trainer.reward_trainer")
    from llmlab.formats import hf

    causal, ours_lm = llama_twins(transformers)
    pad = 299  # an id the sequences never use, so "last non-pad token" = "last real token"
    cfg = transformers.LlamaConfig(**{**causal.config.to_dict(), "num_labels": 1, "pad_token_id": pad})
    theirs = transformers.LlamaForSequenceClassification(cfg)
    sd = {k: v for k, v in causal.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(3)
    theirs.score.weight.data.normal_(0, 0.1)
    theirs.load_state_dict({**sd, "score.weight": theirs.score.weight.data}, strict=True)
    theirs = theirs.double().train()
    ours = RewardLM(ours_lm, ours_lm.config.dim).double().train()
    ours.score.weight.data.copy_(theirs.score.weight.data)

    g = torch.Generator().manual_seed(0)
    chosen = [torch.randint(0, 290, (n,), generator=g).tolist() for n in (7, 4, 9)]
    rejected = [torch.randint(0, 290, (n,), generator=g).tolist() for n in (5, 8, 3)]
    ids, lengths = sequences_batch(chosen + rejected, pad)
    r_w, r_l = ours(ids, lengths).double().chunk(2)
    ours_loss = bradley_terry_loss(r_w, r_l)[0].mean()
    ours_loss.backward()

    attention = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    acc = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = types.SimpleNamespace(model=theirs, args=types.SimpleNamespace(center_rewards_coefficient=None),
                                 accelerator=acc, _total_train_tokens=0, _tp_size=1,
                                 _metrics={"train": defaultdict(list)})
    trl_loss, out = trl_reward.RewardTrainer.compute_loss(fake, theirs, {"input_ids": ids, "attention_mask": attention},
                                                          return_outputs=True)
    trl_loss.backward()
    t_w, t_l = out.logits.squeeze(-1).chunk(2)
    assert torch.allclose(r_w, t_w, atol=1e-10) and torch.allclose(r_l, t_l, atol=1e-10)
    assert math.isclose(float(ours_loss), float(trl_loss), rel_tol=1e-10)
    assert math.isclose(fake._metrics["train"]["accuracy"][-1], float((r_w > r_l).float().mean()))
    assert torch.allclose(ours.score.weight.grad, theirs.score.weight.grad, atol=1e-10)
    grads = {k: p.grad for k, p in theirs.named_parameters() if k != "score.weight"}
    grads["lm_head.weight"] = torch.zeros_like(causal.lm_head.weight)  # the LM head: unused by a reward model
    theirs_grads = hf.state_from_hf(ours_lm.config, grads)
    checked = 0
    for name, p in ours.lm.named_parameters():
        if p.grad is None:
            assert name == "lm_head.weight", name
            continue
        assert torch.allclose(p.grad, theirs_grads[name].double(), atol=1e-9), name
        checked += 1
    assert checked >= 10


def test_not_a_reward_run(tmp_path):
    with pytest.raises(LlmlabError, match="not an llmlab reward run"):
        load_reward_model(tmp_path)


# ---- the command -----------------------------------------------------------------------------------------


def _main(capsys, *args) -> tuple[int, str, str]:
    from llmlab.cli import main

    code = main(["reward", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["--steps", "1", "--batch-size", "2", "--pairs", "4", "--val-pairs", "2", "--no-progress"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, ":2: missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, ":2: missing 'prompt'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, ":2: 'chosen' and 'rejected' are identical"),
])
def test_cli_bad_preference_file_exit_2(tiny_folder, tmp_path, capsys, record, message):  # noqa: F811
    import json

    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}) + "\n" + json.dumps(record)
                 + "\n")
    code, _, err = _main(capsys, str(f), "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err[-2000:]


@pytest.mark.parametrize("args, message", [(["--lora-r", "0"], "--lora-r must be a positive integer"),
                                           (["--pairs", "0"], "--pairs must be >= 1")])
def test_cli_bad_flags_exit_2(tiny_folder, tmp_path, capsys, args, message):  # noqa: F811
    code, _, err = _main(capsys, "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err[-2000:]


def test_training_separates_chosen_from_rejected(tiny_folder, tmp_path, capsys):  # noqa: F811
    """A file of 6 pairs, 12 steps at a large learning rate: the training accuracy reaches 1 and the loss falls
    well below log 2; the saved run scores like the trained model (load_reward_model)."""
    import json

    f = tmp_path / "prefs.jsonl"
    words = ["yes", "no", "maybe", "fine", "sure", "never", "always"]
    f.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "!"}) + "\n"
                         for w in words))
    run = tmp_path / "run"
    code, _, err = _main(capsys, str(f), "--model", str(tiny_folder), "--out", str(run), "--steps", "12",
                         "--batch-size", "6", "--val-pairs", "1", "--lr", "1e-2", "--warmup", "0", "--no-progress")
    assert code == 0, err[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert rows[-1]["accuracy"] == 1.0 and rows[-1]["loss"] < 0.5 * math.log(2), rows[-1]
    rm = load_reward_model(run)
    s = json.loads((run / "summary.json").read_text())
    assert s["val_after"] and rm.pad_id == 257
