"""Settings of Bradley-Terry training (rmens.training.trainer), and of `rmens train`, which runs it alone."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rmens.config import MAX_LR, MAX_WEIGHT_DECAY, Seed, StrictModel
from rmens.data.config import DataConfig
from rmens.models.config import EnsembleConfig


class TrainConfig(StrictModel):
    """Bradley-Terry training: of all members at once, or a full ensemble's members each on its own."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs, fractions allowed (lora: over each "
                                                 "stage's pairs); ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1,
                                  description="Optimizer steps (lora: per stage); overrides epochs when set.")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch: per process under `accelerate launch` "
                                                 "(data parallel); shared by the ranks of a sharded step.")
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
                                                               "(a full ensemble: each member's own; None: no "
                                                               "clipping).")
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


class TrainJobConfig(StrictModel):
    """`rmens train`: data + ensemble + training, and where the ensemble is written."""

    data: DataConfig = Field(default_factory=DataConfig, description="The pairs, and the share held out.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="What ensemble to build.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="How it is trained.")
    output_dir: str = Field("runs/ensemble", description="Folder the ensemble is saved to; --output replaces it.")


def check_divisible(devices: int, cfg: TrainConfig) -> None:
    """A sharded step's ranks split each batch evenly (rmens.training.sharding): refuse batches they cannot,
    before anything starts."""
    for field in ("batch_size", "eval_batch_size"):
        size = getattr(cfg, field)
        if size % devices:
            raise ValueError(f"train.{field} {size} does not split over {devices} devices: a sharded step gives each "
                             f"device an equal share of every batch; use a multiple of {devices}")
