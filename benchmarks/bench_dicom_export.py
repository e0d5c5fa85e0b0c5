"""Time the DICOM outputs of a case (DICOM-SEG and TID 1500 SR) beside the NIfTI export they accompany.

A full-size synthetic chest CT (512×512 in-plane, cropped or edge-padded to ``--slices`` slices, 300 by default) is
written as an uncompressed CT DICOM series; its true lesion and lung masks stand for a prediction (the timing does
not depend on the weights). Two measurements:

1. **The export's parts, one after the other**, on the series' own grid: the NIfTI outputs the DICOM ones accompany
   (lesion and lung masks written as ``.nii.gz``, and the lesion report with the severity score), then the DICOM
   ones (reading the source headers, building and writing the SEG, building and writing the SR), with file sizes.
2. **Per case in the predictor** (unless ``--no-predictor``): ``predict_cases`` with a randomly initialised 3d_cpu
   fold on the series, once with ``dicom=False`` and once with ``dicom=True``, and the ``export`` time of each from
   ``predictions.json``. In the predictor the SEG is built beside the lesion report, so the time the DICOM outputs
   add to a case is the difference of the two exports, not the sum of part 1's DICOM rows.

    python benchmarks/bench_dicom_export.py                       # 512×512×300, both measurements
    python benchmarks/bench_dicom_export.py --slices 40 --no-predictor --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fit_slices(array: np.ndarray, count: int) -> np.ndarray:
    """``count`` slices: the middle ones, or the volume with its end slices repeated."""
    z = array.shape[0]
    if z >= count:
        start = (z - count) // 2
        return array[start:start + count]
    before = (count - z) // 2
    return np.pad(array, ((before, count - z - before), (0, 0), (0, 0)), mode="edge")


def write_ct_series(image_hu: np.ndarray, geometry, folder: Path) -> Path:
    """Write a (Z, Y, X) int16 HU volume as an uncompressed single-frame CT series (one file per slice)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    matrix = geometry.index_to_world_matrix()
    direction = geometry.direction_matrix
    spacing_z, spacing_y, spacing_x = geometry.spacing_zyx_mm
    for k in range(image_hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Synthetic", "BENCH", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20260101", "120000", "1", "", "")
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "dscovid synthetic"
        ds.PositionReferenceIndicator, ds.ImageType = "", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (matrix @ [k, 0, 0, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing_y:.6f}", f"{spacing_x:.6f}"]
        ds.SliceThickness = f"{spacing_z:.6f}"
        ds.KVP, ds.AcquisitionNumber = "120", 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(image_hu.shape[1]), int(image_hu.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = np.ascontiguousarray(image_hu[k], dtype="<i2").tobytes()
        pydicom.dcmwrite(folder / f"IM{k + 1:04d}.dcm", ds, enforce_file_format=True)
    return folder


def _timed(timings: dict, key: str, repeats: int, function, *args, **kwargs):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    timings[key] = best
    return result


def measure_parts(series: Path, lesion: np.ndarray, lung: np.ndarray, work: Path, repeats: int) -> dict:
    """Part 1: each step of the NIfTI and the DICOM export of one case, best of ``repeats``."""
    from dscovid.io.dicom_content import ModelIdentity
    from dscovid.io.dicom_seg import build_segmentation, write_segmentation
    from dscovid.io.dicom_series import read_source_series
    from dscovid.io.dicom_sr import build_report, write_report
    from dscovid.io.image_io import read_image, write_image
    from dscovid.io.strict_json import json_safe
    from dscovid.prediction.lesion_report import lesion_report

    image, geometry = read_image(series)
    lung = np.maximum(lung, lesion)
    model = ModelIdentity("DeepSCCOVIDTrainer", "3d_cpu", ("0",), plans="bench", dataset="Dataset990_Bench")
    t: dict[str, float] = {}
    _timed(t, "nifti_masks", repeats, lambda: (write_image(lesion, geometry, work / "case.nii.gz"),
                                                write_image(lung, geometry, work / "case_lung.nii.gz")))
    report = _timed(t, "lesion_report", repeats, lesion_report, image, lesion, lung, geometry)
    entry = json_safe({"case": "case", "predicted_class": "covid",
                       "probabilities": {"covid": 0.8, "cap": 0.15, "non_pneumonia": 0.05}, **report})
    source = _timed(t, "source_headers", repeats, read_source_series, series, geometry)
    segmentation = _timed(t, "seg_build", repeats, build_segmentation, source, lesion, lung, model)
    _timed(t, "seg_write", repeats, write_segmentation, segmentation, work / "case_seg.dcm")
    document = _timed(t, "sr_build", repeats, build_report, source, segmentation, entry, model,
                      ["covid", "cap", "non_pneumonia"], 10.0)
    _timed(t, "sr_write", repeats, write_report, document, work / "case_sr.dcm")
    sizes = {name: (work / name).stat().st_size / 2**20 for name in ("case.nii.gz", "case_lung.nii.gz",
                                                                      "case_seg.dcm", "case_sr.dcm")}
    return {"timing_s": t, "size_mb": sizes, "seg_frames": int(segmentation.NumberOfFrames)}


def measure_predictor(series_parent: Path, work: Path, image_shape, spacing, lung: np.ndarray, threads: int) -> dict:
    """Part 2: the predictor's export per case without and with the DICOM outputs (random 3d_cpu weights)."""
    import torch
    from untrained_model import save_untrained_model

    from dscovid.planning.planner import plan_experiment
    from dscovid.prediction.predict import predict_cases

    torch.set_num_threads(threads)
    nonzero = np.nonzero(lung)
    box = [int(a.max() - a.min() + 1) for a in nonzero]
    fingerprint = {"pooled": {
        "median_lung_box_mm_zyx": [b * s for b, s in zip(box, spacing)],
        "class_counts": {"covid": 1, "cap": 1, "non_pneumonia": 1},
        "median_spacing_zyx_mm": list(spacing), "median_shape_zyx": list(image_shape), "num_cases": 3,
        "spacings_zyx_mm": [list(spacing)] * 3, "lung_box_shapes_zyx": [box] * 3,
    }}
    plans = plan_experiment(fingerprint, "Dataset990_Bench", ["covid", "cap", "non_pneumonia"], ["3d_cpu"])
    model_dir = save_untrained_model(work / "results", plans, "3d_cpu")
    result = {}
    for label, dicom in (("nifti_only", False), ("with_dicom", True)):
        summary = predict_cases(model_dir, series_parent, work / f"out_{label}", device="cpu", progress=False,
                                dicom=dicom)
        if summary["failed"]:
            raise RuntimeError(f"prediction failed: {summary['failed']}")
        result[label] = summary["cases"][0]["timing_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300, help="slices of the series (512×512 each)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--index", type=int, default=1, help="case of the synthetic dataset (1: COVID-19, lesions)")
    parser.add_argument("--repeats", type=int, default=3, help="part 1: best of this many runs of each step")
    parser.add_argument("--no-predictor", action="store_true", help="skip part 2 (the predictor runs)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch in part 2")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from dataset_conversion.synthetic import generate_case
    from dscovid.io.image_io import Geometry

    work = Path(tempfile.mkdtemp(prefix="dscovid_bench_dicom_"))
    start = time.perf_counter()
    case = generate_case(args.seed, args.index, full_size=True)
    image, lesion, lung = (fit_slices(a, args.slices) for a in (case.image_hu, case.lesion, case.lung))
    geometry = Geometry(image.shape, case.geometry.spacing_zyx_mm, case.geometry.origin_xyz_mm,
                        case.geometry.direction)
    series = write_ct_series(image.astype(np.int16), geometry, work / "series" / "bench")
    print(f"synthetic CT series {image.shape} at {np.round(geometry.spacing_zyx_mm, 3)} mm, "
          f"{int(lesion.sum())} lesion voxels, made in {time.perf_counter() - start:.0f} s ({work})")

    results = {"shape_zyx": list(image.shape), "parts": measure_parts(series, lesion, lung, work, args.repeats)}
    t = results["parts"]["timing_s"]
    sizes = results["parts"]["size_mb"]
    nifti = t["nifti_masks"] + t["lesion_report"]
    dicom = t["source_headers"] + t["seg_build"] + t["seg_write"] + t["sr_build"] + t["sr_write"]
    print(f"\n== export parts, best of {args.repeats} (s)")
    print(f"NIfTI  : masks {t['nifti_masks']:.2f}  lesion report + severity {t['lesion_report']:.2f}  = {nifti:.2f}")
    print(f"DICOM  : source headers {t['source_headers']:.2f}  SEG build {t['seg_build']:.2f}  SEG write "
          f"{t['seg_write']:.2f}  SR build {t['sr_build']:.2f}  SR write {t['sr_write']:.2f}  = {dicom:.2f}")
    print(f"sizes  : lesion.nii.gz {sizes['case.nii.gz']:.2f} MB, lung.nii.gz {sizes['case_lung.nii.gz']:.2f} MB, "
          f"SEG {sizes['case_seg.dcm']:.2f} MB ({results['parts']['seg_frames']} frames), "
          f"SR {sizes['case_sr.dcm']:.2f} MB")
    if not args.no_predictor:
        del case
        results["predictor"] = measure_predictor(series.parent, work, image.shape, geometry.spacing_zyx_mm, lung,
                                                 args.threads)
        plain, both = results["predictor"]["nifti_only"], results["predictor"]["with_dicom"]
        print("\n== per case in predict_cases (s)")
        for label, timing in (("NIfTI only", plain), ("with DICOM", both)):
            print(f"{label:10s}: read {timing['read']:.2f}  preprocess {timing['preprocess']:.2f}  "
                  f"network {timing['network']:.2f}  export {timing['export']:.2f}")
        print(f"the DICOM outputs add {both['export'] - plain['export']:.2f} s to the export of a case")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)  # the series and outputs: a few hundred MB at 300 slices
    return 0


if __name__ == "__main__":
    sys.exit(main())
