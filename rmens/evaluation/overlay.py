"""All arms in one figure: Best-of-n curves (proxy and gold against KL_bon) and PPO curves (gold and proxy
against KL), so that arms are compared at a glance rather than across one plot per arm."""

from __future__ import annotations

from pathlib import Path


def _axes(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    return plt, fig, axes[0]


def plot_bon_overlay(curves: dict[str, list[dict]], path: str | Path) -> Path | None:
    """`curves`: {arm/rule: [{n, kl_bon, proxy, gold?...}]} (the best_of_n stage's bon_curves.json)."""
    if not curves:
        return None
    series = [s for s in ("proxy", "gold") if any(s in row for rows in curves.values() for row in rows)]
    plt, fig, axes = _axes(len(series))
    for ax, what in zip(axes, series):
        for name, rows in sorted(curves.items()):
            ax.plot([r["kl_bon"] for r in rows], [r[what] for r in rows], marker="o", ms=3, label=name)
        ax.set(xlabel="KL_bon = log n - (n-1)/n", ylabel=f"{what} score of the pick", title=f"Best-of-n: {what}")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_ppo_overlay(points: dict[str, list[dict]], path: str | Path) -> Path | None:
    """`points`: {ppo arm: [{step, kl, gold, proxy}]} (each evaluate stage's ppo_points.json)."""
    if not points:
        return None
    plt, fig, axes = _axes(2)
    for ax, what in zip(axes, ("gold", "proxy")):
        for name, rows in sorted(points.items()):
            rows = sorted(rows, key=lambda r: r["step"])
            ax.plot([r["kl"] for r in rows], [r[what] for r in rows], marker="o", ms=3, label=name)
        ax.set(xlabel="KL(policy || initial)", ylabel=f"{what} reward", title=f"PPO: {what} against KL")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_train_overlay(histories: dict[str, list[dict]], path: str | Path) -> Path | None:
    """`histories`: {arm: [{step, train/loss, ...}]} (every phase or member; rmens.training's history). The
    members of a full ensemble train side by side, each logging its own loss at steps 1, 2...: the rows of a
    step are summed, as the loss of an ensemble trained as one module is its members' sum."""
    histories = {name: rows for name, rows in histories.items() if any("train/loss" in r for r in rows)}
    if not histories:
        return None
    plt, fig, axes = _axes(1)
    for name, rows in sorted(histories.items()):
        loss: dict[int, float] = {}
        for row in rows:
            if "train/loss" in row:
                loss[row["step"]] = loss.get(row["step"], 0.0) + row["train/loss"]
        axes[0].plot(sorted(loss), [loss[step] for step in sorted(loss)], label=name)
    axes[0].set(xlabel="optimizer step", ylabel="Bradley-Terry loss (sum over members)",
                title="Reward-model training")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
