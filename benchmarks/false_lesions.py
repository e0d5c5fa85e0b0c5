"""What a model marks as lesion on the scans that have none, and what it calls them: one line per prediction folder.

A model that segments well on its own phantoms can still mark noisy parenchyma as ground glass on another
scanner's scans, and a classifier that reads the lesion map (the lesion gate) then calls a healthy scan pneumonia.
For each ``dscovid_predict`` output folder given, this script reads ``predictions.json`` (the lesion volume the
predictor measured and the predicted class of every case) and the reference dataset's classes, and prints, over the
cases whose reference class is non-pneumonia: the median and mean false lesion volume, how many keep more than 5
and 20 ml, how many are called COVID-19 or CAP, and over all cases the confusion matrix. With ``--lung-depth``
it also reads each lesion-free case's predicted mask, reference lung mask and image, and gives the median HU of all
false voxels against the lungs' median and their depth inside the lung (mm). Nothing is written.

Examples::

    python benchmarks/false_lesions.py --ref WORK/full/raw/Dataset984_AccuracyDevThickNoisy \\
        --pred WORK/full/predictions/dev-thick_noisy/default WORK/full/predictions/dev-thick_noisy/scannerAug
    python benchmarks/false_lesions.py --ref RAW/Dataset002_SyntheticTest --pred OUT --lung-depth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from dscovid.errors import DscovidError
from dscovid.io.dataset import RawDataset, case_file, load_raw_dataset, read_json
from dscovid.io.image_io import read_image, read_mask
from dscovid.prediction.output_folder import output_files

NON_PNEUMONIA = "non_pneumonia"


def false_lesion_voxels(mask_file: Path, dataset: RawDataset, case: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The HU and the depth inside the reference lung (mm) of each voxel the model marks, and the lung's median HU."""
    image, geometry = read_image(dataset.image_path(case))
    lung, _ = read_mask(case_file(dataset.root / "lungsReference", case, dataset.file_ending), geometry)
    mask, _ = read_mask(mask_file, geometry)
    marked, lung, image = np.asarray(mask) > 0, np.asarray(lung) > 0, np.asarray(image)
    depth = ndimage.distance_transform_edt(lung, sampling=geometry.spacing_zyx_mm)
    return image[marked].astype(np.float32), depth[marked].astype(np.float32), float(np.median(image[lung]))


def report(folder: Path, dataset: RawDataset, lung_depth: bool) -> None:
    """Print one prediction folder's line (and with ``lung_depth`` the false voxels' line)."""
    classes = {case.name: case.class_name for case in dataset.cases()}
    predictions = read_json(folder / "predictions.json", "not found (is this a dscovid_predict output folder?)")
    names = predictions["class_names"]
    confusion = np.zeros((len(names), len(names)), dtype=int)
    volumes, calls, masks = [], {name: 0 for name in names}, {}
    for entry in predictions["cases"]:
        true = classes.get(entry["case"])
        if true is None:
            raise DscovidError(f"{folder / 'predictions.json'}: case {entry['case']!r} is not in {dataset.root}")
        confusion[names.index(true), names.index(entry["predicted_class"])] += 1
        if true == NON_PNEUMONIA:
            volumes.append(entry["lesion_volume_ml"])
            calls[entry["predicted_class"]] += 1
            masks[entry["case"]] = folder / output_files(entry["case"])["mask"]
    if not volumes:
        raise DscovidError(f"{folder}: no predicted case is non-pneumonia in {dataset.root}")
    volumes = np.asarray(volumes, dtype=float)
    called = ", ".join(f"{calls[name]} {name}" for name in names if name != NON_PNEUMONIA)
    print(f"{folder}: {volumes.size} lesion-free scans, false lesion ml median {np.median(volumes):.1f} "
          f"mean {volumes.mean():.1f}, > 5 ml {int(np.sum(volumes > 5))}, > 20 ml {int(np.sum(volumes > 20))}; "
          f"called {called}; confusion (rows true {', '.join(names)}) {confusion.tolist()}")
    if lung_depth:
        measured = [false_lesion_voxels(mask, dataset, case) for case, mask in masks.items()]
        hu = np.concatenate([m[0] for m in measured])
        depth = np.concatenate([m[1] for m in measured])
        lung_hu = np.median([m[2] for m in measured])
        if hu.size:
            print(f"    all false voxels: median {np.median(hu):.0f} HU (the lungs' median {lung_hu:.0f}), "
                  f"median depth in the lung {np.median(depth):.1f} mm, {np.mean(depth > 10):.0%} deeper than 10 mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, type=Path, help="raw dataset (dataset.json; lungsReference/, "
                                                                   "imagesTr/ for --lung-depth)")
    parser.add_argument("--pred", required=True, nargs="+", type=Path, help="dscovid_predict output folders")
    parser.add_argument("--lung-depth", action="store_true", help="also the false voxels' HU and depth in the lung")
    args = parser.parse_args()
    try:
        dataset = load_raw_dataset(args.ref)
        for folder in args.pred:
            report(folder, dataset, args.lung_depth)
    except DscovidError as error:
        raise SystemExit(f"false_lesions: {error}") from None


if __name__ == "__main__":
    main()
