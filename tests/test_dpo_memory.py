"""The autograd nodes that lower full fine-tuning's peak memory (issue 15, README "DPO"): each gives autograd's
gradients (to the bit, or to float rounding, or by float64 gradcheck) and keeps or allocates less.

- ``nn/linear_ce.py``: the head's weight gradient accumulated in place, no (V, D) product beside the buffer;
- ``nn/tied_embedding.py``: the tied table's lookup gradient added into the head's in place, no second (V, D)
  tensor; with a plain tied model's gradients bit for bit, through DPO's and the logits' heads, gradient
  accumulation, activation checkpointing, the optimizer step in backward, LoRA and torch.compile;
- ``nn/mlp.py``: SwiGLU keeping gate and up only; ``nn/norm.py``: RMSNorm keeping x and 1 / rms only.

Peak memory is the process's own (``VmHWM``, reset through ``/proc/self/clear_refs``) around one backward whose
(V, D) tensors (64 MB) are far above glibc's mmap threshold, so they come and go in the RSS."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab.models.decoder import DecoderLM
from llmlab.nn.linear_ce import linear_cross_entropy
from llmlab.nn.mlp import SwiGLU, _SwiGLU, _SwiGLUDown
from llmlab.nn.norm import RMSNorm
from llmlab.nn.tied_embedding import tied_lookup
from llmlab.train.dpo import DPOConfig, pair_batch, sequence_logps
from test_dpo import _tiny_pairs
from test_sft import tiny_config

V, D = 65536, 256  # one (V, D) float32 tensor: 64 MB
VD_MB = V * D * 4 / 2**20


def _status_mb(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _peak_mb(fn) -> float:
    """fn()'s peak RSS above the RSS when it starts, in MB."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def _big_head_backward(tied: bool) -> float:
    """A tied (V, D) table, its lookup of 96 tokens, a DPO-style per-row head on 48 of them: backward's peak."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(V, D, generator=g) * 0.02)
    ids = torch.randint(0, V, (96,), generator=g)
    x, head = tied_lookup(w, ids) if tied else (F.embedding(ids, w), w)  # (96, D), (V, D)
    h = torch.tanh(x)[:48]
    loss = linear_cross_entropy(h, head, torch.randint(0, V, (48,), generator=g), reduction="none").sum()
    return _peak_mb(loss.backward)


# ---- nn/linear_ce.py and nn/tied_embedding.py: memory ----------------------------------------------------


def test_the_tied_table_gradient_is_one_vd_tensor_at_the_peak():
    """Before: the head's buffer plus its (V, D) product (2x), then the head's gradient plus the lookup's dense
    one (2x). Now one (V, D) tensor; the plain tied path, measured the same way, still holds two. Measured in a
    fresh process: in the suite's own, threads left by earlier tests free memory meanwhile and hide the peak."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_dpo_memory as t; "
            "print(t._big_head_backward(True), t._big_head_backward(False))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=300)
    if done.returncode and "cannot reset the peak RSS" in done.stderr:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr[-2000:]
    ours, plain = map(float, done.stdout.split()[-2:])
    assert ours < 1.4 * VD_MB, (ours, VD_MB)
    assert plain > 1.8 * VD_MB, (plain, VD_MB)  # the measurement sees the second (V, D) tensor


# ---- nn/tied_embedding.py: the same gradients ----------------------------------------------------------


def _tiny(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg.tie_embeddings = tie
    return DecoderLM(cfg.validate())


def _plain_copy(model):
    """The same model on autograd's own path: a hook on the lookup turns ``tied_lookup`` off."""
    other = copy.deepcopy(model)
    other.embed_tokens.register_forward_hook(lambda *a: None)
    return other


@pytest.fixture(scope="module")
def batch():
    pairs, tok = _tiny_pairs(2)
    return pair_batch(pairs, tok.eos_id)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, exact=True):
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and "embed_tokens.weight" in ga
    for n in ga:
        if exact:
            assert torch.equal(ga[n], gb[n]), n
        else:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dpo_head_and_logits_head_give_the_plain_tied_gradient_bit_for_bit(batch):
    """DPO's per-token head (linear_ce, the gradient handed over alone: added in place) and the model's own
    logits (F.linear's transposed-view gradient: added out of place), with repeated tokens in the batch."""
    ours = _tiny()
    plain = _plain_copy(ours)
    assert len(set(batch.input_ids.flatten().tolist())) < batch.input_ids.numel()  # repeats: summed per token
    for m in (ours, plain):
        sequence_logps(m, batch).sum().backward()  # DPO's path: return_head_weight + linear_ce rows
        logits = m(batch.input_ids[:2])  # (2, T, V): the head inside the forward
        F.cross_entropy(logits.flatten(0, 1), batch.input_ids[:2].roll(-1, 1).flatten()).backward()  # accumulates
    _assert_same_grads(ours, plain)


def test_head_weight_is_the_table_where_nothing_is_tied_or_trained(batch):
    """No autograd node where it cannot help: no gradient wanted, an untied head, a frozen table (LoRA)."""
    from llmlab.train.sft import apply_method
    from test_sft import tiny_tokenizer

    model = _tiny()
    ids = batch.input_ids[:1]
    with torch.no_grad():
        assert model(ids, return_hidden=True, return_head_weight=True)[1] is model.lm_head.weight
    _, w = model(ids, return_hidden=True, return_head_weight=True)
    assert w is not model.lm_head.weight and w.grad_fn is not None  # the tied, trained case: the view
    untied = _tiny(tie=False)
    assert untied(ids, return_hidden=True, return_head_weight=True)[1] is untied.lm_head.weight
    lora = apply_method(_tiny(), DPOConfig(method="lora").sft_config(), tiny_tokenizer())
    assert not lora.embed_tokens.weight.requires_grad
    assert lora(ids, return_hidden=True, return_head_weight=True)[1] is lora.lm_head.weight


def test_checkpointing_and_the_optimizer_step_in_backward_are_unchanged(batch):
    """Activation checkpointing: the same gradients; the optimizer step in backward: the tied weight is stepped
    once, with both uses' gradient (the same weights as the plain path's step)."""
    from llmlab.train.loop import enable_activation_checkpointing_
    from llmlab.train.optim import build_adamw

    ours, plain = _tiny(), _tiny()
    plain = _plain_copy(plain)
    enable_activation_checkpointing_(ours)
    for m in (ours, plain):
        sequence_logps(m, batch).sum().backward()
    _assert_same_grads(ours, plain)
    for m in (ours, plain):
        m.zero_grad(set_to_none=True)
        opt = build_adamw(m, 1e-2, 0.0, (0.9, 0.95), in_backward=True)
        sequence_logps(m, batch).sum().backward()
        opt.remove_hooks()
    for (n, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert a.grad is None and torch.equal(a, b), n


def test_torch_compile_gives_the_eager_gradients(batch):
    """Under torch.compile (dynamo + AOTAutograd; the eager backend keeps this test short) the lookup is the
    plain one and the gradients are eager's."""
    eager = _tiny()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    sequence_logps(torch.compile(compiled, backend="aot_eager"), batch).sum().backward()
    sequence_logps(eager, batch).sum().backward()
    _assert_same_grads(compiled, eager, exact=False)


def test_a_head_gradient_kept_elsewhere_is_not_written_into():
    """linear_ce's mean path hands over the gradient it saved; with retain_graph it is still saved, so the rows
    are added out of place and a second backward gives the same gradient again."""
    w = torch.nn.Parameter(torch.randn(50, 8, dtype=torch.float64))
    ids = torch.tensor([3, 3, 7, 1, 3])
    x, head = tied_lookup(w, ids)
    loss = linear_cross_entropy(torch.tanh(x), head, torch.tensor([1, 2, 3, 4, 5]))
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    loss.backward()
    assert torch.equal(w.grad, first)
    w.grad = None
    plain = linear_cross_entropy(torch.tanh(F.embedding(ids, w)), w, torch.tensor([1, 2, 3, 4, 5]))
    plain.backward()
    torch.testing.assert_close(w.grad, first, rtol=0, atol=1e-15)


# ---- nn/mlp.py: SwiGLU ---------------------------------------------------------------------------------


def _saved(fn, width: int, module: torch.nn.Module) -> int:
    """How many distinct activations (..., width) (not ``module``'s weights) autograd keeps for fn()'s backward."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.shape[-1] == width and ptr not in weights:
            seen.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(seen)


def test_swiglu_gradients_are_autograds_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, bias = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True), None
    assert torch.autograd.gradcheck(_SwiGLU.apply, (a, b))
    assert torch.autograd.gradcheck(_SwiGLUDown.apply, (a, b, w, bias))
    mlp = SwiGLU(16, 40, bias=True)
    x = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    up = torch.randn(3, 7, 16, generator=g)
    ours = torch.autograd.grad(mlp(x), (x, *mlp.parameters()), up)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    for o, r in zip(ours, torch.autograd.grad(ref, (x, *mlp.parameters()), up)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_swiglu_keeps_gate_and_up_only():
    """Per block, autograd keeps gate, silu(gate), up and their product (the down projection's input); here
    gate and up, and with an adapted down projection (not a plain linear layer) the product too."""
    from llmlab.nn.lora import LoRALinear

    mlp = SwiGLU(16, 40)
    x = torch.randn(3, 7, 16, requires_grad=True)
    assert _saved(lambda: mlp(x), 40, mlp) == 2
    assert _saved(lambda: mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)), 40, mlp) == 4
    mlp.down_proj = LoRALinear(mlp.down_proj, r=4, alpha=8.0)
    assert _saved(lambda: mlp(x), 40, mlp) == 3


# ---- nn/norm.py: RMSNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rmsnorm_gradients_are_autograds_and_it_keeps_x_only(dtype):
    """The module's output and gradients are the plain expression's (autograd's) to the bit; of the (..., dim)
    tensors it keeps x, where autograd keeps x and x / rms."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    x = torch.randn(3, 7, 64, generator=g).to(dtype).requires_grad_()
    up = torch.randn(3, 7, 64, generator=g).to(dtype)

    def plain():
        h = x.float()
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)

    y = norm(x)
    assert torch.equal(y, plain())
    for o, r in zip(torch.autograd.grad(y, (x, norm.weight), up), torch.autograd.grad(plain(), (x, norm.weight), up)):
        assert o.dtype == r.dtype and torch.equal(o, r)
    assert _saved(lambda: norm(x), 64, norm) == 1 and _saved(plain, 64, norm) == 2
