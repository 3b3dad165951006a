"""Running a flow's steps on Ray: Prefect's RayTaskRunner from a `--ray` address, and each step's Ray request
from its declared Resources. Imported only when a run names Ray (ray and prefect-ray are the `ray` extra).

    --ray local              a Ray started in this process, on this machine's CPUs (and GPUs, if it has some)
    --ray local:gpus=N       the same, declaring N devices: steps get distinct CUDA_VISIBLE_DEVICES even on a
                             machine without them, where they still run on CPU (how the tests run)
    --ray ray://HOST:10001   an existing cluster (also HOST:PORT or auto; RAY_ADDRESS when --ray is not given)
"""

from __future__ import annotations

import os
import re
from typing import Any

RAY_ADDRESS = "RAY_ADDRESS"


def ray_address(flag: str | None) -> str | None:
    """The address a run uses: --ray's, else $RAY_ADDRESS, else None (no Ray: one process)."""
    return flag or os.environ.get(RAY_ADDRESS) or None


def task_runner(address: str):
    """Prefect's RayTaskRunner for `address` (see the module docstring)."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise SystemExit(f"--ray needs the ray extra: pip install -e '.[ray]' ({exc})") from None
    local = re.fullmatch(r"local(?::gpus=(\d+))?", address)
    if local is None:
        return RayTaskRunner(address=address)
    # address "local" starts a Ray of this process's own, rather than joining one already running here
    # (which would then refuse num_gpus), and ignores RAY_ADDRESS.
    init: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": False}
    if local.group(1) is not None:
        init["num_gpus"] = int(local.group(1))
    return RayTaskRunner(init_kwargs=init)


def on_ray() -> bool:
    """Whether the running flow's task runner is Ray's."""
    from prefect.context import FlowRunContext

    run = FlowRunContext.get()
    return run is not None and type(run.task_runner).__name__ == "RayTaskRunner"


def node_request(node, overrides: dict | None = None) -> tuple[int, float]:
    """(devices, host GiB) a call asks for: its step's declaration or the run's `resources` setting, plus its PPO
    reward actor's devices (rmens.integrations.ray.RemoteReward takes them from the call's grant, so that the
    two are reserved together)."""
    from rmens.ppo.config import ppo_config_in
    from rmens.steps.resources_config import request_for

    devices, memory = request_for(node.name, node.step.name, node.step.resources.devices,
                                  node.step.resources.memory_gib, overrides or {})
    ppo = ppo_config_in(node.inputs)
    return devices + (ppo.reward_devices if ppo is not None else 0), memory


def largest_node() -> dict[str, float]:
    """The GPUs and memory (bytes) of the largest alive node: a request beyond it would wait forever."""
    import ray

    alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return {"GPU": max((r.get("GPU", 0) for r in alive), default=0),
            "memory": max((r.get("memory", 0) for r in alive), default=0)}


def ray_request(devices: int, memory_gib: float, largest: dict[str, float]) -> dict[str, Any]:
    """Ray's remote options for a call that uses `devices` accelerators and about `memory_gib` of host memory.
    A call that uses devices asks for no CPU, so that as many run at once as there are devices; on a cluster
    without devices it asks for one CPU instead (a device request there would never be granted)."""
    # max_retries 0: a step whose worker died (out of memory, its node lost) fails the run at once; Ray would
    # otherwise run it up to 3 more times
    request: dict[str, Any] = {"memory": int(min(memory_gib * 2**30, largest["memory"])), "max_retries": 0}
    if devices and largest["GPU"]:
        request.update(num_gpus=devices, num_cpus=0)
    else:
        request["num_cpus"] = 1
        if largest["GPU"]:  # Ray 2.60 leaves a task without devices all of them visible: hide them
            request["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    return request


def check_requests(calls: list[tuple[str, int]], largest: dict[str, float]) -> None:
    """Refuse, before anything is submitted, a call asking for more devices than any one node has."""
    for name, devices in calls:
        if largest["GPU"] and devices > largest["GPU"]:
            raise ValueError(f"{name} asks for {devices} devices but the largest Ray node has {largest['GPU']:g}: "
                             "it would wait forever")
