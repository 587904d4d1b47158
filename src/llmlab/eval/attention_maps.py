"""Attention maps per layer and head, whichever path the model's attention runs.

The fast paths (SDPA, the tiled flash attention, the packed decode kernels) never form the (T, S) matrix of
attention probabilities, so it is recomputed here for the requested layers only: a forward pre-hook on each
requested ``self_attn`` takes the layer's input and its rotary tables, and forms

    A = softmax(q k^T / sqrt(d) + mask),   q = rope(x W_q), k = rope(x W_k)

with the layer's own projections (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762), the
causal and padding mask of ``nn/attention.build_mask``, and each grouped key/value head shared by its query
heads (GQA). The model's own forward runs unchanged, so the maps belong to exactly the activations it
computes. Tested equal to transformers' ``output_attentions`` (eager attention) on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmlab.common import LlmlabError, save_png
from llmlab.nn.attention import Attention, attention_scores, build_mask


def attention_probs(attn: Attention, x: torch.Tensor, rope=None, key_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The probabilities ``attn`` applies to its input x (B, T, dim), no KV cache: (B, H, T, T), float32."""
    T = x.shape[1]
    scores = attention_scores(attn, x, rope)  # (B, H, T, T)
    mask = build_mask(T, T, 0, attn.causal, key_mask, x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def check_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """Requested layer indices (negative counts from the end); None = every layer."""
    if layers is None:
        return list(range(n_layers))
    out = []
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise LlmlabError(f"layer {i} is out of range: the model has {n_layers} layers (0..{n_layers - 1}, "
                              "or negative from the end)")
        out.append(i % n_layers)
    return sorted(set(out))


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor, layers: list[int] | None = None,
                   attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{layer: (B, H, T, T) attention probabilities} for a decoder (``DecoderLM``) or encoder (``BertModel``)
    forward over input_ids (B, T); ``attention_mask`` (B, T) marks real tokens."""
    blocks = getattr(model, "layers", None)
    if blocks is None or not all(isinstance(getattr(b, "self_attn", None), Attention) for b in blocks):
        raise LlmlabError(f"{type(model).__name__} has no llmlab attention layers to read maps from")
    maps: dict[int, torch.Tensor] = {}

    def recorder(i: int):
        def hook(module, args, kwargs):
            maps[i] = attention_probs(module, args[0], kwargs.get("rope"), kwargs.get("key_mask"))
        return hook

    handles = [blocks[i].self_attn.register_forward_pre_hook(recorder(i), with_kwargs=True)
               for i in check_layers(layers, len(blocks))]
    try:
        model(input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return maps


def plot_attention(maps: dict[int, torch.Tensor], tokens: list[str], path: Path, heads: list[int] | None = None,
                   title: str = "") -> Path:
    """One panel per (layer, head) of the first sequence: rows are layers, columns heads; token labels on
    the axes when there are at most 24 tokens. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(maps)
    n_heads = next(iter(maps.values())).shape[1]
    heads = list(range(n_heads)) if heads is None else heads
    for h in heads:
        if not 0 <= h < n_heads:
            raise LlmlabError(f"head {h} is out of range: the layers have {n_heads} heads (0..{n_heads - 1})")
    T = len(tokens)
    side = 1.6 if T > 24 else 2.4
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(side * len(heads) + 1, side * len(layers) + 0.6),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for c, h in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[layer][0, h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if T <= 24 and r == len(layers) - 1:
                ax.set_xticks(range(T), tokens, rotation=90, fontsize=6)
            if T <= 24 and c == 0:
                ax.set_yticks(range(T), tokens, fontsize=6)
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path
