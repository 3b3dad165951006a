"""The arms both pipelines compare, in one vocabulary: reward-model arms (`Arm`, a kind and k, trained `runs`
times with seeds of their own), the rules they are scored under, and PPO arms (`PPOArm`, one arm's reward
under one rule). The pipeline's config (rmens.pipeline.config) and the reference experiment's
(rmens.experiment.config) both derive from `ArmsConfig`, so their YAML writes them the same way:

    runs: 3                                    # training runs of every arm that does not set its own
    rules: [{rule: mean}, {rule: lcb, beta: 1.0}]
    arms:
      - {kind: single}
      - {kind: lora, k: 5, top_layers: 1.0, runs: 20}
    ppo_arms:
      - linear-k5/lcb1                         # short for {arm: linear-k5, rule: {rule: lcb, beta: 1.0}}
      - {arm: single}                          # the mean unless a rule is given
    ppo_runs: 1                                # PPO run r optimises the reward model of the arm's run r

Every label is made from the typed object (an arm's `label`, a run's `run_label`); the one string read
back is a PPO arm's short form, parsed when the config loads and checked against the arms and rules.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from rmens.config import StrictModel, derive, refuse_replaced
from rmens.models.config import AggregationConfig, EnsembleConfig
from rmens.ppo.config import PPOConfig
from rmens.seeding import Stream, seed_for
from rmens.training.config import TrainConfig


def run_seed(base: int, label: str, run: int) -> int:
    """The seed of run `run` of the arm labelled `label`: distinct per arm and run (so that runs of different
    arms are independent, as the comparisons assume), stable when arms are added or reordered."""
    arm_id = int.from_bytes(hashlib.sha256(label.encode()).digest()[:4], "big")
    return seed_for(base, Stream.RUN, arm_id, run) % 2**32


def default_rules() -> list[AggregationConfig]:
    """mean, min, lcb (beta 1) and uwo (lambda 0.5): the rules of Zhang et al. and Coste et al."""
    return [AggregationConfig(rule="mean"), AggregationConfig(rule="min"), AggregationConfig(rule="lcb", beta=1.0),
            AggregationConfig(rule="uwo", lam=0.5)]


class Arm(StrictModel):
    """One reward-model arm, trained `runs` times with different seeds (member initialisation and data order).
    `single` is one reward model (k=1); the others are ensembles of k members (Zhang et al.: full, linear,
    LoRA)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["single", "full", "linear", "lora"] = Field(
        description="single: one reward model; full, linear, lora: an ensemble of k members.")
    k: int = Field(1, ge=1, description="Members: 1 for single, at least 2 for an ensemble.")
    top_layers: float | None = Field(None, gt=0, description="lora: layers with adapters (fraction or count); "
                                                             "None keeps the shared ensemble's setting.")
    runs: int | None = Field(None, ge=1, description="Training runs (seeds) of this arm; None: the config's `runs`.")

    @model_validator(mode="after")
    def _consistent(self) -> Arm:
        if self.kind == "single" and self.k != 1:
            raise ValueError(f"a single arm has k=1, got k={self.k}")
        if self.kind != "single" and self.k < 2:
            raise ValueError(f"a {self.kind} ensemble needs k >= 2, got k={self.k} (use kind: single)")
        if self.top_layers is not None and self.kind != "lora":
            raise ValueError(f"top_layers applies to lora arms only, not {self.kind}")
        return self

    @property
    def label(self) -> str:
        """single, linear-k3, lora-k5, lora-k5-top0.5, lora-k5-all."""
        if self.kind == "single":
            return "single"
        label = f"{self.kind}-k{self.k}"
        if self.top_layers is not None:
            label += "-all" if self.top_layers == 1 else f"-top{self.top_layers:g}"
        return label

    @property
    def is_ensemble(self) -> bool:
        return self.k > 1

    def run_label(self, run: int) -> str:
        """The label of one training run: single-r0, linear-k3-r1."""
        return f"{self.label}-r{run}"

    def ensemble_config(self, shared: EnsembleConfig, run: int) -> EnsembleConfig:
        """Run `run`'s EnsembleConfig: the shared settings (backbone, lengths, LoRA) with the arm's kind and k
        and the run's seed."""
        changes: dict[str, Any] = {"kind": "linear" if self.kind == "single" else self.kind, "k": self.k,
                                   "seed": run_seed(shared.seed, self.label, run)}
        if self.top_layers is not None:
            changes["lora"] = {"top_layers": self.top_layers}
        return derive(shared, **changes)

    def train_config(self, shared: TrainConfig, run: int) -> TrainConfig:
        """Run `run`'s TrainConfig: the shared settings with the run's seed (data order)."""
        return derive(shared, seed=run_seed(shared.seed, self.label, run))

    def rules(self, rules: list[AggregationConfig]) -> list[AggregationConfig]:
        """Every rule for an ensemble; only the mean for a single model (all rules equal it there)."""
        return list(rules) if self.is_ensemble else [AggregationConfig(rule="mean")]

    def describe(self, run: int, rule: AggregationConfig | None = None) -> dict[str, str]:
        """What tracking's compare views group a run by: arm, kind, k, run (and rule)."""
        return {"arm": self.label, "kind": self.kind, "k": str(self.k), "run": str(run),
                **({"rule": rule.name} if rule is not None else {})}


class PPOArm(StrictModel):
    """PPO against one arm's reward under one rule (one PPO run per training run of the arm, up to `ppo_runs`).
    Written in full ({arm: linear-k3, rule: {rule: lcb, beta: 1.0}}) or short ('linear-k3/lcb1'; 'single' and
    'linear-k3' alone take the mean)."""

    arm: str = Field(description="The label of an arm, e.g. single or linear-k5.")
    rule: AggregationConfig = Field(default_factory=AggregationConfig,
                                    description="The rule combining the arm's members into PPO's reward.")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        arm, slash, rule = data.partition("/")
        return {"arm": arm, **({"rule": AggregationConfig.from_name(rule)} if slash else {})}

    @property
    def label(self) -> str:
        """The arm and rule, as the short form writes them: linear-k3/lcb1."""
        return f"{self.arm}/{self.rule.name}"

    def run_label(self, run: int) -> str:
        return f"{self.label}-r{run}"


class ArmsConfig(StrictModel):
    """What both pipelines share: the policy PPO starts from, the settings every arm derives its own from, the
    arms and their runs, the rules, and the PPO arms. Checked when the config loads: labels and rules unique,
    no two arms training the same model, every PPO arm naming an arm and one of its rules."""

    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the initial policy of "
                                                         "every PPO run (it replaces ppo.policy).")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig,
                                     description="What every arm shares: backbone, lengths, LoRA settings (kind and "
                                                 "k come from each arm, seeds from its runs).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="What every arm's training shares; each "
                                                                        "run's seed is derived from its seed.")
    arms: list[Arm] = Field(default_factory=lambda: [Arm(kind="single"), Arm(kind="linear", k=3),
                                                     Arm(kind="lora", k=3)], min_length=1,
                            description="The reward-model arms, each with a label of its own.")
    runs: int = Field(1, ge=1, description="Training runs (seeds) of every arm that does not set its own.")
    rules: list[AggregationConfig] = Field(default_factory=default_rules,
                                           description="Rules every ensemble arm is scored under (single arms: the "
                                                       "mean only); names must differ.")
    ppo: PPOConfig | None = Field(default_factory=PPOConfig, description="None: no PPO.")
    ppo_arms: list[PPOArm] = Field(default_factory=list, description="Which arm's reward, under which rule, PPO "
                                                                     "optimises: {arm, rule} or 'arm/rule' "
                                                                     "(e.g. linear-k3/lcb1).")
    ppo_runs: int = Field(1, ge=1, description="PPO runs per PPO arm, run r against the arm's reward model of run r.")

    # The PPO settings this config decides itself, and where (a value written in ppo would be ignored).
    ppo_set_here: ClassVar[dict[str, str]] = {"policy": "the top-level policy sets it",
                                              "aggregation": "each ppo_arms entry's rule sets it"}

    @model_validator(mode="before")
    @classmethod
    def _no_matrix(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("arms"), dict):
            raise ValueError("arms is a list of arms now, e.g. [{kind: single, runs: 2}, {kind: linear, k: 3}] "
                             "(arms.kinds x arms.ks: one entry each; arms.single_seeds: the single arm's runs; "
                             "arms.rules: rules)")
        return data

    @model_validator(mode="after")
    def _arms_consistent(self) -> ArmsConfig:
        refuse_replaced(self.ensemble, "ensemble", {"kind": "each arm's kind sets it", "k": "each arm's k sets it"})
        labels = [arm.label for arm in self.arms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"arm labels must be unique, got {labels}")
        rule_names = [rule.name for rule in self.rules]
        if len(set(rule_names)) != len(rule_names):
            raise ValueError(f"rules must differ, got {rule_names}")
        models: dict[str, str] = {}
        for arm in self.arms:  # every arm's ensemble config must be valid, and different, before anything runs
            model = derive(arm.ensemble_config(self.ensemble, 0), seed=0).model_dump_json()  # seeds differ by label
            if model in models:
                raise ValueError(f"arms {models[model]!r} and {arm.label!r} would train the same model")
            models[model] = arm.label
        if self.ppo is not None:  # without PPO, the PPO arms are not read (a preset's stay valid under ppo: null)
            refuse_replaced(self.ppo, "ppo", self.ppo_set_here)
            self._check_ppo_arms(labels)
        return self

    def _check_ppo_arms(self, labels: list[str]) -> None:
        names = [ppo_arm.label for ppo_arm in self.ppo_arms]
        if len(set(names)) != len(names):
            raise ValueError(f"ppo_arms must differ, got {names}")
        for ppo_arm in self.ppo_arms:
            where = f"ppo_arms entry {ppo_arm.label!r}"
            if ppo_arm.arm not in labels:
                raise ValueError(f"{where}: no arm {ppo_arm.arm!r} (arms: {', '.join(labels)})")
            arm = self.arm(ppo_arm.arm)
            rules = [rule.name for rule in arm.rules(self.rules)]
            if ppo_arm.rule.name not in rules:
                if not arm.is_ensemble:
                    raise ValueError(f"{where}: a single reward model has only the mean rule")
                raise ValueError(f"{where}: rule {ppo_arm.rule.name!r} is not among rules ({', '.join(rules)})")
            if self.ppo_runs > self.runs_of(arm):
                raise ValueError(f"{where}: ppo_runs={self.ppo_runs} but arm {arm.label!r} has only "
                                 f"{self.runs_of(arm)} training runs")

    def arm(self, label: str) -> Arm:
        return next(arm for arm in self.arms if arm.label == label)

    def runs_of(self, arm: Arm) -> int:
        return arm.runs or self.runs

    def trained_runs(self) -> list[tuple[Arm, int]]:
        """(arm, run) of every reward model the arms train, arm by arm."""
        return [(arm, run) for arm in self.arms for run in range(self.runs_of(arm))]

    def ppo_config(self, ppo_arm: PPOArm, run: int = 0) -> PPOConfig:
        """PPO run `run` of `ppo_arm`: the shared settings with the policy, the arm's rule and the run's seed."""
        if self.ppo is None:
            raise ValueError("this config has no PPO part (ppo: null)")
        return derive(self.ppo, policy=self.policy, aggregation=ppo_arm.rule.model_dump(),
                      seed=run_seed(self.ppo.seed, ppo_arm.label, run))
