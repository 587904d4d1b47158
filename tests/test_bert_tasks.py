"""BERT task heads: logits equal to transformers' BertFor{SequenceClassification,TokenClassification,QuestionAnswering}
with the same weights (both directions through the folder format), entity F1 equal to seqeval, SQuAD EM / F1 equal
to the official evaluate-v1.1 script (its functions copied below as the reference), token offsets equal to the
tokenizers library's, the QA sliding windows and their mapping back to characters, the built-in data, bad input,
and the README's commands (as written, with a tiny random encoder and a small budget)."""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import string
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.formats.bert_heads import load_head, save_head
from llmlab.formats.load import embedded_path, load_model
from llmlab.text.span_metrics import entity_scores, squad_scores
from llmlab.text.span_tasks import ner_task, qa_task, read_qa, read_tagged
from llmlab.train.heads import IGNORE, HeadConfig, HeadData, evaluate, ner_rows, qa_windows

README = Path(__file__).resolve().parents[1] / "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_model("all-minilm-l6-v2").tokenizer


# ---- heads: parity with transformers ------------------------------------------------------------------------------

HF_CLASSES = {"classify": "BertForSequenceClassification", "ner": "BertForTokenClassification",
              "qa": "BertForQuestionAnswering"}


def _hf_logits(model, ids, mask, task):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if task != "qa" else torch.stack([out.start_logits, out.end_logits], -1)


@pytest.mark.parametrize("task", ["classify", "ner", "qa"])
def test_head_logits_equal_transformers_both_ways(task, tmp_path):
    transformers = need("transformers")
    src = embedded_path("all-minilm-l6-v2")
    labels = {"classify": ["neg", "neu", "pos"], "ner": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], "qa": []}[task]
    extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
             "label2id": {x: i for i, x in enumerate(labels)}} if labels else {}
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    ref = getattr(transformers, HF_CLASSES[task])(cfg).eval()
    with torch.no_grad():  # a non-zero head bias, so a dropped or misnamed bias shows
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, tmp_path / "hf" / name)
    loaded, ours, got_labels = load_head(str(tmp_path / "hf"), task)
    assert got_labels == labels
    ids = torch.randint(1000, 5000, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    real = mask.bool() if task != "classify" else slice(None)  # padded positions' outputs are not compared
    with torch.no_grad():
        want = _hf_logits(ref, ids, mask, task)
        got = ours.eval()(ids, mask)
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    # ours -> folder -> transformers
    save_head(tmp_path / "ours", ours, loaded, got_labels)
    back = getattr(transformers, HF_CLASSES[task]).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(back, ids, mask, task)[real], want[real], rtol=1e-5, atol=1e-5)
    if labels:
        assert back.config.id2label == dict(enumerate(labels))


# ---- scorers: parity with seqeval and the official SQuAD script -------------------------------------------------

def test_entity_scores_equal_seqeval():
    need("seqeval")
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]  # I- after O or another type included
    for _ in range(150):
        true = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
        pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in s] for s in true]
        ours = entity_scores(true, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when nothing is predicted (then 0, as ours)
            ref = (precision_score(true, pred), recall_score(true, pred), f1_score(true, pred))
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(ref, abs=1e-12), (true, pred)


# The official SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py), as published, the reference.
def _ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _ref_f1_score(prediction, ground_truth):
    prediction_tokens = _ref_normalize_answer(prediction).split()
    ground_truth_tokens = _ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _ref_exact_match_score(prediction, ground_truth):
    return _ref_normalize_answer(prediction) == _ref_normalize_answer(ground_truth)


def _ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def test_squad_scores_equal_official_script():
    rng = random.Random(1)
    words = ["the", "a", "An", "Cat", "cat,", "sat", "on", "mat.", "THE", "dog's", "'quoted'", "(x)", "über", "  "]
    preds, golds = [], []
    for _ in range(400):
        gold = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        pred = rng.choice([gold[0], gold[0].upper(), " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))])
        preds.append(pred)
        golds.append(gold)
    em = 100.0 * sum(_ref_metric_max_over_ground_truths(_ref_exact_match_score, p, g)
                     for p, g in zip(preds, golds)) / len(preds)
    f1 = 100.0 * sum(_ref_metric_max_over_ground_truths(_ref_f1_score, p, g) for p, g in zip(preds, golds)) / len(preds)
    ours = squad_scores(preds, golds)
    assert ours["exact_match"] == pytest.approx(em, abs=1e-9)
    assert ours["f1"] == pytest.approx(f1, abs=1e-9)
    assert 0 < ours["exact_match"] < 100 and 0 < ours["f1"] < 100  # the sample has hits and misses


# ---- offsets, windows, rows --------------------------------------------------------------------------------------

def test_token_offsets_equal_tokenizers_library(minilm_tokenizer):
    tokenizers = need("tokenizers")
    import pydoc_data.topics

    ref = tokenizers.Tokenizer.from_file(str(embedded_path("all-minilm-l6-v2") / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    texts = ["Héllo, WORLD! naïve café  résumé x²  don't-stop 北京 ok", "def f(x):\n\treturn x**2  # square",
             "İstanbul straße", *list(pydoc_data.topics.topics.values())[:12]]
    for text in texts:
        ids, offsets = minilm_tokenizer.encode_offsets(text)
        enc = ref.encode(text, add_special_tokens=False)
        assert ids == enc.ids
        assert offsets == [tuple(o) for o in enc.offsets]


def test_qa_windows_slide_and_map_answers_back_to_characters(minilm_tokenizer):
    data = qa_task()
    examples = [e for e in data.test if len(e.context) > 900][:6]
    assert examples
    rows = qa_windows(minilm_tokenizer, examples, max_tokens=64, stride=16)
    assert len(rows) > 3 * len(examples)  # long contexts: several windows each
    for n, ex in enumerate(examples):
        mine = [r for r in rows if r.example == n]
        hits = [r for r in mine if r.target != (0, 0)]
        assert hits, ex.key  # some window holds the answer whole
        for r in hits:
            s, e = r.target
            assert ex.context[r.offsets[s][0]:r.offsets[e][1]].lower() == ex.answer.lower()
        for a, b in zip(mine, mine[1:]):  # neighbours share exactly `stride` context tokens
            ctx_a = [o for o in a.offsets if o[0] >= 0]
            ctx_b = [o for o in b.offsets if o[0] >= 0]
            assert ctx_a[-16:] == ctx_b[:16]
        assert all(len(r.ids) <= 64 for r in mine)
    # logits that point at the targets give the gold answers: exact match 100 through the offsets
    logits = []
    for r in rows:
        lg = torch.full((len(r.ids), 2), -5.0)
        if r.target != (0, 0):
            lg[r.target[0], 0] = lg[r.target[1], 1] = 5.0
        logits.append(lg)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.i = 0

        def forward(self, ids, mask, types):
            out = torch.full((ids.shape[0], ids.shape[1], 2), -9.0)
            for j in range(ids.shape[0]):
                out[j, :logits[self.i].shape[0]] = logits[self.i]
                self.i += 1
            return out

    data_ = HeadData("qa", [], [], rows, examples, {})
    scores = evaluate(Oracle(), data_, minilm_tokenizer.pad_id, HeadConfig(task="qa", eval_batch=5))
    assert scores["exact_match"] == 100.0


def test_ner_rows_label_first_piece_only(minilm_tokenizer):
    words, tags = ["Guido", "imported", "asyncio", "in", "Lisbon", "."], ["B-PER", "O", "B-MOD", "O", "B-LOC", "O"]
    labels = ner_task().labels
    (row,) = ner_rows(minilm_tokenizer, [(words, tags)], labels, 64)
    assert row.ids[0] == minilm_tokenizer.cls_id and row.ids[-1] == minilm_tokenizer.sep_id
    kept = [t for t in row.target if t != IGNORE]
    assert [labels[t] for t in kept] == tags
    assert len(row.ids) > len(words) + 2  # "asyncio" is several pieces: only the first is labelled


def test_builtin_tasks_fixed_split_and_spans():
    ner = ner_task()
    assert len(ner.train) > 800 and len(ner.test) > 150
    assert not {" ".join(w) for w, _ in ner.train} & {" ".join(w) for w, _ in ner.test}

    def names(sentences, kind):  # the entities of one type, as text
        from llmlab.text.span_metrics import entities

        return {" ".join(w[a:b + 1]) for w, t in sentences for k, a, b in entities(t) if k == kind}

    for kind in ("LOC", "ORG", "MOD"):  # test entities are never seen in training
        assert names(ner.test, kind) and not names(ner.train, kind) & names(ner.test, kind)
    qa = qa_task()
    assert len(qa.train) > 500 and len(qa.test) > 50
    assert not {e.key.split(":")[0] for e in qa.train} & {e.key.split(":")[0] for e in qa.test}  # whole topics
    for e in qa.train + qa.test:
        assert e.context[e.answer_start:e.answer_start + len(e.answer)] == e.answer
        assert re.search(r"\bwhat\b", e.question)


# ---- bad input -----------------------------------------------------------------------------------------------------

def _cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_one_line_exit_2(tmp_path, capsys, tiny_head_encoder):
    base = ["head", "--model", tiny_head_encoder, "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress",
            "--threads", "1"]
    cls = tmp_path / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": f"text number {i}", "label": ["a", "b", "zz"][i % 3]}) + "\n"
                           for i in range(12)))
    code, err = _cli([*base, "--task", "classify", "--data", str(cls), "--labels", "a,b"], capsys)
    assert code == 2 and err.count("\n") == 0 and "outside the label set" in err and "zz" in err, err
    ner = tmp_path / "ner.jsonl"
    ner.write_text(json.dumps({"tokens": ["Ada", "left"], "tags": ["B-PER", "O"]}) + "\n"
                   + json.dumps({"tokens": ["Bob", "ran"], "tags": ["B-XYZ", "X"]}) + "\n")
    code, err = _cli([*base, "--task", "ner", "--data", str(ner), "--labels", "PER"], capsys)
    assert code == 2 and err.count("\n") == 0 and "2 tag(s) outside the label set" in err, err
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": "Who?", "context": "Ada wrote it.", "answer": "Ada"},
            {"question": "What?", "context": "Ada wrote it.", "answer": "Bob"},
            {"question": "Where?", "context": "In Paris.", "answer": "Paris", "answer_start": 0},
            {"question": "When?", "context": "In May.", "answer": "May"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _cli([*base, "--task", "qa", "--data", str(qa)], capsys)
    assert code == 2 and err.count("\n") == 0 and "2 of 4 answers are not spans of their context (lines 2, 3)" in err
    empty = tmp_path / "empty.jsonl"  # an empty corpus, for each task
    empty.write_text("")
    for task, needle in (("classify", "0 examples"), ("ner", "no lines"), ("qa", "no lines")):
        code, err = _cli([*base, "--task", task, "--data", str(empty)], capsys)
        assert code == 2 and err.count("\n") == 0 and needle in err, (task, err)
    code, err = _cli([*base, "--task", "qa", "--stride", "500"], capsys)
    assert code == 2 and "--stride" in err
    with pytest.raises(LlmlabError, match="not spans"):
        read_qa(str(qa))
    with pytest.raises(LlmlabError, match="outside the label set"):
        read_tagged(str(ner), ["O", "B-PER", "I-PER"])


def test_task_folder_of_another_task_or_labels_is_refused(tmp_path, tiny_head_encoder):
    loaded, model, labels = load_head(tiny_head_encoder, "ner", ["O", "B-PER", "I-PER"])
    save_head(tmp_path / "ner", model, loaded, labels)
    with pytest.raises(LlmlabError, match="BertForTokenClassification folder, not BertForSequenceClassification"):
        load_head(str(tmp_path / "ner"), "classify", ["a", "b"])
    with pytest.raises(LlmlabError, match="outside the model's label set"):
        load_head(str(tmp_path / "ner"), "ner", ["O", "B-LOC", "I-LOC"])
    _, again, got = load_head(str(tmp_path / "ner"), "ner", labels)
    assert got == labels
    torch.testing.assert_close(again.head.weight, model.head.weight)


def test_resumed_lora_run_equals_uninterrupted(tmp_path, tiny_head_encoder):
    """NER with LoRA: 3 steps straight, or 2 steps and then resumed to 3, give the same model bit for bit (the
    unused pooler is frozen, so every trainable tensor has optimizer state in the checkpoint)."""
    from llmlab.formats.safetensors import load

    base = ["head", "--task", "ner", "--model", tiny_head_encoder, "--batch-size", "4", "--no-progress",
            "--threads", "1", "--max-tokens", "24"]
    assert main([*base, "--steps", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--steps", "3", "--out", str(tmp_path / "b")]) == 0
    setups = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in setups if r["kind"] == "setup"] == [0, 2]  # the second call resumed
    a, b = load(tmp_path / "a" / "model" / "model.safetensors"), load(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the README's commands -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_head_encoder(tmp_path_factory):
    """A random 2-layer BERT (dim 32) with all-MiniLM-L6-v2's tokenizer, as a Hugging Face folder."""
    from llmlab.formats import hf
    from llmlab.models.bert import BertModel

    src = embedded_path("all-minilm-l6-v2")
    cfg = hf.read_config(src)
    cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim = 32, 2, 2, 2, 64, 16
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    hf.write_folder(folder, cfg, BertModel(cfg).state_dict())
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, folder / name)
    return str(folder)


def _readme_head_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## BERT task heads"):]
    section = section[:section.index("\n## ", 4)]
    return [line.strip() for block in section.split("```")[1::2] for line in block.splitlines()
            if line.strip().startswith("llmlab head")]


def test_readme_head_commands_as_written(tmp_path, monkeypatch, capsys, tiny_head_encoder):
    """Each README command, with a tiny random encoder in place of MiniLM and a budget of two steps."""
    monkeypatch.chdir(tmp_path)
    commands = _readme_head_commands()
    assert {shlex.split(c)[shlex.split(c).index("--task") + 1] for c in commands} == {"classify", "ner", "qa"}
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        argv += ["--model", tiny_head_encoder, "--steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1"]
        assert main(argv) == 0, command
        out = capsys.readouterr().out
        assert "held-out" in out and "->" in out, (command, out)
        run = Path(argv[argv.index("--out") + 1])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["after"] is not None
        assert json.loads((run / "model" / "config.json").read_text())["architectures"][0].startswith("BertFor")


def test_qlora_merges_a_low_rank_update_into_the_nf4_base(tmp_path, capsys, tiny_head_encoder):
    """--method qlora (Dettmers et al. 2023): LoRA over the encoder's linear layers stored in NF4, as many trainable
    parameters as LoRA; the saved weight minus the NF4-rounded original is the merged update B A, of rank <= r,
    while minus the float original it is full rank (the rounding noise)."""
    from llmlab.formats import safetensors
    from llmlab.nn.lora import lora_modules
    from llmlab.nn.nf4 import NF4Linear, dequantize_nf4, quantize_nf4
    from llmlab.train.heads import apply_method_

    labels = ["O", "B-PER", "I-PER"]
    counts = []
    for method in ("lora", "qlora"):
        _, model, _ = load_head(tiny_head_encoder, "ner", labels)
        counts.append(apply_method_(model, HeadConfig(task="ner", method=method, lora_r=2)))
    bases = [m.base_layer for m in lora_modules(model).values()]
    assert len(bases) == 13 and all(isinstance(b, NF4Linear) for b in bases)  # 6 per layer, the pooler
    assert counts[0] == counts[1]
    out, data = tmp_path / "q", tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps({"tokens": [name, "left", "early"], "tags": ["B-PER", "O", "O"]}) + "\n"
                            for name in ("Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo")))
    assert main(["head", "--task", "ner", "--data", str(data), "--method", "qlora", "--lora-r", "2", "--lr", "1e-2",
                 "--model", tiny_head_encoder, "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--no-progress", "--threads", "1"]) == 0
    assert "(qlora, 1.9K of 1.0M parameters train)" in capsys.readouterr().out  # NF4 weights counted
    name = "encoder.layer.1.attention.self.query.weight"
    w0 = next(v for k, v in safetensors.load(Path(tiny_head_encoder) / "model.safetensors").items()
              if k.endswith(name))
    w = safetensors.load(out / "model" / "model.safetensors")[f"bert.{name}"]
    merged = torch.linalg.svdvals((w - dequantize_nf4(quantize_nf4(w0))).double())
    noisy = torch.linalg.svdvals((w - w0).double())
    assert merged[0] > 1e-5 and merged[2:].max() < 1e-4 * merged[0], merged  # rank 2: the trained B A
    assert noisy[2] > 1e4 * merged[2], noisy  # beyond rank 2: NF4's rounding of every weight


def test_help_shows_every_default():
    from llmlab.cli import build_parser

    groups = next(a for a in build_parser({"head"})._actions if a.dest == "command").choices
    body = groups["head"].format_help().split("options:", 1)[1]
    entries = [e for e in re.split(r"\n  (?=-)", "\n" + body)[1:] if not e.startswith("-h")]
    assert len(entries) > 30 and all("(default" in " ".join(e.split()) for e in entries)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
