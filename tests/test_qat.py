"""Quantization-aware training (nn/fake_quant.py) and PEQA as ``llmlab sft`` methods (train/sft.py): the
straight-through gradient, ``to_quant_linear()`` against the forward pass and round-to-nearest, PEQA training
only the scales, QAT and PEQA loss going down, the saved quantized folder loading with the same logits, exact
resume, ``--qat-data self``, and the command end to end with its bad input (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmlab.compress.quantize import quantize_rtn_layer
from llmlab.data.sft import SFTDataConfig
from llmlab.formats import hf
from llmlab.models.registry import build_model, get_preset
from llmlab.nn.fake_quant import FakeQuantLinear, fake_quantize
from llmlab.nn.quant_linear import QuantLinear
from llmlab.tokenizer.chat import CHATML
from llmlab.train.sft import SFTConfig, SFTTrainConfig, run_sft

GRIDS = [(4, 0, False), (4, 0, True), (3, 4, False), (8, -1, True)]  # (bits, group size, symmetric)


def tiny_tokenizer():
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    specials = {"<|im_start|>": 256, "<|im_end|>": 257}
    return ByteBPE({**vocab, **specials}, [], GGUF_PRE["gpt2"], specials, eos_id=257, use_tokenizers_lib=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The ``llama-tiny`` preset (dim 64, ffn 172) as a chat model folder: byte tokenizer, ChatML. Weights are
    float16 values, so the quantized folder's float16 embedding is the in-memory one exactly."""
    folder = tmp_path_factory.mktemp("llama-tiny-chat")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("llama-tiny"), vocab_size=258, eos_token_id=257,
                              tie_embeddings=True).validate()
    sd = {k: v.half().float() for k, v in build_model(cfg).state_dict().items() if k != "lm_head.weight"}
    hf.write_folder(folder, cfg, sd, tokenizer_json=tiny_tokenizer().to_hf_json(),
                    tokenizer_config={"chat_template": CHATML, "eos_token": "<|im_end|>"})
    return folder


def _run(folder, out, method: str, steps: int = 4, resume: bool = False, lr: float = 0.0, task_examples: int = 48,
         **kw):
    cfg = SFTConfig(model=str(folder), method=method, out=str(out), eval_examples=2, eval_tokens=3, resume=resume,
                    **kw)
    tcfg = SFTTrainConfig(steps=steps, batch_size=4, seq_len=128, warmup=1, eval_every=0, eval_batches=1,
                          save_every=2, progress=False, seed=3, lr=lr)
    return run_sft(cfg, SFTDataConfig(task="addition", task_examples=task_examples), tcfg)


def _train_losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


# ---- the layer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group, symmetric", GRIDS)
def test_fake_quant_matches_round_to_nearest_and_quant_linear_bit_for_bit(bits, group, symmetric):
    """The forward pass uses the RTN grid of the current weight; to_quant_linear() holds those codes and
    scales and gives the same output bit for bit (also with per-token activations)."""
    torch.manual_seed(bits * 10 + group)
    lin = torch.nn.Linear(64, 172 if group != 4 else 48)
    x = torch.randn(2, 5, 64)
    for act_bits in (0, 8):
        fq = FakeQuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=symmetric, act_bits=act_bits)
        q = fq.to_quant_linear()
        assert isinstance(q, QuantLinear) and q.scales.dtype == torch.float16 and q.act == ("token" if act_bits
                                                                                            else "none")
        assert torch.equal(fq(x), q(x))
        assert torch.equal(fq.quantized_weight(), q.dequantized())
    rtn = quantize_rtn_layer(lin.weight.detach(), bits, group, symmetric, lin.bias)
    assert torch.equal(q.qweight, rtn.qweight) and torch.equal(q.scales, rtn.scales)
    assert (q.zeros is None) == symmetric and (symmetric or torch.equal(q.zeros, rtn.zeros))


def test_straight_through_gradient_inside_the_grid_and_zero_outside():
    torch.manual_seed(1)
    x = (torch.randn(3, 16) * 2).requires_grad_(True)
    scale, zero = torch.full((3,), 0.25), torch.full((3,), 8.0)  # 4-bit grid covering [-2.125, 1.875]
    upstream = torch.randn(3, 16)
    (fake_quantize(x, scale, zero, 4) * upstream).sum().backward()
    pos = x.detach() / 0.25 + 8
    inside = (pos >= -0.5) & (pos <= 15.5)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x.grad, upstream * inside, rtol=0, atol=0)
    (fake_quantize(x, scale, zero, 4, clip=False) * upstream).sum().backward()  # adds the unclipped gradient
    torch.testing.assert_close(x.grad, upstream * inside + upstream, rtol=0, atol=0)
    # the layer: every weight gets the float layer's gradient evaluated at the quantized weight (also the
    # range's extremes that the rounded zero point and scale leave past an end code), the input gradient goes
    # through the quantized weight
    lin = torch.nn.Linear(64, 172)
    fq = FakeQuantLinear.from_linear(lin, bits=4)
    xin = torch.randn(7, 64, requires_grad=True)
    up = torch.randn(7, 172)
    (fq(xin) * up).sum().backward()
    wq = fq.quantized_weight().detach().requires_grad_(True)
    xin2 = xin.detach().clone().requires_grad_(True)
    (F.linear(xin2, wq, lin.bias.detach()) * up).sum().backward()
    torch.testing.assert_close(fq.weight.grad, wq.grad)
    torch.testing.assert_close(xin.grad, xin2.grad)
    torch.testing.assert_close(fq.bias.grad, up.sum(0))


def test_per_token_activations_pass_the_gradient_straight_through():
    torch.manual_seed(2)
    fq = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), bits=4, act_bits=4)
    x = torch.randn(5, 64, requires_grad=True)
    up = torch.randn(5, 8)
    (fq(x) * up).sum().backward()
    torch.testing.assert_close(x.grad, up @ fq.quantized_weight().detach())
    assert fq(x).ne(F.linear(x, fq.quantized_weight())).any()  # the activations really are rounded


def test_bad_config_values():
    from llmlab.common import LlmlabError

    for kw, message in (({"quant_bits": 1}, "--quant-bits"), ({"quant_group_size": -2}, "--quant-group-size"),
                        ({"qat_act_bits": 1}, "--qat-act-bits"), ({"qat_data": "web"}, "--qat-data"),
                        ({"qat_self_tokens": 0}, "--qat-self-tokens")):
        with pytest.raises(LlmlabError, match=message):
            SFTConfig(**kw).validate()


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="bits"):
        FakeQuantLinear(torch.zeros(4, 8), bits=9)
    with pytest.raises(ValueError, match="group size"):
        FakeQuantLinear(torch.zeros(4, 172), group_size=32)


# ---- the sft methods ------------------------------------------------------------------------------------


STRAIGHT = {"steps": 6, "task_examples": 8}  # the runs of ``runs``: 8 examples, so the batches repeat
SELF = {"qat_data": "self", "qat_self_examples": 6, "qat_self_tokens": 5, "quant_group_size": 4,
        "quant_symmetric": True, "qat_act_bits": 8}


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """One short QAT run and one PEQA run (per channel), and a QAT run on the model's own replies with a
    symmetric grid, groups of 4 and 8-bit activations."""
    root = tmp_path_factory.mktemp("qat-runs")
    out = {m: (root / m, _run(tiny_folder, root / m, m, lr=lr, **STRAIGHT)) for m, lr in (("qat", 3e-3),
                                                                                         ("peqa", 1e-3))}
    out["qat-self"] = (root / "qat-self", _run(tiny_folder, root / "qat-self", "qat", steps=2, **SELF))
    return out


@pytest.mark.parametrize("method", ["qat", "peqa"])
def test_loss_goes_down_and_only_the_method_parameters_train(runs, tiny_folder, method):
    run, s = runs[method]
    losses = _train_losses(run)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert s["accuracy_quantized"] is not None and s["saved"] == str(run / "model")
    if method == "peqa":  # one scale per output channel of each linear layer
        n_scales = sum(m.out_features for m in build_model(hf.read_config(tiny_folder)).modules()
                       if isinstance(m, torch.nn.Linear)) - 258  # all but the head
        assert s["trainable_params"] == n_scales
    else:  # the linear layers and the norms; not the embedding
        assert s["total_params"] - 258 * 64 == s["trainable_params"]
    for name in ("summary.md", "accuracy.png", "loss.png"):
        assert (run / name).exists()
    assert "quantized, untrained (RTN)" in (run / "summary.md").read_text()


@pytest.mark.parametrize("method", ["qat", "peqa", "qat-self"])
def test_saved_folder_loads_with_the_same_logits(runs, tiny_folder, method):
    """llmlab.load(RUN) is the trained quantized model: rebuilt here from the base, the method and the final
    checkpoint (the in-memory model of the run), it gives the loaded folder's logits exactly."""
    from llmlab import load
    from llmlab.formats import safetensors as st
    from llmlab.formats.load import load_model
    from llmlab.train.sft import ADAPTER_WEIGHTS, apply_method, finish_quantized_

    run, s = runs[method]
    cfg = SFTConfig(**{k: v for k, v in json.loads((run / "sft_config.json").read_text()).items()
                       if k in SFTConfig.__dataclass_fields__})
    model = apply_method(load_model(str(tiny_folder)).model, cfg)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    model.load_state_dict(st.load(ckpt / ADAPTER_WEIGHTS), strict=False)
    spec = finish_quantized_(model, cfg)
    llm = load(str(run))
    qc = json.loads((run / "model" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == s["method"] and qc["modules"] == spec["modules"] and len(spec["modules"]) == 14
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.bits == 4 for m in layers)
    assert f"({s['method']} fine-tune, 4-bit, " in llm.loaded.source
    assert llm.info()["parameters"] == load(str(tiny_folder)).info()["parameters"]  # codes count as weights
    ids = torch.randint(0, 258, (2, 12))
    with torch.no_grad():
        assert torch.equal(llm.model.eval()(ids), model.eval()(ids))


def test_peqa_trains_only_the_scales(runs, tiny_folder):
    """Codes (and zero points) bit for bit those of round-to-nearest; scales moved; every other tensor as
    loaded (the embedding as float16)."""
    from llmlab.formats.load import load_model

    run, _ = runs["peqa"]
    base = load_model(str(tiny_folder)).model
    trained = load_model(str(run)).model
    for name, m in trained.named_modules():
        if isinstance(m, QuantLinear):
            w = base.get_submodule(name).weight.detach()
            rtn = quantize_rtn_layer(w, 4, 0, False)
            assert torch.equal(m.qweight, rtn.qweight) and torch.equal(m.zeros, rtn.zeros), name
            assert not torch.equal(m.scales, rtn.scales), name
    sd = trained.state_dict()
    for k, v in base.state_dict().items():
        if k in sd:
            assert torch.equal(sd[k], v.half().float() if v.ndim >= 2 else v), k


def test_peqa_scales_are_not_weight_decayed():
    """AdamW's decay would shrink a trainable scale, and with it every weight of its group, toward zero."""
    from llmlab.train.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(64, 8), quantize_rtn_layer(torch.randn(8, 64), 4, 32, False))
    model[1].train_scales_()
    decay, no_decay = param_groups(model, 0.1)
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)] and decay["weight_decay"] == 0.1
    assert any(p is model[1].scales for p in no_decay["params"]) and model[1].scales.ndim == 2


def test_resume_is_bit_identical(runs, tiny_folder, tmp_path):
    """QAT: 6 steps straight vs 2 + (stop) + 4 resumed: the same saved folder, bit for bit (the checkpoints
    hold only the trainable tensors: the frozen rest is rebuilt from the base)."""
    from llmlab.formats import safetensors as st
    from llmlab.train.sft import ADAPTER_WEIGHTS

    _run(tiny_folder, tmp_path / "split", "qat", lr=3e-3, **{**STRAIGHT, "steps": 2})
    ckpt = sorted((tmp_path / "split" / "checkpoints").glob("step-*"))[-1]
    assert not any(k.startswith("embed_tokens") for k in st.load(ckpt / ADAPTER_WEIGHTS))
    _run(tiny_folder, tmp_path / "split", "qat", lr=3e-3, resume=True, **STRAIGHT)
    a = st.load(runs["qat"][0] / "model" / "model.safetensors")
    b = st.load(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_qat_on_the_model_own_replies(runs, tiny_folder):
    """--qat-data self: the training targets are the model's generations, written to the run folder and read
    back from there (the model is not asked again) when the settings match."""
    from llmlab.data.sft import build_sft_data
    from llmlab.formats.load import chat_template_of, load_model
    from llmlab.train.sft import self_generated_data

    run, s = runs["qat-self"]
    path = run / "qat_self_data.jsonl"
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["settings"]["examples"] == 6 and len(lines) == 7
    rows = [json.loads(line) for line in lines[1:]]
    assert all(1 <= len(r["reply"]) <= 5 and r["prompt"][-1] == ord("\n") for r in rows)  # after "assistant\n"
    loaded = load_model(str(tiny_folder))
    data = build_sft_data(SFTDataConfig(task="addition", task_examples=48, seq_len=128, seed=3), loaded.tokenizer,
                          chat_template_of(loaded))
    cfg = SFTConfig(model=str(tiny_folder), method="qat", **SELF)
    again = self_generated_data(None, loaded, data, cfg, 3, path, reuse=True)  # None: no model to ask
    assert [ex.ids for ex in again.examples["train"]] == [r["prompt"] + r["reply"] for r in rows]
    assert all(ex.mask == [False] * len(r["prompt"]) + [True] * len(r["reply"])
               for ex, r in zip(again.examples["train"], rows))


# ---- the command ----------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmlab", "sft", *args], capture_output=True, text=True, timeout=300)


def test_cli_peqa_end_to_end_then_generate(tiny_folder, tmp_path):
    run = tmp_path / "run"
    r = _cli("--method", "peqa", "--quant-bits", "3", "--quant-group-size", "4", "--model", str(tiny_folder),
             "--out", str(run), "--steps", "2", "--batch-size", "2", "--seq-len", "128", "--task-examples", "8",
             "--eval-examples", "2", "--eval-tokens", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == "peqa" and s["steps"] == 2 and s["accuracy_quantized"] is not None
    qc = json.loads((run / "model" / "config.json").read_text())["quantization_config"]
    assert (qc["method"], qc["bits"], qc["group_size"], qc["symmetric"]) == ("peqa", 3, 4, False)
    from llmlab.cli import main  # in this process: the subprocess above already covers start-up

    assert main(["generate", "--model", str(run), "--max-new-tokens", "3", "--raw", "--no-stream", "1 + 1 ="]) == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "qat", "--quant-bits", "9"], "--quant-bits must be 2..8"),
    (["--method", "peqa", "--quant-bits", "1"], "--quant-bits must be 2..8"),
    (["--method", "peqa", "--quant-group-size", "32"], "does not divide"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_folder, tmp_path, capsys, args, message):
    from llmlab.cli import main

    assert main(["sft", *args, "--model", str(tiny_folder), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmlab: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
