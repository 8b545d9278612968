"""Figures logged with a search: Optuna's optimisation history, parameter importances and parallel coordinates for
a stage's study, and the merge-weight landscape (FID over the weights)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
import pandas as pd

from ant_ray.search.searchers import journal_storage


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def study_figures(journal: Path, study_name: str, out_dir: Path, metric: str) -> list[Path]:
    """PNG files of the study's history, importances and parallel coordinates (each only when the study has
    enough completed trials for it)."""
    plt = _matplotlib()
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(storage=journal_storage(journal), study_name=study_name)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)]
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    plots = [("optimization_history", ovm.plot_optimization_history, 1),
             ("param_importances", ovm.plot_param_importances, 3),
             ("parallel_coordinates", ovm.plot_parallel_coordinate, 2)]
    for name, plot, needed in plots:
        if len(complete) < needed:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study, target=lambda t: t.value if t.value is not None else float("nan"),
                          target_name=metric)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances with a single distinct parameter value
        figure = (ax[0] if hasattr(ax, "__len__") else ax).figure
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        figures.append(path)
    return figures


def merge_landscape(table: pd.DataFrame, weight_columns: list[str], winner: dict[str, float], path: Path) -> Path:
    """Rung-0 FID over the merge weights: for N = 2 a map over (w0, w1) (a filled contour when there are enough
    points), else FID against each weight (projections of the evaluated candidates), the winner marked."""
    plt = _matplotlib()
    first = table[table["rung"] == 0]
    metric = first["metric"].iloc[0]
    if len(weight_columns) == 2:
        a, b = weight_columns
        fig, ax = plt.subplots(figsize=(5, 4))
        if len(first) >= 6 and first[a].nunique() > 1 and first[b].nunique() > 1:
            try:
                contour = ax.tricontourf(first[a], first[b], first["fid"], levels=12, cmap="viridis_r", alpha=0.6)
                fig.colorbar(contour, ax=ax, label=metric)
            except (ValueError, RuntimeError):
                pass  # degenerate triangulation (collinear points)
        points = ax.scatter(first[a], first[b], c=first["fid"], cmap="viridis_r", edgecolors="black", s=40)
        if len(first) < 6:
            fig.colorbar(points, ax=ax, label=metric)
        ax.scatter([winner[a]], [winner[b]], marker="*", s=250, color="red", label="winner")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.legend(loc="best")
        ax.set_title("merge-weight landscape (lowest fidelity)")
    else:
        fig, axes = plt.subplots(1, len(weight_columns), figsize=(3 * len(weight_columns), 3), sharey=True)
        for ax, column in zip(axes, weight_columns):
            ax.scatter(first[column], first["fid"], s=15)
            ax.axvline(winner[column], color="red", linewidth=1)
            ax.set_xlabel(column)
        axes[0].set_ylabel(metric)
        fig.suptitle("FID against each merge weight (lowest fidelity; red: the winner)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
