"""Overoptimisation curves: gold and proxy scores against d = sqrt(KL), with Gao et al.'s fits.

    Best-of-n: R(d) = d (alpha - beta d)          (peak at d* = alpha / (2 beta))
    RL:        R(d) = d (alpha - beta log d)      (peak at d* = exp(alpha / beta - 1))

Scores are taken relative to the initial policy (n = 1, or the PPO run's first evaluation), as in Gao
et al., so every curve starts at the origin. Both forms are linear in (alpha, beta), so the fits are
ordinary least squares without intercept.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from rmens.io import write_json


def fit(kind: str, d: list[float], r: list[float]) -> dict:
    """Least-squares (alpha, beta) for kind 'bon' or 'rl' on points with d > 0."""
    points = [(x, y) for x, y in zip(d, r) if x > 0 and math.isfinite(y)]
    if len(points) < 2:
        return {"alpha": math.nan, "beta": math.nan, "d_peak": math.nan, "points": len(points)}
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    second = x * x if kind == "bon" else x * np.log(x)
    design = np.stack([x, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    if kind == "bon":
        peak = alpha / (2 * beta) if beta > 0 else math.inf
    else:
        peak = math.exp(alpha / beta - 1) if beta > 0 else math.inf
    return {"alpha": float(alpha), "beta": float(beta), "d_peak": float(peak), "points": len(points)}


def fitted(kind: str, params: dict, d: np.ndarray) -> np.ndarray:
    second = d * d if kind == "bon" else d * np.log(np.maximum(d, 1e-12))
    return params["alpha"] * d - params["beta"] * second


def relative_curves(kind: str, d: list[float], rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """{key: {d, score relative to the first row, absolute score, fit}} for rows ordered by d."""
    out = {}
    for key in keys:
        absolute = [r[key] for r in rows]
        rel = [value - absolute[0] for value in absolute]
        out[key] = {"d": d, "score": rel, "absolute": absolute, "fit": fit(kind, d, rel)}
    return out


def curve_from_bon(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """Best-of-n rows (rmens.bon.bon_curve) -> curves relative to n = 1, with the Best-of-n fit."""
    return relative_curves("bon", [r["sqrt_kl"] for r in rows], rows, keys)


def curve_from_points(points: list[dict], keys: list[str]) -> dict[str, dict]:
    """PPO evaluations [{kl, <key>...}] in training order -> curves relative to the first, with the RL fit."""
    return relative_curves("rl", [math.sqrt(max(p["kl"], 0.0)) for p in points], points, keys)


def save_curves(curves: dict[str, dict], kind: str, folder: str | Path, title: str) -> dict[str, Path]:
    """curves.json, curves.csv and curves.png (points and fitted forms) in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "curves.json", {"kind": kind, "curves": curves})
    with (folder / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series", "sqrt_kl", "score_relative", "score_absolute"])
        for name, c in curves.items():
            for d, s, a in zip(c["d"], c["score"], c["absolute"]):
                writer.writerow([name, d, s, a])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        line = ax.plot(c["d"], c["score"], "o", label=name)[0]
        if math.isfinite(c["fit"]["alpha"]):
            grid = np.linspace(max(min(c["d"]), 1e-3), max(c["d"]) * 1.05, 100)
            ax.plot(grid, fitted(kind, c["fit"], grid), "-", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("sqrt(KL) (nats^0.5)")
    ax.set_ylabel("score relative to the initial policy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=120)
    plt.close(fig)
    return {"json": folder / "curves.json", "csv": folder / "curves.csv", "png": folder / "curves.png"}


def reliability_diagram(reliability: list[dict], path: str | Path, title: str = "reliability") -> Path:
    """Plot calibration bins (rmens.evaluation.rm_metrics.calibration) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot([r["confidence"] for r in reliability], [r["accuracy"] for r in reliability], "o-", label="model")
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
