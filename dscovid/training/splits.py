"""Cross-validation splits: ten folds stratified by class and lesion burden, written once and then reused.

The file is ``$DSCOVID_preprocessed/DatasetNNN_Name/splits_final.json`` in nnU-Net's format,
``[{"train": [...], "val": [...]}, ...]``. The first training run of a dataset writes it (atomically, and
deterministically from the seed, so ten cluster jobs that start at once all write the same file); later runs read
it. A file the user put there instead is respected and checked.

Strata are ``class × lesion-volume tercile`` (terciles computed within each class over its annotated cases with
lesions; a class without lesions, such as non-pneumonia, is one stratum). Within a stratum the cases are shuffled
with the seed and dealt round-robin to the folds, smallest folds first, so every stratum is spread as evenly as
its size allows, fold sizes differ by at most one, and a stratum smaller than the number of folds still works.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.dataset import write_json_atomic

log = logging.getLogger(__name__)

SPLITS_FILE = "splits_final.json"
DEFAULT_NUM_FOLDS = 10
DEFAULT_SPLIT_SEED = 12345


@dataclass(frozen=True)
class CaseStratum:
    """What the stratification needs to know about one case."""

    class_index: int
    lesion_voxels: float  # lesion volume in preprocessed voxels (0 for a case without lesions)
    lesion_annotated: bool = True


def stratum_labels(cases: Mapping[str, CaseStratum]) -> dict[str, str]:
    """Name each case's stratum: ``"c<class>_t<tercile>"``, or ``"c<class>_none"`` without annotated lesions."""
    labels: dict[str, str] = {}
    for class_index in sorted({info.class_index for info in cases.values()}):
        members = {name: info for name, info in cases.items() if info.class_index == class_index}
        with_lesions = {n: i.lesion_voxels for n, i in members.items() if i.lesion_annotated and i.lesion_voxels > 0}
        edges = np.quantile(list(with_lesions.values()), [1 / 3, 2 / 3]) if len(with_lesions) >= 3 else None
        for name in members:
            if name not in with_lesions:
                labels[name] = f"c{class_index}_none"
            elif edges is None:
                labels[name] = f"c{class_index}_t0"
            else:
                labels[name] = f"c{class_index}_t{int(np.searchsorted(edges, with_lesions[name], side='right'))}"
    return labels


def make_stratified_splits(
    cases: Mapping[str, CaseStratum], num_folds: int = DEFAULT_NUM_FOLDS, seed: int = DEFAULT_SPLIT_SEED
) -> list[dict[str, list[str]]]:
    """Deal the cases into ``num_folds`` folds, stratified by class and lesion-volume tercile.

    Parameters
    ----------
    cases : mapping case name -> CaseStratum
    num_folds : int
        Number of folds; needs at least that many cases (every fold needs a validation case).
    seed : int
        Shuffling seed; the same cases and seed always give the same splits.

    Returns
    -------
    list of {"train": sorted names, "val": sorted names}, one per fold
    """
    if num_folds < 2:
        raise DscovidError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if len(cases) < num_folds:
        raise DscovidError(
            f"{len(cases)} cases are too few for {num_folds} folds (every fold needs a validation case); "
            "train with fold 'all' or add cases"
        )
    rng = np.random.default_rng(seed)
    labels = stratum_labels(cases)
    val: list[list[str]] = [[] for _ in range(num_folds)]
    for stratum in sorted(set(labels.values())):
        members = sorted(name for name, label in labels.items() if label == stratum)
        rng.shuffle(members)
        # Round-robin over the folds, smallest first (ties in random order): each stratum is spread as evenly as
        # its size allows, and the remainders go to the folds that are short, so fold sizes differ by at most one.
        sizes = np.array([len(v) for v in val])
        ties = rng.permutation(num_folds)
        order = sorted(range(num_folds), key=lambda f: (sizes[f], ties[f]))
        for k, name in enumerate(members):
            val[order[k % num_folds]].append(name)
    every = sorted(cases)
    return [{"train": sorted(set(every) - set(v)), "val": sorted(v)} for v in val]


def check_splits(splits: object, known_cases: Sequence[str], num_folds: int, path: Path | str) -> None:
    """Refuse a splits list that does not fit the dataset: wrong fold count, unknown cases, train/val overlap.

    A case that is in no validation set is allowed (a user may hold cases out) but logged.
    """
    if not isinstance(splits, list) or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in splits
    ):
        raise DscovidError(f'{path}: must be a list of {{"train": [...], "val": [...]}} objects, one per fold')
    if len(splits) != num_folds:
        raise DscovidError(f"{path}: holds {len(splits)} folds, expected {num_folds}")
    known = set(known_cases)
    for index, fold in enumerate(splits):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise DscovidError(
                f"{path}: fold {index} names cases that are not in the preprocessed dataset: "
                f"{', '.join(unknown[:3])}{more}"
            )
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            raise DscovidError(f"{path}: fold {index} has cases in both train and val: {', '.join(overlap[:3])}")
        if not fold["val"]:
            raise DscovidError(f"{path}: fold {index} has no validation case")
        if not fold["train"]:
            raise DscovidError(f"{path}: fold {index} has no training case")
    never = known - set().union(*(set(f["val"]) for f in splits))
    if never:
        log.info("%s: %d case(s) are in no validation set (held out by the user)", path, len(never))


def load_or_create_splits(
    dataset_dir: Path,
    cases: Mapping[str, CaseStratum],
    num_folds: int = DEFAULT_NUM_FOLDS,
    seed: int = DEFAULT_SPLIT_SEED,
) -> list[dict[str, list[str]]]:
    """Read ``dataset_dir/splits_final.json`` (checked against ``cases``), or create and write it the first time."""
    path = Path(dataset_dir) / SPLITS_FILE
    if path.exists():
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DscovidError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        check_splits(splits, list(cases), num_folds, path)
        log.info("Using the splits in %s", path)
        return splits
    splits = make_stratified_splits(cases, num_folds, seed)
    write_json_atomic(splits, path)
    log.info("Wrote %d stratified folds to %s", num_folds, path)
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int | str, all_cases: Sequence[str]) -> tuple[list, list]:
    """Training and validation case names of ``fold`` (an index, or "all": train on everything, no held-out set)."""
    if fold == "all":
        return sorted(all_cases), []
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise DscovidError(f"fold must be 0-{len(splits) - 1} or 'all', got {fold!r}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
