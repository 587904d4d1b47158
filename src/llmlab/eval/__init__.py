"""Evaluation: perplexity (``perplexity``); the harness, tasks and plots grow here."""
