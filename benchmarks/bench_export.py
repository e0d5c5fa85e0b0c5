"""How to store a case's outputs: the evidence map and the lesion mask of a full-size scan, written every way we
considered, beside the writers of nnU-Net (SimpleITK) and TotalSegmentator (nibabel).

A full-size synthetic chest CT (512×512 in-plane) is predicted up to the network by a randomly initialised ``3d_cpu``
fold (the timing and the file size depend on the map's shape and smoothness, not on the weights); its evidence map
and lesion mask are restored to the original grid as the export does. Then each way of writing them is timed
(median of ``--repeats``; the file is written to a temporary folder and removed), with its size and, for the
evidence, the largest difference between what a reader gets back and the float map (as a share of the map's
range):

* ``SimpleITK float32 .nii.gz``: ITK's writer with compression, as nnU-Net's ``SimpleITKIO`` writes (dscovid before
  the uint8 evidence);
* ``nibabel float32 .nii.gz``: ``nibabel.save`` (its gzip level 1), as TotalSegmentator writes;
* ``SimpleITK float32 .nii``: no compression;
* ``dscovid uint8 + scaling .nii.gz``: :func:`dscovid.io.image_io.write_image` with ``scaling``, gzip level 1 and 6,
  one thread and all threads (:mod:`dscovid.io.parallel_gzip`);
* ``dscovid uint8 + scaling .nii``: the same uncompressed;
* for the lesion mask: SimpleITK, nibabel, and dscovid's ``write_image`` (what the export uses).

NIfTI-1 has no float16 data type, so a float16 evidence map is not a NIfTI option.

    python benchmarks/bench_export.py                       # 512×512×~300
    python benchmarks/bench_export.py --small --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def _timed(write: Callable[[Path], None], target: Path, repeats: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        write(target)
        times.append(time.perf_counter() - start)
        size = target.stat().st_size
        target.unlink()
    return statistics.median(times), size


def _nibabel_image(array: np.ndarray, geometry):
    import nibabel as nib

    # nibabel holds (x, y, z) arrays and an RAS affine; the geometry's LPS index-to-world matrix, flipped in x and y.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.index_to_world_matrix()
    affine = affine[:, [2, 1, 0, 3]]  # columns of the (x, y, z) index order
    return nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)


def _read_back(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small grid instead of 512×512 (quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and gzip threads (all threads)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nibabel as nib
    from bench_predict import _fingerprint
    from untrained_model import save_untrained_model

    from dataset_conversion.synthetic import generate_case
    from dscovid.inference.engine import run_networks
    from dscovid.inference.model_loading import load_trained_model
    from dscovid.io import image_io
    from dscovid.io.image_io import quantize_uint8, uint8_scaling, write_image
    from dscovid.io.scans import Scan
    from dscovid.planning.planner import plan_experiment
    from dscovid.prediction.export import LESION_THRESHOLD
    from dscovid.prediction.inputs import load_case
    from dscovid.preprocessing.preprocessor import restore_to_original

    work = Path(tempfile.mkdtemp(prefix="dscovid_bench_export_"))
    try:
        case = generate_case(3, 0, full_size=not args.small)
        scan = work / "bench_0000.nii.gz"
        write_image(case.image_hu, case.geometry, scan)
        fingerprint = _fingerprint(case)
        del case
        plans = plan_experiment(fingerprint, "Dataset990_Bench", ["covid", "cap", "non_pneumonia"], ["3d_cpu"])
        model = load_trained_model(save_untrained_model(work / "results", plans, "3d_cpu"))
        loaded = load_case(Scan("bench", scan), model.preprocessing)
        output = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image)
        evidence = restore_to_original(output.evidence, loaded.properties, is_mask=False).astype(np.float32)
        probability = restore_to_original(output.lesion_probability, loaded.properties, is_mask=False)
        lesion = ((probability >= LESION_THRESHOLD) & (loaded.lung != 0)).astype(np.uint8)
        del probability
        geometry = loaded.geometry
        print(f"scan {geometry.shape_zyx} ({evidence.nbytes / 2**20:.0f} MiB as float32), lesion "
              f"{int(lesion.sum())} voxels; {args.threads} threads, median of {args.repeats}", flush=True)

        slope, intercept = uint8_scaling(float(evidence.min()), float(evidence.max()))
        codes = quantize_uint8(evidence, slope, intercept)
        level_default = image_io.SCALED_GZIP_LEVEL

        def scaled(level: int, threads: int) -> Callable[[Path], None]:
            def write(target: Path) -> None:
                image_io.SCALED_GZIP_LEVEL = level
                image_io.GZIP_THREADS = threads
                try:
                    write_image(codes, geometry, target, scaling=(slope, intercept))
                finally:
                    image_io.SCALED_GZIP_LEVEL, image_io.GZIP_THREADS = level_default, None
            return write

        def sitk_write(array: np.ndarray, compress: bool) -> Callable[[Path], None]:
            image = geometry.apply_to(sitk.GetImageFromArray(array))
            return lambda target: sitk.WriteImage(image, str(target), compress)

        def nib_write(array: np.ndarray) -> Callable[[Path], None]:
            image = _nibabel_image(array, geometry)
            return lambda target: nib.save(image, str(target))

        evidence_rows = [
            ("SimpleITK float32 .nii.gz (nnU-Net's writer; dscovid before)", sitk_write(evidence, True), ".nii.gz"),
            ("nibabel float32 .nii.gz, level 1 (TotalSegmentator's writer)", nib_write(evidence), ".nii.gz"),
            ("SimpleITK float32 .nii (uncompressed)", sitk_write(evidence, False), ".nii"),
            ("dscovid uint8 + scaling .nii.gz, level 1, 1 thread", scaled(1, 1), ".nii.gz"),
            (f"dscovid uint8 + scaling .nii.gz, level 1, {args.threads} threads", scaled(1, args.threads),
             ".nii.gz"),
            (f"dscovid uint8 + scaling .nii.gz, level 6, {args.threads} threads", scaled(6, args.threads),
             ".nii.gz"),
            ("dscovid uint8 + scaling .nii (uncompressed)", scaled(1, 1), ".nii"),
        ]
        mask_rows = [
            ("SimpleITK uint8 .nii.gz (nnU-Net's writer)", sitk_write(lesion, True), ".nii.gz"),
            ("nibabel uint8 .nii.gz, level 1 (TotalSegmentator's writer)", nib_write(lesion), ".nii.gz"),
            ("dscovid write_image uint8 .nii.gz (the export's)", lambda t: write_image(lesion, geometry, t), ".nii.gz"),
        ]
        results: dict = {"shape_zyx": list(geometry.shape_zyx), "threads": args.threads, "repeats": args.repeats,
                         "evidence": [], "mask": []}
        scale = (max(float(evidence.max()), 0.0) - min(float(evidence.min()), 0.0)) or 1.0
        for kind, rows, reference in (("evidence", evidence_rows, evidence), ("mask", mask_rows, lesion)):
            print(f"\n| {kind}: writer | seconds | MB | largest error read back (evidence: share of its range) |")
            print("|---|---|---|---|")
            for label, write, ending in rows:
                target = work / f"{kind}{ending}"
                seconds, size = _timed(write, target, args.repeats)
                write(target)
                error = float(np.abs(_read_back(target).astype(np.float64) - reference).max())
                target.unlink()
                share = error / scale if kind == "evidence" else error
                print(f"| {label} | {seconds:.2f} | {size / 1e6:.1f} | {share:.2e} |", flush=True)
                results[kind].append({"writer": label, "seconds": seconds, "bytes": size, "error": share})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
