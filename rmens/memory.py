"""How much accelerator memory each step of a plan needs, estimated before anything runs, so that a plan that
cannot fit is refused with one line instead of failing hours in (rmens run --dry-run prints every estimate).

The estimate follows what the code does today: models load in fp32 (rmens.models.backbone), and training under
accelerate's bf16 mixed precision keeps fp32 master weights, fp32 gradients and Adam's two fp32 moments, 16 bytes
per trained parameter; a frozen parameter costs 4 bytes. Parameter counts come from each model's config alone
(no weights: accelerate's init_empty_weights). Activations, the KV cache and the allocator's slack are a flat
ACTIVATION_MARGIN on top. A full ensemble trains as k member steps, one backbone each, and an assembly step
that holds the k backbones for inference only (its validation scores). A training step given several devices
(`resources`) shards its model, gradients and optimizer state over them with FSDP2 (rmens.training.sharding),
so each device holds 1/devices of them, and so is the margin with them: optimistic for many devices, where a
rank's activations (its share of the batch, one gathered block) do not shrink as fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmens.models.config import EnsembleConfig
from rmens.ppo.config import ppo_config_in
from rmens.steps.graph import Node
from rmens.steps.store import Output

TRAINED_BYTES = 16  # fp32 weights + fp32 gradients + Adam's m and v
FROZEN_BYTES = 4  # fp32 weights
ACTIVATION_MARGIN = 1.25
GIB = 2**30


@functools.cache
def parameter_count(model: str, head: bool = True) -> int:
    """Parameters of a causal LM (alias, folder, or a hub id in the cache), from its config alone; head=False:
    its body only, as a reward model or value model holds it (rmens.models.backbone.load_backbone)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from rmens.models.backbone import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    with init_empty_weights():
        model_on_meta = (AutoModelForCausalLM if head else AutoModel).from_config(config)
    model_on_meta.tie_weights()  # from_pretrained ties a tied head to the embeddings; from_config here does not
    return sum(p.numel() for p in model_on_meta.parameters())


class PlanDoesNotFit(ValueError):
    """A step of the plan needs more memory than one device has (said in one line, before anything runs)."""


@dataclass
class Estimate:
    gib: float  # accelerator memory the step needs on each of its devices, margin included
    parts: list[str]  # what it holds, for the message
    devices: int = 1  # the devices its model is sharded over
    shards: bool = False  # whether its step can shard (a training step)

    def size(self) -> str:
        return f"{self.gib:.1f} GiB" if self.gib >= 1 else f"{self.gib * 1024:.0f} MiB"

    def describe(self) -> str:
        where = f" on each of {self.devices} devices (FSDP2)" if self.devices > 1 else ""
        return f"about {self.size()}{where} ({'; '.join(self.parts)})"


def _ensemble_bytes(cfg: EnsembleConfig, trained: bool, member: bool = False) -> tuple[float, str]:
    """`member`: one member of a full ensemble, alone (its own backbone)."""
    params = parameter_count(cfg.backbone, head=False)
    copies = cfg.k if cfg.kind == "full" and not member else 1
    per_param = TRAINED_BYTES if trained and not (cfg.kind == "linear" and cfg.freeze_backbone) else FROZEN_BYTES
    how = "trained" if per_param == TRAINED_BYTES else "frozen"
    return copies * params * per_param, f"{copies} x {params / 1e9:.2f}B {how} ({cfg.backbone})"


def _producer_ensemble(value: Any, by_key: dict[str, Node]) -> EnsembleConfig | None:
    node = by_key.get(value.key) if isinstance(value, Output) else None
    return node.inputs.get("ensemble") if node is not None and isinstance(node.inputs.get("ensemble"),
                                                                          EnsembleConfig) else None


def estimate(node: Node, by_key: dict[str, Node], devices: int = 1) -> Estimate | None:
    """What `node` holds on each of its `devices` (more than one: a training step's FSDP2 shards); None for a step
    that holds no model (data, reports, curves)."""
    total, parts = 0.0, []

    def add(amount: float, what: str) -> None:
        nonlocal total
        total += amount
        parts.append(what)

    inputs = node.inputs
    if isinstance(inputs.get("ensemble"), EnsembleConfig):  # a training step: a member's, or an assembly's
        add(*_ensemble_bytes(inputs["ensemble"], trained=not inputs.get("members"), member="member" in inputs))
    ppo_cfg = ppo_config_in(inputs)
    if ppo_cfg is not None:
        params = parameter_count(ppo_cfg.policy)
        if ppo_cfg.use_lora:  # the reference is the same weights with the adapters off
            add(params * FROZEN_BYTES, f"policy {params / 1e9:.2f}B frozen under LoRA")
        else:
            add(params * (TRAINED_BYTES + FROZEN_BYTES), f"policy {params / 1e9:.2f}B trained + its reference")
        reward = _producer_ensemble(inputs.get("reward"), by_key)
        if reward is not None and ppo_cfg.value_model == "reward":
            value = parameter_count(reward.backbone, head=False)
            add(value * (FROZEN_BYTES if ppo_cfg.use_lora else TRAINED_BYTES),
                f"value model {value / 1e9:.2f}B {'under LoRA' if ppo_cfg.use_lora else 'trained'}")
    for name, value in inputs.items():  # reward models it scores with: the arm's ensemble, the gold
        if name == "data" or (name == "reward" and ppo_cfg is not None and ppo_cfg.reward_devices):
            continue  # (PPO's reward in an actor of its own holds other devices)
        frozen = _producer_ensemble(value, by_key)
        if frozen is not None:
            amount, what = _ensemble_bytes(frozen, trained=False)
            add(amount, f"{name}: {what}")
    policy = inputs.get("policy")
    if isinstance(policy, str) and ppo_cfg is None:
        params = parameter_count(policy)
        add(params * FROZEN_BYTES, f"policy {params / 1e9:.2f}B frozen")
    ppo_run = by_key.get(inputs["ppo_run"].key) if isinstance(inputs.get("ppo_run"), Output) else None
    run_cfg = ppo_config_in(ppo_run.inputs) if ppo_run is not None else None
    if run_cfg is not None:
        params = parameter_count(run_cfg.policy)
        add(params * FROZEN_BYTES, f"trained policy {params / 1e9:.2f}B frozen")
    if not parts:
        return None
    shards = node.step.resources.shards and not inputs.get("members")  # an assembly only scores, on one device
    devices = max(1, devices) if shards else 1
    return Estimate(total / devices * ACTIVATION_MARGIN / GIB, parts, devices, shards)


def estimates(nodes: dict[str, Node], devices_of: Callable[[Node], int] | None = None) -> dict[str, Estimate]:
    """Every model-holding call of a recorded plan (rmens.steps.graph.record) by name; `devices_of(node)`: the
    devices a call is given (the run's `resources`), which a training step shards over."""
    by_key = {node.key: node for node in nodes.values()}
    found = {name: estimate(node, by_key, devices_of(node) if devices_of else 1) for name, node in nodes.items()}
    return {name: value for name, value in found.items() if value is not None}


def check_fit(nodes: dict[str, Node], device_gib: float, devices_of: Callable[[Node], int] | None = None) -> None:
    """Refuse, naming the first step that cannot fit its devices of `device_gib` each, its estimate and what
    would."""
    for name, found in estimates(nodes, devices_of).items():
        if nodes[name].found is None and found.gib > device_gib:
            whole = found.gib * found.devices  # what one device would hold
            devices = int(-(-whole // device_gib))
            step = name.split(":", 1)[0]
            fix = (f"give it {devices} devices to shard over (resources: {{'{name}': {{devices: {devices}}}}}, or "
                   f"'{step}' for every {step} call) or a smaller backbone") if found.shards else \
                "only training steps shard: use a smaller model (for PPO: ppo.use_lora, or ppo.reward_devices)"
            raise PlanDoesNotFit(f"{name} needs {found.describe()}, more than one {device_gib:g} GiB device holds: "
                                 + fix)
