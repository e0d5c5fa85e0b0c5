"""Training stages from the plans (``training.stages``): epochs, optimiser, learning-rate schedule, what is trained.

The paper (section V-A, "Model training") trains in two stages: pre-train each task's part with its own loss
(Adam 0.9/0.999, lr 1e-3), then fine-tune all three subnets jointly with the total loss (lr 1e-4), both with
linear decay. A stage's ``tasks`` says how its loss is formed: ``"separate"`` (each part only by its own task's
loss), ``"joint"`` (equation 11), or a single task. Learning rates follow the schedule per epoch within the stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from dscovid.errors import DscovidError
from dscovid.plans.configuration import StageConfig


def stages_with_overrides(
    stages: Sequence[StageConfig], epochs: int | None = None, iterations_per_epoch: int | None = None
) -> list[StageConfig]:
    """The stages with every stage's epochs and iterations overridden where given (tests, demos)."""
    overrides = {}
    if epochs is not None:
        overrides["epochs"] = int(epochs)
    if iterations_per_epoch is not None:
        overrides["iterations_per_epoch"] = int(iterations_per_epoch)
    return [dataclasses.replace(stage, **overrides) for stage in stages]


def stage_at(stages: Sequence[StageConfig], epoch: int) -> tuple[int, int]:
    """Which stage a global epoch index falls in, and the epoch within that stage."""
    first = 0
    for index, stage in enumerate(stages):
        if epoch < first + stage.epochs:
            return index, epoch - first
        first += stage.epochs
    raise IndexError(f"epoch {epoch} is past the last stage")


def total_epochs(stages: Sequence[StageConfig]) -> int:
    return sum(stage.epochs for stage in stages)


def learning_rate(stage: StageConfig, epoch_in_stage: int) -> float:
    """The stage's learning rate at one of its epochs.

    ``linear``: ``lr0 (1 - e / E)`` (the paper's linear decay; the last epoch keeps ``lr0 / E``), ``poly``:
    ``lr0 (1 - e / E)^0.9`` (nnU-Net), ``constant``: ``lr0``.
    """
    lr0 = stage.optimizer.lr
    progress = epoch_in_stage / stage.epochs
    if stage.schedule == "linear":
        return lr0 * (1.0 - progress)
    if stage.schedule == "poly":
        return lr0 * (1.0 - progress) ** 0.9
    if stage.schedule == "constant":
        return lr0
    raise DscovidError(f"training.stages: unknown schedule {stage.schedule!r} (known: linear, poly, constant)")


def make_optimizer(stage: StageConfig,
                   parameters: Iterable[torch.nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
    """The stage's optimiser (Adam in the presets: betas 0.9/0.999 as in the paper); parameters or parameter groups."""
    settings = stage.optimizer
    params = list(parameters)
    if settings.name == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=0.99, nesterov=True, weight_decay=settings.weight_decay)
    raise DscovidError(f"training.stages: unknown optimizer {settings.name!r} (known: adam, adamw, sgd)")
