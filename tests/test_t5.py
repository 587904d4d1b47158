"""T5 (models/t5.py): logits and generated tokens equal to transformers' T5ForConditionalGeneration with the same
tiny random weights, both ways through Hugging Face folders; the relative position buckets against the paper's
definition; the encoder-side cache; bad folders; prefix tuning; span corruption; the ``llmlab t5`` commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.formats import hf, safetensors
from llmlab.formats.load import load_model
from llmlab.infer.beam import beam_search
from llmlab.infer.generate import generate
from llmlab.infer.sample import SamplingParams
from llmlab.models import build_model, get_preset
from llmlab.models.t5 import Seq2SeqDecoder, add_prefix_, relative_position_bucket
from tests.conftest import need


def hf_t5(transformers, ffn: str, tied: bool, dec_layers: int = 2, seed: int = 0):
    """A tiny random transformers T5 with weights moved off their init (norms at 1, tiny head) so that
    parity means something and greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    hcfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_decoder_layers=dec_layers, num_heads=4, feed_forward_proj=ffn,
                                 tie_word_embeddings=tied, dropout_rate=0.0, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, decoder_start_token_id=0)
    ref = transformers.T5ForConditionalGeneration(hcfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if not tied:
            ref.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32) * 0.5)  # an untied v1.1 head
    return ref


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 96, (2, 30), generator=g)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0  # a padded row
    return ids, mask, torch.randint(2, 96, (2, 25), generator=g)


@pytest.mark.parametrize("ffn,tied,dec_layers", [("relu", True, 3), ("gated-gelu", False, 2)])
def test_logits_equal_transformers_both_ways(tmp_path, ffn, tied, dec_layers):
    transformers = need("transformers")
    ref = hf_t5(transformers, ffn, tied, dec_layers)
    ref.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")  # transformers -> ours
    assert (loaded.config.arch, loaded.config.ffn_act, loaded.config.tie_embeddings) == ("t5", ffn, tied)
    assert loaded.config.n_decoder_layers == dec_layers
    ids, mask, dec = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = loaded.model(ids, dec, mask)
    assert (got - want).abs().max() <= 1e-4
    loaded.model.set_attn_impl("reference")  # the textbook path gives the same numbers (to float rounding)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids, dec, mask), got, rtol=1e-4, atol=1e-3)
    hf.write_folder(tmp_path / "ours", loaded.config, loaded.model.state_dict())  # ours -> transformers
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - want).abs().max() <= 1e-4
    assert sum(p.numel() for p in loaded.model.parameters()) == loaded.config.num_params()


@pytest.mark.parametrize("ffn,tied", [("relu", True), ("gated-gelu", False)])
def test_generate_equals_transformers_greedy_and_beam(tmp_path, ffn, tied):
    transformers = need("transformers")
    ref = hf_t5(transformers, ffn, tied, seed=2)  # a seed whose tied model does not fall into one token at once
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path).model
    ids, seen = batch()[0], set()
    for row in range(2):
        x = ids[row:row + 1, : 20 + 5 * row]
        dec = Seq2SeqDecoder(model, x, max_target_len=12)
        greedy = ref.generate(x, max_new_tokens=12, do_sample=False, num_beams=1)[0, 1:].tolist()
        assert generate(dec, [[0]], 12, stop_ids={1})[0].ids == greedy
        beam = ref.generate(x, max_new_tokens=12, do_sample=False, num_beams=3)[0, 1:].tolist()
        ours = beam_search(dec, [0], 12, 3, eos_ids={1})[0].ids
        assert ours == [t for t in beam if t != 0]  # transformers pads finished beams with 0
        seen.update(greedy)
    assert len(seen) > 4  # real sequences, not one token repeated


def test_relative_buckets_match_the_definition():
    # Raffel et al. 2020, 2.1: exact buckets for small offsets, logarithmic up to max_distance, then one bucket.
    rel = torch.arange(-200, 201)
    bi = relative_position_bucket(rel, True, 32, 128)
    assert bi[200].item() == 0 and bi[201].item() == 16 + 1 and bi[199].item() == 1  # key after: upper half
    assert torch.equal(bi[200 - 7:201].flip(0), torch.arange(8))  # offsets 0..7 exact (max_exact = 16 // 2)
    assert bi[:200 - 128 + 1].unique().tolist() == [15] and bi[200 + 128:].unique().tolist() == [31]
    assert (bi[:201].flip(0).diff() >= 0).all()  # monotone in distance
    causal = relative_position_bucket(rel, False, 32, 128)
    assert causal[200:].unique().tolist() == [0]  # the future shares bucket 0 (masked anyway)
    assert torch.equal(causal[200 - 15:201].flip(0), torch.arange(16)) and causal[0].item() == 31


def test_cached_decoding_equals_full_forward():
    cfg = get_preset("t5-tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids, mask, dec = batch()
    with torch.no_grad():
        full = model(ids % cfg.vocab_size, dec, mask)
        enc = model.encoder_kv(model.encode(ids, mask), mask)  # the encoder-side cache, computed once
        cache = model.new_cache(2, 25)
        steps = [model.decode(dec[:, :5], enc, cache=cache)] + [model.decode(dec[:, t:t + 1], enc, cache=cache)
                                                               for t in range(5, 25)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_sampling_reuses_the_decoding_module():
    torch.manual_seed(0)
    model = build_model(get_preset("t5-tiny")).eval()
    x = torch.randint(2, 512, (2, 9))
    dec = Seq2SeqDecoder(model, x, max_target_len=8)
    a = generate(dec, [[0], [0]], 8, SamplingParams(temperature=1.0, seed=3))
    b = generate(dec, [[0], [0]], 8, SamplingParams(temperature=1.0, seed=3))
    assert [c.ids for c in a] == [c.ids for c in b] and all(len(c.ids) == 8 for c in a)
    assert a[0].ids != generate(dec, [[0], [0]], 8)[0].ids  # sampled, not greedy


def test_missing_relative_attention_table_is_one_line_error(tmp_path, capsys):
    transformers = need("transformers")
    hf_t5(transformers, "relu", True).save_pretrained(tmp_path)
    sd = safetensors.load(tmp_path / "model.safetensors")
    del sd["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    safetensors.save(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmlabError, match="relative-attention table") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)
    from llmlab.cli import main

    capsys.readouterr()  # drop transformers' progress bar
    assert main(["t5", "generate", "--model", str(tmp_path), "hello"]) == 2  # the CLI: one line, exit 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "relative-attention table" in err and "Traceback" not in err


def test_prefix_tuning_trains_only_the_prefix():
    torch.manual_seed(0)
    model = build_model(get_preset("t5-tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randint(2, 512, (2, 7)), torch.randint(2, 512, (2, 5))
    with torch.no_grad():
        plain = model(x, y)
    params = add_prefix_(model, 3, torch.Generator().manual_seed(0))
    assert len(params) == 2 * (2 + 2 * 2)  # k and v for 2 encoder + 2 decoder self + 2 cross attentions
    assert [p for p in model.parameters() if p.requires_grad] == params
    for p in params:
        torch.nn.init.zeros_(p)
    with torch.no_grad():  # a zero prefix still takes attention mass: outputs change
        assert not torch.allclose(model(x, y), plain)
    opt = torch.optim.AdamW(params, lr=0.1)
    target = torch.randint(2, 512, (2, 5))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x, y).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is frozen


def test_span_corruption_follows_the_paper():
    from llmlab.data.span_corruption import corrupt, corrupted_lengths, noise_mask, reconstruct

    g = torch.Generator().manual_seed(0)
    n, V, eos = 200, 1000, 1
    lengths = []
    for _ in range(300):
        mask = noise_mask(n, g)
        assert int(mask.sum()) == 30  # 15% noise
        starts = (mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).nonzero().flatten()
        ends = (mask & ~torch.cat([mask[1:], torch.tensor([False])])).nonzero().flatten()
        assert len(starts) == 10 and not mask[0]  # round(30 / 3) spans, kept text first
        lengths += (ends - starts + 1).tolist()
        tokens = torch.randint(2, V - 50, (n,), generator=g)
        inp, tgt = corrupt(tokens, mask, V, eos)
        assert (len(inp), len(tgt)) == corrupted_lengths(n) == (181, 41)
        sentinels = [t for t in inp.tolist() if t >= V - 50]
        assert sentinels == list(range(V - 1, V - 11, -1))  # <extra_id_0> = vocab-1, then down, in order
        assert [t for t in tgt.tolist() if t >= V - 50] == sentinels and tgt[0] == V - 1
        assert inp[-1] == eos and tgt[-1] == eos
        assert reconstruct(inp, tgt, V - 50) == tokens.tolist()
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert lengths.mean() == 3.0  # mean span length exactly 3 (30 tokens in 10 spans)
    # Span lengths are a uniform composition of 30 into 10 parts: P(length 1) = C(28, 8) / C(29, 9) = 9/29.
    assert abs(float((lengths == 1).float().mean()) - 9 / 29) < 0.03
    assert lengths.max() > 8  # not fixed-length spans


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_t5_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## T5 (encoder-decoder)"):]
    section = section[:section.index("\n## ", 4)]
    return [line.strip() for block in section.split("```")[1::2] for line in block.splitlines()
            if line.strip().startswith("llmlab t5")]


def test_readme_commands_as_written(tmp_path, capsys):
    """The README's ``llmlab t5`` lines in order, each with a small budget appended (later flags win)."""
    from llmlab.cli import main
    from llmlab.data.corpus import stdlib_root
    from llmlab.data.shards import PrepareConfig, prepare

    files = [str(p) for p in sorted((stdlib_root() / "json").glob("*.py"))]
    prepare(PrepareConfig(inputs=files, out=str(tmp_path / "shards"), vocab_size=300, val_fraction=0.2),
            show_progress=False)
    commands = _readme_t5_commands()
    assert [c.split()[2] for c in commands] == ["pretrain", "finetune", "finetune", "generate"]
    small = ["--steps", "2", "--batch-size", "4", "--eval-every", "0", "--save-every", "2", "--warmup", "1",
             "--device", "cpu", "--no-progress"]
    runs = {"runs/t5-pretrain": tmp_path / "pre", "runs/t5-full": tmp_path / "full",
            "runs/t5-prefix": tmp_path / "prefix"}
    for command in commands:
        argv = [str(runs.get(a, a)) for a in shlex.split(command)[1:]]
        if argv[1] == "pretrain":
            argv += [*small, "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "pre"), "--dim", "32",
                     "--head-dim", "8", "--ffn-dim", "64", "--seq-len", "24"]
        elif argv[1] == "finetune":
            argv += [*small, "--train-examples", "8", "--eval-examples", "2"]
        else:
            argv += ["--max-new-tokens", "4"]
        assert main(argv) == 0, command
    out = capsys.readouterr().out
    assert re.search(r"letter_count: held-out exact match \d+\.\d% -> \d+\.\d% \(prefix, [\d,]+ trainable", out)
    s = json.loads((tmp_path / "prefix" / "summary.json").read_text())
    assert s["method"] == "prefix" and s["steps"] == 2 and s["trainable_parameters"] == 2 * 6 * 4 * 10 * 8
    ckpt = tmp_path / "prefix" / "checkpoints" / "step-00000002"
    assert (ckpt / "prefix.safetensors").exists()  # the base is saved as a model folder, the prefix beside it


def test_help_shows_defaults():
    from llmlab.cli import build_parser

    parser = build_parser({"t5"})
    sub = next(a for a in parser._actions if a.dest == "command").choices["t5"]
    commands = next(a for a in sub._actions if a.dest == "t5_command").choices
    for name in ("pretrain", "finetune", "generate"):
        body = commands[name].format_help().split("options:", 1)[1]
        entries = [e for e in re.split(r"\n  (?=-)", "\n" + body)[1:] if not e.startswith("-h")]
        assert entries and all("default" in " ".join(e.split()) for e in entries), name
