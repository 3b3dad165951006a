"""The pipeline's settings (rmens.pipeline.plan) and those of the flows built from its steps (train, retrain,
evaluate): the gold that scores policies, what is evaluated, the Best-of-n picks, and the whole pipeline,
whose arms, rules and PPO arms are written as the reference experiment writes them (rmens.arms)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from rmens.arms import Arm, ArmsConfig
from rmens.bon_config import BonConfig
from rmens.config import Alias, RegisteredName, StrictModel
from rmens.data.config import DataConfig, PromptsConfig
from rmens.fingerprint import NOT_IN_KEY
from rmens.generation_config import GenerationConfig
from rmens.models.config import AggregationConfig, EnsembleConfig
from rmens.steps.resources_config import StepResources
from rmens.training.config import TrainConfig

# The role of the reference that scores policies is called gold, as in Gao et al. and Coste et al.; it was the
# judge before (in the experiment, "judge" names the judge sets whose verdicts make the pools).
GOLD_RENAMED = "set gold (the reference that scores policies is called gold now; the same fields)"


def series(arm: Arm, run: int, rule: AggregationConfig) -> str:
    """One training run of an arm under one rule, as curves, metric names and picks show it: linear-k3-r0/lcb1."""
    return f"{arm.run_label(run)}/{rule.name}"


class Selection(StrictModel):
    """The Best-of-n pick of one training run of an arm, under one rule, at one n: its label and the file the
    best_of_n step writes."""

    arm: Arm = Field(description="The arm whose reward picks.")
    run: int = Field(ge=0, description="Which training run of the arm.")
    rule: AggregationConfig = Field(description="The rule combining its members' rewards.")
    n: int = Field(ge=1, description="The pick is the best of each prompt's first n samples.")

    @property
    def label(self) -> str:
        return f"bon:{series(self.arm, self.run, self.rule)}:n{self.n}"

    def describe(self) -> dict[str, str]:
        return {**self.arm.describe(self.run, self.rule), "n": str(self.n)}

    @property
    def file_name(self) -> str:
        return f"{series(self.arm, self.run, self.rule).replace('/', '_')}_n{self.n}.jsonl"


class GoldDataConfig(DataConfig):
    """The gold's pairs: a DataConfig whose held-out share is the gold's own, 0.2 unless set (also when a config
    writes a gold.data section without it), and never 0."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Gold pairs (by instruction hash) kept back "
                                                                  "from its training to measure its agreement.")


class GoldConfig(StrictModel):
    """The gold: the reference that scores policies and Best-of-n picks (Gao et al.; Coste et al.).
    reward_model: trained here on many more pairs than the arms see (offline default); hf_reward_model: a
    Hugging Face sequence-classification reward model; alpaca_eval: its annotators (API key needed);
    local_llm: a local causal LM with FastChat's judge prompts."""

    kind: Literal["reward_model", "hf_reward_model", "alpaca_eval", "local_llm"] = Field(
        "reward_model", description="reward_model (trained here), hf_reward_model, alpaca_eval or local_llm; data, "
                                    "ensemble and train serve reward_model only.")
    data: GoldDataConfig = Field(default_factory=lambda: GoldDataConfig(max_pairs=512, seed=11),
                                 description="reward_model: the gold's pairs and the share of them held back.")
    ensemble: EnsembleConfig = Field(default_factory=lambda: EnsembleConfig(kind="linear", k=1, seed=101),
                                     description="reward_model: the gold model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="reward_model: the gold's training.")
    model: str | None = Field(None, description="hf_reward_model / local_llm: model id or folder.")
    annotators_config: str = Field("weighted_alpaca_eval_gpt4_turbo",
                                   description="alpaca_eval: the name of alpaca_eval's annotators config.")
    max_unparsed_fraction: float = Field(
        0.1, ge=0, le=1, description="local_llm: largest share of judged items whose output holds no [[rating]] or "
                                     "verdict before judging fails; below it they are left out, counted and logged.")

    retired: ClassVar[dict[str, str]] = {
        "held_out_fraction": "set gold.data.val_fraction (the gold pairs kept back to measure agreement)"}

    def data_sources(self) -> dict[str, BaseModel]:
        return {"gold.data": self.data} if self.kind == "reward_model" else {}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        return {"gold.ensemble": self.ensemble} if self.kind == "reward_model" else {}


class EvalConfig(StrictModel):
    """What the gold evaluates a policy on: instructions with reference outputs (a win rate), and MT-Bench."""

    source: Literal["alpaca_eval", "synthetic"] = Field(
        "alpaca_eval", description="Instructions and reference outputs: AlpacaEval's (offline data folder), or the "
                                   "synthetic set with its preferred answers as references (smoke runs).")
    alpaca_eval: bool = Field(True, description="Have the gold compare the outputs with the reference outputs for a "
                                                "win rate (false: skip it).")
    split: Literal["train", "test"] = Field("test", description="alpaca_eval: which instructions are evaluated.")
    max_instructions: int | None = Field(None, ge=1, description="alpaca_eval: the split's first N instructions "
                                                                 "(None: all); synthetic: N made (default 16).")
    reference: str = Field("gpt4_1106_preview", description="Reference outputs (alpaca_eval model_outputs name).")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=0.7, top_p=0.9),
                                         description="How an evaluated policy answers the instructions and MT-Bench "
                                                     "(Best-of-n picks are answers already).")
    mt_bench: bool = Field(True, description="Also answer and grade MT-Bench (policies and PPO runs, not Best-of-n "
                                             "picks; skipped with an alpaca_eval gold or without questions).")
    mt_bench_questions: int | None = Field(None, ge=1, description="First N of the 80 questions (None: all).")
    mt_bench_path: str | None = Field(None, description="Folder with question.jsonl (default $RMENS_DATA_DIR/mt_bench)"
                                                        " or a Hugging Face id.")
    bon_select_n: list[int] = Field(default_factory=list, description="The n at which the Best-of-n pick of every "
                                                                      "arm's run, under each rule, is written and "
                                                                      "evaluated.")


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
    """The `evaluate` flow: one policy scored by the gold on AlpacaEval-style win rate and MT-Bench."""

    project_dir: str = Field("runs/evaluate", description="Artifacts, MLflow store and Prefect results live here.")
    label: str = Field("policy", description="Names the run and the evaluation (the generator in AlpacaEval files).")
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the policy evaluated.")
    gold: GoldConfig = Field(default_factory=GoldConfig, description="The gold (a reward_model one is trained first).")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="What is evaluated, and how.")

    retired: ClassVar[dict[str, str]] = {"judge": GOLD_RENAMED}

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {**self.gold.data_sources(), "evaluate": self.evaluate}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings trained, by section (for checks before any work)."""
        return self.gold.trained_ensembles()


class PipelineConfig(ArmsConfig):
    """The whole pipeline: data, the gold, the arms (every run of each), Best-of-n, PPO and evaluation."""

    name: str = Field("smoke", description="Names the run (MLflow's pipeline:<name>) and the report.")
    project_dir: str = Field("runs", description="Artifacts, MLflow store and Prefect results live here.")
    policy: str = Field("tiny-random-llama", description="Hugging Face id, folder or alias of the initial policy: "
                                                         "evaluated as 'initial', it draws the Best-of-n samples and "
                                                         "starts every PPO run (replacing ppo.policy).")
    data: DataConfig = Field(default_factory=DataConfig, description="The pairs every arm trains on, and the "
                                                                     "share held out.")
    gold: GoldConfig = Field(default_factory=GoldConfig, description="The gold, which scores the policies and the "
                                                                     "Best-of-n picks.")
    bon_prompts: PromptsConfig = Field(default_factory=PromptsConfig,
                                       description="Best-of-n prompts; use the evaluation split so that BoN "
                                                   "selections can be scored for win rates.")
    ppo_prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompts of PPO's rollouts.")
    bon: BonConfig = Field(default_factory=BonConfig, description="How many Best-of-n samples, and how drawn.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="How the initial policy, the PPO runs and "
                                                                        "the Best-of-n picks are judged.")
    registered_model: RegisteredName = Field("rmens-reward-ensemble", description="MLflow registered model name.")
    log_models: bool = Field(True, description="Log each ensemble as an MLflow pyfunc model (copies the weights).")
    resources: dict[str, StepResources] = Field(
        default_factory=dict, json_schema_extra=NOT_IN_KEY,
        description="Per step name or call (step:label): the devices and host memory a Ray run asks for, "
                    "replacing the step's declaration; in no step's key.")

    retired: ClassVar[dict[str, str]] = {"judge": GOLD_RENAMED}

    def selections(self) -> list[Selection]:
        """Every Best-of-n pick the pipeline evaluates: each run of each arm under each of its rules at each n."""
        return [Selection(arm=arm, run=run, rule=rule, n=n) for arm, run in self.trained_runs()
                for rule in arm.rules(self.rules) for n in sorted(set(self.evaluate.bon_select_n))]

    def data_sources(self) -> dict[str, BaseModel]:
        """Every section that reads data, by setting name (for checks before any work)."""
        return {"data": self.data, **self.gold.data_sources(), "bon_prompts": self.bon_prompts,
                "ppo_prompts": self.ppo_prompts, "evaluate": self.evaluate}

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings reward models are trained with, by section (for checks before any work)."""
        return {"ensemble": self.ensemble, **self.gold.trained_ensembles()}


def load_preset(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    """A built-in pipeline preset (smoke, cpu, gpu; rmens.presets), with dotted overrides applied."""
    from rmens.presets import with_overrides

    return PipelineConfig.model_validate(with_overrides(name, overrides))
