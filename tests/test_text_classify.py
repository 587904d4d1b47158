"""The logistic-regression baseline against scikit-learn (same convex objective, same optimum), its sparse
gradient against autograd's, and the classify / tfidf / ngram-lm commands: README lines as written, every
flag's default in --help, bad input as one line and exit 2."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.cli import build_parser, main
from llmlab.text.classify import ClassifyConfig, LogisticRegression, SparseMatmul, run_classify, to_csr
from llmlab.text.features import FeatureConfig, Vectorizer
from llmlab.text.tasks import TextTask, docstring_task

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def task():
    return docstring_task()


def test_logistic_regression_equals_sklearn(task):
    linear = pytest.importorskip("sklearn.linear_model")
    keep = [i for i, y in enumerate(task.train_labels) if y < 5]  # five modules, about 350 docstrings
    docs, y = [task.train_texts[i] for i in keep], torch.tensor([task.train_labels[i] for i in keep])
    x = Vectorizer(FeatureConfig(min_df=2)).fit_transform(docs)
    l2 = 1e-2
    ours = LogisticRegression(ClassifyConfig(l2=l2, max_iter=500), dtype=torch.float64).fit(x, y, 5)
    ref = linear.LogisticRegression(C=1 / (l2 * len(docs)), tol=1e-12, max_iter=5000).fit(x.to_dense().numpy(),
                                                                                           y.numpy())
    p_ours = torch.softmax(ours.logits(x), dim=1)
    p_ref = torch.from_numpy(ref.predict_proba(x.to_dense().numpy()))
    torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=1e-5)
    # The weights are identified only up to a constant per feature row (softmax); compare centred.
    w_ours = ours.weight - ours.weight.mean(dim=1, keepdim=True)
    w_ref = torch.from_numpy(ref.coef_.T)
    torch.testing.assert_close(w_ours, w_ref - w_ref.mean(dim=1, keepdim=True), rtol=0, atol=1e-4)
    # Negative control: a ten times weaker penalty is a different optimum, and the comparison sees it.
    weak = LogisticRegression(ClassifyConfig(l2=l2 / 10, max_iter=500), dtype=torch.float64).fit(x, y, 5)
    assert (torch.softmax(weak.logits(x), dim=1) - p_ref).abs().max() > 1e-2


def test_sparse_matmul_gradient_equals_autograd():
    torch.manual_seed(0)
    dense = torch.rand(7, 11, dtype=torch.float64) * (torch.rand(7, 11) < 0.3)
    w = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 3, dtype=torch.float64)
    x = dense.to_sparse()
    out = SparseMatmul.apply(to_csr(x), to_csr(x.t()), w)
    (grad,) = torch.autograd.grad(out, w, g)
    torch.testing.assert_close(out, dense @ w)
    torch.testing.assert_close(grad, dense.t() @ g)


def test_classifier_learns_the_builtin_task(task):
    r = run_classify(FeatureConfig(), ClassifyConfig(), task, top_terms=3)
    assert r["classes"] == 19 and r["test"] > 150
    assert r["test_accuracy"] > 0.7 > 0.3 > r["majority_accuracy"]
    assert "loop" in r["top_terms"]["asyncio"] or "event" in r["top_terms"]["asyncio"]


def _readme_text_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Classic NLP"):]
    section = section[:section.index("\n## ", 4)]
    return [line.strip() for block in section.split("```")[1::2] for line in block.splitlines()
            if line.strip().startswith("llmlab text")]


def test_readme_commands_as_written(capsys):
    commands = _readme_text_commands()
    assert len(commands) >= 4 and {c.split()[2] for c in commands} == {"tfidf", "classify", "ngram-lm"}
    for command in commands:
        assert main(shlex.split(command, comments=True)[1:]) == 0, command
        out = capsys.readouterr().out
        assert re.search(r"accuracy|perplexity|documents x", out), (command, out)


def test_readme_python_block_as_written(capsys):
    text = README.read_text()
    section = text[text.index("## Classic NLP"):]
    section = section[:section.index("\n## ", 4)]
    (block,) = [b.partition("\n")[2] for b in section.split("```")[1::2]
                if b.startswith("python") and "porter_stem" in b]
    exec(compile(block, "README.md (Classic NLP)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "['connect', 'connect', 'relat']" and out[2].startswith("44.25")
    assert out[-1] == "torch.Size([4, 10, 64]) torch.Size([4, 4, 32])"


def test_first_commands_with_no_arguments_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "llmlab", "text", "ngram-lm"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"order 3: held-out perplexity \d+\.\d\d", proc.stdout)


def test_help_lists_every_flag_with_default():
    parser = build_parser({"text"})
    sub = next(a for a in parser._actions if a.dest == "command").choices["text"]
    commands = next(a for a in sub._actions if a.dest == "text_command").choices
    for name in ("tfidf", "classify", "ngram-lm"):
        body = commands[name].format_help().split("options:", 1)[1]
        entries = re.split(r"\n  (?=-)", "\n" + body)[1:]
        assert len(entries) >= 4
        for entry in entries:
            if not entry.startswith("-h"):
                assert "(default:" in " ".join(entry.split()), (name, entry)


@pytest.mark.parametrize("argv,needle", [
    (["text", "tfidf", "{empty}"], "the corpus is empty"),
    (["text", "ngram-lm", "{empty}"], "the corpus is empty"),
    (["text", "tfidf", "--min-df", "5000"], "leave no terms"),
    (["text", "tfidf", "--stop-words", "{stops}"], "hold no word terms"),
    (["text", "ngram-lm", "--min-count", "100000"], "leaves no words"),
    (["text", "classify", "--data", "{one_label}"], "at least two labels"),
    (["text", "classify", "--data", "{missing}"], "no such file"),
    (["text", "classify", "--data", "{binary}"], "not UTF-8 text (byte 2; give a JSONL file"),
    (["text", "tfidf", "{binary}"], "not UTF-8 text (byte 2"),
    (["text", "tfidf", "{folder}"], "no such file (give UTF-8 text or JSONL files)"),
    (["vectors", "eval", "--test-set", "{binary}"], "not UTF-8 text (byte 2; give a test set"),
    (["vectors", "eval", "--test-set", "{missing}"], "no such file (give a test set"),
    (["text", "ngram-lm", "--order", "1"], "order >= 2"),
    (["text", "tfidf", "--query", "zzqqxx"], "none of its terms"),
    (["text", "tfidf", "--show", "-1"], "must be >= 0"),
    (["text", "classify", "--l2", "-1"], "l2 >= 0"),
    (["text", "classify", "--top-terms", "-2"], "must be >= 0"),
    (["text", "ngram-lm", "{short}"], "give --heldout FILE"),
    (["text", "tfidf", "--analyzer", "char", "--ngram-min", "3", "--ngram-max", "2"], "ngram-min <= ngram-max"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, needle):
    files = {"empty": tmp_path / "empty.txt", "stops": tmp_path / "stops.txt", "one_label": tmp_path / "one.jsonl",
             "missing": tmp_path / "missing.jsonl", "short": tmp_path / "short.txt", "binary": tmp_path / "b.jsonl",
             "folder": tmp_path}
    files["binary"].write_bytes(b"ab\xff\xfe")
    files["short"].write_text("One sentence here. And a second one.")
    files["empty"].write_text("\n\n  \n")
    files["stops"].write_text("the and of\n\na is it\n")
    files["one_label"].write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "x"}\n')
    assert main([a.format(**{k: str(v) for k, v in files.items()}) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmlab: error:") and needle in err, err


def test_bad_input_exit_2_in_a_subprocess(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = subprocess.run([sys.executable, "-m", "llmlab", "text", "tfidf", str(tmp_path / "empty.txt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"llmlab: error: {tmp_path / 'empty.txt'}: the corpus is empty "
                                                "(no text found)"]


def test_user_task_from_jsonl(tmp_path):
    lines = [f'{{"text": "the {w} sat on a mat number {i}", "label": "{lab}"}}'
             for i in range(60) for w, lab in (("cat", "animal"), ("car", "vehicle"))]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    from llmlab.text.classify import labelled_task

    t: TextTask = labelled_task(str(tmp_path / "d.jsonl"))
    assert t.labels == ["animal", "vehicle"] and len(t.train_texts) + len(t.test_texts) == 120
    assert run_classify(FeatureConfig(), ClassifyConfig(), t)["test_accuracy"] == 1.0
