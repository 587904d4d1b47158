"""Built-in verifiable tasks (data/tasks.py): determinism, disjoint splits, correct answers, the scorers'
documented leniency, and that the scorers reject wrong answers (negative controls)."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from llmlab.common import LlmlabError
from llmlab.data.tasks import (
    SPLITS,
    TASKS,
    Example,
    VerifiableTask,
    extract_answer,
    get_task,
    register_task,
)

NAMES = ["addition", "reversal", "letter_count", "unit_conversion", "json_format"]


def test_registry():
    assert sorted(TASKS) == sorted(NAMES)
    assert get_task("addition") is TASKS["addition"]
    with pytest.raises(LlmlabError, match="unknown task 'sum': choose one of addition, json_format"):
        get_task("sum")
    with pytest.raises(LlmlabError, match="already registered"):
        register_task(TASKS["reversal"])


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_distinct_and_disjoint(name):
    task = get_task(name)
    train = task.examples("train", 400, seed=0)
    assert train == task.examples("train", 400, seed=0)  # same arguments, same list
    assert train != task.examples("train", 400, seed=1)
    assert len({e.prompt for e in train}) == 400 and all(isinstance(e, Example) for e in train)
    assert task.examples("train", 10, seed=0) == train[:10]  # a longer list extends a shorter one
    held = {e.prompt for s in range(3) for e in task.examples("heldout", 100, seed=s)}
    trained = {e.prompt for s in range(3) for e in task.examples("train", 400, seed=s)}
    assert not held & trained  # whatever the seeds
    assert all(task.split_of(p) == "heldout" for p in held)
    assert all(task.split_of(p) == "train" for p in trained)


def test_split_is_a_fixed_function_of_the_question():
    task = get_task("addition")
    # pinned: a change to the hash (which would move questions between splits) fails here
    assert task.split_of("What is 56 + 627? Reply with the number only.") == "train"
    assert task.split_of("What is 95 + 52? Reply with the number only.") == "heldout"
    assert task.examples("train", 2, seed=0)[0] == Example("What is 56 + 627? Reply with the number only.", "683")
    with pytest.raises(LlmlabError, match="unknown split 'test'"):
        task.examples("test", 3)


def _recompute(name: str, prompt: str) -> str:
    """The answer worked out again from the question text, independently of the generators."""
    if name == "addition":
        a, b = map(int, re.findall(r"\d+", prompt))
        return str(a + b)
    if name == "reversal":
        return re.search(r'"(\w+)"', prompt).group(1)[::-1]
    if name == "letter_count":
        letter, s = re.findall(r'"(\w+)"', prompt)
        return str(s.count(letter))
    if name == "unit_conversion":
        value, src, dst = re.match(r"Convert ([\d.]+) (\w+) to (\w+)\.", prompt).groups()
        factors = {"km": 1000, "m": 1, "cm": Decimal("0.01"), "mm": Decimal("0.001"), "kg": 1000, "g": 1,
                   "mg": Decimal("0.001"), "L": 1000, "mL": 1, "days": 86400, "hours": 3600, "minutes": 60,
                   "seconds": 1}
        return format(Decimal(value) * factors[src] / factors[dst], "f")
    pairs = re.findall(r'"(\w+)" set to ("[^"]*"|true|false|\d+)', prompt)
    return json.dumps({k: json.loads(v) for k, v in pairs})


@pytest.mark.parametrize("name", NAMES)
def test_answers_are_right_and_score_themselves(name):
    task = get_task(name)
    for split in SPLITS:
        for ex in task.examples(split, 100, seed=3):
            assert task.score(ex.answer, ex.answer)
            assert task.score(_recompute(name, ex.prompt), ex.answer), ex
            assert ex.messages() == [{"role": "user", "content": ex.prompt},
                                     {"role": "assistant", "content": ex.answer}]


def _near_miss(name: str, answer: str) -> str:
    if name in ("addition", "letter_count", "unit_conversion"):
        return str(Decimal(answer) + 1)
    if name == "reversal":
        return answer[::-1] if answer != answer[::-1] else answer + "a"
    obj = json.loads(answer)
    k = next(iter(obj))
    obj[k] = str(obj[k]) if not isinstance(obj[k], str) else obj[k] + "x"
    return json.dumps(obj)


@pytest.mark.parametrize("name", NAMES)
def test_scorer_rejects_wrong_answers(name):
    task = get_task(name)
    examples = task.examples("heldout", 50, seed=0)
    assert task.accuracy([e.answer for e in examples], [e.answer for e in examples]) == 1.0
    assert task.accuracy([_near_miss(name, e.answer) for e in examples], [e.answer for e in examples]) == 0.0
    assert not task.score("", examples[0].answer) and not task.score("I don't know.", examples[0].answer)


def test_extraction_rules():
    assert extract_answer("  2419.  ") == "2419"
    assert extract_answer("**2419**") == "2419"
    assert extract_answer("`tmzqk`") == "tmzqk"
    assert extract_answer('"tmzqk"') == "tmzqk"
    assert extract_answer("Let me think. 400 + 19...\nThe answer is 2419.\nDone") == "2419"
    assert extract_answer("Answer: 2419") == "2419"
    assert extract_answer("\n\n2419\nbecause ...") == "2419"


def test_number_scoring_is_lenient_but_exact():
    add = get_task("addition")
    for ok in ["2419", "2,419", "2419.", "2419.0", "The answer is 2419.", "**2419**", " 2419\n"]:
        assert add.score(ok, "2419"), ok
    for bad in ["2418", "24190", "2419 + 0", "about 2419", "2,41,9", "2419 2420", "two thousand"]:
        assert not add.score(bad, "2419"), bad
    conv = get_task("unit_conversion")
    assert conv.score("3500 m", "3500") and conv.score("0.350", "0.35") and not conv.score("3.5 km", "3500")
    assert get_task("letter_count").score("2 times", "2")


def test_string_scoring_is_case_sensitive():
    rev = get_task("reversal")
    assert rev.score("The answer is: tmzqk", "tmzqk")
    assert not rev.score("TMZQK", "tmzqk") and not rev.score("t m z q k", "tmzqk")


def test_json_scoring():
    js = get_task("json_format")
    answer = json.dumps({"city": "Lima", "year": 1987, "active": True})
    assert js.score('{"year": 1987, "active": true, "city": "Lima"}', answer)  # key order is free
    assert js.score('Sure!\n```json\n{\n  "city": "Lima",\n  "year": 1987,\n  "active": true\n}\n```', answer)
    assert js.score('{"city": "Lima", "year": 1987.0, "active": true}', answer)  # same JSON number
    for bad in ['{"city": "Lima", "year": "1987", "active": true}',  # a string is not a number
                '{"city": "Lima", "year": 1987, "active": 1}',  # 1 is not true
                '{"city": "Lima", "year": 1987}',  # a key missing
                '{"city": "Lima", "year": 1987, "active": true, "extra": 0}',  # a key too many
                '{"city": "lima", "year": 1987, "active": true}',
                "[1987]", "city: Lima", ""]:
        assert not js.score(bad, answer), bad


def test_custom_task_and_exhaustion():
    tiny = VerifiableTask("coin", "heads or tails", lambda r: (r.choice(["Heads?", "Tails?"]), "yes"),
                          lambda p, a: p == a)
    with pytest.raises(LlmlabError, match="found only .* distinct train examples, 5 asked"):
        tiny.examples("train", 5)
    assert tiny.examples("train", 0) == []
