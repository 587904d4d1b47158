"""Typed configs: dataclass <-> JSON dict, and dataclass -> argparse flags (one small helper).

Every flag's help text comes from the dataclass field's ``metadata["help"]`` and shows its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from llmlab.common import LlmlabError

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
    from llmlab.common import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag-name`` per dataclass field, with its default shown in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {default})"
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
