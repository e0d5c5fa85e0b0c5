"""The preprocessor (docs/preprocessing.md, docs/formats.md §2 and §4) and its exact inverse.

Per case, in this order:

1. reorient to the canonical orientation (axis permutation and flips only, :mod:`.orientation`);
2. crop to the lung bounding box plus a margin in mm;
3. clip HU to the window and scale to [0, 1];
4. resample image (trilinear) and masks (linear, then threshold 0.5) to the target spacing;
5. set the image to 0 outside the region the network sees: the (resampled) lung grown by ``lung_margin_mm``
   (``region``; the lung itself with a margin of 0, as the paper multiplies the CT by its lung mask). A classical
   lung mask can leave the outer part of a consolidation against the mediastinum or the chest wall out; the
   margin lets the network see and segment it. Lesion voxels outside the region are invisible and are dropped
   from the training target, so the network is never asked to find lesion in a blanked area;
6. resample image and lesion mask onto the classification grid (``cls_image``, ``cls_lesion``);
7. sample up to ``num_lesion_samples`` lesion voxels (seeded by the case name) for foreground oversampling.

:func:`preprocess_image` does this for one array (the predictor reuses it for unseen scans);
:func:`restore_to_original` maps any array on the preprocessed grid back onto the original grid.
:func:`preprocess_dataset` runs a whole raw dataset into the cache with worker processes, atomic writes and a
re-run that only redoes missing or stale cases.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import edt
import numpy as np
import torch

from dscovid.errors import DscovidError
from dscovid.io.atomic import remove_stale_temporaries
from dscovid.io.dataset import Case, RawDataset, case_file, write_json_atomic
from dscovid.io.image_io import Geometry, read_image, read_mask
from dscovid.io.stamps import digest, file_stamp
from dscovid.parallel import process_pool, progress_bar
from dscovid.plans.configuration import Configuration, Plans
from dscovid.preprocessing.lung_cache import LUNG_CACHE_FOLDER, npz_problem, save_npz_atomic, segment_and_cache
from dscovid.preprocessing.orientation import (
    Reorientation,
    axis_codes,
    canonical_geometry,
    canonical_reorientation,
    from_canonical,
    to_canonical,
)
from dscovid.preprocessing.resampling import (
    resample_image,
    resample_mask,
    resample_masks,
    resample_on_device,
    resample_to_grid,
    shape_for_spacing,
)

log = logging.getLogger(__name__)

#: Version of the cache layout; a change makes every cached case stale.
CACHE_FORMAT_VERSION = 2


def _as_configuration(configuration: Configuration | Mapping, name: str = "configuration") -> Configuration:
    if isinstance(configuration, Configuration):
        return configuration
    return Configuration.from_dict(name, configuration)


def lung_bounding_box(lung: np.ndarray, spacing_zyx_mm: Sequence[float], margin_mm: float) -> list[list[int]]:
    """``[[z0, z1], [y0, y1], [x0, x1]]`` (half-open voxel ranges) of the lung plus ``margin_mm``, inside the array."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.any(lung, axis=other))
        if present.size == 0:
            raise DscovidError("the lung mask is empty")
        margin = int(math.ceil(margin_mm / float(spacing_zyx_mm[axis]) - 1e-9))
        box.append([max(0, int(present[0]) - margin), min(lung.shape[axis], int(present[-1]) + 1 + margin)])
    return box


def grow_mask(mask: np.ndarray, spacing_zyx_mm: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` (uint8 0/1) grown by ``margin_mm`` (Euclidean distance in mm, computed inside its bounding box).

    The distance transform is the ``edt`` package's (exact, like SciPy's, in float32 and on every core: on the
    paper's 0.8 mm grid SciPy's took most of the preprocessing; docs/prediction.md)."""
    mask = np.asarray(mask, dtype=np.uint8)
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    # The box reaches one voxel beyond the margin on every axis, so nothing the margin reaches is cut off.
    box = tuple(slice(b0, b1) for b0, b1 in lung_bounding_box(mask, spacing_zyx_mm, margin_mm + max(spacing_zyx_mm)))
    grown = np.zeros_like(mask)
    distance = edt.edt(mask[box] == 0, anisotropy=tuple(float(s) for s in spacing_zyx_mm), black_border=False,
                       parallel=torch.get_num_threads())
    grown[box] = distance <= margin_mm
    return grown


def _scale_window(image: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    low, high = hu_window
    scaled = np.array(image, dtype=np.float32)  # one float32 copy, then everything in place
    np.clip(scaled, low, high, out=scaled)
    scaled -= np.float32(low)
    scaled *= np.float32(1.0 / (high - low))
    return scaled


def _sample_locations(mask: np.ndarray, count: int, seed_text: str) -> list[list[int]]:
    if count <= 0 or not mask.any():
        return []
    flat = np.flatnonzero(mask)
    rng = np.random.default_rng(zlib.crc32(seed_text.encode("utf-8")))
    if flat.size > count:
        flat = np.sort(rng.choice(flat, size=count, replace=False))
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(int).tolist()


def _preprocessed_geometry(canonical: Geometry, box: list[list[int]], shape_zyx: Sequence[int]) -> Geometry:
    """World geometry of the resampled crop (cell-centred: the crop's outer faces are kept)."""
    spacing_c = np.asarray(canonical.spacing_zyx_mm)
    start = np.asarray([b[0] for b in box], dtype=float)
    cropped = np.asarray([b[1] - b[0] for b in box], dtype=float)
    new_spacing = cropped * spacing_c / np.asarray(shape_zyx, dtype=float)
    # Voxel 0 of the new grid is centred half a new voxel inside the crop's first face.
    first_centre_index = start - 0.5 + 0.5 * new_spacing / spacing_c
    origin = canonical.index_to_world_matrix() @ np.append(first_centre_index, 1.0)
    return Geometry(tuple(int(v) for v in shape_zyx), tuple(float(v) for v in new_spacing),
                    tuple(float(v) for v in origin[:3]), canonical.direction)


def preprocess_image(
    image_hu: np.ndarray,
    geometry: Geometry,
    plans_configuration: Configuration | Mapping,
    lung: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    case_name: str = "case",
) -> tuple[dict[str, np.ndarray], dict]:
    """Preprocess one CT (and optionally its lesion mask) onto the configuration's grid.

    Parameters
    ----------
    image_hu : (Z, Y, X) CT in HU on ``geometry``'s grid.
    geometry : the image's voxel grid (from :func:`dscovid.io.image_io.read_image`).
    plans_configuration : one configuration of a plans file (dict or :class:`Configuration`).
    lung : optional (Z, Y, X) 0/1 lung mask on the same grid; when absent,
        :func:`dscovid.preprocessing.lung.segment_lungs` makes one.
    lesion : optional (Z, Y, X) 0/1 lesion mask on the same grid (training); absent means all zero.
    case_name : used in messages and to seed the lesion voxel sampling.

    Returns
    -------
    arrays : ``image`` float32 (Z', Y', X') in [0, 1], ``lesion``, ``lung`` and ``region`` (where the image is
        kept: the lung grown by ``lung_margin_mm``, everything without ``mask_outside_lung``) uint8 (Z', Y', X'),
        ``cls_image`` and ``cls_lesion`` float32 (N, H, W).
    properties : JSON-serialisable dict with everything :func:`restore_to_original` needs, plus
        ``lesion_locations_zyx`` and ``timing_s`` (seconds per step).
    """
    configuration = _as_configuration(plans_configuration)
    settings = configuration.preprocessing
    if tuple(image_hu.shape) != tuple(geometry.shape_zyx):
        raise DscovidError(f"{case_name}: image shape {image_hu.shape} does not match its geometry {geometry.shape_zyx}")
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timing[step] = timing.get(step, 0.0) + now - clock
        clock = now

    if lung is None:
        from dscovid.preprocessing.lung import segment_lungs  # imported late: heavy

        lung = np.asarray(segment_lungs(image_hu, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
        lap("lung_mask")
    for name, mask in (("lung", lung), ("lesion", lesion)):
        if mask is not None and tuple(mask.shape) != tuple(image_hu.shape):
            raise DscovidError(f"{case_name}: {name} mask shape {mask.shape} does not match the image {image_hu.shape}")
    if not np.any(lung):
        raise DscovidError(f"{case_name}: no lung found (is this a chest CT?)")

    reorientation = canonical_reorientation(geometry)
    canonical = canonical_geometry(geometry, reorientation)
    image_c = to_canonical(image_hu, reorientation)
    lung_c = to_canonical(lung, reorientation)
    lesion_c = to_canonical(lesion, reorientation) if lesion is not None else None
    lap("reorient")

    box = lung_bounding_box(lung_c, canonical.spacing_zyx_mm, settings.crop_margin_mm)
    crop = tuple(slice(b0, b1) for b0, b1 in box)
    cropped_shape = tuple(b1 - b0 for b0, b1 in box)
    lap("crop")
    image = _scale_window(image_c[crop], settings.hu_window)
    lap("normalise")

    target_shape = shape_for_spacing(cropped_shape, canonical.spacing_zyx_mm, settings.target_spacing_zyx_mm)
    image = resample_image(image, target_shape)
    if lesion_c is not None:
        lung_r, lesion_r = resample_masks((lung_c[crop], lesion_c[crop]), target_shape)
    else:
        lung_r, lesion_r = resample_mask(lung_c[crop], target_shape), np.zeros(target_shape, dtype=np.uint8)
    lap("resample")
    if settings.mask_outside_lung:
        region = grow_mask(lung_r, settings.target_spacing_zyx_mm, settings.lung_margin_mm)
        image *= region  # the paper multiplies the CT by the lung mask
        lesion_r = lesion_r & region
    else:
        region = np.ones_like(lung_r)
    lap("normalise")

    cls_image = resample_to_grid(image, configuration.classification.grid_zyx)
    cls_lesion = resample_to_grid(lesion_r, configuration.classification.grid_zyx, sparse=True)
    lap("classification_grid")
    locations = _sample_locations(lesion_r, settings.num_lesion_samples, case_name)
    lap("sample_lesions")

    arrays = {"image": image, "lesion": lesion_r, "lung": lung_r, "region": region, "cls_image": cls_image,
              "cls_lesion": cls_lesion}
    properties = {
        "case": case_name,
        "cache_format": CACHE_FORMAT_VERSION,
        "configuration": configuration.name,
        "original_geometry": geometry.to_dict(),
        "original_axis_codes": axis_codes(geometry.direction),
        "reorientation": reorientation.to_dict(),
        "canonical_geometry": canonical.to_dict(),
        "crop_box_zyx": box,
        "shape_after_crop_zyx": list(cropped_shape),
        "spacing_after_crop_zyx_mm": list(canonical.spacing_zyx_mm),
        "shape_after_resampling_zyx": list(target_shape),
        "target_spacing_zyx_mm": list(settings.target_spacing_zyx_mm),
        "preprocessed_geometry": _preprocessed_geometry(canonical, box, target_shape).to_dict(),
        "hu_window": list(settings.hu_window),
        "grid_zyx": list(configuration.classification.grid_zyx),
        "lesion_voxels": int(np.count_nonzero(lesion_r)),
        "lung_voxels": int(np.count_nonzero(lung_r)),
        "lung_margin_mm": settings.lung_margin_mm if settings.mask_outside_lung else 0.0,
        "lesion_locations_zyx": locations,
        "timing_s": {key: round(value, 4) for key, value in timing.items()},
    }
    return arrays, properties


def crop_slices(properties: Mapping) -> tuple[slice, slice, slice]:
    """The crop box of :func:`preprocess_image` on the canonical grid, as slices."""
    return tuple(slice(int(b0), int(b1)) for b0, b1 in properties["crop_box_zyx"])


def original_crop_slices(properties: Mapping) -> tuple[slice, slice, slice]:
    """The same crop box on the ORIGINAL grid (array axes and directions of the input scan), as slices.

    Every voxel the preprocessed grid covers lies inside it, so a map restored from the preprocessed grid is 0
    outside it: measurements and thresholds can run on this box instead of the whole scan.
    """
    reorientation = Reorientation.from_dict(properties["reorientation"])
    canonical_shape = properties["canonical_geometry"]["shape_zyx"]
    box = [None, None, None]
    for c, ((b0, b1), axis, flip) in enumerate(zip(properties["crop_box_zyx"], reorientation.transpose_zyx,
                                                  reorientation.flip_zyx)):
        n = int(canonical_shape[c])
        box[axis] = slice(n - int(b1), n - int(b0)) if flip else slice(int(b0), int(b1))
    return tuple(box)


def restore_crop(
    array_preprocessed: np.ndarray,
    properties: Mapping,
    threshold: float | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Resample a (Z', Y', X') array on the preprocessed grid to the crop box, in the ORIGINAL orientation.

    The part of :func:`restore_to_original` that is not zero: linear interpolation (cell-centred) to the cropped
    shape, then, with ``threshold``, ``>= threshold`` as uint8 0/1 (a mask: 0.5, as :func:`resample_mask`; a
    probability: its cut-off); the result is laid out as the box :func:`original_crop_slices` of the input's grid.
    ``device`` runs the interpolation and the threshold there (a CUDA device: the export of the GPU path); the result
    is a C-contiguous numpy array either way.

    Returns
    -------
    float32 (no threshold) or uint8 0/1 array of the original-grid box's shape.
    """
    expected = tuple(properties["shape_after_resampling_zyx"])
    if tuple(array_preprocessed.shape) != expected:
        raise DscovidError(f"{properties.get('case', 'case')}: array shape {tuple(array_preprocessed.shape)} is not "
                           f"the preprocessed shape {expected}")
    cropped_shape = tuple(int(v) for v in properties["shape_after_crop_zyx"])
    restored = resample_on_device(array_preprocessed, cropped_shape, device, threshold)
    reorientation = Reorientation.from_dict(properties["reorientation"])
    return np.ascontiguousarray(from_canonical(restored, reorientation))


def restore_to_original(array_preprocessed: np.ndarray, properties: Mapping, is_mask: bool) -> np.ndarray:
    """Map a (Z', Y', X') array on the preprocessed grid back onto the original (Z, Y, X) grid.

    Inverse of :func:`preprocess_image`: resample to the cropped shape (linear; masks thresholded at 0.5), put it
    into a zero volume of the canonical shape at the crop box, undo the reorientation.

    Parameters
    ----------
    array_preprocessed : array of shape ``properties["shape_after_resampling_zyx"]`` (a mask or a float map).
    properties : the case's properties from :func:`preprocess_image`.
    is_mask : threshold the result at 0.5 and return uint8 0/1; else return float32.

    Returns
    -------
    array of ``properties["original_geometry"]["shape_zyx"]``, C-contiguous.
    """
    restored = restore_crop(array_preprocessed, properties, 0.5 if is_mask else None)
    full = np.zeros(tuple(properties["original_geometry"]["shape_zyx"]), dtype=restored.dtype)
    full[original_crop_slices(properties)] = restored
    return full


# ----------------------------------------------------------------------------------------------- the dataset


def configuration_digest(configuration: Configuration) -> str:
    """A short hash of everything in the configuration that shapes the preprocessed arrays."""
    return digest({"format": CACHE_FORMAT_VERSION, **configuration.preprocessing_key()})


def case_sources(case: Case) -> dict:
    """The :func:`~dscovid.io.stamps.file_stamp` of each file a case is made from (the staleness key)."""
    sources = {"image": file_stamp(case.image)}
    if case.label is not None:
        sources["label"] = file_stamp(case.label)
    if case.lung is not None:
        sources["lung"] = file_stamp(case.lung)
    return sources


def is_up_to_date(output_dir: Path, case: Case, digest: str) -> bool:
    """True when ``<case>.npz`` and ``<case>.json`` exist, are whole and were made from the same files and configuration.

    The ``.json`` records the size of the ``.npz`` written before it; an ``.npz`` of another size, or one whose zip
    directory does not read (cut short by a full disk, a copy or a crash), is stale and made again.
    """
    npz, props = case_file(output_dir, case.name, ".npz"), case_file(output_dir, case.name, ".json")
    if not npz.exists() or not props.exists():
        return False
    try:
        with open(props, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(stored, dict):
        return False
    if not (stored.get("configuration_digest") == digest and stored.get("sources") == case_sources(case)
            and stored.get("class_index") == case.class_index
            and stored.get("lesion_annotated") == case.lesion_annotated):
        return False
    problem = npz_problem(npz, ("image", "lesion", "lung", "region", "cls_image", "cls_lesion"), stored.get("npz_bytes"))
    if problem is not None:
        log.warning("%s: %s; preprocessing the case again", npz, problem)
        return False
    return True


@dataclass(frozen=True)
class _Job:
    case: Case
    configurations: tuple[tuple[str, dict], ...]  # (name, configuration dict) to write
    output_root: Path
    lung_cache_dir: Path | None


def _run_job(job: _Job) -> tuple[str, dict[str, float]]:
    case = job.case
    image, geometry = read_image(case.image)
    lesion = read_mask(case.label, reference=geometry)[0] if case.label is not None else None
    lung = segment_and_cache(case, image, geometry, job.lung_cache_dir)
    timing: dict[str, float] = {}
    for name, data in job.configurations:
        configuration = Configuration.from_dict(name, data)
        arrays, properties = preprocess_image(image, geometry, configuration, lung=lung, lesion=lesion,
                                              case_name=case.name)
        properties.update({
            "class_name": case.class_name,
            "class_index": case.class_index,
            "lesion_annotated": case.lesion_annotated,
            "sources": case_sources(case),
            "configuration_digest": configuration_digest(configuration),
        })
        folder = job.output_root / configuration.data_identifier
        start = time.perf_counter()
        # npz first, properties last: a case counts as done only once its properties exist (with the npz's size).
        npz = save_npz_atomic(case_file(folder, case.name, ".npz"), **arrays)
        properties["npz_bytes"] = npz.stat().st_size
        write_json_atomic(properties, case_file(folder, case.name, ".json"))
        properties["timing_s"]["write"] = round(time.perf_counter() - start, 4)
        for key, value in properties["timing_s"].items():
            timing[key] = timing.get(key, 0.0) + value
    return case.name, timing


def preprocess_dataset(
    dataset: RawDataset,
    output_root: Path,
    plans: Plans,
    configurations: Sequence[str],
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Fill ``output_root/<data_identifier>/`` with every case of ``dataset`` for each named configuration.

    Cases already present and up to date (same source file sizes and times, same configuration digest) are
    skipped unless ``overwrite``. Lung masks are taken from ``lungsTr`` or the lung cache
    (``output_root/lung_masks``) written by the fingerprint, so no case is segmented twice.

    Returns
    -------
    ``{"processed": [...], "skipped": [...], "failed": [...]}`` case names (failed cases are also logged).
    """
    output_root = Path(output_root)
    chosen = tuple((name, plans.configuration(name).to_dict()) for name in configurations)
    lung_cache_dir = output_root / LUNG_CACHE_FOLDER
    for folder in [output_root / data["data_identifier"] for _, data in chosen] + [lung_cache_dir]:
        remove_stale_temporaries(folder, (".tmp",))  # a killed run's; a run still writing here keeps its own
    jobs, skipped = [], []
    for case in dataset.cases():
        todo = []
        for name, data in chosen:
            configuration = Configuration.from_dict(name, data)
            folder = output_root / configuration.data_identifier
            if overwrite or not is_up_to_date(folder, case, configuration_digest(configuration)):
                todo.append((name, data))
        if todo:
            jobs.append(_Job(case, tuple(todo), output_root, lung_cache_dir))
        else:
            skipped.append(case.name)
    if skipped:
        log.info("%d case(s) already preprocessed and up to date", len(skipped))
    processed, failed = [], []
    bar = progress_bar(total=len(jobs), desc="preprocessing", unit="case", disable=not progress or not jobs)

    def record(name: str, error: BaseException | None) -> None:
        bar.update()
        if error is None:
            processed.append(name)
        elif isinstance(error, DscovidError):
            log.error("%s", error)
            failed.append(name)
        else:
            raise error

    if num_processes > 1 and len(jobs) > 1:
        with process_pool(num_processes) as pool:
            futures = {pool.submit(_run_job, job): job.case.name for job in jobs}
            for future in as_completed(futures):
                record(futures[future], future.exception())
    else:
        for job in jobs:
            try:
                _run_job(job)
                record(job.case.name, None)
            except DscovidError as error:
                record(job.case.name, error)
    bar.close()
    return {"processed": sorted(processed), "skipped": skipped, "failed": sorted(failed)}

