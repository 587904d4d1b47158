"""DPO (train/dpo.py, data/preferences.py): the losses against the papers' formulas and gradient, sequence
log-probabilities against the full-logits formula, the stored reference against the adapter-off one, pairs
from the built-in tasks, the preference file's bad input (named with its line), the command (one line, exit 2
for bad input; a short run end to end; the README's lines as written). Parity with TRL: test_dpo_parity.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.data.preferences import perturb_answer, read_preferences, task_pairs, tokenize_pair
from llmlab.data.tasks import TASKS, get_task
from llmlab.tokenizer.chat import CHATML, ChatTemplate
from llmlab.train.dpo import DPOConfig, DPOTask, dpo_loss, pair_batch, reference_logps, sequence_logps
from test_sft import tiny_folder, tiny_tokenizer  # noqa: F401  (tiny_folder: a fixture)


def _logps(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(-5 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(i < 2) for i in range(4)]


# ---- the losses ------------------------------------------------------------------------------------------


def test_sigmoid_loss_and_gradient_are_the_papers():
    """Rafailov et al. eq. 7, and its gradient (section 4): d loss / d log pi(y_w) = -beta sigmoid(r_l - r_w)."""
    pw, pl, rw, rl = _logps()
    beta = 0.3
    losses, r_w, r_l = dpo_loss(pw, pl, rw, rl, beta=beta)
    for i in range(len(pw)):
        h = (pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item())
        assert math.isclose(float(losses[i]), math.log1p(math.exp(-beta * h)), rel_tol=1e-12)
        assert math.isclose(float(r_w[i]), beta * (pw[i].item() - rw[i].item()), rel_tol=1e-12)
    losses.sum().backward()
    expected = -beta * torch.sigmoid(r_l - r_w)
    assert torch.allclose(pw.grad, expected, atol=1e-12) and torch.allclose(pl.grad, -expected, atol=1e-12)


def test_conservative_dpo_is_the_flipped_label_mixture():
    pw, pl, rw, rl = _logps(1)
    eps, beta = 0.2, 0.5
    ours, _, _ = dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=eps)
    clean, _, _ = dpo_loss(pw, pl, rw, rl, beta=beta)
    flipped, _, _ = dpo_loss(pl, pw, rl, rw, beta=beta)
    assert torch.allclose(ours, (1 - eps) * clean + eps * flipped, atol=1e-12)
    assert not torch.allclose(ours, clean)


def test_ipo_loss_is_azar_eq17_per_token():
    """(h - 1/(2 tau))^2 with each log-ratio averaged over its reply's tokens; zero at the target margin."""
    pw, pl, rw, rl = _logps(2, n=3)
    nw, nl = torch.tensor([2, 3, 1]), torch.tensor([4, 1, 5])
    tau = 0.25
    losses, _, _ = dpo_loss(pw, pl, rw, rl, beta=tau, loss="ipo", chosen_tokens=nw, rejected_tokens=nl)
    for i in range(3):
        h = (float(pw[i]) - float(rw[i])) / int(nw[i]) - (float(pl[i]) - float(rl[i])) / int(nl[i])
        assert math.isclose(float(losses[i]), (h - 1 / (2 * tau)) ** 2, rel_tol=1e-12)
    one = torch.tensor([0.0], dtype=torch.float64)
    at_target, _, _ = dpo_loss(one + 2.0, one, one, one, beta=tau, loss="ipo", chosen_tokens=torch.tensor([1]),
                               rejected_tokens=torch.tensor([1]))
    assert float(at_target) == 0.0
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(pw, pl, rw, rl, beta=tau, loss="ipo")


def test_nll_term_is_the_chosen_tokens_mean():
    """RPO (Pang et al. 2024): alpha times the batch's mean NLL per chosen token, spread over the pairs so that
    their mean is it; the rewards are DPO's."""
    pw = torch.tensor([-3.0, -8.0, -1.5], dtype=torch.float64)
    pl, rw, rl = pw - 1.0, pw + 0.2, pw - 0.4
    nw = torch.tensor([2, 5, 1])
    plain, r_w, _ = dpo_loss(pw, pl, rw, rl, beta=0.1)
    alpha = 0.7
    with_nll, r_w2, _ = dpo_loss(pw, pl, rw, rl, beta=0.1, nll_weight=alpha, chosen_tokens=nw)
    assert math.isclose(float((with_nll - plain).mean()), alpha * 12.5 / 8, rel_tol=1e-12)  # (3 + 8 + 1.5) / 8 tokens
    assert torch.equal(r_w, r_w2)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(pw, pl, rw, rl, beta=0.1, nll_weight=alpha)


# ---- log-probabilities and the reference -----------------------------------------------------------------


def _tiny_pairs(n=4, seq_len=128):
    tok, template = tiny_tokenizer(), ChatTemplate(CHATML)
    return [tokenize_pair(p, tok, template, seq_len)[0] for p in task_pairs("addition", "train", n, 0)], tok


def _tiny_model(seed=0):
    from llmlab.models.decoder import DecoderLM
    from test_sft import tiny_config

    torch.manual_seed(seed)
    return DecoderLM(tiny_config()).double()


def test_sequence_logps_equal_the_full_logits_formula():
    pairs, tok = _tiny_pairs()
    model = _tiny_model()
    batch = pair_batch(pairs, tok.eos_id)
    ours = sequence_logps(model, batch)
    logits = model(batch.input_ids)  # (2B, T, V): every position, no padding mask (right padding, causal)
    exs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for row, ex in enumerate(exs):
        lp = F.log_softmax(logits[row], -1)
        expected = sum(float(lp[t, ex.ids[t + 1]]) for t in range(len(ex.ids) - 1) if ex.mask[t + 1])
        assert math.isclose(float(ours[row]), expected, rel_tol=1e-10)


def _shared_prompt_pairs():
    """The addition pairs, plus one whose chosen reply is the start of the rejected one ("12" / "123": after the
    cut at the last target, chosen is a prefix of rejected) and one with different first reply tokens."""
    from llmlab.data.preferences import PreferencePair

    pairs, tok = _tiny_pairs(3)
    template = ChatTemplate(CHATML)
    for i, (c, r) in enumerate((("12", "123"), ("teal", "a cat"))):
        raw = PreferencePair([{"role": "user", "content": "Say a thing."}], [{"role": "assistant", "content": c}],
                             [{"role": "assistant", "content": r}], f"pair {i}")
        pairs.append(tokenize_pair(raw, tok, template, 128)[0])
    return pairs, tok


@pytest.mark.parametrize("arch, method, tol", [("gpt2", "full", 1e-10), ("gpt2", "lora", 1e-10),
                                               ("llama", "full", 2e-6)])
def test_shared_prompt_logps_and_gradients_equal_the_plain_rows(arch, method, tol):
    """The packed rows (each prompt once, train/dpo.py's SharedPrompt) give the log-probabilities and the
    gradients of the plain (2B, T) rows, in float64: with every weight training (the tied head's gradient
    recomputed by the chunked head) and with LoRA (a frozen head). The packed rows hold fewer tokens. GPT-2
    (learned positions) agrees to float64 rounding; Llama's RoPE angles are computed in float32 (nn/rope.py),
    where the vectorised and the scalar cos / sin differ in the last bit, so a position placed at another offset
    of the row (the rejected rest) rounds differently: float32-sized differences there."""
    from dataclasses import replace

    from llmlab.models.decoder import DecoderLM
    from llmlab.nn.lora import LoRAConfig, apply_lora_, mark_only_lora_trainable_
    from test_sft import tiny_config

    pairs, tok = _shared_prompt_pairs()
    torch.manual_seed(0)
    model = DecoderLM(tiny_config() if arch == "llama" else replace(tiny_config(), arch="gpt2", n_kv_heads=4)).double()
    if method == "lora":
        apply_lora_(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
        mark_only_lora_trainable_(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    batch = pair_batch(pairs, tok.eos_id)
    plain = type(batch)(batch.input_ids, batch.labels)  # no SharedPrompt: the (2B, T) rows
    assert batch.shared.input_ids.numel() < 0.75 * batch.input_ids.numel()
    weights = torch.linspace(-2, 3, 2 * len(pairs), dtype=torch.float64)  # a different gradient per sequence
    results = []
    for b in (batch, plain):
        lp = sequence_logps(model, b)  # (2B,)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((lp.detach(), torch.autograd.grad((lp * weights).sum(), params)))
    (ours, g_ours), (want, g_want) = results
    torch.testing.assert_close(ours, want, rtol=tol, atol=tol)
    assert len(g_ours) == len(g_want) > 0
    for a, c in zip(g_ours, g_want):
        torch.testing.assert_close(a, c, rtol=tol, atol=tol * float(c.abs().max()))


def test_shared_prompt_longer_than_the_context_falls_back_to_plain_rows():
    """A packed row longer than the model's context would stop the forward: those batches run as plain rows."""
    pairs, tok = _tiny_pairs()  # a pair whose replies differ from the first token: its packed row is the longest
    model = _tiny_model()
    batch = pair_batch(pairs, tok.eos_id)
    want = sequence_logps(model, batch)
    model.config.max_seq_len = batch.input_ids.shape[1]
    assert batch.shared.input_ids.shape[1] > model.config.max_seq_len
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(batch.shared.input_ids)
    torch.testing.assert_close(sequence_logps(model, batch), want, rtol=1e-12, atol=1e-12)


def test_stored_reference_equals_the_adapter_off_reference():
    """With LoRA, the precomputed log-probabilities and the base with LoRA switched off give the same loss at
    every step (the reference is the start), and the loss starts at log 2 (the policy is the reference)."""
    from llmlab.nn.lora import LoRAConfig, apply_lora_, mark_only_lora_trainable_

    pairs, tok = _tiny_pairs()
    model = _tiny_model()
    apply_lora_(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    mark_only_lora_trainable_(model)
    stored = {"train": reference_logps(model, pairs, tok.eos_id, "float32").double()}
    loaded = type("L", (), {"config": model.config})
    pre = DPOTask(model, loaded, {"train": pairs}, stored, DPOConfig(), 0, tok.eos_id)
    off = DPOTask(model, loaded, {"train": pairs}, None, DPOConfig(reference="adapter-off"), 0, tok.eos_id)
    loss0, _ = pre.loss(model, 0, 0, 4, 4)
    assert math.isclose(float(loss0), math.log(2), rel_tol=1e-9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # the policy moves away from the reference
    a, _ = pre.loss(model, 1, 0, 4, 4)
    b, _ = off.loss(model, 1, 0, 4, 4)
    assert abs(float(a) - math.log(2)) > 1e-4 and math.isclose(float(a), float(b), rel_tol=1e-9)
    assert set(pre.aux_stats()) == {"rewards_chosen", "rewards_rejected", "margin", "accuracy"}


# ---- pairs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_pairs_chosen_right_rejected_wrong(name):
    task = get_task(name)
    pairs = task_pairs(name, "train", 30, 3)
    assert len(pairs) == 30
    for p in pairs:
        right, wrong = p.chosen[0]["content"], p.rejected[0]["content"]
        assert task.score(right, right) and not task.score(wrong, right) and wrong.strip()
    assert task_pairs(name, "train", 30, 3) == pairs  # seeded


def test_perturbed_answers_are_near_misses():
    import random

    rng = random.Random(0)
    assert abs(int(perturb_answer("2419", rng)) - 2419) in (1, 2, 10)
    moved = perturb_answer("tmzqk", rng)
    assert len(moved) == 5 and moved != "tmzqk"
    obj = json.loads(perturb_answer('{"city": "Lima", "year": 1987}', rng))
    assert set(obj) == {"city", "year"} and obj != {"city": "Lima", "year": 1987}


def _write(tmp_path, lines, name="prefs.jsonl"):
    f = tmp_path / name
    f.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return f


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def test_preference_file_standard_and_conversational(tmp_path):
    conv = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}]}
    pairs = read_preferences([str(_write(tmp_path, [GOOD, conv]))])
    assert pairs[0].prompt == [{"role": "user", "content": "What is 2 + 2?"}]
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"] and pairs[1].where.endswith(":2")
    tp, cut = tokenize_pair(pairs[1], tiny_tokenizer(), ChatTemplate(CHATML), 256)
    assert not cut and tp.chosen.ids[:tp.prompt_len] == tp.rejected.ids[:tp.prompt_len]
    assert not any(tp.chosen.mask[:tp.prompt_len]) and tp.chosen.mask[tp.prompt_len]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "prefs.jsonl:2: missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "prefs.jsonl:2: missing 'prompt'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "prefs.jsonl:2: 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "prefs.jsonl:2: 'rejected' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "prefs.jsonl:2: 'chosen' and 'rejected' are identical"),
    ({"prompt": "q", "chosen": 4, "rejected": "b"}, "prefs.jsonl:2: 'chosen' is a int"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "only assistant messages"),
    ("{not json", "prefs.jsonl:2: invalid JSON"),
    ("[1, 2]", "prefs.jsonl:2: expected a JSON object"),
])
def test_preference_file_bad_records_name_their_line(tmp_path, record, message):
    f = _write(tmp_path, [GOOD, record])
    with pytest.raises(LlmlabError, match=None) as e:
        read_preferences([str(f)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_prompt_over_the_context_is_an_error(tmp_path):
    pairs = read_preferences([str(_write(tmp_path, [{"prompt": "x " * 100, "chosen": "a", "rejected": "b"}]))])
    with pytest.raises(LlmlabError, match=r"prefs.jsonl:1: the prompt is \d+ tokens, no room for a reply"):
        tokenize_pair(pairs[0], tiny_tokenizer(), ChatTemplate(CHATML), 64)


def test_bad_config_values():
    for kwargs, message in [({"beta": 0.0}, "--beta"), ({"beta": -1.0}, "--beta"), ({"beta": float("nan")}, "--beta"),
                            ({"label_smoothing": 0.5}, "--label-smoothing"),
                            ({"nll_weight": -0.1}, "--nll-weight"), ({"nll_weight": float("inf")}, "--nll-weight"),
                            ({"loss": "ipo", "label_smoothing": 0.1}, "--label-smoothing"),
                            ({"reference": "adapter-off", "method": "full"}, "adapter-off"),
                            ({"loss": "hinge"}, "--loss")]:
        with pytest.raises(LlmlabError, match=message):
            DPOConfig(**kwargs).validate()


# ---- the command -----------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmlab", "dpo", *args], capture_output=True, text=True, timeout=600)


def _main(capsys, *args) -> tuple[int, str, str]:
    """``llmlab dpo ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from llmlab.cli import main

    code = main(["dpo", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


SMALL = ["--steps", "2", "--batch-size", "2", "--pairs", "8", "--val-pairs", "2", "--eval-examples", "2",
         "--eval-tokens", "2", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--beta", "0"], "--beta must be a positive number, got 0.0"),
    (["--beta", "-0.5"], "--beta must be a positive number"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
    (["--nll-weight", "-1"], "--nll-weight must be a number >= 0, got -1.0"),
    (["--reference", "adapter-off", "--method", "full"], "--reference adapter-off needs LoRA"),
    (["--task", "no_such_task"], "no_such_task"),
    (["--seq-len", "8"], "no room for a reply in --seq-len 8"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_folder, tmp_path, capsys, args, message):  # noqa: F811
    code, _, err = _main(capsys, "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL, *args)
    lines = [line for line in err.splitlines() if line.startswith("llmlab: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, ":2: missing 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, ":2: 'chosen' and 'rejected' are identical"),
    ({"prompt": "q", "chosen": "", "rejected": "a"}, ":2: 'chosen' is empty"),
])
def test_cli_bad_preference_file_exit_2(tiny_folder, tmp_path, capsys, record, message):  # noqa: F811
    f = _write(tmp_path, [GOOD, record])
    code, _, err = _main(capsys, str(f), "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err[-2000:]


def test_cli_process_bad_input_no_traceback(tiny_folder, tmp_path):  # noqa: F811
    """The same at process level: exit status 2, one line, no traceback."""
    r = _cli("--model", str(tiny_folder), "--out", str(tmp_path / "run"), "--beta", "0")
    assert r.returncode == 2 and r.stderr.strip() == "llmlab: error: --beta must be a positive number, got 0.0"


def test_cli_on_a_file_end_to_end_and_resume(tiny_folder, tmp_path, capsys):  # noqa: F811
    """`llmlab dpo pairs.jsonl`: trains, logs the DPO metrics, saves an adapter that load() takes; a rerun with
    more steps resumes and reuses the stored reference."""
    f = _write(tmp_path, [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "!"} for w in
                          ["yes", "no", "maybe", "ok", "fine", "sure", "never", "always"]])
    run = tmp_path / "run"
    code, _, err = _main(capsys, str(f), "--model", str(tiny_folder), "--out", str(run), *SMALL, "--eval-examples",
                         "0")
    assert code == 0, err[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and s["pairs"] == 6 and s["task"] is None and s["reference"] == "precompute"
    assert set(s["val_pairs"]) == {"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"}
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all({"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(t) for t in train)
    # the first step's policy is the reference (equal up to the kernels' rounding: exactly 0 on the CPU, ~2e-7 on a
    # GPU whose training forward may pick other matmul algorithms than the no-grad reference pass)
    assert math.isclose(train[0]["loss"], math.log(2), rel_tol=1e-5) and abs(train[0]["margin"]) < 1e-5
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "reference_logps.safetensors").exists()
    from llmlab.api import load

    assert load(str(run)).generate("Say yes.", max_new_tokens=2) is not None
    stamp = (run / "reference_logps.safetensors").stat().st_mtime_ns
    code, out, err = _main(capsys, str(f), "--model", str(tiny_folder), "--out", str(run), *SMALL, "--eval-examples",
                           "0", "--steps", "3")
    assert code == 0 and "resuming from" in out, out[-2000:] + err[-2000:]
    assert (run / "reference_logps.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_training_raises_the_reward_accuracy(tiny_folder, tmp_path, capsys):  # noqa: F811
    """A few full fine-tuning steps at a large learning rate on 4 pairs: the loss falls well below log 2 and the
    chosen replies out-reward the rejected ones (the pull works, in the right direction)."""
    run = tmp_path / "run"
    code, _, err = _main(capsys, "--model", str(tiny_folder), "--out", str(run), "--method", "full", "--lr", "3e-3",
                         "--steps", "12", "--batch-size", "4", "--pairs", "4", "--val-pairs", "0", "--eval-examples",
                         "0", "--warmup", "0", "--no-progress")
    assert code == 0, err[-2000:]
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert train[-1]["loss"] < 0.75 * math.log(2) and train[-1]["accuracy"] == 1.0 and train[-1]["margin"] > 0


README_DPO = [[], ["--loss", "ipo", "--beta", "0.5"], ["--label-smoothing", "0.1", "--reference", "adapter-off"],
              ["--nll-weight", "1"], ["--method", "qlora", "--task", "reversal"]]


def test_readme_dpo_lines_are_these():
    """The README's `llmlab dpo` lines are the ones the next test runs."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for args in README_DPO:
        line = " ".join(["llmlab dpo", *args])
        assert any(x.split("#")[0].strip() == line for x in readme.splitlines()), line


@pytest.mark.parametrize("args", README_DPO)
def test_readme_dpo_commands_run_as_written(tiny_folder, tmp_path, capsys, args):  # noqa: F811
    """The README's `llmlab dpo ...` lines, on the tiny model with a small budget."""
    code, _, err = _main(capsys, *args, "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *SMALL)
    assert code == 0, err[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 and s["saved"] and s["accuracy_after"] is not None


@pytest.mark.slow
def test_dpo_command_on_smollm2_small_budget(smollm_path, tmp_path):
    """`llmlab dpo` with no flags but a small budget, on the real SmolLM2-135M-Instruct + LoRA, in its own
    process as a user runs it."""
    run = tmp_path / "dpo"
    r = _cli("--steps", "1", "--batch-size", "2", "--pairs", "2", "--val-pairs", "1", "--eval-examples", "2",
             "--eval-tokens", "4", "--out", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out exact match" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == "lora" and s["task"] == "addition" and s["steps"] == 1 and s["reference"] == "precompute"
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "accuracy.png").exists()
