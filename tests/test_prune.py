"""Pruning: magnitude, Wanda and SparseGPT masks and weights, the pruned folder and ``llmlab prune``.

Parity: the Wanda and SparseGPT functions below are line-by-line transcriptions of the papers' reference code
(locuslab/wanda ``lib/layerwrapper.py`` ``WrappedGPT.add_batch`` and ``lib/prune.py`` ``prune_wanda``;
IST-DASLab/sparsegpt ``sparsegpt.py`` ``SparseGPT.add_batch`` / ``fasterprune``), with only the CUDA
synchronisation, prints, quantizer hooks and module plumbing removed. Our masks and pruned weights must be
identical (``torch.equal``), not close. The reference counts an N:M pattern by the weights it *prunes*
(``prune_n`` of ``prune_m``), llmlab by the weights it keeps (N of M): ours N:M is theirs (M - N):M.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import script_env
from llmlab.common import LlmlabError
from llmlab.compress.hessian import HessianAccumulator
from llmlab.compress.prune import PruneConfig, prune, prune_model_, sparsity_totals
from llmlab.compress.sparsegpt import sparsegpt_prune_weight
from llmlab.compress.sparsity import Pattern, mask_lowest, mask_n_m, parse_pattern
from llmlab.compress.spec import target_linears
from llmlab.compress.wanda import InputNorms, wanda_mask
from llmlab.models.registry import build_model, get_preset


# ---- transcription of locuslab/wanda (lib/layerwrapper.py, lib/prune.py) -------------------------------------
class RefWrappedGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.rows = layer.weight.data.shape[0]
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def ref_wanda_mask(weight, scaler_row, sparsity_ratio, prune_n=0, prune_m=0):
    """The body of prune_wanda's ``for name in subset`` loop (use_variant off), returning W_mask."""
    W_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    W_mask = (torch.zeros_like(W_metric) == 1)  ## initialize a mask to be all False
    if prune_n != 0:
        # structured n:m sparsity
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        # unstructured pruning
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


# ---- transcription of IST-DASLab/sparsegpt (sparsegpt.py) --------------------------------------------------
class RefSparseGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out, blocksize=1024):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
        W = self.layer.weight.data.clone()
        W = W.float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Losses = torch.zeros(self.rows, device=self.dev)
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        mask = None
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)
        return torch.sum(Losses).item()


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """The transcriptions run on one thread, as ``sparsegpt_prune_weight`` always solves: MKL's
    ``cholesky_inverse`` gives different last bits on 1 and 2 threads. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_and_inputs(seed: int, n: int = 48, k: int = 256, dead: bool = True):
    """A linear layer with a few outlier weights and calibration batches whose features are correlated (low
    rank plus noise) with a few large-magnitude input features, as LLM activations have; one input always 0
    when ``dead``. The batches have different shapes, as micro-batches and a 2-D call would."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        layer.weight[torch.randint(0, n, (6,), generator=g), torch.randint(0, k, (6,), generator=g)] = 1.5
    mix = torch.randn(16, k, generator=g)
    scale = torch.ones(k)
    scale[torch.randint(0, k, (4,), generator=g)] = 20.0  # outlier features: what Wanda's norm weights
    batches = []
    for b, t in ((3, 32), (1, 32), (4, 32), (None, 40)):
        shape = (t,) if b is None else (b, t)
        x = (torch.randn(*shape, 16, generator=g) @ mix + 0.3 * torch.randn(*shape, k, generator=g)) * scale
        if dead:
            x[..., 7] = 0
        batches.append(x)
    return layer, batches


# ---- Wanda -----------------------------------------------------------------------------------------------------
def test_input_norms_equal_reference_scaler_row():
    layer, batches = layer_and_inputs(0)
    ours, ref = InputNorms(layer.in_features, torch.device("cpu")), RefWrappedGPT(layer)
    for x in batches:
        ours.add(x)
        ref.add_batch(x, None)
    assert ours.n == ref.nsamples == 9
    assert torch.equal(ours.sq, ref.scaler_row)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5),
                                              ("4:8", 0.5), ("1:4", 0.75)])
def test_wanda_mask_identical_to_reference(pattern, sparsity):
    pat = parse_pattern(pattern)
    layer, batches = layer_and_inputs(1)
    norms, ref = InputNorms(layer.in_features, torch.device("cpu")), RefWrappedGPT(layer)
    for x in batches:
        norms.add(x)
        ref.add_batch(x, None)
    w = layer.weight.detach()
    ours = wanda_mask(w, norms, sparsity, pat)
    theirs = ref_wanda_mask(w.clone(), ref.scaler_row, sparsity, *((pat.m - pat.n, pat.m) if pat.structured else ()))
    assert torch.equal(ours, theirs)
    # the activations matter: on these inputs the mask is not the magnitude mask
    assert not torch.equal(ours, wanda_mask(w, _flat_norms(w.shape[1]), sparsity, pat))


def _flat_norms(k: int) -> InputNorms:
    norms = InputNorms(k, torch.device("cpu"))
    norms.add(torch.ones(1, 1, k))
    return norms


# ---- SparseGPT -------------------------------------------------------------------------------------------------
def _hessians(layer, batches):
    ours, ref = HessianAccumulator(layer.in_features, torch.device("cpu")), RefSparseGPT(layer)
    for x in batches:
        ours.add(x)
        ref.add_batch(x, None)
    assert torch.equal(ours.H, ref.H)
    return ours, ref


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("block_size", [128, 32])
def test_sparsegpt_n_m_identical_to_reference(pattern, block_size):
    pat = parse_pattern(pattern)
    layer, batches = layer_and_inputs(2)
    acc, ref = _hessians(layer, batches)
    w, mask, stats = sparsegpt_prune_weight(layer.weight, acc.H, 0.0, pat, block_size=block_size)
    ref_error = ref.fasterprune(0.0, prunen=pat.m - pat.n, prunem=pat.m, blocksize=block_size)
    assert torch.equal(w, layer.weight)  # the transcription wrote its result into the layer
    assert torch.equal(mask, w == 0)
    assert stats["error"] == pytest.approx(ref_error, rel=1e-5)
    kept = (w != 0).reshape(w.shape[0], -1, pat.m).sum(dim=2)
    assert (kept == pat.n).all()


@pytest.mark.parametrize("block_size", [128, 64])
def test_sparsegpt_unstructured_identical_to_reference(block_size):
    """The reference prunes ``saliency <= sorted[k]``, k = int(S * N * B): k + 1 weights per block. With our
    sparsity set to (k + 1) / (N * B) both prune the same weights, and every result is identical."""
    layer, batches = layer_and_inputs(3, k=256)
    w0 = layer.weight.detach().clone()
    acc, ref = _hessians(layer, batches)
    per_block = layer.out_features * block_size
    ref_error = ref.fasterprune(0.5, blocksize=block_size)
    ours_sparsity = (int(per_block * 0.5) + 1) / per_block
    w, mask, stats = sparsegpt_prune_weight(w0, acc.H, ours_sparsity, block_size=block_size)
    assert torch.equal(w, layer.weight)
    assert stats["error"] == pytest.approx(ref_error, rel=1e-5)
    # our own target, exactly: floor(S * N * B) zeros per block (the dead input's column is zero as well)
    w2, mask2, _ = sparsegpt_prune_weight(w0, acc.H, 0.5, block_size=block_size)
    per_block_zeros = mask2.reshape(layer.out_features, -1, block_size).sum(dim=(0, 2))
    assert (per_block_zeros == per_block // 2).all()
    assert torch.equal(w2 == 0, mask2 | (torch.arange(256) == 7))


def test_sparsegpt_output_error_below_wanda_below_magnitude_at_2_4():
    """The papers' ordering on one layer: ||W X - W' X|| over the calibration inputs at 2:4."""
    layer, batches = layer_and_inputs(4, dead=False)
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in batches])  # (tokens, K)
    acc, norms = HessianAccumulator(256, torch.device("cpu")), InputNorms(256, torch.device("cpu"))
    for x in batches:
        acc.add(x)
        norms.add(x)
    w = layer.weight.detach()
    pat = Pattern(2, 4)
    errors = {"magnitude": w.masked_fill(mask_n_m(w.abs(), 2, 4), 0),
              "wanda": w.masked_fill(wanda_mask(w, norms, 0.5, pat), 0),
              "sparsegpt": sparsegpt_prune_weight(w, acc.H, 0.5, pat)[0]}
    errors = {k: float((X @ (w - v).t()).norm()) for k, v in errors.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---- exact sparsity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9])
def test_masks_prune_exactly_the_target(sparsity):
    scores = torch.rand(12, 100, generator=torch.Generator().manual_seed(0))
    scores[0] = 0.5  # ties: broken by position, the lower index pruned first
    rows = mask_lowest(scores, sparsity, dim=1)
    assert (rows.sum(dim=1) == math.floor(sparsity * 100 + 1e-9)).all()
    layer = mask_lowest(scores, sparsity, dim=None)
    assert int(layer.sum()) == math.floor(sparsity * 1200 + 1e-9)
    assert torch.equal(rows[0], torch.arange(100) < math.floor(sparsity * 100 + 1e-9))
    nm = mask_n_m(scores, 3, 4)
    assert (nm.reshape(12, 25, 4).sum(dim=2) == 1).all()


def tiny_model(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    return build_model(replace(get_preset("llama-tiny"), **{"ffn_dim": 128, **cfg})).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None),
                                              ("4:8", None)])
def test_model_sparsity_equals_target(method, pattern, sparsity):
    model = tiny_model()
    windows = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(method, sparsity, pattern)
    before = {n: m.weight.detach().clone() for n, m in target_linears(model)}
    report = prune_model_(model, config, windows, progress=False)
    target = config.resolved().sparsity
    assert set(report) == set(before)
    for name, layer in target_linears(model):
        w = layer.weight.detach()
        n, k = w.shape
        if pattern != "unstructured":
            pat = parse_pattern(pattern)
            assert ((w != 0).reshape(n, -1, pat.m).sum(dim=2) == pat.n).all(), name
            assert report[name]["n_m_violations"] == 0
        elif method == "wanda":  # per output row
            assert ((w == 0).sum(dim=1) == math.floor(target * k + 1e-9)).all(), name
        elif method == "magnitude":  # per layer
            assert int((w == 0).sum()) == math.floor(target * n * k + 1e-9), name
        else:  # per block of 128 columns (these layers are one or two blocks)
            expect = sum(math.floor(target * n * min(128, k - b) + 1e-9) for b in range(0, k, 128))
            assert int((w == 0).sum()) == expect, name
        assert report[name]["sparsity"] == pytest.approx(float((w == 0).float().mean()))
        kept = w != 0
        if method != "sparsegpt":  # masks only: the kept weights are untouched
            assert torch.equal(w[kept], before[name][kept])
        else:  # OBS updates move the kept weights
            assert not torch.equal(w[kept], before[name][kept])
    totals = sparsity_totals(model, report)
    assert totals["layers"] == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize("method,compare", [("magnitude", "row"), ("wanda", "layer")])
def test_compare_row_or_layer(method, compare):
    model = tiny_model()
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    report = prune_model_(model, PruneConfig(method, 0.4, compare=compare), windows, progress=False)
    for name, layer in target_linears(model):
        zeros = layer.weight == 0
        n, k = zeros.shape
        if compare == "row":
            assert (zeros.sum(dim=1) == math.floor(0.4 * k)).all(), name
        else:
            assert int(zeros.sum()) == math.floor(0.4 * n * k + 1e-9), name
            assert not (zeros.sum(dim=1) == math.floor(0.4 * k)).all(), name  # rows differ: one layer-wide cut
        assert report[name]["sparsity"] == pytest.approx(float(zeros.float().mean()))


def test_reference_style_block_loop_gives_the_same_masks():
    """prune_model_'s block-by-block calibration (micro-batches, one statistic per shared input) against a
    transcription of prune_wanda's loop: every sample alone through each block, a hook on every linear layer,
    prune, recompute the block's outputs, move on."""
    model = tiny_model(1)
    ref_model = tiny_model(1)
    windows = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(2))
    prune_model_(model, PruneConfig("wanda", 0.5), windows, progress=False)

    with torch.no_grad():
        positions = torch.arange(16).expand(1, 16)
        rope = ref_model.rotary(positions, torch.float32)
        inps = [ref_model.embed_tokens(windows[j:j + 1]) for j in range(5)]
        for i, layer in enumerate(ref_model.layers):
            subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            wrapped = {n: RefWrappedGPT(m) for n, m in subset.items()}
            handles = [subset[n].register_forward_hook(lambda _m, inp, out, w=wrapped[n]: w.add_batch(inp[0], out))
                       for n in subset]
            for x in inps:
                layer(x, rope=rope, key_mask=None, cache=None, layer=i, start=0)
            for h in handles:
                h.remove()
            for n in subset:
                mask = ref_wanda_mask(subset[n].weight.data, wrapped[n].scaler_row, 0.5)
                subset[n].weight.data[mask] = 0
            inps = [layer(x, rope=rope, key_mask=None, cache=None, layer=i, start=0) for x in inps]
    for (name, ours), (_, ref) in zip(target_linears(model), target_linears(ref_model)):
        assert torch.equal(ours.weight == 0, ref.weight == 0), name


# ---- bad input (Python API) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    (PruneConfig("wanda", 1.0), "--sparsity 1.0"), (PruneConfig("wanda", -0.1), "in [0, 1)"),
    (PruneConfig("magnitude", 0.5, "2-4"), "--pattern '2-4'"), (PruneConfig("magnitude", 0.5, "4:2"), "1 <= N < M"),
    (PruneConfig("wanda", 0.3, "2:4"), "conflicts with --pattern 2:4"),
    (PruneConfig("sparsegpt", 0.5, compare="row"), "leave --compare out"),
    (PruneConfig("sparsegpt", None, "3:5", block_size=128), "not a multiple of the pattern's M"),
    (PruneConfig("obs"), "unknown method"),
])
def test_bad_config(config, message):
    with pytest.raises(LlmlabError, match=re.escape(message)):
        config.resolved()


def test_pattern_the_width_does_not_allow_changes_nothing():
    model = tiny_model(ffn_dim=172)  # the down projection has 172 inputs: 4:8 needs multiples of 8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LlmlabError, match=r"layers.0.mlp.down_proj has 172 input features, not a multiple of 8"):
        prune_model_(model, PruneConfig("magnitude", None, "4:8"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(LlmlabError, match="needs calibration windows"):
        prune_model_(model, PruneConfig("wanda"), None, progress=False)


# ---- the folder and the command line ---------------------------------------------------------------------------------
def run_cli(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=timeout)


def test_pruned_folder_round_trips(tmp_path, tiny_chat):
    from llmlab.formats.load import load_model

    out = tmp_path / "pruned"
    report = prune(str(tiny_chat), out, PruneConfig("sparsegpt", None, "2:4"), calib_samples=2, calib_len=32,
                   progress=False)
    assert json.loads((out / "prune_report.json").read_text()) == json.loads(json.dumps(report))
    assert report["config"] == {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "compare": None,
                                "damp": 0.01, "block_size": 128}
    assert report["sparsity"]["layers"] == 0.5 and len(report["layers"]) == 14
    assert "| layers.1.mlp.down_proj | 0.5000 |" in (out / "summary.md").read_text()
    back = load_model(str(out))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary float folder
    for (name, layer), st in zip(target_linears(back.model), report["layers"].values()):
        assert float((layer.weight == 0).float().mean()) == st["sparsity"] == 0.5, name
    with pytest.raises(LlmlabError, match="already exists"):
        prune(str(tiny_chat), out, PruneConfig("magnitude"), progress=False)


def test_cli_prune_end_to_end(tmp_path, tiny_chat):
    out = tmp_path / "p"
    r = run_cli("prune", str(tiny_chat), "--method", "wanda", "--pattern", "4:8", "--calib-samples", "2",
                "--calib-len", "32", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "wanda 4:8: 14 layers, 50.00% of their weights zero" in r.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert report["calibration"] == {"source": "builtin", "samples": 2, "tokens": 32, "seed": 0}
    r = run_cli("generate", "--model", str(out), "Hello", "--max-new-tokens", "3", "--raw")
    assert r.returncode == 0, r.stderr
    probe = ("import sys\nfrom llmlab.cli import main\ntry:\n    main(['prune', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stderr  # --help loads no torch
    for flag in ("--method", "--sparsity", "--pattern", "--compare", "--damp", "--block-size", "--calib",
                 "--calib-samples", "--calib-len", "--seed", "--dtype", "--out", "--force", "--no-progress"):
        assert flag in r.stdout, flag
    assert r.stdout.count("(default:") >= 12


def test_cli_bad_input(tmp_path, tiny_chat, capsys):
    """``llmlab.cli.main`` in process (the entry point's own code path: one line, exit 2), then one case through
    a real subprocess for the exit code and the absence of a traceback."""
    from llmlab.cli import main

    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "x"
    for args, message in ((["--sparsity", "1"], "--sparsity 1.0: use the fraction of weights to zero, in [0, 1)"),
                          (["--sparsity", "-0.5"], "in [0, 1)"),
                          (["--pattern", "2/4"], "--pattern '2/4': use 'unstructured' or N:M"),
                          (["--pattern", "3:7"], "has 64 input features, not a multiple of 7"),
                          (["--method", "magnitude", "--sparsity", "0.6", "--pattern", "2:4"], "conflicts"),
                          (["--method", "sparsegpt", "--compare", "row"], "leave --compare out"),
                          (["--calib", str(tmp_path / "empty.txt")], "fewer than one window"),
                          (["--calib", str(tmp_path / "missing.txt")], "no such file")):
        assert main(["prune", str(tiny_chat), *args, "--out", str(out), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    out.mkdir()
    r = run_cli("prune", str(tiny_chat), "--method", "magnitude", "--pattern", "4:8", "--sparsity", "0.5",
                "--out", str(out))
    assert r.returncode == 2 and "already exists: pass --force" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and not any(out.iterdir())


@pytest.mark.slow
def test_readme_prune_commands(tmp_path, smollm_path):
    """The README's prune lines as written (the calibrated ones with a small calibration budget appended), then
    generate from the pruned folder."""
    r = run_cli("prune", "--method", "magnitude", "--out", str(tmp_path / "mag50"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", "--out", str(tmp_path / "wanda50"), "--calib-samples", "2", "--calib-len", "64",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    # 210 column-by-column solves whatever the calibration budget (this test: 12 minutes on a loaded 2-core machine)
    r = run_cli("prune", "--method", "sparsegpt", "--pattern", "2:4", "--out", str(tmp_path / "sgpt24"),
                "--calib-samples", "2", "--calib-len", "64", "--no-progress", timeout=1500)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "sgpt24" / "prune_report.json").read_text())
    assert len(report["layers"]) == 210 and report["sparsity"]["layers"] >= 0.5
    r = run_cli("generate", "--model", str(tmp_path / "sgpt24"), "The capital of France is", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.slow
def test_readme_prune_table_command(tmp_path, smollm_path):
    """The README's results-table command with the smoke budget appended (--quick: 1,024 held-out tokens) and
    one row (magnitude 2:4: no calibration): the JSON and Markdown it writes."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prune_table.py"
    r = subprocess.run([sys.executable, str(script), "--calib-samples", "16", "--calib-len", "512", "--quick",
                        "--only", "magnitude 2:4", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=script_env())
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(x["method"], x["pattern"]) for x in rows] == [("dense", ""), ("magnitude", "2:4")]
    assert rows[1]["sparsity"] == 0.5 and rows[1]["perplexity"] > rows[0]["perplexity"]
    assert "| magnitude 2:4 | 50.0% |" in (tmp_path / "results.md").read_text()
