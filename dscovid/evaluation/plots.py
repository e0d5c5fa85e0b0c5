"""Evaluation figures: ROC curves (one panel per class, like the paper's Fig. 7) and the confusion matrix.

Figures are drawn on a :class:`matplotlib.figure.Figure` (no pyplot state) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dscovid.evaluation.metrics import roc_auc, roc_curve
from dscovid.io.atomic import atomic_path


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``figure`` as PNG through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight")
    return path


def plot_roc_curves(
    y_true: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """One ROC panel per class (that class against the rest), AUC in the legend.

    Parameters
    ----------
    y_true : (N,) true class indices.
    probabilities : (N, C) predicted probabilities, column c for ``class_names[c]``.
    """
    truth = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    figure = Figure(figsize=(4.0 * len(class_names), 4.0))
    axes = figure.subplots(1, len(class_names), squeeze=False)[0]
    for index, (name, ax) in enumerate(zip(class_names, axes)):
        labels = truth == index
        fpr, tpr = roc_curve(labels, probabilities[:, index])
        auc = roc_auc(labels, probabilities[:, index])
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        if np.isfinite(auc):
            ax.step(fpr, tpr, where="post", linewidth=2, label=f"AUC = {auc:.3f}")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "undefined\n(one class absent)", ha="center", va="center")
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="1 - specificity", ylabel="sensitivity")
        ax.set_title(f"{name} vs rest (n+={int(labels.sum())}, n-={int((~labels).sum())})")
        ax.set_aspect("equal")
    return save_figure(figure, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """The confusion matrix as a heat map with counts and row percentages (rows = true class)."""
    matrix = np.asarray(matrix, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    figure = Figure(figsize=(1.6 * len(class_names) + 2.0, 1.4 * len(class_names) + 1.5))
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true")
    figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return save_figure(figure, path)
