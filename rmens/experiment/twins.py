"""Experiment step that scores every training run's untrained twin: the same seeds, no training step.

A trained arm's numbers mean something only beside what the same architecture and seeds give before any
training: averaging random heads already makes a near-chance model less confident (lower ECE), and a
random head on a pretrained backbone already picks by whatever its features carry (length, fluency).

Every twin is computed from one backbone forward (exactly in fp32; under a GPU's bf16 autocast, up to the
rounding of other batch compositions). An untrained member is the pretrained backbone
under a head drawn from (run seed, member) (rmens.models.ensemble.init_heads), whatever the kind: a full
ensemble's k backbones are k copies of the pretrained one, and a LoRA member adds an adapter whose B
matrix starts at zero (PEFT's default), so it computes the base layer alone. So the twins of all runs are
the members of one linear ensemble whose heads are every twin's heads side by side; `twin_matches_build`
in the tests checks this against building each twin the long way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rmens.config import derive
from rmens.data.loaders import load_jsonl_pairs
from rmens.evaluation import pools as pl
from rmens.experiment.measure import measure
from rmens.io import write_json
from rmens.models.config import EnsembleConfig
from rmens.steps import Output, step


def twin_file(label: str) -> str:
    return f"twin_{label}.npz"


def shared_scorer(ensembles: dict[str, EnsembleConfig], batch_size: int):
    """One linear ensemble holding every twin's heads in order, and each twin's rows of it."""
    from rmens.models.backbone import load_tokenizer
    from rmens.models.ensemble import LinearEnsemble, build_ensemble, init_heads
    from rmens.reward import EnsembleReward

    first = next(iter(ensembles.values()))
    shape = {"kind": "linear", "k": 1, "seed": 0, "lora": first.lora.model_dump()}
    differing = [label for label, cfg in ensembles.items() if derive(cfg, **shape) != derive(first, **shape)]
    if differing:  # one backbone forward serves every twin only when they read the same tokens
        raise ValueError(f"twins {differing} differ from {next(iter(ensembles))!r} in more than kind, k and seed")
    base = build_ensemble(derive(first, **shape))
    heads = [init_heads(base.hidden_size, cfg.k, cfg.seed) for cfg in ensembles.values()]
    joined = torch.nn.Linear(base.hidden_size, sum(h.out_features for h in heads))
    with torch.no_grad():
        joined.weight.copy_(torch.cat([h.weight for h in heads]))
        joined.bias.copy_(torch.cat([h.bias for h in heads]))
    ensemble = LinearEnsemble(derive(first, **{**shape, "k": joined.out_features}), base.backbone, joined)
    bounds = np.cumsum([0] + [cfg.k for cfg in ensembles.values()])
    rows = {label: slice(int(lo), int(hi)) for label, lo, hi in zip(ensembles, bounds[:-1], bounds[1:])}
    # The heads are random and carry no statistics of their own: each twin is standardised below.
    return EnsembleReward(ensemble, load_tokenizer(first.backbone), batch_size=batch_size,
                          allow_unstandardised=True), rows


@step("twins", resumable=True, devices=1)
def twins_step(folder: Path, *, pairs: Output, pairs_file: str, pools: Output, judges: list[str],
               ensembles: dict[str, EnsembleConfig], calibration: dict[str, tuple[int, int]],
               batch_size: int) -> dict:
    """For every run (label -> its ensemble settings, and its training seed and calibration_pairs): its untrained
    twin's raw member scores of every pool response (twin_<label>.npz, as the score step's tables) with the
    member standardisation its training would calibrate, on the same seeded training responses
    (rmens.models.standardise)."""
    from rmens.experiment.scoring import scored_items
    from rmens.models.standardise import calibration_subset, pair_responses, standardisation_from_scores

    training = load_jsonl_pairs(pairs.file(pairs_file))
    calibration = {label: pair_responses(calibration_subset(training, calibration[label][1], calibration[label][0]))
                   for label in ensembles}
    items = {pl.response_key(*item): item for item in scored_items(pools, judges)}
    items.update({pl.response_key(p, r): (p, r) for prompts, responses in calibration.values()
                  for p, r in zip(prompts, responses)})
    reward, rows = shared_scorer(ensembles, batch_size)
    with measure() as cost:  # resumable: score_items continues a table an interrupted run left
        table = pl.score_items(lambda p, r: reward.member_scores(p, r, standardise=False), list(items.values()),
                               folder / "all_twins.npz")
    keys = list(table.index)
    for label, (prompts, responses) in calibration.items():
        calibrated = torch.cat([table.lookup(p, [r])[rows[label]] for p, r in zip(prompts, responses)], dim=1)
        stats = standardisation_from_scores(calibrated)
        twin = pl.ScoreTable(keys, table.members[rows[label]])
        twin.standardised_by(stats.center.numpy(), stats.scale.numpy()).save(folder / twin_file(label))
    summary = {"twins": len(ensembles), "members": table.k, "responses": len(keys),
               "twins_wall_s": cost["wall_s"], "twins_peak_mib": cost["peak_mib"]}
    write_json(folder / "twins_summary.json", summary)
    return summary
