"""The reference experiment's settings: the arms, which verdicts train and which evaluate, the gold
judge, PPO, and the four sizes (rmens/presets/experiment/{tiny,cpu,gpu-check,gpu}.yaml).

Arms and PPO arms are typed objects with one label each; nothing parses a label back into an object.
Every config derived from another (an arm's ensemble from the shared one, a PPO run's settings) goes
through `model_validate`, so an inconsistent combination fails where it is made.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rmens.config import (
    AggregationConfig,
    EnsembleConfig,
    GenerationConfig,
    PPOConfig,
    StrictModel,
    TrainConfig,
    apply_overrides,
    derive,
    load_yaml,
)

SIZES = {
    "tiny": "tiny random Llama, a few pools and pairs; every step in under 2 minutes on a CPU (tested)",
    "cpu": "SmolLM2-135M, small pair sets, short contexts and pools; under 90 minutes on 2 CPU cores",
    "gpu-check": "SmolLM2-135M at 384+ tokens; the reward/Best-of-n part and the PPO part each a few GPU minutes",
    "gpu": "SmolLM2-135M on about 10,000 pairs at 512 tokens, every arm; what a user with one GPU runs",
}
Judge = Literal["ae1", "ae2"]


class ArmSpec(StrictModel):
    """One reward-model arm. `single` is one reward model (k=1) with its own seed; the others are
    ensembles of k members (Zhang et al.: full, linear, LoRA)."""

    kind: Literal["single", "full", "linear", "lora"]
    k: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, description="Added to the shared ensemble seed (singles differ by it).")
    top_layers: float | None = Field(None, gt=0, description="lora: layers with adapters (fraction or count); "
                                                             "None keeps the shared ensemble's setting.")

    @model_validator(mode="after")
    def _consistent(self) -> ArmSpec:
        if self.kind == "single" and self.k != 1:
            raise ValueError(f"a single arm has k=1, got k={self.k}")
        if self.kind != "single" and self.k < 2:
            raise ValueError(f"a {self.kind} ensemble needs k >= 2, got k={self.k} (use kind: single)")
        if self.top_layers is not None and self.kind != "lora":
            raise ValueError(f"top_layers applies to lora arms only, not {self.kind}")
        return self

    @property
    def label(self) -> str:
        if self.kind == "single":
            return f"single-s{self.seed}"
        label = f"{self.kind}-k{self.k}" + (f"-s{self.seed}" if self.seed else "")
        if self.top_layers is not None:
            label += "-all" if self.top_layers == 1 else f"-top{self.top_layers:g}"
        return label

    @property
    def is_ensemble(self) -> bool:
        return self.k > 1

    def ensemble_config(self, shared: EnsembleConfig) -> EnsembleConfig:
        """The arm's EnsembleConfig: the shared settings (backbone, lengths, LoRA) with its kind, k and seed."""
        changes: dict[str, Any] = {"kind": "linear" if self.kind == "single" else self.kind, "k": self.k,
                                   "seed": shared.seed + self.seed}
        if self.top_layers is not None:
            changes["lora"] = {"top_layers": self.top_layers}
        return derive(shared, **changes)

    def rules(self, rules: list[AggregationConfig]) -> list[AggregationConfig]:
        """Every rule for an ensemble; only the mean for a single model (all rules equal it there)."""
        return rules if self.is_ensemble else [AggregationConfig(rule="mean")]


class PPOArm(StrictModel):
    """PPO against one arm's reward under one aggregation rule."""

    arm: str = Field(..., description="The label of an arm, e.g. single-s0 or linear-k5.")
    rule: AggregationConfig = Field(default_factory=AggregationConfig)

    @property
    def label(self) -> str:
        return f"{self.arm}/{self.rule.name}"


class GoldConfig(StrictModel):
    """The gold judge of PPO (Gao et al.; Coste et al.): one reward model trained on many more verdicts,
    at a longer context, than any proxy."""

    ensemble: EnsembleConfig = Field(default_factory=lambda: EnsembleConfig(kind="linear", k=1, seed=101))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _single(self) -> GoldConfig:
        if self.ensemble.k != 1 or self.ensemble.kind != "linear":
            raise ValueError("the gold judge is one reward model: gold.ensemble needs kind 'linear' and k 1")
        return self


class PairsShare(StrictModel):
    """Which verdicts of a share of the training instructions are kept."""

    subset: Literal["ae1", "ae2", "both"] = "both"
    max_pairs: int | None = Field(None, ge=1, description="A seeded subset of this many pairs (None: all).")


class ProxyShare(PairsShare):
    fraction: float = Field(0.35, gt=0, lt=1, description="Share of the training instructions given to the proxies "
                                                          "(the gold judge gets the rest).")


class DataSource(StrictModel):
    """Where the training verdicts and the evaluation annotations come from (rmens.experiment.data)."""

    data_dir: str | None = Field(None, description="Folder of AlpacaEval verdicts to train on "
                                                   "(default $RMENS_DATA_DIR/alpaca_eval).")
    eval_data: str | None = Field(None, description="Folder of AE-format files (ae1_gpt4_pairs*.jsonl.gz, "
                                                    "ae2_gpt4turbo_pairs*.jsonl.gz) whose instructions become the "
                                                    "evaluation pools; None holds out eval_fraction of data_dir's.")
    eval_fraction: float = Field(0.25, gt=0, lt=1, description="Without eval_data: the share of instructions held out.")
    seed: int = Field(0, description="Seeds the hash split and every subsample.")


class SplitConfig(StrictModel):
    """The training side: the gold judge's and the proxies' verdicts (disjoint shares of the training
    instructions) and PPO's prompts (from the proxies' share). No evaluation instruction is in any of them."""

    gold: PairsShare = Field(default_factory=PairsShare)
    proxy: ProxyShare = Field(default_factory=ProxyShare)
    ppo_prompts: int | None = Field(256, ge=1, description="Proxy-share instructions PPO samples from (None: all).")


class PoolConfig(StrictModel):
    """The evaluation side: the logged-output Best-of-n pools, one per held-out instruction and judge set,
    and the held-out instructions PPO checkpoints answer."""

    judges: list[Judge] = Field(default_factory=lambda: ["ae1", "ae2"], min_length=1)
    max_instructions: int | None = Field(None, ge=1)
    pool_size: int | None = Field(None, ge=1, description="Outputs kept per instruction (None: all).")
    max_n: int = Field(32, ge=1, description="n = 1, 2, 4, ... up to this; pools smaller than it are left out.")
    exclude_generators: list[str] = Field(default_factory=lambda: ["example", "gpt4_gamed"])
    include_generators: list[str] | None = None
    eval_prompts: int = Field(32, ge=1, description="Pool instructions PPO checkpoints answer.")

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.pool_size is not None and self.pool_size < self.max_n:
            raise ValueError(f"pools.pool_size={self.pool_size} is below pools.max_n={self.max_n}")
        return self


class ProxyLabels(StrictModel):
    """Optional changes to the proxies' labels (Coste et al.)."""

    relabel_by_gold: bool = Field(False, description="The gold model's preference replaces the judge's.")
    label_noise: float = Field(0.0, ge=0, le=1, description="Fraction of proxy labels flipped (Coste et al.: 0.25).")

    @property
    def active(self) -> bool:
        return self.relabel_by_gold or self.label_noise > 0


class ExperimentConfig(StrictModel):
    """Everything `rmens experiment` and bench/reference_experiment.py run."""

    size: str = "custom"
    data: DataSource = Field(default_factory=DataSource)
    split: SplitConfig = Field(default_factory=SplitConfig)
    pools: PoolConfig = Field(default_factory=PoolConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig,
                                     description="What every arm shares: backbone, lengths, LoRA settings.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    arms: list[ArmSpec] = Field(min_length=1)
    rules: list[AggregationConfig] = Field(default_factory=lambda: [
        AggregationConfig(rule="mean"), AggregationConfig(rule="min"), AggregationConfig(rule="lcb", beta=1.0),
        AggregationConfig(rule="uwo", lam=0.5)])
    gold: GoldConfig = Field(default_factory=GoldConfig)
    proxy_labels: ProxyLabels = Field(default_factory=ProxyLabels)
    score_batch_size: int = Field(32, ge=1)
    policy: str = "tiny-random-llama"
    ppo: PPOConfig | None = Field(default_factory=PPOConfig, description="None: no PPO part.")
    ppo_arms: list[PPOArm] = Field(default_factory=list)
    ppo_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(temperature=0.7, top_p=0.9),
        description="How PPO checkpoints answer the held-out instructions they are judged on.")

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        labels = [arm.label for arm in self.arms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"arm labels must be unique, got {labels}")
        rule_names = [rule.name for rule in self.rules]
        if len(set(rule_names)) != len(rule_names):
            raise ValueError(f"rules must differ, got {rule_names}")
        models: dict[str, str] = {}
        for arm in self.arms:  # every arm's ensemble config must be valid, and different, before anything runs
            model = arm.ensemble_config(self.ensemble).model_dump_json()
            if model in models:
                raise ValueError(f"arms {models[model]!r} and {arm.label!r} would train the same model")
            models[model] = arm.label
        for ppo_arm in self.ppo_arms:
            if ppo_arm.arm not in labels:
                raise ValueError(f"ppo_arms entry {ppo_arm.label!r}: no arm {ppo_arm.arm!r} (arms: {labels})")
            if ppo_arm.rule.name not in [r.name for r in self.arm(ppo_arm.arm).rules(self.rules)]:
                raise ValueError(f"ppo_arms entry {ppo_arm.label!r}: rule {ppo_arm.rule.name!r} is not among the "
                                 f"rules of arm {ppo_arm.arm!r}")
        if self.gold.ensemble.max_length < self.ensemble.max_length:
            raise ValueError(f"the gold judge must see at least the proxies' context: gold.ensemble.max_length="
                             f"{self.gold.ensemble.max_length} < ensemble.max_length={self.ensemble.max_length}")
        return self

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings reward models are trained with, by section (arms change only kind, k, seed
        and LoRA layers of the shared one)."""
        return {"ensemble": self.ensemble, "gold.ensemble": self.gold.ensemble}

    def arm(self, label: str) -> ArmSpec:
        return next(arm for arm in self.arms if arm.label == label)

    def ppo_config(self, ppo_arm: PPOArm) -> PPOConfig:
        if self.ppo is None:
            raise ValueError("this experiment has no PPO part (ppo: null)")
        return derive(self.ppo, policy=self.policy, aggregation=ppo_arm.rule.model_dump())


def size_preset(size: str) -> dict[str, Any]:
    """The YAML mapping of a built-in size."""
    if size not in SIZES:
        raise ValueError(f"unknown experiment size {size!r}; choose from {', '.join(SIZES)}")
    return load_yaml(Path(str(resources.files("rmens") / "presets" / "experiment" / f"{size}.yaml")))


def load_experiment(size: str, overrides: list[str] | None = None, eval_data: str | Path | None = None,
                    data_dir: str | Path | None = None) -> ExperimentConfig:
    """A size preset with dotted `key=value` overrides and the training/evaluation folders applied."""
    data = apply_overrides(size_preset(size), overrides or [])
    data["size"] = size
    source = data.setdefault("data", {})
    for key, folder in (("eval_data", eval_data), ("data_dir", data_dir)):
        if folder is not None:
            source[key] = str(folder)
    for key in ("eval_data", "data_dir"):  # absolute, so that a run's settings say which files it read
        if source.get(key):
            source[key] = str(Path(source[key]).expanduser().resolve())
    return ExperimentConfig.model_validate(data)
