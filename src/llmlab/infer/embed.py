"""Sentence embeddings from an encoder: texts -> padded token ids -> pooled, normalised vectors, and Matryoshka
truncation at query time.

Pooling (``models/bert.pool``): the mean of the token states over the attention mask (Sentence-BERT, Reimers &
Gurevych 2019, arXiv:1908.10084) or the [CLS] state. A Matryoshka-trained model (Kusupati et al. 2022, "Matryoshka
Representation Learning", arXiv:2205.13147) front-loads information, so its first ``dim`` coordinates,
re-normalised, are a smaller embedding on their own (``truncate``); any model can be truncated, the question is
how much it loses (README, Embeddings and retrieval).

Shapes: texts (N,) -> ids, mask (B, T) -> embeddings (N, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.common import LlmlabError
from llmlab.nn.autocast import autocast, cpu_has_native

MAX_TOKENS = 64  # tokens per text, [CLS] and [SEP] included (most queries and docstrings are shorter)
PRECISIONS = ("auto", "float32", "bfloat16")


def check_texts(texts: list[str], what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise LlmlabError(f"{what} {i + 1} is empty: give every {what} some text")


def encode_rows(tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Texts -> token ids with [CLS] and [SEP]; a longer text keeps its first ``max_tokens - 1`` tokens and its
    final [SEP]."""
    rows = [tokenizer.encode(t, add_special=True) for t in texts]
    return [r[:max_tokens - 1] + [r[-1]] if len(r) > max_tokens else r for r in rows]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (ids, attention mask), both (B, T) with T the longest row."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = 1
    return ids, mask


def tokenize_batch(tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids, attention mask), both (B, T) with T the longest (``encode_rows``, ``pad_rows``)."""
    return pad_rows(encode_rows(tokenizer, texts, max_tokens), tokenizer.pad_id)


def embed_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` -> the dtype the encoder's matrix products run in: ``auto`` is bfloat16 on a CPU with bf16
    matmul units (AVX512-BF16, AMX: 2.3x an fp32 GEMM on this project's AVX-512 machine, cosine to the fp32
    embeddings >= 0.99997 for all-MiniLM-L6-v2, README), float32 anywhere else (AVX2-only CPUs run bf16 slower
    than fp32; GPUs keep the model's own dtype)."""
    if precision not in PRECISIONS:
        raise LlmlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        native = device.type == "cpu" and cpu_has_native(torch.bfloat16)
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def embed_batch(model: nn.Module, tokenizer, texts: list[str], *, pooling: str = "mean", normalize: bool = True,
                max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """One batch of texts -> (B, dim) embeddings, with autograd (the training path)."""
    ids, mask = tokenize_batch(tokenizer, texts, max_tokens)
    device = next(model.parameters()).device
    return model.embed(ids.to(device), mask.to(device), normalize=normalize, pooling=pooling)


@torch.inference_mode()
def embed_texts(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, pooling: str = "mean",
                normalize: bool = True, max_tokens: int = MAX_TOKENS, precision: str = "float32") -> torch.Tensor:
    """All ``texts`` -> (N, dim) float32 embeddings on the CPU, returned in the order given. The texts are
    tokenized first and embedded most tokens first, so a batch pads at most to its own longest row (sorting by
    characters, as sentence-transformers does, pads more); a batch without padding runs attention without a mask.
    ``precision``: float32, bfloat16 (autocast: matrix products in bf16, layer norms and softmax in fp32) or auto
    (``embed_dtype``)."""
    rows = encode_rows(tokenizer, texts, max_tokens)
    order = sorted(range(len(texts)), key=lambda i: -len(rows[i]))
    device = next(model.parameters()).device
    out = torch.empty(0)
    with autocast(device, embed_dtype(precision, device)):
        for i in range(0, len(texts), batch_size):
            part = order[i:i + batch_size]
            ids, mask = pad_rows([rows[j] for j in part], tokenizer.pad_id)
            emb = model.embed(ids.to(device), mask.to(device), normalize=normalize, pooling=pooling).float().cpu()
            if out.numel() == 0:
                out = torch.empty(len(texts), emb.shape[1])
            out[part] = emb
    return out


def check_dim(dim: int, full: int, flag: str = "--dims") -> None:
    if not 0 < dim <= full:
        raise LlmlabError(f"{flag}: dimension {dim} is not in 1..{full} (the model's embedding size): give "
                          f"positive sizes up to {full}")


def parse_dims(text: str, full: int, flag: str = "--dims") -> list[int]:
    """"384,64" -> [384, 64]: each in 1..full (the model's size), largest first, each once."""
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise LlmlabError(f"{flag} {text!r}: give comma-separated integers, e.g. 384,128,64") from None
    if not dims:
        raise LlmlabError(f"{flag} {text!r}: give at least one size, e.g. 384,128,64")
    for d in dims:
        check_dim(d, full, flag)
    return sorted(set(dims), reverse=True)


def truncate(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, D) -> (N, dim): the first ``dim`` coordinates, L2-normalised again (sentence-transformers'
    ``truncate_dim`` followed by cosine similarity)."""
    check_dim(dim, emb.shape[-1])
    return F.normalize(emb[..., :dim], p=2, dim=-1)
