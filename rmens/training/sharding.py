"""Sharding a reward model over the processes of one training step with torch FSDP2 (`fully_shard`).

A step granted more than one device is launched as one process per device (rmens.training.launcher, by the
launcher config in rmens/presets/launch/). Each rank then shards the model here: every decoder block is its
own FSDP2 unit (its weights gathered for its forward and backward only), and the whole ensemble the root
(embeddings, final norm and reward heads, kept in fp32). Gradients are reduce-scattered, so each
rank holds 1/world of the weights, gradients and optimizer state.

The launch guard (`check_launch`, `check_sharded`) exists because the failure it catches is silent:
accelerate with an FSDP config on CPUs, or a launcher that starts one process, trains unsharded copies and
reports success. A rank refuses to train unless the world is the size the launcher config was given and
every trainable parameter is sharded over it.
"""

from __future__ import annotations

import os
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
    nproc: int | None = Field(None, ge=2, description="Processes (one per granted device); set at launch.")

    @classmethod
    def load(cls, path: str | Path = LAUNCH_CONFIG) -> LaunchConfig:
        return cls.model_validate(load_yaml(path))


class LaunchError(RuntimeError):
    """A rank was not launched as its launcher config says (the silent unsharded fallback)."""


def check_launch(launch: LaunchConfig) -> int:
    """This rank's world size, after refusing a launch that does not match `launch`. Call after the process
    group exists (accelerate's Accelerator makes it under torchrun)."""
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


def shard_ensemble(ensemble: nn.Module, launch: LaunchConfig, bf16: bool) -> nn.Module:
    """Shard `ensemble` in place over every rank (FSDP2), then check that it is; returns it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in shard_blocks(ensemble):
        fully_shard(block, mesh=mesh, mp_policy=mixed, reshard_after_forward=launch.reshard_after_forward)
    # The root holds the rest (embeddings, final norm, reward heads) in fp32: rewards are not rounded to bf16,
    # as RewardEnsemble computes them under autocast. The heads are read inside the root's forward, so they
    # cannot be a unit of their own (FSDP2 gathers a unit's weights when its own forward runs).
    fully_shard(ensemble, mesh=mesh, reshard_after_forward=launch.reshard_after_forward)
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

    if not every_rank:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.cpu() for name, tensor in state.items()}


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A value computed from sharded parameters (a DTensor: a gradient norm) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of `tensor`: its shard when it is sharded (a DTensor)."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
