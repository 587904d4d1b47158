"""``llmlab <command>``: parse flags, call one function. Expected errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmlab import __version__
from llmlab.common import LlmlabError

MODEL_HELP = ("a .gguf file, a Hugging Face folder, a preset (random weights), or an embedded model "
              "(smollm2-135m-instruct, all-minilm-l6-v2) (default: smollm2-135m-instruct)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2 (argparse's own convention)
        print(f"llmlab: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")


def cmd_info(args) -> int:
    from llmlab.api import load

    info = load(args.model, dtype=args.dtype, device=args.device).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_generate(args) -> int:
    from llmlab.api import load

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if args.max_new_tokens < 1:
        raise LlmlabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    llm = load(args.model, dtype=args.dtype, device=args.device)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    text = llm.generate(prompt, args.max_new_tokens, raw=args.raw, on_text=write if args.stream else None)
    if not args.stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return 0


def cmd_convert(args) -> int:
    from llmlab.formats.convert import convert

    convert(args.source, Path(args.output), dtype=args.dtype, qtype=args.qtype, force=args.force)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmlab", description="The LLM storyline as one readable, fast, tested PyTorch codebase.")
    p.add_argument("--version", action="version", version=f"llmlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="describe a model: architecture, size, tokenizer, template")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")
    _add_load_flags(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="greedy-decode a continuation of a prompt; prints only the new text")
    s.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or nothing reads standard input")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    s.add_argument("--raw", action="store_true",
                   help="use the prompt as is instead of wrapping it in the chat template (default: off)")
    s.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are generated (default: on)")
    _add_load_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("convert", help="convert between GGUF and Hugging Face folders")
    s.add_argument("source", help="input: .gguf file, Hugging Face folder or embedded model name")
    s.add_argument("output", help="output: a path ending in .gguf writes GGUF, anything else a HF folder")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of a Hugging Face output folder (default: float32)")
    s.add_argument("--qtype", default="F16", choices=["F32", "F16", "BF16", "Q8_0"],
                   help="type of 2-D weights in a GGUF output (default: F16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LlmlabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
