"""Supervised fine-tuning (train/sft.py): the loss against the full-logits formula, packed rows equal to
separate examples, every method through the training loop on a tiny model (only its parameters change),
exact resume for LoRA and QLoRA, the run folder, and the command's bad input (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmlab.common import LlmlabError
from llmlab.data.sft import IGNORE, SFTBatch, SFTDataConfig
from llmlab.formats import hf
from llmlab.models.config import ModelConfig
from llmlab.models.decoder import DecoderLM
from llmlab.tokenizer.chat import CHATML
from llmlab.train.sft import METHODS, SFTConfig, SFTTrainConfig, run_sft, sft_loss

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def tiny_tokenizer():
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    specials = {s: len(vocab) + k for k, s in enumerate(SPECIALS)}
    return ByteBPE({**vocab, **specials}, [], GGUF_PRE["gpt2"], specials, eos_id=specials["<|im_end|>"],
                   use_tokenizers_lib=False)


def tiny_config(vocab: int = 258, max_seq_len: int = 256) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       max_seq_len=max_seq_len, tie_embeddings=True, eos_token_id=257).validate()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama chat model as a Hugging Face folder (byte tokenizer, ChatML template)."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DecoderLM(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf.write_folder(folder, cfg, sd, tokenizer_json=tiny_tokenizer().to_hf_json(),
                    tokenizer_config={"chat_template": CHATML, "eos_token": "<|im_end|>"})
    return folder


def batch_of(rows: list[list[tuple[list[int], list[bool]]]], T: int) -> SFTBatch:
    """Rows of examples (ids, loss mask) -> a packed SFTBatch, as data/sft.py builds it."""
    from llmlab.data.sft import TokenizedExample, make_row

    cols = [make_row([TokenizedExample(ids, mask, "test") for ids, mask in row], T, 0) for row in rows]
    return SFTBatch(*(torch.tensor(c, dtype=torch.long) for c in zip(*cols)))


def test_sft_loss_is_cross_entropy_on_assistant_targets():
    torch.manual_seed(1)
    model = DecoderLM(tiny_config())
    ids = torch.randint(0, 256, (2, 12)).tolist()
    masks = [[t >= 5 for t in range(12)], [t >= 8 for t in range(12)]]
    b = batch_of([[(ids[0], masks[0])], [(ids[1], masks[1])]], 12)
    loss, n = sft_loss(model, b)
    logits = model(b.input_ids)  # (B, T, V), the full head
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels.reshape(-1), ignore_index=IGNORE)
    assert n == 7 + 4 == int((b.labels != IGNORE).sum())
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


def test_packed_row_equals_separate_examples():
    """Two examples packed in one row (block-diagonal mask, positions restarting) give the loss and the
    gradients of the two examples run one by one; without the mask they would not (negative control)."""
    torch.manual_seed(2)
    model = DecoderLM(tiny_config())
    a, c = torch.randint(0, 256, (9,)).tolist(), torch.randint(0, 256, (7,)).tolist()
    ma, mc = [t >= 4 for t in range(9)], [t >= 3 for t in range(7)]
    packed = batch_of([[(a, ma), (c, mc)]], 20)  # 16 tokens + 4 padding
    loss_p, n_p = sft_loss(model, packed)
    sep = [sft_loss(model, batch_of([[(x, m)]], len(x))) for x, m in ((a, ma), (c, mc))]
    want = sum(lv * n for lv, n in sep) / sum(n for _, n in sep)
    assert n_p == sum(n for _, n in sep)
    torch.testing.assert_close(loss_p, want, rtol=1e-5, atol=1e-6)
    # negative control: the same row with plain causal attention and running positions differs
    b = packed
    hidden = model(b.input_ids, return_hidden=True)
    sel = b.labels != IGNORE
    leaky = F.cross_entropy(model.lm_head(hidden[sel]), b.labels[sel])
    assert abs(float(leaky) - float(want)) > 1e-3


def _run(tiny_folder, tmp_path, method: str, steps: int = 4, resume: bool = True, out=None, **kw):
    cfg = SFTConfig(model=str(tiny_folder), method=method, out=str(out or tmp_path / method), eval_examples=4,
                    eval_tokens=4, lora_r=4, adapter_dim=8, virtual_tokens=3, resume=resume, **kw)
    data = SFTDataConfig(task="addition", task_examples=64)
    tcfg = SFTTrainConfig(steps=steps, batch_size=4, seq_len=128, warmup=1, eval_every=0, eval_batches=1,
                          save_every=2, progress=False, seed=3)
    return run_sft(cfg, data, tcfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_only_its_parameters(tiny_folder, tmp_path, method):
    s = _run(tiny_folder, tmp_path, method)
    run = tmp_path / method
    assert s["steps"] == 4 and s["stopped"] == "done"
    assert s["accuracy_before"] is not None and s["accuracy_after"] is not None
    for name in ("summary.md", "summary.json", "loss.png", "accuracy.png", "sft_config.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    whole = method in ("full", "qat", "peqa")  # these save a model folder (qat / peqa: a quantized one)
    saved = run / ("model" if whole else "adapter")
    assert (saved / ("model.safetensors" if whole else "adapter_model.safetensors")).exists()
    total = s["total_params"]
    if method == "full":
        assert s["trainable_params"] == total
    elif method == "qat":  # every linear weight in the blocks trains through the fake quantizer
        assert total / 4 < s["trainable_params"] < total
    else:
        assert 0 < s["trainable_params"] < total / 4
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_resumed_run_is_bit_identical(tiny_folder, tmp_path, method):
    """6 steps straight vs 2 + (stop) + 4 resumed: the same adapter tensors, bit for bit."""
    from llmlab.formats import safetensors as st

    _run(tiny_folder, tmp_path, method, steps=6, resume=False, out=tmp_path / "straight")
    _run(tiny_folder, tmp_path, method, steps=2, resume=False, out=tmp_path / "split")
    _run(tiny_folder, tmp_path, method, steps=6, resume=True, out=tmp_path / "split")
    a = st.load(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = st.load(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("kind") == "train"] == list(range(1, 7))


def test_adapter_checkpoints_hold_only_the_trainable_tensors(tiny_folder, tmp_path):
    from llmlab.formats import safetensors as st
    from llmlab.train.sft import ADAPTER_WEIGHTS

    _run(tiny_folder, tmp_path, "lora", steps=2)
    ckpt = sorted((tmp_path / "lora" / "checkpoints").glob("step-*"))[-1]
    names = set(st.load(ckpt / ADAPTER_WEIGHTS))
    assert names and all(".lora_" in k for k in names)


def test_bad_config_values():
    with pytest.raises(LlmlabError, match="lora-r"):
        SFTConfig(lora_r=0).validate()
    with pytest.raises(LlmlabError, match="--method"):
        SFTConfig(method="dora").validate()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "sft", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--lora-r", "0"], "--lora-r must be a positive integer"),
    (["--lora-targets", "nothing_here"], "match"),
    (["--task", "no_such_task"], "no_such_task"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_folder, tmp_path, args, message):
    r = _cli("--model", str(tiny_folder), "--out", str(tmp_path / "run"), "--steps", "1", "--eval-examples", "0",
             *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("llmlab: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_no_assistant_turn_and_empty_data(tiny_folder, tmp_path):
    f = tmp_path / "user_only.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    r = _cli(str(f), "--model", str(tiny_folder), "--out", str(tmp_path / "r1"), "--steps", "1")
    assert r.returncode == 2 and "assistant" in r.stderr and "Traceback" not in r.stderr
    g = tmp_path / "bad.jsonl"
    g.write_text("{not json\n")
    r = _cli(str(g), "--model", str(tiny_folder), "--out", str(tmp_path / "r2"), "--steps", "1")
    assert r.returncode == 2 and "holds no JSON object records" in r.stderr and "Traceback" not in r.stderr


def test_sft_command_on_smollm2_small_budget(smollm_path, tmp_path):
    """`llmlab sft` as the README shows it, on the real SmolLM2-135M-Instruct, with a small budget; then
    `llmlab generate --model RUN` and `llmlab chat --model RUN` use the result."""
    run = tmp_path / "sft"
    r = _cli("--steps", "2", "--batch-size", "2", "--seq-len", "128", "--task-examples", "16", "--eval-examples",
             "4", "--eval-tokens", "8", "--out", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out exact match" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == "lora" and s["task"] == "addition" and s["steps"] == 2
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "accuracy.png").exists()
    g = subprocess.run([sys.executable, "-m", "llmlab", "generate", "--model", str(run), "--max-new-tokens", "4",
                        "What is 12 + 30? Reply with the number only."], capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.strip()
    # the README's `llmlab chat --model runs/sft`: the run's base + adapter, prompts piped in
    c = subprocess.run([sys.executable, "-m", "llmlab", "chat", "--model", str(run), "--max-new-tokens", "4"],
                       input="What is 12 + 30? Reply with the number only.\n", capture_output=True, text=True,
                       timeout=300)
    assert c.returncode == 0 and "Traceback" not in c.stderr, c.stderr[-2000:]
    assert c.stdout.strip()


@pytest.mark.parametrize("args", [
    ["--method", "qlora"], ["--method", "qlora", "--qlora-base", "packed"], ["--method", "full"],
    ["--method", "adapter"], ["--method", "prefix"], ["--method", "prompt"],
    ["--task", "reversal", "--lora-r", "8", "--lora-targets", "q_proj,v_proj", "--rslora", "--optimizer", "adamw8bit"],
])
def test_readme_sft_commands_run_as_written(tiny_folder, tmp_path, args):
    """The README's `llmlab sft ...` lines, on the tiny model with a small budget."""
    r = _cli(*args, "--model", str(tiny_folder), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
             "--seq-len", "128", "--task-examples", "16", "--eval-examples", "2", "--eval-tokens", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 and s["saved"]


def test_readme_sft_command_on_a_file(tiny_folder, tmp_path):
    """`llmlab sft data.jsonl --format alpaca --no-packing --on-overlong error --on-bad-line error` as written."""
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in
                         ["yes", "no", "maybe", "ok", "fine", "sure", "never", "always"]))
    r = _cli(str(f), "--format", "alpaca", "--no-packing", "--on-overlong", "error", "--on-bad-line", "error",
             "--model", str(tiny_folder), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
             "--seq-len", "128", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["task"] is None and s["accuracy_after"] is None and (tmp_path / "run" / "adapter").exists()
