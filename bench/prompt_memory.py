"""Peak memory of scoring a response to a huge prompt against a normal one, with the cut rmens makes before
tokenising and without it, each in a fresh process (peak RSS is per process), side by side.

    python bench/prompt_memory.py                       # SmolLM2-135M, a 10 MB prompt, max_length 512 (CPU)
    python bench/prompt_memory.py --model tiny-random-llama --prompt-mb 1

The issue's target: a 10 MB prompt scores within 1.5x the peak memory of a normal one. "uncut" replaces
the encoder's cut with the identity, which is how prompts were scored before (responses were cut already):
the tokenizer then holds every token of the prompt. Results: bench/out/prompt_memory.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from results import save_results

NORMAL_PROMPT = "Explain, in a few sentences, why the sky is blue during the day and red at sunset."
RESPONSE = "Sunlight scatters off air molecules; blue light scatters most. " * 8


def child(model: str, prompt_mb: float, cut: bool, max_length: int) -> dict:
    """Score one (prompt, response) pair in this process and report its peak RSS."""
    import torch
    import transformers

    from rmens.data.encoding import PairEncoder
    from rmens.models.backbone import load_tokenizer
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import build_ensemble
    from rmens.reward import EnsembleReward

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=1, backbone=model, max_length=max_length)).eval()
    reward = EnsembleReward(ensemble, load_tokenizer(model), batch_size=1, allow_unstandardised=True)
    reward.member_scores([NORMAL_PROMPT], [RESPONSE])  # warm-up: what loading and one forward cost
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not cut:
        PairEncoder._cut_prompt = lambda self, prompt: prompt
        PairEncoder._cut = lambda self, response: response
    words = "a reward model reads only the tail of a prompt that is longer than its context ".split()
    prompt = NORMAL_PROMPT if prompt_mb == 0 else " ".join(
        words[i % len(words)] for i in range(int(prompt_mb * 2**20 / 6)))
    score = reward.member_scores([prompt], [RESPONSE])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak / 1024, "after_warm_up_mib": before / 1024, "prompt_chars": len(prompt),
            "score": float(score.flatten()[0])}


def measure(model: str, prompt_mb: float, cut: bool, max_length: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps([model, prompt_mb, cut, max_length])],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-mb", type=float, default=10.0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    runs = {"normal prompt": measure(args.model, 0, True, args.max_length),
            f"{args.prompt_mb:g} MB prompt, cut": measure(args.model, args.prompt_mb, True, args.max_length),
            f"{args.prompt_mb:g} MB prompt, uncut": measure(args.model, args.prompt_mb, False, args.max_length)}
    normal = runs["normal prompt"]["peak_rss_mib"]
    ratios = {name: run["peak_rss_mib"] / normal for name, run in runs.items()}
    cut_name = f"{args.prompt_mb:g} MB prompt, cut"
    same = runs[cut_name]["score"] == runs[f"{args.prompt_mb:g} MB prompt, uncut"]["score"]
    result = {"model": args.model, "max_length": args.max_length, "prompt_mb": args.prompt_mb, "runs": runs,
              "ratio_to_normal": ratios, "target_ratio": 1.5, "meets_target": ratios[cut_name] <= 1.5,
              "cut_and_uncut_score_equal": same}
    lines = [f"{args.model}, max_length {args.max_length}, one response scored, peak RSS per fresh process (CPU)"]
    lines += [f"  {name:<28} {run['peak_rss_mib']:8.0f} MiB  {ratios[name]:5.2f}x the normal prompt"
              for name, run in runs.items()]
    lines += [f"  target: the cut huge prompt within 1.5x: {'met' if result['meets_target'] else 'NOT met'}; "
              f"cut and uncut give the same score: {same}"]
    save_results("prompt_memory", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
