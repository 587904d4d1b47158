"""Tokenizers, exactly, on small hand-made vocabularies (no real model): byte-level BPE and WordPiece
against Hugging Face ``tokenizers`` built from the same vocab/merges, hand-computed merge orders,
GPT-2's byte table against transformers', and the pre-tokenizer steps against ``tokenizers``'."""

from __future__ import annotations

import json
import unicodedata

import pytest

from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
from llmlab.tokenizer.pretokenize import DIGITS, GGUF_PRE, GPT2_PATTERN, LLAMA3_PATTERN, make_pretokenizer
from llmlab.tokenizer.wordpiece import WordPiece
from tests.conftest import need

TEXTS = ["Hello world, hello there!", "it's 2024-11-22: x=1000000;", "  two  spaces\n\nnew\tlines \r\n end ",
         "Café naïve 日本語 👍🏽 ok", "<|im_start|>user\nhi<|im_end|>", "ab aab abab ba", "", " ", "don't STOP",
         "a\x00b\x04c", "numbers 12345 and 3.14159", "under_score CamelCase ALLCAPS", "end<|endoftext|>"]


# ---- byte table and pre-tokenizers ----------------------------------------------------------------
def test_byte_table_is_gpt2s():
    need("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


@pytest.mark.parametrize("steps", [[GPT2_PATTERN], [DIGITS, GPT2_PATTERN], [LLAMA3_PATTERN], GGUF_PRE["qwen2"]])
def test_pretokenizer_matches_tokenizers(steps):
    tk = need("tokenizers")
    ref_steps = [tk.pre_tokenizers.Digits(individual_digits=True) if s == DIGITS else
                 tk.pre_tokenizers.Split(tk.Regex(s), behavior="isolated") for s in steps]
    ref = tk.pre_tokenizers.Sequence(ref_steps)
    ours = make_pretokenizer(steps)
    for text in TEXTS:
        assert ours(text) == [p for p, _ in ref.pre_tokenize_str(text)], text


def test_digit_step_splits_every_digit_then_the_regex_runs_on_each_piece():
    assert make_pretokenizer([DIGITS])("ab123 c4") == ["ab", "1", "2", "3", " c", "4"]
    assert make_pretokenizer([DIGITS, GPT2_PATTERN])("x 12 yz") == ["x", " ", "1", "2", " yz"]
    assert make_pretokenizer([])("anything at all") == ["anything at all"]


# ---- byte-level BPE ---------------------------------------------------------------------------------
def _toy(merges, specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"), missing=(), **kw):
    """A byte-level vocabulary: 256 byte symbols (less ``missing``), every merge result, then specials."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values()) if c not in missing}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab) + len(missing))
    special = {s: len(vocab) + len(missing) + i for i, s in enumerate(specials)}
    vocab.update(special)
    return ByteBPE(vocab, list(merges), kw.pop("pre", [GPT2_PATTERN]), special, **kw), vocab


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("a", "b"), ("ab", "ab"), ("e", "l"), ("el", "l"),
          ("ll", "o"), ("Ġ", "w"), ("o", "r"), ("1", "0"), ("0", "0"), ("a", "a"), ("Ġ", "Ġ"), ("c", "a")]


def _reference(tok: ByteBPE, ignore_merges=False, specials_in_vocab=False):
    tk = need("tokenizers")
    vocab = {t: i for t, i in tok.vocab.items() if specials_in_vocab or i not in tok.special_ids}
    ref = tk.Tokenizer(tk.models.BPE(vocab=vocab,
                                     merges=list(tok.merges), ignore_merges=ignore_merges))
    steps = [tk.pre_tokenizers.Digits(individual_digits=True) if s == DIGITS else
             tk.pre_tokenizers.Split(tk.Regex(s), behavior="isolated") for s in tok.pre_steps]
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([*steps, tk.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
    return ref


@pytest.mark.parametrize("pre", [[GPT2_PATTERN], [DIGITS, GPT2_PATTERN]])
def test_bpe_reference_path_matches_tokenizers(pre):
    tok, _ = _toy(MERGES, pre=pre)
    ref = _reference(tok)
    for text in [*TEXTS, " ".join(TEXTS), "aaaa aaaaa abababab hellllo llo"]:
        assert tok.encode_reference(text) == ref.encode(text, add_special_tokens=False).ids, text
    batch = [t for t in TEXTS if t]
    assert tok.encode_batch(batch) == [e.ids for e in ref.encode_batch(batch, add_special_tokens=False)]


def test_bpe_merge_order_by_hand():
    tok, v = _toy(MERGES)
    # " the": "Ġ t h e" -> (Ġ,t) rank 0 -> "Ġt h e" -> (h,e) rank 1 -> "Ġt he" -> (Ġt,he) rank 2
    assert tok.encode(" the") == [v["Ġthe"]]
    # "hello": (h,e) -> "he l l o"; (l,l) rank 3 -> "he ll o"; (ll,o) rank 8 -> "he llo"
    assert tok.encode("hello") == [v["he"], v["llo"]]
    # every occurrence of the best pair merges in one pass, left to right: "aaa" -> "aa a"
    assert tok.encode("aaa") == [v["aa"], v["a"]]
    # "abab" -> "ab ab" -> "abab"; "aba" leaves the trailing "a"
    assert tok.encode("abab") == [v["abab"]]
    assert tok.encode("aba") == [v["ab"], v["a"]]
    assert tok._bpe("") == [] and tok._bpe("x") == ["x"]


def test_ignore_merges_takes_whole_words_from_the_vocab_like_tokenizers():
    merges = [("a", "b"), ("c", "d")]
    tok, v = _toy(merges, ignore_merges=True)
    tok.vocab["abcd"] = v["abcd"] = max(v.values()) + 1
    tok.id_to_token[v["abcd"]] = "abcd"
    assert tok.encode("abcd") == [v["abcd"]]
    plain, w = _toy(merges)
    assert plain.encode("abcd") == [w["ab"], w["cd"]]
    assert tok.encode("abcd") == _reference(tok, ignore_merges=True).encode("abcd").ids


def test_merge_result_missing_from_the_vocab_falls_back_to_its_bytes_and_unknown_bytes_drop():
    tok, v = _toy([("a", "b")])
    del tok.vocab["ab"]
    tok._cache.clear()
    assert tok.encode("ab") == [v["a"], v["b"]]
    gap, w = _toy([], missing=("Ą",))  # byte 0x04 is shown as "Ą"; this vocabulary lacks it
    assert gap.encode("a\x04b") == [w["a"], w["b"]]
    assert gap.encode("a\x04b") == _reference(gap).encode("a\x04b", add_special_tokens=False).ids


def test_special_tokens_are_atomic_longest_first_and_optional():
    tok, v = _toy([], specials=("<s>", "<s>x", "<|im_end|>"))
    s, sx, end = v["<s>"], v["<s>x"], v["<|im_end|>"]
    assert tok.encode("<s>x<s><|im_end|>") == [sx, s, end]
    assert tok.encode("a<s>b") == [v["a"], s, v["b"]]
    assert tok.encode("<s>") == [s]
    plain = tok.encode("<s>", allow_special=False)
    assert s not in plain and tok.decode(plain) == "<s>"
    assert tok.encode("x<s>", allow_special=False) == tok.encode_reference("x<s>", allow_special=False)
    nothing, _ = _toy([], specials=())
    assert nothing.encode("<s>") == nothing.encode("<s>", allow_special=False) and len(nothing.encode("<s>")) == 3


def test_bos_is_added_on_request_or_by_default():
    tok, v = _toy([], bos_id=7)
    assert tok.encode("a") == [v["a"]]
    assert tok.encode("a", add_bos=True) == [7, v["a"]]
    with_bos, _ = _toy([], bos_id=7, add_bos=True)
    assert with_bos.encode("a") == [7, v["a"]] and with_bos.encode("a", add_bos=False) == [v["a"]]
    assert with_bos.encode_batch(["a", "b"]) == [[7, v["a"]], [7, v["b"]]]
    no_id, _ = _toy([], add_bos=True)
    assert no_id.encode("a", add_bos=True) == [v["a"]] and no_id.encode_batch(["a"]) == [[v["a"]]]


def test_decode_token_bytes_and_lookups():
    tok, v = _toy(MERGES)
    text = "Hello, 日本語 👍🏽<|im_end|>\t"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "Hello, 日本語 👍🏽\t"
    assert tok.token_bytes(v["Ġthe"]) == b" the"
    assert tok.token_bytes(v["<|im_end|>"]) == b"<|im_end|>"
    assert tok.token_bytes(v[bytes_to_unicode()[0xE6]]) == b"\xe6"
    assert tok.decode([v[bytes_to_unicode()[0xE6]]]) == "\ufffd"  # half a character: replaced, no error
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(10**6)
    assert tok.token_to_id("he") == v["he"] and tok.token_to_id("zzz") is None
    assert tok.vocab_size == max(v.values()) + 1
    # a vocabulary entry that is not byte-level text decodes as its UTF-8
    tok.id_to_token[10**5] = "€x"
    assert tok.token_bytes(10**5) == "€x".encode()


def test_empty_vocabulary_has_size_zero():
    assert ByteBPE({}, [], [GPT2_PATTERN]).vocab_size == 0


def test_hf_json_export_is_what_tokenizers_writes_for_the_same_tokenizer():
    tk = need("tokenizers")
    for pre, ignore in (([DIGITS, GPT2_PATTERN], False), ([LLAMA3_PATTERN], True)):
        tok, _ = _toy(MERGES, pre=pre, ignore_merges=ignore)
        exported = tk.Tokenizer.from_str(tok.to_hf_json())
        ref = _reference(tok, ignore_merges=ignore, specials_in_vocab=True)
        ref.pre_tokenizer = tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Digits(individual_digits=True) if s == DIGITS else
             tk.pre_tokenizers.Split(tk.Regex(s), behavior="isolated") for s in pre]
            + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        ref.decoder = tk.decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
        got, want = json.loads(exported.to_str()), json.loads(ref.to_str())
        assert got == want
        for text in TEXTS:
            assert exported.encode(text, add_special_tokens=False).ids == tok.encode(text), text


# ---- WordPiece ----------------------------------------------------------------------------------------
WP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##aff", "##able", "run", "##ning", "##s",
            "a", "##b", "##c", "cafe", "naive", "don", "'", "t", "stop", ".", ",", "!", "?", "$", "^", "`", "~",
            "日", "本", "hello", "##llo", "he", "x", "ab", "##abc", "Cafe", "Café", "ok", "-", "@", "[", "{", "/",
            ":", "##x", "中", "s", "it", "n", "##'", "##t"]


def _wp(**kw):
    vocab = {t: i for i, t in enumerate(WP_VOCAB)}
    specials = {t: vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    return WordPiece(vocab, special_tokens=specials, **kw), vocab


def _wp_reference(lowercase=True, strip_accents=None, clean_text=True, cjk=True, max_chars=100, prefix="##"):
    tk = need("tokenizers")
    vocab = {t: i for i, t in enumerate(WP_VOCAB)}
    ref = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=max_chars,
                                           continuing_subword_prefix=prefix))
    ref.normalizer = tk.normalizers.BertNormalizer(clean_text=clean_text, handle_chinese_chars=cjk,
                                                   strip_accents=strip_accents, lowercase=lowercase)
    ref.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    ref.decoder = tk.decoders.WordPiece(prefix=prefix, cleanup=True)
    ref.add_special_tokens([tk.AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    return ref


# each CJK block's first and last code point and their outer neighbours
EDGES = [0x33FF, 0x3400, 0x4DBF, 0x4DC0, 0x4DFF, 0x4E00, 0x9FFF, 0xA000, 0xF8FF, 0xF900, 0xFAFF, 0xFB00, 0x1FFFF,
         0x20000, 0x2A6DF, 0x2A6E0, 0x2A6FF, 0x2A700, 0x2B73F, 0x2B740, 0x2B81F, 0x2B820, 0x2CEAF, 0x2CEB0, 0x2F7FF,
         0x2F800, 0x2FA1F, 0x2FA20]
WP_TEXTS = ["unaffable running runs", "The CAFÉ Café naïve", "don't stop!", "a [SEP] b[CLS]c", "abc ab abx",
            "hello hellllllo he", "日本 中文", "$^`~ -@[{/:", "x" * 100, "x" * 101, "it's", "\u00a0x\u2003x\u200bx",
            "a\x00b\ufffdc\x07d\te\nf\rg", "".join(chr(c) for c in range(32, 127)),
            "Cafe\u0301 e\u0300"]


@pytest.mark.parametrize("opts", [{}, {"lowercase": False}, {"lowercase": False, "strip_accents": True},
                                  {"strip_accents": False}, {"clean_text": False}, {"cjk": False},
                                  {"clean_text": False, "cjk": False}, {"max_chars": 4}])
def test_wordpiece_matches_tokenizers(opts):
    tok, _ = _wp(**opts)
    ref = _wp_reference(**opts)
    # Unassigned code points: Python's table (as BERT's own Python tokenizer) drops them when cleaning,
    # ``tokenizers``' keeps them; compare those only when nothing is cleaned.
    # U+2B820 starts CJK Extension E: BERT's tokenizer counts it, ``tokenizers`` starts that range at U+2B920.
    edges = [c for c in EDGES if (not opts.get("clean_text", True) or unicodedata.category(chr(c)) != "Cn")
             and c != 0x2B820]
    for text in [*WP_TEXTS, " ".join(f"a{chr(c)}b" for c in edges)]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, (opts, text)


def test_cjk_characters_are_split_apart_as_berts_own_tokenizer_does():
    tok, _ = _wp()
    assert tok.normalize("a\U0002b820b") == "a \U0002b820 b"
    assert tok.normalize("a\U0002ceb0b") == "a\U0002ceb0b"
    assert _wp(cjk=False)[0].normalize("a日b") == "a日b" and tok.normalize("a日b") == "a 日 b"


def test_wordpiece_greedy_longest_match_by_hand():
    tok, v = _wp()
    assert tok.encode("unaffable") == [v["un"], v["##aff"], v["##able"]]
    assert tok.encode("abc") == [v["ab"], v["##c"]]  # "abc" is not a word start; "ab" is the longest
    assert tok.encode("abcz") == [v["[UNK]"]]  # one unmatched piece makes the whole word unknown
    assert tok.encode("hello, a.") == [v["hello"], v[","], v["a"], v["."]]
    short, _ = _wp(max_chars=3)
    assert short.encode("abc abcc") == [v["ab"], v["##c"], v["[UNK]"]]  # 3 chars is still allowed, 4 is not


def test_wordpiece_specials_and_wrapping():
    tok, v = _wp()
    assert tok.encode("a [SEP] ab", add_special=True) == [v["[CLS]"], v["a"], v["[SEP]"], v["ab"], v["[SEP]"]]
    assert tok.encode("[SEP]a[SEP]") == [v["[SEP]"], v["a"], v["[SEP]"]]
    assert tok.encode("[SEP]", allow_special=False) == [v["["], v["[UNK]"], v["[UNK]"]]  # "[", "sep", "]"
    assert v["[SEP]"] not in tok.encode("[SEP]", allow_special=False)
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.bos_id, tok.eos_id) == (2, 3, 0, 2, 3)
    assert tok.vocab_size == len(WP_VOCAB)
    bare = WordPiece({"[UNK]": 0, "a": 1})
    assert (bare.cls_id, bare.sep_id, bare.pad_id) == (None, None, 0)
    assert bare.encode("a [SEP]") == [1, 0, 0, 0]


def test_wordpiece_decode_matches_tokenizers():
    tok, v = _wp()
    ref = _wp_reference()
    for text in ["unaffable running , hello !", "don ' t stop . it ' s", "a [SEP] b", "x ?", "$ ab ##c"]:
        ids = ref.encode(text).ids
        for skip in (True, False):
            assert tok.decode(ids, skip_special=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    assert tok.token_bytes(v["##able"]) == b"able" and tok.token_bytes(v["the"]) == b" the"
    assert tok.token_to_id("the") == v["the"] and tok.token_to_id("nope") is None


ODD = [chr(c) for c in range(128)] + ["\u00a0", "\u2003", "\u200b", "\ufffd", "\ufeff", "¿", "—", "«", "€", "\u0301",
                                      "\x85", "\u2028", "\ud800", "\ue000"]


@pytest.mark.parametrize("clean_text", [True, False])
def test_each_ascii_and_odd_character_inside_a_word_matches_tokenizers(clean_text):
    # "ab" is one token: a dropped character leaves it whole, a kept one makes [UNK], a split one three pieces.
    tok, _ = _wp(clean_text=clean_text)
    ref = _wp_reference(clean_text=clean_text)
    for ch in ODD:
        if ch == "\ud800" or (not clean_text and ch in "\x1c\x1d\x1e\x1f\x85"):
            # A lone surrogate cannot reach the Rust library; uncleaned, these five split words for Python's
            # str.split (and BERT's own Python tokenizer) but not for ``tokenizers``.
            continue
        text = f"a{ch}b"
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, (clean_text, hex(ord(ch)))


def test_cleaning_drops_unassigned_and_surrogate_code_points_as_berts_tokenizer_does():
    tok, v = _wp()
    for ch in ("\U0002a6e0", "\ud800", "\x00", "\ufffd", "\x07", "\ue000"):
        assert tok.encode(f"a{ch}b") == [v["ab"]], hex(ord(ch))


def test_longest_special_token_wins_and_pad_is_looked_up():
    vocab = {"[UNK]": 0, "a": 1, "[PAD]": 2, "[X]": 3, "[X]]": 4}
    tok = WordPiece(vocab, special_tokens={"[X]": 3, "[X]]": 4})
    assert tok.encode("a[X]]a") == [1, 4, 1] and tok.pad_id == 2
    assert WordPiece({"[UNK]": 0, "<pad>": 5}, pad_token="<pad>").pad_id == 5


def test_a_bare_prefix_in_the_vocabulary_does_not_loop():
    tok = WordPiece({"[UNK]": 0, "a": 1, "##": 2})
    assert tok.encode("ab a") == [0, 1]


def test_wordpiece_decode_keeps_specials_unless_asked_and_skips_them_in_the_middle():
    tok, v = _wp()
    ref = _wp_reference()
    ids = ref.encode("a [SEP] ab [MASK] unaffable").ids
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True) == "a ab unaffable"


def test_encode_batch_without_the_tokenizers_library_uses_the_reference_path():
    tok, v = _toy(MERGES, bos_id=3, add_bos=True)
    tok.tokenizers_lib = None  # as when ``tokenizers`` is not installed
    batch = ["hello there", "<|im_end|>1000", ""]
    assert tok.encode_batch(batch) == [[3, *tok.encode_reference(t)] for t in batch]


def test_hf_json_text_itself_has_tokenizers_keys_and_raw_unicode():
    """The file as written (not as ``tokenizers`` re-serialises it after filling in defaults): every key of
    the model, decoder and pre-tokenizer sections spelled as ``tokenizers`` spells them, added tokens in
    id order, and non-ASCII symbols written as themselves, as Hugging Face files are."""
    tk = need("tokenizers")
    tok, _ = _toy(MERGES, specials=("<|b|>", "<|a|>"), pre=[DIGITS, GPT2_PATTERN])  # id order != name order
    text = tok.to_hf_json()
    assert "Ġ" in text and "\\u0120" not in text
    ours = json.loads(text)
    ref = _reference(tok, specials_in_vocab=True)
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Digits(individual_digits=True), tk.pre_tokenizers.Split(tk.Regex(GPT2_PATTERN), "isolated"),
         tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    want = json.loads(ref.to_str())
    for section in ("decoder", "pre_tokenizer", "added_tokens"):
        assert ours[section] == want[section], section
    strip = lambda m: {k: v for k, v in m.items() if k not in ("vocab", "merges")}  # noqa: E731
    assert strip(ours["model"]) == strip(want["model"])
    assert [t["content"] for t in ours["added_tokens"]] == ["<|b|>", "<|a|>"]


def test_tokenizers_lib_is_built_by_default_and_only_on_request():
    need("tokenizers")
    tok, vocab = _toy(MERGES)
    assert tok.tokenizers_lib is not None
    off = ByteBPE(vocab, MERGES, [GPT2_PATTERN], tok.special_tokens, use_tokenizers_lib=False)
    assert off.tokenizers_lib is None
    texts = [*TEXTS, "<|im_start|>hello<|im_end|>"]
    assert off.encode_batch(texts) == [off.encode_reference(t) for t in texts] == tok.encode_batch(texts)


def test_tokenizers_lib_path_keeps_the_pre_split_pieces_and_ignore_merges():
    """Two settings of the Rust pipeline that only show on purpose-built cases: the byte-level step must not
    re-split the pieces (a merge across a space inside one piece survives), and ``ignore_merges`` must
    reach the Rust model (a whole word in the vocabulary is taken as is)."""
    need("tokenizers")
    lines = r"[^\n]+|\n"  # pieces are whole lines, spaces included
    tok, _ = _toy([("o", "Ġ")], pre=[lines])
    assert tok.encode_reference("o o") == [tok.vocab["oĠ"], tok.vocab["o"]]
    assert tok.encode_batch(["o o", "no no"]) == [tok.encode_reference("o o"), tok.encode_reference("no no")]
    merges = [("a", "b"), ("c", "d")]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"ab": 256, "cd": 257, "abcd": 258})  # "abcd" has no merge path: only ignore_merges finds it
    assert ByteBPE(vocab, merges, [GPT2_PATTERN]).encode("abcd") == [256, 257]  # merges apply by default
    tok = ByteBPE(vocab, merges, [GPT2_PATTERN], ignore_merges=True)
    assert tok.encode_reference("abcd") == [258]
    assert tok.encode_batch(["abcd", "abc"]) == [[258], tok.encode_reference("abc")]
