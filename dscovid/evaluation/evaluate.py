"""Evaluate a prediction folder against reference masks and diagnoses: ``summary.json``, a CSV and figures.

The prediction folder is the output of ``dscovid_predict`` (docs/formats.md §5): ``<case>.nii.gz`` lesion masks and
``predictions.json`` with the class probabilities. The reference is either

- a raw dataset folder (it holds ``dataset.json`` and ``labelsTr/``): masks from ``labelsTr/``, classes from its
  ``dataset.json``; by default the cases evaluated are those of ``predictions.json`` (a fold's held-out cases);
- or a folder of ``<case>.nii.gz`` masks, with classes from an optional ``dataset_json``; by default every mask in it
  is a case to evaluate.

A case without a prediction, or whose predicted mask is on another voxel grid than its reference, is an error
naming the case (nothing is resampled). A case whose lesions were not annotated (``lesion_annotated: false``) counts
for classification only.

Outputs beside ``output_file`` (default ``<prediction folder>/summary.json``): the summary, ``<stem>_cases.csv``,
and, when classes are known, ``<stem>_roc.png`` and ``<stem>_confusion.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.evaluation.metrics import SEGMENTATION_KEYS, classification_metrics, mean_metrics, segmentation_metrics
from dscovid.evaluation.slice_level import SLICE_LABELS_FOLDER, evaluate_slice_labels
from dscovid.io.atomic import write_text_atomic
from dscovid.io.dataset import CLASS_NAMES, load_dataset_json, write_json_atomic
from dscovid.io.image_io import VOLUME_ENDINGS, is_volume_file, read_mask, strip_ending
from dscovid.io.strict_json import json_safe
from dscovid.parallel import map_cases

log = logging.getLogger(__name__)

PREDICTIONS_JSON = "predictions.json"

#: Files the predictor writes beside each ``<case>.nii.gz`` mask (docs/formats.md §5); they are not cases.
_PREDICTION_EXTRAS = ("_evidence", "_lesion_prob", "_lung")


@dataclass(frozen=True)
class CaseJob:
    """What one worker needs to evaluate the segmentation of one case."""

    case: str
    reference: Path
    prediction: Path
    lung: Path | None
    nsd_tolerance_mm: float


def evaluate_case(job: CaseJob) -> dict:
    """Segmentation metrics of one case; the geometry of prediction and lung mask must match the reference."""
    reference, geometry = read_mask(job.reference)
    prediction, predicted_geometry = read_mask(job.prediction)
    if not geometry.matches(predicted_geometry):
        raise DscovidError(
            f"case {job.case}: the predicted mask {job.prediction} is not on the reference grid "
            f"({geometry.describe_difference(predicted_geometry)}); resample it onto the reference first"
        )
    roi = None
    if job.lung is not None:
        roi, lung_geometry = read_mask(job.lung)
        if not geometry.matches(lung_geometry):
            raise DscovidError(
                f"case {job.case}: the lung mask {job.lung} is not on the reference grid "
                f"({geometry.describe_difference(lung_geometry)})"
            )
    result = segmentation_metrics(prediction, reference, geometry.spacing_zyx_mm, job.nsd_tolerance_mm, roi=roi)
    voxel_ml = float(np.prod(geometry.spacing_zyx_mm)) / 1000.0
    result["reference_ml"] = result.pop("reference_voxels") * voxel_ml
    result["prediction_ml"] = result.pop("prediction_voxels") * voxel_ml
    return {"case": job.case, **result}


def _volume_in(folder: Path, case: str, preferred_ending: str = ".nii.gz") -> Path | None:
    for ending in (preferred_ending,) + VOLUME_ENDINGS:
        path = folder / f"{case}{ending}"
        if path.is_file():
            return path
    return None


def _list_masks(folder: Path) -> dict[str, Path]:
    return {strip_ending(p): p for p in sorted(folder.iterdir()) if is_volume_file(p)}


def _load_predictions_json(prediction_dir: Path) -> dict | None:
    path = prediction_dir / PREDICTIONS_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DscovidError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def _shorten(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _class_names(meta: dict) -> list[str]:
    classes = meta.get("classes")
    if not classes:
        return list(CLASS_NAMES)
    return [name for name, _ in sorted(classes.items(), key=lambda item: item[1])]


def evaluate_folder(
    prediction_dir: str | os.PathLike,
    reference: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    *,
    dataset_json: str | os.PathLike | None = None,
    cases: Sequence[str] | None = None,
    lung_dir: str | os.PathLike | None = None,
    nsd_tolerance_mm: float = 1.0,
    num_processes: int = 1,
    plots: bool = True,
) -> dict:
    """Evaluate predicted lesion masks and diagnoses, and write the summary, the per-case CSV and the figures.

    Parameters
    ----------
    prediction_dir : output folder of ``dscovid_predict``.
    reference : a raw dataset folder, or a folder of reference ``<case>.nii.gz`` lesion masks (module docstring).
    output_file : where to write ``summary.json`` (default ``prediction_dir/summary.json``).
    dataset_json : the dataset.json giving each case's class (default: the raw dataset's own, if ``reference`` is one).
    cases : the cases to evaluate (default: see the module docstring).
    lung_dir : optional folder of ``<case>.nii.gz`` lung masks; specificity is then counted inside the lungs.
    nsd_tolerance_mm : tolerance of the normalised surface Dice in mm.
    num_processes : worker processes for the per-case segmentation metrics.
    plots : draw the ROC and confusion-matrix figures.

    Returns
    -------
    The summary written to ``output_file``: ``segmentation`` (``per_case``, ``mean``/``std``/``n`` over all cases,
    ``lesion_cases`` over cases with a non-empty reference, ``by_class``) and ``classification`` (from
    :func:`~dscovid.evaluation.metrics.classification_metrics`, per-case probabilities included; None without
    classes or ``predictions.json``). NaN values are written as ``null``.
    """
    prediction_dir = Path(prediction_dir)
    reference = Path(reference)
    if not prediction_dir.is_dir():
        raise DscovidError(f"{prediction_dir}: prediction folder not found")
    if not reference.is_dir():
        raise DscovidError(f"{reference}: reference folder not found")
    output_file = Path(output_file) if output_file is not None else prediction_dir / "summary.json"
    predictions = _load_predictions_json(prediction_dir)

    is_raw_dataset = (reference / "dataset.json").is_file() and (reference / "labelsTr").is_dir()
    mask_dir = reference / "labelsTr" if is_raw_dataset else reference
    if dataset_json is None and is_raw_dataset:
        dataset_json = reference / "dataset.json"
    meta = load_dataset_json(Path(dataset_json)) if dataset_json is not None else None
    file_ending = meta.get("file_ending", ".nii.gz") if meta else ".nii.gz"
    entries = (meta or {}).get("cases", {})

    if cases is None:
        if is_raw_dataset and predictions is not None:
            cases = [c["case"] for c in predictions.get("cases", [])] + [c["case"] for c in predictions.get("failed", [])]
        elif is_raw_dataset:
            cases = [c for c in _list_masks(prediction_dir) if not c.endswith(_PREDICTION_EXTRAS)]
        else:
            cases = sorted(_list_masks(mask_dir))
    cases = sorted(dict.fromkeys(cases))
    if not cases:
        raise DscovidError(f"{mask_dir}: no cases to evaluate (no reference masks, or no predicted cases)")

    if meta is not None:
        unknown = [c for c in cases if c not in entries]
        if unknown:
            raise DscovidError(f"{dataset_json}: no class for case(s) {_shorten(unknown)}")
    annotated = [c for c in cases if entries.get(c, {}).get("lesion_annotated", True)]

    reference_paths = {c: _volume_in(mask_dir, c, file_ending) for c in annotated}
    absent = [c for c, p in reference_paths.items() if p is None]
    if absent:
        raise DscovidError(f"{mask_dir}: no reference mask for case(s) {_shorten(absent)}")
    failed = {c["case"]: c.get("reason", "") for c in (predictions or {}).get("failed", [])}
    prediction_paths = {c: _volume_in(prediction_dir, c, file_ending) for c in annotated}
    missing = [c for c, p in prediction_paths.items() if p is None]
    if missing:
        reasons = "; ".join(f"{c}: {failed[c]}" for c in missing[:3] if failed.get(c))
        raise DscovidError(
            f"{prediction_dir}: no predicted mask for case(s) {_shorten(missing)}" + (f" (failed: {reasons})" if reasons else "")
        )
    lung_paths: dict[str, Path | None] = {c: None for c in annotated}
    if lung_dir is not None:
        lung_dir = Path(lung_dir)
        lung_paths = {c: _volume_in(lung_dir, c, file_ending) for c in annotated}
        no_lung = [c for c, p in lung_paths.items() if p is None]
        if no_lung:
            raise DscovidError(f"{lung_dir}: no lung mask for case(s) {_shorten(no_lung)}")

    jobs = [CaseJob(c, reference_paths[c], prediction_paths[c], lung_paths[c], nsd_tolerance_mm) for c in annotated]
    per_case = map_cases(evaluate_case, jobs, num_processes, desc="evaluating")

    class_of = {c: entries[c]["class"] for c in cases} if meta is not None else {}
    for row in per_case:
        row["class"] = class_of.get(row["case"])
    segmentation = _segmentation_summary(per_case)
    classification = None
    class_names = _class_names(meta) if meta is not None else None
    # A segmentation-only model (SegmentationTrainer) writes no class probabilities at all: nothing to classify.
    classified = predictions is not None and any(e.get("probabilities") for e in predictions.get("cases", []))
    if meta is not None and classified:
        classification = _classification_summary(cases, class_of, predictions, class_names, prediction_dir)
    elif meta is not None and predictions is not None:
        log.info("%s holds no class probabilities (a segmentation-only model): classification not evaluated",
                 prediction_dir / PREDICTIONS_JSON)
    elif meta is None:
        log.info("No dataset.json: classification is not evaluated (the true classes are unknown)")
    else:
        log.warning("%s: no %s, classification is not evaluated", prediction_dir, PREDICTIONS_JSON)

    summary = {
        "prediction_dir": str(prediction_dir),
        "reference": str(reference),
        "dataset_json": str(dataset_json) if dataset_json is not None else None,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "specificity_region": "lung mask" if lung_dir is not None else "whole volume",
        "num_cases": len(cases),
        "segmentation": segmentation,
        "classification": classification,
    }
    if is_raw_dataset and (reference / SLICE_LABELS_FOLDER).is_dir():
        # Radiologists' per-slice infection labels (COVID-CT-MD): does each slice contain predicted lesion?
        summary["slice_level"] = evaluate_slice_labels(prediction_dir, reference)
    summary = json_safe(summary)
    _write_outputs(summary, output_file, class_names, plots)
    return summary


def _segmentation_summary(per_case: list[dict]) -> dict:
    lesion_cases = [row for row in per_case if row["reference_ml"] > 0]
    by_class: dict[str, dict] = {}
    for name in dict.fromkeys(row["class"] for row in per_case if row["class"] is not None):
        by_class[name] = mean_metrics([row for row in per_case if row["class"] == name])
    return {
        "metrics": list(SEGMENTATION_KEYS),
        **mean_metrics(per_case),
        "lesion_cases": mean_metrics(lesion_cases),
        "by_class": by_class,
        "per_case": per_case,
    }


def _classification_summary(
    cases: Sequence[str], class_of: dict, predictions: dict, class_names: list[str], prediction_dir: Path
) -> dict:
    entries = {c["case"]: c for c in predictions.get("cases", [])}
    missing = [c for c in cases if c not in entries]
    if missing:
        raise DscovidError(f"{prediction_dir / PREDICTIONS_JSON}: no prediction for case(s) {_shorten(missing)}")
    rows = []
    for case in cases:
        probabilities = entries[case].get("probabilities") or {}
        absent = [name for name in class_names if name not in probabilities]
        if absent:
            raise DscovidError(
                f"{prediction_dir / PREDICTIONS_JSON}: case {case} has no probability for class(es) {', '.join(absent)}"
            )
        rows.append([float(probabilities[name]) for name in class_names])
    matrix = np.array(rows, dtype=float)
    truth = [class_names.index(class_of[c]) for c in cases]
    result = classification_metrics(truth, matrix, class_names)
    result["per_case"] = [
        {"case": case, "class": class_of[case], "predicted_class": class_names[int(np.argmax(row))],
         "probabilities": dict(zip(class_names, row))}
        for case, row in zip(cases, matrix.tolist())
    ]
    return result


def _write_outputs(summary: dict, output_file: Path, class_names: list[str] | None, plots: bool) -> None:
    write_json_atomic(summary, output_file)
    stem = output_file.with_suffix("")
    _write_cases_csv(summary, Path(f"{stem}_cases.csv"), class_names or [])
    classification = summary["classification"]
    if plots and classification is not None and classification["n"] > 0:
        from dscovid.evaluation.plots import plot_confusion_matrix, plot_roc_curves

        per_case = classification["per_case"]
        truth = [class_names.index(row["class"]) for row in per_case]
        matrix = np.array([[row["probabilities"][n] for n in class_names] for row in per_case], dtype=float)
        plot_roc_curves(truth, matrix, class_names, Path(f"{stem}_roc.png"))
        plot_confusion_matrix(classification["confusion_matrix"], class_names, Path(f"{stem}_confusion.png"))
    log.info("Evaluation written to %s", output_file)


def _write_cases_csv(summary: dict, path: Path, class_names: Sequence[str]) -> None:
    """One row per case: class, prediction, probabilities and segmentation metrics (empty cell = undefined)."""
    segmentation = {row["case"]: row for row in summary["segmentation"]["per_case"]}
    classification = {row["case"]: row for row in (summary["classification"] or {}).get("per_case", [])}
    columns = ["case", "class", "predicted_class", *[f"p_{n}" for n in class_names], *SEGMENTATION_KEYS,
               "reference_ml", "prediction_ml"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for case in sorted(set(segmentation) | set(classification)):
        row = {"case": case, **segmentation.get(case, {})}
        if case in classification:
            entry = classification[case]
            row.update({"class": entry["class"], "predicted_class": entry["predicted_class"]})
            row.update({f"p_{n}": entry["probabilities"][n] for n in class_names})
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_text_atomic(buffer.getvalue(), path)
