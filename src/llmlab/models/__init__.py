"""Architectures: a pre-norm decoder (Llama, GPT-2 families), a post-norm BERT encoder and the T5 encoder-decoder."""

from llmlab.models.config import ModelConfig
from llmlab.models.registry import PRESETS, build_model, get_preset

__all__ = ["ModelConfig", "PRESETS", "build_model", "get_preset"]
