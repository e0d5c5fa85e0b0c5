"""Training stages from the plans (``training.stages``): epochs, optimiser, learning-rate schedule, what is trained.

The paper (section V-A, "Model training") trains in two stages: pre-train each task's part with its own loss
(Adam 0.9/0.999, lr 1e-3), then fine-tune all three subnets jointly with the total loss (lr 1e-4), both with
linear decay. A stage's ``tasks`` says how its loss is formed: ``"separate"`` (each part only by its own task's
loss), ``"joint"`` (equation 11), or a single task. Learning rates follow the schedule per epoch within the stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from dscovid.errors import DscovidError

STAGE_TASKS = ("separate", "joint", "segmentation", "classification")


@dataclass(frozen=True)
class Stage:
    """One training stage (``training.stages[i]`` of a plans configuration)."""

    name: str
    epochs: int
    iterations_per_epoch: int
    optimizer: dict
    schedule: str = "linear"
    trainable: tuple[str, ...] = ("all",)
    tasks: str = "joint"

    @classmethod
    def from_dict(cls, values: Mapping, index: int) -> Stage:
        where = f"training.stages[{index}]"
        try:
            stage = cls(
                name=str(values["name"]),
                epochs=int(values["epochs"]),
                iterations_per_epoch=int(values["iterations_per_epoch"]),
                optimizer=dict(values["optimizer"]),
                schedule=str(values.get("schedule", "linear")),
                trainable=tuple(values.get("trainable", ("all",))),
                tasks=str(values.get("tasks", "joint")),
            )
        except KeyError as error:
            raise DscovidError(f"{where}.{error.args[0]}: missing key") from None
        if stage.tasks not in STAGE_TASKS:
            raise DscovidError(f"{where}.tasks: must be one of {', '.join(STAGE_TASKS)}, got {stage.tasks!r}")
        if stage.epochs < 1 or stage.iterations_per_epoch < 1:
            raise DscovidError(f"{where}: epochs and iterations_per_epoch must be positive")
        learning_rate(stage, 0)  # refuses an unknown schedule now rather than mid-training
        return stage


def stages_from_configuration(
    configuration: Mapping, epochs: int | None = None, iterations_per_epoch: int | None = None
) -> list[Stage]:
    """The stages of a configuration, with optional overrides of every stage's epochs and iterations (tests, demos)."""
    stages = [Stage.from_dict(values, i) for i, values in enumerate(configuration["training"]["stages"])]
    overrides = {}
    if epochs is not None:
        overrides["epochs"] = int(epochs)
    if iterations_per_epoch is not None:
        overrides["iterations_per_epoch"] = int(iterations_per_epoch)
    if overrides:
        stages = [Stage(**{**stage.__dict__, **overrides}) for stage in stages]
    return stages


def stage_at(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """Which stage a global epoch index falls in, and the epoch within that stage."""
    first = 0
    for index, stage in enumerate(stages):
        if epoch < first + stage.epochs:
            return index, epoch - first
        first += stage.epochs
    raise IndexError(f"epoch {epoch} is past the last stage")


def total_epochs(stages: list[Stage]) -> int:
    return sum(stage.epochs for stage in stages)


def learning_rate(stage: Stage, epoch_in_stage: int) -> float:
    """The stage's learning rate at one of its epochs.

    ``linear``: ``lr0 (1 - e / E)`` (the paper's linear decay; the last epoch keeps ``lr0 / E``), ``poly``:
    ``lr0 (1 - e / E)^0.9`` (nnU-Net), ``constant``: ``lr0``.
    """
    lr0 = float(stage.optimizer["lr"])
    progress = epoch_in_stage / stage.epochs
    if stage.schedule == "linear":
        return lr0 * (1.0 - progress)
    if stage.schedule == "poly":
        return lr0 * (1.0 - progress) ** 0.9
    if stage.schedule == "constant":
        return lr0
    raise DscovidError(f"training.stages: unknown schedule {stage.schedule!r} (known: linear, poly, constant)")


def make_optimizer(stage: Stage, parameters: Iterable[torch.nn.Parameter] | Iterable[dict]) -> torch.optim.Optimizer:
    """The stage's optimiser (Adam by default: betas 0.9/0.999 as in the paper); parameters or parameter groups."""
    settings = stage.optimizer
    name = settings.get("name", "adam")
    lr = float(settings["lr"])
    weight_decay = float(settings.get("weight_decay", 0.0))
    params = list(parameters)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(settings.get("betas", (0.9, 0.999))),
                                weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(settings.get("betas", (0.9, 0.999))),
                                 weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    raise DscovidError(f"training.stages: unknown optimizer {name!r} (known: adam, adamw, sgd)")
