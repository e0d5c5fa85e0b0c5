"""The dataset fingerprint (docs/preprocessing.md §1): ``dataset_fingerprint.json`` in the preprocessed dataset folder.

Per case: original and canonical spacing and shape, orientation (direction matrix and axis codes), the lung
bounding box (voxels on the canonical grid and its size in mm), HU statistics inside the lung and inside the
lesions, and the paper's four lesion findings from :func:`dscovid.measurements.findings.case_findings` (lesion count,
lesion volume ratio, lesion HU distribution, peripheral lesion ratio over erosion thicknesses in mm).
Pooled: class counts, spacing and shape statistics, the median lung box, HU statistics over samples drawn from
every case (at most ``HU_SAMPLES_PER_CASE`` per case, seeded), and the findings' mean and standard deviation
per class.

Lung masks are computed here once (``lungsTr`` else the built-in segmentation) and cached in
``lung_masks/`` for the preprocessor (:mod:`dscovid.preprocessing.lung_cache`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.io.dataset import Case, RawDataset, write_json_atomic
from dscovid.io.image_io import read_image, read_mask
from dscovid.io.strict_json import json_safe
from dscovid.measurements.findings import DEFAULT_THICKNESSES_MM, case_findings
from dscovid.parallel import process_pool, progress_bar
from dscovid.preprocessing.lung_cache import LUNG_CACHE_FOLDER, segment_and_cache
from dscovid.preprocessing.orientation import axis_codes, canonical_geometry, canonical_reorientation, to_canonical
from dscovid.preprocessing.preprocessor import lung_bounding_box

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "dataset_fingerprint.json"
HU_SAMPLES_PER_CASE = 20000
_PERCENTILES = (0.5, 50.0, 99.5)


def intensity_statistics(values: np.ndarray) -> dict:
    """Mean, std, min, max and the 0.5/50/99.5 percentiles of HU values (NaN when there are none)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {"voxels": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"),
                "percentile_00_5": float("nan"), "median": float("nan"), "percentile_99_5": float("nan")}
    low, median, high = np.percentile(values, _PERCENTILES)
    return {"voxels": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_00_5": float(low), "median": float(median), "percentile_99_5": float(high)}


def _sample(values: np.ndarray, count: int, seed_text: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(seed_text.encode("utf-8")))
    if values.size <= count:
        return values.astype(np.float32)
    return rng.choice(values, size=count, replace=False).astype(np.float32)


def fingerprint_case(case: Case, lung_cache_dir: Path | None,
                     thicknesses_mm: Sequence[float] = DEFAULT_THICKNESSES_MM) -> tuple[dict, dict]:
    """The fingerprint entry of one case and its HU samples (``{"lung": array, "lesion": array}``) for pooling."""
    image, geometry = read_image(case.image)
    lesion = read_mask(case.label, reference=geometry)[0] if case.label is not None else None
    lung = segment_and_cache(case, image, geometry, lung_cache_dir)
    reorientation = canonical_reorientation(geometry)
    canonical = canonical_geometry(geometry, reorientation)
    box = lung_bounding_box(to_canonical(lung, reorientation), canonical.spacing_zyx_mm, 0.0)
    box_shape = [b1 - b0 for b0, b1 in box]
    lung_values = image[lung != 0]
    entry = {
        "case": case.name,
        "class_name": case.class_name,
        "lesion_annotated": case.lesion_annotated and case.label is not None,
        "spacing_zyx_mm": list(geometry.spacing_zyx_mm),
        "shape_zyx": list(geometry.shape_zyx),
        "direction": list(geometry.direction),
        "axis_codes": axis_codes(geometry.direction),
        "canonical_spacing_zyx_mm": list(canonical.spacing_zyx_mm),
        "canonical_shape_zyx": list(canonical.shape_zyx),
        "lung_box_zyx": box,
        "lung_box_shape_zyx": box_shape,
        "lung_box_mm_zyx": [float(n * s) for n, s in zip(box_shape, canonical.spacing_zyx_mm)],
        "lung_volume_ml": float(np.count_nonzero(lung)) * float(np.prod(geometry.spacing_zyx_mm)) / 1000.0,
        "hu_lung": intensity_statistics(lung_values),
    }
    samples = {"lung": _sample(lung_values, HU_SAMPLES_PER_CASE, case.name)}
    if entry["lesion_annotated"]:
        lesion_values = image[lesion != 0]
        entry["hu_lesion"] = intensity_statistics(lesion_values)
        samples["lesion"] = _sample(lesion_values, HU_SAMPLES_PER_CASE, case.name + "/lesion")
        findings = case_findings(image, lesion, lung, geometry.spacing_zyx_mm, thicknesses_mm, geometry=geometry)
        findings.pop("lesions", None)  # per-lesion lists are for the analysis report, not for planning
        entry["findings"] = findings
    return entry, samples


def _run(args: tuple[Case, Path | None, tuple[float, ...]]) -> tuple[dict, dict]:
    return fingerprint_case(*args)


def _mean_std(values: Sequence[float]) -> dict:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if values.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan")}
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std())}


def pool_fingerprint(cases: Sequence[dict], samples: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Pooled statistics over the per-case entries (see module docstring)."""
    spacings = np.asarray([c["canonical_spacing_zyx_mm"] for c in cases], dtype=float)
    shapes = np.asarray([c["canonical_shape_zyx"] for c in cases], dtype=float)
    boxes_mm = np.asarray([c["lung_box_mm_zyx"] for c in cases], dtype=float)
    counts = {name: sum(1 for c in cases if c["class_name"] == name) for name in class_names}
    codes: dict[str, int] = {}
    for c in cases:
        codes[c["axis_codes"]] = codes.get(c["axis_codes"], 0) + 1
    findings_per_class = {}
    for name in class_names:
        group = [c["findings"] for c in cases if c["class_name"] == name and "findings" in c]
        if not group:
            continue
        thicknesses = group[0]["plr"]["thickness_mm"]
        findings_per_class[name] = {
            "lesion_count": _mean_std([f["lesion_count"] for f in group]),
            "lesion_volume_ratio": _mean_std([f["lesion_volume_ratio"] for f in group]),
            "lesion_hu_mean": _mean_std([f["hu"].get("mean") for f in group]),
            "peripheral_lesion_ratio": {
                "thickness_mm": thicknesses,
                "mean": [_mean_std([f["plr"]["ratio"][i] for f in group])["mean"] for i in range(len(thicknesses))],
                "std": [_mean_std([f["plr"]["ratio"][i] for f in group])["std"] for i in range(len(thicknesses))],
            },
        }
    lung_samples = np.concatenate([s["lung"] for s in samples]) if samples else np.zeros(0)
    lesion_parts = [s["lesion"] for s in samples if "lesion" in s]
    lesion_samples = np.concatenate(lesion_parts) if lesion_parts else np.zeros(0)
    return {
        "num_cases": len(cases),
        "class_counts": counts,
        "axis_codes": codes,
        "spacings_zyx_mm": spacings.tolist(),
        "median_spacing_zyx_mm": np.median(spacings, axis=0).tolist(),
        "spacing_percentiles_zyx_mm": {str(p): np.percentile(spacings, p, axis=0).tolist() for p in (10, 90)},
        "median_shape_zyx": np.median(shapes, axis=0).tolist(),
        "lung_box_shapes_zyx": [c["lung_box_shape_zyx"] for c in cases],
        "median_lung_box_mm_zyx": np.median(boxes_mm, axis=0).tolist(),
        "hu_lung": intensity_statistics(lung_samples),
        "hu_lesion": intensity_statistics(lesion_samples),
        "findings_per_class": findings_per_class,
    }


def extract_fingerprint(dataset: RawDataset, output_dir: Path, num_processes: int = 1, progress: bool = True,
                        thicknesses_mm: Sequence[float] = DEFAULT_THICKNESSES_MM) -> dict:
    """Fingerprint every training case of ``dataset`` and write ``output_dir/dataset_fingerprint.json``.

    Lung masks made by segmentation are cached in ``output_dir/lung_masks`` for the preprocessor.

    Raises
    ------
    DscovidError
        When the dataset has no case, or a case fails (naming the case: for example no lung found).
    """
    output_dir = Path(output_dir)
    cases = dataset.cases()
    if not cases:
        raise DscovidError(f"{dataset.root}: dataset.json lists no training case")
    cache = output_dir / LUNG_CACHE_FOLDER
    jobs = [(case, cache, tuple(thicknesses_mm)) for case in cases]
    results = []
    bar = progress_bar(total=len(jobs), desc="fingerprint", unit="case", disable=not progress)
    if num_processes > 1 and len(jobs) > 1:
        with process_pool(num_processes) as pool:
            for result in pool.map(_run, jobs):
                results.append(result)
                bar.update()
    else:
        for job in jobs:
            results.append(_run(job))
            bar.update()
    bar.close()
    entries = [entry for entry, _ in results]
    fingerprint = {
        "dataset_name": dataset.name,
        "class_names": dataset.class_names,
        "peripheral_thicknesses_mm": [float(t) for t in thicknesses_mm],
        "pooled": pool_fingerprint(entries, [s for _, s in results], dataset.class_names),
        "cases": {entry["case"]: entry for entry in entries},
    }
    write_json_atomic(json_safe(fingerprint), output_dir / FINGERPRINT_FILE)
    return fingerprint
