"""``dscovid_make_synthetic -o DIR -n N --seed S [--variant NAME]``: write a raw dataset of synthetic chest-CT
phantoms."""

from __future__ import annotations

import argparse
import sys

from dataset_conversion.synthetic import generate_dataset
from dataset_conversion.synthetic_variants import VARIANTS
from dscovid.cli._common import run_command


def _run(args: argparse.Namespace) -> int:
    generate_dataset(
        args.output,
        n_cases=args.n,
        seed=args.seed,
        full_size=args.full_size,
        first_index=args.first_index,
        num_processes=args.np,
        scale=args.scale,
        variant=args.variant,
    )
    print(args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dscovid_make_synthetic",
        description="Generate synthetic chest CTs (COVID-19, CAP, non-pneumonia) with lesion masks and reference "
        "lung masks, as a raw dataset (imagesTr, labelsTr, lungsReference, dataset.json).",
        epilog="variants (--variant NAME):\n" + "\n".join(f"  {v.name}: {v.description}" for v in VARIANTS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="dataset folder to write, e.g. $DSCOVID_raw/Dataset001_Synthetic")
    parser.add_argument("-n", type=int, default=60, help="number of cases (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; case i depends on (seed, i) only")
    parser.add_argument("--full-size", action="store_true",
                        help="512x512 slices, 200-350 slices of 1-1.5 mm (for benchmarks; slow)")
    parser.add_argument("--first-index", type=int, default=0,
                        help="number of the first case (case_NNNN): give a test set distinct names")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the voxel counts of each case (e.g. 0.4 for tiny cases in tests; default 1)")
    parser.add_argument("--variant", default="default", metavar="NAME",
                        help="scan the phantoms differently (thick slices, noise and kernel, field of view, lesion "
                        "sizes); names below (default: default)")
    parser.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    return run_command(parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
