"""A per-case picture of a prediction: axial slices through the lesions with the outlines and the evidence map.

Top row: the CT (lung window) with the predicted lesion outline (red) and, when known, the reference outline
(green, dashed). Bottom row: the same slices with the evidence map of the predicted class (equation 5, arbitrary
units, scaled to the case's 99.5th percentile) as a heat overlay and the predicted outline. The title gives the
predicted class, the true class when known, the class probabilities, the lesion count and volume, and the six-zone
severity score with the MosMedData category. Slices are drawn in the radiological convention (patient's right on the
left of the picture, anterior at the top) whatever the stored orientation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # montages are written by batch jobs without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dscovid.errors import DscovidError  # noqa: E402
from dscovid.io.atomic import atomic_path
from dscovid.io.image_io import Geometry, read_image, read_mask  # noqa: E402
from dscovid.preprocessing.orientation import canonical_reorientation, to_canonical  # noqa: E402

log = logging.getLogger("dscovid.inference")

#: Lung window (level -600 HU, width 1500 HU), the usual setting for reading ground glass.
LUNG_WINDOW_HU = (-1350.0, 150.0)
PREDICTION_COLOUR = "#ff3030"
REFERENCE_COLOUR = "#30ff60"


def montage_file_name(case: str) -> str:
    """The montage's file name beside a case's predictions (``<case>_montage.png``)."""
    return f"{case}_montage.png"  # also in dscovid.prediction.output_folder.output_files, which removes it


def select_slices(weight_zyx: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` distinct axial slices through where ``weight_zyx`` lies: every separate group first.

    The slices holding weight form runs of consecutive slices (one lesion, or touching ones). The heaviest slice of
    each run is taken, heaviest runs first, so a small lesion far from a large one still gets a panel; slices left
    over are spread through the weight (the heaviest slice of each of equal-weight shares, in z order), at least
    ``(slices holding weight) / (2 count)`` slices away from those already chosen.

    Parameters
    ----------
    weight_zyx : (Z, Y, X) non-negative array (a mask or an evidence map).
    count : number of slices wanted (>= 1).

    Returns
    -------
    Sorted slice indices; empty when ``weight_zyx`` is all zero.
    """
    per_slice = np.asarray(weight_zyx, dtype=np.float64).reshape(weight_zyx.shape[0], -1).sum(axis=1)
    if per_slice.sum() <= 0 or count < 1:
        return []
    present = per_slice > 0
    starts = np.flatnonzero(present & ~np.concatenate(([False], present[:-1])))
    ends = np.flatnonzero(present & ~np.concatenate((present[1:], [False])))
    runs = sorted(zip(starts, ends), key=lambda run: -per_slice[run[0]:run[1] + 1].sum())
    chosen = {int(a + np.argmax(per_slice[a:b + 1])) for a, b in runs[:count]}
    # Neighbours of a chosen slice look the same: keep the others at least this far apart.
    gap = max(1, int(present.sum()) // (2 * count))
    remaining = per_slice.copy()

    def exclude_near_chosen() -> None:
        for z in chosen:
            remaining[max(0, z - gap + 1):z + gap] = 0

    exclude_near_chosen()
    while len(chosen) < count and remaining.sum() > 0:
        wanted = count - len(chosen)
        cumulative = np.cumsum(remaining) / remaining.sum()
        group = np.minimum((cumulative - remaining / remaining.sum() / 2) * wanted, wanted - 1e-9).astype(int)
        for k in range(wanted):
            members = np.flatnonzero((group == k) & (remaining > 0))
            if members.size:
                best = int(members[np.argmax(remaining[members])])
                if remaining[best] > 0:
                    chosen.add(best)
                    exclude_near_chosen()
    return sorted(chosen)


def _body_box(image_yx_max: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane box around everything denser than air (the patient and the table), for a tighter picture."""
    inside = image_yx_max > -500
    if not inside.any():
        return slice(None), slice(None)
    ys, xs = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    return (slice(max(0, ys[0] - margin), ys[-1] + margin + 1), slice(max(0, xs[0] - margin), xs[-1] + margin + 1))


def _title(case: str, predicted_class: str | None, probabilities: Mapping[str, float] | None,
           true_class: str | None, report: Mapping[str, object] | None) -> tuple[str, str]:
    verdict = f"predicted {predicted_class}" if predicted_class else "no class predicted"
    if true_class is not None:
        verdict += f"  |  true {true_class}" + ("  (correct)" if true_class == predicted_class else "  (WRONG)")
    probability_text = "   ".join(f"P({name}) = {value:.3f}" for name, value in (probabilities or {}).items())
    details = []
    if report:
        if report.get("lesion_count") is not None:
            details.append(f"{report['lesion_count']} predicted lesion(s)")
        if report.get("lesion_volume_ml") is not None:
            details.append(f"{float(report['lesion_volume_ml']):.1f} ml")
        if report.get("severity_score") is not None:
            details.append(f"severity {int(report['severity_score'])}/24 ({report.get('mosmed_category')})")
        head = report.get("findings_head")
        if isinstance(head, Mapping) and predicted_class in (head.get("logit_term") or {}):
            details.append(f"findings head {float(head['logit_term'][predicted_class]):+.2f} to its logit")
    return f"{case}: {verdict}", "   ".join(filter(None, [probability_text, ", ".join(details)]))


def render_montage(
    image_hu: np.ndarray,
    geometry: Geometry,
    prediction: np.ndarray,
    output_path: str | os.PathLike,
    *,
    evidence: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    case: str = "",
    predicted_class: str | None = None,
    probabilities: Mapping[str, float] | None = None,
    true_class: str | None = None,
    report: Mapping[str, object] | None = None,
    num_slices: int = 4,
    dpi: int = 90,
) -> Path:
    """Draw the montage of one case and write it as a PNG (atomically).

    Parameters
    ----------
    image_hu : (Z, Y, X) CT in HU on the case's original grid.
    geometry : the grid's Geometry (spacing and direction; used to orient and scale the slices).
    prediction : (Z, Y, X) predicted lesion mask (0/1), same grid.
    output_path : the PNG to write.
    evidence : (Z, Y, X) evidence map of the predicted class, same grid, or None.
    reference : (Z, Y, X) reference lesion mask, or None (a prediction has none).
    case, predicted_class, probabilities, true_class, report : what the title says (``report`` may hold the
        predictor's ``lesion_count`` and ``lesion_volume_ml``).
    num_slices : axial slices drawn (fewer when the lesions span fewer slices).

    Returns
    -------
    ``output_path`` as a Path.
    """
    arrays = {"prediction": prediction, "evidence": evidence, "reference": reference}
    for name, array in arrays.items():
        if array is not None and tuple(array.shape) != tuple(image_hu.shape):
            raise DscovidError(f"{case or output_path}: {name} has shape {tuple(array.shape)}, "
                               f"the image {tuple(image_hu.shape)}")
    reorientation = canonical_reorientation(geometry)
    spacing = np.asarray(geometry.spacing_zyx_mm, dtype=float)[list(reorientation.transpose_zyx)]
    image = to_canonical(np.asarray(image_hu), reorientation)
    predicted = to_canonical(np.asarray(prediction) > 0, reorientation)
    truth = to_canonical(np.asarray(reference) > 0, reorientation) if reference is not None else None
    heat = to_canonical(np.asarray(evidence, dtype=np.float32), reorientation) if evidence is not None else None

    lesions = predicted | truth if truth is not None else predicted
    slices = select_slices(lesions, num_slices)
    if not slices and heat is not None:
        slices = select_slices(np.clip(heat, 0, None), num_slices)  # no lesion: where the classifier looked
    if not slices:
        slices = sorted({int(round(f * (image.shape[0] - 1))) for f in np.linspace(0.3, 0.7, num_slices)})
    rows_box, cols_box = _body_box(image.max(axis=0))
    heat_scale = None
    if heat is not None:
        positive = heat[heat > 0]
        heat_scale = float(np.percentile(positive, 99.5)) if positive.size else None

    rows = 2 if heat is not None else 1
    box_shape = image[0, rows_box, cols_box].shape
    panel_aspect = box_shape[0] * spacing[1] / max(1e-6, box_shape[1] * spacing[2])
    panel_in = 3.2
    panel_width_in = panel_in * 0.99 - 0.02 * panel_in  # what is left of a column after the margins and gaps
    top_in, bottom_in, gap_in = 0.65, 0.45, 0.06  # title and panel titles, footnote, between the rows
    row_in = panel_width_in * panel_aspect
    height = top_in + bottom_in + rows * row_in + (rows - 1) * gap_in
    figure, axes = plt.subplots(rows, len(slices), figsize=(panel_in * len(slices), height), squeeze=False)
    figure.subplots_adjust(left=0.005, right=0.995, top=1 - top_in / height, bottom=bottom_in / height, wspace=0.02,
                           hspace=gap_in / row_in)
    figure.patch.set_facecolor("black")
    for column, z in enumerate(slices):
        ct = image[z, rows_box, cols_box]
        for row in range(rows):
            axis = axes[row, column]
            axis.imshow(ct, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1],
                        aspect=spacing[1] / spacing[2], interpolation="bilinear")
            if row == 1 and heat is not None and heat_scale:
                level = np.clip(heat[z, rows_box, cols_box] / heat_scale, 0.0, 1.0)
                colours = plt.get_cmap("inferno")(level)
                colours[..., 3] = 0.65 * level
                axis.imshow(colours, aspect=spacing[1] / spacing[2], interpolation="bilinear")
            if predicted[z].any():
                axis.contour(predicted[z, rows_box, cols_box], levels=[0.5], colors=PREDICTION_COLOUR,
                             linewidths=1.0)
            if row == 0 and truth is not None and truth[z].any():
                axis.contour(truth[z, rows_box, cols_box], levels=[0.5], colors=REFERENCE_COLOUR,
                             linewidths=1.0, linestyles="dashed")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                area = predicted[z].sum() * spacing[1] * spacing[2] / 100.0
                axis.set_title(f"axial {z + 1}/{image.shape[0]}  pred {area:.1f} cm²", color="white", fontsize=8)
    headline, details = _title(case, predicted_class, probabilities, true_class, report)
    legend = "red: predicted lesion" + ("   green dashed: reference" if truth is not None else "")
    legend += "   bottom row: evidence map" if heat is not None else ""
    colour = "white" if true_class is None else ("#7CFC00" if true_class == predicted_class else "#ff6060")
    figure.suptitle(headline, color=colour, fontsize=11, y=1 - 0.08 / height, va="top")
    figure.text(0.5, 0.04 / height, f"{details}\n{legend}   (radiological view: patient's right on the left)",
                color="white", fontsize=7.5, ha="center", va="bottom")
    path = Path(output_path)
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=dpi, facecolor="black")
    finally:
        plt.close(figure)
    return path


def save_prediction_montage(
    image_path: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    entry: Mapping[str, object],
    output_path: str | os.PathLike | None = None,
    *,
    reference_path: str | os.PathLike | None = None,
    true_class: str | None = None,
    num_slices: int = 4,
) -> Path:
    """The montage of one case of a ``dscovid_predict`` output folder (docs/formats.md §5).

    Parameters
    ----------
    image_path : the case's input scan (anything :func:`dscovid.io.image_io.read_image` reads).
    prediction_dir : the prediction folder holding the case's mask and evidence map.
    entry : the case's entry of ``predictions.json`` (``case``, ``predicted_class``, ``probabilities``, ``files``).
    output_path : default ``prediction_dir/<case>_montage.png``.
    reference_path : the reference lesion mask, when there is one (evaluation, the demo).
    true_class : the true diagnosis, when known.

    Returns
    -------
    The PNG written.
    """
    prediction_dir = Path(prediction_dir)
    case = str(entry["case"])
    files = dict(entry.get("files") or {})
    mask_path = prediction_dir / str(files.get("mask", f"{case}.nii.gz"))
    if not mask_path.is_file():
        raise DscovidError(f"{mask_path}: predicted mask of {case} not found")
    image_hu, geometry = read_image(image_path)
    prediction, _ = read_mask(mask_path)
    evidence = None
    if files.get("evidence") and (prediction_dir / str(files["evidence"])).is_file():
        evidence, _ = read_image(prediction_dir / str(files["evidence"]), check_hu=False)
    reference = read_mask(reference_path)[0] if reference_path is not None else None
    output_path = Path(output_path) if output_path is not None else prediction_dir / montage_file_name(case)
    return render_montage(
        image_hu, geometry, prediction, output_path, evidence=evidence, reference=reference, case=case,
        predicted_class=entry.get("predicted_class"), probabilities=entry.get("probabilities"),
        true_class=true_class, report=entry, num_slices=num_slices,
    )


def save_montages(
    prediction_dir: str | os.PathLike,
    entries: Sequence[Mapping[str, object]],
    image_paths: Mapping[str, str | os.PathLike],
    *,
    reference_paths: Mapping[str, str | os.PathLike] | None = None,
    true_classes: Mapping[str, str] | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Montages of several predicted cases; returns ``{case: png}``. A case without its input scan is an error."""
    from dscovid.parallel import progress_bar

    missing = [str(e["case"]) for e in entries if str(e["case"]) not in image_paths]
    if missing:
        raise DscovidError(f"no input scan for case(s) {', '.join(missing[:10])}")
    target = Path(output_dir) if output_dir is not None else Path(prediction_dir)
    written = {}
    for entry in progress_bar(entries, desc="montages", unit="case", disable=not progress):
        case = str(entry["case"])
        written[case] = save_prediction_montage(
            image_paths[case], prediction_dir, entry, target / montage_file_name(case),
            reference_path=(reference_paths or {}).get(case), true_class=(true_classes or {}).get(case),
        )
    return written
