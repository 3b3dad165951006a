"""Best-of-n over logged outputs, judged by the real judge's own verdicts (no generation, no API).

AlpacaEval's annotation files hold, for every instruction, the outputs of about 50 systems, each with
the judge's verdict against a reference output (AE1: GPT-4 against text_davinci_003; AE2: GPT-4-turbo
against gpt4_1106_preview). Take the outputs of one instruction as a policy's samples (a *pool*): any
reward function picks the best of a random n-subset, and the chance that each output is the pick is
exact (rmens.bon.selection_probabilities: C(j-1, n-1) / C(m, n) for the j-th lowest reward, ties
split evenly). The expected verdict of the pick, averaged over instructions, is the AlpacaEval win
rate of a Best-of-n system under the real judge (PPE, Frick et al. 2025, scores reward models by such
best-of-K curves on real data).

Written here because neither alpaca_eval nor any maintained library computes Best-of-n from logged
annotations. Every response is scored once per reward model (all members kept, `ScoreTable`), so any
aggregation rule or n costs no new forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rmens.bon import bon_ns, kl_bon, selection_probabilities  # noqa: F401  (bon_ns: the n grid)
from rmens.data.loaders import JUDGE_FILES, judge_files, preference_probability, read_jsonl  # noqa: F401
from rmens.data.schema import DataError
from rmens.data.splits import unit_hash
from rmens.io import atomic_write_text, write_jsonl

# Adversarial entries of AE2 (a constant nonsense string, and outputs written to game the judge).
GAMED_GENERATORS = ("example", "gpt4_gamed")


@dataclass(frozen=True)
class Pool:
    """The logged outputs of one instruction, each with P(output beats its reference) by the judge."""

    instruction: str
    dataset: str | None
    generators: tuple[str, ...]
    outputs: tuple[str, ...]
    wins: tuple[float, ...]  # preference - 1; a draw is 0.5
    references: tuple[str, ...]  # the reference output each verdict was given against

    def __len__(self) -> int:
        return len(self.outputs)

    @property
    def lengths(self) -> torch.Tensor:
        """Output lengths in characters (the length every report shows next to a win rate)."""
        return torch.tensor([float(len(o)) for o in self.outputs], dtype=torch.float64)

    @property
    def win_tensor(self) -> torch.Tensor:
        return torch.tensor(self.wins, dtype=torch.float64)


def verdict(preference, where: str) -> float:
    """AlpacaEval's preference -> P(output beats the reference): 1 -> 0, 2 -> 1, a draw (0 or 1.5) -> 0.5,
    AE2's weighted float in [1, 2] -> preference - 1."""
    return preference_probability(preference, f"{where}: field 'preference'")


def _string_field(record: dict, name: str, where: str, allow_empty: bool = True) -> str:
    value = record.get(name)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{where}: field {name!r} must be a {'' if allow_empty else 'non-empty '}string, "
                        f"got {value!r:.60}")
    return value


def read_annotations(paths: Sequence[Path]) -> list[dict]:
    """Every record of the files, validated; the first malformed one is an error naming file, line and field."""
    records = []
    for path in paths:
        for lineno, record in read_jsonl(path):
            where = f"{path}:{lineno}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an annotation object, got {type(record).__name__}")
            records.append({
                "instruction": _string_field(record, "instruction", where, allow_empty=False),
                "output_1": _string_field(record, "output_1", where),
                "output_2": _string_field(record, "output_2", where),
                "generator_1": _string_field(record, "generator_1", where, allow_empty=False),
                "generator_2": _string_field(record, "generator_2", where, allow_empty=False),
                "win": verdict(record.get("preference"), where),
                "dataset": record.get("dataset"),
            })
    return records


def load_pools(folder: str | Path, judge: str, *, include_generators: Sequence[str] | None = None,
               exclude_generators: Sequence[str] = GAMED_GENERATORS, stats: Counter | None = None) -> list[Pool]:
    """One pool per instruction from a judge set's annotation files in `folder`.

    Left out: the reference systems (every generator that appears as `generator_1`, and any output
    identical to its reference), the excluded (gamed) generators, generators outside
    `include_generators` when it is given, and repeated (instruction, generator) records.
    """
    paths = judge_files(folder, judge)
    if not paths:
        raise FileNotFoundError(f"no {JUDGE_FILES[judge]}*.jsonl[.gz] annotation files in {folder}")
    records = read_annotations(paths)
    stats = stats if stats is not None else Counter()
    references = {r["generator_1"] for r in records}
    include = set(include_generators) if include_generators else None
    exclude = set(exclude_generators)
    grouped: dict[str, dict[str, dict]] = {}
    for r in records:
        generator = r["generator_2"]
        if generator in references or r["output_2"] == r["output_1"]:
            stats["reference"] += 1
        elif generator in exclude or (include is not None and generator not in include):
            stats["filtered_generator"] += 1
        elif generator in grouped.setdefault(r["instruction"], {}):
            stats["duplicate"] += 1
        else:
            grouped[r["instruction"]][generator] = r
            stats["kept"] += 1
    pools = []
    for instruction, by_generator in grouped.items():
        if not by_generator:
            continue
        rows = [by_generator[g] for g in sorted(by_generator)]
        pools.append(Pool(instruction, rows[0]["dataset"], tuple(r["generator_2"] for r in rows),
                          tuple(r["output_2"] for r in rows), tuple(r["win"] for r in rows),
                          tuple(r["output_1"] for r in rows)))
    if not pools:
        raise DataError(f"{judge} annotations in {folder}: no outputs left after filtering ({dict(stats)})")
    return pools


def subsample_pools(pools: list[Pool], *, max_instructions: int | None, pool_size: int | None, min_size: int,
                    seed: int = 0, stats: Counter | None = None) -> list[Pool]:
    """Pools of at least `min_size` outputs, at most `max_instructions` of them, each cut to `pool_size`
    outputs; every choice is seeded by the instruction's text, so adding data never moves old choices."""
    stats = stats if stats is not None else Counter()
    big = [p for p in pools if len(p) >= min_size]
    stats["pools_too_small"] += len(pools) - len(big)
    big.sort(key=lambda p: unit_hash(p.instruction, f"pools-{seed}"))
    chosen = big[:max_instructions] if max_instructions is not None else big
    out = []
    for pool in sorted(chosen, key=lambda p: p.instruction):
        if pool_size is not None and len(pool) > pool_size:
            keep = sorted(random.Random(f"{seed}\x00{pool.instruction}").sample(range(len(pool)), pool_size))
            pool = Pool(pool.instruction, pool.dataset, *(tuple(getattr(pool, f)[i] for i in keep)
                                                          for f in ("generators", "outputs", "wins", "references")))
        out.append(pool)
    return out


def write_pools(path: str | Path, pools: list[Pool]) -> Path:
    return write_jsonl(path, (asdict(p) for p in pools))


def read_pools(path: str | Path) -> list[Pool]:
    return [Pool(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
            for _, record in read_jsonl(path)]


# -- scoring: every response once per reward model ------------------------------------------------

def response_key(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:32]


def pool_items(pools: list[Pool]) -> list[tuple[str, str]]:
    """Every distinct (instruction, response) of the pools: outputs and references."""
    seen: dict[str, tuple[str, str]] = {}
    for pool in pools:
        for text in pool.outputs + pool.references:
            seen.setdefault(response_key(pool.instruction, text), (pool.instruction, text))
    return list(seen.values())


class ScoreTable:
    """Member scores [k] of responses, keyed by (prompt, response); saved as one .npz file."""

    def __init__(self, keys: list[str], members: np.ndarray):
        if members.ndim != 2 or members.shape[1] != len(keys):
            raise ValueError(f"members must be [k, {len(keys)}], got {members.shape}")
        self.members = members
        self.index = {key: i for i, key in enumerate(keys)}

    @property
    def k(self) -> int:
        return self.members.shape[0]

    def lookup(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[k, len(responses)] member scores of these responses to `prompt`."""
        try:
            columns = [self.index[response_key(prompt, r)] for r in responses]
        except KeyError:
            raise KeyError(f"a response to {prompt[:60]!r} was never scored; score the pools first") from None
        return torch.from_numpy(self.members[:, columns]).double()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, keys=np.array(list(self.index)), members=self.members)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        with np.load(path) as data:
            return cls([str(k) for k in data["keys"]], data["members"])


def score_items(member_scores: Callable[[list[str], list[str]], torch.Tensor], items: list[tuple[str, str]],
                path: str | Path, chunk: int = 2048, progress: Callable[[int, int], None] | None = None) -> ScoreTable:
    """Score (prompt, response) items with `member_scores` -> [k, n], saving to `path` after every chunk.

    A table already at `path` is reused: only responses missing from it are scored, so an interrupted
    run resumes and a second call costs nothing.
    """
    path = Path(path)
    table = ScoreTable.load(path) if path.is_file() else None
    todo = [item for item in items if table is None or response_key(*item) not in table.index]
    for start in range(0, len(todo), chunk):
        part = todo[start: start + chunk]
        scores = member_scores([p for p, _ in part], [r for _, r in part]).double().cpu().numpy()
        if not np.isfinite(scores).all():
            bad = int(np.argwhere(~np.isfinite(scores))[0][1])
            raise ValueError(f"non-finite reward for the response to {part[bad][0][:60]!r} (item {start + bad})")
        keys = [response_key(*item) for item in part]
        if table is None:
            table = ScoreTable(keys, scores)
        else:
            table = ScoreTable(list(table.index) + keys, np.concatenate([table.members, scores], axis=1))
        table.save(path)
        if progress is not None:
            progress(min(start + chunk, len(todo)), len(todo))
    if table is None:
        raise ValueError("nothing to score: no pools")
    return table


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
    ax_win.set_title(title, fontsize=9)
    ax_win.legend(fontsize=6)
    ax_rules.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
