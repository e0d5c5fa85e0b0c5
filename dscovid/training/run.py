"""``run_training``: one fold of one dataset and configuration, from the preprocessed cache to a results folder.

Results go to ``$DSCOVID_results/DatasetNNN_Name/<Trainer>__<configuration>/fold_K/`` (docs/formats.md §6):
``plans.json`` (with the trainer's overrides applied, so the predictor rebuilds exactly the trained network),
``dataset.json``, ``dataset_fingerprint.json``, the three checkpoints, ``training_log.txt``, ``progress.png`` and,
after training, ``validation/`` (the real predictor on the fold's held-out cases and their metrics).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dscovid.errors import DscovidError
from dscovid.io.dataset import find_dataset, write_json_atomic
from dscovid.plans.configuration import Plans, load_plans
from dscovid.results.checkpoint import FINAL, LATEST
from dscovid.results.model_folder import model_folder
from dscovid.roots import Roots
from dscovid.training.base_trainer import Trainer, TrainingSetup
from dscovid.training.data import list_cache_cases
from dscovid.training.distributed import init_distributed, shutdown_distributed
from dscovid.training.final_validation import validate_fold
from dscovid.training.splits import DEFAULT_NUM_FOLDS, DEFAULT_SPLIT_SEED, fold_cases, load_or_create_splits
from dscovid.training.trainers import DEFAULT_TRAINER, get_trainer

log = logging.getLogger("dscovid.training")


@dataclass(frozen=True)
class TrainingResult:
    """Where a fold's results went, and its final validation summary (None when there was none)."""

    fold_dir: Path
    epochs: int
    validation_summary: dict | None


def find_preprocessed_dataset(root: Path, dataset: str | None) -> Path:
    """The dataset folder in the preprocessed root; ``None`` works when exactly one dataset is there."""
    if dataset is not None:
        return find_dataset(dataset, root)
    candidates = sorted(p.parent for p in Path(root).glob("Dataset*_*/plans.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DscovidError(f"no preprocessed dataset in {root} (run dscovid_plan_and_preprocess first)")
    raise DscovidError(f"several preprocessed datasets in {root} ({', '.join(p.name for p in candidates)}): pass -d")


def read_plans(path: Path) -> Plans:
    """The validated plans of a preprocessed dataset (errors name the file and the key)."""
    if not Path(path).exists():
        raise DscovidError(f"{path}: plans file not found (run dscovid_plan_and_preprocess first)")
    return load_plans(path)


def parse_fold(fold: int | str) -> int | str:
    text = str(fold)
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    raise DscovidError(f"fold must be a number or 'all', got {fold!r}")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; with ``deterministic`` also demand deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may still draw from the legacy generator
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to be deterministic; it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DscovidError("--device cuda was asked for, but no CUDA GPU is available to torch")
    if device not in ("cpu", "cuda"):
        raise DscovidError(f"device must be cpu or cuda, got {device!r}")
    return torch.device(device)


def run_training(
    roots: Roots,
    dataset: str | None,
    configuration: str,
    fold: int | str,
    trainer_name: str = DEFAULT_TRAINER,
    continue_training: bool = False,
    validation_only: bool = False,
    device: str | None = None,
    seed: int | None = None,
    deterministic: bool = False,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    num_workers: int = 1,
    num_folds: int = DEFAULT_NUM_FOLDS,
    run_final_validation: bool = True,
) -> TrainingResult:
    """Train (or resume, or only validate) one fold.

    Parameters
    ----------
    roots : Roots
        Needs ``preprocessed`` and ``results``.
    dataset : str or None
        ``Dataset001_Name``, its number, or None when the preprocessed root holds one dataset.
    configuration : str
        A configuration of the plans, e.g. ``3d_cpu``.
    fold : int or "all"
        0..num_folds-1, or "all" (train on every case; no held-out validation).
    trainer_name : str
        A key of :data:`dscovid.training.trainers.TRAINERS`.
    continue_training : bool
        Resume from ``checkpoint_latest.pt`` (stage, epoch, optimiser, history).
    validation_only : bool
        Skip training; run the final validation with ``checkpoint_final.pt``.
    epochs, iterations_per_epoch : int or None
        Override every stage's epochs / iterations (tests and demos).
    num_workers : int
        Background data-loading processes (0: load in the training process).
    """
    trainer_class = get_trainer(trainer_name)
    fold = parse_fold(fold)
    torch_device = resolve_device(device)
    context = init_distributed(torch_device.type)
    if context.enabled and torch_device.type == "cuda":
        torch_device = torch.device("cuda", context.local_rank)
    if not context.is_main:
        logging.getLogger("dscovid").setLevel(logging.WARNING)  # one voice on the console: rank 0's
    try:
        dataset_dir = find_preprocessed_dataset(roots.require("preprocessed"), dataset)
        plans = read_plans(dataset_dir / "plans.json")
        if configuration not in plans.configurations:
            raise DscovidError(f"{dataset_dir / 'plans.json'}: no configuration {configuration!r} "
                               f"(available: {', '.join(sorted(plans.configurations)) or 'none'})")
        effective = trainer_class.effective_configuration(plans.configurations[configuration])
        data_dir = dataset_dir / effective.data_identifier
        cases = list_cache_cases(data_dir)
        if context.is_main:
            splits = load_or_create_splits(dataset_dir, {n: c.stratum() for n, c in cases.items()}, num_folds,
                                           DEFAULT_SPLIT_SEED)
        context.barrier()
        if not context.is_main:
            splits = load_or_create_splits(dataset_dir, {n: c.stratum() for n, c in cases.items()}, num_folds,
                                           DEFAULT_SPLIT_SEED)
        train_names, val_names = fold_cases(splits, fold, list(cases))
        fold_dir = model_folder(roots.require("results"), dataset_dir.name, trainer_class.__name__,
                                configuration) / f"fold_{fold}"
        run_seed = int(seed if seed is not None else effective.training.seed)
        seed_everything(run_seed, deterministic)
        effective_plans = plans.with_configuration(effective)
        setup = TrainingSetup(
            plans=effective_plans, configuration_name=configuration, configuration=effective,
            train_cases=[cases[n] for n in train_names], val_cases=[cases[n] for n in val_names],
            output_dir=fold_dir, device=torch_device, seed=run_seed, num_workers=num_workers, epochs=epochs,
            iterations_per_epoch=iterations_per_epoch, context=context,
        )
        if not validation_only:
            trainer = trainer_class(setup)
            _prepare_fold_dir(trainer, dataset_dir, effective_plans, continue_training)
            try:
                trainer.run()
            finally:
                trainer.close_log()
            epochs_done = trainer.epoch
        else:
            if not (fold_dir / FINAL).exists():
                raise DscovidError(f"{fold_dir / FINAL}: not found (train the fold before --val-only)")
            epochs_done = -1
        summary = None
        if run_final_validation and context.is_main:
            summary = validate_fold(fold_dir, roots, dataset_dir, configuration, val_names, torch_device)
        context.barrier()
        return TrainingResult(fold_dir, epochs_done, summary)
    finally:
        shutdown_distributed(context)


def _prepare_fold_dir(trainer: Trainer, dataset_dir: Path, plans: Plans, continue_training: bool) -> None:
    """Resume or refuse to overwrite, and copy the plans, dataset.json and fingerprint in (main process)."""
    fold_dir = trainer.output_dir
    latest = fold_dir / LATEST
    if not continue_training and (latest.exists() or (fold_dir / FINAL).exists()):
        raise DscovidError(f"{fold_dir} already holds checkpoints: pass --continue to resume, or delete the folder")
    trainer.open_log()
    if continue_training:
        if latest.exists():
            trainer.resume(latest)
        else:
            log.warning("No %s in %s: starting from scratch", LATEST, fold_dir)
    if not trainer.context.is_main:
        return
    fold_dir.mkdir(parents=True, exist_ok=True)
    for target in (fold_dir, fold_dir.parent):  # the model folder too, as nnU-Net, for the predictor
        write_json_atomic(plans.to_dict(), target / "plans.json")
        for name in ("dataset.json", "dataset_fingerprint.json"):
            if (dataset_dir / name).exists():
                temporary = target / f".{name}.tmp"
                shutil.copyfile(dataset_dir / name, temporary)
                temporary.replace(target / name)
