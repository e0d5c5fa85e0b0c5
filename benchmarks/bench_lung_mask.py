"""Speed and memory of the classical lung segmentation on full-size scans.

::

    python benchmarks/bench_lung_mask.py [--data $DSCOVID_TEST_DATA] [--synthetic-index 0] [--repeat 1]

Times :func:`dscovid.preprocessing.lung.segment_lung_sides` (reading excluded) on the real COVID-CT-MD DICOM
series P002 (512×512×133) and on one full-size synthetic case (512×512, 200-350 slices;
``dataset_conversion.synthetic``, ``full_size``), and reports the best wall time of ``--repeat`` runs, the peak
memory the segmentation allocates on top of its input (numpy allocations, via ``tracemalloc``), the working grid,
and for the synthetic case the Dice against its reference lung and the fraction of lesion voxels inside the mask.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np


def measure(name: str, image: np.ndarray, geometry, repeat: int, lung=None, lesion=None) -> dict:
    """Best seconds of ``repeat`` runs and the peak extra memory of one run, plus quality when references exist."""
    from dscovid.preprocessing.lung import lung_volumes_ml, segment_lung_sides

    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
        seconds.append(time.perf_counter() - started)
    tracemalloc.start()
    segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    volumes = lung_volumes_ml(sides, geometry.spacing_zyx_mm)
    row = {
        "scan": name,
        "shape_zyx": "×".join(str(n) for n in image.shape),
        "spacing_zyx_mm": "×".join(f"{s:.3g}" for s in geometry.spacing_zyx_mm),
        "seconds": min(seconds),
        "peak_extra_mb": peak / 2**20,
        "input_mb": image.nbytes / 2**20,
        "right_l": volumes["right"] / 1000,
        "left_l": volumes["left"] / 1000,
    }
    if lung is not None:
        mask = sides > 0
        row["dice"] = 2.0 * float((mask & (lung > 0)).sum()) / float(mask.sum() + (lung > 0).sum())
        row["lesion_inside"] = float(mask[lesion > 0].mean()) if lesion.any() else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DSCOVID_TEST_DATA"),
                        help="real CT test data (default: $DSCOVID_TEST_DATA); skipped when absent")
    parser.add_argument("--synthetic-index", type=int, default=0, help="index of the full-size synthetic case (seed 0)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic case")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per scan (the best is reported)")
    args = parser.parse_args(argv)

    from dscovid.io.image_io import read_image

    rows = []
    if args.data is not None and (args.data / "covid_ct_md").is_dir():
        image, geometry = read_image(args.data / "covid_ct_md" / "COVID-19 subjects" / "P002")
        rows.append(measure("COVID-CT-MD P002 (DICOM)", image, geometry, args.repeat))
    if not args.no_synthetic:
        from dataset_conversion.synthetic import generate_case

        case = generate_case(0, args.synthetic_index, full_size=True)
        rows.append(measure(f"synthetic full-size case {args.synthetic_index} ({case.class_name})", case.image_hu,
                            case.geometry, args.repeat, case.lung, case.lesion))
    print(f"{'scan':<42} {'shape':>13} {'spacing mm':>15} {'s':>6} {'peak MB':>8} {'input MB':>8} "
          f"{'R l':>5} {'L l':>5} {'Dice':>6} {'lesion in':>9}")
    for row in rows:
        print(f"{row['scan']:<42} {row['shape_zyx']:>13} {row['spacing_zyx_mm']:>15} {row['seconds']:6.1f} "
              f"{row['peak_extra_mb']:8.0f} {row['input_mb']:8.0f} {row['right_l']:5.2f} {row['left_l']:5.2f} "
              f"{row.get('dice', float('nan')):6.3f} {row.get('lesion_inside', float('nan')):9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
