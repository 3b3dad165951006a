"""Sharding a reward model over the processes of one training step with torch FSDP2 (`fully_shard`).

A step granted more than one device is launched as one process per device (rmens.training.launcher, by the
launcher config in rmens/presets/launch/). Each rank then shards the model here: every decoder block is its
own FSDP2 unit (its weights gathered for its forward and backward only), and the whole ensemble the root
(embeddings, final norm and reward heads). Weights stay fp32 and bf16 is autocast's, as in one process.
Gradients are reduce-scattered, so each rank holds 1/world of the weights, gradients and optimizer state. Each
batch is split over the ranks (`rank_batches`), so they compute what one process does.

The launch guard (`check_launch`, `check_sharded`) exists because the failure it catches is silent:
accelerate with an FSDP config on CPUs, or a launcher that starts one process, trains unsharded copies and
reports success. A rank refuses to train unless the world is the size the launcher config was given and
every trainable parameter is sharded over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rmens.config import StrictModel, load_yaml

LAUNCH_CONFIG = Path(__file__).resolve().parent.parent / "presets" / "launch" / "fsdp2.yaml"


class LaunchConfig(StrictModel):
    """How a multi-device training step is launched and sharded (rmens/presets/launch/fsdp2.yaml)."""

    launcher: Literal["torchrun"] = Field("torchrun", description="What starts one process per device.")
    sharding: Literal["fsdp2"] = Field("fsdp2", description="How the ranks split the model: torch FSDP2.")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Collectives: auto is nccl on CUDA "
                                                                         "devices, gloo on CPUs.")
    reshard_after_forward: bool = Field(True, description="Free each block's gathered weights after its forward.")
    timeout_minutes: float = Field(60, gt=0, description="How long a rank waits in a collective (the others while "
                                                         "rank 0 saves the gathered model) before failing.")
    nproc: int | None = Field(None, ge=2, description="Processes (one per granted device); set at launch.")

    @classmethod
    def load(cls, path: str | Path = LAUNCH_CONFIG) -> LaunchConfig:
        return cls.model_validate(load_yaml(path))


class LaunchError(RuntimeError):
    """A rank was not launched as its launcher config says (the silent unsharded fallback)."""


def check_launch(launch: LaunchConfig) -> int:
    """This rank's world size, after refusing a launch that does not match `launch`. Call after the process
    group exists (rmens.training.rank makes it under torchrun)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if launch.nproc is None or world != launch.nproc:
        raise LaunchError(f"this training process runs in a world of {world} process(es), but its launcher config "
                          f"asks for {launch.nproc} ({launch.launcher}, {launch.sharding}): refusing to train "
                          "unsharded copies; launch it with rmens.training.launcher")
    return world


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 units below the root: each decoder block (the class names transformers
    lists in the backbone's `_no_split_modules`)."""
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())
    if not block_names:
        raise ValueError(f"{type(model).__name__} names no decoder block class (_no_split_modules): cannot shard it")
    return [m for m in model.modules() if type(m).__name__ in block_names]


def shard_ensemble(ensemble: nn.Module, launch: LaunchConfig, autocast=None) -> nn.Module:
    """Shard `ensemble` in place over every rank (FSDP2), then check that it is; returns it. `autocast`: the
    accelerator's autocast context, which its forward then runs under, as accelerate's prepare makes one
    process's model do: fp32 weights, bf16 matmuls, so that both compute the same (FSDP2's own bf16 weights
    would round the weights, norms and residual stream as well)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for block in shard_blocks(ensemble):
        fully_shard(block, mesh=mesh, reshard_after_forward=launch.reshard_after_forward)
    # The root holds the rest (embeddings, final norm, reward heads). The heads are read inside the root's
    # forward, so they cannot be a unit of their own (FSDP2 gathers a unit's weights when its forward runs).
    fully_shard(ensemble, mesh=mesh, reshard_after_forward=launch.reshard_after_forward)
    if autocast is not None:
        ensemble.forward = autocast(ensemble.forward)
    check_sharded(ensemble, dist.get_world_size())
    return ensemble


def check_sharded(model: nn.Module, world: int) -> None:
    """Refuse a model whose trainable parameters are not all sharded over `world` ranks."""
    from torch.distributed.tensor import DTensor, Shard

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        sharded = isinstance(param, DTensor) and param.device_mesh.size() == world \
            and any(isinstance(p, Shard) for p in param.placements)
        if not sharded:
            raise LaunchError(f"parameter {name} is not sharded over the {world} ranks (FSDP2): refusing to train "
                              "unsharded copies")


def gather_full_state(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The sharded model's full state dict on the CPU of rank 0 (the other ranks get an empty dict), or with
    `every_rank` of every rank. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not every_rank:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # One tensor gathered at a time, moved to the CPU before the next: a whole gathered model would sit on
    # each device next to its shards.
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
            for name, value in model.state_dict().items()}




def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A value computed from sharded parameters (a DTensor: a gradient norm) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of `tensor`: its shard when it is sharded (a DTensor)."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def rank_slices(order: list[int], batch_size: int, rank: int, world: int) -> list[tuple[list[int], int]]:
    """This rank's share of every batch of `order`: (its pair indices, -1 padding a short share to the length
    every rank's has, so that the ranks run the same forwards; the batch's number of pairs)."""
    slices = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        share = -(-len(batch) // world)
        mine = batch[rank * share:(rank + 1) * share]
        slices.append((mine + [-1] * (share - len(mine)), len(batch)))
    return slices


def rank_batches(order: list[int], batch_size: int, collate, accelerator):
    """The batches one process would train on, in `order`, each split over the ranks: this rank's share,
    collated, with `real` (0 on padding rows, which repeat pair 0 at weight 0) and `count` (the batch's pairs
    over the ranks; rmens.training.trainer.bradley_terry_loss). Written here rather than with accelerate's
    batch splitting, which fills a short last batch with pairs from the start of the epoch: trained on, they
    would make a sharded step compute something else than one process. A DataLoaderShard of accelerate, so
    that gradient accumulation still syncs at the end of an epoch and batches reach the rank's device."""
    from accelerate.data_loader import DataLoaderShard

    world, rank = accelerator.num_processes, accelerator.process_index

    def collated(item: tuple[list[int], int]) -> dict[str, torch.Tensor]:
        indices, pairs = item
        real = torch.tensor([float(i >= 0) for i in indices])
        batch = collate([max(i, 0) for i in indices])
        batch["member_weights"] = batch["member_weights"] * real
        batch.update(real=real, count=torch.tensor(pairs / world))
        return batch

    return DataLoaderShard(rank_slices(order, batch_size, rank, world), device=accelerator.device, batch_size=None,
                           collate_fn=collated)
