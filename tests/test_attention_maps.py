"""Attention maps (eval/attention_maps.py): equal to transformers' output_attentions (eager attention) on the
same weights for a GQA Llama, a GPT-2 and a padded BERT; the same maps whichever attention path the model runs;
the model's own outputs untouched; `llmlab attention` and its bad input."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.eval.attention_maps import attention_maps, check_layers, plot_attention
from llmlab.formats.load import load_model
from tests.conftest import need
from tests.test_models import _hf_model, _randomize_


def _pair(kind: str, tmp_path):
    transformers = need("transformers")
    ref = _hf_model(kind, transformers).eval()
    _randomize_(ref)
    ref.save_pretrained(tmp_path / kind)
    ref = type(ref).from_pretrained(tmp_path / kind, attn_implementation="eager").eval()
    return ref, load_model(tmp_path / kind).model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_maps_equal_transformers_output_attentions(kind, tmp_path):
    ref, ours = _pair(kind, tmp_path)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    maps = attention_maps(ours, ids)
    assert sorted(maps) == list(range(len(expected)))
    for i, exp in enumerate(expected):
        assert maps[i].shape == exp.shape
        assert (maps[i] - exp).abs().max() < 1e-5, i


def test_encoder_maps_with_padding_equal_transformers(tmp_path):
    ref, ours = _pair("bert", tmp_path)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    maps = attention_maps(ours, ids, attention_mask=mask)
    for i, exp in enumerate(expected):
        real = mask.bool()  # rows of real queries; a padded query's row is not defined the same way
        assert (maps[i].transpose(1, 2)[real] - exp.transpose(1, 2)[real]).abs().max() < 1e-5
        assert maps[i][1, :, :7, 7:].abs().max() == 0  # no weight on padding keys


def test_maps_are_the_same_on_every_attention_path_and_leave_the_output_alone(tmp_path):
    _, ours = _pair("llama", tmp_path)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ours(ids)
    got = {}
    for impl in ("reference", "flash", "sdpa"):
        ours.set_attn_impl(impl)
        got[impl] = attention_maps(ours, ids, layers=[-1])
        with torch.no_grad():
            assert torch.allclose(ours(ids), plain, atol=1e-5)
    assert list(got["sdpa"]) == [1]
    for impl in ("reference", "flash"):
        assert (got[impl][1] - got["sdpa"][1]).abs().max() < 1e-6
    m = got["sdpa"][1][0]  # (H, T, T)
    assert torch.allclose(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5)
    assert m.triu(1).abs().max() == 0  # causal: nothing from the future
    assert not any(mod._forward_pre_hooks for mod in ours.modules())  # the hooks are removed


def test_layer_and_head_checks(tmp_path):
    assert check_layers(None, 3) == [0, 1, 2]
    assert check_layers([-1, 0, 2], 3) == [0, 2]
    with pytest.raises(LlmlabError, match="layer 3 is out of range: the model has 3 layers"):
        check_layers([3], 3)
    maps = {0: torch.full((1, 2, 3, 3), 1 / 3)}
    with pytest.raises(LlmlabError, match="head 2 is out of range"):
        plot_attention(maps, ["a", "b", "c"], tmp_path / "x.png", heads=[2])
    assert not (tmp_path / "x.png").exists()
    plot_attention(maps, ["a", "b", "c"], tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmlab", "attention", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_readme_command_and_bad_input(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.startswith("llmlab attention "))
    args = shlex.split(command.split(" #")[0])[2:]  # as written: the embedded SmolLM2, the default layers
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [(str(layer), str(h)) for layer in (0, 15, 29) for h in range(9)]
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"
    for args, message in [(("",), "the text is empty"),
                          (("x", "--layers", "30"), "layer 30 is out of range: the model has 30 layers"),
                          (("x", "--layers", "a,b"), "--layers takes comma-separated integers"),
                          (("one two three four", "--max-tokens", "2"), "the text is 4 tokens and --max-tokens is 2")]:
        r = run_cli(*args, "--out", str(tmp_path / "bad.png"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
