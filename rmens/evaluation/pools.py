"""Pools of logged outputs: for each instruction of AlpacaEval's annotation files, the outputs of about 50
systems, each with the judge's verdict against a reference output (AE1: GPT-4 against text_davinci_003;
AE2: GPT-4-turbo against gpt4_1106_preview); and every pool response scored once per reward model, with
all its members kept (`ScoreTable`), so that any aggregation rule or Best-of-n size costs no new forward
pass. rmens.evaluation.logged_bon computes Best-of-n over these pools.

Written here because no maintained library reads AlpacaEval annotations as Best-of-n pools.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rmens.data.loaders import JUDGE_FILES, judge_files, preference_probability
from rmens.data.schema import DataError
from rmens.data.splits import unit_hash
from rmens.io import iter_jsonl, write_jsonl
from rmens.seeding import python_random

if TYPE_CHECKING:  # rmens.data.encoding imports transformers, which reading pools does not need
    from rmens.data.encoding import Prompt

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

    @functools.cached_property  # read for every n and every reward model: built once per pool
    def lengths(self) -> torch.Tensor:
        """Output lengths in characters (the length every report shows next to a win rate)."""
        return char_lengths(self.outputs)

    @functools.cached_property
    def win_tensor(self) -> torch.Tensor:
        return torch.tensor(self.wins, dtype=torch.float64)


def char_lengths(texts: Sequence[str]) -> torch.Tensor:
    """Lengths in characters, the length every report shows next to a pick's value."""
    return torch.tensor([float(len(t)) for t in texts], dtype=torch.float64)


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
        for lineno, record in iter_jsonl(path):
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


def alpaca_eval_win_rates(folder: str | Path, judges: Sequence[str] = ("ae1", "ae2"), split: str = "train",
                          min_generators: int = 10, keep: Callable[[str], bool] | None = None
                          ) -> dict[str, dict[str, float]]:
    """{"<judge>/<reference system>": {generator: mean verdict}} from the `split` annotation files.

    One judge set per judge AND reference, because a win rate means nothing without its reference: AE2's
    training file holds 141 verdicts against gpt4_0613 (for vicuna-33b-v1.3 and two Llama-2 chats) among
    33,000 against GPT-4-turbo, and pooling them would rank vicuna-33b-v1.3 far above systems that it
    never met on the same terms. A reference met by fewer than `min_generators` generators is dropped
    (AE2's gpt4_0613 meets 3): a z-score among three systems is not on the scale of one among fifty.
    Reference systems and the gamed generators are left out, as in load_pools;
    `keep` (instruction -> bool), when given, keeps only the verdicts on those instructions (the reference
    experiment passes "not an evaluation instruction").
    """
    verdicts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for judge in judges:
        paths = [p for p in judge_files(folder, judge) if f".{split}." in p.name]
        if not paths:
            raise FileNotFoundError(f"no {judge} annotation files of split {split!r} in {folder}")
        records = read_annotations(paths)
        references = {r["generator_1"] for r in records}
        for r in records:
            generator = r["generator_2"]
            if (generator not in references and generator not in GAMED_GENERATORS and r["output_2"] != r["output_1"]
                    and (keep is None or keep(r["instruction"]))):
                verdicts[f"{judge}/{r['generator_1']}"][generator].append(r["win"])
    return {judge_set: {g: sum(v) / len(v) for g, v in by_generator.items()}
            for judge_set, by_generator in verdicts.items() if len(by_generator) >= min_generators}


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
            keep = sorted(python_random(seed, pool.instruction).sample(range(len(pool)), pool_size))
            pool = Pool(pool.instruction, pool.dataset, *(tuple(getattr(pool, f)[i] for i in keep)
                                                          for f in ("generators", "outputs", "wins", "references")))
        out.append(pool)
    return out


def write_pools(path: str | Path, pools: list[Pool]) -> Path:
    return write_jsonl(path, (asdict(p) for p in pools))


def read_pools(path: str | Path) -> list[Pool]:
    return [Pool(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
            for _, record in iter_jsonl(path)]


# -- scoring: every response once per reward model ------------------------------------------------

def response_key(prompt: Prompt, response: str) -> str:
    """One key per (prompt, response); a conversation (MT-Bench's second turn) by its canonical JSON."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(f"{text}\x00{response}".encode()).hexdigest()[:32]


def pool_items(pools: list[Pool]) -> list[tuple[str, str]]:
    """Every distinct (instruction, response) of the pools: outputs and references."""
    seen: dict[str, tuple[str, str]] = {}
    for pool in pools:
        for text in pool.outputs + pool.references:
            seen.setdefault(response_key(pool.instruction, text), (pool.instruction, text))
    return list(seen.values())


class ScoreTable:
    """Member scores [k] of responses, keyed by (prompt, response); saved as one .npz file.

    The scores are each member's raw reward (its own Bradley-Terry scale, what accuracy and calibration
    read). `center` and `scale` [k], when set, are the ensemble's member standardisation: `lookup(...,
    standardised=True)` returns (raw - center) / scale, what every aggregation rule reads.
    """

    def __init__(self, keys: list[str], members: np.ndarray, center: np.ndarray | None = None,
                 scale: np.ndarray | None = None):
        if members.ndim != 2 or members.shape[1] != len(keys):
            raise ValueError(f"members must be [k, {len(keys)}], got {members.shape}")
        if (center is None) != (scale is None) or (center is not None and
                                                  (center.shape != (members.shape[0],) or scale.shape != center.shape)):
            raise ValueError(f"center and scale must both be [k={members.shape[0]}] or both absent")
        self.members = members
        self.center, self.scale = center, scale
        self.index = {key: i for i, key in enumerate(keys)}

    @property
    def k(self) -> int:
        return self.members.shape[0]

    def standardised_by(self, center, scale) -> ScoreTable:
        """The same scores with the ensemble's member standardisation attached."""
        return ScoreTable(list(self.index), self.members, np.asarray(center, dtype=np.float64),
                          np.asarray(scale, dtype=np.float64))

    def lookup(self, prompt: Prompt, responses: Sequence[str], standardised: bool = False) -> torch.Tensor:
        """[k, len(responses)] member scores of these responses to `prompt`: raw, or standardised."""
        return self.lookup_items([(prompt, r) for r in responses], standardised)

    def lookup_items(self, items: Sequence[tuple[Prompt, str]], standardised: bool = False) -> torch.Tensor:
        """[k, len(items)] member scores of (prompt, response) items: raw, or standardised."""
        try:
            columns = [self.index[response_key(prompt, r)] for prompt, r in items]
        except KeyError:
            raise KeyError("a response to a pool's prompt was never scored; score the pools first") from None
        scores = self.members[:, columns]
        if standardised:
            if self.center is None:
                raise ValueError("this score table holds no member standardisation (center, scale)")
            scores = (scores - self.center[:, None]) / self.scale[:, None]
        return torch.from_numpy(scores).double()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        extra = {} if self.center is None else {"center": self.center, "scale": self.scale}
        np.savez(tmp, keys=np.array(list(self.index)), members=self.members, **extra)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        with np.load(path) as data:
            stats = (data["center"], data["scale"]) if "center" in data else (None, None)
            return cls([str(k) for k in data["keys"]], data["members"], *stats)


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


