"""Torch-only building blocks, one technique per file."""
