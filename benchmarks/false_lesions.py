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
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from dscovid.io.image_io import read_image, read_mask

NON_PNEUMONIA = "non_pneumonia"


def false_lesion_voxels(prediction: Path, reference: Path, case: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The HU and the depth inside the reference lung (mm) of each voxel the model marks, and the lung's median HU."""
    mask, _ = read_mask(prediction / f"{case}.nii.gz")
    marked = np.asarray(mask) > 0
    image, geometry = read_image(next((reference / "imagesTr").glob(f"{case}_0000.*")))
    lung, _ = read_mask(next((reference / "lungsReference").glob(f"{case}.*")), geometry)
    lung = np.asarray(lung) > 0
    image = np.asarray(image)
    depth = ndimage.distance_transform_edt(lung, sampling=geometry.spacing_zyx_mm)
    return image[marked].astype(np.float32), depth[marked].astype(np.float32), float(np.median(image[lung]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, type=Path, help="raw dataset (dataset.json; lungsReference/, "
                                                                   "imagesTr/ for --lung-depth)")
    parser.add_argument("--pred", required=True, nargs="+", type=Path, help="dscovid_predict output folders")
    parser.add_argument("--lung-depth", action="store_true", help="also the false voxels' HU and depth in the lung")
    args = parser.parse_args()

    cases = json.loads((args.ref / "dataset.json").read_text())["cases"]
    for folder in args.pred:
        predictions = json.loads((folder / "predictions.json").read_text())
        names = predictions["class_names"]
        confusion = np.zeros((len(names), len(names)), dtype=int)
        volumes, calls, lesion_free = [], {name: 0 for name in names}, []
        for entry in predictions["cases"]:
            true = cases[entry["case"]]["class"]
            confusion[names.index(true), names.index(entry["predicted_class"])] += 1
            if true == NON_PNEUMONIA:
                volumes.append(entry["lesion_volume_ml"])
                calls[entry["predicted_class"]] += 1
                lesion_free.append(entry["case"])
        volumes = np.asarray(volumes, dtype=float)
        called = ", ".join(f"{calls[name]} {name}" for name in names if name != NON_PNEUMONIA)
        print(f"{folder}: {volumes.size} lesion-free scans, false lesion ml median {np.median(volumes):.1f} "
              f"mean {volumes.mean():.1f}, > 5 ml {int(np.sum(volumes > 5))}, > 20 ml {int(np.sum(volumes > 20))}; "
              f"called {called}; confusion (rows true {', '.join(names)}) {confusion.tolist()}")
        if args.lung_depth:
            measured = [false_lesion_voxels(folder, args.ref, case) for case in lesion_free]
            hu = np.concatenate([m[0] for m in measured])
            depth = np.concatenate([m[1] for m in measured])
            lung_hu = np.median([m[2] for m in measured])
            if hu.size:
                print(f"    all false voxels: median {np.median(hu):.0f} HU (the lungs' median {lung_hu:.0f}), "
                      f"median depth in the lung {np.median(depth):.1f} mm, {np.mean(depth > 10):.0%} deeper than 10 mm")


if __name__ == "__main__":
    main()
