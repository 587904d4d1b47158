"""eval/hallucination.py (the MiniLLM claim's measures) on hand-made distributions and tiny models, and
benchmarks/distill_hallucination.py as the README runs it, with a tiny budget and tiny models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmlab.eval import hallucination as H

ROOT = Path(__file__).resolve().parents[1]


def test_unsupported_share_by_hand():
    lp = torch.tensor([0.5, 1e-4, 0.2, 5e-4, 1e-3, 0.9]).log()  # two of six below 1e-3 (1e-3 itself is not)
    assert H.unsupported_share(lp) == pytest.approx(2 / 6)
    assert H.unsupported_share(lp, epsilon=0.3) == pytest.approx(4 / 6)


class Bigram(nn.Module):
    """p(next | previous token) from a fixed (V, V) table of log-probabilities: logits (B, T, V)."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(logp)

    def forward(self, x):
        return self.table(x)


def _teacher_table(V=6):
    """After token i the teacher puts its mass on i, i+1, i+2 (mod 6) and 1e-6 on the other three together: those
    three are the void region, a different one in each context."""
    p = torch.full((V, V), 1e-6 / 3)
    for i in range(V):
        p[i, [i, (i + 1) % V, (i + 2) % V]] = (1 - 1e-6) * torch.tensor([0.5, 0.3, 0.2])
    return p.log()


def test_a_student_with_mass_where_the_teacher_has_none_scores_higher():
    """Hand-made distributions: a mode-seeking student (the teacher sharpened, p_T^2 renormalised) samples only
    supported tokens, U = 0; a covering student (uniform over 6 tokens, what forward KL pushes towards) writes the
    void half of the time: U is the student's mass on {p_T < eps} = 0.5, up to sampling noise over 6,000 tokens;
    teacher_logprobs reads the teacher's table at each (previous, sampled) pair."""
    table = _teacher_table()
    teacher = Bigram(table)
    g = torch.Generator().manual_seed(0)
    prompts = torch.zeros(200, 1, dtype=torch.long)  # (B, P = 1)
    u = {}
    for name in ("mode-seeking", "covering"):
        prev, cont = prompts[:, 0], []
        for _ in range(30):
            p = (2 * table[prev]).softmax(-1) if name == "mode-seeking" else torch.full((200, 6), 1 / 6)  # (B, V)
            prev = torch.multinomial(p, 1, generator=g)[:, 0]
            cont.append(prev)
        cont = torch.stack(cont, 1)  # (B, G)
        lp = H.teacher_logprobs(teacher, prompts, cont, batch=64)  # (B, G)
        torch.testing.assert_close(lp, table[torch.cat([prompts, cont[:, :-1]], 1), cont])
        u[name] = H.unsupported_share(lp.reshape(-1))
    assert u["mode-seeking"] == 0.0
    assert u["covering"] == pytest.approx(0.5, abs=0.03)


def _llama(head_scale: float, seed: int = 0):
    """A random llama-tiny (vocabulary 512, dim 64, 2 blocks) with its output head scaled by ``head_scale``."""
    from llmlab.models.registry import build_model, get_preset

    torch.manual_seed(seed)
    model = build_model(get_preset("llama-tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def test_teacher_logprobs_equal_a_full_forward_on_a_decoder():
    """The DecoderLM path (head on the predicting rows only, batches of 2 over 3 rows) against log_softmax of
    the whole forward, gathered at the continuation tokens."""
    model = _llama(1.0)
    x = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(1))
    lp = H.teacher_logprobs(model, x[:, :7], x[:, 7:], batch=2)  # (3, 5)
    with torch.no_grad():
        want = model(x).float().log_softmax(-1)[:, 6:11].gather(-1, x[:, 7:, None])[..., 0]
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_ungrounded_names_by_hand():
    prompt = "def area(width, height):\n    return wid"
    # 'width' continues the prompt's 'wid' (grounded), 'heigth' and 42 are in neither text, 'len' is a builtin,
    # 'heig' touches the end of the text (cut by the budget): not counted
    assert H.ungrounded(prompt, "th * heigth + 42 * len(heig", "th * height\n") == (2, 4)
    assert H.ungrounded(prompt, "th * height\n", "th * height\n") == (0, 2)
    assert H.ungrounded(prompt, "th * scale\n", "th * scale\n") == (0, 2)  # in the reference: grounded
    assert H.names("ab cd", 3) == []  # 'cd' touches the end
    assert H.names("ab cd ef", 3) == ["cd"]


def test_measure_on_tiny_models(tiny_chat):
    """End to end on tiny Llamas (SmolLM2's tokenizer decodes their 512 ids): a teacher with its head scaled x30
    (peaked distributions) continuing itself greedily writes only its argmax (U = 0); a student with a zero head
    (uniform over 512 tokens) puts most of its samples where the teacher has almost no mass."""
    from llmlab.data.shards import load_tokenizer

    tok = load_tokenizer(str(tiny_chat))
    teacher, uniform = _llama(30.0), _llama(0.0, seed=1)
    x = torch.randint(100, 512, (3, 10), generator=torch.Generator().manual_seed(2))
    own = {m.mode: m for m in H.measure(teacher, teacher, tok, x[:, :6], x[:, 6:], seeds=[1, 2])}
    cover = {m.mode: m for m in H.measure(uniform, teacher, tok, x[:, :6], x[:, 6:], seeds=[1])}
    assert own["greedy"].unsupported == 0.0 and len(own["sampled"].per_seed) == 2 and own["greedy"].tokens == 12
    assert cover["sampled"].unsupported > 0.6 > own["sampled"].unsupported
    assert cover["sampled"].surprisal > own["sampled"].surprisal
    with pytest.raises(Exception, match="same B"):
        H.measure(teacher, teacher, tok, x[:2, :6], x[:, 6:], seeds=[1])


def test_bad_parameters_are_llmlab_errors():
    from llmlab.common import LlmlabError

    with pytest.raises(LlmlabError, match="--epsilon 0"):
        H.unsupported_share(torch.zeros(3), 0)
    with pytest.raises(LlmlabError, match="no continuation tokens"):
        H.unsupported_share(torch.zeros(0))


# ---- the README's command --------------------------------------------------------------------------------------------

COMMAND = "python benchmarks/distill_hallucination.py --steps 40 --out runs/hallucination"


def _script():
    """The benchmark as a module, for in-process calls of its main()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_hallucination", ROOT / "benchmarks" /
                                                  "distill_hallucination.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_shards(tiny_chat, tmp_path_factory):
    """Shards of the stdlib's json package in SmolLM2's tokenizer."""
    import sysconfig

    from llmlab.data.shards import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("hallu") / "shards"
    lib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    prepare(PrepareConfig(inputs=[str(p) for p in sorted(lib.glob("*.py"))], out=str(out), tokenizer=str(tiny_chat),
                          val_fraction=0.2), show_progress=False)
    return out


def _tiny_budget(tiny_chat, small_shards) -> list[str]:
    """The README lines' budget cut: tiny_chat as the teacher, small shards, 2 x 24-token windows, 2 prompts of 8
    tokens, 4 generated, one seed."""
    return ["--teacher", str(tiny_chat), "--data", str(small_shards), "--batch-size", "2", "--seq-len", "24",
            "--prompts", "2", "--prompt-tokens", "8", "--gen-tokens", "4", "--seeds", "1"]


def test_readme_command_runs_with_a_tiny_budget(tiny_chat, small_shards, tmp_path, capsys):
    """The README's line (in-process), its budget cut (one step of 2 x 24 tokens, two of the losses, 2 prompts,
    4 tokens, one seed) and tiny models for SmolLM2 (teacher and student: tiny_chat): the losses train, the table
    and the ratio line print, the JSON holds each model's two modes."""
    assert COMMAND in (ROOT / "README.md").read_text()
    args = COMMAND.split()[2:]
    args[args.index("runs/hallucination")] = str(tmp_path / "runs")
    args[args.index("--steps") + 1] = "1"
    bench = _script()
    assert bench.main([*args, *_tiny_budget(tiny_chat, small_shards), "--student", str(tiny_chat), "--losses",
                       "kd,reverse-kl"]) == 0
    out = capsys.readouterr().out
    assert "flags: " in out and out.strip().splitlines()[-1].startswith("ratio U(reverse-kl) / U(kd), sampled: ")
    rows = json.loads((tmp_path / "runs" / "hallucination.json").read_text())["rows"]
    assert [(x["model"], x["mode"]) for x in rows] == [(m, d) for m in ("kd", "reverse-kl", "teacher (itself)")
                                                       for d in ("sampled", "greedy")]
    assert all(0 <= x["unsupported"] <= 1 and math.isfinite(x["surprisal"]) for x in rows)


CONTINUED = ("python benchmarks/distill_hallucination.py --student runs/hallucination/kd/model --losses "
             "kd,reverse-kl,minillm --steps 120 --seed 2 --out runs/hallucination-continued")


def test_readme_continued_command_starts_every_student_from_the_given_one(tiny_chat, small_shards, tmp_path, capsys):
    """The README's second line with the tiny budget (two of its losses), its --student a saved model folder
    (tiny_chat, standing in for the kd run's): every loss starts from that folder (its summary names it), trains
    with --seed 2 (its config says so) and is measured; the folder itself is not touched."""
    assert CONTINUED in (ROOT / "README.md").read_text()
    before = (tiny_chat / "model.safetensors").read_bytes()
    args = CONTINUED.split()[2:]
    args[args.index("runs/hallucination/kd/model")] = str(tiny_chat)
    args[args.index("runs/hallucination-continued")] = str(tmp_path / "continued")
    args[args.index("--steps") + 1] = "1"
    args[args.index("kd,reverse-kl,minillm")] = "kd,minillm"  # the budget cut: reverse-kl trains as in the first line
    assert _script().main([*args, *_tiny_budget(tiny_chat, small_shards)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ratio U(minillm) / U(kd), sampled: ")
    for loss in ("kd", "minillm"):
        run = tmp_path / "continued" / loss
        assert json.loads((run / "summary.json").read_text())["student"] == str(tiny_chat)
        assert json.loads((run / "distill_config.json").read_text())["train"]["seed"] == 2
    rows = json.loads((tmp_path / "continued" / "hallucination.json").read_text())["rows"]
    assert [x["model"] for x in rows] == [m for m in ("kd", "minillm", "teacher (itself)")
                                          for _ in ("sampled", "greedy")]
    assert (tiny_chat / "model.safetensors").read_bytes() == before


def test_train_only_then_measure_with_the_same_out(tiny_chat, small_shards, tmp_path, capsys):
    """--train-only trains (one process per loss, as on a GPU) and measures nothing; a later run with the same
    --out reuses every trained student untouched and measures it, keeping --examples continuations as text."""
    bench, out = _script(), tmp_path / "runs"
    base = [*_tiny_budget(tiny_chat, small_shards), "--student", str(tiny_chat), "--steps", "1", "--out", str(out)]
    for loss in ("kd", "reverse-kl"):
        assert bench.main([*base, "--losses", loss, "--train-only", "--max-minutes", "5"]) == 0
    assert "measure them with the same --out" in capsys.readouterr().out
    assert not (out / "hallucination.json").exists()
    saved = {loss: (out / loss / "model" / "model.safetensors").read_bytes() for loss in ("kd", "reverse-kl")}
    assert bench.main([*base, "--losses", "kd,reverse-kl", "--examples", "1"]) == 0
    rows = json.loads((out / "hallucination.json").read_text())["rows"]
    assert [x["model"] for x in rows] == [m for m in ("kd", "reverse-kl", "teacher (itself)") for _ in range(2)]
    assert all(len(x["examples"]) == 1 and isinstance(x["examples"][0], str) for x in rows)
    assert [x["steps"] for x in rows[:4]] == [1] * 4 and rows[0]["stopped"] == "done"
    assert all((out / loss / "model" / "model.safetensors").read_bytes() == b for loss, b in saved.items())


WHITENED = ("python benchmarks/distill_hallucination.py --student runs/hallucination/kd/model --losses minillm "
            "--whiten --steps 120 --seed 2 --out runs/hallucination-whitened")


def test_readme_whitened_command_trains_minillm_with_whitened_rewards(tiny_chat, small_shards, tmp_path, capsys):
    """The README's third line with the tiny budget: minillm's run config says whiten, and it is measured."""
    assert WHITENED in (ROOT / "README.md").read_text()
    args = WHITENED.split()[2:]
    args[args.index("runs/hallucination/kd/model")] = str(tiny_chat)
    args[args.index("runs/hallucination-whitened")] = str(tmp_path / "whitened")
    args[args.index("--steps") + 1] = "1"
    assert _script().main([*args, *_tiny_budget(tiny_chat, small_shards)]) == 0
    assert json.loads((tmp_path / "whitened" / "minillm" / "distill_config.json").read_text())["whiten"] is True
    rows = json.loads((tmp_path / "whitened" / "hallucination.json").read_text())["rows"]
    assert [x["model"] for x in rows] == ["minillm"] * 2 + ["teacher (itself)"] * 2


@pytest.mark.parametrize("args,message", [
    (["--losses", "kd,mse"], "--losses 'kd,mse': give comma-separated losses among"),
    (["--epsilon", "0"], "--epsilon 0.0: give a probability in (0, 1)"),
    (["--seeds", "a"], "--seeds 'a': give comma-separated integers"),
    (["--gen-tokens", "0"], "--gen-tokens must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--losses", "kd", "--whiten"], "--whiten acts on minillm only, and --losses 'kd' lacks it"),
    (["--student", "runs/nowhere/kd/model"], "--student runs/nowhere/kd/model: no such folder or preset"),
    (["--device", "tpu"], "--device 'tpu': give cpu, cuda or auto"),
    (["--max-minutes", "-1"], "--max-minutes and --examples must be >= 0, got -1.0 and 4"),
    (["--examples", "-2"], "--max-minutes and --examples must be >= 0, got 0.0 and -2"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert _script().main([*args, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


GPU_LINES = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python benchmarks/distill_hallucination.py --device cuda")]


def test_readme_gpu_lines_run_with_a_tiny_budget_on_the_cpu(tiny_chat, small_shards, tmp_path, capsys):
    """The README's GPU lines in their order (the backgrounded ones one after another), with --device cpu, the
    tiny budget and 1 step: the first stage trains without measuring, the continuations each train one loss
    from it, the last two lines measure the start and the three continued students."""
    assert len(GPU_LINES) == 6, GPU_LINES
    bench = _script()
    for line in GPU_LINES:
        args = line.rstrip(" &").split()[2:]
        args[args.index("cuda")] = "cpu"
        args[args.index("--steps") + 1] = "1"
        for folder in ("runs/hallucination-gpu/kd/model", "runs/hallucination-gpu-continued", "runs/hallucination-gpu"):
            if folder in args:
                args[args.index(folder)] = str(tmp_path / folder)
        assert bench.main([*args, *_tiny_budget(tiny_chat, small_shards)]) == 0, line  # the later flags win
    capsys.readouterr()
    start = json.loads((tmp_path / "runs/hallucination-gpu/hallucination.json").read_text())["rows"]
    assert [x["model"] for x in start] == ["kd", "kd", "teacher (itself)", "teacher (itself)"]
    rows = json.loads((tmp_path / "runs/hallucination-gpu-continued/hallucination.json").read_text())["rows"]
    assert [x["model"] for x in rows] == [m for m in ("kd", "reverse-kl", "minillm", "teacher (itself)")
                                          for _ in range(2)]
    for loss in ("kd", "reverse-kl", "minillm"):
        summary = json.loads((tmp_path / "runs/hallucination-gpu-continued" / loss / "summary.json").read_text())
        assert summary["student"] == str(tmp_path / "runs/hallucination-gpu/kd/model") and summary["steps"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    assert _script().main(["--device", "cuda", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: PyTorch sees no CUDA device here; use --device cpu" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
