"""Tokenizer parity against Hugging Face ``tokenizers`` built from each model's original files."""

from __future__ import annotations

import pytest

from llmlab.tokenizer.stream import StreamDecoder
from tests.conftest import need
from tests.mixed_text import EMOJI, build, lines

TEXT = build()


def test_corpus_is_big_and_mixed():
    assert len(TEXT.encode()) >= 200_000
    for needle in ("def ", "👨‍👩‍👧‍👦", "日本語", "Café", "<|im_start|>", "[SEP]", "0123456789"[:0] + "  \n"):
        assert needle in TEXT


@pytest.fixture(scope="module")
def smollm_reference(smollm_path):
    """SmolLM2's original tokenizer: byte-level BPE over the GGUF's vocab/merges, digits split first
    (``Digits(individual_digits=True)`` then ``ByteLevel``), special tokens atomic. Built with the
    ``gguf`` package's reader, independent of ours."""
    gguf = need("gguf")
    tk = need("tokenizers")
    r = gguf.GGUFReader(str(smollm_path))
    f = r.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode() for i in f["tokenizer.ggml.merges"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok


def test_smollm2_reference_path_matches_tokenizers(smollm, smollm_reference):
    expected = smollm_reference.encode(TEXT, add_special_tokens=False).ids
    assert smollm.tokenizer.encode_reference(TEXT) == expected


def test_smollm2_tokenizers_lib_path_matches_tokenizers(smollm, smollm_reference):
    need("tokenizers")
    assert smollm.tokenizer.tokenizers_lib is not None
    assert smollm.tokenizer.tokenizers_lib.encode(TEXT, add_special_tokens=False).ids == \
        smollm_reference.encode(TEXT, add_special_tokens=False).ids
    batch = lines(TEXT)
    expected = [e.ids for e in smollm_reference.encode_batch(batch, add_special_tokens=False)]
    assert smollm.tokenizer.encode_batch(batch) == expected


# SmolLM2's vocab has no token with a digit in it besides the ten digits, so the digit split shows only where
# whitespace runs meet a number (a space run is one token, a space glued to a digit is not).
DIGIT_LINES = ["12345", " 2024-11-22", "x=1000000", "a  2", "steps:\n    1. mix\n    2. bake", "\t\t3",
               "<|im_start|>user\nhi<|im_end|>"]


def _line_mismatches(tok, reference) -> list[str]:
    """Lines of the corpus (and lines with numbers) that ``tok`` encodes differently from the reference."""
    return [line for line in lines(TEXT)[:400] + DIGIT_LINES
            if tok.encode_reference(line) != reference.encode(line, add_special_tokens=False).ids]


def test_smollm2_per_line_and_digits(smollm, smollm_reference):
    tok = smollm.tokenizer
    assert _line_mismatches(tok, smollm_reference) == []
    # digits are split one by one
    assert len(tok.encode("1234567")) == 7


def test_negative_control_without_the_digit_split_parity_fails(smollm, smollm_reference):
    """The same vocab and merges with the GPT-2 regex alone (SmolLM2's digit split removed) fails the check
    above: the last space of a run before a number is then glued to the number."""
    from llmlab.tokenizer.bpe import ByteBPE
    from llmlab.tokenizer.pretokenize import DIGITS

    tok = smollm.tokenizer
    assert DIGITS in tok.pre_steps
    broken = ByteBPE(tok.vocab, tok.merges, [s for s in tok.pre_steps if s != DIGITS], tok.special_tokens,
                     use_tokenizers_lib=False)
    wrong = _line_mismatches(broken, smollm_reference)
    assert wrong == ["a  2", "steps:\n    1. mix\n    2. bake", "\t\t3"]


def test_smollm2_round_trip(smollm):
    tok = smollm.tokenizer
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode_reference(TEXT[:20000])) == TEXT[:20000]


def test_smollm2_specials_atomic(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("a<|im_start|>b")
    assert tok.special_tokens["<|im_start|>"] in ids
    # with specials disabled the marker is ordinary text
    assert tok.special_tokens["<|im_start|>"] not in tok.encode_reference("a<|im_start|>b", allow_special=False)


def test_smollm2_vs_llama_cpp(smollm, smollm_path):
    llama_cpp = need("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm_path), vocab_only=True, verbose=False)
    for line in lines(TEXT)[:300]:
        ref = llm.tokenize(line.encode(), add_bos=False, special=True)
        assert smollm.tokenizer.encode(line) == ref, line


def test_minilm_wordpiece_matches_tokenizers(minilm, minilm_path):
    tk = need("tokenizers")
    ref = tk.Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    tok = minilm.tokenizer
    expected = ref.encode(TEXT, add_special_tokens=False).ids
    assert tok.encode(TEXT) == expected
    for line in lines(TEXT)[:500]:
        assert tok.encode(line, add_special=True) == ref.encode(line).ids, line


def test_minilm_decode_matches_tokenizers(minilm, minilm_path):
    tk = need("tokenizers")
    ref = tk.Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    for line in ["Hello, world! It's fine.", "Café naïve", "don't stop", "a [SEP] b"]:
        ids = ref.encode(line).ids
        assert minilm.tokenizer.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)


def test_stream_decoder_is_utf8_safe(smollm):
    tok = smollm.tokenizer
    text = "Emoji: " + EMOJI + " and 日本語 done."
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # at least one emoji is split over several tokens, so some pushes held bytes back
    assert any(p == "" for p in pieces[:-1])


def test_hf_json_export_round_trip(smollm, tmp_path):
    tk = need("tokenizers")
    tok = smollm.tokenizer
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_hf_json(), encoding="utf-8")
    ref = tk.Tokenizer.from_file(str(path))
    sample = TEXT[:50_000]
    assert ref.encode(sample, add_special_tokens=False).ids == tok.encode(sample)
    from llmlab.tokenizer.hf_json import load_tokenizer_json

    again = load_tokenizer_json(tmp_path, use_tokenizers_lib=False)
    assert again.encode_reference(sample) == tok.encode(sample)
