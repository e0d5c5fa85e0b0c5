"""Quality of the classical lung mask on synthetic cases: Dice and the share of lesion voxels inside, per class.

::

    python benchmarks/quality_lung_mask.py [--seeds 0 7 3] [--cases 10] [--cache DIR] [--per-case]

For each seed, cases ``0 .. cases-1`` of ``dataset_conversion.synthetic.generate_case`` (default small grids) are
segmented with :func:`dscovid.preprocessing.lung_mask.segment_lungs` and compared with the reference lung (which
includes the lesions). Prints one table per seed: Dice mean (min) and, per class, the fraction of lesion voxels
inside the mask (pooled over the cases of that class). ``--per-case`` also prints each case. ``--cache`` keeps
the generated cases as ``.npz`` so that repeated runs only time the segmentation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


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


def score_seed(seed: int, cases: int, cache: Path | None, per_case: bool = False) -> dict:
    """Dice per case and the pooled lesion fraction inside the mask per class, for cases ``0 .. cases-1``."""
    from dscovid.preprocessing.lung_mask import segment_lungs

    dices, inside, total, seconds = [], {}, {}, []
    for index in range(cases):
        image, lesion, lung, spacing, direction, class_name = load_case(seed, index, cache)
        started = time.perf_counter()
        mask = segment_lungs(image, spacing, direction) > 0
        seconds.append(time.perf_counter() - started)
        reference = lung > 0
        dice = 2.0 * float((mask & reference).sum()) / float(mask.sum() + reference.sum())
        dices.append(dice)
        hit, count = int(mask[lesion > 0].sum()), int((lesion > 0).sum())
        inside[class_name] = inside.get(class_name, 0) + hit
        total[class_name] = total.get(class_name, 0) + count
        if per_case:
            fraction = f"{hit / count:.3f}" if count else "  -  "
            extra = int((mask & ~reference).sum())
            missed = int((~mask & reference).sum())
            print(f"  seed {seed} case {index}: {class_name:<14} Dice {dice:.4f}  lesion inside {fraction}  "
                  f"extra {extra} missed {missed} voxels  {seconds[-1]:.1f} s", flush=True)
    coverage = {name: inside[name] / count for name, count in total.items() if count}
    return {"seed": seed, "dices": dices, "coverage": coverage, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 7, 3])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep generated cases in (.npz)")
    parser.add_argument("--per-case", action="store_true")
    args = parser.parse_args(argv)
    print(f"{'seed':>4} {'Dice mean':>9} {'min':>6} {'covid':>6} {'cap':>6} {'s/case':>6}")
    for seed in args.seeds:
        result = score_seed(seed, args.cases, args.cache, args.per_case)
        coverage = result["coverage"]
        print(f"{seed:>4} {np.mean(result['dices']):9.4f} {np.min(result['dices']):6.4f} "
              f"{coverage.get('covid', float('nan')):6.3f} {coverage.get('cap', float('nan')):6.3f} "
              f"{np.mean(result['seconds']):6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
