"""BERT task heads with the parameter-efficient methods that do not merge: Houlsby adapters, prompt tuning, prefix
tuning (``llmlab head --method adapter|prompt|prefix``). Parity: prompt and prefix tuning against Hugging Face
peft's ``get_peft_model(BertFor*, PromptTuningConfig / PrefixTuningConfig)`` with the same weights and virtual
tokens, for classification, token classification and QA; adapters against transformers' BERT with the paper's
adapter formula (``bottleneck_reference``) hooked onto ``attention.output.dense`` and ``output.dense``. Then the
saved folder round trip, bad input, and the README's Python examples as written (tiny random models)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import need
from llmlab.common import LlmlabError
from llmlab.formats.bert_heads import PEFT_CONFIG, load_head, save_head
from llmlab.formats.load import embedded_path
from llmlab.nn.bottleneck import bottleneck_modules, bottleneck_reference
from llmlab.train.heads import HeadConfig, apply_method_

README = Path(__file__).resolve().parents[1] / "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
HF_CLASSES = {"classify": "BertForSequenceClassification", "ner": "BertForTokenClassification",
              "qa": "BertForQuestionAnswering"}
TASK_TYPES = {"classify": "SEQ_CLS", "ner": "TOKEN_CLS", "qa": "QUESTION_ANS"}
LABELS = {"classify": ["neg", "neu", "pos"], "ner": ["O", "B-PER", "I-PER"], "qa": []}
P = 3


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Per task a tiny random transformers BertFor* (dim 32, 2 layers, 4 heads, 160 positions) saved with MiniLM's
    tokenizer."""
    transformers = need("transformers")
    src = embedded_path("all-minilm-l6-v2")
    out = {}
    for task, labels in LABELS.items():
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {x: i for i, x in enumerate(labels)}} if labels else {}
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=160, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **extra)
        torch.manual_seed(0)
        ref = getattr(transformers, HF_CLASSES[task])(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.02 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(task) / "hf"
        ref.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            shutil.copy2(src / name, folder / name)
        out[task] = (folder, ref)
    return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1  # a second segment, so a dropped or shifted token type shows
    return ids, mask, types


def _stack(out, task):
    return out.logits if task != "qa" else torch.stack([out.start_logits, out.end_logits], -1)


def _peft_logits(peft_model, task, ids, mask, types):
    """peft's forward; for prefix tuning on transformers >= 5 (whose BERT names the argument ``cache``, so peft
    0.21 refuses: "does not support past key values") the same steps as peft's ``_prefix_tuning_forward``
    fallback: the backbone with peft's ``get_prompt`` as its cache and the extended mask, then the head."""
    try:
        return _stack(peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types), task)
    except ValueError as e:
        if "past key values" not in str(e):
            raise
    base = peft_model.base_model
    full_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
    out = base.bert(input_ids=ids, attention_mask=full_mask, token_type_ids=types,
                    cache=peft_model.get_prompt(ids.shape[0]))
    if task == "classify":
        return base.classifier(out.pooler_output)
    if task == "ner":
        return base.classifier(out.last_hidden_state)
    return base.qa_outputs(out.last_hidden_state)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("task", ["classify", "ner", "qa"])
def test_virtual_tokens_equal_peft(task, method, hf_folders):
    """The same BertFor* weights and the same virtual-token tensor: our logits equal peft's (token-level heads:
    peft's logits of the T real positions; prompt tuning's P virtual rows are dropped)."""
    peft = need("peft")
    folder, ref = hf_folders[task]
    config_cls = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, config_cls(task_type=TASK_TYPES[task], num_virtual_tokens=P)).eval()
    _, ours, _ = load_head(str(folder), task)
    apply_method_(ours, HeadConfig(task=task, method=method, num_virtual_tokens=P))
    with torch.no_grad():
        ours.virtual.embedding.copy_(pm.prompt_encoder["default"].embedding.weight)
    ids, mask, types = _inputs()
    if task == "qa":  # peft's QA forward takes token_type_ids as a named argument and never passes it on (peft
        types = torch.zeros_like(ids)  # 0.21): the base sees type 0 everywhere; compare where that is what we do
    with torch.no_grad():
        want = _peft_logits(pm, task, ids, mask, types)
        got = ours.eval()(ids, mask, types)
    if task != "classify":
        want = want[:, want.shape[1] - ids.shape[1]:]  # prompt tuning: peft returns P + T rows
        real = mask.bool()
        got, want = got[real], want[real]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["classify", "ner", "qa"])
def test_adapter_equals_the_paper_formula_on_transformers_bert(task, hf_folders):
    """Houlsby adapters: transformers' BERT with h + W_up gelu(W_down h + b_down) + b_up applied to the outputs of
    ``attention.output.dense`` and ``output.dense`` (forward hooks: before the residual add and LayerNorm, the
    paper's Figure 2) equals our adapted model with the same (non-zero) adapter weights."""
    folder, ref = hf_folders[task]
    _, ours, _ = load_head(str(folder), task)
    n = apply_method_(ours, HeadConfig(task=task, method="adapter", adapter_dim=4))
    adapters = bottleneck_modules(ours)
    assert len(adapters) == 4  # 2 layers x (attention output, feed-forward output)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in adapters.values():
            for p in (*m.adapter_down.parameters(), *m.adapter_up.parameters()):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    norms = sum(p.numel() for name, p in ours.named_parameters() if "norm" in name)
    head = sum(p.numel() for p in ours.head.parameters())
    assert n == sum(p.numel() for m in adapters.values() for p in m.parameters() if p.requires_grad) + norms + head

    def hook(path):
        m = adapters[path]
        return lambda module, args, out: bottleneck_reference(
            out, m.adapter_down.weight, m.adapter_down.bias, m.adapter_up.weight, m.adapter_up.bias)

    handles = []
    for i, layer in enumerate(ref.bert.encoder.layer):
        handles.append(layer.attention.output.dense.register_forward_hook(hook(f"bert.layers.{i}.self_attn.o_proj")))
        handles.append(layer.output.dense.register_forward_hook(hook(f"bert.layers.{i}.mlp.down_proj")))
    ids, mask, types = _inputs()
    try:
        with torch.no_grad():
            want = _stack(ref(input_ids=ids, attention_mask=mask, token_type_ids=types), task)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = ours.eval()(ids, mask, types)
        plain = _stack(ref(input_ids=ids, attention_mask=mask, token_type_ids=types), task)
    real = mask.bool() if task != "classify" else slice(None)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert (got[real] - plain[real]).abs().max() > 1e-3  # the adapters change the output


@pytest.mark.parametrize("method", ["adapter", "prompt", "prefix"])
def test_saved_folder_round_trip(method, hf_folders, tmp_path):
    """Trainable counts; save_head writes the task folder + llmlab_peft.*, load_head applies them: equal logits;
    a folder with them refuses another method. (The CLI runs of each method are the README commands' test in
    tests/test_bert_tasks.py.)"""
    folder, _ = hf_folders["ner"]
    loaded, ours, labels = load_head(str(folder), "ner")
    n = apply_method_(ours, HeadConfig(task="ner", method=method, num_virtual_tokens=P, adapter_dim=4))
    assert n == {"adapter": 4 * (4 * 32 + 4 + 32 * 4 + 32) + 5 * 2 * 32 + 3 * 33,  # adapters, 5 LayerNorms, head
                 "prompt": P * 32 + 3 * 33, "prefix": P * 2 * 2 * 32 + 3 * 33}[method]
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_head(tmp_path / "m", ours, loaded, labels)
    assert json.loads((tmp_path / "m" / PEFT_CONFIG).read_text())["method"] == method
    _, back, back_labels = load_head(str(tmp_path / "m"), "ner")
    ids, mask, types = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids, mask, types), ours.eval()(ids, mask, types))
    assert back_labels == labels
    with pytest.raises(LlmlabError, match="already carries"):
        apply_method_(back, HeadConfig(task="ner", method="prompt"))


def test_bad_peft_file_is_one_line(hf_folders, tmp_path):
    folder, _ = hf_folders["ner"]
    loaded, ours, labels = load_head(str(folder), "ner")
    apply_method_(ours, HeadConfig(task="ner", method="prompt", num_virtual_tokens=P))
    save_head(tmp_path / "m", ours, loaded, labels)
    (tmp_path / "m" / PEFT_CONFIG).write_text('{"method": "prompt", "num_virtual_tokens": 5}')
    with pytest.raises(LlmlabError, match=r"virtual.embedding has shape \(3, 32\), the model needs \(5, 32\)"):
        load_head(str(tmp_path / "m"), "ner")
    (tmp_path / "m" / PEFT_CONFIG).write_text('{"method": "ia3"}')
    with pytest.raises(LlmlabError, match="method 'ia3' is unknown"):
        load_head(str(tmp_path / "m"), "ner")


NAMES = ("Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo")


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    """Ten sentences with the tiny NER folder's labels (O, B-PER, I-PER)."""
    path = tmp_path_factory.mktemp("data") / "ner.jsonl"
    path.write_text("".join(json.dumps({"tokens": [name, "Lovelace", "left", "early"],
                                        "tags": ["B-PER", "I-PER", "O", "O"]}) + "\n" for name in NAMES))
    return str(path)


def test_bad_flag_is_one_line_exit_2_in_a_subprocess(hf_folders, tmp_path):
    folder, _ = hf_folders["ner"]
    proc = subprocess.run([sys.executable, "-m", "llmlab", "head", "--task", "ner", "--model", str(folder),
                           "--out", str(tmp_path / "r"), "--method", "prompt", "--num-virtual-tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    want = "llmlab: error: --num-virtual-tokens 0: give 1 or more (the prompt / prefix length; default 20)"
    assert proc.stderr.strip() == want


@pytest.mark.parametrize("flags, message", [
    (["--method", "prompt", "--max-tokens", "150", "--num-virtual-tokens", "16"],
     "--max-tokens 150 + --num-virtual-tokens 16 positions is more than the model's 160: lower one of them"),
    (["--method", "prefix", "--max-tokens", "160", "--num-virtual-tokens", "1"],
     "--max-tokens 160 + --num-virtual-tokens 1 positions is more than the model's 160"),
    (["--method", "adapter", "--adapter-dim", "0"], "--adapter-dim"),
])
def test_bad_flags(flags, message, hf_folders, ner_data, tmp_path, capsys):
    from llmlab.cli import main

    folder, _ = hf_folders["ner"]
    assert main(["head", "--task", "ner", "--data", ner_data, "--model", str(folder), "--out", str(tmp_path / "r"),
                 "--threads", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # refused before anything is written


# ---- the README's Python examples ----------------------------------------------------------------------------------


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text[text.index(section):]
    body = body[:body.index("\n## ", 4)]
    pieces = body.split("```")[1::2]
    return [code for lang, _, code in (p.partition("\n") for p in pieces) if lang.strip() == "python"]


def test_readme_bert_head_python_example_as_written(tmp_path, monkeypatch, capsys, hf_folders, ner_data):
    """The "## BERT task heads" Python block, run as written with two substitutions: the tiny random NER folder and
    ten sentences with its labels for the embedded encoder and the built-in task, and a budget of two steps."""
    (code,) = _python_blocks("## BERT task heads")
    assert "run_head(" in code and "load_head(" in code
    monkeypatch.chdir(tmp_path)
    folder, _ = hf_folders["ner"]
    code = code.replace('HeadConfig(task="ner"', f'HeadConfig(task="ner", model={str(folder)!r}, data={ner_data!r}')
    code = code.replace("HeadTrainConfig(steps=60", "HeadTrainConfig(steps=2, batch_size=4, progress=False")
    assert "steps=2" in code and "data=" in code
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"\('Ada', '(O|B-PER|I-PER)'\)", out), out
    assert (tmp_path / "runs/head-ner-py/model/llmlab_peft.safetensors").is_file()


def test_readme_t5_python_example_as_written(tmp_path, monkeypatch, capsys):
    """The "## T5 (encoder-decoder)" Python block, as written, on a tiny random T5 folder at runs/t5-full (a BPE
    tokenizer learned from a few lines)."""
    from llmlab.formats import hf
    from llmlab.models.t5 import T5Model
    from llmlab.tokenizer.bpe_train import train_bpe
    from llmlab.train.t5 import T5Flags

    (code,) = _python_blocks("## T5 (encoder-decoder)")
    folder = tmp_path / "runs" / "t5-full"
    folder.mkdir(parents=True)
    tok = train_bpe(['How many times does the letter "r" appear in "rbtrea"?'] * 4, 280,
                    special_tokens=["<|endoftext|>", "<|pad|>"])
    (folder / "tokenizer.json").write_text(tok.to_hf_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>", "eos_token": None}))
    cfg = T5Flags(dim=16, head_dim=8, n_heads=2, ffn_dim=32, n_sentinels=2).to_config(
        tok.vocab_size, tok.special_tokens["<|pad|>"], tok.special_tokens["<|endoftext|>"], 64)
    torch.manual_seed(0)
    hf.write_folder(folder, cfg, T5Model(cfg).state_dict())
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.fullmatch(r"\['.*'\]\n", out, re.S), out
