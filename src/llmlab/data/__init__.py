"""Data: corpora, token shards, masking for pretraining."""
