"""SFT data (data/sft.py): every file format, auto-detection, the assistant-only loss mask checked token by
token against the rendered text (ChatML, Llama-3, Zephyr and the real SmolLM2 tokenizer), packing and
padding, truncation, bad lines, and the one-line errors for empty data, no assistant turn and missing pyarrow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter

import pytest

from llmlab.common import LlmlabError
from llmlab.data.sft import (
    IGNORE,
    SFTData,
    SFTDataConfig,
    build_sft_data,
    pack_rows,
    read_conversations,
    tokenize_conversation,
)
from llmlab.tokenizer.chat import CHATML, ChatTemplate

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>", "</s>"]

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")
# (template, special tokens, assistant header, end-of-turn token, how the template writes the content)
TEMPLATES = {
    "chatml": (CHATML, {}, "<|im_start|>assistant\n", "<|im_end|>", str),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>"}, "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|eot_id|>", str.strip),
    "zephyr": (ZEPHYR, {"eos_token": "</s>"}, "<|assistant|>\n", "</s>", str),
}

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "Say café ☕ twice"},
        {"role": "assistant", "content": "café ☕ café ☕ "}]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE over the 256 bytes plus the templates' special tokens and a few merges."""
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("c", "a"), ("ca", "f"), ("Ġ", "c"), ("o", "f"), ("t", "w"), ("tw", "i"), ("ĊĊ", "Ċ")]
    for a, b in merges:
        vocab.setdefault(a, len(vocab))
        vocab.setdefault(b, len(vocab))
        vocab[a + b] = len(vocab)
    specials = {s: len(vocab) + k for k, s in enumerate(SPECIALS)}
    return ByteBPE({**vocab, **specials}, merges, GGUF_PRE["gpt2"], specials, eos_id=specials["<|im_end|>"],
                   use_tokenizers_lib=False)


@pytest.fixture(scope="module")
def chatml():
    return ChatTemplate(CHATML)


@pytest.fixture(scope="module")
def smol(smollm_path):
    """The real SmolLM2-135M-Instruct tokenizer and chat template, read from the embedded GGUF (as load() does)."""
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf

    g = GGUFFile(smollm_path)
    t = tokenizer_from_gguf(g)
    specials = {"bos_token": t.id_to_token[t.bos_id], "eos_token": t.id_to_token[t.eos_id]}
    return t, ChatTemplate(g.metadata["tokenizer.chat_template"], specials)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---- token-by-token mask check ----------------------------------------------------------------------------

def expected_spans(text: str, messages, header: str, eot: str, shown=str) -> list[tuple[int, int]]:
    """Where each assistant reply sits in the rendered text, found by plain string search: the reply as the
    template writes it plus the end-of-turn token, after the assistant header."""
    spans, pos = [], 0
    for m in messages:
        if m["role"] == "assistant":
            needle = header + shown(m["content"]) + eot
            at = text.index(needle, pos)
            spans.append((at + len(header), at + len(needle)))
            pos = at + len(needle)
    return spans


def mask_errors(tokenizer, ids, mask, text, spans) -> list[str]:
    """Problems with a loss mask, checked token by token: the tokens must spell the text, and a token is
    masked True exactly when its bytes lie inside an expected span (none may straddle a span's edge)."""
    pieces = [tokenizer.token_bytes(i) for i in ids]
    data = text.encode()
    if b"".join(pieces) != data:
        return ["the tokens do not spell the rendered text"]
    byte_spans = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in spans]
    problems, pos = [], 0
    for k, (piece, m) in enumerate(zip(pieces, mask)):
        a, b = pos, pos + len(piece)
        pos = b
        inside = any(s <= a and b <= e for s, e in byte_spans)
        if inside != any(a < e and s < b for s, e in byte_spans):
            problems.append(f"token {k} {piece!r} straddles a span edge")
        elif m != inside:
            problems.append(f"token {k} {piece!r}: mask {m}, expected {inside}")
    return problems


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_mask_is_true_exactly_on_assistant_replies_and_end_of_turn(tok, name):
    source, specials, header, eot, shown = TEMPLATES[name]
    template = ChatTemplate(source, specials)
    text = template.render(CHAT)
    ex = tokenize_conversation(CHAT, tok, template)
    spans = expected_spans(text, CHAT, header, eot, shown)
    assert len(spans) == 2
    assert mask_errors(tok, ex.ids, ex.mask, text, spans) == []
    trained = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert trained == "".join(shown(m["content"]) + eot for m in CHAT if m["role"] == "assistant")


def test_negative_control_a_mask_that_includes_the_role_header_fails_the_check(tok, chatml):
    """Deliberately broken: spans measured from the prompt *without* the generation prompt, so the header
    <|im_start|>assistant\\n lands inside the mask. The token-by-token check must catch it."""

    class NoGenerationPrompt:
        def render(self, messages, add_generation_prompt=False):
            return chatml.render(messages)

    text = chatml.render(CHAT)
    broken = tokenize_conversation(CHAT, tok, NoGenerationPrompt())
    spans = expected_spans(text, CHAT, "<|im_start|>assistant\n", "<|im_end|>")
    errors = mask_errors(tok, broken.ids, broken.mask, text, spans)
    assert errors and all("expected False" in e for e in errors)
    assert len(errors) == 2 * len(tok.encode("<|im_start|>assistant\n"))  # exactly the two headers' tokens
    assert tok.decode([i for i, m in zip(broken.ids, broken.mask) if m]) == \
        "<|im_start|>assistant\n4, of course.<|im_end|><|im_start|>assistant\ncafé ☕ café ☕ <|im_end|>"
    shifted = tokenize_conversation(CHAT, tok, chatml)  # a mask off by one token fails too
    assert mask_errors(tok, shifted.ids, [False, *shifted.mask[:-1]], text, spans)


def test_a_bos_token_is_added_once_when_the_tokenizer_wants_one(tok, chatml):
    import copy

    t = copy.copy(tok)
    t.add_bos, t.bos_id = True, tok.special_tokens["<|begin_of_text|>"]
    ex = tokenize_conversation(CHAT[1:3], t, chatml)  # ChatML writes no BOS: it is added
    assert ex.ids[0] == t.bos_id and ex.ids[1] != t.bos_id and ex.mask[0] is False
    ex = tokenize_conversation(CHAT[1:3], t, ChatTemplate(LLAMA3, {"bos_token": "<|begin_of_text|>"}))
    assert ex.ids.count(t.bos_id) == 1 and ex.ids[0] == t.bos_id  # Llama-3 writes it: not doubled


def test_real_smollm2_mask_token_by_token(smol):
    t, template = smol
    for messages in (CHAT, CHAT[1:3], [{"role": "user", "content": "Reverse 'abc'."},
                                        {"role": "assistant", "content": "cba"}]):
        text = template.render(messages)
        ex = tokenize_conversation(messages, t, template)
        spans = expected_spans(text, messages, "<|im_start|>assistant\n", "<|im_end|>")
        assert mask_errors(t, ex.ids, ex.mask, text, spans) == []
        # SmolLM2's pre-tokenizer never merges across these edges, so the ids are plain encode()'s, and the
        # prompt is exactly what generation would feed the model before its first reply
        assert ex.ids == t.encode(text)
        prompt = t.encode(template.render(messages[:messages.index(next(m for m in messages
                                                                         if m["role"] == "assistant"))],
                                          add_generation_prompt=True))
        assert ex.ids[:len(prompt)] == prompt and not any(ex.mask[:len(prompt)]) and ex.mask[len(prompt)]
    assert "You are a helpful AI assistant named SmolLM" in text  # its default system turn is not trained


# ---- formats -----------------------------------------------------------------------------------------------

def user_assistant(q, a, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_each_format_is_read_into_messages(tmp_path):
    alpaca = [{"instruction": "Add", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    write_jsonl(tmp_path / "openai.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": [{"type": "text", "text": "A"},
                                                        {"type": "text", "text": "!"}]}]}])
    write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                           {"from": "gpt", "value": "A2"}]}])
    write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Q", "completion": "A"},
        {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}])
    want_alpaca = [user_assistant("Add\n\n2 and 3", "5"), user_assistant("Say hi", "hi", system="Be brief")]
    for name in ("alpaca.json", "alpaca.jsonl"):
        convs = read_conversations([str(tmp_path / name)])
        assert [c.messages for c in convs] == want_alpaca
        assert [c.where for c in convs][0].startswith(str(tmp_path / name) + ":")
    assert read_conversations([str(tmp_path / "openai.jsonl")])[0].messages == user_assistant("Q", "A!", "S")
    assert read_conversations([str(tmp_path / "sharegpt.jsonl")])[0].messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert [c.messages for c in read_conversations([str(tmp_path / "pc.jsonl")])] == [user_assistant("Q", "A")] * 2
    # a folder: every file, each format detected from its own first record; a glob; JSONL named .json
    assert len(read_conversations([str(tmp_path)])) == 2 + 2 + 1 + 1 + 2
    assert len(read_conversations([str(tmp_path / "alpaca.*")])) == 4
    write_jsonl(tmp_path / "lines.json", alpaca)
    assert [c.where for c in read_conversations([str(tmp_path / "lines.json")])][1] == f"{tmp_path / 'lines.json'}:2"
    (tmp_path / "broken.json").write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(LlmlabError, match=r"broken.json:2: invalid JSON"):
        read_conversations([str(tmp_path / "broken.json")])


def test_format_detection_and_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}, {"messages": [{"role": "user", "content": "Q"},
                                                                        {"role": "assistant", "content": "A"}]}])
    convs = read_conversations([str(path)])  # detected from the first record that matches a format
    assert [c.where for c in convs] == [f"{path}:2"]
    with pytest.raises(LlmlabError, match=r"x.jsonl:1: 'messages' must be a non-empty list"):  # lacks the key
        read_conversations([str(path)], on_bad_line="error")
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(LlmlabError, match=r"cannot tell the format from the keys \['bar', 'foo'\].*--format"):
        read_conversations([str(unknown)])
    with pytest.raises(LlmlabError, match=r"x.jsonl:1: missing 'instruction'"):
        read_conversations([str(path)], fmt="alpaca", on_bad_line="error")


def test_parquet_file_is_read_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": user_assistant("Q", "A")},
                                         {"messages": user_assistant("Q2", "A2", "S")}]), tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "Add", "input": "1 and 1", "output": "2"},
                                         {"instruction": "Hi", "input": None, "output": "hello"}]),
                   tmp_path / "a.parquet")
    assert [c.messages for c in read_conversations([str(tmp_path / "m.parquet")])] == [
        user_assistant("Q", "A"), user_assistant("Q2", "A2", "S")]
    convs = read_conversations([str(tmp_path / "a.parquet")])
    assert [c.messages for c in convs] == [user_assistant("Add\n\n1 and 1", "2"), user_assistant("Hi", "hello")]
    assert convs[1].where == f"{tmp_path / 'a.parquet'}:2"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LlmlabError, match="bad.parquet: not a readable Parquet file"):
        read_conversations([str(tmp_path / "bad.parquet")])


def test_missing_pyarrow_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LlmlabError) as e:
        read_conversations([str(tmp_path / "d.parquet")])
    assert "\n" not in str(e.value) and "d.parquet" in str(e.value)
    assert "pip install 'llmlab[data]'" in str(e.value)


# ---- bad input -------------------------------------------------------------------------------------------

BAD_FILE = [
    {"messages": user_assistant("Q1", "A1")},  # 1 good
    "{not json",  # 2
    {"messages": [{"role": "robot", "content": "x"}]},  # 3 unknown role
    "",  # 4 blank: ignored
    {"messages": "hi"},  # 5 not a list
    "[1, 2]",  # 6 not an object
    {"messages": user_assistant("Q2", "A2")},  # 7 good
    {"messages": [{"role": "user", "content": "Q3"}]},  # 8 no assistant turn
    {"messages": [{"role": "user", "content": "Q4"}, {"role": "assistant", "content": 5}]},  # 9 content not text
]


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "chat.jsonl", BAD_FILE)
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=128, val_fraction=0.0), tok, chatml)
    s = data.stats
    assert (s.records, s.bad_lines, s.no_assistant, s.examples) == (8, 5, 1, 2)
    assert [p.split(": ")[0] for p in s.problems] == [f"{path}:{n}" for n in (2, 3, 5, 6, 9)]
    assert "invalid JSON" in s.problems[0] and "'robot'" in s.problems[1] and "got a list" in s.problems[3]
    assert "5 bad lines" in s.summary() and "1 no assistant" in s.summary()


def test_a_bad_line_is_fatal_on_request(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "chat.jsonl", BAD_FILE)
    with pytest.raises(LlmlabError) as e:
        build_sft_data(SFTDataConfig(paths=[str(path)], on_bad_line="error"), tok, chatml)
    assert str(e.value).startswith(f"{path}:2: invalid JSON") and "--on-bad-line skip" in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_dataset_and_no_assistant_turn_are_one_line_errors(tmp_path, tok, chatml):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"messages": 3}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}] * 3)
    cases = [(empty, "holds no JSON object records"), (bad, r"no usable training examples .*bad.jsonl:1: invalid"),
             (prompts, "none of the 3 examples has an assistant message")]
    for path, message in cases:
        with pytest.raises(LlmlabError, match=message) as e:
            build_sft_data(SFTDataConfig(paths=[str(path)]), tok, chatml)
        assert "\n" not in str(e.value)
    with pytest.raises(LlmlabError, match="no SFT data"):
        build_sft_data(SFTDataConfig(), tok, chatml)
    with pytest.raises(LlmlabError, match="no such file"):
        build_sft_data(SFTDataConfig(paths=[str(tmp_path / "missing.jsonl")]), tok, chatml)


# ---- packing, padding, truncation ----------------------------------------------------------------------

def test_best_fit_decreasing_packing():
    assert pack_rows([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]
    lengths = [7, 1, 30, 12, 12, 5, 19, 3, 3, 2, 25, 9]
    rows = pack_rows(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each example once, none split
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert len(rows) == -(-sum(lengths) // 32)  # here as few rows as the token count allows


def many_examples(n=40):
    return [{"instruction": f"Repeat {'x' * (i % 7)} {i} times", "output": " ".join(["ok"] * (1 + i % 9))}
            for i in range(n)]


def check_rows(data: SFTData, batch, split="train"):
    """Every (row, doc) of the batch is one whole example with positions from 0 and next-token labels."""
    wanted = Counter(tuple(e.ids) for e in data.examples[split])
    masks = {tuple(e.ids): e.mask for e in data.examples[split]}
    for ids, labels, pos, docs in zip(*(t.tolist() for t in (batch.input_ids, batch.labels, batch.position_ids,
                                                             batch.doc_ids))):
        n_docs = max(docs) + 1
        assert docs == sorted(docs, key=lambda d: (d < 0, d))  # docs in order, padding only at the end
        for d in range(n_docs):
            idx = [t for t, x in enumerate(docs) if x == d]
            seq = tuple(ids[t] for t in idx)
            assert wanted[seq] > 0, "a row holds something that is not a whole example"
            assert [pos[t] for t in idx] == list(range(len(idx)))
            want = [seq[k + 1] if masks[seq][k + 1] else IGNORE for k in range(len(seq) - 1)] + [IGNORE]
            assert [labels[t] for t in idx] == want
        assert all(labels[t] == IGNORE and pos[t] == 0 for t, d in enumerate(docs) if d < 0)


def test_packing_rows_keep_examples_whole_with_restarting_positions(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", many_examples())
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=160, val_fraction=0.1), tok, chatml)
    assert len(data.examples["train"]) == 36 and len(data.examples["val"]) == 4
    n = len(data.rows["train"])
    assert n < 36 and data.fill() > 0.8
    every = data.batch(0, n, seed=3)
    assert every.input_ids.shape == (n, 160)
    check_rows(data, every)
    seen = Counter(tuple(ids[t] for t, d in enumerate(dd) if d == k) for ids, dd in
                   zip(every.input_ids.tolist(), every.doc_ids.tolist()) for k in range(max(dd) + 1))
    assert seen == Counter(tuple(e.ids) for e in data.examples["train"])  # one epoch = each example once
    check_rows(data, data.batch(0, 2, seed=0, split="val"), "val")
    assert every.trained_tokens == sum(sum(e.mask[1:]) for e in data.examples["train"])


def test_attention_mask_is_block_diagonal_causal(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", many_examples(12))
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=200, val_fraction=0.0), tok, chatml)
    batch = data.batch(0, 2, seed=0)
    mask = batch.attention_mask()
    B, T = batch.doc_ids.shape
    assert mask.shape == (B, T, T)
    for b in range(B):
        docs = batch.doc_ids[b].tolist()
        for t in range(T):
            for s in range(T):
                want = (docs[t] == docs[s] and docs[t] >= 0 and s <= t) or s == t
                assert bool(mask[b, t, s]) == want


def test_padding_is_one_example_per_row(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", many_examples(10))
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=160, packing=False, val_fraction=0.0), tok,
                          chatml)
    assert len(data.rows["train"]) == 10
    batch = data.batch(0, 4, seed=1)
    assert batch.doc_ids.max() == 0 and batch.input_ids.shape[1] == int((batch.doc_ids >= 0).sum(1).max())
    assert (batch.input_ids[batch.doc_ids < 0] == tok.eos_id).all()  # padded with the tokenizer's eos
    check_rows(data, batch)


def test_batches_depend_only_on_seed_step_and_rows(tmp_path, tok, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", many_examples())
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=128), tok, chatml)
    whole = data.batch(5, 4, seed=7)
    halves = [data.batch(5, 2, seed=7, first_row=r, total_rows=4) for r in (0, 2)]
    for name in ("input_ids", "labels", "position_ids", "doc_ids"):
        got = getattr(whole, name)
        assert got.equal(getattr(data.batch(5, 4, seed=7), name))
        assert got[:2].equal(getattr(halves[0], name)) and got[2:].equal(getattr(halves[1], name))
    assert not whole.input_ids.equal(data.batch(5, 4, seed=8).input_ids)
    n = len(data.rows["train"])  # one epoch of one-row steps serves every row once
    rows = Counter(tuple(data.batch(step, 1, seed=7).input_ids[0].tolist()) for step in range(n))
    assert rows == Counter(tuple(r) for r in data.batch(0, n, seed=7).input_ids.tolist())


def test_overlong_examples_truncated_and_counted_or_an_error(tmp_path, tok, chatml):
    records = many_examples(20) + [{"instruction": "q " * 80, "output": "a"}]  # line 21: its prompt alone is too long
    path = write_jsonl(tmp_path / "a.jsonl", records)
    lengths = [len(tokenize_conversation(c.messages, tok, chatml).ids) for c in read_conversations([str(path)])]
    seq_len = sorted(lengths)[10]  # about half of the examples are longer
    over = sum(n > seq_len for n in lengths)
    assert 5 < over < 15 and lengths[-1] > 2 * seq_len
    data = build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=seq_len, val_fraction=0.0), tok, chatml)
    s = data.stats
    assert (s.truncated, s.dropped, s.examples) == (over, 1, 20)
    assert f"{path}:21: no assistant token left" in s.problems[0]
    assert all(len(e.ids) <= seq_len for e in data.examples["train"])
    check_rows(data, data.batch(0, len(data.rows["train"]), seed=0))
    full = {tuple(tokenize_conversation(c.messages, tok, chatml).ids) for c in read_conversations([str(path)])}
    assert all(any(f[:len(e.ids)] == tuple(e.ids) for f in full) for e in data.examples["train"])  # prefixes kept
    with pytest.raises(LlmlabError, match=rf"a.jsonl:\d+: \d+ tokens, more than --seq-len {seq_len}") as e:
        build_sft_data(SFTDataConfig(paths=[str(path)], seq_len=seq_len, on_overlong="error"), tok, chatml)
    assert "--on-overlong truncate" in str(e.value)


# ---- built-in tasks and the config -----------------------------------------------------------------------

def test_a_builtin_task_needs_no_file(tok, chatml):
    data = build_sft_data(SFTDataConfig(task="addition", task_examples=40, val_fraction=0.25, seq_len=128), tok,
                          chatml)
    assert (len(data.examples["train"]), len(data.examples["val"])) == (40, 10)
    decoded = {split: {tok.decode(e.ids) for e in exs} for split, exs in data.examples.items()}
    assert not decoded["train"] & decoded["val"]  # validation comes from the task's held-out split
    ex = data.examples["train"][0]
    answer = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert answer.endswith("<|im_end|>") and answer[:-len("<|im_end|>")].isdigit()
    check_rows(data, data.batch(0, 2, seed=0))
    with pytest.raises(LlmlabError, match="unknown task 'nope'"):
        build_sft_data(SFTDataConfig(task="nope"), tok, chatml)


def test_config_fields_become_flags_with_help():
    from llmlab.dataclass_io import add_flags, from_args

    assert all(f.metadata.get("help") for f in dataclasses.fields(SFTDataConfig))
    parser = argparse.ArgumentParser()
    add_flags(parser, SFTDataConfig)
    args = parser.parse_args(["--task", "reversal", "--seq-len", "128", "--no-packing", "--on-bad-line", "error",
                              "--format", "sharegpt", "--val-fraction", "0.1"])
    cfg = from_args(SFTDataConfig, args).validate()
    assert (cfg.task, cfg.seq_len, cfg.packing, cfg.on_bad_line, cfg.format, cfg.val_fraction, cfg.on_overlong) == \
        ("reversal", 128, False, "error", "sharegpt", 0.1, "truncate")
    with pytest.raises(SystemExit):
        parser.parse_args(["--on-overlong", "drop"])
    for bad, flag in ((dict(seq_len=1), "--seq-len"), (dict(val_fraction=1.0), "--val-fraction"),
                      (dict(format="csv"), "--format")):
        with pytest.raises(LlmlabError, match=flag):
            SFTDataConfig(**bad).validate()
