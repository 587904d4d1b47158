"""Dataclasses in and out: dataclass <-> JSON dict, and dataclass -> argparse flags -> dataclass.

The configs themselves (``ModelConfig`` in ``models/config.py``, ``TrainConfig``, ``SamplingParams``, ...)
live next to the code they configure; this module only moves any of them to and from JSON and the CLI.

Every flag's help text comes from the dataclass field's ``metadata["help"]`` and shows its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from llmlab.common import LlmlabError, write_text_atomic

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any], *, strict: bool = True) -> T:
    """Build ``cls`` from a dict; unknown keys are an error when ``strict``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown and strict:
        raise LlmlabError(f"unknown {cls.__name__} keys {unknown}: remove them or fix the spelling")
    return cls(**{k: v for k, v in data.items() if k in names})


def save_json(cfg: Any, path) -> None:
    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
              unset: dict[str, str] | None = None) -> None:
    """Add one ``--flag-name`` per dataclass field, with its default shown in --help. Fields named in
    ``unset`` default to None instead (the caller resolves them), their help saying what that means."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if unset and f.name in unset:
            default, help_text = None, f.metadata.get("help", "") + f" (default: {unset[f.name]})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kwargs: dict[str, Any] = {"default": default, "help": help_text, "dest": f.name}
            if tp in (int, float, str):
                kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})
