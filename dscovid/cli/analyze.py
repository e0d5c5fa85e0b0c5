"""``dscovid_analyze``: the paper's four lesion findings (section III-B, Fig. 1 d-i) for a raw dataset."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_analyze",
        description="Measure lesion count, volume ratio, density, spread and peripheral lesion ratio on every "
        "annotated case of a raw dataset; write findings.json and the figures of Fig. 1 (d-i) (docs/evaluation.md).",
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset name, number or folder")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("-np", "--num-processes", type=int, default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="only these cases")
    parser.add_argument("--max-thickness", type=float, default=35.0, metavar="MM",
                        help="largest peripheral thickness of the PLR curve, in 1 mm steps (default 35)")
    parser.add_argument("--no-figures", action="store_true", help="write findings.json only")
    add_root_arguments(parser, "raw")
    return parser


def _body(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from dscovid.analysis.analyze import analyze_dataset
    from dscovid.errors import DscovidError
    from dscovid.io.dataset import find_dataset

    if args.max_thickness < 0:
        raise DscovidError(f"--max-thickness must be >= 0 mm, got {args.max_thickness:g}")
    roots = roots_from_args(args)
    root = roots.raw if roots.raw is not None or Path(args.dataset).is_dir() else roots.require("raw")
    dataset = find_dataset(args.dataset, root)
    thicknesses = tuple(float(t) for t in np.arange(0.0, args.max_thickness + 0.5, 1.0))
    summary = analyze_dataset(dataset, args.output, args.num_processes, thicknesses, args.cases,
                              figures=not args.no_figures)
    for name, data in summary["classes"].items():
        lvr = data["lesion_volume_ratio"]["mean"]
        spread = data["spread_mm"]["mean"]
        print(f"{name}: {data['num_cases']} CTs, lesions/CT {data['lesion_count']['mean']:.2f}, "
              f"mean LVR {100 * (lvr or 0):.1f}%, spread {spread or 0:.1f} mm")
    print(f"written: {Path(args.output) / 'findings.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
