"""Scoring PPO checkpoints: samples from each checkpoint's policy, their KL to the initial policy, and
what the proxy and the gold (or any other scorer) say about them (the RL half of the overoptimisation curves)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rmens.generation import generate
from rmens.generation_config import GenerationConfig
from rmens.ppo.config import PPOConfig
from rmens.ppo.trainer import build_actor_critic, full_softmax_sampling, pack_rollout, response_logprobs
from rmens.reward import RewardFn
from rmens.seeding import Stream


def checkpoints(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def load_run_policy(run_dir: str | Path, checkpoint: Path | None, reward_folder=None):
    """The actor-critic of a PPO run at a checkpoint (None: the initial policy), and its reference."""
    run_dir = Path(run_dir)
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} has no PPO checkpoints")
    cfg = PPOConfig.model_validate(json.loads((found[-1] / "trainer_state.json").read_text())["config"])
    model, reference = build_actor_critic(cfg, reward_folder)
    if checkpoint is not None:
        model.load_state_dict(load_file(checkpoint / "trainable.safetensors"), strict=False)
    return model.eval(), reference, cfg


@torch.no_grad()
def sequence_kl(model, reference, batch: dict, temperature: float) -> torch.Tensor:
    """Per sample: sum over response tokens of log pi - log pi_init (k1, an unbiased estimate of the KL).

    The log-probs are those of the full softmax at `temperature`, so the estimate is the KL of that distribution
    only when the samples come from it: untruncated sampling (top_p 1, no top-k) at the same temperature."""
    logp, _, _ = response_logprobs(model.causal_lm, batch, temperature)
    if reference is not None:
        ref, _, _ = response_logprobs(reference, batch, temperature)
    else:
        with model.policy.disable_adapter():
            ref, _, _ = response_logprobs(model.causal_lm, batch, temperature)
    return ((logp - ref) * batch["mask"]).sum(dim=1)


def evaluate_run(run_dir: str | Path, prompts: list[str], scorers: dict[str, RewardFn],
                 samples_per_prompt: int = 1, generation: GenerationConfig | None = None,
                 reward_folder=None, keep_samples: bool = False) -> list[dict]:
    """For the initial policy and every checkpoint: mean KL to the initial policy, mean scores and the mean
    length of the answers in characters; with `keep_samples`, also every answer and its scores
    (`samples`: {"responses": [...], <scorer>: [...]}, in the order of the repeated prompts)."""
    from rmens.models.backbone import load_tokenizer

    if generation is not None and (generation.top_p < 1 or not generation.do_sample):
        # sequence_kl scores the samples with the full softmax: other samples would give another distribution's KL
        field = f"generation.top_p={generation.top_p:g}" if generation.top_p < 1 else "generation.do_sample=false"
        raise ValueError(f"{field} is refused: the KL of PPO checkpoints is estimated with full-softmax log-probs, "
                         "so their answers must be sampled from the full softmax (top_p 1, do_sample true)")
    points = []
    for checkpoint in [None] + checkpoints(run_dir):
        model, reference, cfg = load_run_policy(run_dir, checkpoint, reward_folder)
        gen = generation or cfg.generation
        tokenizer = load_tokenizer(cfg.policy, padding_side="left")
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        with full_softmax_sampling(model.causal_lm):
            samples = generate(model.causal_lm, tokenizer, repeated, gen, stream=Stream.EVAL_SAMPLE)
        batch = pack_rollout(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id)
        kl = sequence_kl(model, reference, batch, gen.temperature)
        point = {"step": 0 if checkpoint is None else int(checkpoint.name.split("-")[1]),
                 "kl": float(kl.mean()), "response_length": float(batch["mask"].sum(1).mean()),
                 "response_chars": sum(map(len, samples.texts)) / len(samples.texts)}
        kept = {"responses": samples.texts}
        for name, scorer in scorers.items():
            scores = scorer(repeated, samples.texts).check(len(repeated), name).scores
            point[name] = float(scores.mean())
            kept[name] = scores.tolist()
        if keep_samples:
            point["samples"] = kept
        points.append(point)
    return points
