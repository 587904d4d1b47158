"""Using a fine-tuning result: ``load(RUN or adapter folder)`` (formats/load.py), the base fingerprint
(formats/peft.py), ``llmlab merge`` (formats/merge.py), and their bad inputs through the CLI (one line, exit 2).

Tiny random Llamas with a byte-level tokenizer stand in for the base; run folders are made by hand in the
layout ``llmlab sft`` writes (sft_config.json + adapter/ or model/). The fingerprint's robustness is checked
on the real embedded SmolLM2 (Q4_1 GGUF, its fp32 HF conversion, NF4, a 4-bit-rounded embedding).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.formats import hf
from llmlab.formats import peft as peft_io
from llmlab.formats.load import load_model
from llmlab.models import build_model
from llmlab.models.config import ModelConfig
from llmlab.nn.lora import LoRAConfig, apply_lora_, load_lora_state_dict_, lora_modules, lora_state_dict
from llmlab.nn.nf4 import dequantize_nf4, quantize_linears_nf4_, quantize_nf4
from llmlab.nn.packed_linear import set_impl_
from llmlab.nn.qlora import prepare_qlora_
from tests.conftest import need

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tokenizer():
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    return ByteBPE({c: i for i, c in enumerate(bytes_to_unicode().values())}, [], GGUF_PRE["gpt2"])


def _base(folder, seed=0, dim=64):
    """A tiny random Llama HF folder (with tokenizer.json) whose weights all matter (norms randomized)."""
    cfg = ModelConfig(arch="llama", vocab_size=256, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, tie_embeddings=False)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.write_folder(folder, cfg, model.state_dict(), tokenizer_json=_tokenizer().to_hf_json())
    return folder


def _run(tmp_path, base, method="lora", qlora_base=None, name="run", seed=1):
    """An sft run folder made by hand: the base (quantized as the method says), LoRA with random B, saved
    with the base fingerprint. Returns the folder and the adapter's tensors (llmlab names)."""
    loaded = load_model(base, packed=qlora_base == "packed")
    model = loaded.model
    if qlora_base:
        prepare_qlora_(model, qlora_base)
    lora = LoRAConfig(r=4, alpha=8, target_modules=TARGETS)
    apply_lora_(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    run = tmp_path / name
    fp = peft_io.base_fingerprint(model, loaded.config, loaded.tokenizer)
    peft_io.save_adapter(run / "adapter", model, lora, base_model=str(base), base_fingerprint=fp)
    conf = {"model": str(base), "method": method}
    if qlora_base:
        conf["qlora_base"] = qlora_base
    (run / "sft_config.json").write_text(json.dumps(conf))
    return run, {k: v.clone() for k, v in lora_state_dict(model).items()}


def _by_hand(base, sd, qlora_base=None):
    """The base loaded and the adapter applied step by step (the reference for load(RUN))."""
    model = load_model(base, packed=qlora_base == "packed").model
    if qlora_base == "nf4":
        quantize_linears_nf4_(model)  # every linear but lm_head, as QLoRA does
    if qlora_base == "packed":
        set_impl_(model, "float")  # QLoRA trains on float activations (prepare_qlora_), not the int8 decode kernel
    apply_lora_(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    load_lora_state_dict_(model, sd)
    return model.eval()


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(IDS)


# ---- load(RUN) / load(adapter folder) ------------------------------------------------------------------


@pytest.mark.parametrize("qlora_base", [None, "nf4", "packed"])
def test_load_run_equals_base_plus_adapter_by_hand(tmp_path, qlora_base):
    from llmlab.api import load

    base = _base(tmp_path / "base")
    run, sd = _run(tmp_path, base, method="qlora" if qlora_base else "lora", qlora_base=qlora_base)
    ref = _logits(_by_hand(base, sd, qlora_base))
    llm = load(run)
    got = _logits(llm.model)
    lift = (got - _logits(load_model(base).model)).abs().max().item()
    d = (got - ref).abs().max().item()
    print(f"load(RUN) {qlora_base or 'lora'}: max|dlogits| vs by hand {d:.2e} (adapter's effect {lift:.2e})")
    assert d <= 1e-6 and lift > 1e-2
    frozen = {None: "Linear", "nf4": "NF4Linear", "packed": "PackedLinear"}[qlora_base]
    assert type(llm.model.layers[0].self_attn.q_proj.base_layer).__name__ == frozen
    info = llm.info()
    assert "LoRA adapter" in info["source"] and str(base) in info["source"] and info["format"] == "hf+lora"
    assert llm.tokenizer is not None and llm.tokenizer.encode("hi") == [ord("h"), ord("i")]
    # the adapter folder on its own: the same model (qlora_base read from the run folder around it)
    d_adapter = (_logits(load_model(run / "adapter").model) - ref).abs().max().item()
    assert d_adapter <= 1e-6


def test_relative_base_is_found_beside_the_run_and_full_runs_load_their_model(tmp_path, monkeypatch):
    base = _base(tmp_path / "base")
    run, sd = _run(tmp_path, base)
    (run / "sft_config.json").write_text(json.dumps({"model": "base", "method": "lora"}))  # a relative path
    monkeypatch.chdir(run / "adapter")  # not found in the current directory: found beside the run
    d = (_logits(load_model(run).model) - _logits(_by_hand(base, sd))).abs().max().item()
    assert d <= 1e-6
    full = tmp_path / "full"
    _base(full / "model", seed=3)
    (full / "sft_config.json").write_text(json.dumps({"model": str(base), "method": "full"}))
    loaded = load_model(full)
    assert torch.equal(_logits(loaded.model), _logits(load_model(full / "model").model))
    assert "full fine-tune" in loaded.source


def test_prompt_tuning_folder_loads_onto_its_base(tmp_path):
    """Dispatch on peft_type: a PROMPT_TUNING folder (formats/peft_prompt.py) = the base with the prompt."""
    peft_prompt = pytest.importorskip("llmlab.formats.peft_prompt")
    from llmlab.nn.prompt_tuning import PromptTuningConfig, apply_prompt_tuning

    base = _base(tmp_path / "base")
    loaded = load_model(base)
    tuned = apply_prompt_tuning(loaded.model, PromptTuningConfig(num_virtual_tokens=3),
                                generator=torch.Generator().manual_seed(4))
    peft_prompt.save_prompt_adapter(tmp_path / "p", tuned, loaded.config, base_model=str(base))
    got = load_model(tmp_path / "p")
    assert "prompt-tuning adapter" in got.source
    d = (_logits(got.model) - _logits(tuned)).abs().max().item()
    lift = (_logits(got.model) - _logits(load_model(base).model)).abs().max().item()
    assert d <= 1e-6 and lift > 1e-2


def test_packed_lora_folds_then_packs(tmp_path):
    base = _base(tmp_path / "base")
    run, sd = _run(tmp_path, base)
    loaded = load_model(run, packed=True)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "PackedLinear" in kinds and "LoRALinear" not in kinds
    ref = _logits(_by_hand(base, sd))
    d = (_logits(loaded.model) - ref).abs().max().item()
    print(f"packed LoRA (folded, Q8_0): max|dlogits| {d:.2e} (logits scale {ref.abs().max().item():.2f})")
    assert d < 0.02 * ref.abs().max().item()


# ---- base fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_tiny_same_model_any_precision_other_model_differs(tmp_path):
    a, b = _base(tmp_path / "a"), _base(tmp_path / "b", seed=7)
    la, lb = load_model(a), load_model(b)
    fp = peft_io.base_fingerprint(la.model, la.config, la.tokenizer)
    assert fp.startswith("v1:llama-v256-d64-l2-h4-kv2-f96:tok-") and len(fp) < 120
    assert peft_io.fingerprint_mismatch(fp, lb.model, lb.config, lb.tokenizer) == "embedding weights differ"
    quantize_linears_nf4_(la.model)
    assert peft_io.base_fingerprint(la.model, la.config, la.tokenizer) == fp
    with torch.no_grad():  # the embedding itself rounded to 4 bits (NF4, blocks of 64): still the same base
        w = la.model.embed_tokens.weight
        w.copy_(dequantize_nf4(quantize_nf4(w)))
    assert peft_io.fingerprint_mismatch(fp, la.model, la.config, la.tokenizer) is None
    assert peft_io.fingerprint_mismatch(fp, la.model, la.config, None) is None  # no tokenizer: not compared
    with torch.no_grad():  # the worst case of Q4_0 (each weight off by up to 1/16 of the row's absmax)
        bound = w.abs().amax(dim=1, keepdim=True) / 16  # (vocab, 1)
        w.add_((torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * bound)
    assert peft_io.base_fingerprint(la.model, la.config, la.tokenizer) != fp  # some argmax / argmin moved
    assert peft_io.fingerprint_mismatch(fp, la.model, la.config, la.tokenizer) is None


@pytest.mark.slow
def test_fingerprint_real_smollm2_gguf_and_fp32_hf_folder(smollm, tmp_path):
    """The same SmolLM2 as its Q4_1 GGUF (Q8_0 embedding) and an fp32 HF folder (tokenizer.json instead of
    GGUF metadata): one fingerprint; a 4-bit rounding of the embedding still matches; the same shapes with
    other embedding rows do not. (NF4 bases leave the embedding alone: the tiny test above.)"""
    from llmlab.formats.convert import write_loaded

    fp = peft_io.base_fingerprint(smollm.model, smollm.config, smollm.tokenizer)
    write_loaded(smollm.loaded, tmp_path / "hf")  # fp32
    h = load_model(tmp_path / "hf")
    assert peft_io.base_fingerprint(h.model, h.config, h.tokenizer) == fp
    w = h.model.embed_tokens.weight  # (49152, 576)
    with torch.no_grad():  # NF4, blocks of 64: every weight moves by up to ~14% of its block's absmax
        w.copy_(dequantize_nf4(quantize_nf4(w)))
    assert peft_io.fingerprint_mismatch(fp, h.model, h.config, h.tokenizer) is None
    with torch.no_grad():  # another model of the same shapes and tokenizer: its rows in another order
        w.copy_(torch.roll(w, 1, dims=0))
    assert peft_io.fingerprint_mismatch(fp, h.model, h.config, h.tokenizer) == "embedding weights differ"
    print(f"SmolLM2 fingerprint: {fp}")


# ---- merge -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qlora_base", [None, "nf4", "packed"])
def test_merge_hf_folder_same_logits_in_llmlab_and_transformers(tmp_path, qlora_base):
    from llmlab.formats.merge import merge

    transformers = need("transformers")
    base = _base(tmp_path / "base")
    run, _ = _run(tmp_path, base, method="qlora" if qlora_base else "lora", qlora_base=qlora_base)
    want = _logits(load_model(run).model)
    out = merge(run)
    assert out == run / "merged" and not [p for p in run.iterdir() if p.name.startswith(".")]
    merged = load_model(out)
    assert not any(type(m).__name__ in ("LoRALinear", "NF4Linear", "PackedLinear") for m in merged.model.modules())
    d = (_logits(merged.model) - want).abs().max().item()
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        d_tf = (ref(input_ids=IDS).logits - want).abs().max().item()
    print(f"merge {qlora_base or 'lora'}: llmlab max|dlogits| {d:.2e}, transformers {d_tf:.2e}")
    assert d <= TOL and d_tf <= TOL
    with pytest.raises(LlmlabError, match="already exists"):
        merge(run)


def test_merge_gguf_loads_within_quantization_error(tmp_path):
    from llmlab.formats.merge import merge

    base = _base(tmp_path / "base")
    run, _ = _run(tmp_path, base)
    want = _logits(load_model(run).model)
    scale = want.abs().max().item()
    d = {q: (_logits(load_model(merge(run, tmp_path / f"m-{q}.gguf", qtype=q)).model) - want).abs().max().item()
         for q in ("F32", "Q8_0", "Q4_1")}
    packed = load_model(tmp_path / "m-Q4_1.gguf", packed=True).model  # the file's own Q4_1 blocks, C kernel
    d["Q4_1 packed"] = (_logits(packed) - want).abs().max().item()
    print(f"merge -> GGUF: max|dlogits| {d} (logits scale {scale:.2f})")
    assert d["F32"] <= TOL and d["Q8_0"] < 0.02 * scale and max(d["Q4_1"], d["Q4_1 packed"]) < 0.25 * scale


def test_q4_1_quantizer_matches_gguf_reference():
    """The Q4_1 writer merge uses (nn/ggml_quants.quantize_q4_1) against gguf-py's reference, byte for byte."""
    gq = need("gguf.quants")
    from gguf import GGMLQuantizationType

    from llmlab.nn.ggml_quants import quantize_q4_1

    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    x[0, :32] = 0.25  # a constant block: d = 0
    ref = gq.quantize(x.numpy(), GGMLQuantizationType.Q4_1).reshape(-1)
    assert quantize_q4_1(x).numpy().tobytes() == ref.tobytes()


def test_peft_loads_our_fingerprinted_adapter_and_llmlab_loads_a_peft_folder(tmp_path):
    """Both directions through adapter *folders*: the safetensors metadata we add does not bother peft, and
    a folder peft wrote (no fingerprint) loads by path with llmlab.load (shape checks only)."""
    transformers, peft = need("transformers"), need("peft")
    base = _base(tmp_path / "base")
    run, _ = _run(tmp_path, base)
    want = _logits(load_model(run / "adapter").model)
    ref = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.PeftModel.from_pretrained(ref, run / "adapter").eval()
    with torch.no_grad():
        d = (pm(input_ids=IDS).logits - want).abs().max().item()
    assert d <= TOL
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    pm2 = peft.get_peft_model(fresh, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm2.save_pretrained(tmp_path / "from_peft")
    conf_path = tmp_path / "from_peft" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = str(base)
    conf_path.write_text(json.dumps(conf))
    assert peft_io.read_fingerprint(tmp_path / "from_peft" / "adapter_model.safetensors") is None
    with torch.no_grad():
        d2 = (pm2.eval()(input_ids=IDS).logits - _logits(load_model(tmp_path / "from_peft").model)).abs().max()
    print(f"folders: ours in peft {d:.2e}, peft's in llmlab {d2.item():.2e}")
    assert d2.item() <= TOL


# ---- bad input: one line, exit 2, through the CLI --------------------------------------------------------


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _bad_adapter(tmp_path, make):
    base = _base(tmp_path / "base")
    run, _ = _run(tmp_path, base)
    make(tmp_path, run)
    return run


def _other_shape(tmp_path, run):
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(_base(tmp_path / "wide", dim=32))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(conf))


def _other_weights(tmp_path, run):
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(_base(tmp_path / "twin", seed=9))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(conf))


def _other_shape_no_fingerprint(tmp_path, run):  # as peft writes it: only the shape checks catch it
    from llmlab.formats import safetensors as st

    _other_shape(tmp_path, run)
    f = run / "adapter" / "adapter_model.safetensors"
    st.save({k: v.clone() for k, v in st.load(f).items()}, f)


def _truncated(tmp_path, run):
    f = run / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _missing_base(tmp_path, run):
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "nowhere/base"
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("make,needle", [
    (_other_shape, "another base model (model shapes differ)"), (_other_shape_no_fingerprint, "has shape"),
    (_other_weights, "another base model (embedding weights differ)"),
    (_truncated, "truncated"), (_missing_base, "'nowhere/base' not found"),
])
def test_bad_adapter_generate_one_line_exit_2(tmp_path, capsys, make, needle):
    run = _bad_adapter(tmp_path, make)
    rc, err = _cli(capsys, "generate", "hi", "--raw", "--max-new-tokens", "2", "--model", str(run / "adapter"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("llmlab: error:") and needle in err[0], err
    rc, err = _cli(capsys, "merge", str(run / "adapter"))
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run" / "adapter-merged").exists()


def test_run_without_adapter_or_model_and_prompt_tuning_merge(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sft_config.json").write_text(json.dumps({"model": "llama-tiny", "method": "lora"}))
    rc, err = _cli(capsys, "generate", "hi", "--model", str(run))
    assert rc == 2 and len(err) == 1 and "neither adapter/adapter_config.json nor model/config.json" in err[0]
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": "llama-tiny", "num_virtual_tokens": 4}))
    rc, err = _cli(capsys, "merge", str(prompt))
    assert rc == 2 and len(err) == 1 and "cannot be merged" in err[0], err


def test_real_cli_merge_then_generate(tmp_path):
    """The installed command end to end: merge a run, generate from the run; the merged folder agrees."""
    from llmlab.api import load

    base = _base(tmp_path / "base")
    run, _ = _run(tmp_path, base)

    def llmlab(*argv):
        return subprocess.run([sys.executable, "-m", "llmlab", *argv], capture_output=True, text=True, timeout=120)

    proc = llmlab("merge", str(run), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0 and (tmp_path / "m" / "config.json").exists(), proc.stderr
    proc = llmlab("generate", "hello", "--raw", "--max-new-tokens", "6", "--ignore-eos", "--no-packed", "--model",
                  str(run))
    assert proc.returncode == 0, proc.stderr
    merged = load(tmp_path / "m").generate("hello", 6, ignore_eos=True)
    assert proc.stdout == merged + "\n"  # greedy: the merged model says what the adapter model says
