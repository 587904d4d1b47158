"""BPE training (tokenizer/bpe_train.py) against Hugging Face ``tokenizers``' BpeTrainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.common import LlmlabError
from llmlab.data.corpus import stdlib_root
from llmlab.tokenizer import bpe_train
from llmlab.tokenizer.pretokenize import DIGITS, GPT2_PATTERN
from tests.conftest import need

SPECIALS = ["<|endoftext|>", "<|mask|>"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    root = stdlib_root()
    files = sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))[:12]
    texts = [p.read_text(encoding="utf-8") for p in files]
    texts.append("Prose with accents: café, naïve, Zürich; emoji 🚀🔥; CJK 日本語のテキスト; digits 1234567890.\n" * 20)
    return texts


def hf_train(texts, vocab_size, pre_steps):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True) if s == DIGITS else
             pre_tokenizers.Split(Regex(s), behavior="isolated") for s in pre_steps]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.mark.parametrize("pre_steps", [[GPT2_PATTERN], [DIGITS, GPT2_PATTERN]])
def test_same_merges_and_bytes_per_token_as_tokenizers(corpus, pre_steps):
    need("tokenizers")
    ours = bpe_train.train_bpe(corpus, 1500, special_tokens=SPECIALS, pre_steps=pre_steps)
    hf = hf_train(corpus, 1500, pre_steps)
    hf_model = json.loads(hf.to_str())["model"]
    hf_merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in hf_model["merges"]]
    assert ours.merges == hf_merges  # the same greedy algorithm, the same tie-breaking
    assert ours.vocab == hf_model["vocab"] | {s: i for i, s in enumerate(SPECIALS)}
    n_bytes = sum(len(t.encode()) for t in corpus)
    ours_tokens = sum(len(ours.encode_reference(t)) for t in corpus)
    hf_tokens = sum(len(e.ids) for e in hf.encode_batch(corpus))
    assert abs(n_bytes / ours_tokens - n_bytes / hf_tokens) / (n_bytes / hf_tokens) < 0.01


def test_hf_export_loads_in_tokenizers_and_encodes_identically(corpus, tmp_path):
    Tokenizer = need("tokenizers").Tokenizer

    tok = bpe_train.train_bpe(corpus, 800, special_tokens=SPECIALS)
    hf = Tokenizer.from_str(tok.to_hf_json())
    for text in [*corpus[:5], "x = 1 <|endoftext|> y = 2", "  \n\t  spaces 🚀"]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode_reference(text)
        assert hf.decode(tok.encode_reference(text), skip_special_tokens=False) == text
    bpe_train.write_tokenizer(tok, tmp_path / "tok.json")
    back = bpe_train.read_tokenizer(tmp_path / "tok.json")
    assert back.merges == tok.merges and back.vocab == tok.vocab and back.special_tokens == tok.special_tokens
    assert back.encode(corpus[0]) == tok.encode(corpus[0])


def test_min_frequency_stops_early_and_small_vocab_is_an_error():
    tok = bpe_train.train_bpe(["ab ab ab cd"], 1000, min_frequency=2)
    assert len(tok.vocab) < 1000  # ran out of pairs seen twice
    with pytest.raises(LlmlabError, match="too small"):
        bpe_train.train_bpe(["abc"], 200, special_tokens=SPECIALS)


def test_load_rejects_foreign_and_malformed_files(tmp_path):
    (tmp_path / "a.json").write_text('{"format": "something-else"}')
    with pytest.raises(LlmlabError, match="not an llmlab BPE"):
        bpe_train.read_tokenizer(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"format": "llmlab-bpe", "merges": 3}')
    with pytest.raises(LlmlabError, match="malformed"):
        bpe_train.read_tokenizer(tmp_path / "b.json")


def test_cli_tokenizer_train(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def hello(name):\n    return 'hello ' + name\n" * 50)
    (src / "b.bin").write_bytes(b"\x00\x01\x02" * 10)  # not a text suffix: ignored in a folder
    out = tmp_path / "tok.json"
    r = subprocess.run([sys.executable, "-m", "llmlab", "tokenizer", "train", str(src), "--vocab-size", "300",
                        "--out", str(out), "--hf-json", str(tmp_path / "tokenizer.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "tokenizer.json").exists()
    r = subprocess.run([sys.executable, "-m", "llmlab", "tokenizer", "train", str(src), "--vocab-size", "100"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "too small" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmlab", "tokenizer", "train", str(Path(tmp_path / "nope"))],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr
