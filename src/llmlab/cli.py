"""``llmlab <command>``: parse flags, call one function. Expected errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmlab import __version__

RAG_INDEX, RAG_DOCS = "data/pydoc-index", "data/pydoc-topics"  # llmlab rag's built-in index and its documents
KG_GRAPH, KG_INDEX, KG_DOCS = "data/kg-graph", "data/kg-index", "data/kg-exceptions"  # llmlab kg's built-in ones
MODEL_HELP = ("a .gguf file, a Hugging Face folder, an sft run or adapter folder (base + adapter), a preset "
              "(random weights), or an embedded model (smollm2-135m-instruct, all-minilm-l6-v2) "
              "(default: smollm2-135m-instruct)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2 (argparse's own convention)
        print(f"llmlab: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--threads takes a count >= 0 (0 = one per physical core), not {text!r}")
    return n


def _add_load_flags(p: argparse.ArgumentParser, packed_default: bool = False, kernel_default: str = "int8r",
                    kv_flag: bool = True) -> None:
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=packed_default,
                   help="CPU decode on packed GGML weights (the GGUF's Q8_0/Q4_0/Q4_1 blocks; Q8_0 for other "
                        "models); --no-packed runs the float32 reference path "
                        f"(default: {'on' if packed_default else 'off'})")
    p.add_argument("--packed-kernel", default=kernel_default, choices=["int8r", "int8", "int8x2", "float", "reference"],
                   help="with --packed: int8r = integer dot products on 8-bit activations, plus a second 8-bit "
                        "block (the rounding error) where a block has an outlier, and the decode step in C (the "
                        "reference's top token at 99.1-99.4%% of positions, perplexity within 0.2%%), int8 = the same "
                        "without the residual, llama.cpp's arithmetic (fastest at batch; 97.5%%), int8x2 = a "
                        "residual for every block (100%%, slower), float = float activations "
                        "(the reference's numbers to ~1e-4), reference = dequantize + matmul "
                        f"(default: {kernel_default})")
    if kv_flag:
        p.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"],
                       help="the KV cache's dtype: float16 halves the cache's memory and the bytes each decode step "
                            "reads (llama.cpp's default; the README measures its speed and quality), float32 keeps "
                            "the model's keys and values exactly (default: float32)")
    p.add_argument("--threads", type=_threads, default=0, metavar="N",
                   help="CPU threads for PyTorch and the C kernels; 0 = one per physical core (default: 0)")
    # Deprecated spellings of --packed / --no-packed (llmlab 0.1 called it --fast); hidden from --help.
    p.add_argument("--fast", dest="packed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-fast", dest="packed", action="store_false", help=argparse.SUPPRESS)


def _load_options(args) -> dict:
    """``llmlab.load`` keyword arguments from the flags of ``_add_load_flags``."""
    return dict(dtype=args.dtype, device=_device(args), packed=args.packed, packed_kernel=args.packed_kernel,
                kv_dtype=getattr(args, "kv_dtype", "float32"))


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
    p.add_argument("--draft-tokens", type=int, default=16,
                   help="most draft tokens per speculative step, fewer while drafts are rejected (default: 16)")
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

    info = load(args.model, **_load_options(args)).info()
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
    llm = load(args.model, **_load_options(args))
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

    llm = load(args.model, **_load_options(args))
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
    llm = load(args.model, **_load_options(args))
    if args.packed:
        from llmlab.nn.packed_linear import keep_dense_

        # Packed GEMV for steps of few sequences (memory-bound), float32 GEMM for steps of many.
        keep_dense_(llm.model, min_rows=16)
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


def cmd_attention(args) -> int:
    import torch

    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.eval.attention_maps import attention_maps, plot_attention

    if not args.text.strip():
        raise LlmlabError("the text is empty: give some text")
    layers = None if args.layers in ("ends", "all") else _int_list(args.layers, "--layers")
    heads = None if args.heads == "all" else _int_list(args.heads, "--heads")
    llm = load(args.model, device=args.device)
    tok = llm.tokenizer
    ids = tok.encode(args.text) if llm.config.is_causal else tok.encode(args.text, add_special=True)
    if len(ids) > args.max_tokens:
        raise LlmlabError(f"the text is {len(ids)} tokens and --max-tokens is {args.max_tokens}: shorten the text "
                          "or raise --max-tokens")
    if args.layers == "ends":
        layers = [0, llm.config.n_layers // 2, llm.config.n_layers - 1]
    maps = attention_maps(llm.model, torch.tensor([ids], device=llm.model.embed_tokens.weight.device), layers)
    maps = {i: m.cpu() for i, m in maps.items()}
    tokens = [tok.decode([i]) for i in ids]
    plot_attention(maps, tokens, Path(args.out), heads, title=args.text[:80])
    # The last token's view: which earlier token each head attends to most, and how spread its attention is.
    print("layer  head  top token from the last position (weight)  entropy (nats)")
    for layer, m in maps.items():
        for h in heads if heads is not None else range(m.shape[1]):
            row = m[0, h, -1]  # (T,)
            j = int(row.argmax())
            entropy = float(-(row.clamp_min(1e-12).log() * row).sum())
            print(f"{layer:>5}  {h:>4}  {tokens[j]!r:<28} ({float(row[j]):.2f})  {entropy:.2f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    from llmlab.common import LlmlabError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LlmlabError(f"{flag} takes comma-separated integers (e.g. 0,5,-1), not {text!r}") from None


def cmd_landscape(args) -> int:
    import torch
    from tqdm import tqdm

    from llmlab.api import load
    from llmlab.common import LlmlabError, write_text_atomic
    from llmlab.compress.calibrate import calibration_text, heldout_text, token_windows
    from llmlab.eval.landscape import filter_normalised_direction, lm_loss_fn, loss_landscape, plot_landscape

    if args.dims not in (1, 2):
        raise LlmlabError(f"--dims is 1 (a curve) or 2 (a surface), not {args.dims}")
    if args.points < 2 or args.span <= 0:
        raise LlmlabError(f"--points must be >= 2 and --span > 0, got {args.points} and {args.span}")
    if args.windows < 1 or args.seq_len < 2:
        raise LlmlabError(f"--windows must be >= 1 and --seq-len >= 2, got {args.windows} and {args.seq_len}")
    text = heldout_text() if args.text == "builtin" else calibration_text(args.text)
    llm = load(args.model, device=args.device)
    if not llm.config.is_causal:
        raise LlmlabError("llmlab landscape measures a causal LM's next-token loss; this model is an encoder")
    windows = token_windows(llm.tokenizer, text, args.windows, args.seq_len, seed=args.seed, where="--text")
    g = torch.Generator().manual_seed(args.seed)
    directions = [filter_normalised_direction(llm.model, g) for _ in range(args.dims)]
    n = args.points ** args.dims
    with tqdm(total=n, desc="landscape", unit="pt", disable=not args.progress, file=sys.stderr) as bar:
        land = loss_landscape(llm.model, lm_loss_fn(windows), directions, span=args.span, points=args.points,
                              progress=lambda i, total: bar.update(1))
    out = Path(args.out)
    plot_landscape(land, out, title=f"{args.model or 'smollm2-135m-instruct'}: {args.windows} x {args.seq_len} "
                                     f"tokens, filter-normalised directions (seed {args.seed})")
    write_text_atomic(out.with_suffix(".json"), json.dumps(land.to_json()) + "\n")
    edge = land.losses if args.dims == 1 else land.losses[:, args.points // 2]
    print(f"loss at the centre {land.centre:.4f}; along α: {float(edge[0]):.4f} at -{args.span:g}, "
          f"{float(edge[-1]):.4f} at +{args.span:g}; lowest on the grid {float(land.losses.min()):.4f}")
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from llmlab.train.html_report import write_run_report

    print(write_run_report(Path(args.run)))
    return 0


def _builtin_index(index: str, default: str, documents, what: str) -> Path:
    """``index`` as a path; the default one is built on first use over ``documents()`` (a folder)."""
    from llmlab.common import LlmlabError
    from llmlab.infer.index import DB_NAME, IndexConfig, VectorStore, add_files, open_encoder

    path = Path(index)
    if not (path / DB_NAME).exists():
        if index != default:
            raise LlmlabError(f"--index {path}: no index there: build one with 'llmlab index build FILES --index "
                              f"{path}', or leave out --index for the built-in one ({what})")
        print(f"llmlab: building the built-in index of {what} into {path} (once) ...", file=sys.stderr)
        docs = documents()
        config = IndexConfig()
        encoder = open_encoder(config)
        with VectorStore.create(path, config, encoder.fingerprint) as store:
            add_files(store, encoder, [str(docs)], {})
    return path


def cmd_rag(args) -> int:
    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.infer.index import VectorStore, open_encoder
    from llmlab.infer.rag import answer, builtin_documents, question_loglik, retrieve

    if not args.question.strip():
        raise LlmlabError("the question is empty: ask something")
    if args.k < 1 or args.max_new_tokens < 1:
        raise LlmlabError(f"--k and --max-new-tokens must be at least 1, got {args.k} and {args.max_new_tokens}")
    if args.compress is not None:
        from llmlab.infer.lingua import check_ratio

        check_ratio(args.compress, "--compress")
    index = _builtin_index(args.index, RAG_INDEX, lambda: builtin_documents(Path(RAG_DOCS)),
                           "the Python help topics")
    llm = load(args.model, **_load_options(args))
    if not llm.config.is_causal:
        raise LlmlabError("rag needs a chat model to answer; this model is an encoder")
    rerank = (lambda q, passages: question_loglik(llm.model, llm.tokenizer, q, passages)) if args.rerank else None
    with VectorStore.open(index) as store:
        encoder = None if args.mode == "bm25" else open_encoder(store)
        sources = retrieve(store, encoder, args.question, k=args.k, mode=args.mode, rerank=rerank)
    if args.compress is not None:
        from llmlab.infer.lingua import compress_sources

        sources = compress_sources(llm.model, llm.tokenizer, args.question, sources, args.compress)
    result = answer(args.question, sources, lambda messages: llm.chat(messages, max_new_tokens=args.max_new_tokens))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.answer)
    print("\nSources:")
    for s in result.sources:
        mark = "*" if s.number in result.cited else " "
        print(f"{mark}[{s.number}] {s.path} [{s.start}:{s.end}]  score {s.score:.4f}")
    if result.invalid:
        print(f"llmlab: the answer cites {', '.join(f'[{k}]' for k in result.invalid)}, which are not sources",
              file=sys.stderr)
    return 0


def _text_argument(args, what: str) -> str:
    """A command's text: its argument, ``--file FILE`` (UTF-8), or standard input ('-' or nothing); not empty."""
    from llmlab.common import LlmlabError, read_text_file

    if args.file is not None:
        if args.text is not None:
            raise LlmlabError("give the text as an argument or with --file, not both")
        text = read_text_file(args.file, f"--file {args.file}", "a UTF-8 text file")
    else:
        text = sys.stdin.read() if args.text in (None, "-") else args.text
    if not text.strip():
        raise LlmlabError(f"{what} is empty: give some text (an argument, --file FILE or standard input)")
    return text


def cmd_compress_prompt(args) -> int:
    from llmlab.api import load
    from llmlab.infer.lingua import check_ratio, compress, paragraphs

    if args.eval:
        return _compress_eval(args)
    check_ratio(args.ratio)
    text = _text_argument(args, "the prompt")
    llm = load(args.model, **_load_options(args))
    documents = paragraphs(text) if args.split else [text]
    result = compress(llm.model, llm.tokenizer, documents, args.ratio, question=args.question,
                      instruction=args.instruction, method=args.method or "llmlingua", window=args.window)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.text)
        print(f"llmlab: {result.origin_tokens} -> {result.compressed_tokens} tokens (ratio {result.ratio:.2f})",
              file=sys.stderr)
    return 0


def cmd_detect(args) -> int:
    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.eval import detect_generated as dg

    if args.eval:
        return _detect_eval(args)
    text = _text_argument(args, "the text")
    if args.prefix_tokens < 1:
        raise LlmlabError(f"--prefix-tokens {args.prefix_tokens}: give at least 1")
    thresholds = dg.read_thresholds(args.thresholds) if args.thresholds else (
        dg.DEFAULT_THRESHOLDS if args.model in (None, "smollm2-135m-instruct") else {})
    llm = load(args.model, **_load_options(args))
    stats = dg.score_text(llm.model, llm.tokenizer, text, args.prefix_tokens)
    rows = dg.verdicts(stats, thresholds)
    if args.json:
        print(json.dumps({"tokens": stats["tokens"], "statistics": {s: {"value": v, "threshold": t, "verdict": d}
                                                                    for s, v, t, d in rows}}))
        return 0
    print(f"{'statistic':<26} {'value':>9} {'threshold':>10}  verdict   ({stats['tokens']} tokens scored)")
    for s, v, t, d in rows:
        print(f"{dg.LABELS[s]:<26} {v:>9.4f} {'-' if t is None else f'{t:.4f}':>10}  {d}")
    if not thresholds:
        print("llmlab: no thresholds for this model: run 'llmlab detect --eval --model M' and pass --thresholds "
              "OUT/detect.json", file=sys.stderr)
    return 0


def _detect_eval(args) -> int:
    from tqdm import tqdm

    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.eval import detect_generated as dg
    from llmlab.eval.loglik import check_scorer

    if args.n < 1:
        raise LlmlabError(f"--n {args.n}: give a number of passages >= 1")
    if args.text is not None or args.file is not None:
        raise LlmlabError("--eval scores the built-in set: leave out the text and --file")
    if not args.temperature > 0 or not 0 < args.top_p <= 1:
        raise LlmlabError(f"--temperature {args.temperature}, --top-p {args.top_p}: give a temperature > 0 and "
                          "a top-p in (0, 1]")
    llm = load(args.model, **_load_options(args))
    check_scorer(llm.model, "llmlab detect --eval")
    cfg = dg.SampleConfig(args.prefix_tokens, args.new_tokens, args.temperature, args.top_p, args.seed)
    passages = dg.eval_passages(llm.tokenizer, args.n, cfg)
    name = args.model or "smollm2-135m-instruct"
    with tqdm(total=2 * args.n, desc="detect (sample, score)", unit="passage", disable=not args.progress,
              file=sys.stderr) as bar:
        result = dg.evaluate(llm.model, llm.tokenizer, passages, cfg, Path(args.out), name,
                             progress=lambda: bar.update(1))
    png = dg.plot_roc(result, Path(args.out) / "roc.png")
    print(dg.format_table(result))
    print(f"wrote {Path(args.out) / 'detect.json'}, {png} (continuations cached in {Path(args.out) / dg.CACHE})",
          file=sys.stderr)
    return 0


def _compress_eval(args) -> int:
    import tempfile

    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.eval.needle import evaluate, evaluate_rag, needle_set, table
    from llmlab.infer.lingua import check_ratio

    try:
        ratios = [float(x) for x in args.ratios.split(",")]
    except ValueError:
        raise LlmlabError(f"--ratios takes comma-separated numbers in (0, 1] (e.g. 1,0.5,0.33), not {args.ratios!r}") \
            from None
    for r in ratios:
        check_ratio(r, "--ratios")
    llm = load(args.model, **_load_options(args))
    items = needle_set(args.limit, docs=args.docs, chars=args.chars)
    methods = [args.method] if args.method else ["llmlingua", "longllmlingua"]
    rows = evaluate(llm, items, ratios, methods, max_new_tokens=args.max_new_tokens, window=args.window)
    if args.rag:
        with tempfile.TemporaryDirectory() as tmp:
            rows += evaluate_rag(llm, items, tmp, sorted(set(ratios) | {1.0}, reverse=True),
                                 max_new_tokens=args.max_new_tokens)
    print(json.dumps(rows) if args.json else table(rows))
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


def cmd_quantize(args) -> int:
    from llmlab.compress.quantize import make_spec, quantize

    options = {}
    if args.method == "gptq":
        options = {"damp": args.damp, "act_order": args.act_order}
    elif args.method == "zeroquant":
        options = {"lkd_steps": args.lkd_steps}
    fields = {"act": args.act} if args.act else {}
    spec = make_spec(args.method, args.bits, args.group_size, args.symmetric, alpha=args.alpha,
                     threshold=args.threshold, options=options, **fields)
    report = quantize(args.model, Path(args.out), spec, calib=args.calib, calib_samples=args.calib_samples,
                      calib_len=args.calib_len, seed=args.seed, float_dtype=args.float_dtype, force=args.force,
                      progress=not args.no_progress)
    print(f"{spec.method}: {len(spec.modules)} layers, {spec.bits} bits, in {report['seconds']} s; "
          f"wrote {args.out} (summary.md)", file=sys.stderr)
    return 0


def cmd_prune(args) -> int:
    from llmlab.compress.prune import PruneConfig, prune

    if args.method in ("llm-pruner", "loraprune"):
        return cmd_prune_structured(args)
    config = PruneConfig(args.method, args.sparsity, args.pattern, args.compare, args.damp, args.block_size)
    report = prune(args.model, Path(args.out), config, calib=args.calib, calib_samples=args.calib_samples,
                   calib_len=args.calib_len, seed=args.seed, dtype=args.dtype, force=args.force,
                   progress=not args.no_progress)
    total = report["sparsity"]
    print(f"{report['config']['method']} {report['config']['pattern']}: {len(report['layers'])} layers, "
          f"{total['layers']:.2%} of their weights zero ({total['model']:.2%} of the model), in "
          f"{report['seconds']} s; wrote {args.out} (summary.md)", file=sys.stderr)
    return 0


def cmd_prune_structured(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.compress.structured import StructuredConfig, prune_structured
    from llmlab.train.recover import recovery

    for flag, value in (("--pattern", args.pattern != "unstructured"), ("--compare", args.compare is not None)):
        if value:
            raise LlmlabError(f"{flag} is for unstructured / N:M pruning, not --method {args.method}: leave it out")
    config = StructuredConfig(args.method, 0.2 if args.sparsity is None else args.sparsity, args.heads).resolved()
    steps = args.recover_steps if args.recover_steps is not None else (20 if args.method == "loraprune" else 0)
    if steps < 0 or args.lora_rank < 1:
        raise LlmlabError(f"--recover-steps {steps} / --lora-rank {args.lora_rank}: use steps >= 0 and a rank >= 1")
    opts = {"lr": args.recover_lr, "batch_size": args.recover_batch, "ppl_tokens": args.ppl_tokens,
            "window": min(512, args.ppl_tokens), "progress": not args.no_progress}
    select = recover = None
    if args.method == "loraprune":
        from llmlab.train.loraprune import loraprune_select

        select = loraprune_select(config, steps, rank=args.lora_rank, **opts)
    elif steps:
        recover = recovery(steps, lora_rank=args.lora_rank, **opts)
    report = prune_structured(args.model, Path(args.out), config, calib=args.calib, calib_samples=args.calib_samples,
                              calib_len=args.calib_len, seed=args.seed, dtype=args.dtype, force=args.force,
                              progress=not args.no_progress, select=select, recover=recover)
    p, s = report["parameters"], report["shape"]
    rec = report["recovery"] or report.get("loraprune")
    rec = (f"; {'LoRA recovery' if args.method == 'llm-pruner' else 'LoRAPrune fine-tune'} {rec['steps']} steps: "
           f"held-out perplexity {rec['perplexity_before']:.2f} -> {rec['perplexity_after']:.2f}") if rec else ""
    print(f"{config.label()}: {s['n_heads']} heads, {s['n_kv_heads']} KV heads, FFN {s['ffn_dim']}; parameters "
          f"{p['before']:,} -> {p['after']:,} ({p['share_removed']:.2%} removed){rec}, in {report['seconds']} s; "
          f"wrote {args.out} (summary.md)", file=sys.stderr)
    return 0


def cmd_lowrank(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.compress.lowrank import LowRankConfig, lowrank

    config = LowRankConfig(args.method, args.rank, args.energy, args.layers, args.damp, args.factor_bits).resolved()
    if args.recover_steps < 0:
        raise LlmlabError(f"--recover-steps {args.recover_steps}: use 0 (no recovery) or a positive number of steps")
    recover = None
    if args.recover_steps:
        from llmlab.train.recover import recovery

        recover = recovery(args.recover_steps, lr=args.recover_lr, batch_size=args.recover_batch,
                           ppl_tokens=args.ppl_tokens, window=min(512, args.ppl_tokens),
                           progress=not args.no_progress)
    report = lowrank(args.model, Path(args.out), config, calib=args.calib, calib_samples=args.calib_samples,
                     calib_len=args.calib_len, seed=args.seed, dtype=args.dtype, force=args.force,
                     progress=not args.no_progress, recover=recover)
    p = report["parameters"]
    dense = f"; {len(p['dense_layers'])} left dense (no saving)" if p["dense_layers"] else ""
    rec = report["recovery"]
    rec = (f"; recovery {rec['steps']} steps: held-out perplexity {rec['perplexity_before']:.2f} -> "
           f"{rec['perplexity_after']:.2f}") if rec else ""
    print(f"{config.label()}: {p['factored_layers']} layers factored, {p['share_kept']:.2%} of their weights kept"
          f"{dense}{rec}, in {report['seconds']} s; wrote {args.out} (summary.md)", file=sys.stderr)
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


def cmd_data_rationales(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.rationales import RationalesConfig, run_rationales

    c = run_rationales(from_args(RationalesConfig, args))
    print(f"{c['verified']} of {c['replies']} teacher replies verify ({c['questions_verified']} of {c['questions']} "
          f"questions have one); {c['kept']} records kept ({c['keep']})")
    print(f"llmlab: wrote {c['out']} in {c['seconds']:.0f} s", file=sys.stderr)
    return 0


def _text_completer(args, max_tokens: int, max_n: int = 8, ban_stop: bool = False):
    """The model of ``args`` on the serving engine, as a ``serve.offline.TextCompleter`` (data commands).
    ``ban_stop``: the end-of-turn / end-of-text ids get a -100 logit bias, so a completion runs to ``max_tokens``
    (Alpaca's generate_instruction.py does the same for GPT-3's <|endoftext|>)."""
    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.infer.sample import SamplingParams
    from llmlab.serve.engine import Engine, EngineConfig
    from llmlab.serve.offline import TextCompleter

    llm = load(args.model, **_load_options(args))
    if not llm.config.is_causal or llm.tokenizer is None or llm.chat_template is None:
        raise LlmlabError(f"{args.model}: needs a text-generating chat model with a tokenizer")
    if args.packed:
        from llmlab.nn.packed_linear import keep_dense_

        keep_dense_(llm.model, min_rows=16)  # float32 GEMM for batched steps, as llmlab serve does
    engine = Engine(llm.model, EngineConfig(max_num_seqs=64, max_batched_tokens=1024, max_n=max(8, max_n)))
    bias = dict.fromkeys(llm.stop_ids(), -100.0) if ban_stop else {}
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, logit_bias=bias)
    return llm, TextCompleter(engine, llm.tokenizer, sampling, max_tokens, llm.stop_ids())


def cmd_data_self_instruct(args) -> int:
    """Self-Instruct / Alpaca data from seed tasks (data/self_instruct.py) on the engine (serve/offline.py)."""
    from tqdm import tqdm

    from llmlab.common import LlmlabError
    from llmlab.data.self_instruct import (
        SelfInstructConfig,
        read_seed_tasks,
        section_stop_ids,
        self_instruct,
        write_jsonl,
    )
    from llmlab.dataclass_io import from_args

    cfg = from_args(SelfInstructConfig, args).validate()
    seeds = read_seed_tasks(cfg.seeds or None)
    llm, completer = _text_completer(args, cfg.max_new_tokens, max_n=cfg.samples, ban_stop=True)
    if cfg.one_task:
        completer.stop_ids |= section_stop_ids(llm.tokenizer)

    def show(n: int, stats) -> None:
        bar.set_postfix(completions=stats.prompts, candidates=stats.candidates, refresh=False)
        bar.update(n - bar.n)

    with tqdm(total=cfg.examples, desc="self-instruct", unit="ex", disable=not args.progress, file=sys.stderr) as bar:
        kept, stats = self_instruct(cfg, completer, seeds, on_update=show)
    if not kept:
        raise LlmlabError(f"no example passed the filters: {stats.summary()}; raise --max-minutes or "
                          "--max-new-tokens, or use a larger --model")
    write_jsonl(cfg.out, [t.record() for t in kept])
    print(json.dumps({"kept": stats.kept, "candidates": stats.candidates, "completions": stats.completions,
                      "prompts": stats.prompts,
                      "tokens": stats.tokens, "prompt_tokens": completer.engine.stats().prompt_tokens,
                      "rejected": stats.rejected, "seconds": round(stats.seconds, 1),
                      "cpu_seconds": round(stats.cpu_seconds, 1), "stopped": stats.stopped, "out": cfg.out}))
    print(f"llmlab: {stats.summary()} -> {cfg.out}", file=sys.stderr)
    return 0


def cmd_data_preferences(args) -> int:
    """Preference pairs: k sampled replies per prompt ranked by a verifier or a reward model (data/preferences.py)."""
    from pathlib import Path

    from llmlab.common import LlmlabError
    from llmlab.data.preferences import (
        read_prompts,
        sample_preferences,
        task_prompts,
        verifier_scores,
    )
    from llmlab.data.self_instruct import write_jsonl

    if args.k < 2:
        raise LlmlabError(f"--k {args.k}: a pair needs at least 2 samples per prompt (use --k 2 or more)")
    if args.max_new_tokens < 1 or args.prompts < 1:
        raise LlmlabError("--max-new-tokens and --prompts must be at least 1")
    if Path(args.out).exists() and not args.force:
        raise LlmlabError(f"{args.out} already exists: pass --force to overwrite it, or --out elsewhere")
    if args.paths and not args.reward_model:
        raise LlmlabError("prompts from files have no verifier: pass --reward-model RUN (an llmlab reward run), or "
                          "leave the files out to use --task")
    items = read_prompts(list(args.paths)) if args.paths else task_prompts(args.task, "train", args.prompts, args.seed)
    llm, completer = _text_completer(args, args.max_new_tokens, args.k)
    if args.reward_model:
        from llmlab.data.sft import tokenize_conversation
        from llmlab.train.reward import load_reward_model

        rm = load_reward_model(args.reward_model, llm.tokenizer)

        def score(item, replies):
            return rm([tokenize_conversation(item.prompt + [{"role": "assistant", "content": r}], llm.tokenizer,
                                             llm.chat_template, item.where).ids for r in replies]).tolist()
    else:
        score = verifier_scores(args.task)

    def sample(prompts, k):
        seeds = [args.seed * 100_003 + i for i in range(len(prompts))]
        return [c.texts for c in completer.complete([llm.render_chat(p) for p in prompts], k, seeds)]

    records, stats = sample_preferences(items, args.k, sample, score)
    if not records:
        raise LlmlabError(f"no pairs: {stats.summary()}; raise --k or --temperature, or use more prompts")
    write_jsonl(args.out, records)
    print(f"llmlab: {stats.summary()} -> {args.out} (read by llmlab dpo {args.out})", file=sys.stderr)
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


def cmd_head(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.heads import HeadConfig, HeadTrainConfig, run_head

    s = run_head(from_args(HeadConfig, args), from_args(HeadTrainConfig, args))
    if s["after"] is not None:
        for metric, before in s["before"].items():
            print(f"{s['task']}: held-out {metric} {before:.1f} -> {s['after'][metric]:.1f} ({s['method']}, "
                  f"{s['steps']} steps, {s['trainable_parameters']:,} trainable parameters)")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; model {s['saved']}, run folder {args.out} (summary.json)",
          file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_dpo(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.dpo import DPOConfig, DPOTrainConfig, run_dpo

    s = run_dpo(from_args(DPOConfig, args), from_args(DPOTrainConfig, args), list(args.paths))
    if s["accuracy_after"] is not None:
        print(f"{s['task']}: held-out exact match {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy_after']:.1f}%"
              f" (dpo {s['loss']}, beta {s['beta']:g}, {s['method']})")
    if s["val_pairs"]:
        v = s["val_pairs"]
        print(f"validation pairs: reward accuracy {100 * v['accuracy']:.1f}%, margin {v['margin']:.3f}, "
              f"loss {v['loss']:.4f}")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_distill(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.distill import DistillConfig, DistillTrainConfig, run_distill

    s = run_distill(from_args(DistillConfig, args), from_args(DistillTrainConfig, args))
    if s["val_ppl"] is not None:
        print(f"{s['student']} ({s['loss']}): held-out perplexity {s['val_ppl']:.2f} (loss {s['val_loss']:.4f}) after "
              f"{s['tokens']:,} tokens")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_reward(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.reward import RewardConfig, RewardTrainConfig, run_reward

    s = run_reward(from_args(RewardConfig, args), from_args(RewardTrainConfig, args), list(args.paths))
    if s["val_after"]:
        b, a = s["val_before"], s["val_after"]
        print(f"validation pairs: reward accuracy {100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%, "
              f"loss {b['loss']:.4f} -> {a['loss']:.4f}")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_ppo(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.ppo import PPOConfig, PPOTrainConfig, run_ppo

    s = run_ppo(from_args(PPOConfig, args), from_args(PPOTrainConfig, args))
    if s["after"]:
        b, a = s["before"], s["after"]
        print(f"{s['task']}: held-out exact match {100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%, reward "
              f"{b['reward']:.3f} -> {a['reward']:.3f}, KL to the reference {a['kl']:.3f} ({s['algo']})")
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def _preview(text: str, width: int = 90) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def cmd_text_tfidf(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.text.features import FeatureConfig, run_tfidf
    from llmlab.text.tasks import docstring_task, read_documents

    docs = read_documents(args.inputs) if args.inputs else docstring_task().train_texts
    r = run_tfidf(docs, from_args(FeatureConfig, args), query=args.query, show=args.show, top=args.top)
    print(f"{r['documents']} documents x {r['terms']} terms, {r['stored']:,} stored values "
          f"({100 * r['stored'] / max(1, r['documents'] * r['terms']):.2f}% dense)")
    for ex in r["examples"]:
        if "score" in ex:
            print(f"{ex['score']:.3f}  {_preview(ex['document'])}")
        else:
            print(f"- {_preview(ex['document'])}\n    " + ", ".join(f"{t} {w:.3f}" for t, w in ex["terms"]))
    return 0


def cmd_text_classify(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.text.classify import ClassifyConfig, labelled_task, run_classify
    from llmlab.text.features import FeatureConfig

    task = labelled_task(args.data) if args.data else None
    r = run_classify(from_args(FeatureConfig, args), from_args(ClassifyConfig, args), task, top_terms=args.top_terms)
    if args.top_terms:
        for label, terms in r["top_terms"].items():
            print(f"{label:>16}: {', '.join(terms)}")
    print(f"held-out accuracy {100 * r['test_accuracy']:.1f}% (train {100 * r['train_accuracy']:.1f}%, majority "
          f"class {100 * r['majority_accuracy']:.1f}%) on {r['test']} texts, {r['classes']} classes, "
          f"{r['features']} features, {r['seconds']} s")
    return 0


def cmd_text_ngram_lm(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.text.ngram_lm import NgramConfig, run_ngram_lm
    from llmlab.text.tasks import lm_corpus, read_documents

    if args.inputs:
        train, heldout = "\n\n".join(read_documents(args.inputs)), None
    else:
        train, heldout = lm_corpus()
    if args.heldout:
        heldout = "\n\n".join(read_documents([args.heldout]))
    r = run_ngram_lm(train, heldout, from_args(NgramConfig, args), samples=args.samples, seed=args.seed)
    for line in r["samples"]:
        print(f"> {line}")
    print(f"order {r['order']}: held-out perplexity {r['perplexity']:.2f} on {r['heldout_words']:,} words "
          f"({r['heldout_unknown']} unknown) in {r['heldout_sentences']} sentences; trained on {r['train_words']:,} "
          f"words, vocabulary {r['vocab']:,}; {r['seconds']} s")
    return 0


def cmd_vectors_train(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.text.tasks import read_documents
    from llmlab.text.vector_eval import run_vectors
    from llmlab.text.vectors import VectorConfig

    docs = read_documents(args.inputs) if args.inputs else None
    r = run_vectors(from_args(VectorConfig, args), docs, args.out, progress=args.progress)
    e = r["eval"]
    name = r["method"] if r["method"] == "glove" else f"{r['method']} {r['arch']}"
    print(f"{name}: {r['vocab']:,} words x {r['dim']} dims from {r['words']:,} words, {r['epochs']} epochs in "
          f"{r['seconds']:.1f} s ({r['words_per_second']:,} words/s); analogies {100 * e['analogy']:.1f}% "
          f"({e['analogy_questions']:,} of {e['analogy_total']:,} questions), similarity {100 * e['similarity']:.1f}% "
          f"({e['similarity_items']} of {e['similarity_total']} triplets)")
    print(f"wrote {args.out} (vectors.safetensors, vocab.json, config.json, vectors.txt)", file=sys.stderr)
    return 0


def cmd_vectors_neighbors(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.text.vectors import WordVectors

    if args.top < 1:
        raise LlmlabError(f"--top {args.top}: must be >= 1")
    wv = WordVectors.load(args.vectors)
    for word in args.words:
        word = word.lower()
        note = "" if word in wv.index else " (not in the vocabulary: built from its character n-grams)"
        print(f"{word}{note}: " + ", ".join(f"{w} {s:.3f}" for w, s in wv.neighbors(word, args.top)))
    return 0


def cmd_vectors_analogy(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.text.vectors import WordVectors

    if args.top < 1:
        raise LlmlabError(f"--top {args.top}: must be >= 1")
    a, b, c = (w.lower() for w in (args.a, args.b, args.c))
    answers = WordVectors.load(args.vectors).analogy(a, b, c, args.top)
    print(f"{a} : {b} :: {c} : " + ", ".join(f"{w} {s:.3f}" for w, s in answers))
    return 0


def cmd_vectors_eval(args) -> int:
    from llmlab.common import read_text_file
    from llmlab.text.vector_eval import evaluate, read_eval_set
    from llmlab.text.vectors import WordVectors

    eval_set = None
    if args.test_set:
        raw = read_text_file(args.test_set, args.test_set, "a test set in vector_eval.txt's format")
        eval_set = read_eval_set(raw)
    e = evaluate(WordVectors.load(args.vectors), eval_set)
    if args.json:
        print(json.dumps(e, indent=2))
        return 0
    for name, s in e["sections"].items():
        print(f"analogy {name:<14} {100 * s['accuracy']:5.1f}%  ({s['questions']} of {s['total']} questions)")
    print(f"analogy (all)          {100 * e['analogy']:5.1f}%  ({e['analogy_questions']} of {e['analogy_total']})")
    print(f"similarity             {100 * e['similarity']:5.1f}%  ({e['similarity_items']} of "
          f"{e['similarity_total']} triplets)")
    return 0


def cmd_vectors_plot(args) -> int:
    from llmlab.text.vector_eval import plot_words
    from llmlab.text.vectors import WordVectors

    words = plot_words(WordVectors.load(args.vectors), args.out, [w.lower() for w in args.words] or None,
                       projection=args.projection)
    print(f"wrote {args.out}: {len(words)} words, {'t-SNE' if args.projection == 'tsne' else 'PCA'} to 2-D")
    return 0


def _score_encoders(models: dict[str, str], dims_text: str, pooling: str, max_tokens: int, rset=None,
                    projection: str = "none") -> dict:
    """{name: model source} -> {name: {dim: retrieval metrics}} on ``rset`` (default: the built-in test set).
    ``projection="pca"``: each model first gets the PCA rotation of the built-in train split's texts
    (``train/pca_rotation.py``), no training."""
    from llmlab.common import LlmlabError
    from llmlab.eval.retrieval import evaluate_model
    from llmlab.formats.load import load_model
    from llmlab.infer.embed import parse_dims
    from llmlab.text.retrieval_set import builtin_test_set

    rset = rset or builtin_test_set()
    results = {}
    for name, source in models.items():
        loaded = load_model(source)
        if loaded.config.arch != "bert" or loaded.tokenizer is None:
            raise LlmlabError(f"{source}: not an encoder with a tokenizer (e.g. all-minilm-l6-v2)")
        dims = parse_dims(dims_text, loaded.config.dim)
        if max_tokens < 3 or max_tokens > loaded.config.max_seq_len:
            raise LlmlabError(f"--max-tokens {max_tokens}: give 3..{loaded.config.max_seq_len}")
        if projection == "pca":
            from llmlab.text.retrieval_set import builtin_split, is_dev
            from llmlab.train.pca_rotation import attach_pca_projection_

            train = [p for p in builtin_split()[0] if not is_dev(p.key)]
            attach_pca_projection_(loaded.model, loaded.tokenizer, [p.query for p in train]
                                   + [p.document for p in train], pooling=pooling, max_tokens=max_tokens)
        results[name] = evaluate_model(loaded.model.eval(), loaded.tokenizer, rset, dims, pooling=pooling,
                                       max_tokens=max_tokens)
    return results


def cmd_embed_train(args) -> int:
    from llmlab.common import write_text_atomic
    from llmlab.dataclass_io import from_args
    from llmlab.eval.retrieval import format_table
    from llmlab.formats.load import load_model
    from llmlab.infer.embed import parse_dims
    from llmlab.text.retrieval_set import SPLITS
    from llmlab.train.contrastive import EmbedConfig, EmbedTrainConfig, run_embed_train

    ecfg = from_args(EmbedConfig, args)
    parse_dims(args.eval_dims, load_model(ecfg.model).config.dim, "--eval-dims")  # fail before training, not after
    s = run_embed_train(ecfg, from_args(EmbedTrainConfig, args))
    if s["saved"] is None:
        print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out}", file=sys.stderr)
        return 130
    rset = SPLITS[args.eval_split]()
    results = _score_encoders({ecfg.model: ecfg.model, f"{ecfg.loss} fine-tuned": s["saved"]}, args.eval_dims,
                              ecfg.pooling, ecfg.max_tokens, rset)
    table = format_table(results)
    write_json = {name: {str(d): m for d, m in by_dim.items()} for name, by_dim in results.items()}
    write_text_atomic(Path(args.out) / "retrieval.json", json.dumps(write_json, indent=2) + "\n")
    print(f"built-in {args.eval_split} set: {len(rset.queries)} queries, {len(rset.corpus)} documents")
    print(table)
    print(f"llmlab: {s['loss']} {s['steps']} steps in {s['train_seconds']:.0f} s; model {s['saved']}, metrics "
          f"{Path(args.out) / 'retrieval.json'}", file=sys.stderr)
    return 0


def cmd_embed_eval(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.eval.retrieval import format_table, read_retrieval_files
    from llmlab.text.retrieval_set import SPLITS

    if (args.queries is None) != (args.corpus is None):
        raise LlmlabError("give both --queries and --corpus, or neither (the built-in set, --split)")
    rset = read_retrieval_files(args.queries, args.corpus) if args.queries else SPLITS[args.split]()
    results = _score_encoders({args.model: args.model}, args.dims, args.pooling, args.max_tokens, rset,
                              args.projection)
    if args.json:
        print(json.dumps({str(d): m for d, m in results[args.model].items()}, indent=2))
    else:
        print(format_table(results))
    return 0


def cmd_embed_distill(args) -> int:
    import torch

    from llmlab.common import LlmlabError
    from llmlab.dataclass_io import from_args
    from llmlab.eval.retrieval import check_set, evaluate_embeddings
    from llmlab.infer.embed import embed_texts
    from llmlab.text.retrieval_set import builtin_test_set
    from llmlab.train.encoder_distill import (
        EncoderDistillConfig,
        EncoderDistillTrainConfig,
        report_table,
        run_encoder_distill,
    )

    cfg = from_args(EncoderDistillConfig, args)
    if args.eval_queries < 0:
        raise LlmlabError(f"--eval-queries must be >= 0 (0 = the whole test set), got {args.eval_queries}")
    rset = builtin_test_set()
    check_set(rset)
    if args.eval_queries:  # a small budget: the first N test queries, their documents and N others
        from llmlab.eval.retrieval import limit_set

        rset = limit_set(rset, args.eval_queries)

    def score(model, tokenizer):
        q = embed_texts(model, tokenizer, list(rset.queries.values()), max_tokens=cfg.max_tokens)
        d = embed_texts(model, tokenizer, list(rset.corpus.values()), max_tokens=cfg.max_tokens)
        return evaluate_embeddings(q, d, rset), torch.cat([q, d])

    s = run_encoder_distill(cfg, from_args(EncoderDistillTrainConfig, args), score)
    print(f"built-in test set: {len(rset.queries)} queries, {len(rset.corpus)} documents")
    print(report_table(s["report"]))
    print(f"llmlab: {s['stopped']} at step {s['steps']}; run folder {args.out} (summary.md)", file=sys.stderr)
    return 130 if s["stopped"] == "interrupted" else 0


def cmd_index_build(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.infer.index import IndexConfig, VectorStore, add_files, open_encoder, parse_meta

    meta = parse_meta(args.meta, "--meta")
    config = from_args(IndexConfig, args)
    config.check()
    encoder = open_encoder(config)
    with VectorStore.create(args.index, config, encoder.fingerprint) as store:
        return _print_added(store, add_files(store, encoder, args.sources, meta))


def cmd_index_add(args) -> int:
    from llmlab.infer.index import VectorStore, add_files, open_encoder, parse_meta

    meta = parse_meta(args.meta, "--meta")
    with VectorStore.open(args.index) as store:
        return _print_added(store, add_files(store, open_encoder(store), args.sources, meta))


def _print_added(store, s: dict) -> int:
    print(f"{store.folder}: {s['added']} documents added, {s['replaced']} replaced, {s['unchanged']} unchanged "
          f"({s['chunks']} new chunks; {store.count('documents')} documents, {store.count('chunks')} chunks in all)")
    if s["skipped_empty"]:
        print(f"llmlab: skipped {s['skipped_empty']} empty files", file=sys.stderr)
    return 0


def cmd_index_delete(args) -> int:
    from llmlab.infer.index import VectorStore, delete_paths

    with VectorStore.open(args.index) as store:
        n = delete_paths(store, args.sources)
        print(f"{store.folder}: {n} documents deleted ({store.count('documents')} documents, "
              f"{store.count('chunks')} chunks left)")
    return 0


def cmd_index_info(args) -> int:
    from llmlab.infer.index import VectorStore

    with VectorStore.open(args.index, repair=args.command_name == "repair") as store:
        info = store.info()
        if args.files:
            info["files"] = store.paths()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("index", "documents", "chunks", "terms", "model", "dim", "faiss", "generation"):
        print(f"{key:>10}  {info[key]}")
    c = info["config"]
    print(f"{'chunks of':>10}  {c['chunk_tokens']} tokens, overlap {c['overlap']}; HNSW above {c['hnsw_above']} "
          f"vectors")
    print(f"{'files':>10}  " + ", ".join(f"{k} {v:,} B" for k, v in info["bytes"].items()))
    for path in info.get("files", []):
        print(path)
    return 0


def cmd_index_query(args) -> int:
    from llmlab.infer.index import VectorStore, open_encoder, parse_meta

    where = parse_meta(args.where, "--where")
    with VectorStore.open(args.index) as store:
        encoder = None if args.mode == "bm25" and args.model is None else open_encoder(store, args.model)
        hits = store.search(args.text, encoder, k=args.k, mode=args.mode, where=where)
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, "path": h.path, "chunk": h.text, "score": h.score, "start": h.start,
                              "end": h.end, "metadata": h.metadata}))
        else:
            text = " ".join(h.text.split())
            print(f"{rank}. {h.score:.4f}  {h.path} [{h.start}:{h.end}]\n   {text[:200]}{'...' * (len(text) > 200)}")
    if not hits:
        print("llmlab: no hits", file=sys.stderr)
    return 0


def cmd_index_eval(args) -> int:
    import tempfile

    from llmlab.common import LlmlabError
    from llmlab.dataclass_io import from_args
    from llmlab.eval.retrieval import evaluate_search, format_search_table, limit_set
    from llmlab.infer.index import IndexConfig, open_encoder
    from llmlab.text.retrieval_set import builtin_test_set

    config = from_args(IndexConfig, args)
    config.check()
    if args.limit < 0:
        raise LlmlabError(f"--limit {args.limit}: give a count of queries, or 0 for all")
    rset = builtin_test_set()
    if args.limit:
        rset = limit_set(rset, args.limit)
    encoder = open_encoder(config)
    with tempfile.TemporaryDirectory() as tmp:
        results = evaluate_search(rset, encoder, config, Path(tmp) / "index")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"built-in test set: {len(rset.queries)} queries, {len(rset.corpus)} documents; {config.model}, "
              f"chunks of {config.chunk_tokens} tokens")
        print(format_search_table(results))
    return 0


def _kg_graph(args, llm=None) -> Path:
    """The --graph folder; the default one is built with rules over the built-in documents on first use."""
    from llmlab.common import LlmlabError
    from llmlab.infer.kg import DB_NAME, build_graph, builtin_documents, rules_extract

    path = Path(args.graph)
    if not (path / DB_NAME).exists():
        if args.graph != KG_GRAPH:
            raise LlmlabError(f"--graph {path}: no graph there: make one with 'llmlab kg build FILES --graph {path}', "
                              "or leave out --graph for the built-in one")
        print(f"llmlab: building the built-in graph of Python's exception classes into {path} (once) ...",
              file=sys.stderr)
        build_graph(path, [str(builtin_documents(Path(KG_DOCS)))], rules_extract, "rules")
    return path


def _kg_rag(args):
    """question -> the plain-RAG sources from --index (the default: built over the built-in documents)."""
    from llmlab.infer.index import VectorStore, open_encoder
    from llmlab.infer.kg import builtin_documents
    from llmlab.infer.rag import retrieve

    index = _builtin_index(args.index, KG_INDEX, lambda: builtin_documents(Path(KG_DOCS)),
                           "Python's exception classes")
    store = VectorStore.open(index)
    encoder = open_encoder(store)
    return store, lambda q: retrieve(store, encoder, q, k=args.k, mode="hybrid")


def _kg_llm(args):
    from llmlab.api import load
    from llmlab.common import LlmlabError

    llm = load(args.model, **_load_options(args))
    if not llm.config.is_causal:
        raise LlmlabError("kg needs a chat model; this model is an encoder")
    return llm


def cmd_kg_build(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.infer.kg import build_graph, builtin_documents, model_triples, rules_extract

    sources = args.sources or [str(builtin_documents(Path(KG_DOCS)))]
    if args.extractor == "model":
        if args.max_new_tokens < 2:
            raise LlmlabError(f"--max-new-tokens {args.max_new_tokens}: the JSON needs at least 2 tokens")
        llm = _kg_llm(args)
        extract = lambda texts: model_triples(llm, texts, args.max_new_tokens)  # noqa: E731
    else:
        extract = rules_extract
    s = build_graph(args.graph, sources, extract, args.extractor)
    print(f"{args.graph}: {s['documents']} documents, {s['chunks']} chunks -> {s['triples']} triples "
          f"({s['entities']} entities, {s['relations']} relations; extractor {args.extractor})")
    return 0


def cmd_kg_query(args) -> int:
    from llmlab.infer.kg import GraphStore

    with GraphStore.open(_kg_graph(args)) as graph:
        seeds = graph.link(args.question)
        if not seeds:
            print("llmlab: no entity of the graph occurs in the question (try a class name such as "
                  "ZeroDivisionError)", file=sys.stderr)
            return 0
        triples = graph.neighbourhood(seeds, args.hops, args.max_triples)
    if args.json:
        print(json.dumps({"linked": seeds, "triples": [vars(t) for t in triples]}))
        return 0
    print("linked: " + ", ".join(seeds))
    for t in triples:
        print(f"{t.cost:>4g}  {t.sentence()}  ({Path(t.path).name}, chunk {t.chunk_id})")
    return 0


def cmd_kg_ask(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.eval.kg_eval import Question, contexts
    from llmlab.infer.kg import GraphStore
    from llmlab.infer.rag import answer

    if not args.question.strip():
        raise LlmlabError("the question is empty: ask something")
    if args.k < 1 or args.max_new_tokens < 1:
        raise LlmlabError(f"--k and --max-new-tokens must be at least 1, got {args.k} and {args.max_new_tokens}")
    with GraphStore.open(_kg_graph(args)) as graph:
        store, rag = _kg_rag(args)
        with store:
            ctx = contexts(Question("cli", args.question, "", [], ""), graph, rag, args.hops, args.max_triples)
    sources, linked = ctx[args.context]
    if not linked and args.context != "rag":
        print("llmlab: no entity of the graph occurs in the question: answering from plain RAG", file=sys.stderr)
    llm = _kg_llm(args)
    result = answer(args.question, sources, lambda m: llm.chat(m, max_new_tokens=args.max_new_tokens))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.answer)
    print("\nSources:")
    for s in result.sources:
        text = " ".join(s.text.split())
        print(f"{'*' if s.number in result.cited else ' '}[{s.number}] {text[:100]}  ({Path(s.path).name})")
    return 0


def cmd_kg_eval(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.eval.kg_eval import builtin_questions, evaluate, format_table
    from llmlab.infer.kg import GraphStore

    if args.limit < 0:
        raise LlmlabError(f"--limit {args.limit}: give a count of questions, or 0 for all")
    questions = builtin_questions(None if args.split == "all" else args.split)
    questions = questions[:args.limit] if args.limit else questions
    llm = None if args.no_answer else _kg_llm(args)
    chat = None if llm is None else (lambda m: llm.chat(m, max_new_tokens=args.max_new_tokens))
    with GraphStore.open(_kg_graph(args)) as graph:
        store, rag = _kg_rag(args)
        with store:
            result = evaluate(questions, graph, rag, chat, args.hops, args.max_triples)
    if args.output:
        from llmlab.common import write_text_atomic

        write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
        return 0
    print(f"built-in multi-hop set, {args.split} split: {result['questions']} questions ({result['unlinked']} with "
          f"no linked entity); k={args.k} chunks for rag, up to {args.max_triples} triples within cost "
          f"{args.hops} for kg" + ("" if llm is None else f"; answers by {args.model or 'smollm2-135m-instruct'}"))
    print(format_table(result))
    return 0


def cmd_eval(args) -> int:
    import time

    from llmlab.common import pick_device, pick_dtype
    from llmlab.dataclass_io import from_args
    from llmlab.eval.harness import EvalConfig, format_table, run_eval

    device = pick_device(args.device)
    cfg = from_args(EvalConfig, args)
    cfg.output = cfg.output or str(Path("runs") / "eval" / time.strftime("%Y%m%d-%H%M%S.json", time.gmtime()))
    result = run_eval(args.models, cfg, load_kwargs={"dtype": pick_dtype(args.dtype, device), "device": device})
    print(format_table(result))
    print(f"llmlab: wrote {cfg.output} and {Path(cfg.output).with_suffix('.md')}", file=sys.stderr)
    return 0


def cmd_lm_eval(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.eval.lm_eval_backend import run_lm_eval

    if args.limit is not None and not args.limit > 0:
        raise LlmlabError(f"--limit {args.limit}: give a count >= 1 or a fraction in (0, 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LlmlabError(f"--num-fewshot {args.num_fewshot} must be >= 0")
    if args.batch_size < 1:
        raise LlmlabError(f"--batch-size {args.batch_size} must be >= 1")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_lm_eval(args.model, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                          limit=limit, batch_size=args.batch_size, seed=args.seed, output=args.output)
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        print(f"llmlab: wrote {args.output}", file=sys.stderr)
    return 0


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


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '1.5G', '1000000' -> bytes (an argparse type: a bad value is a usage error)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _SIZE_UNITS or float(m.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 1GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _served_name(source: str | None, default: str) -> str:
    """The name /v1/models shows: the embedded model's name, or a file's stem / a folder's name."""
    if source is None:
        return default
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else (path.name or source)


def _check_serve_flags(args) -> None:
    from llmlab.common import LlmlabError

    if not 0 <= args.port <= 65535:
        raise LlmlabError(f"--port must be in [0, 65535], got {args.port}")
    if not 0 <= args.speculative_tokens <= 16:
        raise LlmlabError(f"--speculative-tokens must be in [0, 16], got {args.speculative_tokens}")
    if not args.drain_timeout >= 0:
        raise LlmlabError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    for flag in ("block_size", "max_num_seqs", "max_batched_tokens", "max_waiting", "max_n"):
        if getattr(args, flag) < 1:
            raise LlmlabError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def _embedding_backend(args, device: str):
    """The --embedding-model, loaded, as serve.http's EmbeddingModel; None without the flag."""
    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.formats.load import DEFAULT_EMBED
    from llmlab.serve.http import EmbeddingModel

    if args.embedding_model is None:
        return None
    enc = load(args.embedding_model, device=device)
    if enc.config.arch != "bert" or enc.tokenizer is None:
        raise LlmlabError(f"--embedding-model {args.embedding_model}: not an encoder with a tokenizer "
                          f"(e.g. {DEFAULT_EMBED})")

    def count_tokens(texts: list[str]) -> int:
        return sum(len(enc.tokenizer.encode(t, add_special=True)) for t in texts)

    return EmbeddingModel(_served_name(args.embedding_model, DEFAULT_EMBED), enc.embed, count_tokens)


def cmd_serve(args) -> int:
    """An OpenAI-compatible server (serve/http.py) on the continuous-batching engine (serve/engine.py)."""
    import uvicorn

    from llmlab.api import load
    from llmlab.common import LlmlabError
    from llmlab.formats.load import DEFAULT_CHAT
    from llmlab.serve.async_engine import AsyncEngine
    from llmlab.serve.engine import Engine, EngineConfig
    from llmlab.serve.http import create_app

    _check_serve_flags(args)
    llm = load(args.model, **_load_options(args))
    if args.packed:
        from llmlab.nn.packed_linear import keep_dense_

        # Packed GEMV for steps of few sequences (memory-bound), float32 GEMM for steps of many.
        keep_dense_(llm.model, min_rows=16)
    if not llm.config.is_causal or llm.tokenizer is None:
        raise LlmlabError(f"{args.model}: serve needs a text-generating model with a tokenizer (an encoder goes "
                          "in --embedding-model)")
    embedding = _embedding_backend(args, args.device)
    config = EngineConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache, max_num_seqs=args.max_num_seqs,
                          max_batched_tokens=args.max_batched_tokens, max_waiting=args.max_waiting, max_n=args.max_n,
                          prefix_caching=args.prefix_caching, speculative_tokens=args.speculative_tokens).validate()
    engine = AsyncEngine(Engine(llm.model, config))
    name = _served_name(args.model, DEFAULT_CHAT)
    app = create_app(engine, tokenizer=llm.tokenizer, model_name=name, render_chat=llm.render_chat,
                     stop_ids=llm.stop_ids(),
                     recommended_sampling=llm.loaded.sampling_defaults, embedding=embedding, api_key=args.api_key,
                     aliases=tuple({args.model, "default"} - {None, name}))
    # timeout_graceful_shutdown: after the drain, connections still open (idle keep-alives) get 5 s.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    server = _draining_server_class()(config, engine, args.drain_timeout, name)
    engine.start()
    try:
        server.run()
    finally:
        engine.shutdown()
    if not server.started:
        raise LlmlabError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    return 0


def _draining_server_class():
    """uvicorn.Server that drains the engine on SIGTERM / SIGINT (new requests 503, running ones finish or are
    aborted after the timeout), then exits cleanly; a second signal exits at once. Built lazily: uvicorn is
    imported only by the serve command."""
    import asyncio
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self, config, engine, drain_timeout: float, model_name: str):
            super().__init__(config)
            self.engine, self.drain_timeout, self.model_name = engine, drain_timeout, model_name
            self.loop = None
            self.draining = False

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"llmlab serve: http://{host}:{port} (model {self.model_name})", flush=True)

        def handle_exit(self, sig, frame):
            if self.draining or self.loop is None:  # second signal, or not serving yet: stop now
                self.should_exit = self.force_exit = True
                return
            self.draining = True
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self):
            try:
                await self.engine.drain(self.drain_timeout)
            finally:
                self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's re-raises the signal after shutdown; a drained server exits 0
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer


def cmd_t5_pretrain(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.loop import TrainConfig
    from llmlab.train.t5 import T5Flags, T5PretrainConfig, run_t5_pretrain

    result = run_t5_pretrain(from_args(T5PretrainConfig, args), from_args(T5Flags, args), from_args(TrainConfig, args))
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"llmlab: {result.stopped} at step {result.step}{val}; run folder {result.run_dir}", file=sys.stderr)
    return 130 if result.stopped == "interrupted" else 0


def cmd_t5_finetune(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.loop import TrainConfig
    from llmlab.train.t5 import T5FinetuneConfig, run_t5_finetune

    s = run_t5_finetune(from_args(T5FinetuneConfig, args), from_args(TrainConfig, args))
    print(f"{s['task']}: held-out exact match {100 * s['exact_match_before']:.1f}% -> "
          f"{100 * s['exact_match_after']:.1f}% ({s['method']}, {s['trainable_parameters']:,} trainable parameters)")
    return 0


def cmd_t5_generate(args) -> int:
    import torch

    from llmlab.common import LlmlabError
    from llmlab.infer.beam import beam_search
    from llmlab.infer.generate import generate
    from llmlab.models.t5 import Seq2SeqDecoder
    from llmlab.train.t5 import load_t5, resolve_base

    if args.max_new_tokens < 1 or args.beams < 1:
        raise LlmlabError("--max-new-tokens and --beams must be >= 1")
    loaded = load_t5(resolve_base(args.model))
    cfg, tok = loaded.config, loaded.tokenizer
    ids = tok.encode(args.text) + [cfg.eos_token_id]
    dec = Seq2SeqDecoder(loaded.model, torch.tensor([ids]), max_target_len=args.max_new_tokens)
    if args.beams > 1:
        out = beam_search(dec, [cfg.bos_token_id], args.max_new_tokens, args.beams, eos_ids={cfg.eos_token_id})[0].ids
    else:
        out = generate(dec, [[cfg.bos_token_id]], args.max_new_tokens, _sampling(args),
                       stop_ids={cfg.eos_token_id})[0].ids
    # Sentinels (<extra_id_N>, the ids above the tokenizer's) show as such: span corruption predicts them.
    pieces, run = [], []
    for t in out:
        if t == cfg.eos_token_id:
            break
        if t >= tok.vocab_size:
            pieces += [tok.decode(run, skip_special=True), f"<extra_id_{cfg.vocab_size - 1 - t}>"]
            run = []
        else:
            run.append(t)
    print("".join(pieces + [tok.decode(run, skip_special=True)]))
    return 0


def cmd_rnn_train(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.train.rnn_lm import ELMoRunConfig, RNNFlags, RNNRunConfig, RNNTrainConfig, run_recurrent

    elmo = args.command == "elmo"
    result = run_recurrent(from_args(ELMoRunConfig if elmo else RNNRunConfig, args), from_args(RNNFlags, args),
                           from_args(RNNTrainConfig, args), bidirectional=elmo)
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"llmlab: {result.stopped} at step {result.step}{val}; run folder {result.run_dir}", file=sys.stderr)
    return 130 if result.stopped == "interrupted" else 0


def cmd_rnn_generate(args) -> int:
    from llmlab.dataclass_io import from_args
    from llmlab.infer.sample import SamplingParams
    from llmlab.train.rnn_lm import generate_text, load_run

    print(generate_text(load_run(args.model), args.prompt, args.max_new_tokens, from_args(SamplingParams, args)))
    return 0


def cmd_elmo_senses(args) -> int:
    from llmlab.common import LlmlabError
    from llmlab.eval import word_senses
    from llmlab.train.rnn_lm import load_run

    loaded = load_run(args.model)
    if not loaded.model.bidirectional:
        raise LlmlabError(f"{args.model}: a forward-only LM; the senses need ELMo's two directions (a run of "
                          "'llmlab elmo train')")
    model = loaded.model
    if args.untrained:  # the control: the same architecture with its initial random weights
        import torch

        from llmlab.models.lstm_lm import RecurrentLM

        torch.manual_seed(args.untrained_seed)
        model = RecurrentLM("lstm", model.out_bias.numel(), model.dim, model.n_layers, bidirectional=True,
                            forget_bias=loaded.forget_bias).eval()  # initialised as the run was
    result = word_senses.evaluate(model, loaded.tokenizer)
    print(word_senses.report(result))
    print(f"picture: {word_senses.plot(result, word_senses.SENSES, args.out)}")
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
    _add_load_flags(s, kv_flag=False)
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

    s = sub.add_parser("attention", help="attention maps per layer and head for a text (PNG), whatever attention "
                                         "path the model runs")
    s.add_argument("text", help="the text to read the attention of")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--layers", default="ends", help="comma-separated layer indices (negative from the end), 'all', or "
                                                    "'ends' = first, middle and last (default: ends)")
    s.add_argument("--heads", default="all", help="comma-separated head indices or 'all' (default: all)")
    s.add_argument("--max-tokens", type=int, default=64, help="longest text in tokens (default: 64)")
    s.add_argument("--out", default="attention.png", help="output PNG (default: attention.png)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    s.set_defaults(func=cmd_attention)

    s = sub.add_parser("landscape", help="loss landscape along filter-normalised random directions (Li et al. "
                                         "2018): a curve or a surface, PNG + JSON")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--text", default="builtin", help="text to measure the loss on: a UTF-8 text or JSONL file, or "
                                                     "'builtin' = the fixed held-out text of the quantization table "
                                                     "(default: builtin)")
    s.add_argument("--windows", type=int, default=4, help="token windows the loss is averaged over (default: 4)")
    s.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    s.add_argument("--dims", type=int, default=1, help="1 = a curve, 2 = a surface (points^2 losses) (default: 1)")
    s.add_argument("--points", type=int, default=21, help="grid points per direction (default: 21)")
    s.add_argument("--span", type=float, default=0.2,
                   help="alpha (and beta) from -span to +span; at 0.25 SmolLM2's loss already triples (default: 0.2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the directions and the windows (default: 0)")
    s.add_argument("--out", default="landscape.png", help="output PNG; the numbers go beside it as .json "
                                                          "(default: landscape.png)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar (default: on)")
    s.set_defaults(func=cmd_landscape)

    s = sub.add_parser("report", help="regenerate a run folder's self-contained HTML report (curves, evaluations, "
                                      "summary, samples, figures)")
    s.add_argument("run", help="a training run folder (pretrain, sft, dpo, distill, embed train): RUN/report.html")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("rag", help="answer a question from an index's documents, citing them by number "
                                   "(built-in: the Python language reference)")
    s.add_argument("question", help="the question")
    s.add_argument("--index", default=RAG_INDEX, help="an index from 'llmlab index build'; the default is built on "
                                                      "first use from Python's help topics (pydoc_data) "
                                                      f"(default: {RAG_INDEX})")
    s.add_argument("--k", type=int, default=4, help="sources put in the prompt (default: 4)")
    s.add_argument("--mode", default="hybrid", choices=["dense", "bm25", "hybrid"],
                   help="retrieval: dense vectors, BM25, or both fused by reciprocal rank (default: hybrid)")
    s.add_argument("--rerank", action="store_true",
                   help="re-rank 12 candidates by the chat model's log p(question | chunk) (default: off)")
    s.add_argument("--compress", type=float, default=None, metavar="RATIO",
                   help="compress the retrieved sources to this fraction of their tokens with LongLLMLingua "
                        "before answering, in (0, 1] (default: off)")
    s.add_argument("--max-new-tokens", type=int, default=200, help="longest answer in tokens (default: 200)")
    s.add_argument("--json", action="store_true", help="one JSON object: answer, citations, sources (default: off)")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    _add_load_flags(s, packed_default=True)
    s.set_defaults(func=cmd_rag)

    s = sub.add_parser("compress-prompt", help="compress a prompt with a small LM's perplexities (LLMLingua, "
                                               "LongLLMLingua), or score compression on a built-in QA set (--eval)")
    s.add_argument("text", nargs="?", default=None,
                   help="the prompt; '-' or nothing reads standard input (default: standard input)")
    s.add_argument("--file", default=None, help="read the prompt from this UTF-8 file (default: none)")
    s.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of the prompt's tokens to keep, in (0, 1] (default: 0.5)")
    s.add_argument("--method", default=None, choices=["llmlingua", "longllmlingua"],
                   help="llmlingua: keep the most surprising tokens; longllmlingua: rank paragraphs and tokens by "
                        "what the question gains from them (needs --question) (default: llmlingua; --eval: both)")
    s.add_argument("--question", default="", help="a question kept whole at the end; LongLLMLingua ranks by it "
                                                  "(default: none)")
    s.add_argument("--instruction", default="", help="an instruction kept whole at the start (default: none)")
    s.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                   help="treat blank-line-separated paragraphs as documents the coarse step may drop (default: on)")
    s.add_argument("--window", type=int, default=200,
                   help="tokens per iterative compression window (default: 200)")
    s.add_argument("--json", action="store_true",
                   help="one JSON object (or the --eval rows): compressed prompt, token counts, ratio (default: off)")
    s.add_argument("--eval", action="store_true",
                   help="instead: accuracy vs ratio on the built-in needle QA set over Python's help topics "
                        "(default: off)")
    s.add_argument("--ratios", default="1,0.5,0.33", help="with --eval: ratios to score (default: 1,0.5,0.33)")
    s.add_argument("--limit", type=int, default=12, help="with --eval: questions (default: 12)")
    s.add_argument("--docs", type=int, default=4, help="with --eval: documents per question (default: 4)")
    s.add_argument("--chars", type=int, default=500, help="with --eval: characters per document (default: 500)")
    s.add_argument("--rag", action="store_true",
                   help="with --eval: also RAG over an index of the documents, with and without compressing the "
                        "retrieved sources (default: off)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="with --eval: answer length in tokens (default: 32)")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    _add_load_flags(s, packed_default=True, kernel_default="int8")  # the compressor's fast path (lingua.fast_compute)
    s.set_defaults(func=cmd_compress_prompt)
    s = sub.add_parser("detect", help="is a text machine-generated? likelihood, log-rank, entropy and "
                                      "Fast-DetectGPT's curvature under a causal LM, or their ROC-AUC on a built-in "
                                      "set (--eval)")
    s.add_argument("text", nargs="?", default=None,
                   help="the text; '-' or nothing reads standard input (default: standard input)")
    s.add_argument("--file", default=None, help="read the text from this UTF-8 file (default: none)")
    s.add_argument("--thresholds", default=None, metavar="FILE",
                   help="the detect.json of an 'llmlab detect --eval' run, for the verdicts (default: the built-in "
                        "SmolLM2-135M-Instruct thresholds, for that model only)")
    s.add_argument("--json", action="store_true", help="one JSON object: each statistic, threshold, verdict "
                                                        "(default: off)")
    s.add_argument("--eval", action="store_true",
                   help="instead: ROC-AUC of each statistic on human standard-library docstrings vs the model's "
                        "own continuations of their first tokens, and a ROC-curve PNG (default: off)")
    s.add_argument("--n", type=int, default=40, help="with --eval: passages, each a human and a machine text "
                                                     "(default: 40)")
    s.add_argument("--prefix-tokens", type=int, default=30,
                   help="tokens that are context only, not scored: with --eval the prompt taken from each human "
                        "passage; on a text its first ones (half of a shorter text) (default: 30)")
    s.add_argument("--new-tokens", type=int, default=96, help="with --eval: tokens of each continuation, human and "
                                                              "machine (default: 96)")
    s.add_argument("--temperature", type=float, default=1.0, help="with --eval: sampling temperature of the machine "
                                                                  "continuations (default: 1.0)")
    s.add_argument("--top-p", type=float, default=1.0, help="with --eval: nucleus sampling of the machine "
                                                            "continuations, in (0, 1] (default: 1.0 = off)")
    s.add_argument("--seed", type=int, default=0, help="with --eval: sampling seed, combined with each passage's "
                                                       "name (default: 0)")
    s.add_argument("--out", default="detect-eval", help="with --eval: output folder: detect.json, roc.png, the "
                                                        "cached continuations (default: detect-eval)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="with --eval: progress bar with ETA (default: on)")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    _add_load_flags(s, packed_default=True)
    s.set_defaults(func=cmd_detect)

    s = sub.add_parser("kg", help="knowledge-graph retrieval: triples from documents (rules or the chat model "
                                  "under a JSON-schema constraint) in SQLite, a question's neighbourhood as context",
                       description="Build a triple graph from documents, query a question's neighbourhood, answer "
                                   "from it, or measure it against plain RAG on the built-in multi-hop questions "
                                   "(Python's exception classes).")
    ksub = s.add_subparsers(dest="kg_command", required=True, parser_class=_Parser)
    k_build = ksub.add_parser("build", help="extract triples from files and folders into a new graph")
    k_query = ksub.add_parser("query", help="the entities a question links to and their neighbourhood")
    k_ask = ksub.add_parser("ask", help="answer a question from the graph (or plain RAG, or both), citing sources")
    k_eval = ksub.add_parser("eval", help="KG vs plain RAG vs both on the built-in multi-hop questions")
    k_build.add_argument("sources", nargs="*", help="files and folders (default: one file per exception class "
                                                    f"of Python, written to {KG_DOCS})")
    k_build.add_argument("--extractor", default="rules", choices=["rules", "model"],
                         help="rules = patterns (class lines, 'X is a subclass of Y', 'Base class for ...'); "
                              "model = the chat model, constrained to the triple-list JSON schema (default: rules)")
    k_build.add_argument("--max-new-tokens", type=int, default=96,
                         help="with --extractor model: most tokens of JSON per chunk (default: 96)")
    k_build.add_argument("--graph", default=KG_GRAPH, help=f"the new graph's folder (default: {KG_GRAPH})")
    for kp in (k_query, k_ask, k_eval):
        kp.add_argument("--graph", default=KG_GRAPH, help=f"the graph folder; the default one is built with rules "
                                                          f"over the built-in documents on first use "
                                                          f"(default: {KG_GRAPH})")
    for kp in (k_query, k_ask, k_eval):
        kp.add_argument("--hops", type=float, default=3.0, help="largest path cost from a linked entity: an edge "
                                                               "forward costs 1, backward 2 (default: 3)")
        kp.add_argument("--max-triples", type=int, default=12, help="context lines at most (default: 12)")
    for kp in (k_ask, k_eval):
        kp.add_argument("--index", default=KG_INDEX, help="the plain-RAG index (hybrid search); the default is "
                                                         f"built over the built-in documents on first use "
                                                         f"(default: {KG_INDEX})")
        kp.add_argument("--k", type=int, default=4, help="chunks plain RAG puts in the prompt (default: 4)")
    k_query.add_argument("question", help="the question")
    k_query.add_argument("--json", action="store_true", help="one JSON object (default: off)")
    k_ask.add_argument("question", help="the question")
    k_ask.add_argument("--context", default="kg", choices=["kg", "rag", "both"],
                       help="the sources: graph triples (plain RAG when no entity links), RAG chunks, or both "
                            "(default: kg)")
    k_ask.add_argument("--json", action="store_true", help="one JSON object: answer, citations, sources "
                                                            "(default: off)")
    k_eval.add_argument("--split", default="test", choices=["dev", "test", "all"],
                        help="the fixed split of the built-in questions (default: test)")
    k_eval.add_argument("--limit", type=int, default=0, help="first N questions; 0 = all (default: 0)")
    k_eval.add_argument("--no-answer", action="store_true",
                        help="retrieval recall only, no chat model (default: off)")
    k_eval.add_argument("--output", default=None, help="write every question's record as JSON here "
                                                       "(default: none)")
    k_eval.add_argument("--json", action="store_true", help="the summary as JSON (default: off)")
    for kp, default in ((k_build, 96), (k_ask, 48), (k_eval, 24)):
        if kp is not k_build:
            kp.add_argument("--max-new-tokens", type=int, default=default,
                           help=f"longest answer in tokens (default: {default})")
        kp.add_argument("--model", default=None, help=MODEL_HELP)
        _add_load_flags(kp, packed_default=True)
    k_build.set_defaults(func=cmd_kg_build)
    k_query.set_defaults(func=cmd_kg_query)
    k_ask.set_defaults(func=cmd_kg_ask)
    k_eval.set_defaults(func=cmd_kg_eval)

    s = sub.add_parser("convert", help="convert between GGUF and Hugging Face folders")
    s.add_argument("source", help="input: .gguf file, Hugging Face folder or embedded model name")
    s.add_argument("output", help="output: a path ending in .gguf writes GGUF, anything else a HF folder")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of a Hugging Face output folder (default: float32)")
    s.add_argument("--qtype", default="F16",
                   choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"],
                   help="type of 2-D weights in a GGUF output, quantized as llama.cpp's llama-quantize would "
                        "(Q4_K, Q5_K: its Q4_K_M, Q5_K_M mixtures; the head Q6_K; rows that do not fit a type's "
                        "blocks fall back) (default: F16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("merge", help="fold a LoRA adapter (an sft run folder or adapter folder) into its base "
                                     "and write an HF folder or a GGUF")
    s.add_argument("source", help="an llmlab sft run folder or a PEFT LoRA adapter folder")
    s.add_argument("--out", default=None, help="output: a path ending in .gguf writes GGUF, anything else a "
                                               "HF folder (default: RUN/merged, or ADAPTER-merged beside it)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of a Hugging Face output folder (default: float32)")
    s.add_argument("--qtype", default="F16",
                   choices=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"],
                   help="type of 2-D weights in a GGUF output, as for llmlab convert (default: F16)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("quantize", help="post-training quantization (absmax, zero-point, RTN, GPTQ, NF4, LLM.int8(), "
                                        "SmoothQuant, ZeroQuant) into a quantized model folder")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--method", default="gptq",
                   choices=["absmax", "zeropoint", "rtn", "gptq", "nf4", "llm-int8", "smoothquant", "zeroquant"],
                   help="absmax / zeropoint: symmetric / asymmetric round-to-nearest; rtn: round-to-nearest on "
                        "GPTQ's grid; gptq: error-compensating (calibrated); nf4: QLoRA's 4-bit NormalFloat; "
                        "llm-int8: int8 with float outlier columns; smoothquant: W8A8 with activation outliers "
                        "migrated into the weights (calibrated); zeroquant: group-wise weights + per-token "
                        "activations (default: gptq)")
    s.add_argument("--bits", type=int, default=None,
                   help="weight bits (default per method: 4 for rtn, gptq, nf4; 8 otherwise)")
    s.add_argument("--group-size", type=int, default=None,
                   help="input columns sharing a scale; 0 = per output channel, -1 = per tensor (default per "
                        "method: 32 for rtn and gptq, 64 for nf4 and zeroquant, per channel otherwise)")
    s.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid around 0 (no zero-points) (default per method: on for absmax, nf4, "
                        "llm-int8, smoothquant, zeroquant; off for zeropoint, rtn, gptq)")
    s.add_argument("--act", choices=["none", "token"], default=None,
                   help="activations: token = int8 per token at run time (W8A8; with absmax: naive W8A8) "
                        "(default: none; token for smoothquant and zeroquant)")
    s.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default: 0.5)")
    s.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold (default: 6.0)")
    s.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (default: 0.01)")
    s.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal (default: off)")
    s.add_argument("--lkd-steps", type=int, default=0,
                   help="ZeroQuant layer-by-layer distillation steps per block; 0 = off (default: 0)")
    s.add_argument("--calib", default="builtin",
                   help="calibration text: 'builtin' (Python standard-library docstrings) or a text/JSONL file "
                        "(default: builtin)")
    s.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    s.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    s.add_argument("--float-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the tensors left in float (embeddings; norms stay float32) (default: float16)")
    s.add_argument("--out", required=True, help="output folder (a Hugging Face folder with the scheme in config.json)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("prune", help="unstructured or N:M pruning (magnitude, Wanda, SparseGPT) into an ordinary "
                                     "float model folder, or structured pruning (LLM-Pruner, LoRAPrune) into a "
                                     "smaller dense model")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt", "llm-pruner", "loraprune"],
                   help="magnitude: zero the smallest |W| (no calibration); wanda: the lowest |W| x input norm per "
                        "output row (calibrated); sparsegpt: OBS pruning with weight updates from the calibration "
                        "Hessian (calibrated); llm-pruner: remove heads and FFN channels by Taylor importance "
                        "(structured, optional LoRA recovery); loraprune: remove them while LoRA fine-tunes, by "
                        "LoRA-gradient importance (structured) (default: wanda)")
    s.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each layer's weights to zero, in [0, 1) (default: 0.5; an N:M pattern sets "
                        "it to 1 - N/M); llm-pruner / loraprune: the share of each block's query heads (per KV "
                        "group) or KV groups and FFN channels removed, rounded to whole units (default: 0.2)")
    s.add_argument("--heads", default="query", choices=["query", "kv", "none"],
                   help="llm-pruner / loraprune: what attention loses: query heads (the same count from every KV "
                        "group), whole KV groups, or nothing (default: query)")
    s.add_argument("--recover-steps", type=int, default=None,
                   help="llm-pruner: LoRA recovery steps after pruning (0 = none); loraprune: the fine-tune's steps, "
                        "during which it prunes (default: 0 for llm-pruner, 20 for loraprune)")
    s.add_argument("--lora-rank", type=int, default=8, help="llm-pruner / loraprune: LoRA rank (default: 8)")
    s.add_argument("--recover-lr", type=float, default=1e-4, help="LoRA learning rate (default: 1e-4)")
    s.add_argument("--recover-batch", type=int, default=4, help="LoRA windows per step (default: 4)")
    s.add_argument("--ppl-tokens", type=int, default=4096,
                   help="held-out tokens the LoRA run's before / after perplexity is measured on (default: 4096)")
    s.add_argument("--pattern", default="unstructured",
                   help="unstructured, or N:M: keep N of every M consecutive input weights, e.g. 2:4 or 4:8 "
                        "(default: unstructured)")
    s.add_argument("--compare", default=None, choices=["row", "layer"],
                   help="unstructured magnitude / wanda: compare scores per output row or over the whole layer "
                        "(default: layer for magnitude, row for wanda)")
    s.add_argument("--damp", type=float, default=0.01,
                   help="SparseGPT dampening, a fraction of the mean Hessian diagonal (default: 0.01)")
    s.add_argument("--block-size", type=int, default=128,
                   help="SparseGPT: columns per block whose mask is chosen together (default: 128)")
    s.add_argument("--calib", default="builtin",
                   help="calibration text for wanda / sparsegpt: 'builtin' (Python standard-library docstrings) or "
                        "a text/JSONL file (default: builtin)")
    s.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    s.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="tensor dtype of the output folder (default: float32)")
    s.add_argument("--out", required=True, help="output folder (a Hugging Face folder + prune_report.json, "
                                                "summary.md)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("lowrank", help="truncated-SVD factorisation of linear layers (plain SVD or SVD-LLM's "
                                       "whitened SVD), with optional recovery fine-tune and 8/4-bit factors")
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument("--method", default="svd", choices=["svd", "svd-llm"],
                   help="svd: truncated SVD of W (least weight error); svd-llm: SVD of W whitened by the Cholesky "
                        "factor of the calibration Hessian (least output error on the calibration inputs) "
                        "(default: svd)")
    s.add_argument("--rank", type=int, default=None,
                   help="the rank of every chosen layer, 1 .. min(in, out) (default: none; give --rank or --energy)")
    s.add_argument("--energy", type=float, default=None,
                   help="per layer, the smallest rank whose squared singular values keep this share of the total, "
                        "in (0, 1] (default: none; give --rank or --energy)")
    s.add_argument("--layers", default="all",
                   help="which linear layers inside the blocks: all, mlp, attn, or comma-separated names such as "
                        "q_proj,up_proj or layers.3.mlp.down_proj (default: all)")
    s.add_argument("--damp", type=float, default=0.01,
                   help="svd-llm: dampening added to the Hessian diagonal, a fraction of its mean (default: 0.01)")
    s.add_argument("--factor-bits", type=int, default=0, choices=[0, 4, 8],
                   help="quantize both factors with round-to-nearest per output channel; 0 = float (default: 0)")
    s.add_argument("--recover-steps", type=int, default=0,
                   help="recovery fine-tune of the factors on the calibration text, in optimizer steps; 0 = none "
                        "(default: 0)")
    s.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate (default: 1e-4)")
    s.add_argument("--recover-batch", type=int, default=4, help="recovery windows per step (default: 4)")
    s.add_argument("--ppl-tokens", type=int, default=4096,
                   help="held-out tokens the recovery's before / after perplexity is measured on (default: 4096)")
    s.add_argument("--calib", default="builtin",
                   help="calibration text for svd-llm and recovery: 'builtin' (Python standard-library docstrings) "
                        "or a text/JSONL file (default: builtin)")
    s.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: 32)")
    s.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the float tensors in the output folder (default: float32)")
    s.add_argument("--out", required=True, help="output folder (a low-rank Hugging Face folder + "
                                                "lowrank_report.json, summary.md)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output (default: off)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    s.set_defaults(func=cmd_lowrank)

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
    d = dsub.add_parser("rationales", help="a teacher's chain-of-thought rationales (filtered by the verified answer) "
                                           "or few-shot answers on a built-in task, as JSONL for llmlab sft",
                        description="Distillation data (Fine-tune-CoT; in-context-learning distillation). With no "
                                    "flags: SmolLM2-135M-Instruct writes 4 sampled 'Let's think step by step' "
                                    "rationales for each of 32 letter_count training questions; those whose answer "
                                    "verifies go to data/rationales.jsonl. Train a student on it with 'llmlab sft "
                                    "--model STUDENT --method full data/rationales.jsonl'.")
    if wanted("data"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.rationales import RationalesConfig

        add_flags(d, RationalesConfig)
    d.set_defaults(func=cmd_data_rationales)
    d = dsub.add_parser("self-instruct", help="Self-Instruct / Alpaca: new instructions, inputs and outputs written by "
                                              "a model from seed tasks, filtered (ROUGE-L novelty, heuristics) -> "
                                              "JSONL for llmlab sft")
    if wanted("data"):
        from llmlab.data.self_instruct import SelfInstructConfig
        from llmlab.dataclass_io import add_flags

        add_flags(d, SelfInstructConfig, unset={"seeds": "the 36 built-in seed tasks"})
        d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bar with examples/s and ETA (default: on)")
        _add_load_flags(d, packed_default=True)
    d.set_defaults(func=cmd_data_self_instruct)
    d = dsub.add_parser("preferences", help="preference pairs: sample k replies per prompt, rank them with a "
                                            "task's verifier or a reward model -> prompt/chosen/rejected JSONL")
    d.add_argument("paths", nargs="*", metavar="FILE", help="TRL-style JSONL files whose 'prompt' fields are "
                                                           "used; needs --reward-model (default: none: --task)")
    d.add_argument("--out", default="preferences.jsonl", help="output JSONL, read by llmlab dpo "
                                                             "(default: preferences.jsonl)")
    d.add_argument("--model", default="smollm2-135m-instruct", help="the model that samples the replies "
                                                                    "(default: smollm2-135m-instruct)")
    d.add_argument("--task", default="addition", help="built-in verifiable task for prompts and the verifier "
                                                      "(default: addition)")
    d.add_argument("--prompts", type=int, default=32, help="prompts drawn from --task (default: 32)")
    d.add_argument("--k", type=int, default=4, help="replies sampled per prompt, at least 2 (default: 4)")
    d.add_argument("--reward-model", default="", help="an llmlab reward run that scores the replies instead of the "
                                                      "verifier (default: none)")
    d.add_argument("--max-new-tokens", type=int, default=64, help="token budget of each reply (default: 64)")
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    d.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    d.add_argument("--seed", type=int, default=0, help="seed for prompt choice and sampling (default: 0)")
    d.add_argument("--force", action="store_true", help="overwrite an existing --out (default: off)")
    _add_load_flags(d, packed_default=True)
    d.set_defaults(func=cmd_data_preferences)

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

    s = sub.add_parser("t5", help="the T5 encoder-decoder: span-corruption pretraining, text-to-text fine-tuning "
                                  "(full or prefix tuning), generation")
    t5sub = s.add_subparsers(dest="t5_command", required=True, parser_class=_Parser)
    t_pre = t5sub.add_parser("pretrain", help="pretrain a small T5 with span corruption (15%% noise, mean span 3) on "
                                              "token shards (default: the Python stdlib corpus)")
    t_ft = t5sub.add_parser("finetune", help="fine-tune a T5 run on a built-in task (full or prefix tuning); "
                                             "held-out exact match before and after in RUN/summary.md")
    t_gen = t5sub.add_parser("generate", help="answer one input text with a T5 folder or run (greedy, sampling or "
                                              "beam search)")
    t_gen.add_argument("text", help="the input text (the encoder's side)")
    t_gen.add_argument("--model", default="runs/t5-finetune", help="a T5 run folder (its newest checkpoint) or a "
                                                                    "T5 model folder (default: runs/t5-finetune)")
    t_gen.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default: 32)")
    t_gen.add_argument("--beams", type=int, default=1, help="beam search width; 1 = off (default: 1)")
    if wanted("t5"):
        from llmlab.dataclass_io import add_flags
        from llmlab.infer.sample import SamplingParams
        from llmlab.train.loop import TrainConfig
        from llmlab.train.t5 import T5FinetuneConfig, T5Flags, T5PretrainConfig

        add_flags(t_pre, T5PretrainConfig)
        add_flags(t_pre, T5Flags)
        add_flags(t_pre, TrainConfig)
        add_flags(t_ft, T5FinetuneConfig)
        add_flags(t_ft, TrainConfig)
        add_flags(t_gen, SamplingParams)
    t_pre.set_defaults(func=cmd_t5_pretrain)
    t_ft.set_defaults(func=cmd_t5_finetune)
    t_gen.set_defaults(func=cmd_t5_generate)

    s = sub.add_parser("rnn", help="recurrent language models (LSTM, GRU, Elman RNN) on the training loop: train, "
                                   "generate")
    rsub = s.add_subparsers(dest="rnn_command", required=True, parser_class=_Parser)
    r_train = rsub.add_parser("train", help="train a forward LSTM / GRU / RNN language model on token shards "
                                            "(default: the Python stdlib corpus)")
    r_gen = rsub.add_parser("generate", help="continue a prompt with a trained recurrent LM (carrying its state)")
    r_gen.add_argument("prompt", nargs="?", default="def ", help="text to continue (default: 'def ')")
    r_gen.add_argument("--model", default="runs/rnn", help="a run folder of 'llmlab rnn train' (default: runs/rnn)")
    r_gen.add_argument("--max-new-tokens", type=int, default=60, help="most tokens to generate (default: 60)")
    s = sub.add_parser("elmo", help="ELMo: a bidirectional LSTM LM and its layer-mixed contextual word vectors "
                                    "(Peters et al. 2018): train, senses")
    esub = s.add_subparsers(dest="elmo_command", required=True, parser_class=_Parser)
    e_train = esub.add_parser("train", help="train the forward and backward LSTM LMs (shared embedding and softmax) "
                                            "on token shards (default: the Python stdlib corpus)")
    e_senses = esub.add_parser("senses", help="do the contextual vectors tell two senses of a word apart? Accuracy "
                                              "per layer vs the static embedding, and a 2-D picture (PNG)")
    e_senses.add_argument("--model", default="runs/elmo", help="a run folder of 'llmlab elmo train' "
                                                               "(default: runs/elmo)")
    e_senses.add_argument("--out", default="runs/elmo/senses.png", help="the picture (default: runs/elmo/senses.png)")
    e_senses.add_argument("--untrained", action="store_true", help="the control: score a freshly initialised model "
                                                                  "of the run's shape instead (default: off)")
    e_senses.add_argument("--untrained-seed", type=int, default=0, help="seed of that model (default: 0)")
    for t in (r_train, r_gen, e_train, e_senses):
        t.add_argument("--threads", type=_threads, default=1, metavar="N",
                       help="CPU threads for PyTorch; 0 = one per physical core; a recurrent step is many small "
                            "operations, fastest on one thread on a loaded 2-core machine (default: 1)")
    if wanted("rnn") or wanted("elmo"):
        from llmlab.dataclass_io import add_flags
        from llmlab.infer.sample import SamplingParams
        from llmlab.train.rnn_lm import ELMoRunConfig, RNNFlags, RNNRunConfig, RNNTrainConfig

        add_flags(r_train, RNNRunConfig)
        add_flags(r_train, RNNFlags)
        add_flags(r_train, RNNTrainConfig)
        add_flags(r_gen, SamplingParams)
        add_flags(e_train, ELMoRunConfig)
        add_flags(e_train, RNNFlags, skip=("cell",))
        add_flags(e_train, RNNTrainConfig)
    r_train.set_defaults(func=cmd_rnn_train)
    r_gen.set_defaults(func=cmd_rnn_generate)
    e_train.set_defaults(func=cmd_rnn_train)
    e_senses.set_defaults(func=cmd_elmo_senses)

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

    s = sub.add_parser("head", help="fine-tune a BERT encoder with a task head: classify, ner (BIO tags) or qa "
                                    "(answer spans); held-out accuracy / entity F1 / SQuAD EM and F1 before and after",
                       description="Task heads on a BERT encoder (all-minilm-l6-v2 by default), fine-tuned in full, "
                                   "with LoRA / QLoRA, Houlsby adapters, prompt or prefix tuning through the training "
                                   "loop. Built-in tasks: classify (which standard-"
                                   "library module a docstring is from), ner (generated sentences: PER, LOC, ORG, "
                                   "MOD), qa (questions on the Python help topics, long contexts read in sliding "
                                   "windows); or --data FILE. The result, RUN/model, is a transformers "
                                   "BertFor{SequenceClassification,TokenClassification,QuestionAnswering} folder; "
                                   "adapter / prompt / prefix add llmlab_peft.* to it, which only llmlab reads.")
    s.add_argument("--threads", type=_threads, default=0, metavar="N",
                   help="CPU threads for PyTorch; 0 = one per physical core (default: 0)")
    if wanted("head"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.heads import HeadConfig, HeadTrainConfig

        add_flags(s, HeadConfig)
        add_flags(s, HeadTrainConfig, skip=("seq_len",))
    s.set_defaults(func=cmd_head)

    s = sub.add_parser("dpo", help="align a chat model on preference pairs: DPO, conservative DPO, IPO (LoRA by "
                                   "default); scores held-out exact match",
                       description="Direct preference optimization. With no flags: LoRA on SmolLM2-135M-Instruct on "
                                   "pairs from the built-in addition task (chosen = the exact answer, rejected = a "
                                   "near miss), reference log-probabilities computed once before training, held-out "
                                   "exact match before and after in RUN/summary.md. Data: TRL-style JSONL "
                                   "(prompt / chosen / rejected, strings or message lists).")
    if wanted("dpo"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.dpo import DPOConfig, DPOTrainConfig

        s.add_argument("paths", nargs="*", metavar="FILE", help="preference JSONL files or folders (default: none, "
                                                               "pairs from --task)")
        add_flags(s, DPOConfig)
        add_flags(s, DPOTrainConfig)
    s.set_defaults(func=cmd_dpo)

    s = sub.add_parser("distill", help="train a smaller student on a teacher's distributions: KD, reverse KL, "
                                       "MiniLLM, GKD, hidden-state matching (TinyBERT)",
                       description="Knowledge distillation. With no flags: the smollm2-tiny preset (4 blocks x 256, "
                                   "SmolLM2's vocabulary) learns from SmolLM2-135M-Instruct by forward KL on the "
                                   "Python stdlib tokenized with the teacher's tokenizer (data/stdlib-smollm2, "
                                   "prepared if missing); held-out perplexity in RUN/summary.md. --loss ce trains the "
                                   "same student on the same tokens without a teacher; --loss minillm is MiniLLM's "
                                   "policy-gradient objective on teacher-mixed samples.")
    if wanted("distill"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.distill import DistillConfig, DistillTrainConfig

        add_flags(s, DistillConfig)
        add_flags(s, DistillTrainConfig)
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("eval", help="evaluate language models and encoders: perplexity, multiple choice, generation, "
                                    "retrieval, STS; one table, saved as JSON and Markdown",
                       description="Evaluate models on built-in tasks (no download) or local JSONL files. With no "
                                   "MODEL: SmolLM2-135M-Instruct on heldout-ppl, stdlib-mc, addition and "
                                   "all-MiniLM-L6-v2 on retrieval. The table is printed and saved with the settings "
                                   "and machine: runs/eval/<UTC time>.json and .md unless --output names the file.")
    s.add_argument("models", nargs="*", metavar="MODEL",
                   help="models to evaluate: " + MODEL_HELP.replace(" (default: smollm2-135m-instruct)", "")
                        + " (default: both embedded models, each on its kind's tasks)")
    s.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype of the scored tasks (perplexity, multiple choice, encoders; "
                        "generation too with --no-packed) (default: float32)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    s.add_argument("--threads", type=_threads, default=0, metavar="N",
                   help="CPU threads for PyTorch; 0 = one per physical core (default: 0)")
    if wanted("eval"):
        from llmlab.dataclass_io import add_flags
        from llmlab.eval.harness import EvalConfig

        add_flags(s, EvalConfig)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on an llmlab model (the harness's own "
                                       "prompts and metrics; needs the lm_eval package)",
                       description="lm-evaluation-harness with an llmlab model as its backend "
                                   "(llmlab/eval/lm_eval_backend.py). Offline, give tasks whose data are local "
                                   "files: a folder of task YAML files with --include-path.")
    s.add_argument("model", nargs="?", default=None, help="model: " + MODEL_HELP)
    s.add_argument("--tasks", default="llmlab_stdlib_mc",
                   help="comma-separated lm-eval task names; llmlab_stdlib_mc is llmlab eval's built-in stdlib-mc "
                        "as an lm-eval task (default: llmlab_stdlib_mc)")
    s.add_argument("--include-path", default=None,
                   help="folder of extra lm-eval task YAML files (default: none, lm-eval's own tasks only)")
    s.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples; none = each task's own "
                                                                 "(default: None)")
    s.add_argument("--limit", type=float, default=None,
                   help="examples per task: a count >= 1 or a fraction < 1; none = all (default: None)")
    s.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default: 16)")
    s.add_argument("--seed", type=int, default=1234, help="seed of few-shot sampling and generation (default: 1234)")
    s.add_argument("--output", default=None, help="write lm-eval's results as JSON here (default: none)")
    s.set_defaults(func=cmd_lm_eval)

    s = sub.add_parser("reward", help="train a reward model (Bradley-Terry, scalar head on the LM) on preference "
                                      "pairs (LoRA by default)",
                       description="Reward modelling as in InstructGPT. With no flags: LoRA + a scalar head on "
                                   "SmolLM2-135M-Instruct, pairs from the built-in addition task (chosen = the exact "
                                   "answer, rejected = a near miss); validation accuracy before and after in "
                                   "RUN/summary.md. Data: TRL-style JSONL (prompt / chosen / rejected). The run "
                                   "scores replies for llmlab ppo --reward-model RUN.")
    if wanted("reward"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.reward import RewardConfig, RewardTrainConfig

        s.add_argument("paths", nargs="*", metavar="FILE", help="preference JSONL files or folders (default: none, "
                                                               "pairs from --task)")
        add_flags(s, RewardConfig)
        add_flags(s, RewardTrainConfig)
    s.set_defaults(func=cmd_reward)

    s = sub.add_parser("ppo", help="RLHF: PPO (value head, GAE, KL penalty) or GRPO on a built-in verifiable task, "
                                   "rewarded by its verifier or a reward model",
                       description="PPO / GRPO on a chat model with LoRA. With no flags: PPO on SmolLM2-135M-Instruct, "
                                   "prompts and exact rewards from the built-in addition task, KL to the reference "
                                   "(LoRA switched off); held-out exact match, reward and KL before and after in "
                                   "RUN/summary.md, curves in RUN/rl_curves.png. --algo grpo: group-relative "
                                   "advantages, no value head. --reward-model RUN: score with an llmlab reward run.")
    if wanted("ppo"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.ppo import PPOConfig, PPOTrainConfig

        add_flags(s, PPOConfig)
        add_flags(s, PPOTrainConfig)
    s.set_defaults(func=cmd_ppo)

    s = sub.add_parser("scaling", help="mini scaling-law sweep: several model sizes, loss fitted vs parameters "
                                       "and compute, plotted")
    if wanted("scaling"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.scaling import ScalingConfig

        add_flags(s, ScalingConfig)
    s.set_defaults(func=cmd_scaling)

    s = sub.add_parser("text", help="classic NLP: TF-IDF features, a linear classifier, a Kneser-Ney n-gram LM",
                       description="Classic NLP on the built-in corpus (docstrings of the Python standard library) "
                                   "or your files.")
    xsub = s.add_subparsers(dest="text_command", required=True, parser_class=_Parser)
    t_tfidf = xsub.add_parser("tfidf", help="bag-of-words / TF-IDF / n-gram features: a summary, each document's "
                                            "top terms, or the documents nearest a query")
    t_tfidf.add_argument("inputs", nargs="*", help="text files (documents split at blank lines) or JSONL files "
                                                   "('text' field) (default: the built-in docstrings)")
    t_tfidf.add_argument("--query", default=None, help="print the documents most similar to this text (default: none)")
    t_tfidf.add_argument("--show", type=int, default=3, help="documents to print (default: 3)")
    t_tfidf.add_argument("--top", type=int, default=8, help="top-weighted terms per printed document (default: 8)")
    t_tfidf.set_defaults(func=cmd_text_tfidf)
    t_cls = xsub.add_parser("classify", help="logistic regression on text features; held-out accuracy (default "
                                             "task: which standard-library module a docstring comes from)")
    t_cls.add_argument("--data", default=None, help="a JSONL file of {\"text\", \"label\"} objects; a fixed fifth "
                                                    "is held out (default: the built-in task)")
    t_cls.add_argument("--top-terms", type=int, default=0,
                       help="print this many highest-weighted terms per class (default: 0)")
    t_cls.set_defaults(func=cmd_text_classify)
    t_lm = xsub.add_parser("ngram-lm", help="an interpolated Kneser-Ney n-gram language model: held-out perplexity "
                                            "and samples")
    t_lm.add_argument("inputs", nargs="*", help="training text files or JSONL files ('text' field) (default: the "
                                                "built-in docstrings' training split)")
    t_lm.add_argument("--heldout", default=None, help="held-out text file (default: the built-in held-out split; "
                                                      "with your own files, every tenth sentence)")
    t_lm.add_argument("--samples", type=int, default=0, help="sentences to sample from the model (default: 0)")
    t_lm.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    t_lm.set_defaults(func=cmd_text_ngram_lm)
    for t in (t_tfidf, t_cls, t_lm):
        t.add_argument("--threads", type=_threads, default=1, metavar="N",
                       help="CPU threads for PyTorch; 0 = one per physical core; small sparse problems run fastest "
                            "on one (default: 1)")
    if wanted("text"):
        from llmlab.dataclass_io import add_flags
        from llmlab.text.classify import ClassifyConfig
        from llmlab.text.features import FeatureConfig
        from llmlab.text.ngram_lm import NgramConfig

        add_flags(t_tfidf, FeatureConfig)
        add_flags(t_cls, FeatureConfig)
        add_flags(t_cls, ClassifyConfig)
        add_flags(t_lm, NgramConfig)

    s = sub.add_parser("vectors", help="word vectors: word2vec (skip-gram, CBOW), GloVe, fastText; neighbours, "
                                       "analogies, evaluation, a 2-D plot",
                       description="Word vectors trained on the built-in corpus (Python help topics and "
                                   "standard-library docstrings) or your files.")
    vsub = s.add_subparsers(dest="vectors_command", required=True, parser_class=_Parser)
    v_train = vsub.add_parser("train", help="train word vectors and score them on the built-in test set")
    v_train.add_argument("inputs", nargs="*", help="text files (documents split at blank lines) or JSONL files "
                                                   "('text' field) (default: the built-in corpus)")
    v_train.add_argument("--out", default="runs/vectors", help="the vectors folder to write (default: runs/vectors)")
    v_train.add_argument("--sg", dest="arch", action="store_const", const="sg", default="sg",
                         help="skip-gram, the same as --arch sg (default: sg)")
    v_train.add_argument("--cbow", dest="arch", action="store_const", const="cbow", default="sg",
                         help="CBOW, the same as --arch cbow (default: sg)")
    v_train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                         help="a progress bar with words/s and ETA on standard error (default: on)")
    v_train.set_defaults(func=cmd_vectors_train)
    v_nb = vsub.add_parser("neighbors", help="the nearest words by cosine")
    v_nb.add_argument("words", nargs="+", help="one or more words")
    v_an = vsub.add_parser("analogy", help="a : b :: c : ?  (3CosAdd: the word nearest b - a + c)")
    for name in ("a", "b", "c"):
        v_an.add_argument(name, help=f"the word {name}")
    v_ev = vsub.add_parser("eval", help="similarity and analogy accuracy on the built-in test set")
    v_ev.add_argument("--test-set", default=None, help="a test set in the built-in one's format "
                                                       "(default: the built-in set)")
    v_ev.add_argument("--json", action="store_true", help="print JSON (default: off)")
    v_pl = vsub.add_parser("plot", help="a 2-D picture of chosen words, PCA or t-SNE (PNG)")
    v_pl.add_argument("--out", default="vectors.png", help="the PNG to write (default: vectors.png)")
    v_pl.add_argument("--projection", default="pca", choices=["pca", "tsne"],
                      help="PCA (first two principal components) or exact t-SNE (default: pca)")
    v_pl.add_argument("--words", nargs="*", default=[], help="the words to draw (default: a built-in list of "
                                                           "Python words)")
    for v, func in ((v_nb, cmd_vectors_neighbors), (v_an, cmd_vectors_analogy), (v_ev, cmd_vectors_eval),
                    (v_pl, cmd_vectors_plot)):
        v.add_argument("--vectors", default="runs/vectors", help="a folder from 'llmlab vectors train' "
                                                                 "(default: runs/vectors)")
        v.set_defaults(func=func)
    for v in (v_nb, v_an):
        v.add_argument("--top", type=int, default=10 if v is v_nb else 5, help="how many words to print "
                       f"(default: {10 if v is v_nb else 5})")
    for v in (v_train, v_nb, v_an, v_ev, v_pl):
        v.add_argument("--threads", type=_threads, default=1, metavar="N",
                       help="CPU threads for PyTorch; 0 = one per physical core; the small batched updates run "
                            "fastest on one (default: 1)")
    if wanted("vectors"):
        from llmlab.dataclass_io import add_flags
        from llmlab.text.vectors import VectorConfig

        add_flags(v_train, VectorConfig, unset={"lr": "0.025 for word2vec and fastText (gensim's), 0.05 for GloVe "
                                                      "(glove.c's)"})

    s = sub.add_parser("embed", help="sentence embeddings: contrastive / Matryoshka fine-tuning, retrieval scores",
                       description="Sentence embeddings from an encoder (all-minilm-l6-v2 by default), scored by "
                                   "retrieval (nDCG, recall, MRR, MAP, precision) on the built-in set: queries = "
                                   "first sentences of standard-library docstrings, documents = the rest, plus "
                                   "Python help-topic paragraphs as distractors.")
    esub = s.add_subparsers(dest="embed_command", required=True, parser_class=_Parser)
    e_train = esub.add_parser("train", help="fine-tune with in-batch negatives (MNRL), optionally Matryoshka; then "
                                            "score the original and the fine-tuned model on the built-in test set")
    e_train.add_argument("--eval-dims", default="384,128,64,32",
                         help="sizes the models are scored at afterwards (default: 384,128,64,32)")
    e_train.add_argument("--eval-split", default="test", choices=["test", "dev"],
                         help="the built-in split they are scored on: test, or dev (a tenth of the train split, left "
                              "out of training: tune on it) (default: test)")
    e_train.set_defaults(func=cmd_embed_train)
    e_eval = esub.add_parser("eval", help="score an encoder by retrieval at given (truncated) sizes")
    e_eval.add_argument("--model", default="all-minilm-l6-v2",
                        help="an embedded name or a Hugging Face BERT folder, e.g. RUN/model from 'llmlab embed "
                             "train' (default: all-minilm-l6-v2)")
    e_eval.add_argument("--dims", default="384,128,64,32",
                        help="embedding sizes: the first N coordinates, re-normalised (default: 384,128,64,32)")
    e_eval.add_argument("--queries", default=None, help="JSONL, one {\"id\", \"query\", \"relevant\": [corpus ids]} "
                                                        "per line (default: the built-in test set)")
    e_eval.add_argument("--corpus", default=None, help="JSONL, one {\"id\", \"text\"} per line, with --queries "
                                                       "(default: the built-in test set)")
    e_eval.add_argument("--split", default="test", choices=["test", "dev"],
                        help="the built-in set without --queries: test, or dev (a tenth of the train split, which "
                             "'llmlab embed train' leaves out: tune on it) (default: test)")
    e_eval.add_argument("--pooling", default="mean", choices=["mean", "cls"],
                        help="token states -> sentence vector: the mean over the mask, or the [CLS] state "
                             "(default: mean)")
    e_eval.add_argument("--max-tokens", type=int, default=64, help="tokens per text (default: 64)")
    e_eval.add_argument("--projection", default="none", choices=["none", "pca"],
                        help="pca: score the model after the PCA rotation of the built-in train split's texts "
                             "(first coordinates = top components; no training), a baseline for truncation "
                             "(default: none)")
    e_eval.add_argument("--json", action="store_true", help="print JSON (default: off)")
    e_eval.set_defaults(func=cmd_embed_eval)
    e_distill = esub.add_parser("distill", help="distil the encoder into a smaller one (TinyBERT, DistilBERT's "
                                                "triple loss, or sentence-embedding cosine); score teacher and student",
                                description="Encoder distillation. With no flags: a 3-block student made of "
                                            "all-MiniLM-L6-v2's blocks 0, 3, 5 learns from the 6-block model by "
                                            "TinyBERT's losses on the built-in train texts; the teacher and the "
                                            "student before and after are scored on the built-in test set "
                                            "(nDCG@10, cosine to the teacher's embeddings, sentences/s).")
    e_distill.add_argument("--eval-queries", type=int, default=0,
                           help="score on the first N test queries, their documents and N others; 0 = the whole "
                                "built-in test set (default: 0)")
    e_distill.set_defaults(func=cmd_embed_distill)
    for e in (e_train, e_eval, e_distill):
        e.add_argument("--threads", type=_threads, default=0, metavar="N",
                       help="CPU threads for PyTorch; 0 = one per physical core (default: 0)")
    if wanted("embed"):
        from llmlab.dataclass_io import add_flags
        from llmlab.train.contrastive import EmbedConfig, EmbedTrainConfig
        from llmlab.train.encoder_distill import EncoderDistillConfig, EncoderDistillTrainConfig

        add_flags(e_train, EmbedConfig)
        add_flags(e_train, EmbedTrainConfig)
        add_flags(e_distill, EncoderDistillConfig)
        add_flags(e_distill, EncoderDistillTrainConfig)

    s = sub.add_parser("index", help="a persistent vector store: build, add, delete, info, query (dense, BM25, hybrid)",
                       description="A folder holding documents, chunks and BM25 postings in SQLite and their "
                                   "embeddings in a FAISS index; queried densely, by BM25, or both fused by "
                                   "reciprocal rank.")
    isub = s.add_subparsers(dest="index_command", required=True, parser_class=_Parser)
    i_build = isub.add_parser("build", help="make a new index from files and folders")
    i_add = isub.add_parser("add", help="add files and folders (changed files are replaced, unchanged ones kept)")
    i_delete = isub.add_parser("delete", help="remove files (a folder: every file under it) from the index")
    i_info = isub.add_parser("info", help="counts, model, FAISS index kind, file sizes")
    i_repair = isub.add_parser("repair", help="rebuild the FAISS vectors from the database")
    i_query = isub.add_parser("query", help="the best chunks for a text")
    i_eval = isub.add_parser("eval", help="dense vs BM25 vs hybrid search on the built-in retrieval test set")
    for i in (i_build, i_add, i_delete):
        i.add_argument("sources", nargs="+", metavar="FILE_OR_FOLDER",
                       help="files, or folders (their files with a text suffix: .md, .py, .txt, ...)")
    for i in (i_build, i_add):
        i.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                       help="metadata for every file added, for query --where; repeatable (default: none; each "
                            "file also gets path and suffix)")
    for i in (i_build, i_add, i_delete, i_info, i_repair, i_query):
        i.add_argument("--index", required=True, metavar="DIR", help="the index folder (required)")
    for i in (i_info, i_repair):
        i.add_argument("--json", action="store_true", help="print JSON (default: off)")
        i.add_argument("--files", action="store_true", help="also list the indexed files (default: off)")
        i.set_defaults(func=cmd_index_info, command_name="info" if i is i_info else "repair")
    i_query.add_argument("text", help="the query")
    i_query.add_argument("--k", type=int, default=5, help="hits to print (default: 5)")
    i_query.add_argument("--mode", default="hybrid", choices=["dense", "bm25", "hybrid"],
                         help="dense (FAISS), bm25, or hybrid (both, reciprocal rank fusion) (default: hybrid)")
    i_query.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                         help="only documents whose metadata has KEY=VALUE; repeatable (default: none)")
    i_query.add_argument("--model", default=None,
                         help="the encoder for the query; it must be the one the index was built with "
                              "(default: the index's)")
    i_query.add_argument("--json", action="store_true",
                         help="one JSON object per hit: path, chunk, score, offsets, metadata (default: off)")
    i_eval.add_argument("--json", action="store_true", help="print JSON (default: off)")
    i_eval.add_argument("--limit", type=int, default=0, metavar="N",
                        help="a small budget: the first N queries, their documents and N others (default: 0 = all)")
    i_build.set_defaults(func=cmd_index_build)
    i_add.set_defaults(func=cmd_index_add)
    i_delete.set_defaults(func=cmd_index_delete)
    i_query.set_defaults(func=cmd_index_query)
    i_eval.set_defaults(func=cmd_index_eval)
    for i in (i_build, i_add, i_delete, i_info, i_repair, i_query, i_eval):
        i.add_argument("--threads", type=_threads, default=0, metavar="N",
                       help="CPU threads for PyTorch; 0 = one per physical core (default: 0)")
    if wanted("index"):
        from llmlab.dataclass_io import add_flags
        from llmlab.infer.index import IndexConfig

        add_flags(i_build, IndexConfig)
        add_flags(i_eval, IndexConfig, skip=("hnsw_above", "hnsw_m", "ef_search"))

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, embeddings) with continuous "
                                     "batching, a paged KV cache, /metrics and a web chat page at /")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                                                   "(default: none, open)")
    s.add_argument("--embedding-model", default=None, metavar="PATH_OR_NAME",
                   help="also serve /v1/embeddings with this encoder; all-minilm-l6-v2 is the embedded one "
                        "(default: none)")
    s.add_argument("--kv-cache", type=parse_size, default=parse_size("1GiB"), metavar="SIZE",
                   help="memory for KV cache blocks, e.g. 1GiB or 512MiB (default: 1GiB)")
    s.add_argument("--block-size", type=int, default=16, help="positions per KV cache block (default: 16)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once (default: 64)")
    s.add_argument("--max-batched-tokens", type=int, default=512,
                   help="tokens per engine step: prompt chunks plus decodes (default: 512)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests before new ones get 429 (default: 256)")
    s.add_argument("--max-n", type=int, default=8, help="largest n (samples per request) accepted (default: 8)")
    s.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of shared prompt prefixes (default: on)")
    s.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="n-gram (prompt lookup) draft tokens checked per sequence per step; 0 = off (default: 0)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let running requests finish before aborting them "
                        "(default: 30)")
    _add_load_flags(s, packed_default=True, kv_flag=False)  # the server's paged cache has its own pool
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    if command in ("serve", "eval", "data"):
        # serve: the engine thread shares the cores with the HTTP event loop (and often the client): idle OpenMP
        # workers should sleep rather than spin. Measured by benchmarks/serve.py on 2 cores: +14% tok/s at 1
        # stream, +26% at 32. eval: on a shared machine spinning workers wait for descheduled ones; 2 threads
        # on 2 busy cores (load 5-8) took 40 s for 30 stdlib-mc items and 84 s for 16 addition replies, 8 s and
        # 13 s with passive waits (README, Evaluation). data: the same engine loop (self-instruct, preferences).
        # libgomp reads this once, when torch loads (parsing the eval flags imports it); a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser({command} if command else set()).parse_args(argv)
    from llmlab.common import LlmlabError  # imports torch: only once a command runs

    if getattr(args, "threads", None) is not None:
        import torch

        from llmlab.nn.cpu_kernels import physical_cores

        torch.set_num_threads(args.threads or physical_cores())

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
