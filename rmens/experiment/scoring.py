"""Experiment step that scores: every pool response and reference once per reward model, all members kept."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from rmens.evaluation import pools as pl
from rmens.experiment.data import read_split_pools
from rmens.experiment.measure import measure
from rmens.experiment.plan import SCORES
from rmens.io import write_json


def score_step(folder: Path, *, model: Path, pools: Path, judges: list[str], batch_size: int) -> dict:
    """Every pool response and reference scored once by every member (scores.npz), resumable."""
    from rmens.reward import EnsembleReward

    items = pl.pool_items([pool for judge in judges for pool in read_split_pools(pools, judge)])
    reward = EnsembleReward.from_folder(Path(model) / "ensemble", batch_size=batch_size)
    bar = tqdm(total=len(items), desc="score pools", unit="resp", mininterval=5)

    def advance(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    with measure() as cost:
        table = pl.score_items(reward.member_scores, items, folder / SCORES, progress=advance)
    bar.close()
    device = next(reward.ensemble.parameters()).device
    summary = {"responses": len(items), "k": table.k, "score_wall_s": cost["wall_s"],
               "score_peak_mib": cost["peak_mib"], "responses_per_s": len(items) / max(cost["wall_s"], 1e-9),
               "device": str(device), "bf16_autocast": reward.uses_bf16(device)}
    write_json(folder / "score_summary.json", summary)
    return summary
