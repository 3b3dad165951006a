"""PPO's settings (rmens.ppo.trainer), and those of `rmens ppo`, which runs it against a saved ensemble."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rmens.config import MAX_LR, Seed, StrictModel
from rmens.data.config import PromptsConfig
from rmens.fingerprint import NOT_IN_KEY
from rmens.generation_config import GenerationConfig
from rmens.models.config import AggregationConfig

# PPO: defaults follow the paper (Zhang et al., Table 4: KL 0.02, value coefficient 0.1, 2 epochs per
# rollout batch, temperature 0.7) at CPU-sized batches and lengths. Table 4 also samples with top-p 0.9; rmens
# samples PPO rollouts without truncation so that its log-probs and KL are exact.

class PolicyLoraSettings(StrictModel):
    rank: int = Field(16, gt=0, description="LoRA rank r of the policy's adapters.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: each adapter's update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input while training.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Names of the modules given adapters, in every layer.")


class PPOConfig(StrictModel):
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the initial policy "
                                                         "(the pipeline and experiment replace it with theirs).")
    steps: int = Field(20, ge=1, description="Rollout-and-update iterations.")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts per process per step.")
    step_batch_size: int = Field(4, ge=1, description="Sequences per optimizer step (per process).")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each step's rollouts, in minibatches of "
                                                 "step_batch_size.")
    lr: float = Field(1e-4, gt=0, le=MAX_LR,
                      description="1e-4 for LoRA; use ~1e-5 (the paper's value) for full fine-tuning.")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm each optimizer step is clipped to.")
    kl_coef: float = Field(0.02, ge=0, description="Weight of the per-token KL penalty to the reference policy "
                                                   "(adaptive_kl: its starting value).")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef towards kl_target (Ziegler et al.); false: fixed.")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: target KL per sequence (nats).")
    kl_horizon: int = Field(10_000, gt=0, description="Adaptive KL: horizon in rollout samples; larger adapts "
                                                      "kl_coef more slowly.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss next to the policy loss.")
    cliprange: float = Field(0.2, gt=0, description="Policy clip: the objective gains nothing from probability "
                                                    "ratios beyond 1 - cliprange and 1 + cliprange.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip: the value loss also scores the new values "
                                                          "clipped to the rollout's +- this, and keeps the worse.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount per token in GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 0 bootstraps from the next value, 1 sums the "
                                                     "rewards to the end.")
    whiten_advantages: bool = Field(True, description="Normalise each step's advantages to mean 0, sd 1 (over "
                                                      "every process's tokens).")
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of a response that never emits EOS (None: no penalty).")
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(temperature=0.7, top_p=1.0, max_new_tokens=32),
        description="Rollout sampling: the full softmax at `temperature` (top_p 1, do_sample true).")
    use_lora: bool = Field(True, description="LoRA policy: the reference is the same model with adapters off.")
    lora: PolicyLoraSettings = Field(default_factory=PolicyLoraSettings,
                                     description="use_lora only: the adapters of the policy (and of a reward value "
                                                 "model).")
    value_model: Literal["head", "reward"] = Field(
        "head", description="head: a value head on the policy's hidden states; reward: a separate value model "
                            "initialised from the reward model's backbone and head (same tokenizer required).")
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig,
                                           description="Rule combining the reward ensemble's members into PPO's "
                                                       "reward (the pipeline and experiment replace it with the "
                                                       "ppo_arms entry's).")
    reward_devices: int = Field(
        0, ge=0, json_schema_extra=NOT_IN_KEY,
        description="0: the reward ensemble scores in the PPO process; N: in a Ray actor of its own holding N devices "
                    "(runs with --ray only).")
    checkpoint_every: int = Field(10, ge=1, description="Save a checkpoint (weights, optimizer, history) every N "
                                                        "steps and after the last.")
    keep_checkpoints: int | None = Field(None, ge=1, description="Checkpoints kept (None: all, for KL curves).")
    gold_every: int = Field(0, ge=0, description="Score rollouts with the gold (the reference that scores "
                                                 "policies) every N steps (0: never; the experiment's gold scores "
                                                 "checkpoints afterwards instead).")
    seed: Seed = Field(0, description="Seeds the adapters' and value head's initialisation, prompt order, rollouts "
                                      "and minibatches (the experiment derives each run's seed from it).")
    progress: bool = Field(True, description="Show a progress bar over the steps.")

    retired: ClassVar[dict[str, str]] = {"judge_every": "set gold_every (the role is called gold now)"}

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        if self.rollout_batch_size % self.step_batch_size:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                             f"step_batch_size={self.step_batch_size}")
        return self

    @model_validator(mode="after")
    def _untruncated_sampling(self) -> PPOConfig:
        # Importance ratios and the KL penalty use log-probs of the full softmax at generation.temperature,
        # which are exact only for samples drawn from exactly that distribution.
        why = "PPO's ratios and KL use the full softmax at the sampling temperature, so it must sample from it"
        if self.generation.top_p < 1:
            raise ValueError(f"generation.top_p={self.generation.top_p:g} must be 1: {why}, untruncated")
        if not self.generation.do_sample:
            raise ValueError(f"generation.do_sample=false is refused: {why}, not decode greedily")
        if self.generation.backend != "hf":
            raise ValueError("generation.backend must be 'hf': rollouts come from the policy being trained, in this "
                             "process (the vllm backend serves Best-of-n samples and evaluation answers)")
        return self


class PPOJobConfig(StrictModel):
    """`rmens ppo`: a policy optimised against a saved reward ensemble on a prompt set."""

    ppo: PPOConfig = Field(default_factory=PPOConfig, description="The PPO run: policy, rule, optimisation.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts the rollouts answer.")
    reward_ensemble: str = Field(..., description="Folder of a saved RewardEnsemble.")
    gold_ensemble: str | None = Field(None, description="Optional saved reward model as the gold, scoring the "
                                                         "rollouts every ppo.gold_every steps.")
    reward_batch_size: int = Field(16, ge=1, description="Responses per batch when the reward ensemble or the gold "
                                                         "scores them.")
    output_dir: str = Field("runs/ppo", description="Folder of the run (checkpoints, policy, history); --output "
                                                    "replaces it.")

    retired: ClassVar[dict[str, str]] = {"judge_ensemble": "set gold_ensemble (the role is called gold now)"}


def ppo_config_in(inputs: dict) -> PPOConfig | None:
    """The PPO settings among a step's inputs, whatever the step names them (the pipeline's `ppo_cfg`, the
    experiment's `ppo`)."""
    return next((value for value in inputs.values() if isinstance(value, PPOConfig)), None)
