"""A chat that doesn't loop: sampling defaults (model file > CHAT_DEFAULTS, flags over both), --greedy,
and the repetition guard ending a looping reply, through the API, the session and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmlab.common import LlmlabError
from llmlab.formats.load import sampling_defaults
from llmlab.infer.sample import CHAT_DEFAULTS, SamplingParams, chat_sampling

HAIKU = "Write a haiku about autumn."


def run(*args, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout)


def test_chat_sampling_layers_defaults_model_file_and_flags():
    assert chat_sampling() == SamplingParams(**CHAT_DEFAULTS)
    assert not chat_sampling().greedy and CHAT_DEFAULTS["repetition_penalty"] > 1
    got = chat_sampling({"temperature": 0.2, "top_k": 20})  # the model file wins over our defaults
    assert (got.temperature, got.top_k, got.top_p) == (0.2, 20, CHAT_DEFAULTS["top_p"])
    got = chat_sampling({"temperature": 0.2}, temperature=1.0, top_p=None)  # flags win; None = not given
    assert (got.temperature, got.top_p) == (1.0, CHAT_DEFAULTS["top_p"])
    assert chat_sampling({"temperature": 0.2}, greedy=True) == SamplingParams()
    assert chat_sampling(greedy=True, repetition_penalty=1.3).repetition_penalty == 1.3
    with pytest.raises(LlmlabError, match="top_p"):
        chat_sampling(top_p=0.0)


def test_sampling_defaults_read_from_gguf_keys_and_generation_config():
    gguf = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 0.95,
            "general.sampling.min_p": 0.0, "general.sampling.penalty_repeat": 1.05, "general.name": "x"}
    assert sampling_defaults(gguf) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0,
                                       "repetition_penalty": 1.05}
    hf = {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 50}
    assert sampling_defaults(hf) == {"temperature": 0.3, "top_p": 0.9}
    # advice of the wrong type or out of range is ignored, never an error
    bad = {"general.sampling.temp": "hot", "general.sampling.top_p": 0.0, "general.sampling.top_k": -1,
           "temperature": True, "repetition_penalty": [1.1]}
    assert sampling_defaults(bad) == {}


def test_a_folder_s_generation_config_sets_the_chat_sampling(tmp_path):
    from llmlab.api import LLM
    from llmlab.formats import hf
    from llmlab.formats.load import load_model
    from llmlab.models import build_model, get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    cfg = get_preset("llama-tiny")
    cfg.vocab_size = 256
    tok = ByteBPE({c: i for i, c in enumerate(bytes_to_unicode().values())}, [], GGUF_PRE["gpt2"])
    hf.write_folder(tmp_path / "m", cfg, build_model(cfg).state_dict(), tokenizer_json=tok.to_hf_json())
    assert LLM(load_model(tmp_path / "m")).chat_sampling() == chat_sampling()  # no advice: our defaults
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "top_k": 7}))
    got = LLM(load_model(tmp_path / "m")).chat_sampling(top_k=3)
    assert (got.temperature, got.top_k, got.top_p) == (0.25, 3, CHAT_DEFAULTS["top_p"])


@pytest.mark.slow
def test_greedy_haiku_loops_and_the_guard_ends_it(smollm):
    """The issue's case: greedy SmolLM2 repeats "a leaf's fate is determined" until the budget runs out.
    Without the guard it uses all 160 tokens; with it the reply ends after the third copy, and the
    session keeps one copy in its history."""
    from llmlab.infer.chat_session import ChatSession
    from llmlab.infer.repetition import RepetitionGuard

    free = smollm.chat(HAIKU, 160, repetition_guard=None)
    assert smollm.last_finish_reasons == ["length"]
    assert free.count("fate is determined") >= 6  # the negative control: it really loops
    guarded = smollm.chat(HAIKU, 160)
    assert smollm.last_finish_reasons == ["repetition"]
    assert free.startswith(guarded) and len(guarded) < len(free) / 2
    session = ChatSession(smollm, max_new_tokens=160, sampling=SamplingParams())
    reply = session.send(HAIKU)
    assert session.looped and reply == guarded
    kept = session.history[-1]["content"]
    assert kept.count("fate is determined") < reply.count("fate is determined")
    assert RepetitionGuard().find(smollm.tokenizer.encode(kept)) is None


@pytest.mark.slow
def test_cli_chat_samples_by_default_and_says_when_it_stopped_a_loop(smollm_path):
    # The float-activation kernel gives the reference's greedy reply, which loops; the int8 kernel's happens not to.
    proc = run("chat", "--greedy", "--max-new-tokens", "160", "--packed-kernel", "float", stdin=HAIKU + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "kept repeating" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.count("fate is determined") <= 4
    proc = run("chat", "--seed", "0", "--max-new-tokens", "60", stdin=HAIKU + "\n")  # the default: sampling
    assert proc.returncode == 0, proc.stderr
    assert "fate is determined" not in proc.stdout and len(proc.stdout.split()) >= 8
    assert "kept repeating" not in proc.stderr
    proc = run("chat", "--top-p", "0", stdin="hi\n")
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr
