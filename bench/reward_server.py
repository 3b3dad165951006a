"""`rmens serve` under load on the loopback interface, against calling the library directly on the same
batches, side by side in one process: requests per second and p50/p99 latency at 1, 4, 16 and 64 responses
per request (one client, sequential requests: the latency an RL engine's reward call waits).

    python bench/reward_server.py                         # SmolLM2-135M, linear k=3, 128 tokens (CPU)
    python bench/reward_server.py --model tiny-random-llama --requests 50

The model is untrained (only time is measured). Results: bench/out/reward_server.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

import torch
import transformers
from results import save_results
from scoring_throughput import responses

from rmens.models.backbone import load_tokenizer
from rmens.models.config import AggregationConfig, EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.reward import EnsembleReward
from rmens.serve import RewardServer, ensemble_scorer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_calls(call, batches: list[tuple[list[str], list[str]]]) -> list[float]:
    seconds = []
    for prompts, texts in batches:
        start = time.perf_counter()
        call(prompts, texts)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--requests", type=int, default=10, help="requests per batch size")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=args.k, backbone=args.model, max_length=args.max_length))
    reward = EnsembleReward(ensemble.eval(), load_tokenizer(args.model), AggregationConfig.from_name("lcb1"),
                            batch_size=16, allow_unstandardised=True)
    server = RewardServer(("127.0.0.1", 0), ensemble_scorer(reward), {"k": args.k, "rule": "lcb1"})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/get_reward"

    def over_http(prompts: list[str], texts: list[str]) -> list[float]:
        body = json.dumps({"query": [p + t for p, t in zip(prompts, texts)], "prompts": prompts}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())["rewards"]

    prompts, texts = responses(64 * args.requests)
    rows, lines = {}, [f"{args.model}, linear k={args.k}, rule lcb1, <= {args.max_length} tokens, CPU, one client, "
                       f"{args.requests} sequential requests per size (loopback)"]
    over_http(prompts[:4], texts[:4])  # warm-up
    for size in (1, 4, 16, 64):
        batches = [(prompts[i * size:(i + 1) * size], texts[i * size:(i + 1) * size]) for i in range(args.requests)]
        direct = timed_calls(lambda p, t: reward(p, t), batches)
        served = timed_calls(over_http, batches)
        rows[size] = {name: {"requests_per_s": len(s) / sum(s), "p50_ms": 1000 * statistics.median(s),
                             "p99_ms": 1000 * percentile(s, 0.99)} for name, s in (("library", direct),
                                                                                   ("server", served))}
        rows[size]["server_over_library_p50"] = rows[size]["server"]["p50_ms"] / rows[size]["library"]["p50_ms"]
        lib, srv = rows[size]["library"], rows[size]["server"]
        lines.append(f"  {size:>2} per request: library {lib['requests_per_s']:6.1f} req/s p50 {lib['p50_ms']:7.1f} ms "
                     f"p99 {lib['p99_ms']:7.1f} ms | server {srv['requests_per_s']:6.1f} req/s p50 "
                     f"{srv['p50_ms']:7.1f} ms p99 {srv['p99_ms']:7.1f} ms | p50 ratio "
                     f"{rows[size]['server_over_library_p50']:.2f}")
    server.shutdown()
    save_results("reward_server", {"model": args.model, "k": args.k, "max_length": args.max_length,
                                   "requests": args.requests, "by_batch_size": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
