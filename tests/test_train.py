"""The training loop: exact resume after SIGTERM and SIGKILL, corrupt checkpoints, NaN handling, a full
disk, config mismatch, DDP/FSDP under a real torchrun, objectives (causal, MoE, MLM), mixed precision."""

import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.data.corpus import stdlib_root
from llmlab.data.shards import PrepareConfig, prepare
from llmlab.formats import checkpoint as ckpt
from llmlab.train.loop import TrainConfig, train
from llmlab.train.mlm import mask_tokens
from llmlab.train.pretrain import ModelFlags, PretrainConfig, build_task, run_pretrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    root = stdlib_root()
    files = [str(p) for p in sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))[:8]]
    prepare(PrepareConfig(inputs=files, out=str(out), vocab_size=320, val_fraction=0.1), show_progress=False)
    return out


def flags(shards, out, steps=12, **extra) -> list[str]:
    base = {"data": shards, "out": out, "arch": "llama", "dim": 32, "n-layers": 2, "n-heads": 4, "steps": steps,
            "batch-size": 4, "seq-len": 32, "eval-every": 0, "save-every": 4, "warmup": 2, "sample-tokens": 0,
            "device": "cpu", "lr": 3e-3}
    base.update(extra)
    args = []
    for k, v in base.items():
        args += [f"--{k}", str(v)]
    return [*args, "--no-progress"]


def run_cli(args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmlab", "pretrain", *args], capture_output=True, text=True,
                          env=env, **kw)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def setups(run: Path) -> list[dict]:
    """The loop's record of what each (re)start set up: process group size, wrapper, micro-batches, ..."""
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "setup"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state(ckpt.list_checkpoints(run / "checkpoints")[0])[1]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def wait_for_steps(proc, run: Path, n: int, also=lambda: True, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = run / "metrics.jsonl"
        if m.exists() and m.read_text().count('"train"') >= n and also():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("timeout")


def start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmlab", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref")
    r = run_cli(flags(shards, run, steps=60, **{"save-every": 8, "dim": 64}))
    assert r.returncode == 0, r.stderr
    return run


def test_sigterm_then_resume_is_bit_identical(shards, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = start(flags(shards, run, steps=60, **{"save-every": 8, "dim": 64}))
    wait_for_steps(proc, run, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped_at = len(losses(run))
    assert stopped_at < 60
    assert ckpt.list_checkpoints(run / "checkpoints")[0].name == f"step-{stopped_at:08d}"  # saved on the way out
    r = run_cli(flags(shards, run, steps=60, **{"save-every": 8, "dim": 64}))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout
    assert losses(run) == losses(reference_run)  # bit for bit
    final = ckpt.list_checkpoints(run / "checkpoints")[0]
    ref_final = ckpt.list_checkpoints(reference_run / "checkpoints")[0]
    assert (final / "model.safetensors").read_bytes() == (ref_final / "model.safetensors").read_bytes()
    assert_same_weights(final_weights(run), final_weights(reference_run))


def test_hard_kill_then_resume_is_bit_identical(shards, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = start(flags(shards, run, steps=60, **{"save-every": 8, "dim": 64}))
    wait_for_steps(proc, run, 11, also=lambda: bool(ckpt.list_checkpoints(run / "checkpoints")))
    proc.kill()  # SIGKILL: no chance to save
    proc.communicate()
    saved_at = int(ckpt.list_checkpoints(run / "checkpoints")[0].name[5:])
    assert len(losses(run)) > saved_at  # steps after the checkpoint, lost with the process
    r = run_cli(flags(shards, run, steps=60, **{"save-every": 8, "dim": 64}))
    assert r.returncode == 0, r.stderr
    assert f"(step {saved_at})" in r.stdout
    assert losses(run) == losses(reference_run)  # bit for bit
    assert_same_weights(final_weights(run), final_weights(reference_run))


class _Noisy:
    """A causal-LM task that draws from torch's global RNG every step, as dropout does, and can SIGTERM itself
    during one step, as a user would: resuming it reproduces the uninterrupted run only if the RNG state is
    checkpointed and restored."""

    def __init__(self, task, stop_at=None):
        self.task, self.stop_at = task, stop_at

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, step, *args, **kw):
        loss, n = self.task.loss(model, step, *args, **kw)
        if step == self.stop_at:
            signal.raise_signal(signal.SIGTERM)  # the loop finishes this step, saves and returns
        return loss * (0.5 + torch.rand(())), n


def _noisy_run(shards, run: Path, stop_at=None):
    pcfg, mflags, tcfg = _small(shards, save_every=0)
    return train(_Noisy(build_task(pcfg, mflags, tcfg), stop_at), tcfg, run)


def test_resume_restores_the_rng_state(shards, tmp_path, monkeypatch):
    assert _noisy_run(shards, tmp_path / "whole").stopped == "done"
    for name in ("resumed", "rng-not-restored"):
        cut = _noisy_run(shards, tmp_path / name, stop_at=2)
        assert cut.stopped == "interrupted" and cut.step == 3
    assert _noisy_run(shards, tmp_path / "resumed").resumed_from == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "whole"))
    # negative control: the same resume without restoring the RNG state follows another curve
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    assert _noisy_run(shards, tmp_path / "rng-not-restored").resumed_from == 3
    broken = losses(tmp_path / "rng-not-restored")
    assert broken[:3] == losses(tmp_path / "whole")[:3] and broken[3:] != losses(tmp_path / "whole")[3:]


def test_corrupt_newest_checkpoint_is_skipped(shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(flags(shards, run, steps=8)).returncode == 0
    newest, older = ckpt.list_checkpoints(run / "checkpoints")[:2]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # one flipped bit
    (newest / "model.safetensors").write_bytes(bytes(data))
    assert "SHA-256" in ckpt.verify(newest)
    assert ckpt.latest(run / "checkpoints")[0] == older
    r = run_cli(flags(shards, run, steps=10))
    assert r.returncode == 0, r.stderr
    assert f"skipping checkpoint {newest}" in r.stdout and f"resuming from {older}" in r.stdout
    truncated = ckpt.list_checkpoints(run / "checkpoints")[0]
    (truncated / "training_state.pt").write_bytes((truncated / "training_state.pt").read_bytes()[:100])
    assert "truncated" in ckpt.verify(truncated)


def test_resume_with_a_different_model_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(flags(shards, run, steps=4)).returncode == 0
    r = run_cli(flags(shards, run, steps=8, dim=64))
    assert r.returncode == 2 and "model config differs" in r.stderr and "Traceback" not in r.stderr


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_disk_full_while_checkpointing_leaves_nothing_corrupt(shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli(flags(shards, run, steps=4, dim=64), preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "could not write checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert ckpt.list_checkpoints(run / "checkpoints") == []
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_bad_train_flags(shards, tmp_path):
    for extra, msg in [({"batch-size": 0}, "batch-size must be >= 1"), ({"lr": -1}, "lr must be"),
                       ({"seq-len": 10**6}, "fewer than one window"), ({"micro-batch": 3}, "must divide"),
                       ({"batch-size": 100_000}, "larger than the")]:
        r = run_cli(flags(shards, tmp_path / "r", steps=2, **extra))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
    r = run_cli(flags(tmp_path / "nothing-here", tmp_path / "r", steps=2))
    assert r.returncode == 2 and "no prepared shards" in r.stderr


class _NaNAt:
    """A causal-LM task whose loss becomes NaN at one step: the loop must notice before the update."""

    def __init__(self, task, bad_step):
        self.task, self.bad_step = task, bad_step

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, step, *args, **kw):
        loss, n = self.task.loss(model, step, *args, **kw)
        return (loss * float("nan") if step == self.bad_step else loss), n


def _small(shards, **kw):
    pcfg = PretrainConfig(data=str(shards), sample_tokens=0)
    model_kw = {k: v for k, v in kw.items() if k in ModelFlags.__annotations__}
    mflags = ModelFlags(dim=32, n_layers=2, n_heads=4, **model_kw)
    base = dict(steps=6, batch_size=4, seq_len=32, eval_every=0, save_every=2, warmup=1, device="cpu", progress=False)
    tcfg = TrainConfig(**{**base, **{k: v for k, v in kw.items() if k in TrainConfig.__annotations__}})
    return pcfg, mflags, tcfg


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    pcfg, mflags, tcfg = _small(shards)
    task = _NaNAt(build_task(pcfg, mflags, tcfg), bad_step=2)
    with pytest.raises(LlmlabError, match=r"non-finite loss at step 3.*step-00000002"):
        train(task, tcfg, tmp_path / "stop")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stop" / "checkpoints")] == ["step-00000002"]
    pcfg, mflags, tcfg = _small(shards, on_nan="skip")
    task = _NaNAt(build_task(pcfg, mflags, tcfg), bad_step=2)
    result = train(task, tcfg, tmp_path / "skip")
    assert result.step == 6 and result.stopped == "done"
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


class _Recording:
    """A task that records the rows of every training forward pass (step, first_row, rows)."""

    def __init__(self, task):
        self.task, self.calls = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, step, first_row, rows, total_rows, split="train"):
        if split == "train":
            self.calls.append((step, first_row, rows))
        return self.task.loss(model, step, first_row, rows, total_rows, split)


def _counted(forward, runs: list):
    # a wrapper, not a forward hook: checkpointing's recomputation calls forward without running module hooks
    def counted(*args, **kwargs):
        if torch.is_grad_enabled():
            runs.append(1)
        return forward(*args, **kwargs)

    return counted


def test_activation_checkpointing_and_accumulation_give_the_same_losses(shards, tmp_path):
    results, calls, mlp_runs, setup = {}, {}, {}, {}
    for name, extra in [("plain", {}), ("ckpt", {"activation_checkpointing": True}), ("accum", {"micro_batch": 1})]:
        pcfg, mflags, tcfg = _small(shards, **extra)
        task = _Recording(build_task(pcfg, mflags, tcfg))
        runs = []
        for block in task.model.layers:  # counts forward passes with autograd on, recomputations included
            block.mlp.forward = _counted(block.mlp.forward, runs)
        train(task, tcfg, tmp_path / name)
        results[name] = [loss for _, loss in losses(tmp_path / name)]
        calls[name], mlp_runs[name], (setup[name],) = task.calls, len(runs), setups(tmp_path / name)
    steps, layers = 6, 2
    # checkpointing: both blocks wrapped, and each block's forward runs again in backward
    assert [setup[n]["checkpointed_blocks"] for n in ("plain", "ckpt", "accum")] == [0, layers, 0]
    assert mlp_runs["plain"] == steps * layers and mlp_runs["ckpt"] == 2 * steps * layers
    assert results["plain"] == results["ckpt"]
    # accumulation: 4 forward passes of one row each per step, the same curve as one pass of 4 rows
    assert calls["plain"] == [(s, 0, 4) for s in range(steps)]
    assert calls["accum"] == [(s, r, 1) for s in range(steps) for r in range(4)]
    assert (setup["accum"]["micro_batch"], setup["accum"]["accum"]) == (1, 4)
    assert max(abs(a - b) for a, b in zip(results["plain"], results["accum"])) < 1e-5


def test_bf16_moe_and_gpt2(shards, tmp_path):
    pcfg, mflags, tcfg = _small(shards, dtype="bfloat16", n_experts=4, experts_per_token=2)
    result = train(build_task(pcfg, mflags, tcfg), tcfg, tmp_path / "moe")
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    rec = next(r for r in map(json.loads, (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train")
    assert {"moe_aux", "moe_dropped", "moe_max_load"} <= set(rec)
    pcfg, mflags, tcfg = _small(shards, arch="gpt2", steps=20, lr=3e-3)
    result = train(build_task(pcfg, mflags, tcfg), tcfg, tmp_path / "gpt2")
    curve = losses(tmp_path / "gpt2")
    assert curve[-1][1] < curve[0][1] - 0.5
    assert (tmp_path / "gpt2" / "loss.png").stat().st_size > 10_000
    report = (tmp_path / "gpt2" / "report.html").read_text()  # written at the end of every run
    assert report.count("<svg") == 4 and "loss.png" in report and "data:image/png;base64," in report


def test_checkpoint_is_a_model_folder_llmlab_loads(shards, tmp_path, monkeypatch):
    from llmlab import load
    from llmlab.train import pretrain

    built = []  # the task run_pretrain trains, to compare the saved folder with the model in memory
    build = pretrain.build_task
    monkeypatch.setattr(pretrain, "build_task", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    pcfg, mflags, tcfg = _small(shards)
    pcfg.out = str(tmp_path / "run")
    pcfg.sample_tokens = 20
    result = run_pretrain(pcfg, mflags, tcfg)
    assert result.step == tcfg.steps and result.checkpoint.name == f"step-{tcfg.steps:08d}"
    trained = built[0].model.eval()
    llm = load(str(result.checkpoint))
    assert_same_weights(llm.model.state_dict(), trained.state_dict())
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(llm.model(x), trained(x))
    assert (tmp_path / "run" / "sample.txt").read_text().startswith("def ")
    text = llm.generate("def ", 8, raw=True)
    assert isinstance(text, str)


def test_mlm_masking_statistics():
    ids = torch.randint(10, 500, (64, 512))
    ids[:, ::50] = 3  # separators
    inputs, labels = mask_tokens(ids, mask_id=1, vocab_size=500, generator=torch.Generator().manual_seed(0),
                                 protect=(3,))
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15 * 0.98) < 0.005
    assert not chosen[ids == 3].any()
    masked = (inputs == 1) & chosen
    kept = (inputs == ids) & chosen
    frac_mask = masked.sum().item() / chosen.sum().item()
    frac_keep = kept.sum().item() / chosen.sum().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_keep - 0.1) < 0.02
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_mlm_pretraining_runs_and_saves_the_head(shards, tmp_path):
    pcfg, mflags, tcfg = _small(shards, arch="bert", steps=20, lr=2e-3)
    pcfg.objective = "mlm"
    result = train(build_task(pcfg, mflags, tcfg), tcfg, tmp_path / "mlm")
    curve = losses(tmp_path / "mlm")
    assert curve[-1][1] < curve[0][1]
    assert (result.checkpoint / "mlm_head.safetensors").exists()
    pcfg.objective = "clm"
    with pytest.raises(LlmlabError, match="does not fit"):
        build_task(pcfg, mflags, tcfg)
    pcfg.objective = "mlm"  # --arch auto picks bert for mlm
    assert build_task(pcfg, ModelFlags(dim=32, n_layers=1, n_heads=4), tcfg).model_config.arch == "bert"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_follow_the_single_process_curve(shards, tmp_path, parallel):
    one = tmp_path / "one"
    r = run_cli(flags(shards, one, steps=6, **{"save-every": 3}))
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llmlab", "pretrain",
           *flags(shards, two, steps=6, **{"save-every": 3, "parallel": parallel, "sample-tokens": 8})]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # as the README runs it, with the closing sample (drawn from the saved checkpoint, not the sharded model)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (two / "sample.txt").read_text().startswith("def ")
    # two ranks joined one process group, and the model was wrapped (unwrapped, the first losses agree too)
    assert setups(one) == [{"kind": "setup", "step": 0, "world_size": 1, "wrapper": "none", "fsdp_modules": 0,
                            "micro_batch": 4, "accum": 1, "checkpointed_blocks": 0}]
    (seen,) = setups(two)
    assert (seen["world_size"], seen["micro_batch"], seen["accum"]) == (2, 2, 1)
    if parallel == "ddp":
        assert (seen["wrapper"], seen["fsdp_modules"]) == ("DistributedDataParallel", 0)
    else:  # every block and the root sharded
        assert (seen["wrapper"], seen["fsdp_modules"]) == ("FSDPModule", 2 + 1)
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    # the checkpoint written by rank 0 holds the full model
    cfg, sd = ckpt.load_model_state(ckpt.list_checkpoints(two / "checkpoints")[0])
    assert sd["embed_tokens.weight"].shape == (cfg.vocab_size, 32)


def test_adamw8bit_trains_and_resumes_bit_identically(shards, tmp_path):
    """--optimizer adamw8bit: the loop keeps 8-bit moments (uint8 codes in the checkpoint), learns like AdamW,
    and an interrupted run resumes to the same losses and weights as an uninterrupted one."""

    def run(name, stop_at=None, optimizer="adamw8bit"):
        pcfg, mflags, tcfg = _small(shards, save_every=0)
        tcfg.optimizer = optimizer
        return train(_Noisy(build_task(pcfg, mflags, tcfg), stop_at), tcfg, tmp_path / name)

    assert run("whole").stopped == "done"
    assert run("resumed", stop_at=2).stopped == "interrupted"
    assert run("resumed").resumed_from == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "whole")
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "whole"))
    state = ckpt.load_training_state(ckpt.list_checkpoints(tmp_path / "whole" / "checkpoints")[0])
    codes = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k.endswith("_codes")]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    run("fp32", optimizer="adamw")
    eight, fp32 = [x for _, x in losses(tmp_path / "whole")], [x for _, x in losses(tmp_path / "fp32")]
    assert max(abs(a - b) for a, b in zip(eight, fp32)) < 1e-3  # measured 1e-4; a step of lr 0 gives > 1e-2
    with pytest.raises(LlmlabError, match="--optimizer"):
        TrainConfig(optimizer="sgd").validate()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_head_gives_the_plain_head_curve(shards, tmp_path, arch):
    """The chunked head + cross-entropy (nn/linear_ce.py, the default on CPUs) trains like the full-logits loss."""
    curves = {}
    for fused in (True, False):
        pcfg, mflags, tcfg = _small(shards, arch=arch, steps=4, save_every=0)
        task = build_task(pcfg, mflags, tcfg)
        assert task.fused_head is None  # the default: fused on CPUs, the plain head on GPUs
        task.fused_head = fused
        train(task, tcfg, tmp_path / str(fused))
        curves[fused] = losses(tmp_path / str(fused))
    assert [s for s, _ in curves[True]] == [s for s, _ in curves[False]]
    assert max(abs(a - b) for (_, a), (_, b) in zip(curves[True], curves[False])) < 1e-5


def test_compile_follows_the_eager_curve_and_resumes_exactly(shards, tmp_path):
    """--compile (the forward and the plain head's cross-entropy as one Inductor graph, CausalLMTask.compile_loss_)
    trains like the eager loop, and a compiled run stopped mid-way resumes to the uninterrupted compiled run's
    losses and weights. The first compile costs most of this test's time (Inductor writes and builds C++ kernels);
    the later ones hit Inductor's graph cache. One thread: with two, Inductor's CPU reductions make two
    identical compiled runs differ by about 1e-6 in the bias weights (measured), so nothing is bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compiled_runs(shards, tmp_path, "gpt2")
    finally:
        torch.set_num_threads(threads)


def _compiled_runs(shards, tmp_path, arch):

    def run(name, compile, stop_at=None):
        torch._dynamo.reset()  # each run compiles afresh, as a resumed run's new process does
        pcfg, mflags, tcfg = _small(shards, arch=arch, steps=4, save_every=0, compile=compile)
        task = build_task(pcfg, mflags, tcfg)
        result = train(_Noisy(task, stop_at), tcfg, tmp_path / name)
        return task, result

    task, _ = run("compiled", True)
    assert task._loss_compiled  # the loss was compiled with the forward, not the model alone
    run("eager", False)
    compiled, eager = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert [s for s, _ in compiled] == [s for s, _ in eager]
    assert max(abs(a - b) for (_, a), (_, b) in zip(compiled, eager)) < 1e-4  # fp32: fused kernels reorder sums
    assert run("resumed", True, stop_at=2)[1].stopped == "interrupted"
    assert run("resumed", True)[1].resumed_from == 3
    assert losses(tmp_path / "resumed") == compiled
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "compiled"))


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pretrain_lines_run_with_a_small_budget(shards, tmp_path):
    """Each `llmlab pretrain` line of the README's quick start (gpt2 + bf16 + activation checkpointing, MoE, 8-bit
    AdamW, MLM) as written, with a small model and 2 steps appended (the last value of a flag wins): it exits 0
    and its checkpoint holds the architecture the line asks for."""
    lines = [line.split(" #")[0].strip() for line in README.read_text().splitlines()
             if line.startswith("llmlab pretrain") and "[" not in line]
    assert len(lines) >= 5, lines
    want = {"--arch gpt2": "gpt2", "--n-experts 8": "mixtral", "--objective mlm": "bert"}
    for i, line in enumerate(lines):
        out = tmp_path / f"run{i}"
        budget = flags(shards, out, steps=2, **{"save-every": 2, "batch-size": 2})
        cut = budget.index("--arch")  # the line's own architecture (or the default, a Llama) stays
        r = run_cli([*line.split()[2:], *budget[:cut], *budget[cut + 2:]], timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.stderr[-2000:])
        config = json.loads((out / "checkpoints" / "step-00000002" / "config.json").read_text())
        arch = next((a for flag, a in want.items() if flag in line), "llama")
        assert config["model_type"] == arch, (line, config)
        if "--n-experts" in line:
            assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2), config
        if "--activation-checkpointing" in line:
            assert setups(out)[0]["checkpointed_blocks"] == 2, setups(out)  # both blocks of the small model


def test_readme_generate_from_a_pretrain_checkpoint(shards, tmp_path):
    """The README's `llmlab generate --model runs/pretrain/checkpoints/step-00000400 --raw "def "` as written (8 new
    tokens) in a folder where a small `llmlab pretrain` ran its 400 steps to the default runs/pretrain: a
    checkpoint folder loads as a model."""
    line = next(line.split(" #")[0].strip() for line in README.read_text().splitlines()
                if line.startswith("llmlab generate --model runs/pretrain/checkpoints/"))
    budget = flags(shards, "runs/pretrain", steps=400, **{"save-every": 400, "batch-size": 2, "seq-len": 16})
    r = run_cli(budget, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "llmlab", *shlex.split(line)[1:], "--max-new-tokens", "8"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip(), "no continuation printed"  # --raw: the continuation of "def " alone
