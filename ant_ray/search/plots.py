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


# Fewer finished trials than this and parameter importances are noise (a forest fitted to 3 points claims
# "ant.k 0.94"): the figure is left out.
IMPORTANCE_MIN_TRIALS = 5


def study_figures(journal: Path, study_name: str, out_dir: Path, metric: str) -> list[Path]:
    """PNG files of the study's history, importances and parallel coordinates, each only when the study has
    enough finished trials for it (importances: IMPORTANCE_MIN_TRIALS); each title says how many it shows.
    Finished means a finite score: a diverged trial's +inf would flatten every axis."""
    plt = _matplotlib()
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(storage=journal_storage(journal), study_name=study_name)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" in the terminal
    try:
        shown = optuna.create_study(directions=study.directions)  # in memory: the finished trials only
    finally:
        optuna.logging.set_verbosity(verbosity)
    shown.add_trials(complete)
    count = f"{len(complete)} finished trial{'' if len(complete) == 1 else 's'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    plots = [("optimization_history", ovm.plot_optimization_history, 1, "optimisation history"),
             ("param_importances", ovm.plot_param_importances, IMPORTANCE_MIN_TRIALS, "parameter importances"),
             ("parallel_coordinates", ovm.plot_parallel_coordinate, 2, "parallel coordinates")]
    for name, plot, needed, title in plots:
        if len(complete) < needed:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(shown, target=lambda t: t.value, target_name=metric)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances with a single distinct parameter value
        ax = ax[0] if hasattr(ax, "__len__") else ax
        if name == "parallel_coordinates":
            _legible_parallel_coordinates(ax)
        for side in ("left", "right"):  # Optuna titles some plots on the left: one title only
            ax.set_title("", loc=side)
        ax.set_title(f"{metric}: {title} ({count})")
        path = out_dir / f"{name}.png"
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        figures.append(path)
    return figures


def _legible_parallel_coordinates(ax) -> None:
    """Optuna draws thin lines in shades of blue down to white on a grey ground, in a figure too small for more
    than three axes: wider (1.6 inches per axis), a white ground, thicker lines whose colours all show
    (viridis without its palest yellow)."""
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import LineCollection

    figure = ax.figure
    axes = len(ax.get_xticks())
    figure.set_size_inches(max(7.0, 1.6 * axes + 2.5), 5.0)
    palette = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, 256))
    for lines in ax.collections:
        if isinstance(lines, LineCollection):
            reverse = lines.get_cmap().name.endswith("_r")  # Optuna's choice: the best trials darkest
            lines.set_cmap(matplotlib.colors.ListedColormap(palette[::-1] if reverse else palette))
            lines.set_linewidth(2.5)
            if lines.colorbar is not None:
                lines.colorbar.update_normal(lines)
    colorbars = [lines.colorbar.ax for lines in ax.collections if getattr(lines, "colorbar", None) is not None]
    for axis in figure.axes:
        axis.set_facecolor("white")
        axis.grid(False)
        if axis in colorbars:  # room between the last axis's labels and the colour bar
            box = axis.get_position()
            axis.set_position([box.x0 + 0.06, box.y0, box.width, box.height])
            continue
        for label in axis.get_yticklabels():  # values stay readable where lines cross them
            label.set_bbox({"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
    for x in ax.get_xticks():  # the parameter axes themselves (Optuna leaves them to the grid)
        ax.axvline(x, color="0.4", linewidth=1, zorder=0)


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
        # never clipped: the winner often lies on the weight box's edge (a specialist alone, weight 0 or high)
        ax.scatter([winner[a]], [winner[b]], marker="*", s=250, color="red", edgecolors="black", label="winner",
                   clip_on=False, zorder=5)
        for set_limits, column in ((ax.set_xlim, a), (ax.set_ylim, b)):  # a contour would fit them tight
            low, high = min(first[column].min(), winner[column]), max(first[column].max(), winner[column])
            pad = 0.06 * ((high - low) or 1.0)
            set_limits(low - pad, high + pad)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.legend(loc="best")
        ax.set_title("merge-weight landscape (lowest fidelity)")
    else:
        fig, axes = plt.subplots(1, len(weight_columns), figsize=(3 * len(weight_columns), 3), sharey=True)
        for ax, column in zip(axes, weight_columns):
            ax.scatter(first[column], first["fid"], s=15)
            ax.axvline(winner[column], color="red", linewidth=1, clip_on=False)
            ax.margins(x=0.08)
            ax.set_xlabel(column)
        axes[0].set_ylabel(metric)
        fig.suptitle("FID against each merge weight (lowest fidelity; red: the winner)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def copy_stage_figures(parent, search_dir: Path, stages) -> list[str]:
    """Copies of every stage's figures (Optuna's, the merge landscape) on the search's run, as
    figures/<stage>/<name>.png, so that the search's run shows them all; each stage's run keeps its own.
    ``parent``: a `TrackedRun`. Returns the artifact paths."""
    logged = []
    for stage in stages:
        for path in sorted((search_dir / stage / "figures").glob("*.png")):
            parent.log_artifact(path, f"figures/{stage}")
            logged.append(f"figures/{stage}/{path.name}")
    return logged
