"""How much lesion Dice the grid a configuration works on allows, whatever the network.

A model that reproduced its training target exactly (the reference lesion mask resampled onto the preprocessed grid,
linear then thresholded, inside the region the network sees) would still lose Dice when its output goes back onto
the scan's own grid: the predictor resamples the probability linearly, thresholds it at 0.5 and keeps it inside the
lung mask plus its margin. This script runs exactly that path on the reference masks of a synthetic dataset folder,
for the planned target spacing and any others, and prints the mean lesion Dice over the cases with lesions (with a
95 % bootstrap interval) beside the share of lesion voxels the network never sees (outside its region).

It is the ceiling for a configuration's spacing; the generator's blur and noise lower what a real model reaches
further, and the scanner's partial volume is already in the reference (it is drawn before the blur).

Examples::

    python benchmarks/ceiling_lesion_dice.py --dataset RAW/Dataset002_Test --plans PRE/Dataset001_Train/plans.json
    python benchmarks/ceiling_lesion_dice.py ... --spacings 4.07,3.12,3.12 2.5,2,2 1.5,1.5,1.5 --reference-lungs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dscovid.io.image_io import read_image, read_mask
from dscovid.plans.configuration import Configuration, load_plans
from dscovid.preprocessing.lung import segment_lungs
from dscovid.preprocessing.preprocessor import preprocess_image, restore_to_original


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def bootstrap_interval(values: np.ndarray, samples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def case_ceiling(image_path: Path, label_path: Path, lung: np.ndarray, configuration: Configuration) -> dict:
    image, geometry = read_image(image_path)
    reference, _ = read_mask(label_path, geometry)
    reference = (reference != 0).astype(np.uint8)
    arrays, properties = preprocess_image(image, geometry, configuration, lung=lung, lesion=reference,
                                          case_name=image_path.name)
    # the perfect network: its probability is its training target
    probability = restore_to_original(arrays["lesion"].astype(np.float32), properties, is_mask=False)
    allowed = lung != 0
    if float(properties.get("lung_margin_mm") or 0.0) > 0:
        allowed |= restore_to_original(arrays["region"], properties, is_mask=True) != 0
    predicted = (probability >= 0.5) & allowed
    region = restore_to_original(arrays["region"], properties, is_mask=True) != 0
    lesion_voxels = int(reference.sum())
    return {"dice": dice(predicted, reference), "lesion_voxels": lesion_voxels,
            "outside_region": int((reference.astype(bool) & ~region).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, type=Path, help="raw dataset folder (imagesTr, labelsTr)")
    parser.add_argument("--plans", required=True, type=Path, help="plans.json of the training dataset")
    parser.add_argument("-c", "--configuration", default="3d_cpu")
    parser.add_argument("--spacings", nargs="*", default=[], metavar="Z,Y,X",
                        help="target spacings in mm to compare with the planned one")
    parser.add_argument("--reference-lungs", action="store_true",
                        help="use lungsReference/ (the true lungs) instead of the classical lung mask")
    parser.add_argument("--max-cases", type=int, default=None)
    args = parser.parse_args()

    base = load_plans(args.plans).configuration(args.configuration)
    spacings = [list(base.preprocessing.target_spacing_zyx_mm)]
    spacings += [[float(v) for v in text.split(",")] for text in args.spacings]
    images = sorted((args.dataset / "imagesTr").glob("*_0000.nii.gz"))[: args.max_cases]
    dataset = json.loads((args.dataset / "dataset.json").read_text(encoding="utf-8"))
    lungs: dict[str, np.ndarray] = {}
    print(f"{len(images)} cases of {args.dataset.name}; lung mask: "
          f"{'lungsReference/' if args.reference_lungs else 'the classical lung mask'}")
    print(f"{'target spacing (mm)':>22} {'lesion cases':>12} {'mean Dice':>10} {'95 % CI':>15} {'min':>6} "
          f"{'lesion voxels outside the region':>34}")
    for spacing in spacings:
        configuration = base.with_overrides({"preprocessing.target_spacing_zyx_mm": spacing})
        dices, outside, total = [], 0, 0
        for image_path in images:
            name = image_path.name[: -len("_0000.nii.gz")]
            if dataset["cases"][name]["class"] == "non_pneumonia":
                continue
            if name not in lungs:
                if args.reference_lungs:
                    lungs[name] = read_mask(args.dataset / "lungsReference" / f"{name}.nii.gz")[0]
                else:
                    image, geometry = read_image(image_path)
                    lungs[name] = np.asarray(segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction),
                                             dtype=np.uint8)
            result = case_ceiling(image_path, args.dataset / "labelsTr" / f"{name}.nii.gz", lungs[name], configuration)
            dices.append(result["dice"])
            outside += result["outside_region"]
            total += result["lesion_voxels"]
        values = np.asarray(dices)
        low, high = bootstrap_interval(values)
        text = "x".join(f"{v:g}" for v in spacing)
        print(f"{text:>22} {len(values):>12} {values.mean():>10.3f} {f'{low:.3f}-{high:.3f}':>15} "
              f"{values.min():>6.3f} {100 * outside / max(total, 1):>33.2f}%", flush=True)


if __name__ == "__main__":
    main()
