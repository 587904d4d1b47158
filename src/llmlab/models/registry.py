"""Named presets -> ModelConfig, and ModelConfig -> an initialised model."""

from __future__ import annotations

import contextlib
import copy

from torch import nn

from llmlab.common import LlmlabError
from llmlab.models.bert import BertModel
from llmlab.models.config import ModelConfig
from llmlab.models.decoder import DecoderLM
from llmlab.models.t5 import T5Model

PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the default chat model.
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                ffn_dim=1536, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0,
                                tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "smollm2-360m": ModelConfig(arch="llama", vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                                ffn_dim=2560, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0),
    # A small student for distilling SmolLM2 (llmlab distill): its vocabulary and special ids, 4 blocks x 256.
    "smollm2-tiny": ModelConfig(arch="llama", vocab_size=49152, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                ffn_dim=768, max_seq_len=2048, norm_eps=1e-5, rope_theta=100000.0,
                                tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-tiny": ModelConfig(arch="llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              ffn_dim=172, max_seq_len=256),
    # OpenAI GPT-2 small (124M).
    "gpt2": ModelConfig(arch="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, ffn_dim=3072,
                        max_seq_len=1024, norm_eps=1e-5, attn_bias=True, mlp_bias=True, tie_embeddings=True,
                        bos_token_id=50256, eos_token_id=50256),
    "gpt2-tiny": ModelConfig(arch="gpt2", vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=256,
                             max_seq_len=256, attn_bias=True, mlp_bias=True),
    # sentence-transformers/all-MiniLM-L6-v2: the default embedding model.
    "minilm-l6": ModelConfig(arch="bert", vocab_size=30522, dim=384, n_layers=6, n_heads=12, ffn_dim=1536,
                             max_seq_len=512, norm_eps=1e-12, attn_bias=True, mlp_bias=True, type_vocab_size=2,
                             pad_token_id=0, tie_embeddings=False),
    "bert-tiny": ModelConfig(arch="bert", vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=256,
                             max_seq_len=128, norm_eps=1e-12, attn_bias=True, mlp_bias=True, tie_embeddings=False),
    # A tiny T5 v1.0 (ReLU feed-forward, tied head) for tests and the CPU demos of ``llmlab t5``.
    "t5-tiny": ModelConfig(arch="t5", vocab_size=512, dim=64, n_layers=2, n_heads=4, head_dim=16, ffn_dim=256,
                           max_seq_len=512, norm_eps=1e-6, tie_embeddings=True, ffn_act="relu", pad_token_id=0,
                           eos_token_id=1),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LlmlabError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_init():
    """Make ``torch.nn.init`` fills no-ops while a model is built only to receive loaded weights.

    Random initialisation of 135M parameters is wasted work (~0.5 s) when every tensor is replaced at
    once; building on the meta device instead costs more (it imports torch._dynamo, ~1 s).
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FNS}
    try:
        for name in _INIT_FNS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cfg: ModelConfig, attn_impl: str = "sdpa") -> nn.Module:
    """A randomly initialised model for ``cfg`` (load weights afterwards)."""
    cfg.validate()
    if cfg.arch == "bert":
        return BertModel(cfg, attn_impl)
    if cfg.arch == "t5":
        return T5Model(cfg, attn_impl)
    return DecoderLM(cfg, attn_impl)
