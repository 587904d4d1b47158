"""MkDocs hook for the learning path (``mkdocs.yml``): pages show the code that implements a technique by naming
it, never by copying it, so a page cannot drift from the module it describes.

A line of the form

    <!-- code: src/llmlab/nn/rope.py apply_rope -->

is replaced by the source of that top-level function or class (``Class.method`` for a method), found with
``ast`` (decorators included), in a fenced Python block captioned with its path and line numbers. A missing
file or name stops the build (``PluginError``), which ``mkdocs build --strict`` in the tests turns red.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^<!-- code: (?P<path>\S+) (?P<name>[A-Za-z_][\w.]*) -->$", re.MULTILINE)


def find_definition(tree: ast.Module, name: str) -> ast.AST | None:
    """The top-level function / class ``name`` of ``tree``, or ``Class.method``."""
    nodes: list[ast.AST] = list(tree.body)
    found = None
    for part in name.split("."):
        found = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.name == part), None)
        if found is None:
            return None
        nodes = list(getattr(found, "body", []))
    return found


def code_block(path: str, name: str, root: Path = ROOT) -> str:
    """The Markdown for one ``<!-- code: PATH NAME -->`` directive."""
    file = root / path
    if not file.is_file():
        raise PluginError(f"code directive: no file {path} (paths are relative to the repository root)")
    source = file.read_text(encoding="utf-8")
    node = find_definition(ast.parse(source), name)
    if node is None:
        raise PluginError(f"code directive: {path} defines no top-level {name!r}")
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = source.splitlines()[first - 1:node.end_lineno]
    return (f"`{path}`, lines {first}–{node.end_lineno}:\n\n```python\n" + "\n".join(lines) + "\n```")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    return DIRECTIVE.sub(lambda m: code_block(m["path"], m["name"]), markdown)
