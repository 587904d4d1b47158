"""Loss landscapes along filter-normalised random directions (Li, Xu, Taylor, Studer & Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets", arXiv:1712.09913).

A random direction d has the shape of the parameters θ. Raw Gaussian directions make plots of different models
incomparable (a layer's scale changes the apparent sharpness without changing the function), so each filter
of d is rescaled to the norm of the same filter of θ:

    d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||θ_{i,j}||        (filter j of layer i; for a linear layer, a row)

and one-dimensional parameters (biases, norm gains) get d = 0, the paper's "ignore biases and BN" choice.
The curve is L(θ + α d) and the surface L(θ + α d1 + β d2); the centre (α = β = 0) is the model's own loss.
The weights are restored exactly after every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmlab.common import LlmlabError, save_png


def filter_normalised_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random direction: {parameter name: tensor of its shape}, each row (filter) scaled to the norm of
    the parameter's row; zeros for 1-D parameters. Tied parameters appear once."""
    direction: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        rows_d = d.reshape(d.shape[0], -1)  # (filters, fan_in)
        rows_p = p.detach().reshape(p.shape[0], -1)
        scale = rows_p.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction[name] = (rows_d * scale).reshape(p.shape)
    return direction


@dataclass
class Landscape:
    """Losses over a grid: ``alphas`` (n,), ``betas`` (m,) or None, ``losses`` (n,) or (n, m)."""
    alphas: torch.Tensor
    betas: torch.Tensor | None
    losses: torch.Tensor
    centre: float

    def to_json(self) -> dict:
        return {"alphas": self.alphas.tolist(), "betas": None if self.betas is None else self.betas.tolist(),
                "losses": self.losses.tolist(), "centre": self.centre}


@torch.no_grad()
def loss_landscape(model: nn.Module, loss_fn: Callable[[nn.Module], float], directions: list[dict[str, torch.Tensor]],
                   span: float = 1.0, points: int = 21, progress: Callable[[int, int], None] | None = None
                   ) -> Landscape:
    """L(θ + α d1 [+ β d2]) for α, β in ``points`` steps over [-span, span]; one or two directions."""
    if len(directions) not in (1, 2):
        raise LlmlabError("a landscape has 1 or 2 directions")
    if points < 2 or span <= 0:
        raise LlmlabError(f"--points must be >= 2 and --span > 0, got {points} and {span}")
    params = dict(model.named_parameters())
    base = {name: params[name].detach().clone() for name in directions[0]}
    grid = torch.linspace(-span, span, points)
    coords = [(a,) for a in grid.tolist()] if len(directions) == 1 else \
        [(a, b) for a in grid.tolist() for b in grid.tolist()]
    losses = []
    try:
        for n, coord in enumerate(coords):
            for name, theta in base.items():
                step = sum(c * d[name] for c, d in zip(coord, directions))
                params[name].copy_(theta + step)
            losses.append(float(loss_fn(model)))
            if progress is not None:
                progress(n + 1, len(coords))
    finally:
        for name, theta in base.items():
            params[name].copy_(theta)
    centre = float(loss_fn(model))
    shape = (points,) if len(directions) == 1 else (points, points)
    losses_t = torch.tensor(losses, dtype=torch.float64).reshape(shape)
    return Landscape(grid, None if len(directions) == 1 else grid.clone(), losses_t, centre)


def lm_loss_fn(windows: torch.Tensor, batch: int = 4) -> Callable[[nn.Module], float]:
    """Mean next-token cross-entropy of a causal LM over token windows (n, T)."""
    def loss(model: nn.Module) -> float:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, windows.shape[0], batch):
            x = windows[i:i + batch].to(device)
            logits = model(x[:, :-1]).float()  # (b, T-1, V)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum")
            total, count = total + float(ce), count + x[:, 1:].numel()
        return total / count
    return loss


def plot_landscape(land: Landscape, path: Path, title: str = "") -> Path:
    """1-D: the curve; 2-D: filled contours beside a 3-D surface. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if land.betas is None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(land.alphas.numpy(), land.losses.numpy(), marker="o", ms=3)
        ax.axvline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("α (filter-normalised direction)")
        ax.set_ylabel("loss (nats/token)")
    else:
        fig = plt.figure(figsize=(11, 4.5))
        ax = fig.add_subplot(1, 2, 1)
        A, B = torch.meshgrid(land.alphas, land.betas, indexing="ij")
        cs = ax.contourf(A.numpy(), B.numpy(), land.losses.numpy(), levels=20, cmap="viridis")
        ax.contour(A.numpy(), B.numpy(), land.losses.numpy(), levels=20, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="loss (nats/token)")
        ax.plot([0], [0], "r+", ms=10)
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        ax3 = fig.add_subplot(1, 2, 2, projection="3d")
        ax3.plot_surface(A.numpy(), B.numpy(), land.losses.numpy(), cmap="viridis", linewidth=0)
        ax3.set_xlabel("α")
        ax3.set_ylabel("β")
        ax3.set_zlabel("loss")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path
