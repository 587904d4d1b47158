"""``llmlab <command>``: parse flags, call one function. Expected errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmlab import __version__

MODEL_HELP = ("a .gguf file, a Hugging Face folder, an sft run or adapter folder (base + adapter), a preset "
              "(random weights), or an embedded model (smollm2-135m-instruct, all-minilm-l6-v2) "
              "(default: smollm2-135m-instruct)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2 (argparse's own convention)
        print(f"llmlab: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _add_load_flags(p: argparse.ArgumentParser, packed_default: bool = False) -> None:
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=packed_default,
                   help="CPU decode on packed GGML weights (the GGUF's Q8_0/Q4_0/Q4_1 blocks; Q8_0 for other "
                        "models); --no-packed runs the float32 reference path "
                        f"(default: {'on' if packed_default else 'off'})")
    # Deprecated spellings of --packed / --no-packed (llmlab 0.1 called it --fast); hidden from --help.
    p.add_argument("--fast", dest="packed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-fast", dest="packed", action="store_false", help=argparse.SUPPRESS)


def _add_decode_flags(p: argparse.ArgumentParser, default_max: int, chat: bool = False) -> None:
    from llmlab.dataclass_io import add_flags
    from llmlab.infer.sample import CHAT_DEFAULTS, SamplingParams

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--max-new-tokens", type=int, default=default_max,
                   help=f"most tokens to generate (default: {default_max})")
    if chat:
        # A chat samples by default: the model file's recommended settings, else CHAT_DEFAULTS.
        recommended = {name: f"the model file's recommendation, else {CHAT_DEFAULTS.get(name, 'off')}"
                       for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        add_flags(p, SamplingParams, unset=recommended)
        p.add_argument("--greedy", action="store_true",
                       help="deterministic greedy decoding instead of sampling; the sampling flags still apply "
                            "(default: off)")
        p.add_argument("--repetition-guard", action=argparse.BooleanOptionalAction, default=True,
                       help="end a reply that keeps repeating one phrase, and say so (default: on)")
    else:
        add_flags(p, SamplingParams)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears; repeat for several (default: none)")
    p.add_argument("--beams", type=int, default=1, help="beam search width; 1 = off (default: 1)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = logprob / length**this (default: 1.0)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="beam search never repeats an n-gram of this size; 0 = off (default: 0)")
    p.add_argument("--speculative", default=None, metavar="DRAFT",
                   help="speculative decoding with 'ngram' (prompt lookup), 'layer-skip', or a draft model path "
                        "sharing the tokenizer (default: off)")
    p.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per speculative step (default: 4)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at end-of-sequence tokens, e.g. for benchmarks (default: off)")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the context instead of failing (default: off)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are generated (default: on)")


def _device(args) -> str:
    # --packed is a CPU path: with the default --packed, an explicit GPU device turns it off.
    if args.packed and args.device != "cpu":
        args.packed = False
    return args.device


def cmd_info(args) -> int:
    from llmlab.api import load
    from llmlab.nn.packed_linear import kernel_status

    info = load(args.model, dtype=args.dtype, device=_device(args), packed=args.packed).info()
    info["packed_kernel"] = kernel_status()  # which C kernel runs packed linears here, or why none does
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _sampling(args):
    from llmlab.dataclass_io import from_args
    from llmlab.infer.sample import SamplingParams

    return from_args(SamplingParams, args).validate()


def _decode_kwargs(args, sampling=None) -> dict:
    return dict(sampling=sampling or _sampling(args), stop=args.stop or None, beams=args.beams,
                length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                speculative=args.speculative, draft_tokens=args.draft_tokens, ignore_eos=args.ignore_eos,
                truncate=args.truncate)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    from llmlab.api import load
    from llmlab.common import LlmlabError

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if args.max_new_tokens < 1:
        raise LlmlabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    kwargs = _decode_kwargs(args)
    llm = load(args.model, dtype=args.dtype, device=_device(args), packed=args.packed)
    stream = args.stream and args.beams == 1
    text = llm.generate(prompt, args.max_new_tokens, raw=args.raw, on_text=_write if stream else None, **kwargs)
    if not stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    if args.speculative and llm.last_spec_stats is not None:
        st = llm.last_spec_stats
        print(f"speculative: {st.accepted}/{st.drafted} draft tokens accepted ({st.acceptance_rate:.0%}), "
              f"{st.target_calls} target forward passes", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from dataclasses import fields

    from llmlab.api import load
    from llmlab.infer.chat_session import ChatSession
    from llmlab.infer.repetition import RepetitionGuard
    from llmlab.infer.sample import SamplingParams

    llm = load(args.model, dtype=args.dtype, device=_device(args), packed=args.packed)
    chosen = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if hasattr(args, f.name)}
    kwargs = _decode_kwargs(args, llm.chat_sampling(greedy=args.greedy, **chosen))
    guard = RepetitionGuard() if args.repetition_guard else None
    session = ChatSession(llm, system=args.system, max_new_tokens=args.max_new_tokens, repetition_guard=guard,
                          **kwargs)
    interactive = sys.stdin.isatty()
    if interactive:
        print("llmlab chat: type a message; /reset clears the history, /system TEXT sets the system prompt, "
              "/exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            session.set_system(line[len("/system"):].strip() or None)
            print("(system prompt set; history cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: use /reset, /system TEXT or /exit", file=sys.stderr)
            continue
        session.send(line, on_text=_write)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.looped:
            print("(reply stopped: it kept repeating one phrase; the repeats are left out of the history. "
                  "Rephrase, or raise --temperature / --repetition-penalty)", file=sys.stderr)
    return 0


def cmd_explore(args) -> int:
    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.infer.explore import explore, write_report

    if args.steps < 1 or args.top < 1 or args.beams < 1:
        raise LlmlabError("--steps, --top and --beams must be >= 1")
    if not args.prompt:
        raise LlmlabError("the prompt is empty: give some text")
    llm = load(args.model, dtype=args.dtype, device=_device(args), packed=args.packed)
    if not llm.config.is_causal:
        raise LlmlabError("explore needs a text-generating model")
    text = args.prompt if args.raw else llm.render_chat(args.prompt)
    ids = llm.encode_prompt(text, args.steps)
    ex = explore(llm.model, llm.tokenizer, ids, args.prompt, steps=args.steps, top=args.top, num_beams=args.beams,
                 stop_ids=llm.stop_ids())
    paths = write_report(ex, Path(args.out))
    for step in ex.steps:
        cands = "  ".join(f"{tok!r}:{p:.2f}" for tok, p in step["candidates"][:4])
        print(cands)
    print(f"wrote {paths['html']}, {paths['steps']}, {paths['beams']}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from llmlab.formats.convert import convert

    convert(args.source, Path(args.output), dtype=args.dtype, qtype=args.qtype, force=args.force)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from llmlab.formats.merge import merge

    out = merge(args.source, args.out, dtype=args.dtype, qtype=args.qtype, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args) -> int:
    from llmlab.common import LlmlabError, write_text_atomic
    from llmlab.data.corpus import default_sources, expand_inputs
    from llmlab.tokenizer import bpe_train

    paths = expand_inputs(args.inputs) if args.inputs else default_sources()
    specials = args.special or ["<|endoftext|>", "<|mask|>", "<|pad|>"]
    bpe_train.check_vocab_size(args.vocab_size, len(specials))
    if args.min_frequency < 1:
        raise LlmlabError("--min-frequency must be >= 1")
    tok, stats = bpe_train.train_files(paths, args.vocab_size, special_tokens=specials,
                                       min_frequency=args.min_frequency,
                                       max_bytes=int(args.max_mb * 1e6) if args.max_mb else None)
    out = Path(args.out)
    bpe_train.write_tokenizer(tok, out)
    if args.hf_json:
        write_text_atomic(args.hf_json, tok.to_hf_json())
    print(f"trained {stats['vocab_size']} tokens ({stats['merges']} merges) on {stats['bytes'] / 1e6:.1f} MB from "
          f"{stats['files']} files ({stats['skipped']} skipped) in {stats['seconds']} s -> {out}", file=sys.stderr)
    return 0


def cmd_data_prepare(args) -> int:
    from llmlab.data.shards import PrepareConfig, prepare
    from llmlab.dataclass_io import from_args

    cfg = from_args(PrepareConfig, args)
    cfg.inputs = list(args.inputs)
    meta = prepare(cfg)
    c = meta["corpus"]
    print(f"{meta['tokens']['train']:,} train tokens ({meta['documents']['train']} documents), "
          f"{meta['tokens']['val']:,} validation tokens ({meta['documents']['val']} documents); "
          f"{meta['duplicates_removed']} duplicates removed, {c['skipped_files']} files skipped "
          f"(binary/non-UTF-8/unreadable), {c['bad_lines']} bad JSONL lines; {meta['bytes_per_token']} bytes/token; "
          f"{meta['seconds']} s -> {cfg.out}", file=sys.stderr)
    for example in c["skipped_examples"]:
        print(f"  skipped: {example}", file=sys.stderr)
    return 0


def cmd_pretrain(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.loop import TrainConfig
    from llmlab.train.pretrain import ModelFlags, PretrainConfig, run_pretrain

    result = run_pretrain(from_args(PretrainConfig, args), from_args(ModelFlags, args), from_args(TrainConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"llmlab: {result.stopped} at step {result.step}{val}; run folder {result.run_dir}", file=sys.stderr)
    return 130 if result.stopped == "interrupted" else 0


def cmd_sft(args) -> int:
    from llmlab.data.sft import SFTDataConfig
    from llmlab.dataclass_io import from_args
    from llmlab.train.sft import SFTConfig, SFTTrainConfig, run_sft

    data = from_args(SFTDataConfig, args)
    data.paths = list(args.paths)
    s = run_sft(from_args(SFTConfig, args), data, from_args(SFTTrainConfig, args))
    if s["accuracy_after"] is not None:
        print(f"{s['task']}: held-out exact match {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy_after']:.1f}%"
              f" ({s['method']}, {s['trainable_params']:,} trainable parameters)")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_scaling(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.dataclass_io import from_args
    from llmlab.train.scaling import ScalingConfig, run_scaling

    cfg = from_args(ScalingConfig, args)
    if cfg.steps < 1 or cfg.evals < 1:
        raise LlmlabError("--steps and --evals must be >= 1")
    summary = run_scaling(cfg)
    fn, fc = summary["fit_loss_vs_params"], summary["fit_loss_vs_compute"]
    for r in summary["runs"]:
        print(f"{r['name']:>10}  N={r['params']:>9,}  val loss {r['final_val_loss']:.4f}  ({r['seconds']:.0f} s)")
    print(f"L(N) = {fn['E']:.3f} + {fn['A']:.4g} * N^-{fn['alpha']:.4f}")
    if fc:
        print(f"L(C) = {fc['E']:.3f} + {fc['A']:.4g} * C^-{fc['alpha']:.4f}")
    print(f"wrote {cfg.out}/scaling.png and scaling.json", file=sys.stderr)
    return 0


def build_parser(commands: set[str] | None = None) -> argparse.ArgumentParser:
    """The command line. ``commands``: the subcommands whose flags are added (None = all of them). ``main``
    passes only the one it runs: flags built from config dataclasses import those modules (torch, the
    training stack), which ``llmlab --help`` and the other commands do not need (tested)."""

    def wanted(name: str) -> bool:
        return commands is None or name in commands

    p = _Parser(prog="llmlab", description="The LLM storyline as one readable, fast, tested PyTorch codebase.")
    p.add_argument("--version", action="version", version=f"llmlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="describe a model: architecture, size, tokenizer, template")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")
    _add_load_flags(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="continue a prompt (greedy by default); prints only the new text")
    s.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or nothing reads standard input")
    s.add_argument("--raw", action="store_true",
                   help="use the prompt as is instead of wrapping it in the chat template (default: off)")
    if wanted("generate"):
        _add_decode_flags(s, default_max=128)
    _add_load_flags(s, packed_default=True)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat with the model's template (reads stdin if piped)")
    s.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    if wanted("chat"):
        _add_decode_flags(s, default_max=512, chat=True)
    _add_load_flags(s, packed_default=True)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("explore", help="picture decoding: top candidates per step and the beam tree (PNG + HTML)")
    s.add_argument("prompt", help="the prompt")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--steps", type=int, default=12, help="decoding steps to show (default: 12)")
    s.add_argument("--top", type=int, default=8, help="candidates shown per step (default: 8)")
    s.add_argument("--beams", type=int, default=3, help="beam width of the beam-search tree (default: 3)")
    s.add_argument("--raw", action="store_true", help="the prompt as is, no chat template (default: off)")
    s.add_argument("--out", default="explore", help="output folder (default: explore)")
    _add_load_flags(s)
    s.set_defaults(func=cmd_explore)

    s = sub.add_parser("convert", help="convert between GGUF and Hugging Face folders")
    s.add_argument("source", help="input: .gguf file, Hugging Face folder or embedded model name")
    s.add_argument("output", help="output: a path ending in .gguf writes GGUF, anything else a HF folder")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of a Hugging Face output folder (default: float32)")
    s.add_argument("--qtype", default="F16", choices=["F32", "F16", "BF16", "Q8_0"],
                   help="type of 2-D weights in a GGUF output (default: F16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("merge", help="fold a LoRA adapter (an sft run folder or adapter folder) into its base "
                                     "and write an HF folder or a GGUF")
    s.add_argument("source", help="an llmlab sft run folder or a PEFT LoRA adapter folder")
    s.add_argument("--out", default=None, help="output: a path ending in .gguf writes GGUF, anything else a "
                                               "HF folder (default: RUN/merged, or ADAPTER-merged beside it)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of a Hugging Face output folder (default: float32)")
    s.add_argument("--qtype", default="F16", choices=["F32", "F16", "BF16", "Q8_0", "Q4_1"],
                   help="type of 2-D weights in a GGUF output (default: F16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer (same merges as Hugging Face tokenizers)")
    t.add_argument("inputs", nargs="*", help="text files, folders or globs (default: the Python standard library)")
    t.add_argument("--out", default="tokenizer.json", help="output file, llmlab format (default: tokenizer.json)")
    t.add_argument("--hf-json", default=None, help="also write a Hugging Face tokenizer.json here (default: none)")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. specials (default: 4096)")
    t.add_argument("--min-frequency", type=int, default=2, help="stop when the best pair is rarer (default: 2)")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token; repeat for several (default: <|endoftext|> <|mask|> <|pad|>)")
    t.add_argument("--max-mb", type=float, default=0.0, help="train on at most this many MB; 0 = all (default: 0)")
    t.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    d = dsub.add_parser("prepare", help="text/JSONL/Parquet -> memory-mapped token shards with a validation split")
    d.add_argument("inputs", nargs="*", help="files, folders, globs, .jsonl, .parquet (default: the Python stdlib)")
    if wanted("data"):
        from llmlab.data.shards import PrepareConfig
        from llmlab.dataclass_io import add_flags

        add_flags(d, PrepareConfig)
    d.set_defaults(func=cmd_data_prepare)

    s = sub.add_parser("pretrain", help="pretrain a model from scratch (clm: llama/gpt2, mlm: bert); torchrun-ready",
                       description="Pretrain from scratch. Under 'torchrun --nproc-per-node N -m llmlab pretrain' "
                                   "it runs data-parallel (DDP, or FSDP with --parallel fsdp).")
    if wanted("pretrain"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.loop import TrainConfig
        from llmlab.train.pretrain import ModelFlags, PretrainConfig

        add_flags(s, PretrainConfig)
        add_flags(s, ModelFlags)
        add_flags(s, TrainConfig)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("sft", help="fine-tune a chat model (full, LoRA, QLoRA, adapters, prefix, prompt) on "
                                   "conversations or a built-in task; scores held-out exact match",
                       description="Supervised fine-tuning. With no flags: LoRA on SmolLM2-135M-Instruct on the "
                                   "built-in addition task (about 7 minutes on 2 CPU cores), held-out exact match "
                                   "before and after in RUN/summary.md. Data: JSON/JSONL/Parquet files (Alpaca, "
                                   "OpenAI messages, ShareGPT, prompt/completion) or --task NAME.")
    if wanted("sft"):
        from llmlab.data.sft import SFTDataConfig
        from llmlab.dataclass_io import add_flags
        from llmlab.train.sft import SFTConfig, SFTTrainConfig

        s.add_argument("paths", nargs="*", metavar="FILE", help="conversation files or folders (default: none, "
                                                               "train on --task, default addition)")
        add_flags(s, SFTConfig)
        add_flags(s, SFTDataConfig, skip=("seq_len", "seed"))
        add_flags(s, SFTTrainConfig)
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("scaling", help="mini scaling-law sweep: several model sizes, loss fitted vs parameters "
                                       "and compute, plotted")
    if wanted("scaling"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.scaling import ScalingConfig

        add_flags(s, ScalingConfig)
    s.set_defaults(func=cmd_scaling)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    args = build_parser({command} if command else set()).parse_args(argv)
    from llmlab.common import LlmlabError  # imports torch: only once a command runs

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
