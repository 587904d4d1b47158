"""Mutation testing of the pure-Python core with mutmut: killed / total per module.

Each module is mutated in its own scratch copy of the repository (``build/mutation/<name>/``, with
mutmut's ``mutants/`` folder inside it), so ``src/`` is never modified and several runs do not clash.
Every mutant is checked by a small, fast set of exact tests (``MODULES`` below), not the whole suite:
mutmut maps each test to the functions it calls and runs only those tests against a mutant of them.

    python scripts/mutation.py                       # all modules (about 15-30 min on 2 cores)
    python scripts/mutation.py sample optim          # some of them
    python scripts/mutation.py --report              # re-print the table of the last run, run nothing
    python scripts/mutation.py --show sample         # the mutated line of every surviving mutant of a module
    python scripts/mutation.py --retest sample       # after adding tests: re-check only the survivors

Needs ``pip install mutmut`` (``make mutation`` installs it). Not part of ``make test``: it takes minutes.
The score counts a mutant as killed when a test fails (or times out) with it; an equivalent mutant
(one that cannot change behaviour) is listed in ``EQUIVALENT`` with the reason, and left out of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module name -> (source file under src/, the tests that check it: fast and exact)
MODULES: dict[str, tuple[str, list[str]]] = {
    "bpe": ("llmlab/tokenizer/bpe.py", ["tests/test_tokenizer_exact.py"]),
    "wordpiece": ("llmlab/tokenizer/wordpiece.py", ["tests/test_tokenizer_exact.py"]),
    "pretokenize": ("llmlab/tokenizer/pretokenize.py", ["tests/test_tokenizer_exact.py"]),
    "sample": ("llmlab/infer/sample.py", ["tests/test_sample_exact.py"]),
    "gguf": ("llmlab/formats/gguf.py", ["tests/test_gguf_exact.py"]),
    "checkpoint": ("llmlab/formats/checkpoint.py", ["tests/test_checkpoint_exact.py"]),
    "optim": ("llmlab/train/optim.py", ["tests/test_optim_exact.py"]),
}

_LAST_DIM = "logits are (B, V): dim 1 is dim -1"
_DEFAULT = "the argument removed or changed is the default value"
_CPU = "device None is the CPU: differs only on an accelerator (none in CI)"
_INDENT = "only the JSON file's indentation changes"
_CAUGHT = "the exception is caught at once and its text never shown"
_JUST_LISTED = "the folder was just listed: removing it fails only if another process removes it first"
_WEIGHTS_ONLY = "torch >= 2.6 loads weights-only by default; older torch would not"
_P_ANYWAY = "the character at this edge is in a Unicode punctuation category (P*) anyway"
_SPLIT = "str.split() splits on every Unicode space (Zs) and on tab/newline too; the mapping to ' ' is redundant"
_UTF8 = "UTF-8 is the default codec and the same as utf-8"
_NO_POST = "the tokenizer has no post-processor, so there are no special tokens to add"
_SAME_DTYPE = "torch's default float32 is the dtype of the logits here; in-place add would cast anyway"

# Mutants that cannot change behaviour: module -> {the mutated line, as `--show` prints it after "+": why}.
# Matched by text rather than by mutmut's numbered names, which shift whenever a function changes.
_PREFIX = ("two specials compete at one position only when one is a prefix of the other, and reverse "
           "lexicographic order also puts the longer first")
_EMPTY_CHUNK = "the extra chunk is empty text, which pre-tokenizes to no pieces"
_ADDED = ("the tokenizer has no normalizer, and add_special_tokens marks the tokens special whatever the "
          "AddedToken says")
_CACHE = "the per-piece cache only saves time: a miss recomputes the same ids"
_FITS = ("the 24-byte minimum is checked before the header is read, so this field always fits and its name "
         "never reaches an error message")
EQUIVALENT: dict[str, dict[str, str]] = {
    "sample": {
        "penalized = torch.where(logits <= 0, logits * p.repetition_penalty, logits / p.repetition_penalty)":
            "a zero logit stays 0 whether multiplied or divided",
        "logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(None)":
            "a bool mask times a float penalty gives the same floats as a float mask",
        "bias = torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=None)": _SAME_DTYPE,
        "bias = torch.tensor(list(p.logit_bias.values()), device=logits.device, )": _SAME_DTYPE,
        "ids = torch.tensor(list(p.logit_bias), device=None)": _CPU,
        "ids = torch.tensor(list(p.logit_bias), )": _CPU,
        "bias = torch.tensor(list(p.logit_bias.values()), device=None, dtype=logits.dtype)": _CPU,
        "bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)": _CPU,
        "g = torch.Generator(device=None)": _CPU,
        "return logits.argmax(+1)": _LAST_DIM,
        "probs = warp(logits, p).softmax(+1)": _LAST_DIM,
        "return torch.multinomial(probs, 1, generator=generator).squeeze(+1)": _LAST_DIM,
        "kth = torch.topk(logits, p.top_k, ).values[:, -1:]  # (B, 1)": _DEFAULT,
        "kth = torch.topk(logits, p.top_k, dim=+1).values[:, -1:]  # (B, 1)": _LAST_DIM,
        'logits = logits.masked_fill(logits < kth, float("-INF"))': "float() reads -INF as -inf",
        'logits = logits.masked_fill(drop, float("-INF"))': "float() reads -INF as -inf",
        "sorted_logits, order = torch.sort(logits, descending=False)": _DEFAULT,
        "sorted_logits, order = torch.sort(logits, dim=-1, )": _DEFAULT,
        "sorted_logits, order = torch.sort(logits, dim=+1, descending=False)": _LAST_DIM,
        "cum = sorted_logits.softmax(+1).cumsum(-1)": _LAST_DIM,
        "cum = sorted_logits.softmax(-1).cumsum(+1)": _LAST_DIM,
        "if p.top_k > 0 and p.top_k <= logits.shape[-1]:": "top-k with k = V keeps every token",
        "if p.top_k > 0 and p.top_k < logits.shape[+1]:": _LAST_DIM,
        "probs = logits.softmax(+1)": _LAST_DIM,
        "if p.min_p >= 0.0:": "min_p = 0 makes the threshold 0, and no probability is below 0",
        'logits = logits.masked_fill(probs < threshold, float("-INF"))': "float() reads -INF as -inf",
        "threshold = p.min_p * probs.max(dim=+1, keepdim=True).values": _LAST_DIM,
    },
    "checkpoint": {
        'for block in iter(lambda: f.read(None), b""):': "the read size does not change the hash",
        'for block in iter(lambda: f.read(2 << 20), b""):': "the read size does not change the hash",
        'for block in iter(lambda: f.read(1 << 21), b""):': "the read size does not change the hash",
        'json.dump({"step": step, **(trainer_state or {})}, f, indent=None)': _INDENT,
        'json.dump({"step": step, **(trainer_state or {})}, f, )': _INDENT,
        'json.dump({"step": step, **(trainer_state or {})}, f, indent=3)': _INDENT,
        'json.dump({"step": step, "files": files}, f, indent=None)': _INDENT,
        'json.dump({"step": step, "files": files}, f, )': _INDENT,
        'json.dump({"step": step, "files": files}, f, indent=3)': _INDENT,
        "raise TypeError(None)": _CAUGHT,
        'raise TypeError("XXa manifest entry is not an objectXX")': _CAUGHT,
        'raise TypeError("A MANIFEST ENTRY IS NOT AN OBJECT")': _CAUGHT,
        "shutil.rmtree(old, ignore_errors=None)": _JUST_LISTED,
        "shutil.rmtree(old, )": _JUST_LISTED,
        "shutil.rmtree(old, ignore_errors=False)": _JUST_LISTED,
        "shutil.rmtree(stale, ignore_errors=None)": _JUST_LISTED,
        "shutil.rmtree(stale, )": _JUST_LISTED,
        "shutil.rmtree(stale, ignore_errors=False)": _JUST_LISTED,
        'return torch.load(path, map_location=None, weights_only=True)  # never unpickle code': _CPU,
        'return torch.load(path, weights_only=True)  # never unpickle code': _CPU,
        'return torch.load(path, map_location="cpu", weights_only=None)  # never unpickle code': _WEIGHTS_ONLY,
        'return torch.load(path, map_location="cpu", )  # never unpickle code': _WEIGHTS_ONLY,
    },
    "bpe": {
        'return data.decode(errors="replace")': _UTF8,
        'return data.decode("UTF-8", errors="replace")': _UTF8,
        'else tok.encode("UTF-8")': _UTF8,
        'return tok.encode("UTF-8")': _UTF8,
        "if self.tokenizers_lib is None:": "both paths give the same ids (that is what the tests check)",
        "specials = sorted(self.special_tokens, key=None, reverse=True)": _PREFIX,
        "specials = sorted(self.special_tokens, reverse=True)": _PREFIX,
        "if rank is not None and (best_rank is None or rank <= best_rank):":
            "ranks are unique per pair, so equal ranks mean the same pair, and every occurrence is merged",
        "while len(parts) >= 1:": "a single part has no pair: the loop body finds none and breaks",
        "if m.start() >= pos:": _EMPTY_CHUNK,
        "if pos <= len(text):": _EMPTY_CHUNK,
        'steps.append(pre_tokenizers.Split(Regex(s), behavior="isolated", ))': "invert=False is the default",
        "tok.add_special_tokens([AddedToken(s, normalized=False) for s in self.special_tokens])": _ADDED,
        "tok.add_special_tokens([AddedToken(s, special=True, ) for s in self.special_tokens])": _ADDED,
        "tok.add_special_tokens([AddedToken(s, special=True, normalized=True) for s in self.special_tokens])": _ADDED,
        "tok.add_special_tokens([AddedToken(s, special=False, normalized=False) for s in self.special_tokens])":
            _ADDED,
        "if len(self._cache) <= 200_000:": _CACHE,
        "if len(self._cache) < 200001:": _CACHE,
        "self._cache[piece] = None": _CACHE,
        "ids = self._cache.get(None)": _CACHE,
        "ids = [e.ids for e in self.tokenizers_lib.encode_batch(texts, )]": _NO_POST,
        "ids = [e.ids for e in self.tokenizers_lib.encode_batch(texts, add_special_tokens=True)]": _NO_POST,
    },
    "gguf": {
        'self.version = cur.scalar("I", 4, None)': _FITS,
        'self.version = cur.scalar("I", 4, "XXversionXX")': _FITS,
        'self.version = cur.scalar("I", 4, "VERSION")': _FITS,
        'n_tensors = cur.scalar("Q", 8, None)': _FITS,
        'n_tensors = cur.scalar("Q", 8, "XXtensor countXX")': _FITS,
        'n_tensors = cur.scalar("Q", 8, "TENSOR COUNT")': _FITS,
        'n_kv = cur.scalar("Q", 8, None)': _FITS,
        'n_kv = cur.scalar("Q", 8, "XXmetadata countXX")': _FITS,
        'n_kv = cur.scalar("Q", 8, "METADATA COUNT")': _FITS,
        "with open(self.path, ) as f:": "the file is only fstat'ed and mmap'ed through its descriptor, never read "
                                       "as text",
        'return raw.decode("UTF-8")': _UTF8,
        'append(buf[pos:pos + n].decode("UTF-8", errors="replace"))': _UTF8,
        'return raw.decode("UTF-8", errors="replace")': _UTF8,
    },
    "wordpiece": {
        "if 34 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 < cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp < 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 59 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 < cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 <= cp < 64 or 91 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 <= cp <= 64 or 92 <= cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 < cp <= 96 or 123 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 124 <= cp <= 126:": _P_ANYWAY,
        "if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 < cp <= 126:": _P_ANYWAY,
        "or 0x2A700 <= cp <= 177984 or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF":
            "U+2B740 starts the next CJK range",
        "or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 178208 or 0x2B820 <= cp <= 0x2CEAF":
            "U+2B820 starts the next CJK range",
        'if ch in "XX\t\n\rXX":': "X is not a control character either way",
        'return ch in " \t\n\r" and unicodedata.category(ch) == "Zs"': _SPLIT,
        'return ch in " \t\n\r" or unicodedata.category(ch) == "XXZsXX"': _SPLIT,
        'return ch in " \t\n\r" or unicodedata.category(ch) == "zs"': _SPLIT,
        'return ch in " \t\n\r" or unicodedata.category(ch) == "ZS"': _SPLIT,
        "specials = sorted(self.special_tokens, key=None, reverse=True)":
            "specials that start alike are prefixes of each other, so reverse sorting puts the longer first too",
        "specials = sorted(self.special_tokens, reverse=True)":
            "specials that start alike are prefixes of each other, so reverse sorting puts the longer first too",
        "if cp == 1 or cp == 0xFFFD or _is_control(ch):": "U+0000 and U+0001 are control characters (Cc) anyway",
        'return (tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok).encode("UTF-8")':
            _UTF8,
    },
    "optim": {
        "if warmup >= 0 and step < warmup:": "steps are >= 0, so warmup=0 never enters the warmup branch either way",
        "if not p.requires_grad or id(None) in seen:  # tied weights count once":
            "nn.Module.parameters() already yields a tied tensor once; the seen-set is a second guard",
        "seen.add(None)": "same: parameters() never repeats a tensor",
        "seen.add(id(None))": "same: parameters() never repeats a tensor",
    },
}

KILLED = {1, 3, 36, 24, -24, 152, 255}  # test failure, pytest internal error, timeouts (mutmut's exit codes)
STATUS = {0: "survived", 33: "no tests", 34: "skipped", 37: "type check", -11: "segfault", -9: "segfault",
          None: "not checked"}


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if exe.exists():
        return str(exe)
    found = shutil.which("mutmut")
    if found is None:
        sys.exit("mutmut is not installed: pip install mutmut (or run `make mutation`)")
    return found


def _prepare(work: Path, source: str, tests: list[str]) -> None:
    """A fresh scratch copy: src/llmlab, tests/, scripts/ and a pyproject.toml saying what to mutate."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "build")
    shutil.copytree(ROOT / "src" / "llmlab", work / "src" / "llmlab", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copytree(ROOT / "scripts", work / "scripts", ignore=ignore)
    toml_list = ", ".join(json.dumps(t) for t in tests)
    (work / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'markers = ["slow: takes more than a few seconds (real models)"]\n'
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f'only_mutate = ["src/{source}"]\n'
        f"pytest_add_cli_args_test_selection = [{toml_list}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow"]\n'
        'also_copy = ["scripts"]\n'
        "use_git_change_detection = false\n"
        "use_setproctitle = false\n"
        # torch is not fork-safe after use: fork each mutant from a clean server process.
        'process_isolation = "forkserver"\n')


def _results(work: Path, source: str) -> dict[str, int | None]:
    meta = work / "mutants" / "src" / (source + ".meta")
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def _mutated_lines(work: Path, key: str) -> list[str]:
    out = subprocess.run([_mutmut(), "show", key], cwd=work, capture_output=True, text=True).stdout
    return [line[1:].strip() for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]


def _row(work: Path, name: str, codes: dict[str, int | None]) -> dict:
    reasons = EQUIVALENT.get(name, {})
    equivalent = {k for k, v in codes.items()
                  if v == 0 and reasons and any(m in reasons for m in _mutated_lines(work, k))}
    counted = {k: v for k, v in codes.items() if k not in equivalent}
    killed = sum(v in KILLED for v in counted.values())
    other: dict[str, int] = {}
    for v in counted.values():
        if v not in KILLED:
            other[STATUS.get(v, f"exit {v}")] = other.get(STATUS.get(v, f"exit {v}"), 0) + 1
    return {"module": name, "killed": killed, "total": len(counted), "equivalent": len(equivalent), "other": other}


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'module':<14}{'killed / total':>16}{'%':>8}{'equivalent':>12}  not killed")
    for r in rows:
        pct = 100.0 * r["killed"] / r["total"] if r["total"] else float("nan")
        rest = ", ".join(f"{n} {k}" for k, n in sorted(r["other"].items())) or "-"
        print(f"{r['module']:<14}{r['killed']:>7} / {r['total']:<6}{pct:>8.1f}{r['equivalent']:>12}  {rest}")
    killed, total = sum(r["killed"] for r in rows), sum(r["total"] for r in rows)
    if total:
        print(f"{'all':<14}{killed:>7} / {total:<6}{100.0 * killed / total:>8.1f}")
    print(f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, mutmut, Python "
          f"{platform.python_version()})")


def _show(work: Path, name: str, source: str) -> None:
    reasons = EQUIVALENT.get(name, {})
    for key, code in sorted(_results(work, source).items()):
        if code in KILLED:
            continue
        lines = _mutated_lines(work, key)
        why = next((reasons[m] for m in lines if m in reasons), None)
        print(f"--- {key}: {STATUS.get(code, code)}" + (f" (equivalent: {why})" if why else ""))
        print("\n".join("+ " + m for m in lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", metavar="MODULE",
                    help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation", help="scratch folder")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    ap.add_argument("--report", action="store_true", help="print the table of the last run; run nothing")
    ap.add_argument("--show", action="store_true", help="print the diff of each mutant that was not killed")
    ap.add_argument("--tests", nargs="+", metavar="TEST",
                    help="check the mutants with these tests instead of the module's own (e.g. to measure "
                         "how much an older test set kills)")
    ap.add_argument("--retest", action="store_true",
                    help="keep the last run's mutants and re-check only those not killed, with the current tests "
                         "(quick, after adding tests; the module's source must be unchanged since that run)")
    ap.add_argument("--json", type=Path, help="also write the table to this JSON file")
    args = ap.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    rows = []
    for name in names:
        source, tests = MODULES[name]
        tests = args.tests or tests
        work = args.workdir / name
        if not (args.report or args.show):
            again: list[str] = []
            if args.retest and _results(work, source):
                if (work / "src" / source).read_bytes() != (ROOT / "src" / source).read_bytes():
                    sys.exit(f"src/{source} changed since the last run of {name}: run it again without --retest")
                shutil.rmtree(work / "tests")
                shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
                again = [k for k, v in _results(work, source).items() if v not in KILLED]
            else:
                _prepare(work, source, tests)
            print(f"== {name}: mutating src/{source}, checked by {' '.join(tests)}", flush=True)
            # nice: mutation runs are long and should not starve the machine's other work.
            cmd = ["nice", "-n", "10", _mutmut(), "run", "--max-children", str(args.max_children), *again]
            proc = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            (work / "mutmut.log").write_text(proc.stdout)
            if proc.returncode != 0:
                print(proc.stdout[-3000:])
                print(f"mutmut failed on {name} (exit {proc.returncode}); log: {work / 'mutmut.log'}")
        if args.show:
            _show(work, name, source)
        rows.append(_row(work, name, _results(work, source)))
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
