"""The reference experiment's settings: which verdicts train and which evaluate, the gold judge, the
comparison named in advance, and the four sizes (rmens/presets/experiment/{tiny,cpu,gpu-check,gpu}.yaml).

Its arms, runs, rules and PPO arms are written as the pipeline writes them (rmens.arms.ArmsConfig). Every
config derived from another (an arm's ensemble from the shared one, a PPO run's settings) goes through
`derive`, so an inconsistent combination fails where it is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rmens.arms import Arm, ArmsConfig
from rmens.config import StrictModel
from rmens.fingerprint import NOT_IN_KEY
from rmens.generation_config import GenerationConfig
from rmens.models.config import AggregationConfig, EnsembleConfig
from rmens.presets import PRESETS, with_overrides
from rmens.steps.resources_config import StepResources
from rmens.training.config import TrainConfig

SIZES = PRESETS["experiment"]  # name -> what it is
Judge = Literal["ae1", "ae2"]


class Comparison(StrictModel):
    """The primary comparison, named before the results are seen and reported first: series a against
    series b (`<arm>/<rule>`, e.g. lora-k5/mean against single/mean), logged Best-of-n under one judge set at
    one n (None: the largest)."""

    a: str = Field(description="Series a, `<arm>/<rule>` (e.g. lora-k5/mean).")
    b: str = Field(description="Series b, which a is compared against (e.g. single/mean).")
    judge: Judge = Field("ae2", description="The judge set whose pools decide it; one of pools.judges.")
    n: int | None = Field(None, ge=1, description="The Best-of-n size it is read at, one of 1, 2, 4 ... pools.max_n "
                                                  "(None: the largest).")

    @property
    def label(self) -> str:
        return f"{self.a} vs {self.b}, Best-of-n {self.judge}" + (f" n={self.n}" if self.n else " at the largest n")


class GoldModelConfig(StrictModel):
    """The gold judge of PPO (Gao et al.; Coste et al.): one reward model trained on many more verdicts,
    at a longer context, than any proxy."""

    ensemble: EnsembleConfig = Field(default_factory=lambda: EnsembleConfig(kind="linear", k=1, seed=101),
                                     description="The gold model: kind linear, k 1, and at least the proxies' "
                                                 "max_length.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Its training (its seed used as is).")
    min_margin: float = Field(0.02, ge=0, le=1, description="PPO verdicts are printed only when the gold judge's "
                              "held-out accuracy beats every proxy arm's (averaged over its runs) by this much "
                              "on every judge set.")

    @model_validator(mode="after")
    def _single(self) -> GoldModelConfig:
        if self.ensemble.k != 1 or self.ensemble.kind != "linear":
            raise ValueError("the gold judge is one reward model: gold.ensemble needs kind 'linear' and k 1")
        return self


class PairsShare(StrictModel):
    """Which verdicts of a share of the training instructions are kept."""

    subset: Literal["ae1", "ae2", "both"] = Field(
        "both", description="Whose verdicts are kept: AE1's (GPT-4), AE2's (GPT-4-turbo) or both.")
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
    generator_fraction: float = Field(
        0.4, gt=0, lt=1, description="Share of the generating systems held out (rmens.experiment.data."
        "held_out_generators): their outputs fill the pools and train nothing; the rest train and never "
        "appear in a pool.")
    seed: int = Field(0, description="Seeds the hash splits and every subsample.")


class SplitConfig(StrictModel):
    """The training side, three disjoint shares of the training instructions: the proxies' verdicts, PPO's
    unlabelled prompts, and the gold judge's verdicts (the rest). No evaluation instruction and no output of a
    held-out system is in any of them."""

    gold: PairsShare = Field(default_factory=PairsShare, description="The gold judge's share (the instructions "
                                                                     "the others leave): its verdicts and pairs.")
    proxy: ProxyShare = Field(default_factory=ProxyShare, description="The proxies' share: its size, verdicts "
                                                                      "and pairs.")
    ppo_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the training instructions kept unlabelled "
                                                             "for PPO's prompts (no reward model sees them).")
    ppo_prompts: int | None = Field(256, ge=1, description="PPO-share instructions PPO samples from (None: all).")

    @model_validator(mode="after")
    def _shares(self) -> SplitConfig:
        if self.proxy.fraction + self.ppo_fraction >= 1:
            raise ValueError(f"split.proxy.fraction + split.ppo_fraction = {self.proxy.fraction + self.ppo_fraction:g} "
                             "leaves the gold judge no instructions")
        return self


class PoolConfig(StrictModel):
    """The evaluation side: the logged-output Best-of-n pools, one per held-out instruction and judge set,
    and the held-out instructions PPO checkpoints answer."""

    judges: list[Judge] = Field(default_factory=lambda: ["ae1", "ae2"], min_length=1,
                                description="Judge sets with pools of their own: ae1 (GPT-4's verdicts), ae2 "
                                            "(GPT-4-turbo's).")
    max_instructions: int | None = Field(None, ge=1, description="At most this many pools per judge set, chosen by "
                                                                 "a hash of the instruction (None: all).")
    pool_size: int | None = Field(None, ge=1, description="Outputs kept per instruction (None: all).")
    max_n: int = Field(16, ge=1, description="n = 1, 2, 4, ... up to this; pools smaller than it are left out.")
    exclude_generators: list[str] = Field(default_factory=lambda: ["example", "gpt4_gamed"],
                                          description="Systems whose outputs never enter a pool.")
    include_generators: list[str] | None = Field(None, description="Only these of the held-out systems fill the "
                                                                   "pools (None: all of them).")
    eval_prompts: int = Field(32, ge=1, description="Pool instructions PPO checkpoints answer.")

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.pool_size is not None and self.pool_size < self.max_n:
            raise ValueError(f"pools.pool_size={self.pool_size} is below pools.max_n={self.max_n}")
        return self


class MtBenchConfig(StrictModel):
    """Logged Best-of-n and agreement on MT-Bench's released GPT-4 grades (rmens.evaluation.mt_bench_grades):
    one pool per question and turn holding every system of the grades file."""

    enabled: bool = Field(True, description="Build pools from MT-Bench's grades and report on them (false: leave "
                                            "MT-Bench out, no grades file needed).")
    grades: str | None = Field(None, description="The grades file (default $RMENS_DATA_DIR/mt_bench/"
                                                 "gpt4_single_grades.jsonl.gz).")
    max_questions: int | None = Field(None, ge=1, description="A seeded subset of the questions (None: all).")
    max_n: int = Field(16, ge=1, description="n = 1, 2, 4, ... up to this (at most the smallest pool).")


class ProxyLabels(StrictModel):
    """Optional changes to the proxies' labels (Coste et al.)."""

    relabel_by_gold: bool = Field(False, description="The gold model's preference replaces the judge's.")
    label_noise: float = Field(0.0, ge=0, le=1, description="Fraction of proxy labels flipped (Coste et al.: 0.25).")

    @property
    def active(self) -> bool:
        return self.relabel_by_gold or self.label_noise > 0


class ExperimentConfig(ArmsConfig):
    """Everything `rmens experiment` and bench/reference_experiment.py run."""

    size: str = Field("custom", description="The size preset it was loaded from ('custom' when built otherwise); "
                                            "names the run and its default output folder.")
    data: DataSource = Field(default_factory=DataSource, description="The verdicts and evaluation files, and the "
                                                                     "held-out instructions and systems.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="The training side: the proxies', PPO's "
                                                                        "and the gold judge's shares.")
    pools: PoolConfig = Field(default_factory=PoolConfig, description="The evaluation side: the Best-of-n pools "
                                                                      "and PPO's evaluation prompts.")
    runs: int = Field(3, ge=1, description="Training runs (seeds) of every arm that does not set its own; the "
                                           "comparisons treat runs as random, so one run per arm gives no verdict.")
    gold: GoldModelConfig = Field(default_factory=GoldModelConfig, description="The gold judge.")
    proxy_labels: ProxyLabels = Field(default_factory=ProxyLabels, description="Changes to the proxies' labels "
                                                                               "(none by default).")
    mt_bench: MtBenchConfig = Field(default_factory=MtBenchConfig, description="Best-of-n and agreement on "
                                                                               "MT-Bench's GPT-4 grades.")
    primary: Comparison = Field(default_factory=lambda: Comparison(a="lora-k5/mean", b="single/mean"),
                                description="The one comparison named in advance and reported first; every other "
                                            "verdict is one of a family corrected with Holm's method.")
    alpha: float = Field(0.05, gt=0, lt=1,
                         description="Significance level of every verdict (after Holm for the family).")
    power: float = Field(0.8, gt=0, lt=1, description="Power at which minimum detectable differences are reported.")
    score_batch_size: int = Field(32, ge=1, description="Texts per batch when reward models (gold, arms, twins) "
                                                        "score the pools.")
    policy: str = Field("tiny-random-llama", description="Initial policy of every PPO run (it replaces ppo.policy); "
                                                         "its tokenizer decides which evaluation prompts fit.")
    resources: dict[str, StepResources] = Field(
        default_factory=dict, json_schema_extra=NOT_IN_KEY,
        description="Per step name or call (step:label): the devices and host memory a Ray run asks for, "
                    "replacing the step's declaration; in no step's key.")
    ppo_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(temperature=0.7),
        description="How PPO checkpoints answer the held-out instructions they are judged on (untruncated: the KL "
                    "of each checkpoint is estimated from these samples).")

    ppo_set_here: ClassVar[dict[str, str]] = {
        **ArmsConfig.ppo_set_here,
        "gold_every": "the experiment's PPO runs without the gold; the gold judge scores its checkpoints afterwards"}

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        for side in ("a", "b"):
            self.series(getattr(self.primary, side), f"primary.{side}")
        if self.primary.judge not in self.pools.judges:
            raise ValueError(f"primary.judge {self.primary.judge!r} is not among pools.judges {self.pools.judges}")
        grid = [2**i for i in range(self.pools.max_n.bit_length()) if 2**i < self.pools.max_n] + [self.pools.max_n]
        if self.primary.n is not None and self.primary.n not in grid:
            raise ValueError(f"primary.n={self.primary.n} is not among the Best-of-n sizes {grid} (pools.max_n)")
        if self.ppo_generation.top_p < 1 or not self.ppo_generation.do_sample:
            raise ValueError("ppo_generation must sample without truncation (top_p 1, do_sample true): each "
                             "checkpoint's KL is estimated from these samples with the full softmax")
        if self.ppo_generation.backend != "hf":
            raise ValueError("ppo_generation.backend must be 'hf': checkpoints answer with their log-probs, in this "
                             "process")
        if self.gold.ensemble.max_length < self.ensemble.max_length:
            raise ValueError(f"the gold judge must see at least the proxies' context: gold.ensemble.max_length="
                             f"{self.gold.ensemble.max_length} < ensemble.max_length={self.ensemble.max_length}")
        return self

    def trained_ensembles(self) -> dict[str, EnsembleConfig]:
        """The ensemble settings reward models are trained with, by section (arms change only kind, k, seed
        and LoRA layers of the shared one)."""
        return {"ensemble": self.ensemble, "gold.ensemble": self.gold.ensemble}

    def series(self, name: str, where: str) -> tuple[Arm, AggregationConfig]:
        """The arm and rule a series name `<arm>/<rule>` (e.g. linear-k5/uwo0.5) refers to; an unknown one is an
        error naming `where`."""
        label, _, rule_name = name.partition("/")
        arm = next((a for a in self.arms if a.label == label), None)
        rule = next((r for r in arm.rules(self.rules) if r.name == rule_name), None) if arm else None
        if rule is None:
            known = [f"{a.label}/{r.name}" for a in self.arms for r in a.rules(self.rules)]
            raise ValueError(f"{where}: no series {name!r}; choose from {', '.join(known)}")
        return arm, rule


def load_experiment(size: str, overrides: list[str] | None = None, eval_data: str | Path | None = None,
                    data_dir: str | Path | None = None, mt_bench_grades: str | Path | None = None) -> ExperimentConfig:
    """A size preset with dotted `key=value` overrides and the training/evaluation files applied."""
    data = with_overrides(size, overrides, "experiment")
    data["size"] = size
    source = data.setdefault("data", {})
    for key, folder in (("eval_data", eval_data), ("data_dir", data_dir)):
        if folder is not None:
            source[key] = str(folder)
    mt_bench = data.setdefault("mt_bench", {})
    if mt_bench_grades is not None:
        mt_bench["grades"] = str(mt_bench_grades)
    # absolute, so that a run's settings say which files it read
    for section, key in (("data", "eval_data"), ("data", "data_dir"), ("mt_bench", "grades")):
        if data[section].get(key):
            data[section][key] = str(Path(data[section][key]).expanduser().resolve())
    return ExperimentConfig.model_validate(data)
