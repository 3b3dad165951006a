"""Preference data: one record schema, loaders for its common formats, splits and label noise."""

from __future__ import annotations

from collections import Counter

from rmens.data.config import DataConfig
from rmens.data.schema import DataError, PreferencePair, validate_pair, validate_pairs

__all__ = ["DataError", "PreferencePair", "prepare_pairs", "validate_pair", "validate_pairs"]


def prepare_pairs(cfg: DataConfig, stats: Counter | None = None) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Load, split by instruction into (train, held-out), and flip `label_noise` of the training labels."""
    from rmens.data.loaders import load_pairs
    from rmens.data.splits import flip_labels, split_by_instruction

    pairs = load_pairs(cfg, stats)
    train, val = split_by_instruction(pairs, cfg.val_fraction, salt=f"val-{cfg.seed}")
    validate_pairs(train, "training split (all pairs went to validation; lower val_fraction)")
    if cfg.label_noise:
        train = flip_labels(train, cfg.label_noise, cfg.seed)
    return train, val
