"""Recurrent LMs and ELMo (models/lstm_lm.py, train/rnn_lm.py, eval/word_senses.py): the LM's logits equal an
embedding + torch.nn.LSTM / GRU + tied softmax with the same weights (the state carried across chunks too); the
backward LM equals torch.nn.LSTM on the reversed sequence; ELMo's scalar mix equals the hand-computed sum; the
sense-separation score on hand-made vectors; training, exact resume and generation through the one loop; the
README's commands as written; bad input."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.eval import word_senses
from llmlab.models.lstm_lm import RecurrentLM, ScalarMix

README = Path(__file__).resolve().parents[1] / "README.md"
TORCH_RNN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A recurrent step is many tiny operations: one thread runs them 10x faster on a loaded 2-core machine (and
    ``llmlab rnn`` / ``elmo`` default to --threads 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torch_stack(layers, cell: str) -> torch.nn.Module:
    """A multi-layer torch.nn.LSTM / GRU holding the weights of our single-layer ``Recurrent``s."""
    ref = TORCH_RNN[cell](layers[0].cells[0].input_size, layers[0].hidden_size, num_layers=len(layers),
                          batch_first=True)
    with torch.no_grad():
        for j, layer in enumerate(layers):
            for name, p in layer.cells[0].named_parameters():
                getattr(ref, f"{name}_l{j}").copy_(p)
    return ref


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_logits_equal_torch_reference(cell):
    torch.manual_seed(0)
    model = RecurrentLM(cell, 50, 16, 2).eval()
    with torch.no_grad():
        model.out_bias.normal_()
    ref = torch_stack(model.forward_layers, cell)
    ids = torch.randint(0, 50, (3, 11))
    out, _ = ref(model.embed_tokens(ids))
    expected = F.linear(out, model.embed_tokens.weight, model.out_bias)  # the tied softmax
    logits, states = model(ids)
    assert logits.shape == (3, 11, 50)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    # The state carried across chunks: two halves give the whole sequence's logits.
    first, st = model(ids[:, :5])
    second, _ = model(ids[:, 5:], st)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, rtol=0, atol=1e-5)


def test_bidirectional_layers_equal_torch_reference():
    torch.manual_seed(1)
    model = RecurrentLM("lstm", 40, 8, 2, bidirectional=True).eval()
    ids = torch.randint(0, 40, (2, 9))
    x = model.embed_tokens(ids)
    fwd, _ = torch_stack(model.forward_layers, "lstm")(x)
    bwd, _ = torch_stack(model.backward_layers, "lstm")(x.flip(1))
    bwd = bwd.flip(1)  # position t has read w_t..w_T
    states = model.layer_states(ids)
    assert states.shape == (3, 2, 9, 16)
    torch.testing.assert_close(states[0], torch.cat([x, x], -1))  # [x; x]
    torch.testing.assert_close(states[2], torch.cat([fwd, bwd], -1), rtol=0, atol=1e-5)
    f_logits, b_logits = model.bidirectional_logits(ids)
    torch.testing.assert_close(b_logits, F.linear(bwd, model.embed_tokens.weight, model.out_bias), rtol=0, atol=1e-5)
    torch.testing.assert_close(f_logits, model(ids)[0], rtol=0, atol=1e-6)
    # the backward LM at t depends on w_t.. only: changing w_0 leaves positions 1.. unchanged
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % 40
    torch.testing.assert_close(model.bidirectional_logits(other)[1][:, 1:], b_logits[:, 1:])


def test_scalar_mix_equals_hand_computed():
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.25, -1.0, 2.0]))  # exact in float32
        mix.gamma.fill_(0.75)
    h = torch.randn(3, 2, 4, dtype=torch.float64)
    z = math.exp(0.25) + math.exp(-1.0) + math.exp(2.0)
    s = [math.exp(0.25) / z, math.exp(-1.0) / z, math.exp(2.0) / z]
    expected = 0.75 * (s[0] * h[0] + s[1] * h[1] + s[2] * h[2])
    torch.testing.assert_close(mix(h), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ScalarMix(3)(h), h.mean(0))  # initialised to the plain average
    with pytest.raises(LlmlabError, match="3 weights for 2 layers"):
        mix(h[:2])


def test_separation_hand_values():
    # identical vectors (a static embedding): every comparison a tie, accuracy exactly 1/2, gap 0
    acc, gap = word_senses.separation(torch.ones(4, 3), [0, 0, 1, 1])
    assert (acc, gap) == (0.5, 0.0)
    # two clean clusters: every same-sense pair closer than every cross-sense pair
    v = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    acc, gap = word_senses.separation(v, [0, 0, 1, 1])
    assert acc == 1.0 and gap > 0.5
    # one anchor's same-sense neighbour farther than one cross-sense use: anchor 0 has b=1 vs c in {2, 3}
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
    acc, _ = word_senses.separation(v, [0, 0, 1, 1])
    # anchors: 0 (b=1: 0.0 vs c=2: .99, c=3: -1 -> 1 of 2), 1 (b=0: 0 vs .11, 0 -> 0 + tie 1/2),
    #          2 (b=3: -.99 vs .99, .11 -> 0), 3 (b=2: -.99 vs -1, 0 -> 1 of 2)
    assert acc == pytest.approx((1 + 0.5 + 0 + 1) / 8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from llmlab.data.corpus import stdlib_root
    from llmlab.data.shards import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("rnn") / "shards"
    files = [str(p) for p in sorted((stdlib_root() / "json").glob("*.py"))]
    prepare(PrepareConfig(inputs=files, out=str(out), vocab_size=300, val_fraction=0.2), show_progress=False)
    return out


def _train(shards, out, steps, bidirectional=False, cell="lstm", resume=True, **kw):
    from llmlab.train.rnn_lm import RNNFlags, RNNRunConfig, RNNTrainConfig, run_recurrent

    tcfg = RNNTrainConfig(**{"steps": steps, "batch_size": 4, "seq_len": 12, "warmup": 1, "eval_every": 0,
                             "eval_batches": 1, "save_every": 2, "progress": False, "device": "cpu", **kw})
    return run_recurrent(RNNRunConfig(data=str(shards), out=str(out), resume=resume),
                         RNNFlags(cell=cell, dim=16, n_layers=2), tcfg, bidirectional)


def _readme_section() -> str:
    text = README.read_text()
    section = text[text.index("### Recurrent language models and ELMo"):]
    return section[:section.index("\n### ", 4)]


def _readme_commands() -> list[str]:
    return [line.split("  #")[0].strip() for block in _readme_section().split("```")[1::2]
            for line in block.splitlines() if line.strip().startswith("llmlab ")]


def test_readme_commands_as_written(shards, tmp_path, monkeypatch, capsys):
    """The README's lines in order, run in a fresh folder, each with a small budget appended (later flags win);
    then the LSTM run resumed through the loop, a reproducible sample from it, and a resume with another cell
    refused."""
    from llmlab.cli import main
    from llmlab.infer.sample import SamplingParams
    from llmlab.train.rnn_lm import generate_text, load_run

    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [" ".join(c.split()[1:3]) for c in commands] == [
        "rnn train", "rnn train", "pretrain --data", "rnn generate", "elmo train", "elmo senses"]
    small = ["--steps", "2", "--batch-size", "4", "--seq-len", "12", "--eval-every", "0", "--eval-batches", "1",
             "--save-every", "2", "--warmup", "1", "--device", "cpu", "--no-progress", "--data", str(shards),
             "--dim", "16"]
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[1] == "train" or argv[0] == "pretrain":
            argv += small + (["--n-heads", "2", "--ffn-dim", "16"] if argv[0] == "pretrain" else [])
        elif argv[1] == "generate":
            argv += ["--max-new-tokens", "4"]
        assert main(argv) == 0, command
    out = capsys.readouterr().out
    assert re.search(r"layer 0 \(static\)\s+50\.0%\s+0\.000", out)  # the static embedding cannot separate
    assert re.search(r"ELMo mix\s+\d+\.\d%", out)
    assert (tmp_path / "runs/elmo/senses.png").stat().st_size > 10_000
    config = json.loads((tmp_path / "runs/elmo/config.json").read_text())
    assert config["model"]["bidirectional"] and config["model"]["cell"] == "lstm"
    assert config["model"]["forget_bias"] == 1.0  # the default: Jozefowicz et al.'s forget-gate bias
    # resume: the LSTM run goes on from its step-2 checkpoint to step 4 (another --forget-bias, an initialisation
    # flag, does not stop it)
    argv = shlex.split(commands[0])[1:] + ["--forget-bias", "0.5"] + small
    argv[argv.index("--steps", len(argv) - len(small)) + 1] = "4"
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "runs/cmp-lstm/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "setup"] == [0, 2]  # a fresh start, then the resume
    assert json.loads((tmp_path / "runs/cmp-lstm/config.json").read_text())["model"]["forget_bias"] == 1.0
    assert json.loads((tmp_path / "runs/cmp-gru/config.json").read_text())["model"]["forget_bias"] is None
    loaded = load_run(tmp_path / "runs/cmp-lstm")
    assert loaded.checkpoint.name.endswith("04")
    p = SamplingParams(temperature=0.8, seed=0)
    assert generate_text(loaded, "def ", 6, p) == generate_text(loaded, "def ", 6, p)
    assert main(shlex.split(commands[1])[1:] + small + ["--out", "runs/cmp-lstm"]) == 2
    assert "cannot resume runs/cmp-lstm: the model differs (cell: checkpoint lstm vs now gru" in capsys.readouterr().err


def test_readme_python_block_as_written(capsys):
    blocks = [b.partition("\n")[2] for b in _readme_section().split("```")[1::2] if b.startswith("python")]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md (Recurrent language models and ELMo)", "exec"), {})
    assert capsys.readouterr().out.strip() == ("torch.Size([3, 12, 100]) torch.Size([3, 3, 12, 64]) "
                                               "torch.Size([3, 12, 64])")


def test_bad_input(shards, tmp_path, capsys):
    with pytest.raises(LlmlabError, match="unknown cell 'cnn'"):
        RecurrentLM("cnn", 10, 4, 1)
    with pytest.raises(LlmlabError, match="--seq-len must be >= 2"):
        _train(shards, tmp_path / "r", 2, seq_len=1)
    with pytest.raises(LlmlabError, match="no prepared shards"):
        from llmlab.train.rnn_lm import RNNFlags, RNNRunConfig, RNNTrainConfig, run_recurrent

        run_recurrent(RNNRunConfig(data=str(tmp_path / "none")), RNNFlags(), RNNTrainConfig(), False)
    with pytest.raises(LlmlabError, match="ELMo is a bidirectional LSTM"):
        _train(shards, tmp_path / "e", 2, bidirectional=True, cell="gru")
    with pytest.raises(LlmlabError, match="the gru cell has no forget gate"):
        RecurrentLM("gru", 10, 4, 1, forget_bias=1.0)
    with pytest.raises(LlmlabError, match="forward only"):
        RecurrentLM("lstm", 10, 4, 1).bidirectional_logits(torch.zeros(1, 3, dtype=torch.long))
    # an empty corpus: a shard folder whose validation split is empty
    from llmlab.data.shards import PrepareConfig, prepare

    (tmp_path / "one.txt").write_text("x = 1\n")
    prepare(PrepareConfig(inputs=[str(tmp_path / "one.txt")], out=str(tmp_path / "tiny"), vocab_size=260,
                          val_fraction=0.0), show_progress=False)
    with pytest.raises(LlmlabError, match="the train split has 7 tokens, fewer than one window"):
        _train(tmp_path / "tiny", tmp_path / "t", 2)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlmlabError, match="the corpus is empty"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "empty.txt")], out=str(tmp_path / "e2")), show_progress=False)
    # the command line (main, in-process: a subprocess costs 20 s of the suite's budget on the loaded machine):
    # one line naming the problem and the fix, exit 2, no traceback
    from llmlab.cli import main

    assert main(["rnn", "train", "--seq-len", "1", "--data", str(shards), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--seq-len must be >= 2" in err and "Traceback" not in err, err
    assert main(["rnn", "generate", "--model", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["rnn", "train", "--cell", "cnn"])
    assert e.value.code == 2


def test_help_shows_defaults():
    from llmlab.cli import build_parser

    parser = build_parser({"rnn", "elmo"})
    groups = next(a for a in parser._actions if a.dest == "command").choices
    for group, dest, names in (("rnn", "rnn_command", ("train", "generate")), ("elmo", "elmo_command",
                                                                              ("train", "senses"))):
        commands = next(a for a in groups[group]._actions if a.dest == dest).choices
        for name in names:
            body = commands[name].format_help().split("options:", 1)[1]
            entries = [e for e in re.split(r"\n  (?=-)", "\n" + body)[1:] if not e.startswith("-h")]
            assert entries and all("default" in " ".join(e.split()) for e in entries), (group, name)


def test_padded_batch_equals_one_at_a_time():
    """layer_states of a right-padded batch with lengths equals each sentence alone (the backward LM starts at
    each row's own last token)."""
    torch.manual_seed(2)
    model = RecurrentLM("lstm", 30, 8, 2, bidirectional=True).eval()
    rows = [torch.randint(1, 30, (n,)) for n in (7, 3, 5)]
    batch = torch.zeros(3, 7, dtype=torch.long)
    for r, ids in enumerate(rows):
        batch[r, :len(ids)] = ids
    states = model.layer_states(batch, torch.tensor([7, 3, 5]))
    for r, ids in enumerate(rows):
        alone = model.layer_states(ids[None])[:, 0]
        torch.testing.assert_close(states[:, r, :len(ids)], alone, rtol=0, atol=1e-6)
