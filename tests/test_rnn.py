"""RNN / LSTM / GRU cells and the multi-layer, bidirectional wrapper against torch.nn.RNN / LSTM / GRU with the
same weights: outputs, final states and gradients, batch-first or not, packed variable-length batches; with a
negative control (two LSTM gates swapped)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmlab.nn.rnn import GRUCell, LSTMCell, Recurrent, RNNCell, init_forget_bias_

TORCH = {"rnn_tanh": (torch.nn.RNN, {}), "rnn_relu": (torch.nn.RNN, {"nonlinearity": "relu"}),
         "lstm": (torch.nn.LSTM, {}), "gru": (torch.nn.GRU, {})}


def pair(mode: str, layers: int, bidirectional: bool, batch_first: bool, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cls, kw = TORCH[mode]
    ref = cls(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw).to(dtype)
    ours = Recurrent(mode, 5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).to(dtype)
    ours.load_torch_state_dict_(ref.state_dict())
    return ours, ref


def states(s):
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("cell,ref_cls,kw", [(RNNCell, torch.nn.RNNCell, {}),
                                              (RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
                                              (LSTMCell, torch.nn.LSTMCell, {}), (GRUCell, torch.nn.GRUCell, {})])
def test_cells_equal_torch(cell, ref_cls, kw):
    torch.manual_seed(0)
    ref, ours = ref_cls(5, 7, **kw), cell(5, 7, **kw)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    if cell is LSTMCell:
        for a, b in zip(ours(x, (h, c)), ref(x, (h, c))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(ours(x, h), ref(x, h), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", list(TORCH))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True), (3, False), (1, True)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_recurrent_equals_torch(mode, layers, bidirectional, batch_first):
    ours, ref = pair(mode, layers, bidirectional, batch_first)
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    out, last = ours(x)
    ref_out, ref_last = ref(x)
    assert out.shape == ref_out.shape == ((4, 6) if batch_first else (6, 4)) + (7 * (1 + bidirectional),)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for a, b in zip(states(last), states(ref_last)):
        assert a.shape == (layers * (1 + bidirectional), 4, 7)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # From a given initial state too.
    h0 = tuple(torch.randn_like(s) for s in states(ref_last))
    h0 = h0 if mode == "lstm" else h0[0]
    torch.testing.assert_close(ours(x, h0)[0], ref(x, h0)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("batch_first,sorted_", [(False, False), (True, False), (True, True)])
def test_packed_variable_lengths_equal_torch(mode, batch_first, sorted_):
    ours, ref = pair(mode, 2, True, batch_first)
    lengths = torch.tensor([6, 4, 2, 1]) if sorted_ else torch.tensor([2, 6, 1, 4])
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sorted_)
    out, last = ours(packed)
    ref_out, ref_last = ref(packed)
    torch.testing.assert_close(out.data, ref_out.data, rtol=0, atol=1e-6)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert (out.sorted_indices is None) == sorted_ or torch.equal(out.sorted_indices, ref_out.sorted_indices)
    for a, b in zip(states(last), states(ref_last)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The same batch padded, with lengths: the same numbers, zeros past each end.
    padded, last2 = ours(x, lengths=lengths)
    ref_padded, _ = pad_packed_sequence(ref_out, batch_first=batch_first)
    torch.testing.assert_close(padded[:, :ref_padded.shape[1]] if batch_first else padded, ref_padded,
                               rtol=0, atol=1e-6)
    for a, b in zip(states(last2), states(ref_last)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradients_equal_torch(mode):
    ours, ref = pair(mode, 2, True, True, dtype=torch.float64)
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    grads = []
    for model in (ours, ref):
        xi = x.clone().requires_grad_(True)
        out, last = model(pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False))
        (out.data.pow(2).sum() + states(last)[0].sum()).backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    ours_grads, ref_grads = grads
    ref_by_name = dict(zip([n for n, _ in ref.named_parameters()], ref_grads[1:]))
    torch.testing.assert_close(ours_grads[0], ref_grads[0], rtol=0, atol=1e-10)
    for index, cell in enumerate(ours.cells):
        suffix = f"_l{index // 2}" + ("_reverse" if index % 2 else "")
        for name, p in cell.named_parameters():
            torch.testing.assert_close(p.grad, ref_by_name[name + suffix], rtol=0, atol=1e-10)


def test_negative_control_swapped_gates():
    """Input and forget gates swapped in the loaded weights: the comparison must fail."""
    ours, ref = pair("lstm", 1, False, False)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = getattr(ours.cells[0], name)
            i, f, g, o = p.clone().chunk(4, dim=0)
            p.copy_(torch.cat([f, i, g, o]))
    x = torch.randn(6, 4, 5)
    assert (ours(x)[0] - ref(x)[0]).abs().max() > 1e-3


def test_forget_bias_is_the_forget_gate_of_torch_lstm():
    """init_forget_bias_ (Jozefowicz et al. 2015): b_if = 1, b_hf = 0, nothing else changed; read through
    torch.nn.LSTMCell with zero weights, zero input and state h = 0, c = 1, the new cell is
    c' = f * 1 + i * g with f = sigma(1): the bias sits in torch's forget-gate block."""
    torch.manual_seed(0)
    ours = Recurrent("lstm", 5, 7, num_layers=2, bidirectional=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    assert init_forget_bias_(ours, 1.0) == 4
    for name, p in ours.state_dict().items():
        f_rows = slice(7, 14)
        if "bias" in name:
            assert torch.all(p[f_rows] == (1.0 if "bias_ih" in name else 0.0)), name
            p, before[name] = p.clone(), before[name].clone()
            p[f_rows], before[name][f_rows] = 0, 0
        assert torch.equal(p, before[name]), name  # every other entry untouched
    cell = ours.cells[0]
    ref = torch.nn.LSTMCell(5, 7)
    ref.load_state_dict(cell.state_dict())
    with torch.no_grad():
        ref.weight_ih.zero_()
        ref.weight_hh.zero_()
    b = ref.bias_ih + ref.bias_hh
    i, g = torch.sigmoid(b[0:7]), torch.tanh(b[14:21])
    _, c = ref(torch.zeros(1, 5), (torch.zeros(1, 7), torch.ones(1, 7)))
    torch.testing.assert_close(c[0], torch.sigmoid(torch.tensor(1.0)) + i * g, rtol=0, atol=1e-6)
    assert init_forget_bias_(GRUCell(5, 7)) == 0  # no forget gate, nothing to set


def test_dropout_between_layers_only_in_training():
    ours, _ = pair("gru", 2, False, False)
    ours.dropout = 0.5
    x = torch.randn(6, 4, 5)
    ours.eval()
    a, b = ours(x)[0], ours(x)[0]
    assert torch.equal(a, b)
    ours.train()
    assert not torch.equal(ours(x)[0], a)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        Recurrent("transformer", 5, 7)
    with pytest.raises(ValueError, match="nonlinearity"):
        RNNCell(5, 7, nonlinearity="gelu")
    with pytest.raises(ValueError, match="must be a batch"):
        Recurrent("gru", 5, 7)(torch.randn(6, 5))
