"""Recurrent cells written out: Elman RNN, LSTM and GRU, and a multi-layer, bidirectional wrapper.

One step maps the input x_t (B, I) and the state (B, H) to the next state. With sigma the logistic sigmoid,
(.) elementwise, and every W x + b below one affine map of its own:

    RNN   (Elman, "Finding structure in time", 1990)
        h' = tanh(W_ih x + b_ih + W_hh h + b_hh)                   (or relu)
    LSTM  (Hochreiter & Schmidhuber, "Long short-term memory", 1997; the forget gate of Gers et al. 2000)
        i = sigma(W_ii x + b_ii + W_hi h + b_hi)                    input gate
        f = sigma(W_if x + b_if + W_hf h + b_hf)                    forget gate
        g = tanh (W_ig x + b_ig + W_hg h + b_hg)                    candidate cell
        o = sigma(W_io x + b_io + W_ho h + b_ho)                    output gate
        c' = f (.) c + i (.) g,   h' = o (.) tanh(c')
    GRU   (Cho et al., "Learning phrase representations using RNN encoder-decoder", 2014, arXiv:1406.1078)
        r = sigma(W_ir x + b_ir + W_hr h + b_hr)                    reset gate
        z = sigma(W_iz x + b_iz + W_hz h + b_hz)                    update gate
        n = tanh (W_in x + b_in + r (.) (W_hn h + b_hn))            candidate state
        h' = (1 - z) (.) n + z (.) h
        (Cho et al. put r inside the product, W_hn (r (.) h); PyTorch and cuDNN use the form above, and so do we.)

The gates' weights are stacked in one matrix per side, in PyTorch's order (LSTM i, f, g, o; GRU r, z, n), so
``weight_ih`` is (G*H, I), ``weight_hh`` (G*H, H) with G = 1, 4, 3, and ``Recurrent.load_torch_state_dict_``
takes a ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` state dict as it is. ``Recurrent`` takes the same arguments as
those modules and gives the same outputs and final states (tests/test_rnn.py): layers stacked, each layer's
input the previous layer's output (both directions concatenated), dropout between layers in training. Variable
lengths: a state stops changing once a sequence has ended (and the reverse direction starts at each sequence's
own last step), which is what a ``PackedSequence`` means; padded outputs are zero.

Shapes: input (B, T, I) with batch_first, else (T, B, I) (always a batch), or a PackedSequence; output
(.., D*H) with D = 2 when bidirectional; final state h_n (and c_n for the LSTM) (L*D, B, H), layer-major,
forward before reverse.

Forget-gate bias (``init_forget_bias_``; Jozefowicz, Zaremba & Sutskever, "An Empirical Exploration of
Recurrent Network Architectures", ICML 2015; Gers et al. 2000 already start it positive): PyTorch draws b_if and
b_hf like every other weight, U(-1/sqrt(H), 1/sqrt(H)), so at the start f = sigma(~0) = 1/2 and the cell halves
its memory at every step, c' = 1/2 c + i g: the gradient along the cell path dies as 2^-k over k steps. With
b_if + b_hf = 1, f starts near sigma(1) = 0.73 and the cell remembers; the paper found this closed most of the
gap between the LSTM and the GRU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class _Cell(nn.Module):
    gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        g = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(g)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(g)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # PyTorch's initialisation, U(-1/sqrt(H), 1/sqrt(H))
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def split(self, x: torch.Tensor, h: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(W_i* x + b_i* for each gate), (W_h* h + b_h* for each gate): each (B, H)."""
        return (F.linear(x, self.weight_ih, self.bias_ih).chunk(self.gates, dim=-1),
                F.linear(h, self.weight_hh, self.bias_hh).chunk(self.gates, dim=-1))


class RNNCell(_Cell):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be tanh or relu, not {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        (xi,), (hi,) = self.split(x, h)
        return torch.tanh(xi + hi) if self.nonlinearity == "tanh" else torch.relu(xi + hi)


class LSTMCell(_Cell):
    gates = 4

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        (xi, xf, xg, xo), (hi, hf, hg, ho) = self.split(x, h)
        i = torch.sigmoid(xi + hi)
        f = torch.sigmoid(xf + hf)
        g = torch.tanh(xg + hg)
        o = torch.sigmoid(xo + ho)
        c = f * c + i * g
        return o * torch.tanh(c), c


class GRUCell(_Cell):
    gates = 3

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        (xr, xz, xn), (hr, hz, hn) = self.split(x, h)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)  # the reset gate scales the recurrent term only, bias included
        return (1 - z) * n + z * h


def init_forget_bias_(module: nn.Module, value: float = 1.0) -> int:
    """Set the forget-gate bias of every ``LSTMCell`` in ``module`` to ``value``: b_if = value and b_hf = 0 (so
    their sum, the bias the gate sees, is ``value``). The weights are untouched. Returns the cells changed."""
    cells = [m for m in module.modules() if isinstance(m, LSTMCell) and m.bias_ih is not None]
    with torch.no_grad():
        for cell in cells:
            H = cell.hidden_size
            cell.bias_ih[H:2 * H].fill_(value)  # gate order i, f, g, o: f is the second block of H
            cell.bias_hh[H:2 * H].zero_()
    return len(cells)


CELLS = {"rnn_tanh": RNNCell, "rnn_relu": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


class Recurrent(nn.Module):
    """A stack of ``num_layers`` recurrent layers of one ``mode`` (rnn_tanh, rnn_relu, lstm, gru), each one
    direction or two. ``forward(x, state=None, lengths=None) -> (output, final state)``."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False) -> None:
        super().__init__()
        if mode not in CELLS:
            raise ValueError(f"mode must be one of {', '.join(CELLS)}, not {mode!r}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.batch_first, self.dropout, self.directions = batch_first, dropout, 2 if bidirectional else 1
        extra = {"nonlinearity": mode[4:]} if mode.startswith("rnn") else {}
        self.cells = nn.ModuleList(
            CELLS[mode](input_size if layer == 0 else hidden_size * self.directions, hidden_size, bias, **extra)
            for layer in range(num_layers) for _ in range(self.directions))  # index layer * D + direction

    def load_torch_state_dict_(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy the weights of a ``torch.nn.RNN/LSTM/GRU`` (``weight_ih_l{k}[_reverse]``, ...) into the cells."""
        with torch.no_grad():
            for index, cell in enumerate(self.cells):
                suffix = f"_l{index // self.directions}" + ("_reverse" if index % self.directions else "")
                for name, p in cell.named_parameters():
                    p.copy_(sd[name + suffix])

    def _zero_state(self, batch: int, like: torch.Tensor) -> State:
        h = like.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
        return (h, h.clone()) if self.mode == "lstm" else h

    def _run(self, cell: _Cell, x: torch.Tensor, state: State, mask: torch.Tensor | None,
             reverse: bool) -> tuple[torch.Tensor, State]:
        """One layer, one direction over x (T, B, I); mask (T, B, 1): True where a sequence has a step."""
        outputs = [x.new_empty(0)] * x.shape[0]
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            new = cell(x[t], state)
            if mask is not None:
                # A finished (or, in reverse, not yet started) sequence keeps its state: the reverse pass
                # therefore begins at each sequence's own last step.
                new = (tuple(torch.where(mask[t], n, s) for n, s in zip(new, state)) if isinstance(new, tuple)
                       else torch.where(mask[t], new, state))
            state = new
            h = state[0] if isinstance(state, tuple) else state
            outputs[t] = h if mask is None else h * mask[t]
        return torch.stack(outputs), state  # (T, B, H)

    def forward(self, x: torch.Tensor | PackedSequence, state: State | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor | PackedSequence, State]:
        packed = x if isinstance(x, PackedSequence) else None
        if packed is not None:
            x, lengths = pad_packed_sequence(packed, batch_first=self.batch_first)  # original batch order
        assert isinstance(x, torch.Tensor)
        if x.dim() != 3:
            raise ValueError(f"input must be a batch, (B, T, I) or (T, B, I), not shape {tuple(x.shape)}")
        seq = x.transpose(0, 1) if self.batch_first else x  # (T, B, I)
        T, B = seq.shape[0], seq.shape[1]
        mask = None
        if lengths is not None:
            steps = torch.arange(T, device=seq.device)[:, None]  # (T, 1)
            mask = (steps < lengths.to(seq.device)[None, :])[:, :, None]  # (T, B, 1)
        state = state if state is not None else self._zero_state(B, seq)
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                index = layer * self.directions + d
                init = tuple(s[index] for s in state) if isinstance(state, tuple) else state[index]  # (B, H)
                out, last = self._run(self.cells[index], seq, init, mask, reverse=d == 1)
                outs.append(out)
                finals.append(last)
            seq = torch.cat(outs, dim=-1)  # (T, B, D*H)
            if layer < self.num_layers - 1 and self.dropout > 0:
                seq = F.dropout(seq, self.dropout, self.training)
        out = seq.transpose(0, 1) if self.batch_first else seq
        if self.mode == "lstm":
            final: State = (torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals]))
        else:
            final = torch.stack(finals)  # (L*D, B, H)
        if packed is not None:
            assert lengths is not None
            return self._repack(out, lengths, packed), final
        return out, final

    def _repack(self, out: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
        """``out`` packed exactly as the input was: the same batch order, so the same ``sorted_indices``."""
        if like.sorted_indices is not None:
            out = out.index_select(0 if self.batch_first else 1, like.sorted_indices.to(out.device))
            lengths = lengths[like.sorted_indices.cpu()]
        data = pack_padded_sequence(out, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
