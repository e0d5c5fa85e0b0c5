"""Cross-validation summary in the layout of the paper's Table II: mean (standard deviation) over the folds.

Reads ``<results>/DatasetNNN_Name/<Trainer>__<configuration>/fold_K/validation/summary.json`` (written by
:func:`dscovid.evaluation.evaluate.evaluate_folder`), one row per trainer and configuration:

- segmentation: DSC, sensitivity, specificity, NSD (%) and RMSD (mm), each fold's value being the mean over its
  cases with a non-empty reference (``lesion_cases``; ``segmentation_cases="all"`` takes every case instead);
- classification: accuracy and the macro sensitivity, specificity, F1 and AUC (%).

The standard deviation is the population one (``ddof=0``) over the folds that have a summary; a fold whose value is
undefined (null) is left out of that column and the count of folds used is reported.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

_FOLD = re.compile(r"^fold_(\d+)$")

#: (column title, section of summary.json, key, shown in percent).
COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("DSC", "segmentation", "dsc", True),
    ("Sensitivity", "segmentation", "sensitivity", True),
    ("Specificity", "segmentation", "specificity", True),
    ("NSD", "segmentation", "nsd", True),
    ("RMSD (mm)", "segmentation", "rmsd", False),
    ("Accuracy", "classification", "accuracy", True),
    ("Sensitivity", "classification", "sensitivity", True),
    ("Specificity", "classification", "specificity", True),
    ("F1", "classification", "f1", True),
    ("AUC", "classification", "auc", True),
)


@dataclass
class TrainerSummary:
    """One row of the table: the per-fold values of every column for one trainer and configuration."""

    trainer: str
    configuration: str
    folds: list[int] = field(default_factory=list)
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def mean_std(self, section: str, key: str) -> tuple[float, float, int]:
        """Mean and population standard deviation over the folds where the value is defined, and their count."""
        values = np.array([v for v in self.values.get((section, key), []) if v is not None and math.isfinite(v)])
        if values.size == 0:
            return math.nan, math.nan, 0
        return float(values.mean()), float(values.std()), int(values.size)


def _fold_values(summary: dict, segmentation_cases: str) -> dict[tuple[str, str], float | None]:
    values: dict[tuple[str, str], float | None] = {}
    segmentation = summary.get("segmentation") or {}
    block = segmentation.get("lesion_cases", {}) if segmentation_cases == "lesion" else segmentation
    means = block.get("mean", {}) if block else {}
    classification = summary.get("classification") or {}
    macro = classification.get("macro", {})
    for _, section, key, _ in COLUMNS:
        if section == "segmentation":
            values[(section, key)] = means.get(key)
        elif key == "accuracy":
            values[(section, key)] = classification.get("accuracy")
        else:
            values[(section, key)] = macro.get(key)
    return values


def collect_cv_summary(
    results_dataset_dir: str | os.PathLike,
    configuration: str | None = None,
    trainers: Sequence[str] | None = None,
    segmentation_cases: str = "lesion",
) -> list[TrainerSummary]:
    """Gather the fold summaries of every ``<Trainer>__<configuration>`` folder of one dataset's results.

    Parameters
    ----------
    results_dataset_dir : ``<results>/DatasetNNN_Name``.
    configuration : only this configuration (default: all).
    trainers : only these trainers, in this order (default: all, sorted).
    segmentation_cases : "lesion" (cases with a non-empty reference) or "all".
    """
    root = Path(results_dataset_dir)
    if segmentation_cases not in ("lesion", "all"):
        raise ValueError(f"segmentation_cases must be 'lesion' or 'all', got {segmentation_cases!r}")
    if not root.is_dir():
        raise DscovidError(f"{root}: results folder not found")
    found: dict[tuple[str, str], Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and "__" in p.name):
        trainer, _, config = folder.name.partition("__")
        if configuration is None or config == configuration:
            found[(trainer, config)] = folder
    if trainers:
        unknown = [t for t in trainers if not any(key[0] == t for key in found)]
        if unknown:
            available = ", ".join(sorted({key[0] for key in found})) or "none"
            raise DscovidError(f"{root}: no results for trainer(s) {', '.join(unknown)} (available: {available})")
        found = {key: found[key] for t in trainers for key in sorted(found) if key[0] == t}
    rows = []
    for (trainer, config), folder in found.items():
        row = TrainerSummary(trainer, config)
        folds = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FOLD.match(p.name)) and p.is_dir())
        without = []
        for fold, fold_dir in folds:
            path = fold_dir / "validation" / "summary.json"
            if not path.is_file():
                without.append(fold_dir.name)
                continue
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise DscovidError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
            row.folds.append(fold)
            for column, value in _fold_values(summary, segmentation_cases).items():
                row.values.setdefault(column, []).append(value)
        if without:
            log.warning("%s: no validation/summary.json in %s", folder.name, ", ".join(without))
        if row.folds:
            rows.append(row)
    if not rows:
        which = f" for configuration {configuration}" if configuration else ""
        raise DscovidError(f"{root}: no fold_K/validation/summary.json found{which}")
    return rows


def _cell(mean: float, std: float, percent: bool) -> str:
    if not math.isfinite(mean):
        return "–"
    scale = 100.0 if percent else 1.0
    return f"{mean * scale:.2f} ({std * scale:.2f})"


def format_markdown(rows: Sequence[TrainerSummary]) -> str:
    """Table II as Markdown: one row per trainer, mean (std) over folds, in % except RMSD in mm."""
    header = ["Trainer", "Configuration", "Folds"] + [title for title, *_ in COLUMNS]
    groups = ["", "", ""] + [section.capitalize() for _, section, _, _ in COLUMNS]
    lines = ["| " + " | ".join(groups) + " |", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * len(COLUMNS)) + "|"]
    for row in rows:
        cells = [row.trainer, row.configuration, ",".join(str(f) for f in row.folds)]
        for _, section, key, percent in COLUMNS:
            mean, std, _ = row.mean_std(section, key)
            cells.append(_cell(mean, std, percent))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[TrainerSummary]) -> str:
    """The same table as CSV with separate mean, std and fold-count columns (fractions, RMSD in mm)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f"{section}_{key}" for _, section, key, _ in COLUMNS]
    writer.writerow(["trainer", "configuration", "folds"] + [f"{n}_{s}" for n in names for s in ("mean", "std", "n")])
    for row in rows:
        cells: list[object] = [row.trainer, row.configuration, " ".join(str(f) for f in row.folds)]
        for _, section, key, _ in COLUMNS:
            mean, std, count = row.mean_std(section, key)
            cells += ["" if math.isnan(mean) else mean, "" if math.isnan(std) else std, count]
        writer.writerow(cells)
    return buffer.getvalue()


def write_cv_summary(rows: Sequence[TrainerSummary], output_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` atomically into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = (output_dir / f"{stem}.md", output_dir / f"{stem}.csv")
    for path, text in zip(paths, (format_markdown(rows), format_csv(rows))):
        write_text_atomic(text, path)
    return paths
