"""A tied embedding / output-head matrix whose two gradients meet in place.

Weight tying (Press & Wolf 2017, "Using the Output Embedding to Improve Language Models", arXiv:1608.05859)
uses one matrix W (V, D) twice: the lookup x_t = W[id_t] at the model's start and the head logits = h W^T at
its end. Its gradient is the sum of both uses,

    dL/dW = G_head + sum_t onehot(id_t) g_t^T        (G_head (V, D); g_t = dL/dx_t (D,))

where the second term touches only the rows of the tokens in the batch. Autograd forms it as two dense (V, D)
tensors: the head's backward runs first (the head is the graph's last node) and its G_head waits in W's
accumulator; the lookup's backward, the very last, builds its own zero-filled (V, D) scatter of the g_t, and
only then are the two added. For SmolLM2-135M (V = 49152, D = 576, float32) that is 113 MB more at the end of
backward, just to hold a few hundred non-zero rows (``nn.Embedding(sparse=True)`` does not help: autograd adds
a sparse gradient that arrives after a dense one out of place, into a new (V, D) tensor).

Here one node does the lookup and hands out the head's weight: ``x, w = tied_lookup(W, ids)`` returns the
embeddings (..., D) and ``w``, a view of W that the head uses in W's place. Autograd then calls this node's
backward once, with both gradients: G_head (the sum over every use of ``w``) and the g_t (..., D). It sums the
g_t per distinct token (U, D) and adds them into G_head's rows in place (``index_add_``); that tensor is W's
gradient. No second (V, D) tensor exists. The sum per token runs over the occurrences in order from zero and
is then added to G_head, as the dense lookup gradient is built and then added, so the result has the same bits
as autograd's (tested).

G_head is written in place only when autograd handed it over alone: contiguous, not part of a graph
(``create_graph``), its tensor and its memory referenced nowhere else (the test ``input_buffer.cpp``'s
``can_accumulate_inplace`` makes before autograd adds in place). Otherwise, e.g. when the head's backward
returned a transposed view (``F.linear``'s weight gradient), or a tensor it also keeps saved (``retain_graph``),
the rows are added out of place: one (V, D) tensor more, still one fewer than autograd's way. When the head did
not use ``w`` (a caller that reads ``lm_head.weight`` itself), W's gradient arrives through W directly and this
node forms the lookup's dense gradient as ``nn.Embedding`` would: the same result, no saving.

Outside autograd (no gradient wanted, a frozen table under LoRA) and under ``torch.compile`` (Inductor plans
the backward's memory itself), ``tied_lookup`` is the plain lookup and returns W itself.

    x, head_weight = tied_lookup(model.embed_tokens.weight, input_ids)   # (B, T, D), (V, D)
    ...
    logits = F.linear(h, head_weight)                                   # or linear_cross_entropy(h, head_weight, y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _owned(t: torch.Tensor) -> bool:
    """True when nothing but the caller references ``t`` and its memory, so writing into it is unseen (False
    where this torch cannot say: the rows are then added out of place)."""
    tensor_refs, storage_refs = getattr(t, "_use_count", None), getattr(torch._C, "_storage_Use_Count", None)
    if tensor_refs is None or storage_refs is None:
        return False
    # references to the tensor; to its memory, + 1 for the storage object asked
    return (t.is_contiguous() and not t.requires_grad and tensor_refs() == 1
            and storage_refs(t.untyped_storage()._cdata) == 2)


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids):
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return F.embedding(ids, weight), weight.view_as(weight)  # (..., D), (V, D): the head's W

    @staticmethod
    def backward(ctx, grad_x, grad_head):  # (..., D) or None, (V, D) or None
        (ids,) = ctx.saved_tensors
        if grad_x is None:
            return grad_head, None
        D = grad_x.shape[-1]
        tokens, where = torch.unique(ids.reshape(-1), return_inverse=True)  # (U,), (n,)
        rows = grad_x.new_zeros(len(tokens), D).index_add_(0, where, grad_x.reshape(-1, D))  # (U, D)
        if grad_head is None:  # the head did not use the returned weight: the lookup's gradient alone
            grad_head = grad_x.new_zeros(ctx.rows, D)  # (V, D)
        elif not _owned(grad_head):
            return grad_head.index_add(0, tokens, rows), None  # out of place: (V, D) more
        return grad_head.index_add_(0, tokens, rows), None  # (V, D): the head's and the lookup's, in place


def tied_lookup(weight: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (V, D), ids (...) int64 -> (weight[ids] (..., D), the weight for the head (V, D)); under autograd
    the head's weight is a view whose gradient and the lookup's are added in place (module docstring)."""
    if not (weight.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return F.embedding(ids, weight), weight
    return _TiedLookup.apply(weight, ids)
