"""Segmentation and classification metrics, in physical units, with a stated treatment of empty masks.

Segmentation (:func:`segmentation_metrics`), per case, on (z, y, x) masks with the voxel spacing in mm:

- ``dsc`` = 2|P∩R| / (|P|+|R|); ``sensitivity`` = |P∩R| / |R|; ``specificity`` = TN / (TN+FP), counted inside an
  optional region of interest (for example the lung), else over the whole volume as the authors did.
- ``nsd``: normalised surface Dice at a tolerance τ mm (Nikolov et al. 2021), computed like DeepMind's
  ``surface-distance``: surface elements (surfels) are the 2×2×2 neighbourhoods that are neither empty nor full, each
  weighted by the area of its marching-cubes triangles scaled by the anisotropic spacing;
  NSD = (area of P's surfels within τ of R's surfels + area of R's within τ of P's) / (total area of both).
- ``hd95`` and ``rmsd``, ``assd`` use the surface *voxels* (a mask minus its 6-connected erosion) as MedPy does, with
  distances between voxel centres in mm: ``hd95`` = 95th percentile of the distances of both directions pooled
  (MedPy's ``hd95``; MONAI and DeepMind take the larger of the two directed percentiles instead), ``assd`` = mean
  of the pooled distances (MedPy's ``assd``), ``rmsd`` = root of the mean of the pooled squared distances (the
  root-mean-square symmetric surface distance of Heimann et al. 2009).

Empty masks (a non-pneumonia case has an empty reference):

=====================  =====  ===========  ===========  =====  ======================
reference, prediction  dsc    sensitivity  specificity  nsd    hd95, rmsd, assd
=====================  =====  ===========  ===========  =====  ======================
both empty             1      NaN          1            1      0
reference empty only   0      NaN          < 1          0      NaN (no surface to reach)
prediction empty only  0      0            1            0      NaN
=====================  =====  ===========  ===========  =====  ======================

NaN means *undefined*; :func:`mean_metrics` averages each metric over the cases where it is defined and reports how
many those were, so an undefined distance is never silently counted as 0 or as infinity.

Classification (:func:`classification_metrics`): accuracy, confusion matrix, and per class (one-vs-rest) and macro
(unweighted mean over the classes where defined) sensitivity, specificity, F1 and AUC.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial, stats

#: Bit of each corner of a 2×2×2 neighbourhood in the neighbourhood code (the layout DeepMind's code uses).
NEIGHBOURHOOD_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)

#: Metrics of :func:`segmentation_metrics`, in the order of tables.
SEGMENTATION_KEYS = ("dsc", "sensitivity", "specificity", "nsd", "rmsd", "hd95", "assd")

#: Floating-point slack (mm) when a distance is compared with the NSD tolerance: a surfel exactly at the tolerance
#: counts as inside however its distance was rounded.
_TOLERANCE_SLACK_MM = 1e-6


@functools.lru_cache(maxsize=1)
def _neighbour_code_area_vectors() -> np.ndarray:
    """(256, 4, 3) area vectors (half cross products, unit spacing) of the marching-cubes triangles of every code.

    Built once from scikit-image's classic (Lorensen) marching cubes on each 2×2×2 configuration. A configuration
    with more than four corners inside takes the triangles of its complement, which keeps the table symmetric under
    inside/outside exchange and equal to the table of DeepMind's ``surface-distance`` (checked in the tests).
    """
    from skimage import measure  # deferred: only needed the first time surfels are measured

    table = np.zeros((256, 4, 3))
    for code in range(1, 255):
        bits = code if bin(code).count("1") <= 4 else 255 - code
        cube = ((bits & NEIGHBOURHOOD_KERNEL) != 0).astype(np.float64)
        vertices, faces, _, _ = measure.marching_cubes(cube, 0.5, method="lorensen")
        a, b, c = (vertices[faces[:, k]] for k in range(3))
        areas = 0.5 * np.cross(b - a, c - a)
        table[code, : len(areas)] = areas
    table.flags.writeable = False
    return table


def surfel_area_table(spacing_zyx_mm: Sequence[float]) -> np.ndarray:
    """(256,) surface area in mm² of the surfel of each neighbourhood code, for a voxel spacing in mm."""
    s0, s1, s2 = (float(v) for v in spacing_zyx_mm)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])  # an area vector's component k scales with the two other spacings
    return np.linalg.norm(_neighbour_code_area_vectors() * scale, axis=2).sum(axis=1)


def _union_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    slices = []
    for axis in range(3):
        other = tuple(k for k in range(3) if k != axis)
        present = np.flatnonzero(np.any(a, axis=other) | np.any(b, axis=other))
        if present.size == 0:
            return None
        slices.append(slice(int(present[0]) - margin, int(present[-1]) + 1 + margin))
    return tuple(slices)


def _crop_padded(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``mask[box]`` where the box may reach past the array: the outside is read as background."""
    out = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    source = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, mask.shape))
    target = tuple(slice(src.start - s.start, src.stop - s.start) for src, s in zip(source, box))
    out[target] = mask[source]
    return out


def _surfels(mask: np.ndarray, spacing: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, 3) in mm and areas (N,) in mm² of the surfels of a mask with a background border."""
    codes = ndimage.correlate(mask.astype(np.uint8), NEIGHBOURHOOD_KERNEL, mode="constant", cval=0)
    border = (codes != 0) & (codes != 255)
    return np.argwhere(border) * spacing, areas[codes[border]]


def _surface_voxels(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Positions (N, 3) in mm of the voxels of a mask that touch the background by a face (MedPy's border)."""
    border = mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    return np.argwhere(border) * spacing


def _nearest_distances(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance (mm) from each of ``points`` to the nearest of ``targets`` (both (N, 3) in mm)."""
    return spatial.cKDTree(targets).query(points, k=1)[0]


def segmentation_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    roi: np.ndarray | None = None,
) -> dict[str, float]:
    """Overlap and surface-distance metrics of a predicted lesion mask against its reference.

    Parameters
    ----------
    prediction, reference : (Z, Y, X) masks on the same grid (non-zero = lesion).
    spacing_zyx_mm : voxel spacing in mm along z, y, x.
    nsd_tolerance_mm : tolerance τ of the normalised surface Dice, in mm.
    roi : optional (Z, Y, X) mask; specificity then counts true negatives and false positives inside it only.

    Returns
    -------
    dict with the keys of :data:`SEGMENTATION_KEYS` (``rmsd``, ``hd95``, ``assd`` in mm; the others in [0, 1]) and
    the voxel counts ``reference_voxels``, ``prediction_voxels``. Empty masks follow the module's table.
    """
    spacing = np.asarray(spacing_zyx_mm, dtype=float)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_zyx_mm must be three positive numbers, got {spacing_zyx_mm!r}")
    prediction = np.asarray(prediction) != 0
    reference = np.asarray(reference) != 0
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    n_pred = int(np.count_nonzero(prediction))
    n_ref = int(np.count_nonzero(reference))
    tp = int(np.count_nonzero(prediction & reference))
    if roi is None:
        negatives = reference.size - n_ref
        false_positives = n_pred - tp
    else:
        roi = np.asarray(roi) != 0
        if roi.shape != reference.shape:
            raise ValueError(f"roi shape {roi.shape} != reference shape {reference.shape}")
        negatives = int(np.count_nonzero(roi & ~reference))
        false_positives = int(np.count_nonzero(roi & prediction & ~reference))
    result = {
        "dsc": 1.0 if n_pred + n_ref == 0 else 2.0 * tp / (n_pred + n_ref),
        "sensitivity": tp / n_ref if n_ref else math.nan,
        "specificity": (negatives - false_positives) / negatives if negatives else math.nan,
    }
    if n_pred == 0 and n_ref == 0:
        result.update(nsd=1.0, rmsd=0.0, hd95=0.0, assd=0.0)
    elif n_pred == 0 or n_ref == 0:
        result.update(nsd=0.0, rmsd=math.nan, hd95=math.nan, assd=math.nan)
    else:
        result.update(_surface_metrics(prediction, reference, spacing, nsd_tolerance_mm))
    result["reference_voxels"] = n_ref
    result["prediction_voxels"] = n_pred
    return result


def _surface_metrics(
    prediction: np.ndarray, reference: np.ndarray, spacing: np.ndarray, tolerance_mm: float
) -> dict[str, float]:
    # Only the region around both masks matters; one background voxel of margin keeps every surface closed.
    box = _union_box(prediction, reference, margin=1)
    prediction = _crop_padded(prediction, box)
    reference = _crop_padded(reference, box)

    areas = surfel_area_table(spacing)
    pred_points, pred_areas = _surfels(prediction, spacing, areas)
    ref_points, ref_areas = _surfels(reference, spacing, areas)
    pred_to_ref = _nearest_distances(pred_points, ref_points)
    ref_to_pred = _nearest_distances(ref_points, pred_points)
    limit = tolerance_mm + _TOLERANCE_SLACK_MM
    overlap = pred_areas[pred_to_ref <= limit].sum() + ref_areas[ref_to_pred <= limit].sum()
    nsd = float(overlap / (pred_areas.sum() + ref_areas.sum()))

    pred_voxels = _surface_voxels(prediction, spacing)
    ref_voxels = _surface_voxels(reference, spacing)
    forward = _nearest_distances(pred_voxels, ref_voxels)
    backward = _nearest_distances(ref_voxels, pred_voxels)
    return {
        "nsd": nsd,
        "rmsd": float(np.sqrt((np.sum(forward**2) + np.sum(backward**2)) / (forward.size + backward.size))),
        "hd95": float(np.percentile(np.concatenate([forward, backward]), 95)),
        "assd": float(np.concatenate([forward, backward]).mean()),
    }


def mean_metrics(per_case: Sequence[Mapping[str, float]], keys: Sequence[str] = SEGMENTATION_KEYS) -> dict:
    """Mean of each metric over the cases where it is defined (NaN values skipped), with the count used.

    Returns
    -------
    ``{"mean": {key: value or NaN}, "std": {...}, "n": {key: number of cases with a defined value}}``.
    """
    mean, std, count = {}, {}, {}
    for key in keys:
        values = np.array([case[key] for case in per_case if key in case], dtype=float)
        values = values[np.isfinite(values)]
        count[key] = int(values.size)
        mean[key] = float(values.mean()) if values.size else math.nan
        std[key] = float(values.std()) if values.size else math.nan
    return {"mean": mean, "std": std, "n": count}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (1 = positive) ranked by ``scores``.

    The Mann-Whitney form: the probability that a random positive scores above a random negative, ties counting
    one half (average ranks). NaN when either class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1).

    Returns NaN arrays when either class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.array([math.nan]), np.array([math.nan])
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # A threshold sits after the last of each run of equal scores, so tied cases enter together.
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels)[last_of_run]
    fps = (last_of_run + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def classification_metrics(
    y_true: Sequence[int] | Sequence[str],
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> dict:
    """Case-level diagnosis metrics, the predicted class being the most probable one.

    Parameters
    ----------
    y_true : (N,) true classes, as indices into ``class_names`` or as names.
    probabilities : (N, C) predicted probabilities (or any scores), column c for ``class_names[c]``.
    class_names : the C class names.

    Returns
    -------
    dict with ``accuracy``, ``confusion_matrix`` (C×C list, rows = true class, columns = predicted),
    ``per_class`` ``{name: {sensitivity, specificity, f1, auc, support}}`` (one class against the rest; a value is
    NaN when undefined: sensitivity and AUC for a class absent from ``y_true``, F1 when the class is neither present
    nor predicted) and ``macro`` (mean over the classes where each value is defined), plus ``n``.
    """
    class_names = list(class_names)
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(class_names):
        raise ValueError(f"probabilities must be (N, {len(class_names)}), got shape {probabilities.shape}")
    truth = np.array([class_names.index(v) if isinstance(v, str) else int(v) for v in y_true], dtype=int)
    if truth.shape[0] != probabilities.shape[0]:
        raise ValueError(f"{truth.shape[0]} true classes for {probabilities.shape[0]} rows of probabilities")
    if truth.size and (truth.min() < 0 or truth.max() >= len(class_names)):
        raise ValueError(f"class indices must be in 0..{len(class_names) - 1}")
    predicted = np.argmax(probabilities, axis=1) if truth.size else truth
    n_classes = len(class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        tp = int(confusion[index, index])
        fn = int(confusion[index].sum()) - tp
        fp = int(confusion[:, index].sum()) - tp
        tn = int(truth.size) - tp - fn - fp
        per_class[name] = {
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
            "auc": roc_auc(truth == index, probabilities[:, index]),
            "support": tp + fn,
        }
    macro = {}
    for key in ("sensitivity", "specificity", "f1", "auc"):
        values = np.array([per_class[name][key] for name in class_names], dtype=float)
        values = values[np.isfinite(values)]
        macro[key] = float(values.mean()) if values.size else math.nan
    return {
        "n": int(truth.size),
        "accuracy": float(np.mean(truth == predicted)) if truth.size else math.nan,
        "confusion_matrix": confusion.tolist(),
        "class_names": class_names,
        "per_class": per_class,
        "macro": macro,
    }
