"""Best-of-n over logged outputs, judged by the real judge's own verdicts (no generation, no API).

Take the outputs of one instruction (a pool, rmens.evaluation.pools) as a policy's samples: any reward
function picks the best of a random n-subset, and the chance that each output is the pick is exact
(rmens.bon.selection_probabilities: C(j-1, n-1) / C(m, n) for the j-th lowest reward, ties split
evenly). The expected verdict of the pick, averaged over instructions, is the AlpacaEval win rate of a
Best-of-n system under the real judge (PPE, Frick et al. 2025, scores reward models by such best-of-K
curves on real data). Written here because neither alpaca_eval nor any maintained library computes
Best-of-n from logged annotations.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rmens.bon import bon_ns, kl_from_uniform, selection_probabilities  # noqa: F401  (bon_ns: the n grid)
from rmens.evaluation.pools import Pool, ScoreTable
from rmens.io import atomic_write_text, write_json

# -- the estimator over pools ---------------------------------------------------------------------

def expected_pick(pool: Pool, rewards: torch.Tensor, n: int) -> tuple[float, float, float]:
    """(expected verdict, expected length, KL of the pick distribution from uniform over the pool) of the
    output picked as best of a random n-subset by `rewards` [m]. The KL is exact: the pool is the policy
    (each output equally likely), and n outputs are drawn from it without replacement."""
    probs = selection_probabilities(rewards, n)
    return float(probs @ pool.win_tensor), float(probs @ pool.lengths), kl_from_uniform(probs)


def per_instruction(pools: list[Pool], rewards: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
    """Expected verdict, length and KL of the Best-of-n pick, per instruction: ([P], [P], [P])."""
    if len(pools) != len(rewards):
        raise ValueError(f"{len(pools)} pools but {len(rewards)} reward vectors")
    picks = torch.tensor([expected_pick(pool, r, n) for pool, r in zip(pools, rewards)], dtype=torch.float64)
    return picks[:, 0], picks[:, 1], picks[:, 2]


def standard_error(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def curve(pools: list[Pool], rewards: list[torch.Tensor], ns: list[int], with_values: bool = False) -> list[dict]:
    """Rows {n, kl_bon, win_rate, se, mean_length} of a Best-of-n system picking by `rewards`; kl_bon is the
    mean over instructions of the pick distribution's exact KL from the pool's uniform distribution (not
    log n - (n-1)/n, which assumes independent draws), the standard error is over instructions, the length
    in characters. `with_values` adds each row's per-instruction expected verdicts (`values`), for paired
    comparisons of two systems."""
    rows = []
    for n in ns:
        wins, lengths, kls = per_instruction(pools, rewards, n)
        rows.append({"n": n, "kl_bon": float(kls.mean()), "win_rate": float(wins.mean()), "se": standard_error(wins),
                     "mean_length": float(lengths.mean()), **({"values": wins.tolist()} if with_values else {})})
    return rows


def baseline_rewards(pools: list[Pool], system_prior: dict[str, float] | None = None) -> dict[str, list[torch.Tensor]]:
    """random: a constant reward (every output equally likely, the n = 1 value at every n); longest and
    shortest: length in characters as the reward; best: the judge's own verdict (the ceiling);
    system_prior (when given): each output scored by nothing but its system's mean verdict on training
    instructions, a text-free lookup that measures how far recognising systems alone gets on these pools."""
    out = {"random": [torch.zeros(len(p), dtype=torch.float64) for p in pools],
           "longest": [p.lengths for p in pools],
           "shortest": [-p.lengths for p in pools],
           "best": [p.win_tensor for p in pools]}
    if system_prior is not None:  # a system without a training win rate gets the mean: such systems tie
        fallback = sum(system_prior.values()) / len(system_prior) if system_prior else 0.0
        out["system_prior"] = [torch.tensor([system_prior.get(g, fallback) for g in p.generators],
                                            dtype=torch.float64) for p in pools]
    return out


def member_rewards(pools: list[Pool], table: ScoreTable, standardised: bool = False) -> list[torch.Tensor]:
    """Per pool, the member scores of its outputs: [k, m], raw or standardised."""
    return [table.lookup(pool.instruction, pool.outputs, standardised) for pool in pools]


# -- held-out verdicts as pairs: reward-model agreement with the judge ----------------------------

def verdict_pairs(pools: list[Pool]) -> list[tuple[int, int, bool]]:
    """(pool, output index, output won) for every decided verdict (draws left out)."""
    return [(i, j, w > 0.5) for i, pool in enumerate(pools) for j, w in enumerate(pool.wins) if w != 0.5]


def verdict_margins(pools: list[Pool], table: ScoreTable) -> tuple[torch.Tensor, ...]:
    """Raw member margins r(winner) - r(loser) [k, pairs] of every decided verdict, with the characters of the
    winner and of the loser [pairs] (for accuracy overall and where the longer output lost) and each pair's
    pool index [pairs] (for per-instruction accuracy)."""
    pairs = verdict_pairs(pools)
    if not pairs:
        raise ValueError("the pools hold no decided verdicts")
    margins, len_winner, len_loser = [], [], []
    for i, j, output_won in pairs:
        pool = pools[i]
        output, reference = pool.outputs[j], pool.references[j]
        scores = table.lookup(pool.instruction, [output, reference])  # [k, 2]
        sign = 1.0 if output_won else -1.0
        margins.append(sign * (scores[:, 0] - scores[:, 1]))
        winner, loser = (output, reference) if output_won else (reference, output)
        len_winner.append(len(winner))
        len_loser.append(len(loser))
    return (torch.stack(margins, dim=1), torch.tensor(len_winner), torch.tensor(len_loser),
            torch.tensor([i for i, _, _ in pairs]))


# -- files ----------------------------------------------------------------------------------------

GROUPS = ("baselines", "gold", "arms", "twins")  # the series groups of an evaluation set's entry


def evaluation_sets(results: dict) -> dict[str, dict]:
    """Every evaluation set of a logged_bon.json: the AlpacaEval judge sets, and MT-Bench when present."""
    return {**results["judges"], **({"mt_bench": results["mt_bench"]} if "mt_bench" in results else {})}


def _number(value) -> str:
    return "" if value is None else f"{value:.6f}"


def save_logged_bon(results: dict, folder: str | Path, stem: str = "logged_bon") -> dict[str, Path]:
    """`<stem>.json` ({"held_out_generators": ..., "judges": {judge: entry}, "mt_bench": entry}, each entry with
    the series groups baselines, gold, arms and twins), `<stem>.csv` (one row per set, series and n; `value`
    is the win rate, or MT-Bench's mean grade) and one `<stem>_<set>.png` per evaluation set."""
    folder = Path(folder)
    out = {"json": write_json(folder / f"{stem}.json", results)}
    lines = ["set,group,series,n,kl_bon,value,se,mean_length"]
    for name, entry in evaluation_sets(results).items():
        metric = entry["metric"]
        for group in GROUPS:
            for series, rows in entry.get(group, {}).items():
                lines += [f"{name},{group},{series},{r['n']},{r['kl_bon']:.6f},{r[metric]:.6f},{_number(r['se'])},"
                          f"{r['mean_length']:.1f}" for r in rows]
    out["csv"] = atomic_write_text(folder / f"{stem}.csv", "\n".join(lines) + "\n")
    for name, entry in evaluation_sets(results).items():
        out[f"png_{name}"] = plot_logged_bon(entry, folder / f"{stem}_{name}.png",
                                             f"Best-of-n over logged outputs, judged by {entry['judge_name']}")
    return out


def plot_logged_bon(entry: dict, path: Path, title: str) -> Path:
    """Three panels against the exact KL of the pick: the baselines, the gold judge and every arm under its
    first rule (mean over its runs ± s.e. with runs random; its untrained twin dotted); every rule of each
    ensemble (colour: arm, line style: rule); and the mean length of the picked output. `entry["rules"]`
    maps each arm to its rule names, first one first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = entry["metric"]
    fig, (ax_win, ax_rules, ax_len) = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = plt.get_cmap("tab10").colors
    dashes = ["-", ":", "--", "-.", (0, (1, 3)), (0, (5, 1))]

    def draw(ax, rows, label, errors=False, **style):
        kls = [r["kl_bon"] for r in rows]
        values = [r[metric] for r in rows]
        if errors:
            ax.errorbar(kls, values, yerr=[r["se"] or 0.0 for r in rows], label=label, capsize=2, elinewidth=0.7,
                        **style)
        else:
            ax.plot(kls, values, label=label, **style)
        if ax is ax_win:
            ax_len.plot(kls, [r["mean_length"] for r in rows], **style)

    for i, (name, rows) in enumerate(entry.get("baselines", {}).items()):
        draw(ax_win, rows, f"{name} (baseline)", color="0.3", linestyle=dashes[1 + i % 5], alpha=0.8)
    for name, rows in entry.get("gold", {}).items():
        draw(ax_win, rows, f"{name} (gold judge)", errors=True, color="black", linewidth=2.2)
    for colour, (arm, rules) in zip(colours * 3, entry.get("rules", {}).items()):
        first = f"{arm}/{rules[0]}"
        draw(ax_win, entry["arms"][first], first, errors=True, color=colour, marker="o", markersize=3)
        if first in entry.get("twins", {}):
            draw(ax_win, entry["twins"][first], f"{first} untrained", color=colour, linestyle=":", alpha=0.7)
        for dash, rule in zip(dashes, rules if len(rules) > 1 else []):
            draw(ax_rules, entry["arms"][f"{arm}/{rule}"], f"{arm}/{rule}", color=colour, linestyle=dash)
    what = "win rate against the reference" if metric == "win_rate" else "GPT-4 grade of the pick"
    for ax, label in ((ax_win, what), (ax_rules, f"{what}: every rule of each ensemble"),
                      (ax_len, "mean length of the picked output (characters)")):
        ax.set_xlabel("KL of the pick from the pool's uniform distribution (nats; n = 1, 2, 4, ...)")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    ax_win.legend(fontsize=6)
    ax_rules.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
