"""llmlab embed distill: DistilBERT's cosine loss against ``F.cosine_embedding_loss`` and by hand, TinyBERT's
attention loss by hand, the block-subset student equal to the teacher's blocks, each loss of the task equal to its
formula on a tiny BERT (zero where the student copies the matched teacher block), bad input (one line, exit 2),
a short CLI run, and the README's lines."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.train import distill_losses as L

# ---- the losses ---------------------------------------------------------------------------------------------------


def test_cosine_embedding_by_hand_and_as_torch():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [0.0, -1.0]])
    by_hand = ((1 - 0.0) + (1 - 1.0) + (1 - -1.0)) / 3  # cos = 0, 1, -1
    assert L.cosine_embedding(s, t).item() == pytest.approx(by_hand, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    torch.testing.assert_close(L.cosine_embedding(a, b), F.cosine_embedding_loss(a, b, torch.ones(7)))


def test_attention_mse_by_hand():
    """1/h sum_i MSE(A_S_i, A_T_i) over (B, H, T, T) scores; padding keys are 0 in both, still counted."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    total = 0.0
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(4):
                    if mask[b, j]:
                        total += (s[b, h, i, j].item() - t[b, h, i, j].item()) ** 2
    assert L.attention_mse(s, t, mask).item() == pytest.approx(total / (2 * 3 * 4 * 4), rel=1e-6)
    per_head = torch.stack([F.mse_loss(s[:, h], t[:, h]) for h in range(3)]).mean()  # no mask: 1/h sum of MSEs
    torch.testing.assert_close(L.attention_mse(s, t), per_head)
    with pytest.raises(LlmlabError, match="needs the same number of heads"):
        L.attention_mse(s[:, :2], t)


# ---- the student and the task on a tiny BERT ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tiny_encoder):
    from llmlab.formats.load import load_model

    return load_model(tiny_encoder)


def test_block_subset_student_is_the_teachers_blocks(tiny_teacher):
    from llmlab.train.encoder_distill import layer_subset

    student = layer_subset(tiny_teacher, [1])
    t_sd, s_sd = tiny_teacher.model.state_dict(), student.model.state_dict()
    assert student.config.n_layers == 1 and len(s_sd) < len(t_sd)
    for k, v in s_sd.items():
        src = k.replace("layers.0.", "layers.1.") if k.startswith("layers.") else k
        assert torch.equal(v, t_sd[src]), k
        assert v.data_ptr() != t_sd[src].data_ptr()  # a copy: training the student leaves the teacher alone
    ids = torch.tensor([[101, 2054, 2003, 102]])
    t = tiny_teacher.model
    x = t.embed_norm(t.embed_tokens(ids) + t.embed_positions(torch.arange(4)[None]) + t.embed_token_types(ids * 0))
    torch.testing.assert_close(student.model(ids), t.layers[1](x, None))  # the embeddings, then teacher block 1
    with pytest.raises(LlmlabError, match="each teacher block at most once"):
        layer_subset(tiny_teacher, [1, 1])


def _task(teacher, loss, layers="0", **options):
    from llmlab.train.encoder_distill import (
        EncoderDistillConfig,
        EncoderDistillTrainConfig,
        build_task,
        load_student,
    )

    cfg = EncoderDistillConfig(loss=loss, layers=layers, max_tokens=16, **options).validate()
    tcfg = EncoderDistillTrainConfig(steps=1, batch_size=4, progress=False, device="cpu")
    texts = {"train": ["Return the number of items.", "Open a file and return a stream.", "Sort a list in place.",
                       "A deque of items."], "val": ["Close the file.", "Make a directory."]}
    return build_task(cfg, tcfg, teacher, load_student(cfg, teacher, 0), texts)


def _embedding(bert, tokenizer, texts):
    from llmlab.infer.embed import embed_batch

    return embed_batch(bert, tokenizer, texts, normalize=False, max_tokens=16)


def test_each_loss_is_its_formula(tiny_teacher):
    """tinybert with student block 1 = teacher block 1 matched to it: hidden and attention terms exactly 0, the
    total the embed term, 1 - cos of the two models' own pooled embeddings; matched to teacher block 2 instead:
    both terms > 0. distilbert with the whole teacher as student: KL and cosine 0, the MLM term alone."""
    from llmlab.train.contrastive import epoch_rows

    tok = tiny_teacher.tokenizer
    task = _task(tiny_teacher, "tinybert", layer_map="1")
    assert task.layer_map == [0, 1]
    loss, n = task.loss(task.model, 0, 0, 4, 4)
    stats = task.aux_stats()
    assert n == 4 and stats["hidden"] == 0.0 and stats["attn"] == 0.0
    texts = epoch_rows(task.texts["train"], task.seed, "train", 0, 0, 4, 4)
    by_hand = 1 - F.cosine_similarity(_embedding(task.model.bert, tok, texts),
                                      _embedding(tiny_teacher.model, tok, texts)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6) == pytest.approx(stats["embed"], abs=1e-7)
    task = _task(tiny_teacher, "tinybert", layer_map="2")  # also the uniform default for 1 of 2 blocks
    assert task.layer_map == _task(tiny_teacher, "tinybert").layer_map == [0, 2]
    task.loss(task.model, 0, 0, 4, 4)
    assert task.aux_stats()["hidden"] > 1e-6 and task.aux_stats()["attn"] > 1e-6
    task = _task(tiny_teacher, "distilbert", layers="0,1")
    loss, _ = task.loss(task.model, 0, 0, 4, 4)
    s = task.aux_stats()
    assert s["kd"] == pytest.approx(0.0, abs=1e-6) and s["cos"] == pytest.approx(0.0, abs=1e-6) and s["mlm"] > 1
    assert loss.item() == pytest.approx(2.0 * s["mlm"], rel=1e-5)  # the default --mlm-weight 2
    val, _ = task.loss(task.model, 0, 0, 2, 2, split="val")
    assert val.item() == pytest.approx(0.0, abs=1e-6)  # the same model: the validation 1 - cos is 0


def test_a_teacher_with_a_projection_after_pooling(tiny_teacher):
    """A teacher with a Dense module after pooling (``embed train --projection pca``): the block-subset student
    gets a copy of it, and the embed term compares the two models' embeddings as ``embed`` makes them, each
    through its own projection (1 - cos by hand); the whole teacher as student scores 0."""
    import copy
    import dataclasses

    from llmlab.train.contrastive import epoch_rows

    model = copy.deepcopy(tiny_teacher.model)
    torch.manual_seed(0)
    model.projection = torch.nn.Linear(32, 32, bias=False)  # not orthogonal: cosines change through it
    teacher = dataclasses.replace(tiny_teacher, model=model)
    task = _task(teacher, "embed", layers="1")
    student = task.model.bert
    assert student.projection is not model.projection
    assert torch.equal(student.projection.weight, model.projection.weight)
    loss, _ = task.loss(task.model, 0, 0, 4, 4)
    texts = epoch_rows(task.texts["train"], task.seed, "train", 0, 0, 4, 4)
    tok = teacher.tokenizer
    by_hand = 1 - F.cosine_similarity(_embedding(student, tok, texts), _embedding(model, tok, texts)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    task = _task(teacher, "embed", layers="0,1")
    assert task.loss(task.model, 0, 0, 4, 4)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_distilbert_triple_loss_as_distilberts_code(tiny_teacher):
    """Each term as DistilBERT's training code writes it (``distiller.py``): KLDivLoss(batchmean) of the log-softmax
    student against the softmax teacher at temperature 2, times 4; cross-entropy at the masked positions;
    CosineEmbeddingLoss with target 1 over the real tokens' last hidden states. The total is 5 / 2 / 1 of them."""
    from llmlab.infer.embed import tokenize_batch
    from llmlab.train.contrastive import epoch_rows
    from llmlab.train.mlm import mask_tokens

    tok = tiny_teacher.tokenizer
    task = _task(tiny_teacher, "distilbert", layers="0")
    with torch.no_grad():
        task.model.bert.embed_tokens.weight.mul_(50)  # logits of a few units: a KL well above float32 rounding
    loss, _ = task.loss(task.model, 0, 0, 4, 4)
    got = task.aux_stats()
    ids, mask = tokenize_batch(tok, epoch_rows(task.texts["train"], task.seed, "train", 0, 0, 4, 4), 16)
    special = (tok.vocab["[CLS]"], tok.vocab["[SEP]"], tok.vocab["[PAD]"])
    inputs, labels = mask_tokens(ids, mask_id=tok.vocab["[MASK]"], vocab_size=tiny_teacher.config.vocab_size,
                                 generator=torch.Generator().manual_seed(task.seed * 7919), protect=special)
    with torch.no_grad():
        hs, ht = task.model.bert(inputs, mask), tiny_teacher.model(inputs, mask)  # (B, T, D) each
        at, real = labels != -100, mask.bool()
        s_logits = hs[at] @ task.model.bert.embed_tokens.weight.T  # (N, V)
        t_logits = ht[at] @ tiny_teacher.model.embed_tokens.weight.T
        kd = F.kl_div(F.log_softmax(s_logits / 2, -1), F.softmax(t_logits / 2, -1), reduction="batchmean") * 2 ** 2
        mlm = F.cross_entropy(s_logits, labels[at])
        cos = F.cosine_embedding_loss(hs[real], ht[real], torch.ones(int(real.sum())))
    assert int(at.sum()) > 0 and kd.item() > 0.01 and cos.item() > 0.01
    assert got["kd"] == pytest.approx(kd.item(), rel=1e-4) and got["mlm"] == pytest.approx(mlm.item(), rel=1e-5)
    assert got["cos"] == pytest.approx(cos.item(), rel=1e-5)
    assert loss.item() == pytest.approx(5 * kd.item() + 2 * mlm.item() + cos.item(), rel=1e-5)


def test_tokenizer_and_shape_checks(tiny_teacher, tmp_path):
    from conftest import make_tiny_encoder
    from llmlab.tokenizer.wordpiece import WordPiece
    from llmlab.train.distill import check_same_tokenizer
    from llmlab.train.encoder_distill import load_student

    tok = tiny_teacher.tokenizer
    vocab = dict(tok.vocab)
    vocab["the"], vocab["a"] = vocab["a"], vocab["the"]
    other = replace(tiny_teacher, tokenizer=WordPiece(vocab))
    with pytest.raises(LlmlabError, match="uses a different tokenizer than the teacher"):
        check_same_tokenizer(tiny_teacher, other)
    narrow = make_tiny_encoder(tmp_path / "narrow", dim=16)
    with pytest.raises(LlmlabError, match="use --loss tinybert"):
        _task(tiny_teacher, "embed", student=narrow)
    task = _task(tiny_teacher, "tinybert", student=narrow)  # projections 16 -> 32
    loss, _ = task.loss(task.model, 0, 0, 4, 4)
    loss.backward()
    assert task.model.narrow and task.model.proj[0].weight.grad is not None
    with pytest.raises(LlmlabError, match="not a BERT encoder"):
        load_student(replace(task.cfg, student="llama-tiny"), tiny_teacher, 0)


def _main(capsys, *args) -> tuple[int, str, str]:
    from llmlab.cli import main

    code = main(["embed", "distill", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["--layers", "2"], "--layers: block 2 is out of range: the teacher's blocks are 0..1"),
    (["--layers", "0,x"], "--layers '0,x': give comma-separated integers"),
    (["--layer-map", "3"], "--layer-map: block 3 is out of range: the teacher's blocks are 1..2"),
    (["--layer-map", "0"], "--layer-map: block 0 is out of range: the teacher's blocks are 1..2"),
    (["--layer-map", "1,2"], "--layer-map gives 2 teacher blocks for a student of 1"),
    (["--student", "bert-tiny"], "has a vocabulary of 512 tokens, the teacher 30522: teacher and student must share "
                                 "the tokenizer"),
    (["--student", "minilm-l6"], "the student has 12 heads, the teacher 2"),
    (["--temperature", "0"], "--temperature must be a positive number"),
    (["--cos-weight", "-1"], "--cos-weight must be a number >= 0"),
    (["--eval-queries", "-1"], "--eval-queries must be >= 0"),
    (["--activation-checkpointing"], "drop --activation-checkpointing"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_encoder, tmp_path, capsys, args, message):
    code, _, err = _main(capsys, "--teacher", tiny_encoder, "--layers", "0", *args, "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_help_gives_every_flag_a_default(capsys):
    import re

    from llmlab.cli import main

    with pytest.raises(SystemExit):
        main(["embed", "distill", "--help"])
    body = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + body)[1:]
    assert len(entries) >= 20
    for entry in entries:
        if not entry.startswith("-h"):
            assert "(default:" in " ".join(entry.split()), entry


# ---- the README's lines ---------------------------------------------------------------------------------------------

README_LINES = [["--eval-queries", "100", "--threads", "1"],
                ["--loss", "embed", "--eval-queries", "100", "--out", "runs/embed-distill-embed", "--threads", "1"],
                ["--loss", "distilbert", "--eval-queries", "100", "--out", "runs/embed-distill-distilbert", "--threads",
                 "1"],
                ["--layers", "0,2,4", "--loss", "embed", "--eval-queries", "100", "--out", "runs/embed-distill-024",
                 "--threads", "1"]]


def test_readme_embed_distill_lines_are_these():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for args in README_LINES:
        line = " ".join(["llmlab embed distill", *args])
        assert any(x.split("#")[0].strip() == line for x in readme.splitlines()), line


def test_readme_embed_distill_default_runs_as_written(tmp_path, capsys):
    """The README's first line with the real teacher (all-MiniLM-L6-v2), on a small budget."""
    out = tmp_path / "run"
    code, stdout, err = _main(capsys, *README_LINES[0], "--out", str(out), "--steps", "1", "--batch-size", "4",
                              "--max-tokens", "24", "--eval-queries", "2", "--eval-batches", "1", "--no-progress")
    assert code == 0, err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["loss"] == "tinybert" and s["layer_map"] == [2, 4, 6] and s["student"] == "teacher blocks 0,3,5"
    assert s["report"][0]["metrics"]["ndcg@10"] > 0.5 and "| student before | 3 x 384 |" in stdout


@pytest.mark.parametrize("args", README_LINES[1:])
def test_readme_embed_distill_losses_run_as_written(tiny_encoder, tmp_path, capsys, args):
    """The README's other lines as written, on the tiny teacher (one real-model run above is enough); the report's
    rows, and the saved student loads and embeds."""
    from llmlab.api import load

    out = tmp_path / "run"
    code, stdout, err = _main(capsys, *args, "--teacher", tiny_encoder, "--layers", "1", "--out", str(out), "--steps",
                              "2", "--batch-size", "4", "--max-tokens", "16", "--eval-queries", "2", "--eval-batches",
                              "1", "--no-progress")
    assert code == 0, err[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["loss"] == args[args.index("--loss") + 1] and s["steps"] == 2 and "| student after | 1 x 32 |" in stdout
    assert [r["name"] for r in s["report"]] == ["teacher " + tiny_encoder, "student before", "student after"]
    assert s["report"][0]["cosine_to_teacher"] is None and -1 <= s["report"][2]["cosine_to_teacher"] <= 1
    enc = load(str(out / "model"))
    assert enc.config.n_layers == 1 and enc.embed(["Sort a list."]).shape == (1, 32)
