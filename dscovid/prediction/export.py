"""Write one predicted case on its original grid and make its ``predictions.json`` entry (docs/formats.md §5).

The fold-averaged outputs of :func:`dscovid.inference.engine.run_networks` are mapped back onto the input's grid
(:func:`dscovid.preprocessing.preprocessor.restore_crop`, on the crop box: outside it every map is 0); the lesion
probability is thresholded at :data:`LESION_THRESHOLD` inside the lung there, and ``<case>.nii.gz`` (uint8),
``<case>_evidence.nii.gz`` (uint8 codes with a NIfTI scaling, read back as float32) and with ``save_probabilities``
the lesion probability and the lung mask are written with the input's exact geometry.
Each file is written atomically and checked into a hidden staging folder, and the case's files take their final
names together once all of them are written (:func:`dscovid.io.atomic.staged_folder`): a case that fails leaves
nothing behind, and the files of an earlier run of the case stay as they were. The entry holds the class
probabilities, the findings head's term, the lesion report and the scan's plausibility
(:mod:`dscovid.io.plausibility`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dscovid.inference.engine import NetworkOutput
from dscovid.io.atomic import staged_folder
from dscovid.io.image_io import Geometry, quantize_uint8, uint8_scaling, write_image
from dscovid.measurements.components import label
from dscovid.prediction.dicom_export import DicomExport, is_dicom_series
from dscovid.prediction.inputs import LoadedCase
from dscovid.prediction.lesion_report import DEFAULT_PERIPHERAL_THICKNESS_MM, lesion_report
from dscovid.prediction.output_folder import output_files
from dscovid.preprocessing.preprocessor import original_crop_slices, restore_crop, restore_to_original

#: Lesion probability at or above which a voxel (inside the lung) is called lesion.
LESION_THRESHOLD = 0.5


def drop_small_lesions(lesion: np.ndarray, spacing_zyx_mm: Sequence[float], min_volume_ml: float) -> np.ndarray:
    """``lesion`` (changed in place) without its 26-connected components smaller than ``min_volume_ml``.

    0 keeps every component. The volumes are those of the grid the mask lies on (``spacing_zyx_mm``).
    """
    if min_volume_ml <= 0 or not lesion.any():
        return lesion
    labels, count = label(lesion, 26)
    voxel_ml = float(np.prod(spacing_zyx_mm)) / 1000.0
    small = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml < min_volume_ml
    small[0] = False
    lesion[small[labels]] = 0
    return lesion


def export_case(
    loaded: LoadedCase,
    output: NetworkOutput,
    output_dir: Path,
    class_names: Sequence[str],
    save_probabilities: bool = False,
    peripheral_thickness_mm: float = DEFAULT_PERIPHERAL_THICKNESS_MM,
    dicom: DicomExport | None = None,
    device: torch.device | str | None = None,
    min_lesion_ml: float = 0.0,
) -> dict:
    """Write one case's files on its original grid and return its ``predictions.json`` entry (without timings).

    With ``dicom``, a case read from a DICOM series also gets its DICOM-SEG and SR (:mod:`dscovid.prediction.dicom_export`).

    The lesion probability is resampled to the original grid first and thresholded there (inside the original
    lung mask), so the mask has the input's resolution, not the preprocessed one. Everything the preprocessed grid
    does not cover is 0, so the resampling, the threshold and the lesion report run on the crop box alone
    (:func:`~dscovid.preprocessing.preprocessor.original_crop_slices`), and with ``device`` (a GPU) the resampling and
    the threshold run there. The evidence map is stored as uint8 codes with the NIfTI scaling that reads back as
    float32 (:func:`~dscovid.io.image_io.uint8_scaling`; docs/formats.md §5). The evidence map, the file writes
    (gzip) and the lesion report run in parallel threads: each spends its time in code that releases the GIL
    (torch resampling, ITK's writer, zlib, NumPy and SciPy). If any part fails, nothing of the case is left (the
    staging folder is removed), and files of the case from an earlier run are not touched. With ``min_lesion_ml``
    the lesion components smaller than that are dropped (:func:`drop_small_lesions`) before the mask is written or
    measured.
    """
    with staged_folder(output_dir, loaded.name) as stage:
        return _write_case(loaded, output, stage, class_names, save_probabilities, peripheral_thickness_mm, dicom,
                           device, min_lesion_ml)


def _write_evidence(evidence_preprocessed: np.ndarray, properties: dict, geometry: Geometry, path: Path,
                    device: torch.device | str | None) -> None:
    evidence = restore_crop(evidence_preprocessed, properties, device=device)
    slope, intercept = uint8_scaling(float(evidence.min()), float(evidence.max()))
    zero = quantize_uint8(np.zeros(1, dtype=np.float32), slope, intercept)[0]  # outside the crop box: exactly 0.0
    codes = np.full(geometry.shape_zyx, zero, dtype=np.uint8)
    codes[original_crop_slices(properties)] = quantize_uint8(evidence, slope, intercept)
    write_image(codes, geometry, path, scaling=(slope, intercept))


def _write_case(loaded: LoadedCase, output: NetworkOutput, stage: Path, class_names: Sequence[str],
                save_probabilities: bool, peripheral_thickness_mm: float, dicom: DicomExport | None,
                device: torch.device | str | None, min_lesion_ml: float = 0.0) -> dict:
    name, geometry, properties = loaded.name, loaded.geometry, loaded.properties
    names = output_files(name)
    files = {"mask": names["mask"]}
    box = original_crop_slices(properties)

    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix=f"dscovid-export-{name}")
    futures: list[Future] = []
    try:
        if output.evidence is not None:
            files["evidence"] = names["evidence"]
            futures.append(pool.submit(_write_evidence, output.evidence, properties, geometry, stage / names["evidence"],
                                       device))
        lesion_box = restore_crop(output.lesion_probability, properties, LESION_THRESHOLD, device)
        allowed = loaded.lung[box] != 0
        if float(properties.get("lung_margin_mm") or 0.0) > 0:
            # The network also looked just outside the lung mask (a consolidation the classical mask left out);
            # what it found there counts, and the reported lung is the lung mask plus that lesion.
            allowed |= restore_crop(loaded.region_preprocessed, properties, 0.5, device) != 0
        lesion_box &= allowed
        del allowed
        # Every lesion lies inside the lung or its margin, so inside the box: its components are whole there.
        drop_small_lesions(lesion_box, geometry.spacing_zyx_mm, min_lesion_ml)
        lesion = np.zeros(geometry.shape_zyx, dtype=np.uint8)
        lesion[box] = lesion_box
        del lesion_box
        lung = np.maximum(loaded.lung.astype(np.uint8, copy=False), lesion)
        futures.append(pool.submit(write_image, lesion, geometry, stage / names["mask"]))
        seg_future = None
        if dicom is not None and is_dicom_series(loaded.path):
            seg_future = pool.submit(dicom.write_segmentation, loaded.path, geometry, lesion, lung,
                                     stage / names["dicom_seg"])
        if save_probabilities:
            files["lesion_probability"] = names["lesion_probability"]
            files["lung"] = names["lung"]
            probability = restore_to_original(output.lesion_probability, properties, is_mask=False)
            futures.append(pool.submit(write_image, probability, geometry, stage / names["lesion_probability"]))
            futures.append(pool.submit(write_image, lung, geometry, stage / names["lung"]))
            del probability
        entry: dict = {"case": name, "predicted_class": None, "probabilities": None}
        if output.class_probabilities is not None:
            probabilities = output.class_probabilities
            entry["predicted_class"] = class_names[int(np.argmax(probabilities))]
            entry["probabilities"] = {c: float(p) for c, p in zip(class_names, probabilities)}
        if output.findings_term is not None:
            entry["findings_head"] = {"logit_term": {c: float(v) for c, v in zip(class_names, output.findings_term)},
                                      "measurements": output.findings}
        # The crop box holds the lung by construction (lung box plus margin); measured on the whole grid if not.
        report_box = box if np.count_nonzero(loaded.lung[box]) == np.count_nonzero(loaded.lung) else None
        entry.update(lesion_report(loaded.image_hu, lesion, lung, geometry, peripheral_thickness_mm, report_box))
        for future in futures:
            future.result()
        if seg_future is not None:
            dicom_outputs = dicom.write_report(seg_future.result(), entry, stage / names["dicom_sr"])
            files.update(dicom_outputs.pop("files", {}))
            entry.update(dicom_outputs)
        entry["files"] = files
        entry["tiles"] = {"run": output.tiles_run, "total": output.tiles_total}
        if loaded.plausibility is not None:
            entry["plausibility"] = loaded.plausibility
        return entry
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # no writer may finish after the staging folder is removed
        raise
    finally:
        pool.shutdown(wait=True)
