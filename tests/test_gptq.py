"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): ``llmlab.compress.gptq`` against a plain transcription of the
paper's reference code (IST-DASLab/gptq ``quant.py`` + ``gptq.py``), against AutoGPTQ's implementation when it
is installed, against round-to-nearest on correlated inputs, and on a whole tiny Llama.

Bit-identity: the reference runs in float32, and so does ``gptq_quantize_weight``, with the same operations in
the same order (the same Cholesky calls, the same rank-1 and lazy-block matrix products) and on one thread (the
``one_thread`` fixture), so the integer codes are identical, not merely close. float64 would not help: the codes
match because every rounding does, and a float64 solve flips the codes that sit near a grid midpoint. The
reference keeps float32 scales: ``scale_dtype=torch.float32`` reproduces it as it is; with float16 scales (what
``quantize_gptq_`` stores, so layers pack) the transcription gets the one extra step, rounding the scale to
float16 before the zero point and the codes are computed from it.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.compress.gptq import HessianAccumulator, gptq_quantize_weight, quantize_gptq_
from llmlab.compress.spec import QuantSpec, target_linears
from llmlab.models.registry import build_model, get_preset
from llmlab.nn.quant_linear import QuantLinear, expand_groups, minmax_grid, quantize_to_grid

# ---------------------------------------------------------------------------------------------------------------
# The reference, transcribed: IST-DASLab/gptq quant.py (Quantizer, weights, min-max grid) and gptq.py
# (GPTQ.add_batch, GPTQ.fasterquant), kept line for line; the only additions record the integer codes.


class RefQuantizer:
    def __init__(self, bits, perchannel, sym, scale_dtype=torch.float32):
        self.maxq = torch.tensor(2 ** bits - 1)
        self.perchannel, self.sym, self.scale_dtype = perchannel, sym, scale_dtype
        self.scale = torch.zeros(1)
        self.zero = torch.zeros(1)

    def find_params(self, x):
        shape = x.shape
        x = x.flatten(1) if self.perchannel else x.flatten().unsqueeze(0)
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        self.scale = self.scale.to(self.scale_dtype).float()  # not in the reference: float16 scales (docstring)
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        if not self.perchannel:
            self.scale = self.scale.repeat(shape[0])
            self.zero = self.zero.repeat(shape[0])
        self.scale = self.scale.reshape(-1, 1)
        self.zero = self.zero.reshape(-1, 1)

    def ready(self):
        return torch.all(self.scale != 0)


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q  # the reference returns only the first


def ref_add_batch(H, nsamples, inp):
    if len(inp.shape) == 2:
        inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    inp = inp.reshape((-1, inp.shape[-1])).t()
    H *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = math.sqrt(2 / nsamples) * inp.float()
    H += inp.matmul(inp.t())
    return H, nsamples


def ref_fasterquant(W, H, quantizer, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    """Returns (codes (N, K) in the original order, Q dequantized, summed Losses)."""
    W = W.clone().float()
    columns = W.shape[1]
    if not quantizer.ready():
        quantizer.find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            q1 = copy.deepcopy(quantizer)
            q1.find_params(W[:, i:(i + groupsize)])
            groups.append(q1)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    C = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q, code = ref_quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq)
            q = q.flatten()
            C[:, i1 + i] = code.flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
        C = C[:, invperm]
    return C, Q, torch.sum(Losses).item()


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """The reference transcription and the peer run on one thread, as ``gptq_quantize_weight`` always solves:
    MKL's ``cholesky_inverse`` gives different last bits on 1 and 2 threads (and so, some codes differ), and
    the column loops are faster on one thread anyway. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_layer(seed: int, n: int = 48, k: int = 192, tokens: int = 384, dead: bool = True):
    """W (n, k) with a few outlier weights and inputs X (tokens, k) that are low rank plus noise (correlated
    columns, as real activations), one input always 0 when ``dead``; H built as the reference's add_batch."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    W[torch.randint(0, n, (4,), generator=g), torch.randint(0, k, (4,), generator=g)] *= 8
    X = torch.randn(tokens, 12, generator=g) @ torch.randn(12, k, generator=g)
    X = X * torch.rand(k, generator=g) * 3 + 0.2 * torch.randn(tokens, k, generator=g)
    if dead:
        X[:, 5] = 0
    acc = HessianAccumulator(k, torch.device("cpu"))
    for chunk in X.reshape(4, -1, k):  # 4 "sequences"
        acc.add(chunk.unsqueeze(0))
    return W, X, acc.H


def ref_args(group_size: int):
    """Our group_size -> the reference's (groupsize, perchannel)."""
    return (-1, group_size == 0) if group_size <= 0 else (group_size, True)


CASES = [(bits, gs, act, sym) for bits in (2, 3, 4, 8) for gs in (0, 32, 64) for act in (False, True)
         for sym in (True, False)] + [(4, -1, False, True), (3, -1, True, False)]


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", CASES)
def test_identical_codes_to_the_reference(bits, group_size, act_order, symmetric):
    """Two lazy blocks (96 + 32 columns), a dead input, outliers; float32 scales as the reference."""
    W, _, H = correlated_layer(seed=bits * 100 + group_size + 7 * act_order + 3 * symmetric, n=32, k=128, tokens=256)
    groupsize, perchannel = ref_args(group_size)
    codes, scale, zero, stats = gptq_quantize_weight(W, H, bits, group_size, symmetric, act_order=act_order,
                                                     block_size=96, scale_dtype=torch.float32)
    ref_codes, ref_q, ref_error = ref_fasterquant(W, H.clone(), RefQuantizer(bits, perchannel, symmetric),
                                                  blocksize=96, groupsize=groupsize, actorder=act_order,
                                                  static_groups=act_order)
    assert torch.equal(codes, ref_codes)
    n, k = W.shape
    deq = (codes - expand_groups(zero, n, k)) * expand_groups(scale, n, k)
    assert torch.equal(deq, ref_q)
    assert stats["error"] == pytest.approx(ref_error, rel=1e-6)


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", [(4, 32, False, False), (4, 32, True, True),
                                                                 (8, 0, True, False), (3, 64, False, True)])
def test_identical_codes_with_float16_scales(bits, group_size, act_order, symmetric):
    W, _, H = correlated_layer(seed=11 + bits)
    groupsize, perchannel = ref_args(group_size)
    codes, scale, _, _ = gptq_quantize_weight(W, H, bits, group_size, symmetric, act_order=act_order)
    ref_codes, _, _ = ref_fasterquant(W, H.clone(), RefQuantizer(bits, perchannel, symmetric, torch.float16),
                                      groupsize=groupsize, actorder=act_order, static_groups=act_order)
    assert scale.dtype == torch.float16
    assert torch.equal(codes, ref_codes)


def test_small_blocks_and_groups_straddling_them():
    """block_size 48 with groups of 32: groups start mid-block, where the reference reads the block-start W."""
    W, _, H = correlated_layer(seed=3)
    codes, *_ = gptq_quantize_weight(W, H, 4, 32, False, block_size=48, scale_dtype=torch.float32)
    ref_codes, _, _ = ref_fasterquant(W, H.clone(), RefQuantizer(4, True, False), blocksize=48, groupsize=32)
    assert torch.equal(codes, ref_codes)


def test_hessian_matches_reference_add_batch():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 16, 24, generator=g) for b in (3, 1, 5)] + [torch.randn(7, 24, generator=g)]
    acc = HessianAccumulator(24, torch.device("cpu"))
    H, n = torch.zeros(24, 24), 0
    for x in batches:
        acc.add(x)
        H, n = ref_add_batch(H, n, x)
    assert acc.n == n == 10
    assert torch.equal(acc.H, H)


def _auto_gptq_quantization():
    """AutoGPTQ's GPTQ class, loaded without the package's __init__ (which imports its Hugging Face model wrappers
    and needs an older transformers): auto_gptq/quantization imports only torch and transformers."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        pytest.skip("peer 'auto_gptq' is not installed (optional: pip install auto-gptq --no-deps; gptqmodel "
                    "needs torch>=2.14.1 and is not compared)")
    folder = Path(spec.submodule_search_locations[0]) / "quantization"
    name = "_auto_gptq_quantization"
    if name not in sys.modules:
        sub = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                     submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(sub)
        sys.modules[name] = module
        sub.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", [(4, 32, False, False), (4, 32, True, False),
                                                                 (3, 0, True, True), (8, 64, False, True),
                                                                 (2, 64, True, True)])
def test_identical_codes_to_auto_gptq(bits, group_size, act_order, symmetric, monkeypatch):
    agq = _auto_gptq_quantization()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # its fasterquant syncs a GPU unconditionally
    W, X, H = correlated_layer(seed=5 + bits)
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    peer = agq.GPTQ(layer)
    for chunk in X.reshape(4, -1, W.shape[1]):
        peer.add_batch(chunk.unsqueeze(0), None)
    assert torch.equal(peer.H, H)  # its Hessian is ours, bit for bit
    peer.quantizer.configure(bits, perchannel=True, sym=symmetric)
    scale, zero, g_idx = peer.fasterquant(group_size=group_size if group_size else -1, actorder=act_order,
                                          static_groups=act_order)
    n, k = W.shape
    peer_codes = torch.round(layer.weight.data / scale[:, g_idx.long()] + zero[:, g_idx.long()])  # (N, K)
    codes, ours_scale, _, _ = gptq_quantize_weight(W, H, bits, group_size, symmetric, act_order=act_order,
                                                   scale_dtype=torch.float32)
    assert torch.equal(ours_scale, scale)
    assert torch.equal(codes, peer_codes)


# ---------------------------------------------------------------------------------------------------------------


def _rtn(W, bits, group_size, symmetric):
    n, k = W.shape
    g = group_size if group_size > 0 else k
    scale, zero = minmax_grid(W.reshape(n, k // g, g), bits, symmetric, torch.float16)  # (N, G)
    codes = quantize_to_grid(W.reshape(n, k // g, g), scale, zero, bits).reshape(n, k)
    return codes, scale, zero


@pytest.mark.parametrize("group_size,act_order", [(0, False), (32, True)])
def test_output_error_below_round_to_nearest_on_the_same_grid(group_size, act_order):
    """Per channel and static groups: GPTQ's grid is RTN's (found on the original W), so only the codes differ."""
    W, X, H = correlated_layer(seed=21, dead=False)
    n, k = W.shape
    rtn_codes, rtn_scale, rtn_zero = _rtn(W, 4, group_size, False)
    codes, scale, zero, _ = gptq_quantize_weight(W, H, 4, group_size, False, act_order=act_order)
    assert torch.equal(scale, rtn_scale.half()) and torch.equal(zero, rtn_zero)

    def out_error(c):
        deq = (c - expand_groups(zero, n, k)) * expand_groups(scale.float(), n, k)
        return ((X @ (W - deq).t()) ** 2).sum().item()  # ||WX - QX||^2

    assert out_error(codes) < 0.6 * out_error(rtn_codes)
    assert not torch.equal(codes, rtn_codes)  # negative control: the parity above is not RTN in disguise


# ---------------------------------------------------------------------------------------------------------------


def tiny_llama(ffn_dim: int = 192, **cfg):
    """llama-tiny with a feed-forward width that 32 divides (the preset's 172 does not), random weights."""
    c = get_preset("llama-tiny")
    c.ffn_dim = ffn_dim
    for key, value in cfg.items():
        setattr(c, key, value)
    torch.manual_seed(0)
    return build_model(c).eval()


@pytest.mark.parametrize("symmetric,act_order,packed", [(False, False, "Q4_1"), (True, True, "Q4_0")])
def test_llama_tiny_quantized_end_to_end(symmetric, act_order, packed):
    model = tiny_llama()
    names = [n for n, _ in target_linears(model)]
    windows = torch.randint(0, 512, (16, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(windows)
    rtn = copy.deepcopy(model)
    for name, layer in target_linears(rtn):
        codes, scale, zero = _rtn(layer.weight.detach(), 4, 32, symmetric)
        parent, _, leaf = name.rpartition(".")
        setattr(rtn.get_submodule(parent), leaf, QuantLinear.from_codes(codes, scale.half(), zero, 4, 32, symmetric))
    spec = QuantSpec("gptq", bits=4, group_size=32, symmetric=symmetric, options={"act_order": act_order})
    stats = quantize_gptq_(model, spec, windows, progress=False)

    assert spec.modules == names and sorted(stats) == sorted(names)
    assert spec.options == {"damp": 0.01, "act_order": act_order, "block_size": 128, "static_groups": act_order}
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.packed_type() == packed
        assert layer.packed_blocks() is not None
    assert stats["layers.0.self_attn.k_proj"]["stage"] == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert stats["layers.1.mlp.up_proj"]["stage"] == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    assert all(s["samples"] == 16 and s["error"] >= 0 and s["damp"] == 0.01 for s in stats.values())
    with torch.no_grad():
        out, out_rtn = model(windows), rtn(windows)
    err, err_rtn = ((out - ref) ** 2).mean().item(), ((out_rtn - ref) ** 2).mean().item()
    assert err < 0.02 * (ref ** 2).mean().item()  # the logits stay close
    assert err < err_rtn  # and closer than round-to-nearest on the calibration windows


def test_mixture_of_experts_and_gpt2_blocks():
    """Stages come from the forward pass, not from names: MoE experts and GPT-2 blocks quantize too."""
    for model in (tiny_llama(n_experts=4, experts_per_token=2), build_model(get_preset("gpt2-tiny")).eval()):
        windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
        spec = QuantSpec("gptq", bits=8, group_size=0)
        quantize_gptq_(model, spec, windows, progress=False)
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in spec.modules)
        with torch.no_grad():
            assert torch.isfinite(model(windows)).all()


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,windows,message", [
    (QuantSpec("gptq", bits=5), (2, 16), "does not support --bits 5: choose one of 2, 3, 4, 8"),
    (QuantSpec("gptq", bits=4, group_size=32), (2, 16), "--group-size 32 does not divide layers.0.mlp.down_proj"),
    (QuantSpec("gptq", bits=4), (0, 16), "GPTQ needs calibration windows"),
    (QuantSpec("gptq", bits=4, options={"dmap": 0.1}), (2, 16), "unknown GPTQ option(s) dmap"),
    (QuantSpec("gptq", bits=4, group_size=4, options={"act_order": True, "static_groups": False}), (2, 16),
     "use static_groups=True"),
    (QuantSpec("gptq", bits=4, options={"damp": 1.5}), (2, 16), "GPTQ damp 1.5"),
])
def test_bad_input(spec, windows, message):
    model = build_model(get_preset("llama-tiny"))  # ffn_dim 172: 32 does not divide down_proj's width
    with pytest.raises(LlmlabError) as e:
        quantize_gptq_(model, spec, torch.zeros(windows, dtype=torch.long), progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_bad_input_single_layer():
    W, _, H = correlated_layer(seed=0, k=96)
    with pytest.raises(LlmlabError, match="--group-size 64 does not divide the layer's 96 input features"):
        gptq_quantize_weight(W, H, 4, 64)
    with pytest.raises(LlmlabError, match="does not support --bits 16"):
        gptq_quantize_weight(W, H, 16, 32)
