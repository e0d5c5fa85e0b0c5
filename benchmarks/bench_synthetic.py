"""Speed of the synthetic phantom generator, its agreement with the paper's findings, and the montage figure.

Examples::

    python benchmarks/bench_synthetic.py --cases 60 -np 2          # time writing 60 default-size cases
    python benchmarks/bench_synthetic.py --full-size 1             # time one 512x512 case
    python benchmarks/bench_synthetic.py --findings 300 -np 2      # table of measured vs paper values
    python benchmarks/bench_synthetic.py --montage docs/synthetic_montage.png
    python benchmarks/bench_synthetic.py --findings 40 --variant small_lesions   # the findings of one variant
    python benchmarks/bench_synthetic.py --variant-montage docs/synthetic_variants.png   # one case, every variant

``--variant NAME`` applies to ``--cases``, ``--findings`` and ``--montage``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

from dataset_conversion.synthetic import PLR_THICKNESS_MM, generate_case, generate_dataset
from dataset_conversion.synthetic_findings import PAPER, measure_findings
from dataset_conversion.synthetic_montage import save_montage, save_variant_montage
from dataset_conversion.synthetic_variants import VARIANTS

_LABELS = {
    "covid_lesion_count": "COVID-19 lesions per scan",
    "covid_share_4_or_more": "COVID-19 scans with >= 4 lesions",
    "cap_lesion_count": "CAP lesions per scan",
    "cap_share_exactly_1": "CAP scans with exactly 1 lesion",
    "covid_lvr_mean": "COVID-19 mean lesion volume ratio",
    "covid_share_lvr_above_12": "COVID-19 scans with LVR > 12 %",
    "cap_lvr_mean": "CAP mean lesion volume ratio",
    "cap_share_lvr_above_12": "CAP scans with LVR > 12 %",
    "covid_share_hu_-960_-600": "COVID-19 lesion voxels in [-960, -600] HU",
    "cap_share_hu_bimodal": "CAP lesion voxels in [-970, -580] or [-70, 140] HU",
    "covid_plr": f"COVID-19 peripheral lesion ratio ({PLR_THICKNESS_MM:g} mm)",
    "cap_plr": f"CAP peripheral lesion ratio ({PLR_THICKNESS_MM:g} mm)",
}


def _time_dataset(n_cases: int, processes: int, variant: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        out = generate_dataset(Path(folder) / "Dataset999_Bench", n_cases=n_cases, seed=0, num_processes=processes,
                               variant=variant)
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*.nii.gz")) / 2**20
    print(
        f"{n_cases} default-size cases of variant {variant} with {processes} process(es): {elapsed:.1f} s "
        f"({elapsed / n_cases:.2f} s per case), {size:.0f} MiB written"
    )


def _time_full_size(n_cases: int) -> None:
    for index in range(n_cases):
        start = time.perf_counter()
        case = generate_case(0, index, full_size=True)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        print(
            f"full-size case {index}: shape {case.geometry.shape_zyx}, spacing "
            f"{tuple(round(s, 2) for s in case.geometry.spacing_zyx_mm)} mm, {elapsed:.1f} s, peak RSS {peak:.0f} MiB"
        )


def _findings_table(n_cases: int, scale: float, processes: int, seed: int, variant: str) -> None:
    start = time.perf_counter()
    measured = measure_findings(n_cases, seed=seed, scale=scale, num_processes=processes, variant=variant)
    elapsed = time.perf_counter() - start
    print(
        f"{n_cases} cases (variant {variant}, seed {seed}, scale {scale:g}: {int(measured['cases_covid'])} COVID-19, "
        f"{int(measured['cases_cap'])} CAP, {int(measured['cases_non_pneumonia'])} non-pneumonia), "
        f"{elapsed:.0f} s\n"
    )
    print("| finding | paper | synthetic |")
    print("|---|---|---|")
    for key, label in _LABELS.items():
        paper, value = PAPER[key], measured[key]
        fmt = "{:.2f}" if "count" in key else "{:.1%}"
        print(f"| {label} | {fmt.format(paper)} | {fmt.format(value)} |")
    print(f"| lesions found in non-pneumonia scans | 0 | {int(measured['non_pneumonia_lesion_count'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=0, help="time writing this many default-size cases")
    parser.add_argument("--full-size", type=int, default=0, help="time this many full-size cases")
    parser.add_argument("--findings", type=int, default=0, help="measure the paper's findings over this many cases")
    parser.add_argument("--scale", type=float, default=1.0, help="grid scale for --findings (default 1)")
    parser.add_argument("--seed", type=int, default=2026, help="seed for --findings")
    parser.add_argument("--montage", type=Path, default=None, help="write the montage PNG here")
    parser.add_argument("--variant", default="default", choices=list(VARIANTS),
                        help="synthetic variant for --cases, --findings and --montage (default: default)")
    parser.add_argument("--variant-montage", type=Path, default=None,
                        help="write a PNG of one COVID-19 case in every variant here")
    parser.add_argument("-np", type=int, default=1, help="worker processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cases:
        _time_dataset(args.cases, args.np, args.variant)
    if args.full_size:
        _time_full_size(args.full_size)
    if args.findings:
        _findings_table(args.findings, args.scale, args.np, args.seed, args.variant)
    if args.montage:
        print(f"montage written to {save_montage(args.montage, seed=0, variant=args.variant)}")
    if args.variant_montage:
        print(f"variant montage written to {save_variant_montage(args.variant_montage, seed=0)}")


if __name__ == "__main__":
    main()
