"""Plots of robustness curves and of the estimated bound against the measured adversarial loss."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(curves: Sequence[Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds of ``key`` per eps; each curve is a list of report dicts."""
    eps = np.array([r["epsilon"] for r in curves[0]])
    values = np.array([[r[key] for r in curve] for curve in curves], dtype=float)
    return eps, values.mean(axis=0), values.std(axis=0)


def _finish(plt, fig, ax, path: str | Path, *, title: str, norm: str, legend_size: int) -> Path:
    """Axis label, wrapped title, legend outside the axes; save and close."""
    ax.set_xlabel(f"eps ({norm}, pixel units)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_eps(
    curves: Mapping[str, Sequence[Sequence[dict]]],
    path: str | Path,
    *,
    title: str,
    norm: str = "linf",
    robust: Mapping[str, Sequence[Sequence[dict]]] | None = None,
) -> Path:
    """Downstream PGD accuracy against eps, one line per method (mean +- std over seeds).

    ``robust`` (per method, per seed, the ``robust_accuracy`` dicts of
    ``RobustnessEvaluation.to_dict()``) adds the per-sample worst case over every
    attack at the reported eps as star markers in the method's colour.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        eps, mean, std = _series(runs, "adversarial_accuracy")
        ax.errorbar(eps, 100 * mean, yerr=100 * std, marker="o", ms=3, capsize=2, color=color, label=f"{name}: PGD")
        if robust and robust.get(name) and robust[name][0]:
            r_eps, r_mean, _ = _series(robust[name], "accuracy")
            ax.plot(r_eps, 100 * r_mean, "*", ms=10, color=color, label=f"{name}: robust (worst case)")
    ax.set_ylabel("accuracy (%)  [estimates]")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    return _finish(plt, fig, ax, path, title=title, norm=norm, legend_size=8)


def plot_bound_vs_loss(
    curves: Mapping[str, Sequence[Sequence[dict]]], path: str | Path, *, title: str, norm: str = "linf"
) -> Path:
    """Estimated bound (dashed) and measured adversarial loss (solid) against eps, per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.6, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        eps, loss, _ = _series(runs, "adversarial_loss")
        _, bound, _ = _series(runs, "bound")
        ax.plot(eps, loss, "-o", ms=3, color=color, label=f"{name}: adversarial loss (PGD)")
        ax.plot(eps, bound, "--", color=color, label=f"{name}: bound clean + L*R")
    ax.set_ylabel("cross-entropy  [estimates]")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    return _finish(plt, fig, ax, path, title=title, norm=norm, legend_size=7)
