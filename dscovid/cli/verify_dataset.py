"""``dscovid_verify_dataset DATASET``: list every problem of a raw dataset; exit 0 only when it is clean."""

from __future__ import annotations

import argparse
import sys

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command
from dscovid.io.dataset import find_dataset
from dscovid.io.validate import verify_dataset


def _run(args: argparse.Namespace) -> int:
    folder = find_dataset(args.dataset, roots_from_args(args).raw)
    problems = verify_dataset(folder, num_processes=args.np, progress=not args.quiet)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{folder.name}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{folder.name}: dataset is valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dscovid_verify_dataset",
        description="Check a raw dataset (dataset.json, files, geometry, mask values, classes) and list every problem.",
    )
    parser.add_argument("dataset", help="dataset number, name (Dataset001_Name) or folder")
    parser.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    add_root_arguments(parser, "raw")
    return run_command(parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
