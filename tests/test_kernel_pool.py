"""The C kernels' thread pool (nn/csrc/pool.h) and who owns the threads (nn/cpu_kernels.kernels_own_the_threads):
the same bits at any thread count, with several calling threads at once, beside busy processes, in a forked child;
PyTorch's thread count restored however the loop ends."""

from __future__ import annotations

import copy
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llmlab.infer.generate import generate
from llmlab.nn import cpu_kernels
from llmlab.nn.cpu_kernels import CSRC, build_kernel, find_compiler, kernel_threads, kernels_own_the_threads
from llmlab.nn.packed_linear import LINEAR_ARGTYPES
from tests.test_native_step import _tiny
from tests.test_qgemm import _packed


def _run(fn, kind: int, x: torch.Tensor, raw: torch.Tensor, threads: int) -> torch.Tensor:
    """y = x @ W^T by the kernel, y filled with NaN first: a chunk no thread ran stays NaN."""
    M, K = x.shape
    y = torch.full((M, raw.shape[0]), float("nan"))
    assert fn(kind, x.data_ptr(), raw.data_ptr(), y.data_ptr(), M, raw.shape[0], K, threads) == 0
    return y


@pytest.fixture(scope="module")
def qlinear(tmp_path_factory):
    if find_compiler() is None:
        pytest.skip("no C compiler")
    build = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, cpu_kernels.best_variant(),
                         tmp_path_factory.mktemp("kernels"))
    assert build.fn is not None, build.status
    return build.fn


@pytest.fixture(scope="module")
def problem():
    """A Q4_1 matrix of 300 outputs (38 groups of 8: chunks of unequal size) and 9 rows of x (quantize_rows runs
    in parallel from 8 rows), and the one-thread product."""
    raw = _packed("Q4_1", 300, 256, seed=3)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(1))
    return raw, x


def test_any_thread_count_gives_the_one_thread_bits(qlinear, problem):
    raw, x = problem
    want = _run(qlinear, 3, x, raw, 1)
    for threads in (2, 3, 7, 64):  # 64: more threads than chunks of some loops, than cores
        torch.testing.assert_close(_run(qlinear, 3, x, raw, threads), want, rtol=0, atol=0)


def test_calls_from_several_threads_at_once(qlinear, problem):
    """ctypes drops the GIL in the call: four Python threads use the kernel at once (one gets the pool, the others
    run their loops alone), 25 calls each, each with its own input; every result is its one-thread product."""
    raw, _ = problem
    inputs = [torch.randn(9, 256, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    wants = [_run(qlinear, 3, x, raw, 1) for x in inputs]
    bad: list[int] = []

    def work(i: int) -> None:
        for _ in range(25):
            if not torch.equal(_run(qlinear, 3, inputs[i], raw, 2), wants[i]):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert bad == []


def test_busy_processes_beside_it_change_no_bit(qlinear, problem):
    """Two busy processes take the cores: workers come late or not at all; the caller does their chunks."""
    raw, x = problem
    want = _run(qlinear, 3, x, raw, 1)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(200):
            assert torch.equal(_run(qlinear, 3, x, raw, 2), want)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def _child(conn, raw, x) -> None:
    from llmlab.nn.cpu_kernels import CSRC, best_variant, build_kernel
    from llmlab.nn.packed_linear import LINEAR_ARGTYPES

    fn = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, best_variant()).fn
    conn.send(_run(fn, 3, x, raw, 2).numpy())  # numpy: a tensor would travel as shared memory


def test_a_forked_child_runs_the_kernels(problem):
    """After fork() the pool's workers are gone: the child's loops must neither hang nor change."""
    if find_compiler() is None:
        pytest.skip("no C compiler")
    raw, x = problem
    fn = build_kernel(CSRC / "qgemm.c", "qlinear", LINEAR_ARGTYPES, cpu_kernels.best_variant()).fn
    want = _run(fn, 3, x, raw, 2)  # the parent's pool has started its workers
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, raw, x))
    proc.start()
    got = parent.recv() if parent.poll(60) else None
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    assert got is not None, "the forked child's kernel call hung"
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=0)


def test_kernels_own_the_threads_nests_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with kernels_own_the_threads():
            assert torch.get_num_threads() == 1 and kernel_threads() == 3
            with kernels_own_the_threads():
                assert torch.get_num_threads() == 1 and kernel_threads() == 3
            assert torch.get_num_threads() == 1 and kernel_threads() == 3
        assert torch.get_num_threads() == 3 and kernel_threads() == 3
        with pytest.raises(KeyError), kernels_own_the_threads():
            raise KeyError("x")
        assert torch.get_num_threads() == 3
        with kernels_own_the_threads(enabled=False):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def test_generate_on_the_native_step_hands_the_threads_to_the_kernels(monkeypatch):
    """Inside generate on a packed model with its C step, PyTorch runs on 1 thread and the kernels get the 2
    PyTorch had; after it (also when it raises), PyTorch has 2 again. The tokens equal a 1-thread run's."""
    model = _tiny()
    seen: list[tuple[int, int]] = []
    real = model.native_step.blocks

    def spy(*a):
        seen.append((torch.get_num_threads(), kernel_threads()))
        return real(*a)

    monkeypatch.setattr(model.native_step, "blocks", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = generate(model, [[1, 2, 3, 4]], 6)
        assert set(seen) == {(1, 2)} and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            generate(model, [[]], 3)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert generate(model, [[1, 2, 3, 4]], 6)[0].ids == out[0].ids
    finally:
        torch.set_num_threads(before)


def test_a_forward_hands_the_threads_over_only_when_its_blocks_run_in_c():
    """DecoderLM.forward gives PyTorch 1 thread (the kernels the 2 it had) when the C step takes the blocks, and
    keeps PyTorch's 2 for any forward it does not: with a gradient, with no cache, or once a block was replaced
    (``NativeStep.ready`` is False, the blocks run eagerly and their PyTorch ops need the threads)."""
    model = _tiny()
    seen: list[int] = []
    model.embed_tokens.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    ids = torch.tensor([[1, 2, 3]])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            model(ids, cache=model.new_cache(1, 8))
            model(ids)
        model(ids, cache=model.new_cache(1, 8))  # with a gradient
        model.layers[0].mlp = copy.deepcopy(model.layers[0].mlp)  # the step no longer points at the block
        with torch.inference_mode():
            model(ids, cache=model.new_cache(1, 8))
        assert seen == [1, 2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_contention_benchmark_command(smollm_path):
    """The README's command (benchmarks/contention.py) with a small budget: every cell of llmlab's row measured, the
    ratio line printed; bad flags exit 2 with one line."""
    root = Path(__file__).resolve().parents[1]
    script = str(root / "benchmarks" / "contention.py")
    r = subprocess.run([sys.executable, script, "--runs", "1", "--new-tokens", "24", "--no-llama-cpp"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| llmlab |"))
    cells = [float(c) for c in row.strip("| \n").split("|")[1:]]
    assert len(cells) in (2, 4) and all(c > 0 for c in cells), r.stdout
    assert "llama.cpp: skipped (--no-llama-cpp)" in r.stdout
    bad = subprocess.run([sys.executable, script, "--busy", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--busy" in bad.stderr.strip().splitlines()[-1]


def _runnable_threads() -> int:
    """Threads of this process the OS has running or ready to run (state R in /proc/self/task/*/stat)."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        n += stat[stat.rindex(")") + 2] == "R"
    return n


def test_a_smaller_loop_wakes_no_more_workers(qlinear, problem):
    """After a 64-thread call started 63 workers, 2-thread calls wake one of them: the others stay asleep rather
    than waking (and spinning) for every loop. Sampled from another thread while the calls run."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("no /proc")
    raw, x = problem
    _run(qlinear, 3, x, raw, 64)
    time.sleep(0.1)  # their 2 ms of spinning over, the 63 workers sleep
    stop, most = threading.Event(), []

    def calls() -> None:
        while not stop.is_set():
            _run(qlinear, 3, x, raw, 2)

    t = threading.Thread(target=calls)
    t.start()
    try:
        for _ in range(200):
            most.append(_runnable_threads())
    finally:
        stop.set()
        t.join(timeout=60)
    assert max(most) <= 4, most  # this sampling thread, the calling thread, worker 1 (and a straggler)


@pytest.mark.parametrize("threads", [2, 3])
def test_back_to_back_loops_run_each_chunk_once(tmp_path, threads):
    """tests/pool_stress.c: a million pairs of loops back to back, each item counted. A pool that lets a worker
    holding the finished loop's ticket claim a chunk while the next loop is being set up runs chunks twice (or
    returns before a chunk ends: the intermittent crash of a CI run) a few hundred times here."""
    cc = find_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "pool_stress"
    subprocess.run([cc, "-O2", "-pthread", f"-I{CSRC}", str(Path(__file__).with_name("pool_stress.c")),
                    "-o", str(exe)], check=True, capture_output=True)
    run = subprocess.run([str(exe), "1000000", str(threads)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("loops 2000000 twice 0 missed 0 stale 0"), run.stdout
