"""PPO step time and generated tokens per second with a single reward model, a linear k=5 and a LoRA
k=5 ensemble (top quarter of layers) as the reward, measured side by side in one process.

One PPO trainer (SmolLM2-135M policy with LoRA) runs full steps (generate, score, reference and value
passes, two PPO epochs) round-robin over the three rewards. Within a round every arm replays the same
step index, so it draws the same prompts with the same sampling seeds, and the learning rate is tiny, so
the policy, the samples and all work other than the reward are the same for every arm; what differs is
the reward. Each arm's figure is its minimum over rounds (timing noise on shared CPUs is about 15%); the
time inside the reward call is reported too.

    python bench/ppo_throughput.py           # SmolLM2-135M, short responses
    python bench/ppo_throughput.py --quick   # tiny random Llama

Results go to bench/out/ppo_throughput[_quick].json and .txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import transformers
from results import save_results

from rmens.config import derive
from rmens.data.loaders import synthetic_pairs
from rmens.generation_config import GenerationConfig
from rmens.models.backbone import SMOLLM2_ALIAS, TINY_ALIAS, load_tokenizer
from rmens.models.config import EnsembleConfig, LoraSettings
from rmens.models.ensemble import build_ensemble, to_lora
from rmens.ppo.config import PPOConfig
from rmens.ppo.trainer import PPOTrainer
from rmens.reward import EnsembleReward


class TimedReward:
    """A reward function that remembers how long its last call took."""

    def __init__(self, reward):
        self.reward = reward
        self.last = 0.0

    def __call__(self, prompts, responses):
        start = time.perf_counter()
        out = self.reward(prompts, responses)
        self.last = time.perf_counter() - start
        return out


def reward_arm(backbone: str, kind: str, k: int, tokenizer, max_length: int) -> TimedReward:
    cfg = EnsembleConfig(kind="linear", k=k, backbone=backbone, max_length=max_length,
                         lora=LoraSettings(top_layers=0.25))
    ensemble = build_ensemble(cfg)
    if kind == "lora":
        ensemble = to_lora(ensemble, derive(cfg, kind="lora"))
    # untrained: no standardisation statistics, and only the reward call's time is measured here
    return TimedReward(EnsembleReward(ensemble.eval(), tokenizer, batch_size=16, max_length=max_length,
                                      allow_unstandardised=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = TINY_ALIAS if args.quick else SMOLLM2_ALIAS
    rounds = args.rounds or (4 if args.quick else 3)
    tokenizer = load_tokenizer(model)
    arms = {"single": reward_arm(model, "linear", 1, tokenizer, 160),
            "linear k=5": reward_arm(model, "linear", 5, tokenizer, 160),
            "lora k=5 top 1/4": reward_arm(model, "lora", 5, tokenizer, 160)}
    cfg = PPOConfig(policy=model, steps=10**6, rollout_batch_size=8, step_batch_size=4, warmup_steps=0, lr=1e-12,
                    progress=False, checkpoint_every=10**6,
                    generation=GenerationConfig(max_new_tokens=24, temperature=0.7, batch_size=8))
    prompts = [p.prompt for p in synthetic_pairs(64, seed=3)]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PPOTrainer(cfg, prompts, arms["single"], tmp)
        trainer.rollout(0)  # warm-up: first generate/forward allocations
        best = {name: {"step_s": float("inf")} for name in arms}
        for step in range(rounds):
            for name, reward in arms.items():
                trainer.reward_fn = reward
                start = time.perf_counter()
                rollout = trainer.rollout(step)  # same step index for every arm: same prompts and seeds
                stats = trainer.update(rollout, step)
                elapsed = time.perf_counter() - start
                tokens = float(rollout.batch["mask"].sum())
                if elapsed < best[name]["step_s"]:
                    best[name] = {"step_s": elapsed, "reward_s": reward.last, "tokens": tokens,
                                  "tokens_per_s": tokens / elapsed, "kl": stats["kl"]}
                print(f"  {name:<18} step {elapsed:7.2f} s, reward call {reward.last:6.2f} s", flush=True)
    base, base_reward = best["single"]["step_s"], best["single"]["reward_s"]
    lines = [f"{'reward':<20}{'step':>9}{'ratio':>8}{'reward call':>13}{'reward adds':>13}{'gen tok/s':>11}"]
    for name, row in best.items():
        row["ratio"] = row["step_s"] / base
        row["reward_adds"] = (row["reward_s"] - base_reward) / base  # extra reward time, share of a step
        lines.append(f"{name:<20}{row['step_s']:>8.2f}s{row['ratio']:>7.2f}x{row['reward_s']:>12.2f}s"
                     f"{row['reward_adds']:>12.1%}{row['tokens_per_s']:>11.1f}")
    targets = {"linear k=5 adds <= 5%": best["linear k=5"]["ratio"] <= 1.05,
               "lora k=5 adds <= 25%": best["lora k=5 top 1/4"]["ratio"] <= 1.25}
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items()]
    stem = "ppo_throughput_quick" if args.quick else "ppo_throughput"
    save_results(stem, {"policy": model, "rounds": rounds, "threads": torch.get_num_threads(), "rollout_batch": 8,
                  "max_new_tokens": 24, "rows": best, "targets": targets}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
