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

import json
import math
from pathlib import Path

import torch

from rmens.bon import bon_ns, kl_bon, selection_probabilities  # noqa: F401  (bon_ns: the n grid)
from rmens.evaluation.pools import Pool, ScoreTable
from rmens.io import atomic_write_text

# -- the estimator over pools ---------------------------------------------------------------------

def expected_pick(pool: Pool, rewards: torch.Tensor, n: int) -> tuple[float, float]:
    """(expected verdict, expected length) of the output picked as best of n by `rewards` [m]."""
    probs = selection_probabilities(rewards, n)
    return float(probs @ pool.win_tensor), float(probs @ pool.lengths)


def per_instruction(pools: list[Pool], rewards: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected verdict and length of the Best-of-n pick, per instruction: ([P], [P])."""
    if len(pools) != len(rewards):
        raise ValueError(f"{len(pools)} pools but {len(rewards)} reward vectors")
    picks = [expected_pick(pool, r, n) for pool, r in zip(pools, rewards)]
    return (torch.tensor([w for w, _ in picks], dtype=torch.float64),
            torch.tensor([length for _, length in picks], dtype=torch.float64))


def standard_error(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def curve(pools: list[Pool], rewards: list[torch.Tensor], ns: list[int], with_values: bool = False) -> list[dict]:
    """Rows {n, kl_bon, win_rate, se, mean_length} of a Best-of-n system picking by `rewards`; the
    standard error is over instructions, the length in characters. `with_values` adds each row's
    per-instruction expected verdicts (`values`), for paired comparisons of two systems."""
    rows = []
    for n in ns:
        wins, lengths = per_instruction(pools, rewards, n)
        rows.append({"n": n, "kl_bon": kl_bon(n), "win_rate": float(wins.mean()), "se": standard_error(wins),
                     "mean_length": float(lengths.mean()), **({"values": wins.tolist()} if with_values else {})})
    return rows


def baseline_rewards(pools: list[Pool]) -> dict[str, list[torch.Tensor]]:
    """random: a constant reward (every output equally likely, the n = 1 value at every n); longest and
    shortest: length in characters as the reward; best: the judge's own verdict (the ceiling)."""
    return {"random": [torch.zeros(len(p), dtype=torch.float64) for p in pools],
            "longest": [p.lengths for p in pools],
            "shortest": [-p.lengths for p in pools],
            "best": [p.win_tensor for p in pools]}


def member_rewards(pools: list[Pool], table: ScoreTable) -> list[torch.Tensor]:
    """Per pool, the member scores of its outputs: [k, m]."""
    return [table.lookup(pool.instruction, pool.outputs) for pool in pools]


# -- held-out verdicts as pairs: reward-model agreement with the judge ----------------------------

def verdict_pairs(pools: list[Pool]) -> list[tuple[int, int, bool]]:
    """(pool, output index, output won) for every decided verdict (draws left out)."""
    return [(i, j, w > 0.5) for i, pool in enumerate(pools) for j, w in enumerate(pool.wins) if w != 0.5]


def verdict_margins(pools: list[Pool], table: ScoreTable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Member margins r(winner) - r(loser) [k, pairs] of every decided verdict, with the characters of
    the winner and of the loser [pairs], for accuracy overall and where the longer output lost."""
    margins, len_winner, len_loser = [], [], []
    for i, j, output_won in verdict_pairs(pools):
        pool = pools[i]
        output, reference = pool.outputs[j], pool.references[j]
        scores = table.lookup(pool.instruction, [output, reference])  # [k, 2]
        sign = 1.0 if output_won else -1.0
        margins.append(sign * (scores[:, 0] - scores[:, 1]))
        winner, loser = (output, reference) if output_won else (reference, output)
        len_winner.append(len(winner))
        len_loser.append(len(loser))
    if not margins:
        raise ValueError("the pools hold no decided verdicts")
    return torch.stack(margins, dim=1), torch.tensor(len_winner), torch.tensor(len_loser)


# -- files ----------------------------------------------------------------------------------------

def save_logged_bon(results: dict, folder: str | Path, stem: str = "logged_bon") -> dict[str, Path]:
    """`<stem>.json` ({"judges": {judge: {"baselines": {...}, "arms": {...}, ...}}}), `<stem>.csv` (one row
    per judge, series and n) and one `<stem>_<judge>.png` per judge."""
    folder = Path(folder)
    out = {"json": atomic_write_text(folder / f"{stem}.json", json.dumps(results, indent=2))}
    lines = ["judge,group,series,n,kl_bon,win_rate,se,mean_length"]
    for judge, entry in results["judges"].items():
        for group in ("baselines", "arms", "gold"):
            for series, rows in entry.get(group, {}).items():
                lines += [f"{judge},{group},{series},{r['n']},{r['kl_bon']:.6f},{r['win_rate']:.6f},{r['se']:.6f},"
                          f"{r['mean_length']:.1f}" for r in rows]
    out["csv"] = atomic_write_text(folder / f"{stem}.csv", "\n".join(lines) + "\n")
    for judge, entry in results["judges"].items():
        out[f"png_{judge}"] = plot_logged_bon(entry, folder / f"{stem}_{judge}.png", f"Best-of-n over logged outputs, "
                                              f"judged by {entry.get('judge_name', judge)}")
    return out


def plot_logged_bon(entry: dict, path: Path, title: str) -> Path:
    """Three panels against n (log scale): the win rate of the baselines, the gold judge and every arm under
    its first rule (± s.e.); every rule of each ensemble (colour: arm, line style: rule); and the mean
    length of the picked output. `entry["rules"]` maps each arm to its rule names, first one first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_win, ax_rules, ax_len) = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = plt.get_cmap("tab10").colors
    dashes = ["-", ":", "--", "-.", (0, (1, 3)), (0, (5, 1))]

    def draw(ax, rows, label, errors=False, **style):
        ns = [r["n"] for r in rows]
        if errors:
            ax.errorbar(ns, [r["win_rate"] for r in rows], yerr=[r["se"] for r in rows], label=label, capsize=2,
                        elinewidth=0.7, **style)
        else:
            ax.plot(ns, [r["win_rate"] for r in rows], label=label, **style)
        if ax is ax_win:
            ax_len.plot(ns, [r["mean_length"] for r in rows], **style)

    for i, (name, rows) in enumerate(entry.get("baselines", {}).items()):
        draw(ax_win, rows, f"{name} (baseline)", color="0.3", linestyle=dashes[1 + i % 5], alpha=0.8)
    for name, rows in entry.get("gold", {}).items():
        draw(ax_win, rows, f"{name} (gold judge)", errors=True, color="black", linewidth=2.2)
    for colour, (arm, rules) in zip(colours * 3, entry.get("rules", {}).items()):
        draw(ax_win, entry["arms"][f"{arm}/{rules[0]}"], f"{arm}/{rules[0]}", errors=True, color=colour,
             marker="o", markersize=3)
        for dash, rule in zip(dashes, rules if len(rules) > 1 else []):
            draw(ax_rules, entry["arms"][f"{arm}/{rule}"], f"{arm}/{rule}", color=colour, linestyle=dash)
    for ax, what in ((ax_win, "win rate against the reference"), (ax_rules, "win rate: every rule of each ensemble"),
                     (ax_len, "mean length of the picked output (characters)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n  (KL_bon = log n - (n-1)/n)")
        ax.set_ylabel(what)
    fig.suptitle(title, fontsize=10)
    ax_win.legend(fontsize=6)
    ax_rules.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
