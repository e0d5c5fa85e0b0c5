"""The paper's four findings (section III-B) for any raw dataset: per-case measurements, per-class summaries, figures.

For every case whose lesions are annotated, :func:`dscovid.measurements.findings.case_findings` measures lesion count
and sizes, lesion volume ratio (LVR), lesion HU distribution, spread of the lesion centres and the peripheral lesion
ratio (PLR) over a range of peripheral thicknesses. The lung mask comes from ``lungsTr/`` if present, else from
``lungsReference/`` (the synthetic generator's true lungs), else from the built-in lung segmentation.

The per-class summary pools the cases of each class:

- finding 1 (lesion count): the distribution of lesions per CT;
- finding 2 (lesion volume): mean LVR, share of cases with LVR > 12 %, and every lesion's bounding-box size;
- finding 3 (density): the pooled HU histogram of all lesion voxels and its share in the paper's HU windows;
- finding 4 (distribution): mean spread of the lesion centres per LVR group (2 % wide groups) and the mean PLR
  curve over the cases with lesions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.dataset import Case, RawDataset, load_raw_dataset, write_json_atomic
from dscovid.io.image_io import read_image, read_mask
from dscovid.io.strict_json import json_safe
from dscovid.measurements.findings import HU_BIN_EDGES, HU_WINDOWS, case_findings
from dscovid.parallel import map_cases

log = logging.getLogger(__name__)

#: Peripheral thicknesses of the PLR curve (Fig. 1 i): 0 to 35 mm in 1 mm steps.
PLR_THICKNESSES_MM: tuple[float, ...] = tuple(float(t) for t in range(0, 36))

#: Edges (fractions) of the LVR groups of Fig. 1 (h); the last group is open.
LVR_GROUP_EDGES: tuple[float, ...] = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, math.inf)

#: The LVR above which the paper counts "large" involvement (finding 2).
LARGE_LVR = 0.12

LUNG_REFERENCE_FOLDER = "lungsReference"


@dataclass(frozen=True)
class AnalysisJob:
    case: Case
    lung: Path | None
    lung_source: str
    check_hu: bool
    thicknesses_mm: tuple[float, ...]


def _lung_for(dataset: RawDataset, case: Case) -> tuple[Path | None, str]:
    if case.lung is not None:
        return case.lung, "lungsTr"
    reference = dataset.root / LUNG_REFERENCE_FOLDER / f"{case.name}{dataset.file_ending}"
    if reference.is_file():
        return reference, LUNG_REFERENCE_FOLDER
    return None, "segmented"


def analyze_case(job: AnalysisJob) -> dict:
    """Read one case (image, lesion mask, lung mask or segmentation) and measure its findings."""
    case = job.case
    image, geometry = read_image(case.image, check_hu=job.check_hu)
    lesion, _ = read_mask(case.label, reference=geometry)
    if job.lung is not None:
        lung, _ = read_mask(job.lung, reference=geometry)
    else:
        try:
            from dscovid.preprocessing.lung import segment_lungs
        except ImportError as error:
            raise DscovidError(
                f"case {case.name}: no lung mask in lungsTr/ and the lung segmentation is not available ({error})"
            ) from None
        try:
            lung = segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction)
        except DscovidError as error:
            raise DscovidError(f"case {case.name}: {error}") from None
    result = case_findings(image, lesion, lung, geometry.spacing_zyx_mm, job.thicknesses_mm, geometry=geometry)
    return {"case": case.name, "class": case.class_name, "lung_source": job.lung_source, **result}


def analyze_dataset(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_processes: int = 1,
    thicknesses_mm: Sequence[float] = PLR_THICKNESSES_MM,
    cases: Sequence[str] | None = None,
    figures: bool = True,
) -> dict:
    """Measure the four findings on every annotated case of a raw dataset and write ``findings.json`` and figures.

    Parameters
    ----------
    dataset_dir : a raw dataset folder (dataset.json, imagesTr/, labelsTr/).
    output_dir : where ``findings.json`` and the ``fig1_*.png`` figures go.
    num_processes : worker processes (one case each).
    thicknesses_mm : peripheral thicknesses of the PLR curve.
    cases : only these cases (default: all).
    figures : draw the figures of Fig. 1 (d-i).

    Returns
    -------
    ``{"dataset", "num_cases", "skipped", "classes": {class: summary}, "per_case": [...]}`` as written (NaN → null).
    """
    dataset = load_raw_dataset(dataset_dir)
    selected = dataset.cases()
    if cases is not None:
        known = {c.name for c in selected}
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise DscovidError(f"{dataset.root / 'dataset.json'}: no case(s) {', '.join(unknown[:10])}")
        selected = [c for c in selected if c.name in set(cases)]
    skipped = [c.name for c in selected if not c.lesion_annotated or c.label is None]
    for case in selected:
        if case.lesion_annotated and case.label is None:
            log.warning("%s: lesion_annotated but no labelsTr mask; left out of the analysis", case.name)
    jobs = []
    for case in selected:
        if case.name in skipped:
            continue
        lung, source = _lung_for(dataset, case)
        jobs.append(AnalysisJob(case, lung, source, dataset.is_hu, tuple(float(t) for t in thicknesses_mm)))
    if not jobs:
        raise DscovidError(f"{dataset.root}: no case with an annotated lesion mask to analyse")
    sources = sorted({job.lung_source for job in jobs})
    log.info("Analysing %d cases of %s (lung masks: %s)", len(jobs), dataset.name, ", ".join(sources))
    per_case = map_cases(analyze_case, jobs, num_processes, desc="analysing")
    classes = [name for name in dataset.class_names if any(row["class"] == name for row in per_case)]
    summary = {
        "dataset": dataset.name,
        "intensity_unit": "HU" if dataset.is_hu else "not_HU",
        "num_cases": len(per_case),
        "skipped": skipped,
        "lung_sources": sources,
        "plr_thickness_mm": [float(t) for t in thicknesses_mm],
        "hu_bin_edges": HU_BIN_EDGES.tolist(),
        "lvr_group_edges": [e if math.isfinite(e) else None for e in LVR_GROUP_EDGES],
        "classes": {name: summarize_class([row for row in per_case if row["class"] == name]) for name in classes},
        "per_case": per_case,
    }
    summary = json_safe(summary)
    output_dir = Path(output_dir)
    write_json_atomic(summary, output_dir / "findings.json")
    if figures:
        from dscovid.analysis.figures import draw_findings_figures

        draw_findings_figures(summary, output_dir)
    log.info("Findings written to %s", output_dir)
    return summary


def _finite(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([v for v in values if v is not None], dtype=float)
    return array[np.isfinite(array)]


def _stats(values: Sequence[float | None]) -> dict:
    array = _finite(values)
    if array.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan}
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()),
            "median": float(np.median(array))}


def summarize_class(rows: Sequence[dict]) -> dict:
    """Pool the per-case findings of one class (see the module docstring)."""
    with_lesion = [row for row in rows if row["lesion_count"] > 0]
    counts = [row["lesion_count"] for row in rows]
    lvr = _finite([row["lesion_volume_ratio"] for row in rows])
    histogram = np.sum([row["hu"]["histogram"] for row in rows], axis=0) if rows else np.zeros(len(HU_BIN_EDGES) - 1)
    total = float(histogram.sum())
    voxels = sum(row["hu"]["voxels"] for row in rows)
    windows = {}
    for name in HU_WINDOWS:
        shares = [(row["hu"][f"fraction_{name}"], row["hu"]["voxels"]) for row in rows if row["hu"]["voxels"]]
        windows[name] = sum(s * n for s, n in shares) / voxels if voxels else math.nan
    groups = []
    for low, high in zip(LVR_GROUP_EDGES[:-1], LVR_GROUP_EDGES[1:]):
        members = [row for row in with_lesion if low <= (row["lesion_volume_ratio"] or 0.0) < high]
        groups.append({"lvr_low": low, "lvr_high": high if math.isfinite(high) else None,
                       "spread_mm": _stats([row["spread_mm"] for row in members])})
    plr = np.array([row["plr"]["ratio"] for row in with_lesion], dtype=float) if with_lesion else np.zeros((0, 0))
    with np.errstate(invalid="ignore"):
        plr_mean = np.nanmean(plr, axis=0).tolist() if plr.size else []
        plr_std = np.nanstd(plr, axis=0).tolist() if plr.size else []
    sizes = [lesion["bbox_size_zyx_mm"] for row in rows for lesion in row.get("lesions", [])]
    return {
        "num_cases": len(rows),
        "num_cases_with_lesion": len(with_lesion),
        "lesion_count": {**_stats(counts), "values": counts},
        "lesion_volume_ml": _stats([row["lesion_volume_ml"] for row in rows]),
        "lesion_volume_ratio": {**_stats(lvr), "share_above_12_percent": float(np.mean(lvr > LARGE_LVR))
                                if lvr.size else math.nan, "values": lvr.tolist()},
        "lesion_bbox_size_zyx_mm": sizes,
        "hu": {"voxels": int(voxels), "histogram": histogram.astype(int).tolist(),
               "density": (histogram / total).tolist() if total else [],
               "window_fractions": windows,
               "mean": _stats([row["hu"]["mean"] for row in rows])},
        "spread_by_lvr_group": groups,
        "spread_mm": _stats([row["spread_mm"] for row in with_lesion]),
        "plr": {"mean": plr_mean, "std": plr_std, "n": len(with_lesion)},
    }
