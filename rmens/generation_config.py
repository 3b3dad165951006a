"""How a policy samples (rmens.generation): one config beside the module that uses it, as TRL keeps a
config beside each trainer (rmens.generation imports torch; loading a config must not)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rmens.config import Seed, StrictModel
from rmens.fingerprint import NOT_IN_KEY

VLLM_PYTHON_ENV = "RMENS_VLLM_PYTHON"
# The script the engine runs as: run by path, never imported, so a step that samples with vllm reads it (its
# source is then in the step's key)
VLLM_WORKER = Path(__file__).parent / "workers" / "vllm_worker.py"


class VllmConfig(StrictModel):
    """The vLLM engine behind backend "vllm": a Python environment of its own, since vLLM pins torch and
    transformers releases rmens' environment does not have (rmens never imports vllm). The interpreter's path and
    the start timeout are in no step's key; the memory shares and the chunk are, since they change how vLLM
    batches, which may move a sample on GPUs."""

    python: str | None = Field(
        None, json_schema_extra=NOT_IN_KEY,
        description=f"The vLLM environment's Python interpreter (default: ${VLLM_PYTHON_ENV}).")
    dtype: str = Field("auto", description="Weights' precision in the engine (vLLM's dtype: auto, float32, "
                                           "bfloat16, float16).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Share of each GPU's memory the engine takes (weights and KV cache; None: vLLM's default, "
                    "0.9). On CPUs vLLM reads it as a share of host memory: cpu_memory_gib sets it there instead.")
    cpu_memory_gib: float = Field(
        4.0, gt=0,
        description="On CPUs: host memory the engine reserves for weights and KV cache (vLLM would take 90% of "
                    "the machine).")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt plus response the engine plans for "
                                                              "(None: the model's context).")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="More keyword arguments of vllm.LLM "
                                                                          "(e.g. tensor_parallel_size).")
    chunk: int = Field(256, ge=1,
                       description="Prompts per request to the engine (it batches within a request); progress is "
                                   "reported per request.")
    start_timeout_s: float = Field(900, gt=0, json_schema_extra=NOT_IN_KEY,
                                   description="How long the engine may take to load before the run gives up.")

    def interpreter(self) -> str:
        python = self.python or os.environ.get(VLLM_PYTHON_ENV)
        if not python:
            raise ValueError(f"generation.backend is 'vllm' but no vLLM environment is named: set generation.vllm."
                             f"python or ${VLLM_PYTHON_ENV} to that environment's python (make vllm-env builds one)")
        return python


class GenerationConfig(StrictModel):
    """Sampling from a policy with its chat template."""

    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens; a longer one is cut.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of sampling; ignored when greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this "
                                                      "probability (1: no truncation); ignored when greedy.")
    do_sample: bool = Field(True, description="False: greedy decoding (judges, deterministic answers).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (backend hf); the main speed knob.")
    seed: Seed = Field(0, description="Seeds the sampling of every batch (hf) or every response (vllm).")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers' generate in this process; vllm: a vLLM engine in its own Python "
                          "environment (Best-of-n samples and evaluation answers; PPO rollouts are always hf).")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="backend vllm: the engine.")

    @model_validator(mode="after")
    def _vllm_named(self) -> GenerationConfig:
        if self.backend == "vllm":
            self.vllm.interpreter()  # no environment named: fail when the config loads, not after training
        return self
