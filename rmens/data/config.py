"""Where preference pairs come from and how they are split (rmens.data.loaders, rmens.data.splits), and
the prompt sets policies answer (rmens.data.prompts)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmens.config import Seed, StrictModel


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
