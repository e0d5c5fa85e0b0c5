"""The layout of a results folder (docs/formats.md §6), for the trainer that writes it and the predictor that reads it.

A model folder is ``<results root>/DatasetNNN_Name/<Trainer>__<configuration>/`` with one ``fold_K/`` per trained
fold (``K`` a number or ``all``), each holding the checkpoints (:mod:`dscovid.results.checkpoint`) and
``plans.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.io.dataset import find_dataset
from dscovid.results.checkpoint import FINAL


def model_folder(results_root: Path, dataset_name: str, trainer_name: str, configuration_name: str) -> Path:
    """``<results_root>/<dataset_name>/<trainer_name>__<configuration_name>``."""
    return Path(results_root) / dataset_name / f"{trainer_name}__{configuration_name}"


def model_folders(results_root: Path, dataset: str) -> list[Path]:
    """The ``<Trainer>__<configuration>`` folders of a dataset in the results root."""
    dataset_dir = find_dataset(dataset, results_root)
    return sorted(p for p in dataset_dir.iterdir() if p.is_dir() and "__" in p.name)


def find_model_folder(
    results_root: Path, dataset: str, configuration: str | None = None, trainer: str | None = None
) -> Path:
    """The model folder of ``dataset`` for ``trainer`` and ``configuration``; either may be omitted when unambiguous."""
    dataset_dir = find_dataset(dataset, results_root)  # named in the errors as found, not as typed (-d 1)
    folders = model_folders(results_root, dataset)
    candidates = [
        folder
        for folder in folders
        if (trainer is None or folder.name.split("__", 1)[0] == trainer)
        and (configuration is None or folder.name.split("__", 1)[1] == configuration)
    ]
    wanted = f"{trainer or '<any trainer>'}__{configuration or '<any configuration>'}"
    if not candidates:
        known = ", ".join(p.name for p in folders) or "none"
        raise DscovidError(f"{dataset_dir}: no trained model {wanted} (trained: {known})")
    if len(candidates) > 1:
        raise DscovidError(
            f"{dataset_dir}: several trained models match {wanted} "
            f"({', '.join(p.name for p in candidates)}); pass -c and -tr"
        )
    return candidates[0]


def available_folds(model_dir: Path, checkpoint_name: str = FINAL) -> list[str]:
    """Names of the folds of ``model_dir`` that have ``checkpoint_name``, numeric folds first."""
    folds = [p.name.removeprefix("fold_") for p in model_dir.glob("fold_*") if (p / checkpoint_name).is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def trained_fold_dir(model_dir: Path, fold: str | int, checkpoint_name: str) -> Path:
    """``model_dir/fold_<fold>``, or an error listing the trained folds when it has no ``checkpoint_name``."""
    folder = model_dir / f"fold_{fold}"
    if not (folder / checkpoint_name).is_file():
        trained = ", ".join(available_folds(model_dir, checkpoint_name)) or "none"
        raise DscovidError(f"{model_dir}: fold {fold} has no {checkpoint_name} (trained folds: {trained})")
    return folder


def checkpoint_plans(state: dict, fold_dir: Path) -> dict:
    """The plans a fold was trained with: the checkpoint's own copy, else the fold's ``plans.json``."""
    plans = state.get("plans")
    if isinstance(plans, dict):
        return plans
    path = fold_dir / "plans.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DscovidError(f"{fold_dir}: the checkpoint holds no plans and plans.json is unreadable ({error})") from None
