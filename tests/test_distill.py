"""llmlab distill: the KD losses against hand-computed values and ``F.kl_div``'s conventions, the gradient of
Hinton's tau^2 loss, bad input (one line, exit 2), short runs of every loss on tiny models with SmolLM2's
tokenizer (resume, a pruned student keeping its zeros; MiniLLM's teacher-mixed sampler and training step), and the
README's lines. Parity of GKD's generalized JSD with TRL: test_distill_parity.py; MiniLLM's estimator:
test_minillm.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab.train import distill_losses as L

# ---- the losses: hand-computed values and F.kl_div's conventions ----------------------------------------------------

S = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])  # student logits (N=2, V=3)
T = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.5, -0.5]])  # teacher logits


def _probs(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_by_hand(tau):
    fwd = sum(_kl(_probs(t, tau), _probs(s, tau)) for s, t in zip(S.tolist(), T.tolist())) / 2 * tau ** 2
    rev = sum(_kl(_probs(s, tau), _probs(t, tau)) for s, t in zip(S.tolist(), T.tolist())) / 2 * tau ** 2
    assert L.forward_kl(S, T, tau).item() == pytest.approx(fwd, rel=1e-6)
    assert L.reverse_kl(S, T, tau).item() == pytest.approx(rev, rel=1e-6)
    # F.kl_div(input = log Q, target = log P) is KL(P || Q); batchmean over (N, V) = the mean over positions
    ref = F.kl_div(F.log_softmax(S / tau, -1), F.log_softmax(T / tau, -1), log_target=True, reduction="batchmean")
    assert L.forward_kl(S, T, tau).item() == pytest.approx(tau ** 2 * ref.item(), rel=1e-6)
    ref = F.kl_div(F.log_softmax(T / tau, -1), F.log_softmax(S / tau, -1), log_target=True, reduction="batchmean")
    assert L.reverse_kl(S, T, tau).item() == pytest.approx(tau ** 2 * ref.item(), rel=1e-6)


def test_generalized_jsd_by_hand_and_its_ends():
    beta = 0.3
    want = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        p_s, p_t = _probs(s), _probs(t)
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        want += beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
    assert L.generalized_jsd(S, T, beta).item() == pytest.approx(want / 2, rel=1e-6)
    assert L.generalized_jsd(S, T, 0.0).item() == pytest.approx(L.forward_kl(S, T).item(), rel=1e-6)
    assert L.generalized_jsd(S, T, 1.0).item() == pytest.approx(L.reverse_kl(S, T).item(), rel=1e-6)
    assert L.generalized_jsd(S, S, beta).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_is_tau_times_the_probability_gap():
    """Hinton et al., section 2: d/dz_S of tau^2 KL(p_T^tau || p_S^tau) = tau (p_S^tau - p_T^tau) (per position;
    the mean over N positions divides by N)."""
    tau = 2.0
    s = S.clone().requires_grad_(True)
    L.forward_kl(s, T, tau).backward()
    want = tau * (torch.softmax(S / tau, -1) - torch.softmax(T / tau, -1)) / S.shape[0]
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-7)


def test_hidden_mse_and_layer_map_by_hand():
    h_s = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    h_t = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    mse = ((0 ** 2 + 2 ** 2 + 2 ** 2 + 0 ** 2) / 4) / ((1 + 0 + 4 + 1) / 4)
    assert L.hidden_mse(h_s, h_t).item() == pytest.approx(mse)
    assert L.layer_map(4, 12) == [0, 3, 6, 9, 12]  # TinyBERT's g(m) = 3m
    assert L.layer_map(4, 30) == [0, 8, 15, 22, 30]
    assert L.layer_map(2, 2) == [0, 1, 2]


@pytest.mark.parametrize("call", [lambda: L.forward_kl(S, T, 0.0), lambda: L.reverse_kl(S, T, -1.0),
                                  lambda: L.generalized_jsd(S, T, 1.5), lambda: L.generalized_jsd(S, T, -0.1)])
def test_loss_functions_reject_bad_parameters(call):
    from llmlab.common import LlmlabError

    with pytest.raises(LlmlabError):
        call()


# ---- the task on tiny models with SmolLM2's tokenizer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tiny_chat, tmp_path_factory):
    """(teacher: tiny_chat, a dim-64 x 2-block Llama with SmolLM2's tokenizer, loaded; shards of the stdlib's json
    package in that tokenizer)."""
    import sysconfig

    from llmlab.data.shards import PrepareConfig, TokenShards, prepare
    from llmlab.formats.load import load_model

    out = tmp_path_factory.mktemp("distill") / "shards"
    lib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    prepare(PrepareConfig(inputs=[str(p) for p in sorted(lib.glob("*.py"))], out=str(out), tokenizer=str(tiny_chat),
                          val_fraction=0.2), show_progress=False)
    return load_model(tiny_chat), TokenShards(out)


def _student(teacher, dim=32, n_layers=1, seed=1):
    """A dim-32 x 1-block student over the teacher's vocabulary, as a preset would load (no tokenizer)."""
    from llmlab.formats.load import Loaded
    from llmlab.models.registry import build_model

    cfg = replace(teacher.config, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1, head_dim=None,
                  ffn_dim=2 * dim)
    cfg.__post_init__()
    torch.manual_seed(seed)
    return Loaded(build_model(cfg), cfg, None, None, "tiny-student", "preset")


def _task(parts, loss, *, seq_len=32, **options):
    from llmlab.train.distill import DistillConfig, DistillTrainConfig, build_task

    teacher, shards = parts
    cfg = DistillConfig(loss=loss, gen_tokens=8, **options).validate()
    tcfg = DistillTrainConfig(steps=2, batch_size=2, seq_len=seq_len, eval_batches=1, warmup=0, progress=False,
                              device="cpu")
    return build_task(cfg, tcfg, teacher, _student(teacher), shards), tcfg


@pytest.mark.parametrize("loss", ["kd", "reverse-kl", "gkd", "hidden", "ce"])
def test_each_loss_is_its_formula_on_the_right_positions(parts, loss):
    """One batch of each loss, recomputed from the two models' logits: every position of the data windows for
    kd / hidden / off-policy, only the positions that predicted sampled tokens on-policy (and the window's
    prefix kept); gradients reach the student (and the projections)."""
    task, tcfg = _task(parts, loss, lmbda=1.0, ce_weight=0.5, temperature=2.0)
    teacher, shards = parts
    value, n = task.loss(task.model, 0, 0, 2, 2)
    value.backward()
    x, y = shards.batch(0, 2, 32, seed=tcfg.seed)
    student = task.model.student
    stats = task.aux_stats()
    if loss == "ce":
        want = F.cross_entropy(student(x).reshape(-1, 49152), y.reshape(-1))
        assert stats == {} and value.item() == pytest.approx(want.item(), rel=1e-5)
        return
    with torch.no_grad():
        if loss in ("reverse-kl", "gkd"):
            xs = task.sample_continuations(x, 0, 0)  # the same seeded samples the loss drew
            assert stats["on_policy"] and torch.equal(xs[:, :24], x[:, :24]) and not torch.equal(xs, x)
            s, t = student(xs)[:, 23:31], teacher.model(xs)[:, 23:31]  # the logits that predicted tokens 24..31
            s, t = s.reshape(-1, 49152), t.reshape(-1, 49152)
            distill = L.reverse_kl(s, t, 2.0) if loss == "reverse-kl" else L.generalized_jsd(s, t, 0.5, 2.0)
            want = distill  # no hard labels for sampled tokens
            assert "ce" not in stats
        else:
            s, t = student(x).reshape(-1, 49152), teacher.model(x).reshape(-1, 49152)
            distill = L.forward_kl(s, t, 2.0)
            want = distill + 0.5 * F.cross_entropy(s, y.reshape(-1)) + stats.get("hidden", 0.0)
    assert stats["distill"] == pytest.approx(distill.item(), rel=1e-4)
    assert value.item() == pytest.approx(want.item(), rel=1e-4) and n == 64
    assert student.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    if loss == "hidden":
        assert len(task.model.proj) == 2 and task.teacher_layers == [0, 2]  # embeddings, block 1 -> block 2
        assert all(p.weight.shape == (64, 32) and p.weight.grad.abs().sum() > 0 for p in task.model.proj)


def test_mixed_sampler_matches_a_loop_without_cache(parts):
    """sample_mixed (both models on KV caches) draws the same tokens as full forwards of the growing sequence with
    the same seeded generator."""
    from llmlab.infer.generate import prefill_logits
    from llmlab.train.minillm import sample_mixed

    teacher, shards = parts
    task, tcfg = _task(parts, "minillm")
    student = task.model.student.eval()
    x, _ = shards.batch(0, 2, 32, seed=tcfg.seed)
    prefix = x[:, :12]
    got = sample_mixed(student, teacher.model, prefix, 3, 0.4, torch.Generator().manual_seed(7))
    g, seq = torch.Generator().manual_seed(7), prefix
    with torch.no_grad():
        for _ in range(3):  # the last position's logits of the whole sequence, no cache
            mix = 0.6 * prefill_logits(student, seq).softmax(-1) + 0.4 * prefill_logits(teacher.model, seq).softmax(-1)
            seq = torch.cat([seq, torch.multinomial(mix, 1, generator=g)], dim=1)
    assert torch.equal(got, seq) and torch.equal(got[:, :12], prefix)


def test_distill_minillm_step_is_the_formula(parts):
    """One training batch of --loss minillm: the teacher-mixed continuation after the window's prefix, the loss
    recomputed from the two models' logits at the positions that predicted the sampled tokens, the metrics, the
    --ce-weight term on the data window, gradients reaching the student. The loss's samples are redrawn here
    from (seed, step, row): exact resume."""
    from llmlab.train import minillm as M

    teacher, shards = parts
    task, tcfg = _task(parts, "minillm", ce_weight=0.5)
    value, n = task.loss(task.model, 0, 0, 2, 2)
    value.backward()
    x, y = shards.batch(0, 2, 32, seed=tcfg.seed)
    student = task.model.student
    stats = task.aux_stats()
    with torch.no_grad():
        xs = task.sample_continuations(x, 0, 0)
        assert torch.equal(xs[:, :24], x[:, :24]) and not torch.equal(xs, x)
        terms = M.minillm_loss(student(xs)[:, 23:31], teacher.model(xs)[:, 23:31], xs[:, 24:], 0.2, True, "token",
                               baseline=True)
        ce = F.cross_entropy(student(x).reshape(-1, 49152), y.reshape(-1))
    assert stats["on_policy"] and stats["distill"] == pytest.approx(terms.loss.item(), rel=1e-4)
    assert stats["single_step"] == pytest.approx(terms.single, rel=1e-4)
    assert stats["long_term"] == pytest.approx(terms.long, rel=1e-3, abs=1e-6)
    assert stats["reward"] == pytest.approx(terms.reward, rel=1e-4) and stats["weight_max"] > 0
    assert value.item() == pytest.approx(terms.loss.item() + 0.5 * ce.item(), rel=1e-4) and n == 64
    assert student.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_gkd_trains_and_resumes_exactly(parts, tmp_path):
    """Through the training loop: the loss falls; removing the last checkpoint and training again resumes at step
    2 and gives the uninterrupted run's losses (the batches, the student's samples and the on-policy coin are
    functions of (seed, step))."""
    import shutil

    from llmlab.train.loop import train

    def run():
        task, tcfg = _task(parts, "gkd", lmbda=0.5)
        tcfg.steps, tcfg.save_every, tcfg.lr = 4, 2, 1e-2
        train(task, tcfg, tmp_path)
        rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["on_policy"]) for r in rows if r["kind"] == "train"]

    first = run()
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    assert run() == first and {p for _, _, p in first} == {True, False}
    assert first[-1][1] < first[0][1]


def test_pruned_student_keeps_its_zeros(parts):
    """A student with zeroed weights (as llmlab prune leaves them): AdamW steps change the other weights and
    leave exactly those zeros."""
    from llmlab.train.distill import keep_zeros_
    from llmlab.train.optim import build_adamw

    task, _ = _task(parts, "kd", keep_zeros=False)
    up = task.model.student.layers[0].mlp.up_proj.weight
    assert keep_zeros_(task.model.student) == 0  # random weights: nothing to keep
    with torch.no_grad():
        up[:, ::2] = 0.0
    assert keep_zeros_(task.model.student) == 1
    before = up.detach().clone()
    opt = build_adamw(task.model, 1e-2, 0.1)
    for step in range(2):
        task.loss(task.model, step, 0, 2, 2)[0].backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(up == 0, before == 0) and not torch.equal(up, before)


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------------------


def test_tokenizer_checks(parts, smollm_path):
    """A student (or shards) whose ids mean other tokens is refused, even at the same vocabulary size."""
    from llmlab.common import LlmlabError
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf
    from llmlab.tokenizer.bpe import ByteBPE
    from llmlab.train.distill import check_same_tokenizer

    teacher, _ = parts
    tok = tokenizer_from_gguf(GGUFFile(smollm_path), use_tokenizers_lib=False)
    vocab = dict(tok.vocab)
    a, b = tok.id_to_token[1000], tok.id_to_token[1001]
    vocab[a], vocab[b] = 1001, 1000  # two ordinary tokens' ids exchanged
    swapped = ByteBPE(vocab, tok.merges, tok.pre_steps, tok.special_tokens, use_tokenizers_lib=False)
    student = _student(teacher)
    check_same_tokenizer(teacher, replace(student, tokenizer=tok), tok)  # the same tokenizer: accepted
    with pytest.raises(LlmlabError, match="uses a different tokenizer than the teacher"):
        check_same_tokenizer(teacher, replace(student, tokenizer=swapped))
    with pytest.raises(LlmlabError, match="the --data shards were tokenized with a different tokenizer"):
        check_same_tokenizer(teacher, student, swapped)


def _main(capsys, *args) -> tuple[int, str, str]:
    from llmlab.cli import main

    code = main(["distill", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["--temperature", "-2"], "--temperature must be a positive number, got -2.0"),
    (["--loss", "gkd", "--beta", "1.5"], "--beta 1.5 is outside [0, 1]"),
    (["--loss", "gkd", "--beta", "-0.1"], "--beta -0.1 is outside [0, 1]"),
    (["--loss", "gkd", "--lmbda", "2"], "--lmbda 2.0 is outside [0, 1]"),
    (["--loss", "reverse-kl", "--gen-tokens", "32", "--seq-len", "32"], "--gen-tokens 32 must be smaller than "
                                                                        "--seq-len 32"),
    (["--loss", "minillm", "--teacher-mix", "1"], "--teacher-mix 1.0 is outside [0, 1)"),
    (["--loss", "minillm", "--temperature", "2"], "--temperature 2 with --loss minillm"),
    (["--loss", "kd", "--whiten"], "--whiten with --loss kd: it whitens MiniLLM's long-term rewards"),
    (["--teacher", "TINY", "--student", "llama-tiny"], "has a vocabulary of 512 tokens, the teacher 49152: teacher "
                                                       "and student must share the tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_chat, tmp_path, capsys, args, message):
    args = [str(tiny_chat) if a == "TINY" else a for a in args]
    code, _, err = _main(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_unknown_loss_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _main(capsys, "--loss", "mse")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'mse'" in err and len(err.strip().splitlines()) == 1


# ---- the README's lines ----------------------------------------------------------------------------------------------

README_DISTILL = [["--loss", "ce", "--out", "runs/distill-ce"], ["--out", "runs/distill-kd"]]


def test_readme_distill_lines_are_these():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for args in README_DISTILL:
        line = " ".join(["llmlab distill", *args])
        assert any(x.split("#")[0].strip() == line for x in readme.splitlines()), line


@pytest.mark.parametrize("args", README_DISTILL)
def test_readme_distill_commands_run_as_written(parts, smollm_path, tmp_path, capsys, args):
    """The README's lines with the real teacher (SmolLM2-135M-Instruct) and the smollm2-tiny student, on small
    shards in SmolLM2's tokenizer and a small budget; the saved student loads and generates."""
    from llmlab.api import load

    _, shards = parts
    out = tmp_path / "run"
    code, stdout, err = _main(capsys, *args, "--data", str(shards.folder), "--out", str(out), "--steps", "1",
                              "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress")
    assert code == 0, err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["student"] == "smollm2-tiny" and s["teacher"] == "smollm2-135m-instruct" and s["steps"] == 1
    assert s["loss"] == ("ce" if "ce" in args else "kd") and f"held-out perplexity {s['val_ppl']:.2f}" in stdout
    llm = load(str(out / "model"))
    assert (llm.config.dim, llm.config.n_layers, llm.config.vocab_size) == (256, 4, 49152)
    assert isinstance(llm.generate("def ", max_new_tokens=2), str)


def test_low_rank_student_trains_its_factors_and_stays_low_rank(parts, tiny_chat, tmp_path, capsys):
    """A student from llmlab lowrank: the factors train, and model/ is a low-rank folder again."""
    from llmlab.api import load
    from llmlab.cli import main
    from llmlab.formats.convert import write_loaded

    teacher, shards = parts
    write_loaded(replace(_student(teacher, dim=64), tokenizer=teacher.tokenizer), tmp_path / "student")
    assert main(["lowrank", str(tmp_path / "student"), "--rank", "8", "--layers", "mlp", "--out",
                 str(tmp_path / "lr"), "--no-progress"]) == 0
    code, _, err = _main(capsys, "--teacher", str(tiny_chat), "--student", str(tmp_path / "lr"), "--data",
                         str(shards.folder), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                         "--seq-len", "32", "--eval-batches", "1", "--lr", "1e-2", "--no-progress")
    assert code == 0, err[-2000:]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["lowrank_config"]["modules"] == {f"layers.0.mlp.{n}": 8 for n in ("gate_proj", "up_proj",
                                                                                      "down_proj")}
    before, after = load(str(tmp_path / "lr")).model, load(str(tmp_path / "run" / "model")).model
    assert type(after.layers[0].mlp.up_proj).__name__ == "LowRankLinear"
    assert not torch.equal(before.layers[0].mlp.up_proj.up.weight, after.layers[0].mlp.up_proj.up.weight)
