"""The CLI as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from llmlab.nn.packed_linear import kernel_status


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
    assert info["packed_kernel"] == kernel_status()  # which C kernel runs here, or why none does
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
    (["generate", "hi", "--kv-dtype", "bfloat16"], "invalid choice"),
])
def test_usage_errors_exit_2_one_line(args, needle, smollm_path):
    proc = run(*args)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_kv_dtype(smollm_path, minilm_path):
    """--kv-dtype float16 generates on the half cache; an encoder has no KV cache to set: one line, exit 2."""
    proc = run("generate", "--raw", "--max-new-tokens", "6", "--kv-dtype", "float16", "The capital of France is")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    proc = run("generate", "hi", "--model", "all-minilm-l6-v2", "--kv-dtype", "float16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert len(proc.stderr.splitlines()) == 1 and "--kv-dtype float16" in proc.stderr, proc.stderr


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


@pytest.mark.slow
def test_chat_reads_piped_turns_and_commands(smollm_path):
    # The default --packed-kernel int8r: the reference's greedy reply ("The capital of France is Paris.") from the C
    # step with residual Q8 blocks where a block has an outlier; --packed-kernel int8's first token is a near-tie
    # that flips to "L'Étoile, ...", exactly as llama.cpp's greedy reply on this GGUF.
    proc = run("chat", "--greedy", "--max-new-tokens", "20",
               stdin="What is the capital of France?\n/reset\n/bogus\nWhat is the capital of Italy?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    out = [line for line in proc.stdout.splitlines() if line.strip()]
    assert "Paris" in out[0] and len(out) >= 2  # one reply per turn
    assert "history cleared" in proc.stderr and "unknown command /bogus" in proc.stderr


def test_chat_session_history_and_trimming(tmp_path):
    from llmlab.api import LLM
    from llmlab.formats import hf
    from llmlab.formats.load import load_model
    from llmlab.infer.chat_session import ChatSession
    from llmlab.models import build_model, get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    cfg = get_preset("llama-tiny")
    cfg.vocab_size, cfg.max_seq_len = 256, 160
    tok = ByteBPE({c: i for i, c in enumerate(bytes_to_unicode().values())}, [], GGUF_PRE["gpt2"])
    hf.write_folder(tmp_path / "m", cfg, build_model(cfg).state_dict(), tokenizer_json=tok.to_hf_json())
    session = ChatSession(LLM(load_model(tmp_path / "m")), system="S", max_new_tokens=8, ignore_eos=True)
    for i in range(6):
        session.send(f"message number {i}")
    # the history was trimmed from the oldest turns to fit 160 tokens; the latest turn is always kept
    assert session.history[-2]["content"] == "message number 5"
    assert len(session.history) < 12 and session.messages()[0] == {"role": "system", "content": "S"}
    session.reset()
    assert session.messages() == [{"role": "system", "content": "S"}]


@pytest.mark.slow
def test_generate_decoding_modes(smollm_path):
    base = ["generate", "Once upon a time", "--raw", "--max-new-tokens", "12", "--no-stream"]
    beams = run(*base, "--beams", "3")
    seeded = [run(*base, "--temperature", "0.8", "--top-p", "0.9", "--seed", "5").stdout for _ in range(2)]
    spec = run(*base, "--speculative", "ngram", "--draft-tokens", "3")
    greedy = run(*base)
    assert beams.returncode == 0 and beams.stdout.strip()
    assert seeded[0] == seeded[1] and seeded[0].strip()
    assert spec.stdout == greedy.stdout and "draft tokens accepted" in spec.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "-3"], "top_k"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--min-p", "2"], "min_p"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--frequency-penalty", "9"], "frequency_penalty"),
    (["--beams", "0"], "beams must be >= 1"),
    (["--beams", "2", "--temperature", "0.7"], "beam search is deterministic"),
    (["--draft-tokens", "0", "--speculative", "ngram"], "draft_tokens"),
    (["--speculative", "gpt2-tiny"], "share the target's tokenizer"),
])
def test_invalid_decoding_flags_exit_2(flags, needle, smollm_path):
    proc = run("generate", "hello", "--max-new-tokens", "2", *flags)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_explore_cli(tmp_path, smollm_path):
    proc = run("explore", "The capital of France is", "--raw", "--steps", "4", "--out", str(tmp_path / "ex"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ex" / "index.html").exists() and "Paris" in proc.stdout
    bad = run("explore", "hi", "--steps", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--steps" in bad.stderr and not (tmp_path / "bad").exists()
