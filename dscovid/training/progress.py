"""Per-epoch metrics of a training run and the ``progress.png`` plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a results folder is written on headless cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

#: The per-epoch series (all floats; NaN where a task does not apply).
SERIES = ("epoch", "stage", "lr", "train_loss", "train_seg", "train_cls", "train_ta", "val_loss", "val_dice",
          "val_accuracy", "ema_score", "epoch_time_s")


@dataclass
class History:
    """One list per series in :data:`SERIES`, one entry per finished epoch."""

    values: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in SERIES})

    def append(self, **entry: float) -> None:
        for key in SERIES:
            self.values[key].append(float(entry.get(key, float("nan"))))

    def __len__(self) -> int:
        return len(self.values["epoch"])

    def to_state(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in self.values.items()}

    @classmethod
    def from_state(cls, state: dict) -> History:
        history = cls()
        for key in SERIES:
            history.values[key] = [float(v) for v in state.get(key, [])]
        return history


def plot_progress(history: History, path: Path, title: str = "") -> None:
    """Losses, validation Dice/accuracy (with their EMA) and the learning rate per epoch; stage changes marked."""
    v = history.values
    epochs = v["epoch"]
    figure, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for key, label in (("train_loss", "train total"), ("val_loss", "val total"), ("train_seg", "train seg"),
                       ("train_cls", "train cls"), ("train_ta", "train task-aware")):
        axes[0].plot(epochs, v[key], label=label)
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    for key, label in (("val_dice", "val pseudo-Dice"), ("val_accuracy", "val accuracy"), ("ema_score", "EMA score")):
        axes[1].plot(epochs, v[key], label=label)
    axes[1].set_ylabel("metric")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].plot(epochs, v["lr"], label="learning rate")
    axes[2].set_ylabel("lr")
    axes[2].set_xlabel("epoch")
    changes = [e for e, previous, current in zip(epochs[1:], v["stage"], v["stage"][1:]) if current != previous]
    for axis in axes:
        for epoch in changes:
            axis.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.legend(loc="best", fontsize=8)
        axis.grid(alpha=0.3)
    if title:
        axes[0].set_title(title)
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=80)
    plt.close(figure)
    temporary.replace(path)
