"""``llmlab eval``: BLEU / chrF equal to sacrebleu's, ROUGE equal to rouge-score's, Spearman equal to scipy's,
continuation log-likelihoods and perplexity equal to transformers' on the same weights, the multiple-choice and
calibration arithmetic, the file shapes, bad input (one line, exit 2), and the README's commands (tiny models)."""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import need
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.eval import text_metrics as M
from llmlab.eval.harness import EvalConfig, choice_requests, choose, run_choice, run_eval
from llmlab.eval.loglik import encode_pair, loglikelihoods, pack_rows
from llmlab.eval.perplexity import perplexity
from llmlab.eval.task_files import ChoiceItem
from llmlab.eval.tasks import TaskSpec, choice_items, parse_tasks
from llmlab.formats.load import load_model
from llmlab.text.retrieval_set import RetrievalSet

README = Path(__file__).resolve().parents[1] / "README.md"


# ---- text metrics: parity with sacrebleu and rouge-score ----------------------------------------------------------

def _corpus(seed: int = 0):
    """Docstrings as references; predictions = the same words with a third swapped, some cut short; two
    references per example (the second a shuffle), punctuation, digits and a '&amp;' on the way."""
    from llmlab.text.tasks import clean_docstrings

    docs = [d for _, _, d in clean_docstrings(("json", "textwrap"))][:50] + ["Costs 3.5 & 1,000 - tom&amp;jerry (ok)."]
    rng = random.Random(seed)
    preds, refs = [], []
    for d in docs:
        w = d.split()
        p = list(w)
        for _ in range(len(w) // 3):
            p[rng.randrange(len(p))] = rng.choice(w)
        if rng.random() < 0.3:
            p = p[: len(p) // 2]
        preds.append(" ".join(p))
        refs.append([d, " ".join(rng.sample(w, len(w)))])
    # edge cases: an order with n-grams but no match (BLEU's smoothing), a reference shorter than chrF's orders,
    # three-letter words the stemmer must leave alone ("its" is not "it"); references 1 token shorter and longer
    edges = [("the cat sat on mat", ["the cat lay on the mat", "a dog sat down"]), ("abcdefgh xyz", ["ab", "ab"]),
             ("its was running", ["it wa runs", "x"])]
    return preds + [p for p, _ in edges], refs + [r for _, r in edges]


def test_bleu_and_chrf_equal_sacrebleu():
    sacrebleu = need("sacrebleu")
    preds, refs = _corpus()
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert M.corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score, abs=1e-9)
    one = [[r[0]] for r in refs]
    assert M.corpus_bleu(preds[:5], one[:5]) == pytest.approx(
        sacrebleu.corpus_bleu(preds[:5], [streams[0][:5]]).score, abs=1e-9)
    short = ["a b", "the cat"]  # no 3- or 4-grams match: the exp smoothing decides
    assert M.corpus_bleu(short, [["a b c"], ["the cat sat"]]) == pytest.approx(
        sacrebleu.corpus_bleu(short, [["a b c", "the cat sat"]]).score, abs=1e-9)
    for pred, ref in zip(preds[-3:], refs[-3:]):  # the edge cases alone, where corpus sums do not hide them
        assert M.corpus_bleu([pred], [ref]) == pytest.approx(sacrebleu.corpus_bleu([pred], [[r] for r in ref]).score)
        assert M.corpus_chrf([pred], [ref]) == pytest.approx(sacrebleu.corpus_chrf([pred], [[r] for r in ref]).score)
    for word_order in (0, 2):  # chrF and chrF++
        assert M.corpus_chrf(preds, refs, word_order=word_order) == pytest.approx(
            sacrebleu.corpus_chrf(preds, streams, word_order=word_order).score, abs=1e-9)


def test_rouge_equals_rouge_score():
    need("rouge_score")
    from rouge_score import rouge_scorer

    preds, refs = _corpus(1)
    preds, refs = preds[:20] + preds[-4:], refs[:20] + refs[-4:]  # rouge-score's LCS is slow pure Python
    for kind in ("rouge1", "rouge2", "rougeL"):
        for stem in (False, True):
            scorer = rouge_scorer.RougeScorer([kind], use_stemmer=stem)
            ref = [scorer.score_multi(r, p)[kind].fmeasure for p, r in zip(preds, refs)]
            assert M.rouge(preds, refs, kind, stem) == pytest.approx(100 * sum(ref) / len(ref), abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert M.rouge_pair("", "a b", "rougeL") == scorer.score("a b", "")["rougeL"].fmeasure == 0


def test_squad_exact_match_f1_and_spearman():
    assert M.exact_match("The Eiffel tower!", ["eiffel  Tower", "x"]) == 100.0
    assert M.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel tower paris", reference "eiffel tower": 2 common, P 2/3, R 1 -> F1 0.8
    assert M.token_f1("the Eiffel Tower, Paris", ["Eiffel Tower"]) == pytest.approx(80.0)
    scipy_stats = need("scipy.stats")
    x = torch.tensor([0.1, 0.4, 0.4, 0.2, 0.9, 0.9, 0.3])
    y = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 4.0, 1.0])
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


# ---- log-likelihoods and perplexity: parity with transformers ---------------------------------------------------

@pytest.fixture(scope="module")
def twins(tiny_chat):
    """The tiny random Llama with SmolLM2's tokenizer, in llmlab and in transformers (same folder)."""
    transformers = need("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32).eval()
    return load_model(tiny_chat), ref


def test_loglikelihoods_equal_transformers(twins):
    loaded, ref = twins
    tok = loaded.tokenizer
    requests = [("The capital of France is", " Paris"), ("The capital of France is ", "Paris"),
                ("def add(a, b):\n    return", " a + b"), ("", "Hello world"), ("x" * 10, " y"),
                ("The capital of France is", " Paris"), ("def add(a, b):\n    return", " sum((a, b))"),
                ("def add(a, b):\n    return", " b + a")]  # a context shared by three multi-token choices
    got = loglikelihoods(loaded.model, tok, requests, batch_size=4)
    for (ctx, cont), s in zip(requests, got):
        c, k = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + k])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0].double(), -1)  # (T, V)
        targets = ids[0, len(c):]
        want = logp[len(c) - 1:-1].gather(1, targets[:, None]).sum()
        greedy = bool((logp[len(c) - 1:-1].argmax(-1) == targets).all())
        assert s.logprob == pytest.approx(float(want), abs=2e-4) and s.greedy == greedy and s.tokens == len(k)
    # the boundary: trailing context spaces move into the continuation, so both spellings score the same tokens
    assert got[0] == got[1] == got[5]
    assert encode_pair(tok, "The capital of France is ", "Paris")[1] == tok.encode(" Paris", add_bos=False)
    ctx = tok.encode("The capital of France is", add_bos=False)  # two spaces: both move to the continuation
    whole = tok.encode("The capital of France is  Paris", add_bos=False)
    assert encode_pair(tok, "The capital of France is  ", "Paris") == (ctx, whole[len(ctx):])
    assert encode_pair(tok, "", "Hello")[0] == [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    # a group too long for one row is split; a context too long keeps its end
    assert pack_rows({(1, 2, 3, 9): [(4, 5, 6), (7, 8)]}, max_len=5) == [
        ((1, 2, 3, 9), [2, 3, 9], [(7, 8)]), ((1, 2, 3, 9), [2, 3, 9], [(4, 5, 6)])]


def test_perplexity_equals_transformers(twins):
    """Non-overlapping windows of 64 tokens (stride 64), every token but each window's first predicted: exp of
    the mean of transformers' per-window losses (equal-sized windows)."""
    loaded, ref = twins
    from llmlab.compress.calibrate import heldout_text

    ids = torch.tensor(loaded.tokenizer.encode(heldout_text(), add_bos=False)[:64 * 5 + 17])
    ours = perplexity(loaded.model, ids, window=64, batch=2)
    with torch.no_grad():
        losses = [float(ref(w[None], labels=w[None]).loss) for w in ids[:320].reshape(5, 64)]
    assert ours.tokens == 5 * 63
    assert ours.perplexity == pytest.approx(float(torch.tensor(losses).mean().exp()), rel=1e-5)


# ---- multiple choice: the arithmetic, the shapes, calibration ---------------------------------------------------

ARC = {"id": "1", "question": "Which gas do plants take in?", "answerKey": "B",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}}
MMLU = {"question": "2 + 2 =", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "elementary_mathematics"}
HELLASWAG = {"activity_label": "Cooking", "ctx": "She cracks two eggs into the bowl and", "label": "0",
             "endings": ["whisks them with a fork.", "drives the car away.", "paints the ceiling.", "sings loudly."]}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_choice_accuracy_and_calibration_by_hand(twins, tmp_path):
    """acc / acc_norm / acc_calibrated recomputed from the per-choice log-likelihoods; the shapes' prompts."""
    loaded, _ = twins
    rows = [dict(MMLU, question=f"{a} + {b} =", choices=[str(a + b + d) for d in (-1, 0, 1, 2)], answer=1)
            for a, b in ((1, 2), (3, 4), (10, 5), (7, 7), (2, 9))]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    spec = parse_tasks(f"mmlu:{path}")[0]
    items, _ = choice_items(spec)
    assert items[0].context == "1 + 2 =\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
    assert items[0].choices == [" A", " B", " C", " D"]
    assert items[0].content_free == "N/A\nA. N/A\nB. N/A\nC. N/A\nD. N/A\nAnswer:"
    assert items[0].description.startswith("The following are multiple choice questions (with answers) about "
                                           "elementary mathematics.")
    cfg = EvalConfig(calibrate=True, num_fewshot=1, seed=3).validate()
    metrics, n, _ = run_choice(loaded, spec, cfg)
    hits = {"acc": 0, "acc_norm": 0, "acc_calibrated": 0}
    for i, item in enumerate(items):
        others = items[:i] + items[i + 1:]
        shot = random.Random(f"3/{i}").sample(others, 1)[0]
        prefix = item.description + shot.context + shot.choices[shot.gold] + "\n\n"
        ll = [s.logprob for s in loglikelihoods(loaded.model, loaded.tokenizer,
                                                [(prefix + item.context, c) for c in item.choices])]
        cf = [s.logprob for s in loglikelihoods(loaded.model, loaded.tokenizer,
                                                [(prefix + item.content_free, c) for c in item.choices])]
        p = torch.softmax(torch.tensor(ll, dtype=torch.float64), 0)
        q = p / torch.softmax(torch.tensor(cf, dtype=torch.float64), 0)  # W = diag(p_cf)^-1
        hits["acc"] += max(range(4), key=ll.__getitem__) == item.gold
        hits["acc_norm"] += max(range(4), key=lambda j: ll[j] / len(item.choices[j])) == item.gold
        hits["acc_calibrated"] += int(q.argmax()) == item.gold
    assert n == 5 and metrics == {k: v / 5 for k, v in hits.items()}


def test_choose_and_requests_by_hand():
    """The picks on numbers where each rule gives a different answer, and the exact few-shot prompt."""
    ll = torch.tensor([-4.0, -5.0, -6.5], dtype=torch.float64)
    lengths = torch.tensor([2.0, 5.0, 13.0], dtype=torch.float64)  # per character: -2, -1, -0.5
    cf = torch.tensor([-1.0, -4.5, -3.0], dtype=torch.float64)  # ll - cf: -3, -0.5, -3.5
    assert choose(ll, lengths, cf) == {"acc": 0, "acc_norm": 2, "acc_calibrated": 1}
    p = torch.softmax(ll, 0) / torch.softmax(cf, 0)  # the paper's W p, W = diag(p_cf)^-1
    assert int(p.argmax()) == 1
    items = [ChoiceItem(f"Q{i}?", [" no", " yes"], 1, "N/A?", "Header.\n\n") for i in range(3)]
    reqs = choice_requests(items, None, EvalConfig(num_fewshot=1, calibrate=True, seed=7))
    shot = random.Random("7/0").sample(items[1:], 1)[0]
    prefix = f"Header.\n\n{shot.context}{shot.choices[shot.gold]}\n\n"
    assert reqs[:4] == [(prefix + "Q0?", " no"), (prefix + "Q0?", " yes"), (prefix + "N/A?", " no"),
                        (prefix + "N/A?", " yes")]
    assert len(reqs) == 12


def test_other_shapes_and_builtin_task(tmp_path):
    arc = choice_items(parse_tasks(f"arc:{_jsonl(tmp_path / 'a.jsonl', [ARC])}")[0])[0][0]
    assert (arc.context, arc.choices, arc.gold) == ("Question: Which gas do plants take in?\nAnswer:",
                                                    [" oxygen", " carbon dioxide", " helium"], 1)
    hs = choice_items(parse_tasks(f"hellaswag:{_jsonl(tmp_path / 'h.jsonl', [HELLASWAG])}")[0])[0][0]
    assert hs.context == "Cooking: She cracks two eggs into the bowl and" and hs.gold == 0
    test, train = choice_items(TaskSpec("stdlib-mc", "choice"))
    again, _ = choice_items(TaskSpec("stdlib-mc", "choice"))
    assert len(test) > 100 and len(train) > 4 * len(test) // 2
    assert [(i.context, i.choices, i.gold) for i in test] == [(i.context, i.choices, i.gold) for i in again]
    assert all(len(i.choices) == len(set(i.choices)) == 4 for i in test)
    golds = [i.gold for i in test]
    assert len(set(golds)) == 4  # the right answer is not always in one place
    assert not {i.context for i in test} & {i.context for i in train}


# ---- the command: every task kind, bad input ------------------------------------------------------------------

def test_cli_every_lm_task_kind_and_json(tiny_chat, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run without --output saves under runs/eval/ here
    files = {"arc": [ARC, dict(ARC, answerKey="A")], "mmlu": [MMLU, dict(MMLU, answer="C")],
             "hellaswag": [HELLASWAG, dict(HELLASWAG, label=2)],
             "gen": [{"prompt": "Say hi.", "answer": ["hi", "hello"]}, {"prompt": "Name a color.", "answer": "red"}]}
    tasks = [f"{k}:{_jsonl(tmp_path / (k + '.jsonl'), rows)}" for k, rows in files.items()]
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    tasks += [f"ppl:{tmp_path / 't.txt'}", "addition"]
    out = tmp_path / "res" / "r.json"
    (tmp_path / "res").mkdir()
    assert main(["eval", str(tiny_chat), "--tasks", ",".join(tasks), "--limit", "2", "--num-fewshot", "1",
                 "--calibrate", "--max-new-tokens", "4", "--window", "32", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["task"] for r in result["results"]] == tasks
    by_task = {r["task"]: r for r in result["results"]}
    assert set(by_task[tasks[0]]["metrics"]) == {"acc", "acc_norm", "acc_calibrated"}
    assert set(by_task[tasks[3]]["metrics"]) == {"exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"}
    ppl = by_task[tasks[4]]
    assert ppl["settings"]["window"] == ppl["settings"]["stride"] == 32 and ppl["metrics"]["perplexity"] > 1
    assert by_task["addition"]["n"] == 2 and 0 <= by_task["addition"]["metrics"]["exact_match"] <= 100
    assert all(r["task"] in table for r in result["results"]) and table.startswith("| model | task |")
    # chain of thought and raw prompts run too
    assert main(["eval", str(tiny_chat), "--tasks", tasks[3], "--cot", "--no-chat", "--max-new-tokens", "3",
                 "--limit", "1"]) == 0


def test_bad_input_is_one_line_and_exit_2(tiny_chat, tiny_encoder, tmp_path, capsys):
    one = dict(MMLU, choices=["4"], answer=0)
    cases = [
        (["--tasks", f"mmlu:{_jsonl(tmp_path / 'one.jsonl', [MMLU, one])}"], r"one\.jsonl:2: 'choices' has 1 choice"),
        (["--tasks", f"arc:{_jsonl(tmp_path / 'miss.jsonl', [ARC, {'question': 'q', 'choices': {}}])}"],
         r"miss\.jsonl:2: missing field 'answerKey'"),
        (["--tasks", f"hellaswag:{_jsonl(tmp_path / 'lab.jsonl', [dict(HELLASWAG, label=7)])}"],
         r"lab\.jsonl:1: 'label' is 7"),
        (["--tasks", "gen:" + _jsonl(tmp_path / "g.jsonl", [{"prompt": "x"}])], r"g\.jsonl:1: missing field"),
        (["--tasks", "nosuch"], r"unknown task 'nosuch'"),
        (["--tasks", f"mmlu:{tmp_path / 'absent.jsonl'}"], r"no such file"),
        (["--tasks", "retrieval"], r"needs an encoder"),
        (["--limit", "-5"], r"--limit"),
    ]
    for extra, pattern in cases:
        assert main(["eval", str(tiny_chat), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), (extra, err)
    assert main(["eval", tiny_encoder, "--tasks", "stdlib-mc"]) == 2  # an encoder asked for an LM task
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder" in err and "cannot score log-likelihoods" in err
    assert main(["eval", str(tiny_chat), "--tasks", "sts:" + _jsonl(tmp_path / "s.jsonl", [{}])]) == 2


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (dim 32) with all-MiniLM-L6-v2's tokenizer, as a Hugging Face folder."""
    from llmlab.formats import hf
    from llmlab.formats.load import embedded_path
    from llmlab.models.bert import BertModel

    src = embedded_path("all-minilm-l6-v2")
    cfg = hf.read_config(src)
    cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim = 32, 2, 2, 2, 64, 16
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    hf.write_folder(folder, cfg, BertModel(cfg).state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy2(src / name, folder / name)
    return str(folder)


def test_encoder_tasks(tiny_encoder, tmp_path, small_retrieval_set):
    from llmlab.eval.retrieval import evaluate_model

    rows = [{"sentence1": f"a cat sat {i}", "sentence2": f"a cat sat {i}" if i % 2 else "stock markets fell",
             "score": float(i % 2) * 5} for i in range(6)]
    path = _jsonl(tmp_path / "sts.jsonl", rows)
    result = run_eval([tiny_encoder], EvalConfig(tasks=f"retrieval,sts:{path}", limit=5), log=lambda _: None)
    ret, sts = result["results"]
    assert ret["n"] == 5 and ret["settings"]["documents"] == len(small_retrieval_set.corpus)
    loaded = load_model(tiny_encoder)
    qids = list(small_retrieval_set.queries)[:5]  # --limit 5: the first five queries against the whole corpus
    five = RetrievalSet({q: small_retrieval_set.queries[q] for q in qids}, small_retrieval_set.corpus,
                        {q: small_retrieval_set.relevant[q] for q in qids})
    want = evaluate_model(loaded.model, loaded.tokenizer, five, [loaded.config.dim],
                          precision="auto")[loaded.config.dim]  # --encoder-precision's default
    assert ret["metrics"] == {k: want[k] for k in ("ndcg@10", "recall@10", "mrr@10")}
    assert sts["metrics"]["spearman"] > 50  # identical pairs have cosine 1, above every different pair
    with pytest.raises(LlmlabError, match="at least 2"):
        run_eval([tiny_encoder], EvalConfig(tasks=f"sts:{_jsonl(tmp_path / 'o.jsonl', [rows[0]])}"))


# ---- the README's commands ------------------------------------------------------------------------------------

def readme_eval_lines() -> list[list[str]]:
    """Every ``llmlab eval`` line but those scoring a run folder (``runs/...``), which only exists after the
    README's training lines before it: the test of that section runs them in order (tests/test_rationales.py)."""
    text = README.read_text()
    lines = [shlex.split(line.strip().removeprefix("llmlab "), comments=True) for line in text.splitlines()
             if line.strip().startswith("llmlab eval")]
    return [args for args in lines if not (len(args) > 1 and args[1].startswith("runs/"))]


def test_readme_commands(tiny_chat, tiny_encoder, tmp_path, monkeypatch, small_retrieval_set):
    """The README's `llmlab eval` lines as written, on the tiny models (in place of the embedded ones) with a small
    budget appended."""
    import llmlab.formats.load as fl

    lines = readme_eval_lines()
    assert len(lines) >= 3
    real = fl.load_model
    swap = {fl.DEFAULT_CHAT: str(tiny_chat), fl.DEFAULT_EMBED: tiny_encoder}
    monkeypatch.setattr(fl, "load_model", lambda source=None, **kw: real(swap.get(source, source), **kw))
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "arc.jsonl", [ARC, dict(ARC, answerKey="C")])
    (tmp_path / "notes.txt").write_text("Plain text to measure perplexity on. " * 30)
    for args in lines:
        assert main([*args, "--limit", "2", "--ppl-tokens", "128", "--max-new-tokens", "3"]) == 0, args
