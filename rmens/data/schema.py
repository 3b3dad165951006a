"""The one record type every loader produces: a preference pair."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the record (file and line, or index) and the field."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    `weight` is the probability that `chosen` is the preferred response: 1.0 for a firm judgement,
    0.5 for a draw, or a judge's soft preference. Training uses it as the Bradley-Terry target, so a
    draw pulls the two rewards together instead of being forced into a win.
    `source` holds free metadata (dataset, generators, annotator, whether the label was flipped).
    """

    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_pair(record: Any, where: str) -> PreferencePair:
    """Build a PreferencePair from a mapping, or raise DataError naming `where` and the bad field."""
    if isinstance(record, PreferencePair):
        record = record.to_dict()
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with prompt/chosen/rejected, got {type(record).__name__}")
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r}")
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; such a pair carries no preference")
    weight = record.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise DataError(f"{where}: field 'weight' must be a finite number, got {weight!r}")
    if not 0.5 <= weight <= 1.0:
        raise DataError(
            f"{where}: field 'weight' is the probability that 'chosen' wins and must lie in [0.5, 1], got {weight}"
        )
    source = record.get("source") or {}
    if not isinstance(source, dict):
        raise DataError(f"{where}: field 'source' must be an object, got {type(source).__name__}")
    unknown = set(record) - {"prompt", "chosen", "rejected", "weight", "source"}
    if unknown:
        source = {**source, **{key: record[key] for key in sorted(unknown)}}
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], float(weight), source)


def validate_pairs(pairs: list[PreferencePair], what: str) -> list[PreferencePair]:
    if not pairs:
        raise DataError(f"{what}: no preference pairs")
    return pairs
