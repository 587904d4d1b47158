"""``llmlab data prepare``: sources, dedup, skipped files, bad JSONL lines, shards, batches."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.data.shards import PrepareConfig, TokenShards, load_tokenizer, prepare

DOC_A = "def add(a, b):\n    return a + b\n" * 40
DOC_B = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 30


@pytest.fixture()
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text(DOC_A)
    (d / "sub" / "b.py").write_text(DOC_B)
    (d / "sub" / "dup.py").write_text(DOC_A)  # exact duplicate of a.py
    (d / "bin.txt").write_bytes(b"\x00\x01binary\x00" * 50)  # binary with a text suffix
    (d / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1") * 20)  # not UTF-8
    lines = [json.dumps({"text": f"print({i})\n" * 20 + f"x_{i} = {i}\n"}) for i in range(30)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"content": "no text field"}))
    lines.insert(9, json.dumps({"text": 42}))
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_prepare_counts_dedups_skips_and_round_trips(corpus_dir, tmp_path):
    out = tmp_path / "shards"
    meta = prepare(PrepareConfig(inputs=[str(corpus_dir)], out=str(out), vocab_size=300, val_fraction=0.1),
                   show_progress=False)
    c = meta["corpus"]
    assert meta["duplicates_removed"] == 1
    assert c["skipped_files"] == 2 and c["bad_lines"] == 3
    assert meta["documents"]["train"] + meta["documents"]["val"] == 2 + 30
    assert meta["documents"]["val"] >= 1 and meta["dtype"] == "uint16"
    shards = TokenShards(out)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    sep = meta["separator_id"]
    ids = np.concatenate([shards.splits["train"], shards.splits["val"]]).tolist()
    assert ids.count(sep) == 32  # one separator after each document
    docs = set(tok.decode([i for i in chunk]) for chunk in _split(ids, sep))
    assert DOC_A in docs and DOC_B in docs and "print(3)\n" * 20 + "x_3 = 3\n" in docs


def _split(ids, sep):
    cur = []
    for i in ids:
        if i == sep:
            yield cur
            cur = []
        else:
            cur.append(i)


def test_batches_are_a_function_of_seed_and_step_and_ranks_split_the_global_batch(corpus_dir, tmp_path):
    prepare(PrepareConfig(inputs=[str(corpus_dir)], out=str(tmp_path / "s"), vocab_size=300), show_progress=False)
    shards = TokenShards(tmp_path / "s")
    x1, y1 = shards.batch(5, 4, 16, seed=1)
    x2, _ = shards.batch(5, 4, 16, seed=1)
    x3, _ = shards.batch(6, 4, 16, seed=1)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    top, _ = shards.batch(5, 2, 16, seed=1, first_row=0, total_rows=4)
    bottom, _ = shards.batch(5, 2, 16, seed=1, first_row=2, total_rows=4)
    assert torch.equal(torch.cat([top, bottom]), x1)
    with pytest.raises(LlmlabError, match="fewer than one window"):
        shards.batch(0, 1, 10**7, seed=1)


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is in the data/test extra")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [DOC_A, DOC_B, None], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    meta = prepare(PrepareConfig(inputs=[str(tmp_path / "d.parquet")], out=str(tmp_path / "o"), vocab_size=300),
                   show_progress=False)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 2 and meta["corpus"]["bad_lines"] == 1
    with pytest.raises(LlmlabError, match="no column 'body'"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "d.parquet")], out=str(tmp_path / "o2"), text_field="body"),
                show_progress=False)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"\x00" * 100)
    with pytest.raises(LlmlabError, match="corpus is empty"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "empty.txt"), str(tmp_path / "bin.txt")],
                              out=str(tmp_path / "o")), show_progress=False)
    with pytest.raises(LlmlabError, match="no such file"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "missing")], out=str(tmp_path / "o")), show_progress=False)
    with pytest.raises(LlmlabError, match="matches no files"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "*.nothing")], out=str(tmp_path / "o")), show_progress=False)
    with pytest.raises(LlmlabError, match="too small"):
        PrepareConfig(vocab_size=100).validate()
    assert not (tmp_path / "o" / "meta.json").exists()  # nothing that looks complete


def test_truncated_shards_are_detected(corpus_dir, tmp_path):
    prepare(PrepareConfig(inputs=[str(corpus_dir)], out=str(tmp_path / "s"), vocab_size=300), show_progress=False)
    train = tmp_path / "s" / "train.bin"
    train.write_bytes(train.read_bytes()[:-10])
    with pytest.raises(LlmlabError, match="incomplete"):
        TokenShards(tmp_path / "s")


def test_cli_data_prepare(corpus_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmlab", "data", "prepare", str(corpus_dir), "--out",
                        str(tmp_path / "s"), "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 duplicates removed" in r.stderr and "2 files skipped" in r.stderr and "3 bad JSONL lines" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmlab", "data", "prepare", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
