"""The prediction output folder (docs/formats.md §5): a case's files, which run wrote the folder, the summary files.

A folder holds the predictions of one model and setting, its *identity* (:func:`run_identity`: model folder,
configuration, trainer, folds, checkpoint, sliding-window step, peripheral thickness). A new run with the same
identity keeps the entries of the cases it does not predict again (:func:`previous_entries`); a run with another
identity is refused, or with ``overwrite`` removes the other run's files first. ``predictions.json`` and
``predictions.csv`` (:func:`write_predictions`) are rewritten atomically at the end of every run; NaN (a
measurement that needs a lesion when there is none) is written as ``null`` in JSON and as an empty cell in CSV.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.inference.model_loading import TrainedModel
from dscovid.io.atomic import write_text_atomic
from dscovid.io.dataset import write_json_atomic
from dscovid.io.strict_json import json_safe
from dscovid.measurements.severity import ZONES
from dscovid.prediction.lesion_report import REPORT_KEYS

log = logging.getLogger(__name__)


def output_files(name: str) -> dict[str, str]:
    """Every file a case may have in the output folder, by role (docs/formats.md §5)."""
    return {
        "mask": f"{name}.nii.gz",
        "evidence": f"{name}_evidence.nii.gz",
        "lesion_probability": f"{name}_lesion_prob.nii.gz",
        "lung": f"{name}_lung.nii.gz",
        "montage": f"{name}_montage.png",  # dscovid_predict --png (dscovid.prediction.montage)
        "dicom_seg": f"{name}_seg.dcm",  # DICOM series input (dscovid.prediction.dicom_export)
        "dicom_sr": f"{name}_sr.dcm",
    }


def remove_case_files(output_dir: Path, name: str) -> None:
    """Remove whatever files of case ``name`` the output folder holds (a failed case leaves none, old or new)."""
    for file_name in output_files(name).values():
        (output_dir / file_name).unlink(missing_ok=True)


def run_identity(model: TrainedModel, step_fraction: float, peripheral_thickness_mm: float) -> dict:
    """Everything that changes the predictions: outputs of runs that differ in any of these are never mixed."""
    return {**model.identity(), "checkpoint": model.checkpoint_name, "step_fraction": float(step_fraction),
            "peripheral_thickness_mm": float(peripheral_thickness_mm)}


def previous_entries(output_dir: Path, identity: dict, overwrite: bool) -> list[dict]:
    """Entries of an earlier run of the same model to keep; refuse (or with ``overwrite`` clear) another model's."""
    path = output_dir / "predictions.json"
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        same = all(previous.get(key) == value for key, value in identity.items())
    except (OSError, json.JSONDecodeError, AttributeError):
        previous, same = {}, False
    if same:
        return list(previous.get("cases") or [])
    if not overwrite:
        described = (f"{previous.get('trainer')}__{previous.get('configuration')} folds {previous.get('folds')} "
                     f"from {previous.get('model_dir')}, {previous.get('checkpoint')}, step "
                     f"{previous.get('step_fraction')}") if previous else "an unreadable predictions.json"
        raise DscovidError(
            f"{output_dir}: already holds predictions of another model or setting ({described}); "
            f"choose another output folder or pass --overwrite"
        )
    log.warning("%s: replacing the predictions of another model (--overwrite)", output_dir)
    for entry in previous.get("cases") or []:
        # The listed files, and what else a case may have (a --png montage is not listed).
        derived = output_files(str(entry.get("case", ""))).values() if entry.get("case") else ()
        for file_name in [*(entry.get("files") or {}).values(), *derived]:
            candidate = output_dir / str(file_name)
            if candidate.parent == output_dir:  # only files directly in the folder, never a path from the JSON
                candidate.unlink(missing_ok=True)
    return []


def remove_leftovers(output_dir: Path) -> None:
    """Temporary files of an interrupted earlier run (``.<name>.<random><ending>``)."""
    for leftover in output_dir.glob(".*"):
        if leftover.is_file() and (leftover.name.endswith((".nii.gz", ".tmp"))):
            leftover.unlink(missing_ok=True)


def write_predictions(output_dir: Path, summary: dict, class_names: Sequence[str]) -> dict:
    """Write ``predictions.json`` (``summary``) and ``predictions.csv`` (one row per case); returns the JSON dict."""
    summary = json_safe(summary)
    write_json_atomic(summary, output_dir / "predictions.json")
    columns = ["case", "predicted_class", *[f"p_{c}" for c in class_names], *REPORT_KEYS]
    write_csv_atomic(csv_rows(summary["cases"], class_names), columns, output_dir / "predictions.csv")
    return summary


def csv_rows(cases: Sequence[Mapping], class_names: Sequence[str]) -> list[dict]:
    """One row per case: ``case, predicted_class, p_<class>..., <report columns>``."""
    rows = []
    for entry in cases:
        row = {"case": entry["case"], "predicted_class": entry.get("predicted_class")}
        probabilities = entry.get("probabilities") or {}
        for name in class_names:
            row[f"p_{name}"] = probabilities.get(name)
        zones = entry.get("severity_zones") or {}
        for key in REPORT_KEYS:
            row[key] = entry.get(key)
        for zone in ZONES:
            row[f"{zone}_zone_score"] = (zones.get(zone) or {}).get("score")
        rows.append(row)
    return rows


def write_csv_atomic(rows: Sequence[Mapping], columns: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``rows`` as CSV (None and NaN as empty cells) through a temporary file and a rename."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    write_text_atomic(buffer.getvalue(), path)
    return path


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
