"""Shared fixtures: the two embedded real models, loaded once per session, and peer-import helpers.

Parity tests skip with a message when a peer is missing; CI installs the test extra so they run.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def need(module: str):
    """Import a peer library or skip the test, saying which one is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"peer {module!r} is not installed (pip install -e '.[test]')")
    return importlib.import_module(module)


def _embedded(name: str):
    from llmlab.common import LlmlabError
    from llmlab.formats.load import embedded_path

    try:
        return embedded_path(name)
    except LlmlabError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm_path():
    return _embedded("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm_path():
    return _embedded("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from llmlab.api import load

    return load(smollm_path)


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from llmlab.api import load

    return load(minilm_path)
