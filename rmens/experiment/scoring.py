"""Experiment step that scores: every pool response and reference (and MT-Bench answer) once per reward
model, all members kept raw, with the model's member standardisation stored beside them."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from rmens.evaluation import pools as pl
from rmens.experiment.data import MT_BENCH, pools_file, read_split_pools
from rmens.experiment.measure import measure
from rmens.io import write_json
from rmens.steps import Output, step

SCORES = "scores.npz"  # every member's score of every pool response


def scored_items(pools: Path, judges: list[str]) -> list[tuple]:
    """Every distinct (prompt, response) a reward model scores: the AlpacaEval pools' outputs and references
    of each judge set, and MT-Bench's graded answers when the pools step wrote them."""
    items = pl.pool_items([pool for judge in judges for pool in read_split_pools(pools, judge)])
    if (Path(pools) / pools_file(MT_BENCH)).is_file():
        from rmens.evaluation import mt_bench_grades as mg

        seen = {pl.response_key(*item) for item in items}
        graded = mg.read_graded_pools(Path(pools) / pools_file(MT_BENCH))
        items += [item for item in mg.pool_items(graded) if pl.response_key(*item) not in seen]
    return items


@step("score_pools", resumable=True, devices=1, files={"scores": SCORES})
def score_step(folder: Path, *, model: Output, pools: Output, judges: list[str], batch_size: int) -> dict:
    """Every pool response and reference scored once by every member (scores.npz: raw scores, and the
    ensemble's standardisation as center and scale), resumable."""
    from rmens.reward import EnsembleReward

    items = scored_items(pools, judges)
    reward = EnsembleReward.from_folder(model.file("ensemble"), batch_size=batch_size)
    bar = tqdm(total=len(items), desc="score pools", unit="resp", mininterval=5)

    def advance(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    with measure() as cost:
        table = pl.score_items(lambda p, r: reward.member_scores(p, r, standardise=False), items, folder / SCORES,
                               progress=advance)
    bar.close()
    stats = reward.ensemble.standardisation
    if stats is None:  # every rule reads standardised members; the experiment's own training always saves them
        raise ValueError(f"{model}: the reward model has no member standardisation statistics; add them with "
                         f"python -m rmens.cli calibrate {model.file('ensemble')} --pairs TRAIN_PAIRS.jsonl")
    table.standardised_by(stats.center.numpy(), stats.scale.numpy()).save(folder / SCORES)
    device = next(reward.ensemble.parameters()).device
    summary = {"responses": len(items), "k": table.k, "score_wall_s": cost["wall_s"],
               "score_peak_mib": cost["peak_mib"], "responses_per_s": len(items) / max(cost["wall_s"], 1e-9),
               "device": str(device), "bf16_autocast": reward.uses_bf16(device)}
    write_json(folder / "score_summary.json", summary)
    return summary
