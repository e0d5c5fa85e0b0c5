"""``dscovid_plan_and_preprocess``: validate, fingerprint, plan and preprocess a raw dataset."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command
from dscovid.io.dataset import find_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_plan_and_preprocess",
        description="Check a raw dataset, compute its fingerprint, write plans.json and fill the preprocessed cache "
                    "(only missing or stale cases are redone).",
    )
    parser.add_argument("-d", "--dataset", required=True,
                        help="dataset number (1), name (Dataset001_Synthetic) or folder")
    parser.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CONFIG",
                        help="configurations to preprocess (default: all in the plans, e.g. 3d_paper 3d_cpu)")
    parser.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="worker processes (default: %(default)s)")
    parser.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                        help="presets to plan, by name or JSON file (default: 3d_paper 3d_cpu)")
    parser.add_argument("--plans", default=None, metavar="FILE",
                        help="use this plans file instead of planning (it must be for the same dataset)")
    parser.add_argument("--overwrite-target-spacing", nargs=3, type=float, default=None, metavar=("Z", "Y", "X"),
                        help="target spacing in mm for every planned configuration")
    parser.add_argument("--plan-only", action="store_true", help="stop after writing plans.json")
    parser.add_argument("--no-verify", action="store_true", help="skip the dataset validator")
    parser.add_argument("--overwrite", action="store_true", help="redo every case even when up to date")
    add_root_arguments(parser, "raw", "preprocessed")
    return parser


def _body(args: argparse.Namespace) -> int:
    from dscovid.errors import DscovidError
    from dscovid.planning.plan_and_preprocess import plan_and_preprocess

    if args.num_processes < 1:
        raise DscovidError(f"-np must be at least 1, got {args.num_processes}")
    roots = roots_from_args(args)
    folder = find_dataset(args.dataset, roots.raw)
    result = plan_and_preprocess(
        folder,
        roots.require("preprocessed"),
        configurations=args.configurations,
        presets=args.presets,
        num_processes=args.num_processes,
        plans_file=args.plans,
        override_spacing=args.overwrite_target_spacing,
        verify=not args.no_verify,
        preprocess=not args.plan_only,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(result["output"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
