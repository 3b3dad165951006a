"""What a run asks of the machines for each step, beyond what the step declares (rmens.steps.contract):
settable per step, or per call (`train_ensemble:full-k5-r0`), in a preset's `resources` section.

    resources:
      train_ensemble: {memory_gib: 40}
      ppo: {devices: 1, memory_gib: 64}
      evaluate:initial: {devices: 0}

A Ray run (--ray) places steps by it; a step that shards (the training steps) runs one FSDP2 rank per device
it is given, with or without Ray; --dry-run shows it. It is not part of any step's key: where a step runs, and
over how many devices it shards, do not change what it computes.
"""

from __future__ import annotations

from pydantic import Field

from rmens.config import StrictModel
from rmens.steps.contract import Step


class StepResources(StrictModel):
    """A step's (or one call's) request, replacing what its @step declares."""

    devices: int | None = Field(None, ge=0, description="Accelerators it runs on (0: CPU only). More than one only "
                                                              "for a step that shards (the training steps: one FSDP2 "
                                                              "rank per device). None: as declared.")
    memory_gib: float | None = Field(None, gt=0, description="Host memory Ray reserves for it, in GiB. None: as "
                                                             "declared.")


def request_for(name: str, step_name: str, declared_devices: int, declared_memory_gib: float,
                overrides: dict[str, StepResources]) -> tuple[int, float]:
    """(devices, memory_gib) of the call `name` of step `step_name`: the call's override, else the step's, else
    the declaration."""
    devices, memory = declared_devices, declared_memory_gib
    for key in (step_name, name):  # the call's own setting wins over its step's
        found = overrides.get(key)
        if found is not None:
            devices = found.devices if found.devices is not None else devices
            memory = found.memory_gib if found.memory_gib is not None else memory
    return devices, memory


def call_devices(name: str, step: Step, overrides: dict[str, StepResources]) -> int:
    """The devices the call `name` of `step` runs on (a step that shards starts one rank on each)."""
    return request_for(name, step.name, step.resources.devices, step.resources.memory_gib, overrides)[0]


def unknown_keys(overrides: dict[str, StepResources], names: list[str]) -> list[str]:
    """Override keys that would be ignored silently (a typo): a step name no step is declared with, or a call
    (step:label) of a step this run calls, but not with that label. A step this run does not call at all (PPO
    with --part rewards) may keep its setting."""
    from rmens.steps.contract import DECLARED

    called = {name.split(":", 1)[0] for name in names}
    unknown = []
    for key in overrides:
        step_name = key.split(":", 1)[0]
        if step_name not in DECLARED or (":" in key and step_name in called and key not in names):
            unknown.append(key)
    return sorted(unknown)


def unshardable(overrides: dict[str, StepResources]) -> list[str]:
    """Keys giving more than one device to a step that cannot use them (it does not shard)."""
    from rmens.steps.contract import DECLARED

    return sorted(key for key, value in overrides.items() if (value.devices or 0) > 1
                  and key.split(":", 1)[0] in DECLARED and not DECLARED[key.split(":", 1)[0]].resources.shards)
