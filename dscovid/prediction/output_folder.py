"""The prediction output folder (docs/formats.md §5): a case's files, which model the folder holds, the summary.

A folder holds the predictions of one model and setting, its *identity* (:func:`run_identity`: model folder,
configuration, trainer, folds, checkpoint, sliding-window step, peripheral thickness), recorded in
``records/identity.json`` by the first run (:func:`claim_folder`). Runs with the same identity share the folder,
at the same time too (K parts of one archive, two users): each case's outcome is one record file
(:mod:`dscovid.io.shared_output`), and ``predictions.json`` and ``predictions.csv`` are rebuilt from all records
under the folder's lock at the end of every run (:func:`rebuild_predictions`), so no run's cases are lost and each
case is listed once. A run with another identity is refused, or with ``overwrite`` removes the files the other
model's records list first. NaN (a measurement that needs a lesion when there is none) is written as ``null`` in
JSON and as an empty cell in CSV.
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
from dscovid.io.atomic import remove_stale_temporaries, write_text_atomic
from dscovid.io.dataset import is_safe_case_name, write_json_atomic
from dscovid.io.shared_output import (
    folder_lock,
    read_identity,
    read_records,
    remove_records,
    write_identity,
    write_result,
)
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


#: Settings recorded in the identity only when they differ from their default (so that folders written before
#: the setting existed stay the same run); compared both ways, with the default standing in for a missing key.
_OPTIONAL_IDENTITY = {"min_lesion_ml": 0.0, "mirroring": True, "tile_placement": None}


def run_identity(model: TrainedModel, step_fraction: float, peripheral_thickness_mm: float,
                 min_lesion_ml: float = 0.0, mirroring: bool = True, tile_placement: str | None = None) -> dict:
    """Everything that changes the predictions: outputs of runs that differ in any of these are never mixed.

    ``min_lesion_ml``, ``mirroring`` and ``tile_placement`` (None: the model's own) are recorded only when not their
    defaults, so a folder written before they existed stays the same run."""
    identity = {**model.identity(), "checkpoint": model.checkpoint_name, "step_fraction": float(step_fraction),
                "peripheral_thickness_mm": float(peripheral_thickness_mm)}
    if min_lesion_ml != _OPTIONAL_IDENTITY["min_lesion_ml"]:
        identity["min_lesion_ml"] = float(min_lesion_ml)
    if mirroring != _OPTIONAL_IDENTITY["mirroring"]:
        identity["mirroring"] = bool(mirroring)
    if tile_placement is not None:
        identity["tile_placement"] = str(tile_placement)
    return identity


def _describe_identity(identity: Mapping) -> str:
    if not identity:
        return "an unreadable record of the model"
    return (f"{identity.get('trainer')}__{identity.get('configuration')} folds {identity.get('folds')} from "
            f"{identity.get('model_dir')}, {identity.get('checkpoint')}, step {identity.get('step_fraction')}"
            + "".join(f", {key} {identity[key]}" for key in _OPTIONAL_IDENTITY if key in identity))


def _legacy_summary(output_dir: Path) -> dict | None:
    """``predictions.json`` of a folder written before the records existed (None when there is none)."""
    path = output_dir / "predictions.json"
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def claim_folder(output_dir: Path, identity: dict, overwrite: bool) -> None:
    """Make ``output_dir`` a folder of ``identity``'s predictions, under its lock (docs/reliability.md).

    A new folder is claimed; one of the same identity is shared; one of another identity is refused, or with
    ``overwrite`` emptied of that model's outputs (only the files its records list, directly in the folder) first.
    A folder written before the records existed has its ``predictions.json`` cases turned into records, so they
    stay listed. Temporary files and staging folders of runs that died are removed; a live run's are left alone.
    """
    with folder_lock(output_dir):
        recorded = read_identity(output_dir)
        legacy = _legacy_summary(output_dir) if recorded is None else None
        previous = recorded if recorded is not None else legacy
        same = (previous is not None and all(previous.get(key) == value for key, value in identity.items())
                and all(previous.get(key, default) == identity.get(key, default)
                        for key, default in _OPTIONAL_IDENTITY.items()))
        if previous is not None and not same:
            if not overwrite:
                raise DscovidError(
                    f"{output_dir}: already holds predictions of another model or setting "
                    f"({_describe_identity(previous)}); choose another output folder or pass --overwrite"
                )
            log.warning("%s: replacing the predictions of another model (--overwrite)", output_dir)
            results, _ = read_records(output_dir)
            for entry in results + list((legacy or {}).get("cases") or []):
                remove_listed_files(output_dir, entry)
            remove_records(output_dir)
            (output_dir / "predictions.json").unlink(missing_ok=True)
            (output_dir / "predictions.csv").unlink(missing_ok=True)
            legacy = None
        if recorded is None or not same:
            for entry in (legacy or {}).get("cases") or []:
                if isinstance(entry, dict) and is_safe_case_name(entry.get("case")):
                    write_result(output_dir, entry)
            write_identity(output_dir, identity)
    remove_stale_temporaries(output_dir, legacy_endings=(".nii.gz", ".tmp", ".dcm", ".png"))


def remove_listed_files(output_dir: Path, entry: Mapping) -> None:
    """Remove the files a case's entry lists, and what else the case may have (a --png montage is not listed).

    Only files directly in the folder, never a path taken from a record; used when the user asked for it
    (``--overwrite`` of another model's predictions).
    """
    name = entry.get("case")
    derived = output_files(name).values() if is_safe_case_name(name) else ()
    for file_name in [*(entry.get("files") or {}).values(), *derived]:
        candidate = output_dir / str(file_name)
        if candidate.parent == output_dir and candidate.is_file():
            candidate.unlink(missing_ok=True)


def rebuild_predictions(output_dir: Path, header: dict, class_names: Sequence[str],
                        unrecorded: Sequence[dict] = ()) -> dict:
    """Write ``predictions.json`` and ``predictions.csv`` from every record of the folder, under its lock.

    ``header`` holds the run's identity and settings; ``unrecorded`` are failures that have no record (none is
    written when even that failed). Returns the ``predictions.json`` dictionary.
    """
    with folder_lock(output_dir):
        results, failures = read_records(output_dir)
        recorded = {failure["case"] for failure in failures}
        failures += [failure for failure in unrecorded if failure["case"] not in recorded]
        summary = {**header, "cases": results, "failed": sorted(failures, key=lambda f: f["case"])}
        return write_predictions(output_dir, summary, class_names)


def write_predictions(output_dir: Path, summary: dict, class_names: Sequence[str]) -> dict:
    """Write ``predictions.json`` (``summary``) and ``predictions.csv`` (one row per case); returns the JSON dict."""
    summary = json_safe(summary)
    write_json_atomic(summary, output_dir / "predictions.json")
    columns = ["case", "predicted_class", *[f"p_{c}" for c in class_names], *REPORT_KEYS, "plausibility"]
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
        row["plausibility"] = (entry.get("plausibility") or {}).get("verdict")
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
