"""Run a decoder one block at a time over calibration windows.

Sequential methods (GPTQ, ZeroQuant's layer-wise distillation) quantize block i on the inputs it receives
from blocks 0 .. i-1 *as already quantized*, so each block corrects for the error upstream of it (GPTQ's
reference code and GPTQModel work this way). ``BlockInputs`` holds those inputs for every window, in
micro-batches, and advances them through a block after the method has changed it.

Shapes: windows (n, T) int64; hidden states (b, T, dim) per micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class BlockInputs:
    """The hidden states entering block ``index`` for each micro-batch of the calibration windows."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch: int = 8):
        self.model, self.index = model, 0
        T = windows.shape[1]
        with torch.no_grad():
            positions = torch.arange(T).expand(1, T)  # (1, T), broadcast over the micro-batch
            self.rope = model.rotary(positions, torch.float32) if model.rotary is not None else None
            self.states = []
            for s in range(0, windows.shape[0], batch):
                x = model.embed_tokens(windows[s:s + batch])  # (b, T, dim)
                if model.embed_positions is not None:
                    x = x + model.embed_positions(positions)
                self.states.append(x)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.states)

    def block(self) -> nn.Module:
        return self.model.layers[self.index]

    def run(self, block: nn.Module | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index`` (or ``block``, e.g. a float teacher copy) applied to ``x`` (b, T, dim)."""
        block = self.block() if block is None else block
        return block(x, rope=self.rope, key_mask=None, cache=None, layer=self.index, start=0)

    @torch.no_grad()
    def advance(self) -> None:
        """Replace the states by block ``index``'s outputs (as the block now is) and move to the next block."""
        self.states = [self.run(x=x) for x in self.states]
        self.index += 1

    @property
    def n_blocks(self) -> int:
        return len(self.model.layers)
