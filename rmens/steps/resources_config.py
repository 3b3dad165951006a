"""What a run asks of the machines for each step, beyond what the step declares (rmens.steps.contract):
settable per step, or per call (`train_ensemble:full-k5-r0`), in a preset's `resources` section.

    resources:
      train_ensemble: {memory_gib: 40}
      ppo: {devices: 1, memory_gib: 64}
      evaluate:initial: {devices: 0}

Only a Ray run (--ray) places steps by it; --dry-run shows it. It is not part of any step's key: where a step
runs does not change what it computes.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from rmens.config import StrictModel


class StepResources(StrictModel):
    """A step's (or one call's) request, replacing what its @step declares."""

    devices: int | None = Field(None, ge=0, description="Accelerators it runs on (0: CPU only; more than one "
                                                              "needs sharded steps, not built yet). None: as "
                                                              "declared.")
    memory_gib: float | None = Field(None, gt=0, description="Host memory Ray reserves for it, in GiB. None: as "
                                                             "declared.")

    @field_validator("devices")
    @classmethod
    def _one_device(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError(f"{value} devices: a step runs on one (sharded steps, not built yet, would use more)")
        return value


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
