"""Parity of GKD's generalized Jensen-Shannon divergence with TRL's ``GKDTrainer.generalized_jsd_loss`` (the
reference implementation of Agarwal et al. 2023's eq. 1): the value and the gradient, for beta at both ends and
inside, at two temperatures, with masked positions (TRL: labels -100; here: the positions not selected)."""

from __future__ import annotations

import os

import pytest
import torch

from llmlab.train.distill_losses import generalized_jsd
from tests.conftest import need


@pytest.fixture(scope="module")
def trl_jsd():
    need("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(trl_jsd, beta, temperature):
    torch.manual_seed(0)
    B, T, V = 2, 5, 50
    student = (3 * torch.randn(B, T, V)).requires_grad_(True)
    teacher = 3 * torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100  # a prompt: not scored
    labels[1, -1] = -100  # padding
    want = trl_jsd(student, teacher, labels=labels, beta=beta, temperature=temperature)
    (g_want,) = torch.autograd.grad(want, student)
    keep = labels != -100  # (B, T)
    got = generalized_jsd(student[keep], teacher[keep], beta, temperature)  # (N, V) rows of the scored positions
    (g_got,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
