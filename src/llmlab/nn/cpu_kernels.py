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
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
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
        cmd = [cc, *BASE_FLAGS, *VARIANTS[variant][1], "-I", str(CSRC), "-fopenmp", "-shared",
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
