"""PPO settings. Defaults follow the paper (Zhang et al., Table 4: KL 0.02, value coefficient 0.1,
2 epochs per rollout batch, temperature 0.7, top-p 0.9) at CPU-sized batches and lengths."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmens.config import GenerationConfig, PromptsConfig, StrictModel
from rmens.models.aggregate import AggregationConfig


class PolicyLoraSettings(StrictModel):
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class PPOConfig(StrictModel):
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the initial policy.")
    steps: int = Field(20, ge=1, description="Rollout-and-update iterations.")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts per process per step.")
    step_batch_size: int = Field(4, ge=1, description="Sequences per optimizer step (per process).")
    ppo_epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0, description="1e-4 for LoRA; use ~1e-5 (the paper's value) for full fine-tuning.")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0)
    kl_coef: float = Field(0.02, ge=0)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: target KL per sequence (nats).")
    kl_horizon: int = Field(10_000, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of a response that never emits EOS (None: no penalty).")
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=32))
    use_lora: bool = Field(True, description="LoRA policy: the reference is the same model with adapters off.")
    lora: PolicyLoraSettings = Field(default_factory=PolicyLoraSettings)
    value_model: Literal["head", "reward"] = Field(
        "head", description="head: a value head on the policy's hidden states; reward: a separate value model "
                            "initialised from the reward model's backbone and head (same tokenizer required).")
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int | None = Field(None, ge=1, description="Checkpoints kept (None: all, for KL curves).")
    judge_every: int = Field(0, ge=0, description="Score rollouts with the judge every N steps (0: never).")
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
        if self.rollout_batch_size % self.step_batch_size:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} must be a multiple of "
                             f"step_batch_size={self.step_batch_size}")
        return self


class PPOJobConfig(StrictModel):
    """`rmens ppo`: a policy optimised against a saved reward ensemble on a prompt set."""

    ppo: PPOConfig = Field(default_factory=PPOConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward_ensemble: str = Field(..., description="Folder of a saved RewardEnsemble.")
    judge_ensemble: str | None = Field(None, description="Optional reward-model judge, logged every judge_every steps.")
    reward_batch_size: int = Field(16, ge=1)
    output_dir: str = "runs/ppo"
