"""A recurrent language model (LSTM, GRU or Elman RNN) and ELMo's bidirectional one with its layer mix.

Unidirectional (a classic LSTM LM, e.g. Zaremba et al. 2014, arXiv:1409.2329): token embedding x_t, then L
recurrent layers (``nn/rnn.Recurrent``, one layer each so that every layer's states are at hand), then a softmax
tied to the embedding (Press & Wolf 2017, arXiv:1608.05859; Inan et al. 2017, arXiv:1611.01462):

    h_{t,0} = E[w_t],   h_{t,j} = cell_j(h_{t,j-1}, state_{t-1,j}),   p(w_{t+1} | w_<=t) = softmax(E h_{t,L} + b)

ELMo (Peters et al. 2018, "Deep contextualized word representations", arXiv:1802.05365): a forward LM and a
backward LM (the backward one reads the sequence right to left and predicts w_{t-1} from w_t..w_T) with their
own LSTM stacks but one shared input embedding and one shared softmax; trained on the sum of the two
log-likelihoods. Token k's representation at layer j is h_{k,0} = [x_k; x_k] and h_{k,j} = [fwd h_{k,j}; bwd
h_{k,j}] (both directions concatenated), and a task sees the learned mix

    ELMo_k = gamma * sum_{j=0..L} s_j h_{k,j},   s = softmax(w)                       (paper eq. 1)

(``ScalarMix``; w and gamma are learned with the task; w = 0, gamma = 1 is the plain average of the layers).

Differences from the paper, stated: token embeddings from the shards' BPE tokenizer instead of the
character CNN, no projection inside the LSTM (the paper's LSTMP, 4096 cells projected to 512) and no residual
connection between the layers, so that each layer is a plain ``torch.nn.LSTM`` layer (tested against one).

Shapes: ids (B, T) int64; logits (B, T, V); ``layer_states`` (L+1, B, T, D*H) with D = 2 directions for the
bidirectional model, 1 otherwise; recurrent state per layer as ``Recurrent`` keeps it ((1, B, H), or a pair for
the LSTM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.rnn import CELLS, Recurrent, State, init_forget_bias_


class RecurrentLM(nn.Module):
    """``cell`` (lstm, gru, rnn_tanh, rnn_relu) language model of ``n_layers`` layers of width ``dim`` (the
    embedding has the same width, so the softmax is the embedding matrix); ``bidirectional`` adds ELMo's
    backward LM (its own layers, the same embedding and softmax). ``forget_bias`` (LSTM only): start every
    forget gate's bias at this value (``nn/rnn.init_forget_bias_``; None keeps PyTorch's initialisation)."""

    def __init__(self, cell: str, vocab_size: int, dim: int, n_layers: int, bidirectional: bool = False,
                 dropout: float = 0.0, forget_bias: float | None = None) -> None:
        super().__init__()
        if cell not in CELLS:
            raise LlmlabError(f"unknown cell {cell!r}: choose one of {', '.join(CELLS)}")
        if vocab_size < 2 or dim < 1 or n_layers < 1:
            raise LlmlabError(f"a recurrent LM needs vocab_size >= 2, dim >= 1 and n_layers >= 1, got {vocab_size}, "
                              f"{dim}, {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise LlmlabError(f"dropout must be in [0, 1), got {dropout}")
        self.cell, self.dim, self.n_layers, self.dropout = cell, dim, n_layers, dropout
        self.bidirectional = bidirectional
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed_tokens.weight, std=dim ** -0.5)  # logits start near 0 through the tied softmax
        self.forward_layers = nn.ModuleList(Recurrent(cell, dim, dim, batch_first=True) for _ in range(n_layers))
        self.backward_layers = nn.ModuleList(Recurrent(cell, dim, dim, batch_first=True)
                                             for _ in range(n_layers)) if bidirectional else None
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))  # b of the tied softmax
        if forget_bias is not None:
            if cell != "lstm":
                raise LlmlabError(f"a forget-gate bias is for an LSTM: the {cell} cell has no forget gate")
            init_forget_bias_(self, forget_bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(.., dim) -> (.., V): the shared softmax's logits E h + b."""
        return F.linear(h, self.embed_tokens.weight, self.out_bias)

    def _stack(self, layers: nn.ModuleList, x: torch.Tensor, states: list[State] | None
               ) -> tuple[list[torch.Tensor], list[State]]:
        """Run the layers on x (B, T, dim); every layer's output (B, T, dim) and final state."""
        outs, finals = [], []
        for j, layer in enumerate(layers):
            x, final = layer(x, None if states is None else states[j])
            outs.append(x)
            finals.append(final)
            if self.dropout and j < len(layers) - 1:
                x = F.dropout(x, self.dropout, self.training)
        return outs, finals

    def forward(self, ids: torch.Tensor, states: list[State] | None = None) -> tuple[torch.Tensor, list[State]]:
        """The forward LM: ids (B, T) -> logits (B, T, V) for the next token at each position, and the final
        state of each layer (pass it back in to continue the sequence)."""
        x = F.dropout(self.embed_tokens(ids), self.dropout, self.training)  # (B, T, dim)
        outs, finals = self._stack(self.forward_layers, x, states)
        return self.logits(F.dropout(outs[-1], self.dropout, self.training)), finals

    def bidirectional_logits(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> (forward logits, backward logits), each (B, T, V): at position t the forward LM
        predicts w_{t+1}, the backward LM w_{t-1}."""
        fwd, bwd = self._directions(ids)
        drop = lambda h: F.dropout(h, self.dropout, self.training)  # noqa: E731
        return self.logits(drop(fwd[-1])), self.logits(drop(bwd[-1]))

    def _directions(self, ids: torch.Tensor, lengths: torch.Tensor | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both directions' layer outputs, left to right. With ``lengths`` (B,) a right-padded batch: each row's
        backward LM starts at its own last token (the padding is reversed in place, after it)."""
        if self.backward_layers is None:
            raise LlmlabError("this recurrent LM is forward only: build it with bidirectional=True for ELMo")
        x = F.dropout(self.embed_tokens(ids), self.dropout, self.training)  # (B, T, dim)
        fwd, _ = self._stack(self.forward_layers, x, None)
        T = ids.shape[1]
        steps = torch.arange(T, device=ids.device)
        if lengths is None:
            rev = steps.flip(0).expand(ids.shape[0], T)  # (B, T)
        else:  # rev[b, t] = len_b - 1 - t inside the row, t on the padding: its own inverse
            lengths = lengths.to(ids.device)[:, None]
            rev = torch.where(steps < lengths, lengths - 1 - steps, steps)
        index = rev[:, :, None].expand(-1, -1, x.shape[-1])  # (B, T, dim)
        bwd, _ = self._stack(self.backward_layers, x.gather(1, index), None)  # right to left
        return fwd, [h.gather(1, index) for h in bwd]  # back in left-to-right order: position t has read w_t..w_T

    def layer_states(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> (L+1, B, T, D*dim): ELMo's h_{k,j}, layer 0 the token embedding (twice when bidirectional,
        [x; x] as in the paper), layer j both directions' outputs concatenated. ``lengths`` (B,): a right-padded
        batch (the states past a row's length are not meaningful)."""
        x = self.embed_tokens(ids)
        if self.backward_layers is None:
            outs, _ = self._stack(self.forward_layers, x, None)
            return torch.stack([x, *outs])
        fwd, bwd = self._directions(ids, lengths)
        return torch.stack([torch.cat([x, x], -1), *(torch.cat(pair, -1) for pair in zip(fwd, bwd))])


class ScalarMix(nn.Module):
    """ELMo's eq. 1: gamma * sum_j softmax(w)_j h_j over (L+1, ..) layer states. Initialised to the average."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))  # w; s = softmax(w)
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        """(J, ..) -> (..)."""
        if layers.shape[0] != self.weights.numel():
            raise LlmlabError(f"the mix has {self.weights.numel()} weights for {layers.shape[0]} layers")
        s = torch.softmax(self.weights.to(layers.dtype), 0)  # (J,)
        return self.gamma.to(layers.dtype) * torch.tensordot(s, layers, dims=1)
