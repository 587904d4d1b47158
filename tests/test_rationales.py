"""llmlab data rationales: Fine-tune-CoT's answer filter, the exact tool rationales, the JSONL round trip into
llmlab sft, teacher runs (tiny random teacher in a subprocess, the real SmolLM2 once), bad input, README lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.data.scratchpads import scratchpad
from llmlab.data.tasks import Example, get_task
from llmlab.train.rationales import RationalesConfig, icl_messages, records, run_rationales, teacher_question

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---- the answer filter on hand-made rationales ----------------------------------------------------------------


def test_filter_keeps_exactly_the_rationales_whose_answer_verifies():
    task = get_task("letter_count")
    q = Example('How many times does the letter "r" appear in "rbtrea"? Reply with the number only.', "2")
    right = "Let's think step by step. r, b, t, r, e, a: two r.\nTherefore, the answer is 2."
    replies = [[right,
                "Let's think step by step. I see one r.\nTherefore, the answer is 1.",  # wrong answer
                "Let's think step by step. There are 2 letters r in 5 letters.",  # no marker: first line, not a number
                right,  # a duplicate of a kept reply
                "Let's think step by step. Counting...\nTherefore, the answer is 2 times."]]  # 2 after extraction
    rows, counts = records(task, [q], replies, "verified", "hand", "cot")
    assert [r["messages"][1]["content"] for r in rows] == [right, replies[0][4]]
    assert counts == {"questions": 1, "replies": 5, "verified": 3, "questions_verified": 1, "kept": 2}
    assert all(r["verified"] and r["answer"] == "2" and r["messages"][0]["content"] == q.prompt for r in rows)
    rows, counts = records(task, [q], replies, "all", "hand", "icl")
    assert [r["verified"] for r in rows] == [True, False, False, True] and counts["kept"] == 4


@pytest.mark.parametrize("task,prompt,answer,steps", [
    ("addition", "What is 95 + 487? Reply with the number only.", "582",
     "Add 95 and 487 column by column from the right. 5 + 7 = 12, write 2, carry 1. 9 + 8 + 1 = 18, write 8, "
     "carry 1. 0 + 4 + 1 = 5, write 5."),
    ("addition", "What is 99 + 1? Reply with the number only.", "100",
     "Add 99 and 1 column by column from the right. 9 + 1 = 10, write 0, carry 1. 9 + 0 + 1 = 10, write 0, "
     "carry 1. Write the last carry 1."),
    ("letter_count", 'How many times does the letter "r" appear in "rbtrea"? Reply with the number only.', "2",
     'Go through "rbtrea" counting "r": r (1), b, t, r (2), e, a.'),
    ("letter_count", 'How many times does the letter "z" appear in "abc"? Reply with the number only.', "0",
     'Go through "abc" counting "z": a, b, c.'),
    ("reversal", 'Reverse the string "kqzmt". Reply with the reversed string only.', "tmzqk",
     'The letters of "kqzmt" are k, q, z, m, t. From last to first: t, m, z, q, k.'),
    ("unit_conversion", "Convert 3.5 km to m. Reply with the number only.", "3500",
     "1 km = 1000 m, so 3.5 km = 3.5 x 1000 m = 3500 m."),
])
def test_tool_rationales_by_hand(task, prompt, answer, steps):
    text = scratchpad(task, prompt, answer)
    assert text == f"Let's think step by step. {steps}\nTherefore, the answer is {answer}."
    assert get_task(task).score(text, answer)


@pytest.mark.parametrize("task", ["addition", "reversal", "letter_count", "unit_conversion"])
def test_tool_rationales_verify_on_every_generated_question(task):
    """200 questions of each split: the program reads every wording the generator makes and is always right."""
    t = get_task(task)
    for split in ("train", "heldout"):
        for e in t.examples(split, 200, seed=3):
            assert t.score(scratchpad(task, e.prompt, e.answer), e.answer)


def test_tool_rationale_refuses_a_wrong_answer_and_unknown_tasks():
    with pytest.raises(LlmlabError, match="worked out '582'.*the task says '583'"):
        scratchpad("addition", "What is 95 + 487? Reply with the number only.", "583")
    with pytest.raises(LlmlabError, match="no rationale writer for task 'json_format'"):
        scratchpad("json_format", "Write a JSON object ...", "{}")
    with pytest.raises(LlmlabError, match="cannot read this addition question"):
        scratchpad("addition", "What is five plus two?", "7")
    with pytest.raises(LlmlabError, match="unknown task 'nope'"):
        scratchpad("nope", "?", "1")


def test_teacher_prompts():
    assert teacher_question("What is 2 + 3? Reply with the number only.") == "What is 2 + 3?"
    assert teacher_question('Reverse the string "ab". Reply with the reversed string only.') == \
        'Reverse the string "ab".'
    demos = [Example("q1", "a1"), Example("q2", "a2")]
    assert icl_messages("q", demos) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q"}]


# ---- the JSONL format round trip into llmlab sft ---------------------------------------------------------------


def test_jsonl_round_trips_into_sft_data(tiny_chat, tmp_path):
    """The written records are read by llmlab sft's reader (format auto -> messages): one example each, the loss
    mask exactly on the rationale + end-of-turn token, the user turn the task's own zero-shot question."""
    from llmlab.data.sft import SFTDataConfig, build_sft_data
    from llmlab.formats.load import chat_template_of, load_model

    out = tmp_path / "cot.jsonl"
    c = run_rationales(RationalesConfig(teacher="tool", task="addition", examples=6, out=str(out)))
    assert c["kept"] == c["verified"] == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = get_task("addition").examples("train", 6, seed=0)
    assert [r["messages"][0]["content"] for r in rows] == [q.prompt for q in questions]
    loaded = load_model(tiny_chat)
    data = build_sft_data(SFTDataConfig(paths=[str(out)], val_fraction=0.0, seq_len=512), loaded.tokenizer,
                          chat_template_of(loaded))
    assert data.stats.examples == 6 and data.stats.bad_lines == 0
    replies = {r["messages"][1]["content"] for r in rows}
    for ex in data.examples["train"]:
        trained = loaded.tokenizer.decode([i for i, m in zip(ex.ids, ex.mask) if m])
        assert trained.endswith("<|im_end|>") and trained.removesuffix("<|im_end|>") in replies


# ---- teacher runs ------------------------------------------------------------------------------------------------


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_tiny_teacher_subprocess_cot_and_icl_then_sft(tiny_chat, tmp_path, capsys):
    """A tiny random teacher (SmolLM2's tokenizer): CoT keeps nothing verified, so --keep all; ICL keeps all by
    default (the README test trains students on such files with llmlab sft)."""
    from llmlab.cli import main

    cot = tmp_path / "cot.jsonl"
    r = _cli("data", "rationales", "--teacher", str(tiny_chat), "--examples", "2", "--k", "2", "--max-tokens", "4",
             "--keep", "all", "--student", str(tiny_chat), "--out", str(cot))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "of 4 teacher replies verify" in r.stdout and "4 records kept (all)" in r.stdout, r.stdout
    rows = [json.loads(line) for line in cot.read_text().splitlines()]
    assert len(rows) == 4 and all(x["messages"][1]["content"].startswith("Let's think step by step.") and
                                  "\nTherefore, the answer is" in x["messages"][1]["content"] for x in rows)
    icl = tmp_path / "icl.jsonl"
    assert main(["data", "rationales", "--mode", "icl", "--teacher", str(tiny_chat), "--examples", "3", "--shots", "2",
                 "--max-tokens", "3", "--out", str(icl)]) == 0
    assert "3 records kept (all)" in capsys.readouterr().out
    assert {json.loads(line)["mode"] for line in icl.read_text().splitlines()} == {"icl"}


def test_real_teacher_writes_a_rationale(tmp_path, capsys):
    """SmolLM2-135M-Instruct, one question, one short rationale: the two-stage CoT prompt runs on the real model."""
    from llmlab.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["data", "rationales", "--examples", "1", "--k", "1", "--max-tokens", "6", "--keep", "all",
                 "--out", str(out)]) == 0
    assert "of 1 teacher replies verify" in capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["teacher"] == "smollm2-135m-instruct" and row["task"] == "letter_count"


# ---- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--examples", "0"], "--examples must be >= 1, got 0"),
    (["--task", "nope"], "unknown task 'nope': choose one of"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--teacher", "tool", "--mode", "icl"], "--teacher tool writes chain-of-thought rationales"),
    (["--teacher", "tool", "--task", "json_format"], "--teacher tool has no rationale writer for task 'json_format'"),
    (["--teacher", "TINY", "--student", "llama-tiny"], "has a vocabulary of 512 tokens, the teacher 49152: teacher "
                                                       "and student must share the tokenizer"),
    (["--teacher", "NOWHERE"], "no such file, folder or preset"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_chat, tmp_path, capsys, args, message):
    from llmlab.cli import main

    args = [str(tiny_chat) if a == "TINY" else str(tmp_path / "none") if a == "NOWHERE" else a for a in args]
    code = main(["data", "rationales", *args, "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.jsonl").exists()


def test_unknown_mode_is_a_usage_error(capsys):
    from llmlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "rationales", "--mode", "zero"])
    assert e.value.code == 2 and "invalid choice: 'zero'" in capsys.readouterr().err


# ---- the README's lines ------------------------------------------------------------------------------------------

SFT = ("llmlab sft --model runs/cot-student/model --method full --steps 24 --lr 2e-3 --warmup 3 --batch-size 8 "
       "--eval-examples 0 --eval-every 0 --save-every 0 --no-progress --no-resume")
README_LINES = [
    "llmlab distill --loss ce --steps 8 --warmup 2 --save-every 0 --out runs/cot-student",
    "llmlab data rationales --examples 8 --k 2 --max-tokens 48 --out data/cot-smollm2.jsonl",
    "llmlab data rationales --teacher tool --examples 64 --out data/cot-tool.jsonl",
    "llmlab data rationales --mode icl --examples 64 --batch-size 8 --out data/icl.jsonl",
    f"{SFT} --task letter_count --task-examples 64 --out runs/cotd-a",
    f"{SFT} data/cot-tool.jsonl --out runs/cotd-b",
    f"{SFT} data/icl.jsonl --out runs/cotd-c",
    "llmlab eval runs/cotd-b/model --tasks letter_count --limit 50 --max-new-tokens 48 --threads 1 --no-packed",
]


def test_readme_rationale_lines_are_these():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for line in README_LINES:
        assert any(x.split("#")[0].strip() == line for x in readme.splitlines()), line


def test_readme_rationale_commands_run_as_written(tiny_chat, tmp_path, monkeypatch, capsys):
    """Each README line as written, run in a scratch folder with a small budget: the tiny random model with
    SmolLM2's tokenizer stands in for the teacher and the student, a few shards of the stdlib's json package for
    the student's pretraining text (the real SmolLM2 teacher runs in test_real_teacher_writes_a_rationale)."""
    import sysconfig

    from llmlab.cli import main
    from llmlab.data.shards import PrepareConfig, prepare

    monkeypatch.chdir(tmp_path)
    lib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    prepare(PrepareConfig(inputs=[str(p) for p in sorted(lib.glob("*.py"))], out="shards", tokenizer=str(tiny_chat),
                          val_fraction=0.2), show_progress=False)
    small = {"distill": ["--teacher", str(tiny_chat), "--data", "shards", "--steps", "1", "--batch-size", "2",
                         "--seq-len", "32", "--eval-batches", "1", "--no-progress"],
             "rationales": ["--teacher", str(tiny_chat), "--examples", "2", "--max-tokens", "4", "--keep", "all"],
             "sft": ["--model", str(tiny_chat), "--steps", "1", "--batch-size", "2", "--task-examples", "4"],
             "eval": ["--limit", "2", "--max-new-tokens", "4"]}
    for line in README_LINES:
        args = line.split()[1:]
        if args[0] == "data" and "tool" in args:
            extra = []
        else:
            extra = small["rationales" if args[0] == "data" else args[0]]
        assert main([*args, *extra]) == 0, line
    out = capsys.readouterr().out
    assert "64 of 64 teacher replies verify (64 of 64 questions have one); 64 records kept (verified)" in out
    assert "letter_count" in out and Path("runs/cotd-c/model").is_dir()
