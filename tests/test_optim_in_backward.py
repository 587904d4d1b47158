"""The optimizer step fused into backward (train/optim_in_backward.py, --optimizer-in-backward): N steps equal
the plain AdamW steps bit for bit (tied, frozen and unused parameters; fp32 and 8-bit moments; a changing
learning rate), gradients are freed as they are used, the loop applies its schedule and checkpoints / resumes
exactly (llmlab dpo --method full on a tiny model), and the combinations that would not be the same update exit
2 with one line."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from llmlab.common import LlmlabError
from llmlab.formats import checkpoint as ckpt
from llmlab.train.loop import TrainConfig
from llmlab.train.optim import build_adamw, lr_at
from llmlab.train.optim_in_backward import OptimizerInBackward
from test_sft import tiny_folder, tiny_tokenizer  # noqa: F401  (tiny_folder: a fixture)


class Tiny(nn.Module):
    """Tied embedding / head, a frozen layer, a layer that never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 7)
        self.norm = nn.LayerNorm(4)
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.frozen(self.norm(self.embed(x)))
        return self.head(h).square().mean() + self.proj(h).sin().mean()


@pytest.mark.parametrize("eight_bit", [False, True])
def test_steps_in_backward_equal_plain_adamw_steps(eight_bit):
    torch.manual_seed(0)
    plain_model = Tiny()
    fused_model = copy.deepcopy(plain_model)
    plain = build_adamw(plain_model, 0.1, 0.3, eight_bit=eight_bit)
    fused = build_adamw(fused_model, 0.1, 0.3, eight_bit=eight_bit, in_backward=True)
    assert isinstance(fused, OptimizerInBackward) and len(fused.optimizers) == 8  # embed = head, 7 others
    x = torch.tensor([[0, 1, 4, 6, 2]])
    for t in range(4):
        lr = lr_at(t, lr=0.1, warmup=2, total=4)
        for opt in (plain, fused):
            for group in opt.param_groups:
                group["lr"] = lr
        plain_model(x).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(plain_model.parameters(), float("inf")))
        plain.step()
        plain.zero_grad(set_to_none=True)
        fused_model(x).backward()  # the update happens here
        assert all(p.grad is None for p in fused_model.parameters())  # every gradient freed
        assert fused.pop_grad_norm() == pytest.approx(norm, rel=1e-6)
    for (name, a), b in zip(plain_model.named_parameters(), fused_model.parameters()):
        assert torch.equal(a, b), name
    fused.remove_hooks()
    before = [p.detach().clone() for p in fused_model.parameters()]
    fused_model(x).backward()  # no hooks: nothing updated
    assert all(torch.equal(a, b) for a, b in zip(before, fused_model.parameters()))


def test_a_non_finite_gradient_leaves_its_parameter_and_shows_in_the_norm():
    model = nn.Linear(3, 1)
    opt = build_adamw(model, 0.1, 0.0, in_backward=True)
    w = model.weight.detach().clone()
    (model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum()).backward()
    assert torch.equal(model.weight, w) and model.weight.grad is None
    assert opt.pop_grad_norm() != opt.pop_grad_norm()  # nan, then 0 after the reset


# ---- through the loop: llmlab dpo --method full --------------------------------------------------------------

README_LINE = "llmlab dpo --method full --optimizer-in-backward --grad-clip 0"
BUDGET = ["--lr", "3e-3", "--batch-size", "2", "--pairs", "4", "--val-pairs", "0", "--eval-examples", "0",
          "--steps", "3", "--warmup", "1", "--save-every", "2", "--no-progress"]


def _train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_model_state(ckpt.list_checkpoints(run / "checkpoints")[0])[1]


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Three DPO steps (warmup 1 + cosine) on the tiny model: the README's line with a small budget ("fused"), the
    same without --optimizer-in-backward ("plain", --grad-clip 0 too), and the README's line stopped by SIGTERM
    during step 2, then run again ("resumed")."""
    from llmlab.cli import main
    from llmlab.train.dpo import DPOTask

    root = tmp_path_factory.mktemp("inbwd")
    line = README_LINE.split()[1:]
    out = {name: root / name for name in ("plain", "fused", "resumed")}
    assert main([*[a for a in line if a != "--optimizer-in-backward"], "--model", str(tiny_folder), "--out",
                 str(out["plain"]), *BUDGET]) == 0
    assert main([*line, "--model", str(tiny_folder), "--out", str(out["fused"]), *BUDGET]) == 0
    loss = DPOTask.loss

    def stop_in_step_2(self, model, step, *args, **kw):  # a user's Ctrl-C / SIGTERM during the second step
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return loss(self, model, step, *args, **kw)

    DPOTask.loss = stop_in_step_2
    try:
        assert main([*line, "--model", str(tiny_folder), "--out", str(out["resumed"]), *BUDGET]) == 130
    finally:
        DPOTask.loss = loss
    assert [r["step"] for r in _train_records(out["resumed"])] == [1, 2]
    assert main([*line, "--model", str(tiny_folder), "--out", str(out["resumed"]), *BUDGET]) == 0
    return out


def test_readme_line_is_this():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert any(x.split("#")[0].strip() == README_LINE for x in readme.splitlines())


def test_loop_in_backward_equals_plain_steps_with_the_schedule(runs):
    """The same losses, learning rates (warmup + cosine) and final weights as the plain AdamW step, no clipping
    either side, and the checkpoint holds the same AdamW moments under the same parameter names."""
    plain, fused = _train_records(runs["plain"]), _train_records(runs["fused"])
    assert [r["lr"] for r in fused] == [lr_at(s, lr=3e-3, warmup=1, total=3) for s in range(3)]
    assert [r["loss"] for r in fused] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in fused] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-5)
    a, b = _final(runs["plain"]), _final(runs["fused"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (ckpt.load_training_state(ckpt.list_checkpoints(runs[r] / "checkpoints")[0])["optimizer"]["state"]
              for r in ("plain", "fused"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    assert json.loads((runs["fused"] / "train_config.json").read_text())["optimizer_in_backward"] is True
    assert json.loads((runs["fused"] / "summary.json").read_text())["saved"]


def test_loop_in_backward_resumes_exactly(runs):
    """Stopped during step 2 (checkpoint on the way out), run again: the uninterrupted run's losses and weights
    (the learning rate set after loading the optimizer state reaches it: step 3's differs from step 2's)."""
    whole, resumed = _train_records(runs["fused"]), _train_records(runs["resumed"])
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    a, b = _final(runs["fused"]), _final(runs["resumed"])
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- refused combinations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    ({}, "--optimizer-in-backward cannot clip the global gradient norm"),
    ({"grad_clip": 0.0, "micro_batch": 4}, "cannot accumulate gradients over micro-batches"),
    ({"grad_clip": 0.0, "on_nan": "skip"}, "use --on-nan stop"),
    ({"grad_clip": 0.0, "dtype": "float16"}, "use --dtype bfloat16 or float32"),
])
def test_refused_combinations(flags, message):
    with pytest.raises(LlmlabError, match=message):
        TrainConfig(optimizer_in_backward=True, batch_size=8, **flags).validate()
    TrainConfig(optimizer_in_backward=True, grad_clip=0.0, micro_batch=8, batch_size=8).validate()  # no accumulation


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    """As a user runs it: the default --grad-clip 1.0 with the flag stops before loading anything (the process
    level, exit 2 with no traceback, is tests/test_dpo.py's test_cli_process_bad_input_no_traceback)."""
    from llmlab.cli import main

    code = main(["dpo", "--method", "full", "--optimizer-in-backward", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert err.startswith("llmlab: error: --optimizer-in-backward cannot clip") and "--grad-clip 0" in err
