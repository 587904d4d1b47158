"""PPO and GRPO (train/ppo.py): each loss piece against hand-computed values, GRPO's loss against TRL's own
``GRPOTrainer._compute_loss``, the KL estimators against the exact KL on a tiny vocabulary (also through the
rollout code on a tiny model), a toy bandit where PPO and GRPO raise the reward, exact resume inside an iteration
(the rollout travels in the checkpoint), the command's bad input (one line, exit 2) and the README's lines."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict

import pytest
import torch

from conftest import need
from llmlab.common import LlmlabError
from llmlab.train.ppo import (
    PolicyValue,
    PPOConfig,
    PPOTask,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from test_sft import tiny_folder, tiny_tokenizer  # noqa: F401  (tiny_folder: a fixture)

# ---- the pieces, by hand ----------------------------------------------------------------------------------


def test_gae_by_hand():
    """gamma 0.9, lam 0.8 on a reply at positions 1..3 (position 0 is prompt: ignored)."""
    rewards = torch.tensor([[5.0, 0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: 1.0 - 0.3 = 0.7; t=2: -0.2 + 0.9*0.3 - 0.4 + 0.72*0.7 = 0.174; t=1: 0.1 + 0.9*0.4 - 0.5 + 0.72*0.174
    expected = torch.tensor([[0.0, 0.08528, 0.174, 0.7]], dtype=torch.float64)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, torch.tensor([[0.0, 0.58528, 0.574, 1.0]], dtype=torch.float64), atol=1e-12)


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 99.0], dtype=torch.float64)
    out = masked_whiten(x, torch.tensor([True, True, True, False]))  # mean 2, unbiased variance 1
    assert torch.allclose(out, torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-7)


def test_clipped_policy_loss_by_hand():
    """ratios 0.5 (A=1: unclipped), 1.1 (A=-1: inside), 1.5 (A=2: clipped to 1.2), clip 0.2."""
    ratios = torch.tensor([[0.5, 1.1, 1.5]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), clip=0.2)
    assert math.isclose(float(loss), (-0.5 + 1.1 - 2.4) / 3, rel_tol=1e-12)
    assert math.isclose(stats["clipfrac"], 1 / 3, rel_tol=1e-6) and math.isclose(
        stats["approx_kl"], float((0.5 * ratios.log() ** 2).mean()), rel_tol=1e-9)
    loss.backward()  # d/dlogp of -A r where unclipped is -A r / 3; zero where the clip holds
    assert torch.allclose(logp.grad, torch.tensor([[-0.5 / 3, 1.1 / 3, 0.0]], dtype=torch.float64), atol=1e-12)


def test_clipped_value_loss_by_hand():
    """V 1.0, V_old 0.5, clip 0.2 -> V_clipped 0.7: R 0 keeps (1 - 0)^2 = 1, R 2 takes (0.7 - 2)^2 = 1.69."""
    v = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    ret = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    loss = ppo_value_loss(v, old, ret, torch.ones(1, 2, dtype=torch.bool), clip_value=0.2)
    assert math.isclose(float(loss), 0.5 * (1.0 + 1.69) / 2, rel_tol=1e-12)


def test_group_advantages_by_hand_and_as_trl():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(scores, 4)
    # group 1: mean 0.25, unbiased std 0.5; group 2: all equal -> 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    assert torch.allclose(adv[:4], expected, atol=1e-6) and torch.all(adv[4:] == 0)
    trl_utils = need("trl.trainer.utils")
    g = scores.view(-1, 4)
    trl = (scores - g.mean(1).repeat_interleave(4)) / (trl_utils.nanstd(g, dim=1).repeat_interleave(4) + 1e-4)
    assert torch.allclose(adv, trl, atol=1e-7)


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_grpo_loss_equals_trl_compute_loss(kl_coef):
    """TRL 1.16's GRPOTrainer._compute_loss (loss_type "grpo", token-level ratios) on the same log-probabilities,
    advantages and masks: the same loss and the same gradient. TRL's trainer is replaced by a namespace with the
    attributes that method reads; its model forward by the log-probabilities themselves."""
    trl_grpo = need("trl.trainer.grpo_trainer")
    g = torch.Generator().manual_seed(0)
    N, T, clip = 6, 5, 0.2
    old = -2 * torch.rand(N, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    new = old + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)  # some ratios outside [0.8, 1.2]
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4, 1:] = False
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 3).double()

    ours_logp = new.clone().requires_grad_(True)
    ours, _ = grpo_loss(ours_logp, old, ref, adv, mask, clip, kl_coef)
    ours.backward()

    trl_logp = new.clone().requires_grad_(True)
    acc = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                reduce=lambda x, reduction="sum": x, sync_gradients=True)
    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=kl_coef,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="grpo", epsilon_low=clip,
        epsilon_high=clip, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, accelerator=acc,
        _get_per_token_logps_and_entropies=lambda *a, **k: (trl_logp, torch.zeros_like(trl_logp), None))
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()
    assert math.isclose(float(ours), float(theirs), rel_tol=1e-12, abs_tol=1e-14)
    assert torch.allclose(ours_logp.grad, trl_logp.grad, atol=1e-12)


def test_kl_estimators_against_the_exact_kl_on_a_tiny_vocabulary():
    """k1 and k3 averaged over samples of p estimate KL(p || q) = sum p log p/q; k3 is never negative."""
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                                       dtype=torch.float64)
    logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    exact = float((logp.exp() * (logp - logq)).sum())
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    k1, k3 = kl_estimate(logp[x], logq[x], "k1"), kl_estimate(logp[x], logq[x], "k3")
    assert exact > 0.1 and abs(float(k1.mean()) - exact) < 0.02 and abs(float(k3.mean()) - exact) < 0.02
    assert bool((k3 >= 0).all()) and bool((k1 < 0).any())  # k1 is unbiased but single samples go negative
    assert abs(float(kl_estimate(logp[x], logq[x], "k2").mean()) - exact) > 1e-3  # k2 is biased: a distinct number


# ---- a tiny policy: the rollout code, a bandit, resume ------------------------------------------------------

TARGET, PROMPT = 13, [1, 2, 3]  # token 13: p = 0.059 at the start (the tiny policy below)


def _tiny_policy(value_head=True, seed=0, lora_noise=0.0):
    from llmlab.models.config import ModelConfig
    from llmlab.models.decoder import DecoderLM
    from llmlab.nn.lora import LoRAConfig, apply_lora_, mark_only_lora_trainable_

    cfg = ModelConfig(arch="llama", vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=16, tie_embeddings=True, eos_token_id=15).validate()
    torch.manual_seed(seed)
    lm = DecoderLM(cfg)
    with torch.no_grad():
        lm.norm.weight.fill_(4.0)  # logits of a useful range (the random tiny model's are nearly uniform)
    apply_lora_(lm, LoRAConfig(r=4, alpha=32, target_modules="all-linear"))
    mark_only_lora_trainable_(lm)
    if lora_noise:
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, lora_noise)
    return PolicyValue(lm, cfg.dim, value_head=value_head), cfg


def _bandit_task(algo="ppo", seed=0, **kw):
    model, cfg = _tiny_policy(value_head=algo == "ppo", seed=seed)

    def reward_fn(split, idx, replies):
        s = torch.tensor([float(r[0] == TARGET) for r in replies])
        return s, s

    pc = PPOConfig(algo=algo, rollout_batch=8, group_size=4, ppo_epochs=2, max_new_tokens=1, kl_coef=0.01,
                   eval_examples=0, **kw).validate()
    return PPOTask(model, types.SimpleNamespace(config=cfg), {"train": [PROMPT], "val": [PROMPT]}, reward_fn, pc, 0,
                   0, {15}, 8)


def _train(task, run_dir, steps, resume=False):
    from llmlab.train.loop import TrainConfig, train

    tc = TrainConfig(steps=steps, batch_size=8, lr=5e-2, warmup=0, eval_every=0, save_every=0, weight_decay=0.0,
                     schedule="constant", progress=False, seed=0)
    train(task, tc, run_dir, resume=resume)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_kl_of_the_rollout_code_matches_the_exact_kl():
    """Through PPOTask's own sampling and scoring (policy = LoRA on, reference = LoRA off): the mean of the per-reply
    KL estimates over 3,000 one-token replies is the exact KL of the two next-token distributions."""
    model, cfg = _tiny_policy(lora_noise=0.3)
    pc = PPOConfig(rollout_batch=8, max_new_tokens=1, eval_examples=0).validate()
    task = PPOTask(model, types.SimpleNamespace(config=cfg), {"train": [PROMPT] * 3000, "val": []},
                   lambda s, i, r: (torch.zeros(len(r)), torch.zeros(len(r))), pc, 0, 0, set(), 8)
    idx = list(range(3000))
    r = task.score_replies("train", idx, task._replies("train", idx, greedy=False, seed=1))
    mask = r["labels"] != -100
    k1 = (kl_estimate(r["old_logps"], r["ref_logps"], "k1") * mask).sum(1)
    k3 = (kl_estimate(r["old_logps"], r["ref_logps"], "k3") * mask).sum(1)
    from llmlab.nn.lora import lora_disabled

    with torch.no_grad():
        logp = model.lm(torch.tensor([PROMPT]))[0, -1].double().log_softmax(-1)
        with lora_disabled(model):
            logq = model.lm(torch.tensor([PROMPT]))[0, -1].double().log_softmax(-1)
    exact = float((logp.exp() * (logp - logq)).sum())
    assert exact > 0.05, exact
    assert abs(float(k1.mean()) - exact) < 0.15 * exact and abs(float(k3.mean()) - exact) < 0.15 * exact


def _target_prob(model):
    with torch.no_grad():
        device = next(model.parameters()).device  # training moves the model to a GPU where there is one
        return float(model.lm(torch.tensor([PROMPT], device=device))[0, -1].softmax(-1)[TARGET])


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_bandit_reward_rises(tmp_path, algo):
    """One prompt, one-token replies, reward 1 for token 13 (p = 0.059 at the start): 40 minibatch steps (20
    rollouts of 8) raise the policy's exact probability of the rewarded token several times over, and the
    rollouts' reward with it. The clip lets each rollout move the ratio by about 1.2, so the rise is gradual."""
    task = _bandit_task(algo)
    p0 = _target_prob(task.model)
    rows = _train(task, tmp_path / algo, 40)
    p1 = _target_prob(task.model)
    late = sum(r["reward"] for r in rows[-6:]) / 6  # the last 3 rollouts
    assert p0 < 0.07 and p1 > 4 * p0 and late > 0.15 and rows[0]["reward"] <= 0.125, (p0, p1, late)
    assert rows[-1]["kl"] > 0  # the policy left the reference (LoRA off) behind


def test_resume_inside_an_iteration_is_exact(tmp_path):
    """5 steps (the first of the third rollout's two), then resumed to 8, equal 8 uninterrupted steps: the rollout
    is restored from the checkpoint, not sampled again from the moved policy."""
    whole = _train(_bandit_task(), tmp_path / "whole", 8)
    _train(_bandit_task(), tmp_path / "cut", 5)
    resumed = _train(_bandit_task(), tmp_path / "cut", 8, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(whole[5:], resumed[5:]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6, abs_tol=1e-9) and a["reward"] == b["reward"]


def test_bad_config_values():
    for kwargs, message in [({"clip": 0.0}, "--clip must be a positive number"), ({"clip": -1.0}, "--clip"),
                            ({"clip_value": 0.0}, "--clip-value"), ({"kl_coef": -0.1}, "--kl-coef must be >= 0"),
                            ({"kl_coef": float("nan")}, "--kl-coef"),
                            ({"algo": "grpo", "group_size": 1}, "--group-size must be >= 2"),
                            ({"algo": "grpo", "group_size": 3, "rollout_batch": 16}, "multiple of --group-size"),
                            ({"gamma": 1.5}, "--gamma"), ({"ppo_epochs": 0}, "--ppo-epochs")]:
        with pytest.raises(LlmlabError, match=message):
            PPOConfig(**kwargs).validate()


# ---- the command -----------------------------------------------------------------------------------------


def _main(capsys, *args) -> tuple[int, str, str]:
    from llmlab.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["--steps", "2", "--batch-size", "2", "--rollout-batch", "4", "--max-new-tokens", "3", "--eval-examples",
         "2", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--clip", "0"], "--clip must be a positive number, got 0.0"),
    (["--kl-coef", "-0.5"], "--kl-coef must be >= 0, got -0.5"),
    (["--algo", "grpo", "--group-size", "1"], "--group-size must be >= 2 for grpo"),
    (["--rollout-batch", "6", "--batch-size", "4"], "--rollout-batch 6 must be a multiple of --batch-size 4"),
    (["--task", "no_such_task"], "no_such_task"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_folder, tmp_path, capsys, args, message):  # noqa: F811
    code, _, err = _main(capsys, "ppo", "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL, *args)
    lines = [line for line in err.splitlines() if line.startswith("llmlab: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]


def test_cli_process_bad_input_no_traceback():
    """At process level: exit status 2, one line, no traceback (the flags are checked before any model loads)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmlab", "ppo", "--algo", "grpo", "--group-size", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == ("llmlab: error: --group-size must be >= 2 for grpo (advantages "
                                                      "are relative to the group), got 1")


def test_cli_reward_model_checks(tiny_folder, tmp_path, capsys):  # noqa: F811
    """--reward-model must be a reward run, and one with the policy's tokenizer."""
    code, _, err = _main(capsys, "ppo", "--model", str(tiny_folder), "--reward-model", str(tmp_path), "--out",
                         str(tmp_path / "run"), *SMALL)
    assert code == 2 and "not an llmlab reward run" in err and len(err.strip().splitlines()) == 1, err[-2000:]
    from llmlab.formats import hf
    from llmlab.models.decoder import DecoderLM
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.chat import CHATML
    from llmlab.tokenizer.pretokenize import GGUF_PRE
    from test_sft import SPECIALS, tiny_config

    shifted = {c: (i + 7) % 256 for i, c in enumerate(bytes_to_unicode().values())}  # the same bytes, other ids
    specials = {t: 256 + k for k, t in enumerate(SPECIALS)}
    other = ByteBPE({**shifted, **specials}, [], GGUF_PRE["gpt2"], specials, eos_id=specials["<|im_end|>"],
                    use_tokenizers_lib=False)
    folder = tmp_path / "other-tok"
    torch.manual_seed(0)
    cfg = tiny_config()
    sd = {k: v for k, v in DecoderLM(cfg).state_dict().items() if k != "lm_head.weight"}
    hf.write_folder(folder, cfg, sd, tokenizer_json=other.to_hf_json(),
                    tokenizer_config={"chat_template": CHATML, "eos_token": "<|im_end|>"})
    rm = tmp_path / "rm"
    code, _, err = _main(capsys, "reward", "--model", str(folder), "--out", str(rm), "--steps", "1", "--batch-size",
                         "2", "--pairs", "2", "--val-pairs", "0", "--no-progress")
    assert code == 0, err[-2000:]
    code, _, err = _main(capsys, "ppo", "--model", str(tiny_folder), "--reward-model", str(rm), "--out",
                         str(tmp_path / "run"), *SMALL)
    lines = [line for line in err.splitlines() if line.startswith("llmlab: error:")]
    assert code == 2 and len(lines) == 1 and "uses another tokenizer than the policy" in lines[0], err[-2000:]


README_LINES = [["reward"], ["ppo"], ["ppo", "--algo", "grpo", "--group-size", "4"],
                ["ppo", "--reward-model", "runs/reward"]]


def test_readme_lines_are_these():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for args in README_LINES:
        line = " ".join(["llmlab", *args])
        assert any(x.split("#")[0].strip() == line for x in readme.splitlines()), line


def test_readme_commands_run_as_written(tiny_folder, tmp_path, capsys):  # noqa: F811
    """The README's reward / ppo lines in order, on the tiny model with a small budget; ``runs/reward`` is the
    reward run the first line made."""
    runs = tmp_path / "runs"
    code, out, err = _main(capsys, "reward", "--model", str(tiny_folder), "--out", str(runs / "reward"), "--steps",
                           "2", "--batch-size", "2", "--pairs", "4", "--val-pairs", "2", "--no-progress")
    assert code == 0 and "validation pairs: reward accuracy" in out, err[-2000:]
    assert (runs / "reward" / "reward_head.safetensors").exists()
    for i, args in enumerate(README_LINES[1:]):
        args = [str(runs / "reward") if a == "runs/reward" else a for a in args]
        run = tmp_path / f"ppo{i}"
        code, out, err = _main(capsys, *args, "--model", str(tiny_folder), "--out", str(run), *SMALL)
        assert code == 0 and "held-out exact match" in out, err[-2000:]
        s = json.loads((run / "summary.json").read_text())
        assert s["steps"] == 2 and s["saved"] and set(s["after"]) >= {"accuracy", "reward", "kl", "kl_k3"}
        assert (run / "rl_curves.png").exists() and (run / "adapter" / "adapter_config.json").exists()
        train_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        assert {"reward", "kl", "accuracy", "policy_loss", "clipfrac"} <= set(train_rows[-1])
        if "--reward-model" in args:
            assert s["reward_model"] == str(runs / "reward") and s["before"]["reward"] != 0.0
