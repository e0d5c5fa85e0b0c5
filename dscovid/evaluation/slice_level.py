"""Slice-level check of predicted lesion masks against radiologists' per-slice infection labels (COVID-CT-MD).

COVID-CT-MD has no voxel masks, only one 0/1 label per axial slice ("infection visible"). A predicted
mask is reduced to the same question, "does this slice contain predicted lesion", and compared per
slice: sensitivity over the infected slices, specificity over the clean ones. The labels come from the
raw dataset's ``sliceLabelsTr/<case>.json`` sidecars written by ``dscovid_convert covid_ct_md``
(``infection`` is indexed by the z index of the case's image, as is the predicted mask).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dscovid.errors import DscovidError
from dscovid.io.dataset import load_raw_dataset
from dscovid.io.image_io import Geometry, read_mask

log = logging.getLogger(__name__)

SLICE_LABELS_FOLDER = "sliceLabelsTr"


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict:
    return {
        "slices": tp + fp + tn + fn,
        "reference_positive": tp + fn,
        "predicted_positive": tp + fp,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
    }


def slice_level_metrics(predicted_mask_zyx: np.ndarray, slice_labels: np.ndarray | list[int],
                        min_voxels: int = 1) -> dict:
    """Compare "slice contains predicted lesion" with per-slice reference labels.

    Parameters
    ----------
    predicted_mask_zyx : (Z, Y, X) predicted lesion mask (non-zero = lesion).
    slice_labels : (Z,) reference per axial slice, 1 = infection visible, 0 = not.
    min_voxels : a slice counts as predicted positive when it holds at least this many lesion voxels.

    Returns
    -------
    dict with ``slices``, ``reference_positive``, ``predicted_positive``, the counts ``tp``, ``fp``,
    ``tn``, ``fn`` (in slices), and ``sensitivity`` = tp / (tp + fn), ``specificity`` = tn / (tn + fp),
    ``accuracy``; a ratio whose denominator is 0 (no infected slice, or no clean slice) is ``None``.

    Raises
    ------
    ValueError
        When the number of labels differs from the number of slices, or a label is not 0/1.
    """
    mask = np.asarray(predicted_mask_zyx)
    labels = np.asarray(slice_labels)
    if mask.ndim != 3:
        raise ValueError(f"predicted mask must be (Z, Y, X), got shape {mask.shape}")
    if labels.shape != (mask.shape[0],):
        raise ValueError(f"{labels.size} slice labels for a mask of {mask.shape[0]} slices")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("slice labels must be 0 or 1")
    predicted = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1) >= min_voxels
    reference = labels.astype(bool)
    return _metrics_from_counts(
        tp=int(np.sum(predicted & reference)), fp=int(np.sum(predicted & ~reference)),
        tn=int(np.sum(~predicted & ~reference)), fn=int(np.sum(~predicted & reference)),
    )


def _image_geometry(path: Path) -> Geometry:
    """Geometry of an image from its header only (no voxel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DscovidError(f"{path}: cannot read the image header") from None
    size, spacing = reader.GetSize(), reader.GetSpacing()
    return Geometry(
        shape_zyx=(int(size[2]), int(size[1]), int(size[0])),
        spacing_zyx_mm=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        origin_xyz_mm=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )


def load_slice_labels(raw_dataset_folder: str | os.PathLike) -> dict[str, dict]:
    """The slice-label sidecars of a raw dataset: ``{case: sidecar dict}`` (empty when there are none)."""
    folder = Path(raw_dataset_folder) / SLICE_LABELS_FOLDER
    if not folder.is_dir():
        return {}
    result = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DscovidError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("infection"), list):
            raise DscovidError(f"{path}: must hold an object with an 'infection' list (one 0/1 per slice)")
        result[path.stem] = data
    return result


def evaluate_slice_labels(pred_folder: str | os.PathLike, raw_dataset_folder: str | os.PathLike,
                          min_voxels: int = 1) -> dict:
    """Slice-level sensitivity and specificity of predicted masks over every case with slice labels.

    Parameters
    ----------
    pred_folder : folder with the predicted masks ``<case><file_ending>`` on the original image grids
        (the output of ``dscovid_predict``).
    raw_dataset_folder : the raw dataset whose ``sliceLabelsTr/<case>.json`` hold the reference labels.
    min_voxels : lesion voxels a slice needs to count as predicted positive.

    Returns
    -------
    dict with ``cases`` ({case: metrics of :func:`slice_level_metrics` plus ``class`` and
    ``labelled_by``: ``radiologists`` or ``diagnosis`` for normal cases, whose slices are all clean by
    diagnosis}), ``pooled`` (counts summed over all cases and the ratios from them),
    ``pooled_radiologists`` (the same over radiologist-labelled cases only), ``missing_predictions``
    (cases with labels but no predicted mask) and ``min_voxels``.

    Raises
    ------
    DscovidError
        When the dataset has no slice labels, or a predicted mask is not on its image's grid.
    """
    dataset = load_raw_dataset(raw_dataset_folder)
    sidecars = load_slice_labels(dataset.root)
    if not sidecars:
        raise DscovidError(f"{dataset.root}: no slice labels ({SLICE_LABELS_FOLDER}/<case>.json); "
                           f"convert the dataset with dscovid_convert covid_ct_md")
    pred_folder = Path(pred_folder)
    case_entries = dataset.meta.get("cases", {})
    cases, missing = {}, []
    for case, sidecar in sidecars.items():
        prediction = pred_folder / f"{case}{dataset.file_ending}"
        if not prediction.is_file():
            missing.append(case)
            continue
        image = dataset.image_path(case)
        reference = _image_geometry(image) if image.is_file() else None
        mask, geometry = read_mask(prediction)
        if reference is not None and not reference.matches(geometry):
            raise DscovidError(f"{prediction}: not on the grid of {image} ({reference.describe_difference(geometry)})")
        try:
            metrics = slice_level_metrics(mask, sidecar["infection"], min_voxels=min_voxels)
        except ValueError as error:
            raise DscovidError(f"{prediction}: {error}") from None
        metrics["class"] = case_entries.get(case, {}).get("class")
        metrics["labelled_by"] = sidecar.get("labelled_by", "radiologists")
        cases[case] = metrics
    if missing:
        log.warning("%d case(s) with slice labels have no prediction in %s: %s", len(missing), pred_folder, ", ".join(missing))

    def pooled(selected: list[dict]) -> dict:
        return _metrics_from_counts(*(sum(m[key] for m in selected) for key in ("tp", "fp", "tn", "fn")))

    return {
        "min_voxels": min_voxels,
        "cases": cases,
        "pooled": pooled(list(cases.values())),
        "pooled_radiologists": pooled([m for m in cases.values() if m["labelled_by"] == "radiologists"]),
        "missing_predictions": missing,
    }
