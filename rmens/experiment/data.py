"""Which verdicts train and which evaluate: evaluation instructions and held-out systems are never trained on.

- Evaluation instructions: every instruction of `eval_data` (a folder of AE-format files, such as
  held-back test-split annotations, whatever the generators or the pool sizes), or, when it is not
  given, a share of the training folder's instructions held out by a hash of their text. They are
  removed from every training set, compared with surrounding whitespace stripped.
- Held-out systems (`held_out_generators`): instructions are not enough. The same ~50 systems answer every
  instruction, so a reward model trained on their outputs can score a held-out pool by recognising the
  system rather than the better answer (a text-free lookup of each system's training win rate beats every
  trained arm on such pools). So a share of the systems is held out as well: their outputs fill the
  pools and enter no training set; the other systems train and never appear in a pool.
- `split_pairs` (the training side): the remaining instructions are split again by a hash of their
  text into three disjoint shares: the proxies' verdicts, PPO's unlabelled prompts, and the gold judge's
  verdicts (the rest).
- `build_pools` (the evaluation side): one pool of held-out systems' logged outputs per evaluation
  instruction and judge set, each held-out system's prior (its mean verdict on training instructions, the
  `system_prior` baseline), MT-Bench's graded pools, and the held-out instructions PPO checkpoints answer.

The two sides are separate steps, so that changing the pools never retrains a reward model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from rmens.data.loaders import (
    AE_FILES,
    JUDGE_FILES,
    alpaca_eval_folder,
    data_root,
    judge_files,
    load_alpaca_eval_pairs,
    subsample,
)
from rmens.data.schema import DataError, PreferencePair, validate_pairs
from rmens.data.splits import unit_hash
from rmens.evaluation.pools import (
    GAMED_GENERATORS,
    Pool,
    alpaca_eval_win_rates,
    load_pools,
    read_pools,
    subsample_pools,
    write_pools,
)
from rmens.experiment.systems import held_out_families, system_family
from rmens.io import file_sha256, iter_jsonl, write_json, write_jsonl
from rmens.seeding import python_random
from rmens.steps import step

if TYPE_CHECKING:  # types only: the settings enter every step's key as values
    from rmens.experiment.config import DataSource, MtBenchConfig, PoolConfig, SplitConfig

EVAL_SALT, PROXY_SALT, SYSTEM_SALT = "rmens-eval-pools", "rmens-proxy-share", "rmens-held-out-systems"
GOLD_PAIRS, PROXY_PAIRS = "gold_pairs.jsonl", "proxy_pairs.jsonl"
PPO_PROMPTS, EVAL_PROMPTS = "ppo_prompts.json", "eval_prompts.json"
MT_BENCH_GRADES = Path("mt_bench") / "gpt4_single_grades.jsonl.gz"  # under $RMENS_DATA_DIR
MT_BENCH = "mt_bench"  # the pools step's name for MT-Bench's graded pools, beside the judge sets


def pools_file(judge: str) -> str:
    return f"pools_{judge}.jsonl"


def folders(source: DataSource) -> tuple[Path, Path, bool]:
    """(training folder, evaluation folder, whether evaluation instructions are held out by hash)."""
    train_dir = alpaca_eval_folder(source.data_dir)
    eval_dir = Path(source.eval_data) if source.eval_data else train_dir
    return train_dir, eval_dir, eval_dir.resolve() == train_dir.resolve()


def mt_bench_grades(mt_bench: MtBenchConfig) -> Path | None:
    """The MT-Bench grades file the experiment reads, or None when MT-Bench is off."""
    if not mt_bench.enabled:
        return None
    if mt_bench.grades:
        return Path(mt_bench.grades)
    root = data_root()
    return root / MT_BENCH_GRADES if root is not None else Path("$RMENS_DATA_DIR") / MT_BENCH_GRADES


def check_inputs(source: DataSource, judges: list[str], mt_bench: MtBenchConfig) -> None:
    """Fail in one line, before any work, when a data folder or one of its files is missing."""
    if source.data_dir is None and data_root() is None:
        raise FileNotFoundError("the experiment trains on AlpacaEval verdicts: set RMENS_DATA_DIR to the data folder "
                                "(with alpaca_eval/ inside) or pass --data-dir")
    train_dir, eval_dir, _ = folders(source)
    missing = [name for name in AE_FILES.values() if not (train_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"training folder {train_dir} lacks {', '.join(missing)}")
    for judge in judges:
        if not judge_files(eval_dir, judge):
            raise FileNotFoundError(f"evaluation folder {eval_dir} has no {JUDGE_FILES[judge]}*.jsonl[.gz] files "
                                    f"for judge set {judge} (pools.judges)")
    grades = mt_bench_grades(mt_bench)
    if grades is not None and not grades.is_file():
        raise FileNotFoundError(f"MT-Bench grades file not found: {grades} (pass --mt-bench-grades FILE, or "
                                "--set mt_bench.enabled=false to leave MT-Bench out)")
    if grades is not None:  # a malformed record fails here, naming file, line and field, not after training
        from rmens.evaluation.mt_bench_grades import read_grades

        read_grades(grades)


def source_fingerprints(source: DataSource, mt_bench: MtBenchConfig) -> dict[str, dict[str, str]]:
    """The content hash of every file each side reads, so that new files mean new results (and a record
    of exactly which data a run used)."""
    train_dir, eval_dir, _ = folders(source)
    evaluation = [p for judge in JUDGE_FILES for p in judge_files(eval_dir, judge)]
    training = [train_dir / name for name in AE_FILES.values()]
    grades = mt_bench_grades(mt_bench)
    return {"training": {str(p): file_sha256(p) for p in training},
            "evaluation": {str(p): file_sha256(p) for p in evaluation},
            "mt_bench": {str(grades): file_sha256(grades)} if grades is not None else {}}


def instructions_in(folder: Path) -> set[str]:
    """Every instruction (stripped) of the annotation files in `folder`."""
    found = {str(record.get("instruction", "")).strip() for judge in JUDGE_FILES
             for path in judge_files(folder, judge) for _, record in iter_jsonl(path) if isinstance(record, dict)}
    return found - {""}


def held_out(instruction: str, source: DataSource) -> bool:
    return unit_hash(instruction.strip(), f"{EVAL_SALT}-{source.seed}") < source.eval_fraction


# -- held-out systems -------------------------------------------------------------------------------

def _generators(paths: list[Path]) -> tuple[set[str], set[str]]:
    """(reference systems, other systems) named in annotation files."""
    references, others = set(), set()
    for path in paths:
        for _, record in iter_jsonl(path):
            if isinstance(record, dict):
                references.add(str(record.get("generator_1")))
                others.add(str(record.get("generator_2")))
    return references, others


def held_out_generators(source: DataSource) -> dict[str, list[str]]:
    """Per judge set, the held-out systems: whole system families (rmens.experiment.systems.held_out_families:
    in the order of a hash of the family name, salted with the data seed, until every judge set holds
    data.generator_fraction of its candidate systems). Candidates are the systems that answer in the training
    or evaluation files, except the reference systems' families (every training verdict holds a reference
    output, so they always train) and the gamed generators (never used). The same families are held out in
    both judge sets, and the rule reads nothing but names, so it can be checked by hand."""
    train_dir, eval_dir, _ = folders(source)
    by_judge = {judge: _generators([train_dir / AE_FILES[judge], *judge_files(eval_dir, judge)])
                for judge in JUDGE_FILES}
    references = {g for refs, _ in by_judge.values() for g in refs}
    systems = {judge: others - set(GAMED_GENERATORS) for judge, (_, others) in by_judge.items()}
    families = held_out_families(systems, references, source.generator_fraction, f"{SYSTEM_SALT}-{source.seed}")
    return {judge: sorted(g for g in others if system_family(g) in families)
            for judge, (_, others) in by_judge.items()}


# -- the training side ------------------------------------------------------------------------------

def split_pairs(source: DataSource, split: SplitConfig, folder: str | Path,
                sources: dict | None = None) -> dict:
    """The gold judge's and the proxies' training pairs and PPO's prompts, none from an evaluation
    instruction and none holding a held-out system's output: gold_pairs.jsonl, proxy_pairs.jsonl,
    ppo_prompts.json, split.json."""
    folder = Path(folder)
    train_dir, eval_dir, by_hash = folders(source)
    stats: Counter = Counter()
    every_pair = load_alpaca_eval_pairs(train_dir, "both", soft_labels=True, stats=stats)
    excluded = ({p.prompt.strip() for p in every_pair if held_out(p.prompt, source)} if by_hash
                else instructions_in(eval_dir))
    systems = {g for generators in held_out_generators(source).values() for g in generators}
    train_pairs = [p for p in every_pair if p.prompt.strip() not in excluded]
    stats["pairs_of_evaluation_instructions_removed"] = len(every_pair) - len(train_pairs)
    kept = [p for p in train_pairs if p.source.get("generator_2") not in systems]
    stats["pairs_of_held_out_systems_removed"] = len(train_pairs) - len(kept)
    training = sorted({p.prompt for p in kept})
    if not training:
        raise DataError(f"no training instructions left in {train_dir} once the evaluation instructions are removed")
    share = {i: _share(i.strip(), split, source.seed) for i in training}  # stripped, as the exclusion compares

    def pairs_of(role: str, subset: str) -> list[PreferencePair]:
        return [p for p in kept if share[p.prompt] == role and subset in ("both", p.source.get("subset"))]

    gold_pairs = validate_pairs(subsample(pairs_of("gold", split.gold.subset), split.gold.max_pairs, source.seed),
                                "gold judge training pairs")
    proxy_pairs = validate_pairs(subsample(pairs_of("proxy", split.proxy.subset), split.proxy.max_pairs,
                                           source.seed + 1), "proxy training pairs")
    ppo_prompts = sorted(i for i in training if share[i] == "ppo")
    if split.ppo_prompts is not None and len(ppo_prompts) > split.ppo_prompts:
        ppo_prompts = sorted(python_random(source.seed).sample(ppo_prompts, split.ppo_prompts))
    _check_disjoint(gold_pairs, proxy_pairs, ppo_prompts, excluded, systems)

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / GOLD_PAIRS, (p.to_dict() for p in gold_pairs))
    write_jsonl(folder / PROXY_PAIRS, (p.to_dict() for p in proxy_pairs))
    write_json(folder / PPO_PROMPTS, ppo_prompts)
    roles = Counter(share.values())
    summary = {"train_source": str(train_dir), "eval_source": str(eval_dir), "held_out_by_hash": by_hash,
               "evaluation_instructions": len(excluded), "training_instructions": len(training),
               "gold_instructions": roles["gold"], "proxy_instructions": roles["proxy"],
               "ppo_instructions": roles["ppo"], "gold_pairs": len(gold_pairs), "proxy_pairs": len(proxy_pairs),
               "ppo_prompts": len(ppo_prompts), "held_out_systems": len(systems),
               "evaluation_instructions_in_training": 0, "held_out_systems_in_training": 0}
    write_json(folder / "split.json", {**summary, "filtered": dict(stats), "sources": sources or {}})
    return summary


def _share(instruction: str, split: SplitConfig, seed: int) -> str:
    """Which training share an instruction belongs to, by a hash of its text: proxy, ppo or gold."""
    u = unit_hash(instruction, f"{PROXY_SALT}-{seed}")
    if u < split.proxy.fraction:
        return "proxy"
    return "ppo" if u < split.proxy.fraction + split.ppo_fraction else "gold"


def _check_disjoint(gold: list[PreferencePair], proxy: list[PreferencePair], ppo_prompts: list[str],
                    excluded: set[str], systems: set[str]) -> None:
    """Impossible by construction; checked because every result rests on it."""
    labelled = gold + proxy
    used = {p.prompt.strip() for p in labelled} | {p.strip() for p in ppo_prompts}
    if used & excluded:
        raise AssertionError(f"{len(used & excluded)} evaluation instructions are in a training set")
    if {p.source.get("generator_2") for p in labelled} & systems:
        raise AssertionError("a held-out system's output is in a training set")
    gold_set, proxy_set = {p.prompt.strip() for p in gold}, {p.prompt.strip() for p in proxy}
    if gold_set & proxy_set or (gold_set | proxy_set) & {p.strip() for p in ppo_prompts}:
        raise AssertionError("the gold, proxy and PPO shares overlap")


# -- the evaluation side ----------------------------------------------------------------------------

def training_win_rates(source: DataSource) -> dict[str, dict[str, float]]:
    """{"<judge>/<reference>": {system: mean verdict}} on the training instructions only (none of the
    evaluation ones): the text-free `system_prior` that a reward model could match by recognising systems."""
    train_dir, eval_dir, by_hash = folders(source)
    excluded = set() if by_hash else instructions_in(eval_dir)

    def training(instruction: str) -> bool:
        return not held_out(instruction, source) if by_hash else instruction.strip() not in excluded

    return alpaca_eval_win_rates(train_dir, keep=training)


def pool_system_prior(rates: dict[str, dict[str, float]], judge: str) -> dict[str, float]:
    """A judge set's prior: the win rates against its main reference (the one most systems met)."""
    tables = [table for key, table in rates.items() if key.split("/")[0] == judge]
    return max(tables, key=len) if tables else {}


def build_pools(source: DataSource, pools: PoolConfig, mt_bench: MtBenchConfig, folder: str | Path,
                sources: dict | None = None) -> dict:
    """One pool of held-out systems' logged outputs per evaluation instruction and judge set
    (pools_<judge>.jsonl), the held-out systems (held_out_generators.json), every system's training win rate
    (training_win_rates.json; system_prior_<set>.json is what the system_prior baseline reads), MT-Bench's
    graded pools (pools_mt_bench.jsonl), and the instructions PPO checkpoints answer (eval_prompts.json);
    pools.json records the counts."""
    folder = Path(folder)
    _, eval_dir, by_hash = folders(source)
    stats: Counter = Counter()
    systems = held_out_generators(source)
    chosen: dict[str, list[Pool]] = {}
    for judge in pools.judges:
        include = [g for g in systems[judge] if pools.include_generators is None or g in pools.include_generators]
        if not include:
            raise DataError(f"{judge}: no held-out system answers in {eval_dir} (data.generator_fraction="
                            f"{source.generator_fraction}, pools.include_generators={pools.include_generators})")
        found = load_pools(eval_dir, judge, include_generators=include, exclude_generators=pools.exclude_generators,
                           stats=stats)
        if by_hash:
            found = [pool for pool in found if held_out(pool.instruction, source)]
        chosen[judge] = subsample_pools(found, max_instructions=pools.max_instructions, pool_size=pools.pool_size,
                                        min_size=pools.max_n, seed=source.seed, stats=stats)
        if not chosen[judge]:
            raise DataError(f"{judge}: no evaluation pool has {pools.max_n} outputs of held-out systems (pools.max_n; "
                            f"{len(include)} systems held out, data.generator_fraction={source.generator_fraction}) "
                            f"in {eval_dir}")
    rates = training_win_rates(source)
    instructions = sorted({pool.instruction for judge_pools in chosen.values() for pool in judge_pools})
    eval_prompts = sorted(python_random(source.seed + 2).sample(instructions, min(pools.eval_prompts,
                                                                                 len(instructions))))
    folder.mkdir(parents=True, exist_ok=True)
    for judge, judge_pools in chosen.items():
        write_pools(folder / pools_file(judge), judge_pools)
    write_json(folder / "held_out_generators.json", {judge: systems[judge] for judge in pools.judges})
    write_json(folder / "training_win_rates.json", rates)
    for judge in pools.judges:
        write_json(folder / f"system_prior_{judge}.json", pool_system_prior(rates, judge))
    write_json(folder / EVAL_PROMPTS, eval_prompts)
    summary = {"eval_source": str(eval_dir), "eval_prompts": len(eval_prompts),
               **{f"pools_{judge}": len(p) for judge, p in chosen.items()},
               **{f"pool_outputs_{judge}": sum(map(len, p)) for judge, p in chosen.items()},
               **{f"held_out_systems_{judge}": len(systems[judge]) for judge in pools.judges},
               **build_mt_bench_pools(mt_bench, folder, rates)}
    write_json(folder / "pools.json", {**summary, "filtered": dict(stats), "sources": sources or {}})
    return summary


def build_mt_bench_pools(mt_bench: MtBenchConfig, folder: Path, rates: dict[str, dict[str, float]]) -> dict:
    """MT-Bench's graded pools (every system of the grades file) and each system's AlpacaEval prior."""
    from rmens.evaluation import mt_bench_grades as mg

    grades = mt_bench_grades(mt_bench)
    if grades is None:
        return {}
    stats: Counter = Counter()
    graded = mg.load_graded_pools(grades, max_questions=mt_bench.max_questions, min_size=mt_bench.max_n,
                                  stats=stats)
    if not graded:
        raise DataError(f"{grades}: no question-turn pool has {mt_bench.max_n} graded answers (mt_bench.max_n)")
    mg.write_graded_pools(folder / pools_file(MT_BENCH), graded)
    models = sorted({m for pool in graded for m in pool.models})
    prior = mg.system_prior_from_alpaca_eval(rates, models)
    write_json(folder / "system_prior_mt_bench.json", prior)
    return {"pools_mt_bench": len(graded), "mt_bench_systems": len(models), "mt_bench_systems_with_prior": len(prior),
            "mt_bench_dropped": dict(stats)}


@step("pairs", files={"gold_pairs": GOLD_PAIRS, "proxy_pairs": PROXY_PAIRS, "ppo_prompts": PPO_PROMPTS})
def pairs_step(folder: Path, *, source: DataSource, split: SplitConfig, sources: dict) -> dict:
    """The experiment's step for the training side (split_pairs)."""
    return split_pairs(source, split, folder, sources)


@step("pools", files={"eval_prompts": EVAL_PROMPTS})
def pools_step(folder: Path, *, source: DataSource, pools: PoolConfig, mt_bench: MtBenchConfig, sources: dict) -> dict:
    """The experiment's step for the evaluation side (build_pools)."""
    return build_pools(source, pools, mt_bench, folder, sources)


def read_split_pools(folder: str | Path, judge: str) -> list[Pool]:
    return read_pools(Path(folder) / pools_file(judge))


def read_prompts(path: str | Path) -> list[str]:
    """The pairs step's "ppo_prompts" or the pools step's "eval_prompts" (their `Output.file`)."""
    return json.loads(Path(path).read_text())
