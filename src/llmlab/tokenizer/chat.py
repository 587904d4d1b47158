"""Chat templates: render a model's own Jinja template exactly like transformers'
``apply_chat_template`` (same Jinja settings, globals and filters), safely.

A template inside a downloaded model file is untrusted input: CVE-2024-34359 ("Llama Drama") was
server-side template injection through GGUF metadata in llama-cpp-python, which rendered it with a
plain ``jinja2.Environment``. We use Jinja's ``ImmutableSandboxedEnvironment`` (no dunder access,
no mutation of passed-in objects), bound the size of string/list products, and bound the render
time by tracing the compiled template's lines against a deadline.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.common import LlmlabError

MAX_OUTPUT_CHARS = 4_000_000


class TemplateTimeout(Exception):
    pass


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides Jinja's tojson, which would HTML-escape "<" and ">".
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _BoundedEnv(ImmutableSandboxedEnvironment):
    """Sandbox that also refuses to build huge strings/lists with ``*`` and ``**``."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("exponent too large in chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise jinja2.exceptions.SecurityError("chat template builds an over-long sequence")
        return super().call_binop(context, operator, left, right)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, timeout_s: float = 2.0,
                 where: str = ""):
        """``where``: the file the template came from, named in every error (``model.gguf: chat template ...``)."""
        if not isinstance(source, str):
            raise LlmlabError(f"{where or 'chat template'}: the chat template is a {type(source).__name__}, "
                              "not a string")
        env = _BoundedEnv(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["namespace"] = _Namespace
        self.source = source
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as transformers passes
        self.timeout_s = timeout_s
        self.where = f"{where}: " if where else ""
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            message = " ".join(str(e.message).split())  # one line: Jinja's messages can hold newlines
            raise LlmlabError(f"{self.where}chat template does not parse (line {e.lineno}): {message}") from None
        except (RecursionError, MemoryError, ValueError, OverflowError) as e:  # e.g. absurdly nested expressions
            raise LlmlabError(f"{self.where}chat template cannot be compiled: {type(e).__name__}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Messages -> prompt text. Raises LlmlabError for a failing, hostile or slow template."""
        variables = {**self.special_tokens, **kwargs, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        deadline = time.monotonic() + self.timeout_s
        code = self.template.root_render_func.__code__
        filename = code.co_filename

        def tracer(frame, event, arg):
            # Only frames of the compiled template are traced line by line; a loop that runs past the
            # deadline raises inside the template's own frame.
            if frame.f_code.co_filename != filename:
                return None
            if time.monotonic() > deadline:
                raise TemplateTimeout()
            return tracer

        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            out = self.template.render(**variables)
        except TemplateTimeout:
            raise LlmlabError(f"{self.where}chat template took longer than {self.timeout_s:g}s to render: "
                              "refusing it") from None
        except jinja2.exceptions.SecurityError as e:
            raise LlmlabError(f"{self.where}chat template refused by the sandbox: {_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise LlmlabError(f"{self.where}chat template error: {_line(e)}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError,
                MemoryError) as e:
            # Python errors raised inside the template's own expressions ('a' + 1, x[99], 1 / 0, deep macros).
            raise LlmlabError(f"{self.where}chat template failed: {type(e).__name__}: {_line(e)}") from None
        finally:
            sys.settrace(previous)
        if len(out) > MAX_OUTPUT_CHARS:
            raise LlmlabError(f"{self.where}chat template produced an over-long prompt: refusing it")
        return out


def _line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


# ChatML, the fallback for models that ship no template (the format SmolLM2 uses).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
