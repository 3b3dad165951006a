"""MT-Bench's released GPT-4 grades as Best-of-n pools: reward-model agreement with GPT-4 and logged
Best-of-n, with no generation and no API call.

FastChat released, for every MT-Bench question, the answers of many systems and GPT-4's single-answer
grade of each (1-10, a few halves; -1 where GPT-4 gave no parsable grade), for the first turn and for
the second turn, where each system answered the follow-up after its own first answer. The answers of
one question and turn form a pool of about 18 graded outputs, like a policy's samples for one prompt:
a reward model picks the best of a random n-subset, the chance that each answer is the pick is exact
(rmens.bon.selection_probabilities), and the expected GPT-4 grade of the pick, averaged over pools, is
the MT-Bench score of a Best-of-n system under the real judge. A pool is one question AND turn because
only answers to the same request compete: a second-turn answer is judged on the follow-up.

Every answer carries its own prompt. In the second turn the conversation so far is [question 1, the
system's own first answer, question 2], which differs from system to system, and a reward model scores
(prompt, response): scoring a second-turn answer under another system's first answer would be wrong.

The `system_prior` baseline: the same systems (or close relatives) appear among AlpacaEval's generators,
so a reward model trained on AlpacaEval verdicts can score these pools by recognising which system wrote
an answer (its style, its length, its refusals) rather than by judging the answer. system_prior scores
every answer by its system's standardised AlpacaEval win rate alone, and so measures how far recognising
systems gets; a reward model that does no better than it has not shown that it judges answers.

Written by hand because no maintained library computes Best-of-n from logged, graded answers (FastChat
computes leaderboard means; alpaca_eval reads its own annotation format, rmens.evaluation.pools).
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rmens.bon import kl_from_uniform, selection_probabilities
from rmens.data.schema import DataError
from rmens.data.splits import unit_hash
from rmens.evaluation.logged_bon import standard_error
from rmens.evaluation.pools import ScoreTable, char_lengths, response_key
from rmens.evaluation.rm_metrics import length_metrics, pairwise_accuracy
from rmens.io import iter_jsonl, write_jsonl

if TYPE_CHECKING:  # rmens.data.encoding imports transformers, which reading grades does not need
    from rmens.data.encoding import Prompt

DEFAULT_NS = (1, 2, 4, 8, 16)
FAILED_GRADE = -1  # FastChat writes -1 when GPT-4's reply held no "[[rating]]"
GRADE_RANGE = (1.0, 10.0)
TURNS = (1, 2)


@dataclass(frozen=True)
class GradedPool:
    """The graded answers of one MT-Bench question and turn, one entry per system (models sorted).

    `prompts[i]` is what `answers[i]` answered: the question text in turn 1 (the same for every system),
    in turn 2 the conversation [user q1, assistant: that system's own first answer, user q2].
    """

    question_id: int | str
    turn: int
    category: str
    question: str  # this turn's question text (for display; prompts hold what each system saw)
    prompts: tuple[Prompt, ...]
    models: tuple[str, ...]
    answers: tuple[str, ...]
    grades: tuple[float, ...]

    def __post_init__(self):
        sizes = {len(self.prompts), len(self.models), len(self.answers), len(self.grades)}
        if len(sizes) != 1:
            raise ValueError(f"question {self.question_id} turn {self.turn}: prompts, models, answers and grades "
                             f"differ in length ({len(self.prompts)}, {len(self.models)}, {len(self.answers)}, "
                             f"{len(self.grades)})")

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def key(self) -> tuple[int | str, int]:
        return self.question_id, self.turn

    @functools.cached_property  # read for every n and every reward model: built once per pool
    def lengths(self) -> torch.Tensor:
        """Answer lengths in characters."""
        return char_lengths(self.answers)

    @functools.cached_property
    def grade_tensor(self) -> torch.Tensor:
        return torch.tensor(self.grades, dtype=torch.float64)


# -- reading and validating the released grades ---------------------------------------------------

def _text(record: dict, name: str, where: str, allow_empty: bool) -> str:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{where}: field {name!r} must be a {'' if allow_empty else 'non-empty '}string, "
                        f"got {value!r:.60}")
    return value


def _question_id(record: dict, where: str) -> int | str:
    if "question_id" not in record:
        raise DataError(f"{where}: missing field 'question_id'")
    value = record["question_id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field 'question_id' must be an integer or a non-empty string, got {value!r:.60}")
    return value


def _turn(record: dict, where: str) -> int:
    if "turn" not in record:
        raise DataError(f"{where}: missing field 'turn'")
    value = record["turn"]
    if isinstance(value, bool) or value not in TURNS:
        raise DataError(f"{where}: field 'turn' must be 1 or 2, got {value!r:.60}")
    return int(value)


def _score(record: dict, where: str) -> float:
    """The grade, or FAILED_GRADE; anything else outside [1, 10] is an error."""
    if "score" not in record:
        raise DataError(f"{where}: missing field 'score'")
    value = record["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field 'score' must be a finite number, got {value!r:.60}")
    if value != FAILED_GRADE and not GRADE_RANGE[0] <= value <= GRADE_RANGE[1]:
        raise DataError(f"{where}: field 'score' must lie in [1, 10] (or be -1, a failed grade), got {value}")
    return float(value)


def read_grade(record: Any, where: str) -> dict:
    """One released grade record, validated: the first bad field is a DataError naming `where` and it."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a grade object, got {type(record).__name__}")
    turn = _turn(record, where)
    out = {"question_id": _question_id(record, where), "turn": turn,
           "model": _text(record, "model", where, allow_empty=False),
           "score": _score(record, where),
           "category": _text(record, "category", where, allow_empty=False),
           "question_1": _text(record, "question_1", where, allow_empty=False),
           # An empty answer is a real (and badly graded) output: two released answers are empty.
           "answer_1": _text(record, "answer_1", where, allow_empty=True)}
    if turn == 2:
        out["question_2"] = _text(record, "question_2", where, allow_empty=False)
        out["answer_2"] = _text(record, "answer_2", where, allow_empty=True)
    return out


def prompt_and_answer(grade: dict) -> tuple[Prompt, str]:
    """What the system saw and what it answered: turn 2's prompt holds the system's own first answer."""
    if grade["turn"] == 1:
        return grade["question_1"], grade["answer_1"]
    conversation = [{"role": "user", "content": grade["question_1"]},
                    {"role": "assistant", "content": grade["answer_1"]},
                    {"role": "user", "content": grade["question_2"]}]
    return conversation, grade["answer_2"]


def read_grades(path: str | Path, stats: Counter | None = None) -> dict[tuple, dict[str, dict]]:
    """{(question_id, turn): {model: grade}} from a .jsonl or .jsonl.gz file; failed grades (-1) are
    left out and counted as `failed_grade`.

    A repeated (question, turn, model) that is identical to the first (same answer, same grade, as when
    files are concatenated twice) is counted as `duplicate`; one that differs is an error, because keeping
    either grade (or their mean) would silently change that pool's expected grade.
    """
    stats = stats if stats is not None else Counter()
    grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
    first_line: dict[tuple, int] = {}
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        grade = read_grade(record, where)
        if grade["score"] == FAILED_GRADE:
            stats["failed_grade"] += 1
            continue
        key = (grade["question_id"], grade["turn"])
        pool = grouped[key]
        _check_same_question(pool, grade, where)
        seen = pool.get(grade["model"])
        if seen is None:
            pool[grade["model"]] = grade
            first_line[(*key, grade["model"])] = lineno
            stats["kept"] += 1
        elif seen == grade:
            stats["duplicate"] += 1
        else:
            raise DataError(f"{where}: field 'model': {grade['model']!r} is graded again for question "
                            f"{key[0]} turn {key[1]} with a different answer or score (first at line "
                            f"{first_line[(*key, grade['model'])]})")
    return dict(grouped)


def _check_same_question(pool: dict[str, dict], grade: dict, where: str) -> None:
    """Every answer of a pool must answer the same question: a mismatch means mixed-up question ids."""
    if not pool:
        return
    other = next(iter(pool.values()))
    for name in ("category", "question_1", "question_2"):
        if other.get(name) != grade.get(name):
            raise DataError(f"{where}: field {name!r} differs from the other answers to question "
                            f"{grade['question_id']} turn {grade['turn']}: {grade.get(name)!r:.60}")


def _id_order(question_id: int | str) -> tuple[int, int | str]:
    """Sort key: integer ids numerically, string ids after them (a file may use either)."""
    return (0, question_id) if isinstance(question_id, int) else (1, question_id)


def select_questions(question_ids: Iterable[int | str], max_questions: int | None, seed: int = 0) -> set:
    """At most `max_questions` ids, chosen by a hash of each id: the choice does not depend on file order,
    and adding questions never swaps out an old one for another old one."""
    ids = sorted(set(question_ids), key=lambda q: unit_hash(str(q), f"mt-bench-{seed}"))
    return set(ids if max_questions is None else ids[:max_questions])


def load_graded_pools(path: str | Path, *, questions: Iterable[int | str] | None = None,
                      max_questions: int | None = None, min_size: int = 2, seed: int = 0,
                      stats: Counter | None = None) -> list[GradedPool]:
    """One GradedPool per (question, turn) of a released grades file, sorted by (question_id, turn).

    Kept: questions in `questions` when given; pools of at least `min_size` answers (smaller ones are
    counted as `pools_too_small`); then at most `max_questions` questions by select_questions. Each pool
    lists its systems in sorted order. `stats` counts kept, failed_grade, duplicate and pools_too_small.
    """
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"max_questions must be at least 1, got {max_questions}")
    stats = stats if stats is not None else Counter()
    grouped = read_grades(path, stats)
    wanted = set(questions) if questions is not None else None
    big = {}
    for key, by_model in grouped.items():
        if wanted is not None and key[0] not in wanted:
            continue
        if len(by_model) < min_size:
            stats["pools_too_small"] += 1
            continue
        big[key] = by_model
    chosen = select_questions((q for q, _ in big), max_questions, seed)
    pools = [_pool(key, big[key]) for key in big if key[0] in chosen]
    if not pools:
        raise DataError(f"{path}: no pools left after filtering ({dict(stats)})")
    return sorted(pools, key=lambda p: (_id_order(p.question_id), p.turn))


def _pool(key: tuple, by_model: dict[str, dict]) -> GradedPool:
    rows = [by_model[m] for m in sorted(by_model)]
    pairs = [prompt_and_answer(r) for r in rows]
    return GradedPool(question_id=key[0], turn=key[1], category=rows[0]["category"],
                      question=rows[0][f"question_{key[1]}"], prompts=tuple(p for p, _ in pairs),
                      models=tuple(r["model"] for r in rows), answers=tuple(a for _, a in pairs),
                      grades=tuple(r["score"] for r in rows))


def write_graded_pools(path: str | Path, pools: Sequence[GradedPool]) -> Path:
    return write_jsonl(path, (asdict(p) for p in pools))


def read_graded_pools(path: str | Path) -> list[GradedPool]:
    """Pools written by write_graded_pools (conversations come back as lists of messages)."""
    pools = []
    for lineno, record in iter_jsonl(path):
        try:
            pools.append(GradedPool(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in record.items()}))
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}:{lineno}: not a graded pool ({err})") from None
    return pools


_TUPLE_FIELDS = ("prompts", "models", "answers", "grades")


# -- scoring --------------------------------------------------------------------------------------

def pool_items(pools: Sequence[GradedPool]) -> list[tuple[Prompt, str]]:
    """Every distinct (prompt, answer) of the pools, in pool order: what a reward model must score."""
    seen: dict[str, tuple[Prompt, str]] = {}
    for pool in pools:
        for prompt, answer in zip(pool.prompts, pool.answers):
            seen.setdefault(response_key(prompt, answer), (prompt, answer))
    return list(seen.values())


def pool_rewards(pools: Sequence[GradedPool], table: ScoreTable, standardised: bool = False) -> list[torch.Tensor]:
    """Per pool, the member scores [k, m] of its answers, each under its own prompt: raw, or standardised."""
    out = []
    for pool in pools:
        try:
            out.append(table.lookup_items(list(zip(pool.prompts, pool.answers)), standardised))
        except KeyError:
            raise KeyError(f"an answer to question {pool.question_id} turn {pool.turn} was never scored; "
                           f"score pool_items(pools) first") from None
    return out


# -- agreement with GPT-4's grades ----------------------------------------------------------------

def grade_pairs(pools: Sequence[GradedPool]) -> list[tuple[int, int, int]]:
    """(pool index, i, j) for every two answers of a pool with different grades, i the higher-graded.
    Equal grades are left out: GPT-4 expressed no preference between them."""
    pairs = []
    for p, pool in enumerate(pools):
        g = pool.grades
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] != g[j]:
                    pairs.append((p, i, j) if g[i] > g[j] else (p, j, i))
    return pairs


def _check_rewards(pools: Sequence[GradedPool], rewards: Sequence[torch.Tensor]) -> None:
    if len(pools) != len(rewards):
        raise ValueError(f"{len(pools)} pools but {len(rewards)} reward tensors")
    for p, (pool, r) in enumerate(zip(pools, rewards)):
        if r.shape[-1] != len(pool) or r.dim() not in (1, 2):
            raise ValueError(f"pool {p} (question {pool.question_id} turn {pool.turn}) has {len(pool)} answers "
                             f"but rewards of shape {tuple(r.shape)}; expected [{len(pool)}] or [k, {len(pool)}]")


def agreement(pools: Sequence[GradedPool], rewards: Sequence[torch.Tensor]) -> dict:
    """How often the rewards order two differently graded answers as GPT-4 did.

    `rewards` per pool: [m], or [k, m] member rewards (the ensemble reward is the member mean). A tied
    reward counts one half. Returned: accuracy, n_pairs, the length view of rm_metrics.length_metrics
    (accuracy where the longer answer had the lower grade, and "the longer answer wins" on all pairs),
    member_accuracy for [k, m] input, and per_pool accuracies over the pools that hold a pair
    (pool_indices), for paired comparisons of two reward models on the same pools.
    """
    _check_rewards(pools, rewards)
    pairs = grade_pairs(pools)
    if not pairs:
        raise ValueError("the pools hold no two answers with different grades")
    members = [r.double() if r.dim() == 2 else r.double().unsqueeze(0) for r in rewards]
    pool_of = torch.tensor([p for p, _, _ in pairs])
    margins = torch.stack([members[p][:, i] - members[p][:, j] for p, i, j in pairs], dim=1)  # [k, pairs]
    ensemble = margins.mean(dim=0)
    len_hi = torch.tensor([pools[p].lengths[i] for p, i, _ in pairs], dtype=torch.float64)
    len_lo = torch.tensor([pools[p].lengths[j] for p, _, j in pairs], dtype=torch.float64)
    indices = sorted(set(pool_of.tolist()))
    out = {"accuracy": pairwise_accuracy(ensemble), "n_pairs": len(pairs),
           **length_metrics(ensemble, len_hi, len_lo),
           "pool_indices": indices,
           "per_pool": [pairwise_accuracy(ensemble[pool_of == p]) for p in indices]}
    if margins.shape[0] > 1:
        out["member_accuracy"] = [pairwise_accuracy(m) for m in margins]
    return out


# -- Best-of-n over each question-turn pool -------------------------------------------------------

def capped_ns(pools: Sequence[GradedPool], ns: Sequence[int] = DEFAULT_NS) -> list[int]:
    """The ns, each capped at the smallest pool's size (Best-of-n needs n answers in every pool): with a
    pool of 17, ns up to 16 are untouched; with a pool of 5, 8 and 16 both become 5 (listed once)."""
    if not pools:
        raise ValueError("no pools")
    if any(n < 1 for n in ns):
        raise ValueError(f"every n must be at least 1, got {list(ns)}")
    smallest = min(len(p) for p in pools)
    return sorted({min(n, smallest) for n in ns})


def bon_rows(pools: Sequence[GradedPool], rewards: Sequence[torch.Tensor], ns: Sequence[int] = DEFAULT_NS,
             with_values: bool = False) -> list[dict]:
    """Rows {n, kl_bon, mean_grade, se, mean_length} of Best-of-n picking by `rewards` (per pool [m]).

    For each pool the pick's distribution is selection_probabilities(rewards, n), exact over every
    n-subset with tied rewards splitting their chance; mean_grade and mean_length (characters) are the
    pick's expected grade and length averaged over pools, se the standard error over pools, and kl_bon
    the mean over pools of the pick distribution's exact KL from uniform (rmens.bon.kl_from_uniform; at
    n = m with distinct rewards it is log m, where the formula log n - (n-1)/n would say less). ns are
    capped at the smallest pool size (capped_ns). `with_values` adds each row's per-pool expected
    grades (`values`), for paired comparisons.
    """
    _check_rewards(pools, rewards)
    if any(r.dim() != 1 for r in rewards):
        raise ValueError("bon_rows needs one reward per answer ([m] per pool): aggregate the members first")
    rows = []
    for n in capped_ns(pools, ns):
        grades, lengths, kls = [], [], []
        for pool, r in zip(pools, rewards):
            probs = selection_probabilities(r, n)
            grades.append(float(probs @ pool.grade_tensor))
            lengths.append(float(probs @ pool.lengths))
            kls.append(kl_from_uniform(probs))
        values = torch.tensor(grades, dtype=torch.float64)
        rows.append({"n": n, "kl_bon": sum(kls) / len(kls), "mean_grade": float(values.mean()),
                     "se": standard_error(values), "mean_length": sum(lengths) / len(lengths),
                     **({"values": grades} if with_values else {})})
    return rows


def baseline_rewards(pools: Sequence[GradedPool], system_prior: Mapping[str, float] | None = None
                     ) -> dict[str, list[torch.Tensor]]:
    """Reward vectors [m] per pool for the reference pickers.

    random: a constant (every answer equally likely at every n); longest / shortest: the length in
    characters; best: the grade itself (the oracle: the best grade among the n drawn); system_prior
    (when given): each answer scored by its system's prior, systems without one scored the mean of the
    known priors, so that they tie among themselves rather than rank first or last.
    """
    out = {"random": [torch.zeros(len(p), dtype=torch.float64) for p in pools],
           "longest": [p.lengths for p in pools],
           "shortest": [-p.lengths for p in pools],
           "best": [p.grade_tensor for p in pools]}
    if system_prior is not None:
        fallback = sum(system_prior.values()) / len(system_prior) if system_prior else 0.0
        out["system_prior"] = [torch.tensor([float(system_prior.get(m, fallback)) for m in p.models],
                                            dtype=torch.float64) for p in pools]
    return out


# -- the system prior from AlpacaEval -------------------------------------------------------------

# MT-Bench system -> the AlpacaEval generators that are the same system (same weights or the same API
# model version), checked against alpaca_eval's models_configs. Only identities: a relative (another
# size, version or fine-tune) would lend its win rate to a system it is not.
MT_BENCH_TO_ALPACA_EVAL: dict[str, tuple[str, ...]] = {
    # AE1's "gpt4" called the "gpt-4" API in spring 2023, which was gpt-4-0314, like MT-Bench's answers.
    # (gpt4_1106_preview and gpt4_0613_concise are later models; gpt4_0613 is only a reference in AE2.)
    "gpt-4": ("gpt4", "gpt4_0314"),
    "gpt-3.5-turbo": ("gpt-3.5-turbo-0301",),  # not -1106, a later model
    "claude-v1": ("claude",),  # alpaca_eval's "claude" config calls model "claude-v1"
    "vicuna-33b-v1.3": ("vicuna-33b-v1.3",),
    "falcon-40b-instruct": ("falcon-40b-instruct",),
    # alpaca_eval's oasst-sft-pythia-12b is OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5, FastChat's too.
    "oasst-sft-4-pythia-12b": ("oasst-sft-pythia-12b",),
    # Left unmapped, no generator is the same system:
    # claude-instant-v1: AE2 has claude-instant-1.2, a later version (v1 was 1.0/1.1 in mid 2023).
    # vicuna-13b-v1.3: AlpacaEval's "vicuna-13b" is the v1.1 delta; -v1.5 is Llama-2 based.
    # wizardlm-30b: only wizardlm-13b (another size). guanaco-33b: only guanaco-65b (another size).
    # tulu-30b: only tulu-2-dpo-* (Tulu 2 on Llama 2). alpaca-13b: only alpaca-7b (another size).
    # chatglm-6b: only chatglm2-6b (the next version). mpt-30b-chat, koala-13b, dolly-v2-12b,
    # stablelm-tuned-alpha-7b, llama-13b: absent.
}


def alpaca_eval_matches(win_rates: Mapping[str, Mapping[str, float]], models: Iterable[str]
                        ) -> dict[str, list[tuple[str, str]]]:
    """{model: [(judge set, generator), ...]} for the models whose mapped generators have a win rate;
    models without any are absent (the report's "matched k of m")."""
    out = {}
    for model in models:
        found = [(judge, g) for judge, rates in win_rates.items()
                 for g in MT_BENCH_TO_ALPACA_EVAL.get(model, ()) if g in rates]
        if found:
            out[model] = found
    return out


def standardise(rates: Mapping[str, float], what: str) -> dict[str, float]:
    """z-scores of the generators' mean verdicts across one judge set (population standard deviation)."""
    values = [float(v) for v in rates.values()]
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: need at least two finite win rates to standardise, got {dict(rates)}")
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if sd == 0:
        raise ValueError(f"{what}: every generator has the same win rate ({mean}); nothing to standardise")
    return {g: (float(v) - mean) / sd for g, v in rates.items()}


def system_prior_from_alpaca_eval(win_rates: Mapping[str, Mapping[str, float]], models: Iterable[str]
                                  ) -> dict[str, float]:
    """{model: prior} for the MT-Bench models with a same-system AlpacaEval generator.

    `win_rates` is {judge set: {generator: mean verdict on the training instructions}}, every verdict
    of a judge set against the same reference (rmens.evaluation.pools.alpaca_eval_win_rates builds it so).
    Each judge set is z-scored across its own generators first, because the base rates differ (AE1 compares with
    text-davinci-003, AE2 with GPT-4-turbo, so the same system wins far more often in AE1); a model's
    prior is then the mean z-score of its matched (judge set, generator) entries. Unmatched models are
    absent: baseline_rewards gives them the mean prior.
    """
    models = list(models)
    z = {judge: standardise(rates, f"judge set {judge!r}") for judge, rates in win_rates.items()
         if any(g in rates for m in models for g in MT_BENCH_TO_ALPACA_EVAL.get(m, ()))}
    return {model: sum(z[judge][g] for judge, g in found) / len(found)
            for model, found in alpaca_eval_matches(win_rates, models).items()}
