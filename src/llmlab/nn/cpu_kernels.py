"""Building the C kernels of ``nn/csrc`` for the CPU this process runs on.

A kernel is compiled with the system C compiler on first use (~0.5–2 s) into ~/.cache/llmlab/kernels,
named by a hash of the sources and the variant, and loaded with ctypes. The variant is picked at run time
from the CPU's features (``/proc/cpuinfo`` flags), best first:

    avx512vnni  AVX512-VNNI + VL: 256-bit vpdpbusd integer dot products
    avxvnni     AVX-VNNI (Alder Lake and later): the same instruction without AVX-512
    avx2        AVX2 + FMA + F16C: vpmaddubsw + vpmaddwd
    portable    plain C, no intrinsics (the compiler vectorises what it can: SSE2, NEON on ARM)

so one install is fast on an AVX2 laptop and an AVX-512 server. Every build compiles with
``-ffp-contract=off`` (no multiply-add fused behind the source's back) and ``-fno-trapping-math``, so the
variants' float arithmetic is the same sequence of IEEE operations and their results are bit-identical (tested).
``LLMLAB_CPU_VARIANT=avx2`` (or any name above) caps the choice, as if the CPU had nothing better:
``portable`` simulates a CPU without AVX2 (kernels that need AVX2 then report the reference path). A missing
compiler or a failed compile never raises: ``KernelBuild.status`` says, in one line with the compiler's own
message, why the PyTorch reference path runs instead.

Threads: the kernels split their loops over their own pool (``csrc/pool.h``), ``kernel_threads()`` of them: the
count PyTorch has, or inside ``kernels_own_the_threads()`` (the packed decode loops) the count PyTorch had on entry
while PyTorch's own ops run on one thread. Two spinning pools on the same cores slow each other, and a PyTorch
op's parallel region on a shared machine waits for a descheduled thread: benchmarks/contention.py.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from llmlab.common import log

CSRC = Path(__file__).with_name("csrc")

# Every build: -O3; no multiply-add fused behind the source's back; and FP operations may be executed where the
# source guards them (no trapping math: results are the same, only FP exception flags could differ), so loops
# with a select such as the softmax's "-inf -> 0" vectorise on AVX2 and SSE2 too, not only with AVX-512 masks.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math")
_X86 = ("-mavx2", "-mfma", "-mf16c")
# variant -> (the /proc/cpuinfo flags it needs, its compiler flags); best first
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512vnni": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                   _X86 + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DLLMLAB_AVX512VNNI")),
    "avxvnni": (("avx2", "fma", "f16c", "avx_vnni"), _X86 + ("-mavxvnni", "-DLLMLAB_AVXVNNI")),
    "avx2": (("avx2", "fma", "f16c"), _X86 + ("-DLLMLAB_AVX2",)),
    "portable": ((), ()),
}
ORDER = tuple(VARIANTS)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# the flags a CPU speed figure depends on (integer-dot and bf16/AMX units), in the order they are printed
SPEED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16")


def speed_flags() -> str:
    """The CPU's flags among SPEED_FLAGS, space-separated, for printing beside a speed figure."""
    return " ".join(f for f in SPEED_FLAGS if f in cpu_flags()) or "none of " + " ".join(SPEED_FLAGS)


def cpu_description() -> str:
    """'<model name>; <n> cores visible; flags: <speed_flags()>' for a benchmark's header."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{model}; {os.cpu_count()} cores visible; flags: {speed_flags()}"


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's vector units, so more threads than cores rarely help
    memory- and SIMD-bound kernels): distinct (physical id, core id) pairs in /proc/cpuinfo, else os.cpu_count()."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or os.cpu_count() or 1


_threads_lock = threading.Lock()
_threads_state = {"depth": 0, "kernel": 0}  # inside kernels_own_the_threads: nesting depth, the kernels' threads


def kernel_threads() -> int:
    """Threads for a C kernel call: PyTorch's count, or the one it had when ``kernels_own_the_threads`` began."""
    import torch

    return _threads_state["kernel"] or torch.get_num_threads()


@contextmanager
def kernels_own_the_threads(enabled: bool = True) -> Iterator[None]:
    """Inside: PyTorch's own ops (embedding, sampling, the cache's bookkeeping) run on one thread and the C kernels
    on the threads PyTorch had. For loops whose heavy work is all in the kernels (the packed decode step): on 2
    cores it made batch-8 decode steps 17.3 ms instead of 22.4 (PyTorch's idle OpenMP workers spin on the cores
    the kernels' pool wants), and beside one busy process 35 ms instead of 62 (an argmax over 8 x 49152 logits
    took 8 ms instead of 0.3, its parallel region waiting for a descheduled thread). Nests; the count comes back
    when the outermost exits. PyTorch's thread count is process-wide: while any thread is inside, every thread's
    PyTorch ops run on one (the server and the training loops run their models on one thread, so this is only
    a cost to a program that trains in one thread while another generates)."""
    import torch

    if not enabled:
        yield
        return
    with _threads_lock:
        if _threads_state["depth"] == 0:
            _threads_state["kernel"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_state["depth"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["depth"] -= 1
            if _threads_state["depth"] == 0:
                torch.set_num_threads(_threads_state["kernel"])
                _threads_state["kernel"] = 0


def kernel_threads_for_native_step(fn: Callable) -> Callable:
    """Decorator for a decode loop over ``model`` (its first argument): ``kernels_own_the_threads`` while it runs
    when the model's blocks run in C (``model.native_step``, models/native_step.py), else nothing changes."""

    @functools.wraps(fn)
    def loop(model, *args, **kwargs):
        with kernels_own_the_threads(getattr(model, "native_step", None) is not None):
            return fn(model, *args, **kwargs)

    return loop


@cache
def _warn_once(message: str) -> None:
    log.warning(message)


def runnable_variants() -> list[str]:
    """Variants this CPU runs, best first, capped by ``LLMLAB_CPU_VARIANT`` when set."""
    cap = os.environ.get("LLMLAB_CPU_VARIANT", "").strip()
    if cap and cap not in VARIANTS:
        _warn_once(f"llmlab: LLMLAB_CPU_VARIANT={cap!r} is not a variant ({', '.join(ORDER)}); ignored")
    order = ORDER[ORDER.index(cap):] if cap in VARIANTS else ORDER
    flags = cpu_flags()
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return [v for v in order if all(f in flags for f in VARIANTS[v][0]) and (v == "portable" or is_x86)]


def best_variant() -> str:
    return runnable_variants()[0]


def cpu_has_avx2() -> bool:
    """True where the AVX2 + FMA + F16C kernels may run (the CPU has them and no cap forbids them)."""
    return "avx2" in runnable_variants()


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@dataclass(frozen=True)
class KernelBuild:
    """The outcome of building a C kernel: the function, or ``None`` and the reason in ``status``."""

    fn: Callable[..., int] | None
    status: str  # one line: which variant runs, or why none does (with the compiler's message)
    variant: str | None = None
    compiler_output: str = ""
    failed: bool = False  # compiler and CPU were there, yet no kernel: a bug to report, not a missing tool
    lib: ctypes.CDLL | None = None  # the loaded library, for a kernel's other entry points


def build_kernel(src: Path, symbol: str, argtypes: list, variant: str = "avx2",
                 cache_dir: Path | None = None) -> KernelBuild:
    """Compile ``src`` for ``variant`` (or reuse the cached library) and load ``symbol``, an ``int``-returning
    function taking ``argtypes``. Sources may ``#include`` their neighbours in ``nn/csrc`` (all of them are
    hashed into the library's name). Never raises: see the module docstring."""
    cc = find_compiler()
    if cc is None:
        return KernelBuild(None, "reference path: no C compiler found (set CC or install gcc)")
    if variant not in runnable_variants():
        return KernelBuild(None, f"reference path: this CPU lacks {'/'.join(VARIANTS[variant][0]).upper()}"
                                 + (" (LLMLAB_CPU_VARIANT caps it)" if os.environ.get("LLMLAB_CPU_VARIANT") else ""))
    digest = hashlib.sha256(src.read_bytes())
    for dep in sorted(CSRC.glob("*.[ch]")):
        if dep.resolve() != src.resolve():
            digest.update(dep.read_bytes())
    digest.update(" ".join((*BASE_FLAGS, *VARIANTS[variant][1])).encode())
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmlab" / "kernels"
    lib = cache_dir / f"{src.stem}-{variant}-{digest.hexdigest()[:16]}.so"
    output = ""
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        cmd = [cc, *BASE_FLAGS, *VARIANTS[variant][1], "-I", str(CSRC), "-pthread", "-shared",
               "-fPIC", "-o", tmp, str(src), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(cmd, 1, "", str(e))
        output = (done.stderr or done.stdout).strip()
        if done.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            return KernelBuild(None, f"reference path: {Path(cc).name} failed to compile {src.name}: "
                                     f"{first_error(output)}", compiler_output=output, failed=True)
        os.replace(tmp, lib)
    try:
        dll = ctypes.CDLL(str(lib))
        fn = getattr(dll, symbol)
    except (OSError, AttributeError) as e:
        return KernelBuild(None, f"reference path: cannot load {lib}: {e}", compiler_output=output,
                           failed=True)
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return KernelBuild(fn, f"C kernel {variant} ({lib})", variant, output, lib=dll)


def first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0][:300]
