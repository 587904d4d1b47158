"""The command line loads only what a command needs: ``llmlab --help`` imports neither torch nor the
training stack, and a decoding command's help does not import the training stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
from llmlab.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def _imported(argv: list[str]) -> tuple[set[str], str]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    *help_lines, modules = done.stdout.strip().splitlines()
    return set(json.loads(modules)), "\n".join(help_lines)


def test_top_level_help_imports_no_torch_and_no_training_stack():
    mods, text = _imported(["--help"])
    assert "pretrain" in text and "generate" in text  # the help itself is complete
    assert "torch" not in mods
    assert not any(m.startswith(("llmlab.train", "llmlab.data", "torch.distributed")) for m in mods)


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_decoding_help_does_not_import_the_training_stack(command):
    mods, text = _imported([command, "--help"])
    assert "--packed" in text and "--fast" not in text  # one name; --fast survives only as a hidden alias
    assert not any(m.startswith(("llmlab.train", "torch.distributed.fsdp")) for m in mods)


def test_pretrain_help_lists_every_config_flag():
    mods, text = _imported(["pretrain", "--help"])
    assert "llmlab.train.loop" in mods
    for flag in ("--steps", "--activation-checkpointing", "--dim", "--data", "--on-nan"):
        assert flag in text


def test_fast_is_a_hidden_alias_of_packed():
    from llmlab.cli import build_parser

    parse = build_parser({"generate"}).parse_args
    assert parse(["generate", "x"]).packed is True
    assert parse(["generate", "x", "--no-packed"]).packed is False
    assert parse(["generate", "x", "--no-fast"]).packed is False
    assert parse(["info", "--fast"]).packed is True
