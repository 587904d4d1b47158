"""Self-Instruct / Alpaca data (data/self_instruct.py) and sampled preference pairs (data/preferences.py):
each heuristic filter on hand-made examples, the ROUGE-L novelty decision equal to rouge-score's, parsing, seed
files, verifier ranking, and both commands end to end in a subprocess on a tiny random model."""

import json
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.data.preferences import (
    PromptItem,
    SampleStats,
    rank_replies,
    read_preferences,
    sample_preferences,
    task_prompts,
    verifier_scores,
)
from llmlab.data.self_instruct import (
    NoveltyPool,
    SelfInstructConfig,
    Task,
    encode_prompt,
    instance_filter,
    instruction_filter,
    judge,
    parse_response,
    read_seed_tasks,
)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "data", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


# ---- filters ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("instruction, reason", [
    ("Name a fruit.", "too_short"),  # 3 words: the paper drops <= 3
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image in two sentences.", "blacklist"),
    ("Plot the monthly sales of the shop.", "blacklist"),
    ("Please go to the store and buy milk.", "blacklist"),  # the two-word entry
    ("Write a program that sorts a list.", "write_a_program"),
    ("- List three birds that cannot fly.", "punctuation"),
    ("¿Cuál es la capital de Francia hoy?", "non_ascii"),
    ("Explain how a Python mapping type works.", None),  # "mapping" is not the word "map"
    ("Name three fruits that are red.", None),  # 5 words
    (" ".join(["word"] * 150), None),
])
def test_instruction_filters(instruction, reason):
    assert instruction_filter(instruction) == reason


@pytest.mark.parametrize("task, reason", [
    (Task("Give the opposite of the word.", "hot", ""), "empty_output"),
    (Task("Repeat the sentence back exactly.", "I am here.", "I am here."), "input_is_output"),
    (Task("Complete the list of colours.", "red, green", "The colours are:"), "ends_with_colon"),
    (Task("Complete the list of colours.", "Colours:", "red, green"), "ends_with_colon"),
    (Task("Give the opposite of the word.", "hot", "cold"), None),
    (Task("Give three tips for sleeping well.", "", "Keep a schedule."), None),
])
def test_instance_filters(task, reason):
    assert instance_filter(task) == reason


def test_judge_order_duplicate_and_rouge():
    pool = NoveltyPool(["Give three tips for staying healthy."])
    assert judge(Task("Give three tips for staying healthy.", "", "Eat well."), pool) == "duplicate"
    assert judge(Task("give three  tips for staying HEALTHY.", "", "Eat well."), pool) == "duplicate"
    assert judge(Task("Give three tips for staying healthy at work.", "", "Eat well."), pool) == "rouge"
    assert judge(Task("Translate the sentence into Spanish.", "Good night.", "Buenas noches."), pool) is None
    assert judge(Task("Draw a cat.", "", ""), pool) == "too_short"  # heuristics before novelty


# ---- ROUGE-L novelty: the same decision as rouge-score ----------------------------------------------------------

def test_novelty_equals_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    pool_texts = [t.instruction for t in read_seed_tasks()]
    candidates = []
    for text in pool_texts * 3:  # 1 to 4 edits of a pool instruction: ROUGE-L spread around 0.7; and unrelated mixes
        words = text.split()
        for _ in range(rng.randint(1, 4)):
            edit = rng.choice(["drop", "swap", "add"])
            if edit == "drop" and len(words) > 4:
                del words[rng.randrange(len(words))]
            elif edit == "swap":
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
            else:
                words[rng.randrange(len(words)):0] = [rng.choice(["quickly", "the", "new", "please", "short"])]
        candidates.append(" ".join(words))
        candidates.append(" ".join(rng.sample(text.split() + rng.choice(pool_texts).split(), 8)))
    pool = NoveltyPool(pool_texts)
    novel = 0
    for c in candidates:
        ref = [scorer.score(p, c)["rougeL"].fmeasure for p in pool_texts]
        assert pool.is_novel(c) == (max(ref) < 0.7), c
        assert pool.max_rouge(c, stop_at=0) == pytest.approx(max(ref), abs=1e-12)
        novel += pool.is_novel(c)
    assert 0 < novel < len(candidates)  # both decisions exercised
    assert pool.lcs_runs < pool.comparisons / 4  # the bag-of-words bound skips most dynamic programs


# ---- prompt, parsing, seeds ---------------------------------------------------------------------------------------

def test_prompt_and_parse_round_trip():
    demos = [Task("Give the opposite of the word.", "hot", "cold"), Task("Name a color of the sky.", "", "blue")]
    prompt = encode_prompt(demos)
    assert prompt.endswith("###\n3. Instruction:") and "1. Input:\nhot\n" in prompt
    assert "2. Instruction: Name a color of the sky.\n2. Output:\nblue\n" in prompt  # no input: no Input field
    completion = (" Translate the word into German.\n3. Input:\ndog\n3. Output:\nHund\n###\n"
                  "4. Instruction: List two prime numbers.\n4. Input:\n<noinput>\n4. Output:\n2 and 3\n###\n"
                  "5. Instruction: this section has no output field\n###\n"
                  "6. Instruction: Summarize the text.\n6. Input:\nA long")
    tasks, bad = parse_response(completion, 2, cut=True)
    assert tasks == [Task("Translate the word into German.", "dog", "Hund"),
                     Task("List two prime numbers.", "", "2 and 3")]
    assert bad == 2  # the malformed section and the cut one
    tasks, bad = parse_response(completion.rsplit("###", 1)[0], 2, cut=False)
    assert len(tasks) == 2 and bad == 1
    # no Input field, numbers that restart: still a task; fields out of order or text before them: not
    tasks, bad = parse_response(" Name a sour fruit.\n3. Output: lemon\n###\n1. Instruction: Add 2 and 2.\n1. Input:"
                                "\n2+2\n1. Output: 4\n###\n4. Output: x\n4. Instruction: y\n###\nhi\n5. Instruction:"
                                " z\n5. Output: w\n", 2, cut=False)
    assert tasks == [Task("Name a sour fruit.", "", "lemon"), Task("Add 2 and 2.", "2+2", "4")] and bad == 2


def test_parse_tasks_written_without_separators():
    """A small model often starts the next task without '###': each whole task before a new Instruction field is
    read; a section that is not a whole task is still rejected as a whole (not re-read as anything else)."""
    text = (" Find the largest number.\n4. Input:\n3, 9, 2\n4. Output: 9\n"
            "5. Instruction: Give the plural of the word.\n5. Output:\nmice\n"
            "6. Instruction: Name a planet with rings.\n6. Output:\nSat")
    tasks, bad = parse_response(text, 3, cut=True)
    assert tasks == [Task("Find the largest number.", "3, 9, 2", "9"), Task("Give the plural of the word.", "", "mice")]
    assert bad == 1  # the cut third task
    tasks, bad = parse_response(text, 3, cut=False)
    assert len(tasks) == 3 and bad == 0
    # not whole tasks before the next Instruction field: no split, one rejected section each
    for text in (" Explain a cipher.\n4. Input:\nA cipher hides text.\n5. Instruction: Name a color.\n5. Output: red",
                 "\n1. Instruction: Say hi twice.\n1. Output: hi hi",  # an empty instruction, then another
                 " Name a fruit.\n4. Input: x\n4. Input: y\n5. Instruction: Say a word.\n5. Output: z",
                 "\nhi\n5. Instruction: Name two colors.\n5. Output: red, blue"):  # text before the fields
        tasks, bad = parse_response(text, 3, cut=False)
        assert (tasks, bad) == ([], 1), text
    # one task per completion: the stop ids end it at the tokenizer's '###' tokens, which the parser splits at
    from llmlab.data.self_instruct import section_stop_ids

    class Tok:
        vocab_size = 6
        texts = ["a", "###", " ###", "####\n", "#", "##"]

        def decode(self, ids):
            return "".join(self.texts[i] for i in ids)

    assert section_stop_ids(Tok()) == {1, 2, 3}


def test_seed_tasks_and_bad_seed_files(tmp_path):
    seeds = read_seed_tasks()
    assert len(seeds) >= 30 and len({t.instruction for t in seeds}) == len(seeds)
    assert all(t.instruction and t.output for t in seeds)
    for t in seeds:  # the built-in seeds pass the filters they are meant to demonstrate
        assert instruction_filter(t.instruction) is None and instance_filter(t) is None, t
    good = json.dumps({"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]})
    for lines, message in [([good, "{not json"], "bad.jsonl:2: not JSON"),
                           ([good, json.dumps({"instruction": "Say hi."})], "bad.jsonl:2: missing field 'instances'"),
                           ([good, "", json.dumps({"instruction": "x", "instances": [{"input": ""}]})],
                            "bad.jsonl:3: 'instances[0].output' is missing or empty"),
                           ([json.dumps({"instruction": "", "instances": []})], "bad.jsonl:1: 'instruction' is not"),
                           ([json.dumps({"instruction": "x", "instances": []})], "bad.jsonl:1: 'instances' is not"),
                           ([json.dumps([1])], "bad.jsonl:1: expected a JSON object"),
                           (["", " "], "no lines")]:
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(LlmlabError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_seed_tasks(tmp_path / "bad.jsonl")
    with pytest.raises(LlmlabError, match="no such file"):
        read_seed_tasks(tmp_path / "none.jsonl")
    (tmp_path / "exists.jsonl").write_text("")
    with pytest.raises(LlmlabError, match="already exists: pass --force"):
        SelfInstructConfig(out=str(tmp_path / "exists.jsonl")).validate()
    SelfInstructConfig(out=str(tmp_path / "exists.jsonl"), force=True).validate()


# ---- preference pairs from a verifier ------------------------------------------------------------------------------

def test_verifier_ranks_chosen_over_rejected(tmp_path):
    items = task_prompts("addition", "train", 3, seed=0)
    score = verifier_scores("addition")
    right = [it.answer for it in items]
    wrong = [str(int(a) + 1) for a in right]
    samples = {0: ["", f"The answer is {wrong[0]}", f"{right[0]}", "12"],  # an empty reply is dropped
               1: [f"{wrong[1]}", f"**{right[1]}**"],
               2: [f"{wrong[2]}", "7"]}  # all wrong: a tie, no pair

    def sample(prompts, k):
        assert k == 4 and [p[0]["content"] for p in prompts] == [it.prompt[0]["content"] for it in items]
        return [samples[i] for i in range(len(prompts))]

    records, stats = sample_preferences(items, 4, sample, score)
    assert [r["chosen"] for r in records] == [right[0], f"**{right[1]}**"]
    assert [r["rejected"] for r in records] == ["12", wrong[1]]  # the last of the worst-scored
    assert all(r["score_chosen"] == 1.0 and r["score_rejected"] == 0.0 for r in records)
    assert (stats.pairs, stats.ties, stats.empty) == (2, 1, 1)
    with pytest.raises(LlmlabError, match="--k 1: a pair needs at least 2 samples"):
        sample_preferences(items, 1, sample, score)
    # conversational prompts stay message lists; the file is what llmlab dpo reads
    item = PromptItem([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], None, "x")
    conv = rank_replies(item, ["Hello.", "Go away."], [0.5, -1.0], SampleStats())
    from llmlab.data.self_instruct import write_jsonl

    write_jsonl(tmp_path / "p.jsonl", [*records, conv])
    pairs = read_preferences([str(tmp_path / "p.jsonl")])
    assert [p.chosen[0]["content"] for p in pairs] == [right[0], f"**{right[1]}**", "Hello."]
    assert pairs[2].prompt[0]["role"] == "system" and pairs[2].rejected[0]["content"] == "Go away."


# ---- end to end, subprocess, tiny random model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reward(tiny_chat, tmp_path_factory):
    """The tiny chat model as an 'llmlab reward run': its folder plus a random score head."""
    import torch

    from llmlab.formats import safetensors
    from llmlab.train.reward import HEAD_FILE

    folder = tmp_path_factory.mktemp("tiny_reward") / "rm"
    shutil.copytree(tiny_chat, folder)
    from llmlab.models.registry import get_preset

    torch.manual_seed(1)
    safetensors.save({"score.weight": torch.randn(1, get_preset("llama-tiny").dim)}, folder / HEAD_FILE)
    return folder


def readme_lines() -> list[str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return [line.split(" #")[0] for line in readme.splitlines()
            if line.startswith(("llmlab data self-instruct", "llmlab data preferences"))]


def test_cli_end_to_end_tiny_readme_lines(tiny_chat, tiny_reward, tmp_path):
    """The README's three data lines as written, in a subprocess, on the tiny random chat model (budget flags
    appended): every completion counted, nothing written when nothing passes; pairs ranked by a reward model."""
    lines = readme_lines()
    assert [shlex.split(x)[2] for x in lines] == ["self-instruct", "preferences", "preferences"]
    tiny = ["--model", str(tiny_chat), "--threads", "1"]  # one thread: the test machine is shared
    # self-instruct: a random model writes nothing parsable; every completion is counted, nothing written
    r = run_cli(*shlex.split(lines[0])[2:], *tiny, "--examples", "2", "--max-prompts", "3", "--max-new-tokens", "8",
                "--samples", "2", "--in-flight", "2", "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no example passed the filters: 0 kept of 6 candidates from 6 completions of 3 prompts" in r.stderr
    assert "unparsable 6" in r.stderr and not list(tmp_path.glob("data/*.jsonl"))
    # preferences with the verifier: the random model is never right, so every prompt is a tie and no file
    r = run_cli(*shlex.split(lines[1])[2:], *tiny, "--prompts", "2", "--max-new-tokens", "4", cwd=tmp_path)
    assert r.returncode == 2 and "no pairs: 0 pairs from 2 prompts x 4 samples; 2 prompts without a pair" in r.stderr
    # preferences from a TRL prompt file, k replies each ranked by a (random-head) reward model
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("What is 2 + 2?",
                                                                                          "Name a colour.")) + "\n")
    shutil.copytree(tiny_reward, tmp_path / "runs" / "reward")
    r = run_cli(*shlex.split(lines[2])[2:], *tiny, "--max-new-tokens", "6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = next(tmp_path.glob("data/*.jsonl"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(x["score_chosen"] > x["score_rejected"] for x in rows)
    assert len(read_preferences([str(out)])) == 2  # what llmlab dpo reads


def test_cli_bad_input(tmp_path, capsys):
    """Each problem is one line and exit 2, found before any model loads (in-process: no torch start-up per case)."""
    from llmlab.cli import main

    (tmp_path / "seeds.jsonl").write_text('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}\n'
                                          '{"instruction": 3}\n')
    (tmp_path / "exists.jsonl").write_text("")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi?"}\n')
    missing = str(tmp_path / "x.jsonl")
    for args, message in [
            (("self-instruct", "--seeds", str(tmp_path / "seeds.jsonl"), "--out", missing),
             "seeds.jsonl:2: missing field 'instances'"),
            (("self-instruct", "--out", str(tmp_path / "exists.jsonl")), "exists.jsonl already exists: pass --force"),
            (("self-instruct", "--examples", "0", "--out", missing), "--examples must be >= 1"),
            (("self-instruct", "--samples", "0", "--out", missing), "--samples must be >= 1"),
            (("self-instruct", "--samples", "65", "--out", missing), "--samples must be at most 64"),
            (("preferences", "--k", "1"), "--k 1: a pair needs at least 2 samples"),
            (("preferences", "--out", str(tmp_path / "exists.jsonl")), "exists.jsonl already exists: pass --force"),
            (("preferences", str(tmp_path / "prompts.jsonl"), "--out", missing), "prompts from files have no verifier"),
            (("preferences", str(tmp_path / "seeds.jsonl"), "--reward-model", "rm", "--out", missing),
             "seeds.jsonl:1: no 'prompt'")]:
        assert main(["data", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not Path(missing).exists()


def test_output_is_what_llmlab_sft_reads(tmp_path):
    from llmlab.data.self_instruct import write_jsonl
    from llmlab.data.sft import read_conversations

    tasks = [Task("Translate the word into German.", "dog", "Hund"), Task("List two prime numbers.", "", "2 and 3")]
    write_jsonl(tmp_path / "si.jsonl", [t.record() for t in tasks])
    convs = read_conversations([str(tmp_path / "si.jsonl")])  # the alpaca format, detected from the keys
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "Translate the word into German.\n\ndog"},
         {"role": "assistant", "content": "Hund"}],
        [{"role": "user", "content": "List two prime numbers."}, {"role": "assistant", "content": "2 and 3"}]]


def test_text_completer_counts_generating_samples(tiny_chat):
    """serve/offline.TextCompleter on the tiny model: n samples per prompt count as n generating until each ends
    (self_instruct's --in-flight counts these); a stop id ends a sample early, while its siblings go on."""
    from llmlab.api import load
    from llmlab.infer.sample import SamplingParams
    from llmlab.serve.engine import Engine, EngineConfig
    from llmlab.serve.offline import TextCompleter

    llm = load(tiny_chat)
    engine = Engine(llm.model, EngineConfig(max_num_seqs=8, max_batched_tokens=256))
    stop = set(range(0, llm.config.vocab_size, 5))  # a fifth of the vocabulary stops: samples end at different steps
    completer = TextCompleter(engine, llm.tokenizer, SamplingParams(temperature=1.0), 12, stop)
    completer.submit("Say hi.", 3, seed=1)
    completer.submit("Say bye.", 3, seed=2)
    assert (completer.pending, completer.generating) == (2, 6)
    seen, done = set(), []
    while completer.pending:
        done += completer.step()
        seen.add(completer.generating)
    assert completer.generating == 0 and [len(c.texts) for c in done] == [3, 3]
    assert any(0 < g < 6 and g % 3 for g in seen)  # a sample ended while its siblings went on: counted alone
