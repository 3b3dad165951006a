"""Best-of-n: draw N samples per prompt once, score them with any scorers, and estimate for every n <= N
what selecting the proxy's best of n yields.

Samples and every scorer's scores are stored as JSONL in one folder, so rescoring with another
ensemble or rule never regenerates:

    <folder>/samples.jsonl           prompt_id, sample_id, prompt, response, n_tokens, finished
    <folder>/scores/<scorer>.jsonl   prompt_id, sample_id, score[, members]

The estimate for n uses all N samples (Nakano et al. 2021, App. I; Coste et al. 2023, App. B): with
the samples of a prompt sorted by proxy score, the i-th smallest (1-based) is the best of a random
n-subset with probability C(i-1, n-1) / C(N, n), so the expected score of the selected sample is the
weighted sum of the samples' scores; tied proxy scores share their probability evenly.
KL(best-of-n || policy) is taken as log n - (n-1)/n, which is an upper bound (Beirami et al. 2024).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from rmens.bon_config import BonConfig
from rmens.generation import Sampler
from rmens.io import read_jsonl, write_jsonl
from rmens.reward import RewardFn


def kl_bon(n: int) -> float:
    """KL(best of n independent draws || one draw) for a continuous reward: log n - (n-1)/n."""
    return math.log(n) - (n - 1) / n


def kl_from_uniform(probs: torch.Tensor) -> float:
    """KL(p || uniform) of a pick distribution `probs` [m] over a pool of m outputs, exactly:
    log m + sum p log p (0 log 0 = 0). For a pick among a random n-subset of logged outputs (drawn
    without replacement) this is the KL that kl_bon's formula only approximates: at m = n = 16 the
    pick is the top output, log 16 = 2.773, against kl_bon(16) = 1.835."""
    probs = probs.double()
    positive = probs[probs > 0]
    return max(0.0, float(math.log(len(probs)) + (positive * positive.log()).sum()))  # >= 0; rounding aside


def bon_ns(n_samples: int) -> list[int]:
    """1, 2, 4, ... up to N (N itself included)."""
    ns, n = [], 1
    while n < n_samples:
        ns.append(n)
        n *= 2
    return ns + [n_samples]


@functools.lru_cache(maxsize=256)
def selection_weights(n_samples: int, n: int) -> torch.Tensor:
    """P(the i-th smallest of N is the maximum of a uniformly random n-subset), i = 1..N (do not modify)."""
    if not 1 <= n <= n_samples:
        raise ValueError(f"n must be in [1, N={n_samples}], got {n}")
    total = math.comb(n_samples, n)
    return torch.tensor([math.comb(i - 1, n - 1) / total for i in range(1, n_samples + 1)], dtype=torch.float64)


def selection_probabilities(scores: torch.Tensor, n: int) -> torch.Tensor:
    """P(each of the N samples is the one the proxy picks from a uniformly random n-subset): [N] -> [N].

    Samples with equal scores split their block's probability evenly (the pick among tied maxima is
    uniformly random), so a constant score gives every sample 1/N whatever n is.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be one-dimensional [N], got shape {tuple(scores.shape)}")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite proxy score at sample(s) {bad}")
    order = torch.argsort(scores.double(), stable=True)
    by_rank = selection_weights(len(scores), n)
    _, block, counts = torch.unique_consecutive(scores.double()[order], return_inverse=True, return_counts=True)
    block_mass = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, block, by_rank)
    probs = torch.empty(len(scores), dtype=torch.float64)
    probs[order] = (block_mass / counts)[block]
    return probs


def expected_best_of_n(proxy: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """Per prompt, the expected `target` score of the sample the proxy picks from n: [P, N] -> [P]."""
    if proxy.shape != target.shape or proxy.dim() != 2:
        raise ValueError(f"proxy {tuple(proxy.shape)} and target {tuple(target.shape)} must both be [prompts, N]")
    _require_finite(target, "target")
    probs = torch.stack([selection_probabilities(row, n) for row in proxy])
    return (probs * target.double()).sum(dim=1)


def _require_finite(scores: torch.Tensor, what: str) -> None:
    """A NaN would be picked as the best sample (argmax) or poison every mean: name the first one instead."""
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        prompt, sample = bad[0].tolist()
        raise ValueError(f"non-finite {what} score for prompt {prompt}, sample {sample}")


def bon_curve(proxy: torch.Tensor, targets: dict[str, torch.Tensor], ns: list[int] | None = None) -> list[dict]:
    """For each n: KL_bon and, per target scorer, the mean over prompts and its standard error."""
    ns = ns or bon_ns(proxy.shape[1])
    _require_finite(proxy, "proxy")
    rows = []
    for n in ns:
        row: dict = {"n": n, "kl_bon": kl_bon(n), "sqrt_kl": math.sqrt(kl_bon(n))}
        for name, target in {"proxy": proxy, **targets}.items():
            per_prompt = expected_best_of_n(proxy, target, n)
            row[name] = float(per_prompt.mean())
            row[f"{name}_se"] = float(per_prompt.std(unbiased=True) / math.sqrt(len(per_prompt))) \
                if len(per_prompt) > 1 else 0.0
        rows.append(row)
    return rows


def draw_samples(sampler: Sampler, prompts: list[str], cfg: BonConfig, folder: str | Path,
                 progress: bool = True) -> list[dict]:
    """Generate N samples per prompt (rmens.generation.open_sampler) and store them in `folder`/samples.jsonl."""
    n = cfg.n_samples
    repeated = [p for p in prompts for _ in range(n)]
    samples = sampler(repeated, cfg.generation, progress=progress)
    rows = [{"prompt_id": i // n, "sample_id": i % n, "prompt": samples.prompts[i], "response": samples.texts[i],
             "n_tokens": len(samples.response_ids[i]), "finished": samples.finished[i]} for i in range(len(samples))]
    write_jsonl(Path(folder) / "samples.jsonl", rows)
    return rows


def score_samples(folder: str | Path, scorers: dict[str, RewardFn], batch_size: int = 64,
                  scores_dir: str | Path | None = None) -> dict[str, Path]:
    """Score the stored samples with each scorer (skipping scorers already stored) -> score files.

    Scores go to `folder`/scores unless `scores_dir` names another folder (the pipeline keeps each
    scorer's scores in an artifact of its own).
    """
    folder = Path(folder)
    samples = read_jsonl(folder / "samples.jsonl")
    scores_dir = Path(scores_dir) if scores_dir is not None else folder / "scores"
    out = {}
    for name, scorer in scorers.items():
        path = scores_dir / f"{name}.jsonl"
        out[name] = path
        if path.is_file():
            continue
        rows = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start: start + batch_size]
            rewards = scorer([s["prompt"] for s in chunk], [s["response"] for s in chunk])
            rewards.check(len(chunk), f"scorer {name!r}, samples {start}..{start + len(chunk) - 1}")
            for j, sample in enumerate(chunk):
                row = {"prompt_id": sample["prompt_id"], "sample_id": sample["sample_id"],
                       "score": float(rewards.scores[j])}
                if rewards.members is not None:
                    row["members"] = [float(v) for v in rewards.members[:, j]]
                rows.append(row)
        write_jsonl(path, rows)
    return out


def load_score_matrix(folder: str | Path, name: str, member: int | None = None) -> torch.Tensor:
    """Scores of one scorer (or one of its members) as a [prompts, N] tensor, from `folder`/scores."""
    return score_matrix(read_jsonl(Path(folder) / "scores" / f"{name}.jsonl"), member)


def load_member_scores(path: str | Path) -> torch.Tensor:
    """All member scores of one scorer's file as [k, prompts, N] (for re-aggregation with any rule)."""
    rows = read_jsonl(Path(path))
    if "members" not in rows[0]:
        return score_matrix(rows).unsqueeze(0)
    return torch.stack([score_matrix(rows, m) for m in range(len(rows[0]["members"]))])


def score_matrix(rows: list[dict], member: int | None = None) -> torch.Tensor:
    """Score rows {prompt_id, sample_id, score[, members]} -> [prompts, N]."""
    n_prompts = 1 + max(r["prompt_id"] for r in rows)
    n_samples = 1 + max(r["sample_id"] for r in rows)
    matrix = torch.full((n_prompts, n_samples), float("nan"), dtype=torch.float64)
    for r in rows:
        matrix[r["prompt_id"], r["sample_id"]] = r["score"] if member is None else r["members"][member]
    if torch.isnan(matrix).any():
        raise ValueError("the scores do not cover every (prompt, sample)")
    return matrix


def select_best(folder: str | Path, proxy: str, n: int, scores: torch.Tensor | None = None) -> list[dict]:
    """Per prompt, the response the proxy picks among the first n samples (scores: [prompts, N],
    default the stored scores of `proxy`)."""
    folder = Path(folder)
    samples = read_jsonl(folder / "samples.jsonl")
    scores = load_score_matrix(folder, proxy) if scores is None else scores
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n must be in [1, {scores.shape[1]}], got {n}")
    _require_finite(scores[:, :n], "proxy")
    by_key = {(s["prompt_id"], s["sample_id"]): s for s in samples}
    picks = torch.argmax(scores[:, :n], dim=1).tolist()
    return [{**by_key[(p, s)], "proxy": proxy, "n": n, "proxy_score": float(scores[p, s])} for p, s in enumerate(picks)]


def write_selection(folder: str | Path, proxy: str, n: int) -> Path:
    path = Path(folder) / "selected" / f"{proxy}_n{n}.jsonl"
    write_jsonl(path, select_best(folder, proxy, n))
    return path
