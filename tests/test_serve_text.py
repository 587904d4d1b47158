"""serve/text.py: streamed text equals the full decode, never splits a character, never leaks a stop string."""

from __future__ import annotations

import pytest

from llmlab.serve.text import TextTracker, token_piece

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 👩‍👩‍👧‍👦 🇫🇷 😀🎉 done",
    "ภาษาไทยเป็นภาษาที่สวยงาม สวัสดีครับ",
    "mixed: naïve café — Ωμέγα, 🙂 and 한국어",
]


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm.tokenizer


def _stream(tok, ids, stops, chunk=1):
    tr = TextTracker(tok, stops)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(tr.push(ids[i:i + chunk]))
        if tr.stopped:
            break
    pieces.append(tr.finish())
    return tr, pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_no_stop_equals_full_decode(tok, text, chunk):
    ids = tok.encode(text)
    tr, pieces = _stream(tok, ids, [], chunk)
    assert "".join(pieces) == tr.text == tok.decode(ids, skip_special=True) == text
    assert not tr.stopped
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_multi_token_characters_are_held(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the byte-level BPE splits this emoji: the test means something
    tr = TextTracker(tok)
    assert [tr.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert tr.push(ids[-1:]) == "😀"


@pytest.mark.parametrize("text,stop,expected", [
    ("The answer is 42. Observation: none", "Observation:", "The answer is 42. "),
    ("東京は日本の首都です。北京是中国的首都。", "首都です", "東京は日本の"),
    ("ภาษาไทยเป็นภาษาที่สวยงาม สวัสดีครับ", "สวัสดี", "ภาษาไทยเป็นภาษาที่สวยงาม "),
    ("party 😀🎉 done", "🎉", "party 😀"),
    ("abc\n\nQuestion: next", "\n\nQuestion:", "abc"),
])
def test_stop_string_spanning_tokens(tok, text, stop, expected):
    ids = tok.encode(text)
    tr, pieces = _stream(tok, ids, [stop])
    assert tr.stopped and tr.stop_string == stop
    assert "".join(pieces) == tr.text == expected
    assert all(stop not in p for p in pieces)


def test_stop_held_back_then_released(tok):
    """A tail that looks like a stop string's start is held, and released when it turns out not to be one."""
    tr = TextTracker(tok, ["STOP!"])
    out = tr.push(tok.encode("go ST"))
    assert out == "go " and tr.pending == "ST"
    out += tr.push(tok.encode("OP? no"))
    assert out + tr.finish() == "go STOP? no" and not tr.stopped


def test_earliest_of_several_stops_wins(tok):
    tr, pieces = _stream(tok, tok.encode("one two three four"), ["four", "two"])
    assert tr.text == "one " and tr.stop_string == "two"


def test_pushes_after_stop_are_ignored(tok):
    tr = TextTracker(tok, ["."])
    assert tr.push(tok.encode("Hi. More")) == "Hi"
    assert tr.push(tok.encode(" text")) == "" and tr.finish() == "" and tr.text == "Hi"


def test_special_tokens_skipped(tok):
    end = tok.special_tokens["<|im_end|>"]
    tr = TextTracker(tok)
    assert tr.push([*tok.encode("ok"), end]) + tr.finish() == "ok"


def test_incomplete_bytes_at_the_end_become_replacement_char(tok):
    ids = tok.encode("😀")
    tr = TextTracker(tok)
    assert tr.push(ids[:-1]) == ""
    assert tr.finish() == tok.decode(ids[:-1])  # U+FFFD, as a full decode gives


def test_token_piece(tok):
    ids = tok.encode("😀")
    pieces = [token_piece(tok, i) for i in ids]
    assert b"".join(b for _, b in pieces) == "😀".encode()
    assert any(s.startswith("bytes:\\x") for s, _ in pieces)
    assert token_piece(tok, tok.encode("Hello")[0]) == ("Hello", b"Hello")
