"""Files <-> models and tokenizers: GGUF, Hugging Face folders (safetensors + config.json)."""
