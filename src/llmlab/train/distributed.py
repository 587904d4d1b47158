"""Data parallelism under ``torchrun``: DDP (Li et al. 2020, arXiv:2006.15704) and FSDP full sharding,
the ZeRO-3 idea (Rajbhandari et al. 2020, arXiv:1910.02054; Zhao et al. 2023, arXiv:2304.11277).

``torchrun --nproc-per-node N -m llmlab pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR; ``setup`` reads them and joins the process group (gloo on CPU, NCCL on GPUs). Across
machines, run the same command on each node with ``--nnodes M --node-rank R --rdzv-endpoint HOST:PORT``
(see README). Each rank takes its rows of the same global batch (``data/shards.py``), so N processes
follow the loss curve of one process with the same global batch (tested with 2 CPU processes).

- DDP: every rank holds the whole model; gradients are all-reduced (averaged) during backward.
- FSDP (``--parallel fsdp``): parameters, gradients and optimizer state are sharded across ranks
  (``torch.distributed.fsdp.fully_shard`` per block, then the root); each block's full weights are
  gathered just in time for its forward/backward and freed after.
Checkpoints gather the full state on every rank and rank 0 writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmlab.common import LlmlabError

PARALLEL = ("ddp", "fsdp")


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a plain World otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, device)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, parallel: str) -> nn.Module:
    """DDP- or FSDP-wrap ``model`` (a no-op for one process)."""
    if parallel not in PARALLEL:
        raise LlmlabError(f"unknown --parallel {parallel!r}: use {' or '.join(PARALLEL)}")
    if not world.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the run's own device type: without a mesh, fully_shard picks CUDA whenever a GPU is visible, also for
    # --device cpu (then rank 1 of two asks for a second GPU a one-GPU machine does not have)
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_shard(param: torch.Tensor) -> bool:
    """Whether FSDP holds ``param`` as a shard (a DTensor): its full value exists only inside the forward of
    the module that owns it, so code outside that forward (a fused loss over the head) cannot use it."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def describe(wrapped: nn.Module) -> dict:
    """What ``setup`` and ``wrap`` actually did, for the run's metrics: the size of the joined process group,
    the wrapper class, and how many modules FSDP shards (blocks + root)."""
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):  # one process: nothing was joined or wrapped
        return {"world_size": 1, "wrapper": "none", "fsdp_modules": 0}
    from torch.distributed.fsdp import FSDPModule

    sharded = sum(isinstance(m, FSDPModule) for m in wrapped.modules())
    wrapper = ("DistributedDataParallel" if isinstance(wrapped, DistributedDataParallel)
               else "FSDPModule" if isinstance(wrapped, FSDPModule) else "none")
    joined = dist.get_world_size()
    return {"world_size": joined, "wrapper": wrapper, "fsdp_modules": sharded}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: every ``layers`` ModuleList, at any depth."""
    return [block for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)
            and name.split(".")[-1] == "layers" for block in mod]


def all_mean(value: float, world: World) -> float:
    """Mean of a Python float over ranks (for logging)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item()) / world.world_size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict, osd: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
