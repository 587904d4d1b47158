"""The setup the results tables share (quant_table.py, prune_table.py, lowrank_table.py): SmolLM2-135M-Instruct,
the fixed held-out text as token ids with its byte count (for bits per byte), the calibration windows, and one
header line saying where the table was measured; and the ``--model`` flag of the benchmarks that run on any model
(quant_table.py, quant_decode.py, quantize.py, int8r_cost.py, finetune.py, dpo.py: SmolLM2-135M-Instruct by default)."""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.common import LlmlabError
from llmlab.compress.calibrate import calibration_text, heldout_text, token_windows
from llmlab.formats.load import Loaded, is_model_name, load_model
from llmlab.nn.cpu_kernels import speed_flags


@dataclass
class Harness:
    base: Loaded  # SmolLM2-135M-Instruct as loaded for quality work (float weights)
    ids: torch.Tensor  # (ppl_tokens,) held-out token ids
    n_bytes: int  # UTF-8 bytes of the whole windows of ids
    windows: list  # calibration windows
    flags: str  # the CPU flags a speed figure depends on


def add_model_flag(parser: argparse.ArgumentParser) -> None:
    """``--model``: the model a benchmark runs on, for the scripts that take any (model_name, table_harness)."""
    parser.add_argument("--model", default=None, type=model_source,
                        help="a GGUF file or model folder (default: the embedded SmolLM2-135M-Instruct)")


def model_source(value: str) -> str:
    """The ``--model`` type: an existing path or a name ``load_model`` knows; anything else is a usage error (exit 2)
    before a minute of work starts."""
    if is_model_name(value) or Path(value).expanduser().exists():
        return value
    raise argparse.ArgumentTypeError(f"{value}: no such file or folder (give a GGUF file or a model folder, or leave "
                                     "--model out for the embedded SmolLM2-135M-Instruct)")


def load_checked(parser: argparse.ArgumentParser, source: str | None, loader=load_model, **kw) -> Loaded:
    """The first load of ``--model``: a file that exists but is no model (truncated, not a GGUF, a folder without
    weights) becomes a one-line usage error (exit 2), not a traceback."""
    try:
        return loader(source, **kw)
    except LlmlabError as e:
        parser.error(f"--model: {e}")


def model_name(source: str | None) -> str:
    """The model a table was measured on, for its header: the embedded SmolLM2 (``source`` None) or the path's name."""
    return "SmolLM2-135M-Instruct" if source is None else Path(source).name


def table_harness(ppl_tokens: int, window: int, calib_samples: int, calib_len: int,
                  model: str | None = None, parser: argparse.ArgumentParser | None = None) -> Harness:
    """Load the model (``model``: a GGUF file or folder; None: the embedded SmolLM2-135M-Instruct), cut the held-out
    and calibration text, and print the header line. With ``parser``, a broken model file is a usage error."""
    base = load_model(model) if parser is None else load_checked(parser, model)
    tok = base.tokenizer
    ids = torch.tensor(tok.encode(heldout_text())[:ppl_tokens])
    n_bytes = len(tok.decode(ids[: len(ids) // window * window].tolist()).encode())
    windows = token_windows(tok, calibration_text("builtin"), calib_samples, calib_len, seed=0)
    flags = speed_flags()
    print(f"{model_name(model)}; {len(ids)} held-out tokens in windows of {window}; calibration "
          f"{calib_samples} x {calib_len}; Python {platform.python_version()}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; CPU flags: {flags}", flush=True)
    return Harness(base, ids, n_bytes, windows, flags)
