"""The CLI as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def run(*args, stdin: str | None = None, timeout: int = 240):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout)


def test_help_lists_every_flag_with_default():
    for cmd in ("info", "generate", "convert"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0
        body = proc.stdout.split("options:", 1)[1]
        entries = re.split(r"\n  (?=-)", "\n" + body)[1:]
        assert len(entries) >= 3
        for entry in entries:
            if not entry.startswith("-h"):
                assert "(default:" in " ".join(entry.split()), (cmd, entry)


def test_info_json_on_embedded_model(smollm_path):
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["parameters"] == 134_515_008
    assert info["context_length"] == 8192 and info["file_tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_info_on_preset_and_encoder(minilm_path):
    proc = run("info", "gpt2-tiny")
    assert proc.returncode == 0 and "gpt2" in proc.stdout
    proc = run("info", "all-minilm-l6-v2", "--json")
    assert json.loads(proc.stdout)["architecture"] == "bert"


@pytest.mark.slow
def test_generate_prints_only_the_answer(smollm_path):
    proc = run("generate", "What is the capital of France? Answer in one word.", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "<|im_" not in proc.stdout and "assistant" not in proc.stdout


@pytest.mark.slow
def test_generate_reads_stdin_and_raw(smollm_path):
    proc = run("generate", "--raw", "--max-new-tokens", "8", "--no-stream", stdin="def add(a, b):\n    return")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.parametrize("args,needle", [
    (["generate", "", "--max-new-tokens", "4"], "prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "hi", "--model", "/nope.gguf"], "no such file"),
    (["info", "--dtype", "float8"], "invalid choice"),
    (["info", "--device", "tpu9"], "unknown device"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_one_line(args, needle, smollm_path):
    proc = run(*args)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr


def test_prompt_longer_than_context(tmp_path):
    from llmlab.formats import hf
    from llmlab.models import build_model, get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    cfg = get_preset("llama-tiny")
    cfg.vocab_size, cfg.max_seq_len = 256, 32
    tok = ByteBPE({c: i for i, c in enumerate(bytes_to_unicode().values())}, [], GGUF_PRE["gpt2"])
    hf.write_folder(tmp_path / "m", cfg, build_model(cfg).state_dict(), tokenizer_json=tok.to_hf_json())
    proc = run("generate", "x" * 100, "--raw", "--model", str(tmp_path / "m"))
    assert proc.returncode == 2 and "context holds 32" in proc.stderr


def test_convert_refuses_to_overwrite_and_roundtrips(tmp_path, minilm_path):
    out = tmp_path / "mini"
    assert run("convert", "all-minilm-l6-v2", str(out)).returncode == 0
    proc = run("convert", "all-minilm-l6-v2", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = run("info", str(out), "--json")
    assert json.loads(proc.stdout)["architecture"] == "bert"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
