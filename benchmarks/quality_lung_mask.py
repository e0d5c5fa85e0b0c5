"""Quality of the classical lung mask on synthetic cases: Dice and the share of lesion voxels inside, per class.

::

    python benchmarks/quality_lung_mask.py [--seeds 0 7 3] [--cases 10] [--first-index 0] [--cache DIR]
    python benchmarks/quality_lung_mask.py --dataset RAW/Dataset961_SynthTest [--dataset ...]
    ... [--margins 10] [--chest-wall-gaps] [--no-baseline] [--per-case]

Each source is either a seed (cases ``first-index .. first-index+cases-1`` of
``dataset_conversion.synthetic.generate_case``, default small grids; ``--cache`` keeps them as ``.npz`` so that
repeated runs only time the segmentation) or a raw dataset folder with ``imagesTr/``, ``labelsTr/`` and the
reference lungs (``lungsReference/``, as ``dscovid_make_synthetic`` writes them), which is the issue's criterion
measured on files. The mask of :func:`dscovid.preprocessing.lung.segment_lungs` is compared with the
reference lung (which includes the lesions): Dice mean (min) and, per class, the fraction of lesion voxels inside
the mask (pooled over the cases of that class), and inside the mask grown by each ``--margins`` mm (what the
preprocessor's ``region`` keeps with ``lung_margin_mm``), with the grown region's volume against the reference
lung's. ``--chest-wall-gaps`` adds a row for the mask with the opt-in chest wall gaps
(``LungMaskSettings(chest_wall_gaps=True)``).

The peer in the same run is the textbook classical recipe without any lesion filling (threshold at -320 HU inside
the body, the two largest air components, a 2-voxel closing and holes filled per slice): how much of the lesions
a threshold method leaves out, and what the lesion filling costs in Dice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def load_case(seed: int, index: int, cache: Path | None, scale: float = 1.0):
    """``(image_hu, lesion, lung, spacing_zyx_mm, direction, class_name)`` of one synthetic case, cached when asked."""
    path = cache / f"seed{seed}_case{index}_scale{scale:g}.npz" if cache is not None else None
    if path is not None and path.exists():
        data = np.load(path)
        return (data["image"], data["lesion"], data["lung"], tuple(data["spacing"]), tuple(data["direction"]),
                str(data["class_name"]))
    from dataset_conversion.synthetic import generate_case

    image, lesion, lung, geometry, class_name, _ = generate_case(seed, index, scale=scale)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, image=image, lesion=lesion, lung=lung, spacing=np.asarray(geometry.spacing_zyx_mm),
                            direction=np.asarray(geometry.direction), class_name=class_name)
    return image, lesion, lung, tuple(geometry.spacing_zyx_mm), tuple(geometry.direction), class_name


def seed_cases(seed: int, first: int, count: int, cache: Path | None):
    """``(name, case tuple)`` of generated cases ``first .. first+count-1`` of ``seed``."""
    for index in range(first, first + count):
        yield f"seed {seed} case {index}", load_case(seed, index, cache)


def dataset_cases(folder: Path):
    """``(name, case tuple)`` of the cases of a raw dataset folder that has reference lungs and lesion labels."""
    from dscovid.errors import DscovidError
    from dscovid.io.dataset import load_raw_dataset
    from dscovid.io.image_io import read_image

    dataset = load_raw_dataset(folder)
    reference_folder = dataset.meta.get("synthetic", {}).get("lung_reference_folder", "lungsReference")
    for case in dataset.cases():
        reference = dataset.root / reference_folder / f"{case.name}{dataset.file_ending}"
        if case.label is None or not reference.exists():
            raise DscovidError(f"{folder}: case {case.name} has no lesion label or no {reference_folder}/ lung")
        image, geometry = read_image(case.image)
        lesion, _ = read_image(case.label, check_hu=False)
        lung, _ = read_image(reference, check_hu=False)
        yield case.name, (image, lesion, lung, geometry.spacing_zyx_mm, geometry.direction, case.class_name)


def threshold_lungs(image_hu: np.ndarray, spacing_zyx_mm, direction=None) -> np.ndarray:
    """The textbook classical lung mask, the peer: no lesion filling.

    Air below -320 HU that is not connected to the air outside the body (per axial slice), its two largest 3D
    components (the second when at least 5 % of the first), closed by 2 voxels and holes filled per axial slice.
    """
    air = np.asarray(image_hu) < -320
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        labels, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside[z] = np.isin(labels, border[border > 0])
    labels, count = ndimage.label(air & ~outside)
    if count == 0:
        return np.zeros(air.shape, dtype=np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1] + ([order[1] + 1] if count > 1 and sizes[order[1]] >= 0.05 * sizes[order[0]] else [])
    lungs = np.isin(labels, keep)
    lungs = ndimage.binary_closing(lungs, iterations=2, border_value=0) | lungs
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(lungs, in_plane).astype(np.uint8)


def score(cases, methods: dict, margins: list[float], per_case: bool = False, crop_margin_mm: float | None = None) -> dict:
    """Per method: Dice per case, pooled lesion fraction inside per class (and grown by each margin), seconds.

    With ``crop_margin_mm`` the grown masks are cut to the lung's bounding box plus that margin, as the preprocessor
    crops before it grows the region (a margin wider than the crop's adds nothing there).
    """
    from dscovid.preprocessing.preprocessor import grow_mask, lung_bounding_box

    results = {name: {"dices": [], "inside": {}, "total": {}, "seconds": [], "volume": {}} for name in methods}
    for case_name, (image, lesion, lung, spacing, direction, class_name) in cases:
        reference, lesion = lung > 0, lesion > 0
        for name, method in methods.items():
            started = time.perf_counter()
            mask = method(image, spacing, direction) > 0
            result = results[name]
            result["seconds"].append(time.perf_counter() - started)
            dice = 2.0 * float((mask & reference).sum()) / float(mask.sum() + reference.sum())
            result["dices"].append(dice)
            count = int(lesion.sum())
            crop = None
            if crop_margin_mm is not None and mask.any():
                crop = np.zeros(mask.shape, dtype=bool)
                crop[tuple(slice(a, b) for a, b in lung_bounding_box(mask, spacing, crop_margin_mm))] = True
            for margin in [0.0, *margins]:
                grown = mask if margin == 0 else grow_mask(mask.astype(np.uint8), spacing, margin) > 0
                if crop is not None and margin > 0:
                    grown &= crop
                hit = int(grown[lesion].sum())
                result["volume"].setdefault(margin, []).append(float(grown.sum()) / max(float(reference.sum()), 1.0))
                for key in ((class_name, margin), ("all", margin)):
                    result["inside"][key] = result["inside"].get(key, 0) + hit
                    result["total"][key] = result["total"].get(key, 0) + count
                if margin == 0 and per_case:
                    fraction = f"{hit / count:.3f}" if count else "  -  "
                    extra, missed = int((mask & ~reference).sum()), int((~mask & reference).sum())
                    print(f"  {case_name} {name:<9} {class_name:<14} Dice {dice:.4f}  lesion inside {fraction}  "
                          f"extra {extra} missed {missed} voxels  {result['seconds'][-1]:.1f} s", flush=True)
    for result in results.values():
        result["coverage"] = {key: result["inside"][key] / n for key, n in result["total"].items() if n}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="generated seeds (default 0 7 3)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--first-index", type=int, default=0, help="first generated case (the demo's test set: 1000)")
    parser.add_argument("--dataset", type=Path, nargs="*", default=[], help="raw dataset folders with lungsReference/")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep generated cases in (.npz)")
    parser.add_argument("--margins", type=float, nargs="*", default=[10.0],
                        help="also count lesion voxels inside the mask grown by these mm")
    parser.add_argument("--chest-wall-gaps", action="store_true", help="also score the mask with the chest wall gaps")
    parser.add_argument("--no-baseline", action="store_true", help="skip the threshold peer")
    parser.add_argument("--per-case", action="store_true")
    parser.add_argument("--crop-margin", type=float, default=None, metavar="MM",
                        help="cut the grown masks to the lung box plus this margin, as the preprocessor's crop does")
    args = parser.parse_args(argv)

    from dscovid.preprocessing.lung import LungMaskSettings, segment_lungs

    methods = {"dscovid": segment_lungs}
    if args.chest_wall_gaps:
        gaps = LungMaskSettings(chest_wall_gaps=True)
        methods["+gaps"] = lambda image, spacing, direction: segment_lungs(image, spacing, direction, gaps)
    if not args.no_baseline:
        methods["threshold"] = threshold_lungs
    seeds = args.seeds if args.seeds is not None else ([] if args.dataset else [0, 7, 3])
    sources = [(f"seed {seed}", seed_cases(seed, args.first_index, args.cases, args.cache)) for seed in seeds]
    sources += [(folder.name, dataset_cases(folder)) for folder in args.dataset]

    margin_columns = "".join(f" {'all+' + format(m, 'g') + 'mm':>10}" for m in args.margins)
    print(f"{'source':<22} {'method':<9} {'Dice mean':>9} {'min':>6} {'covid':>6} {'cap':>6} {'all':>6}"
          f"{margin_columns} {'s/case':>6}")
    for label, cases in sources:
        results = score(cases, methods, args.margins, args.per_case, args.crop_margin)
        for name, result in results.items():
            coverage = result["coverage"]
            grown = "".join(f" {coverage.get(('all', m), float('nan')):10.3f}" for m in args.margins)
            print(f"{label:<22} {name:<9} {np.mean(result['dices']):9.4f} {np.min(result['dices']):6.4f} "
                  f"{coverage.get(('covid', 0.0), float('nan')):6.3f} {coverage.get(('cap', 0.0), float('nan')):6.3f} "
                  f"{coverage.get(('all', 0.0), float('nan')):6.3f}{grown} {np.mean(result['seconds']):6.1f}",
                  flush=True)
        if args.margins:
            print(f"{label:<22} {'margin':>10} {'covid':>7} {'cap':>7} {'all':>7} {'region / reference lung volume':>31}")
            coverage = results["dscovid"]["coverage"]
            for margin in [0.0, *args.margins]:
                volumes = np.asarray(results["dscovid"]["volume"][margin])
                print(f"{label:<22} {format(margin, 'g') + ' mm':>10} "
                      f"{coverage.get(('covid', margin), float('nan')):7.4f} {coverage.get(('cap', margin), float('nan')):7.4f} "
                      f"{coverage.get(('all', margin), float('nan')):7.4f} "
                      f"{f'mean {volumes.mean():.3f}, max {volumes.max():.3f}':>31}", flush=True)
        if "threshold" in results:
            ours, peer = results["dscovid"]["coverage"], results["threshold"]["coverage"]
            missed_ours, missed_peer = 1 - ours.get(("all", 0.0), 1.0), 1 - peer.get(("all", 0.0), 1.0)
            if missed_ours > 0:
                print(f"{label:<22} lesion voxels left out: threshold / dscovid = {missed_peer / missed_ours:.1f}x")
    return 0


if __name__ == "__main__":
    from dscovid.errors import DscovidError

    try:
        sys.exit(main())
    except DscovidError as error:  # a dataset folder without labels or reference lungs: one line, exit 1
        print(f"quality_lung_mask: {error}", file=sys.stderr)
        sys.exit(1)
