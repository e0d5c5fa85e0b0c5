"""``dscovid_cv_summary``: the cross-validation table (paper's Table II) from the folds' validation summaries."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_cv_summary",
        description="Collect fold_K/validation/summary.json of every trainer of a dataset into Table II: "
        "mean (std) over the folds, as Markdown and CSV (docs/evaluation.md).",
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset name, number or results folder")
    parser.add_argument("-c", "--configuration", help="only this configuration (default: all)")
    parser.add_argument("-tr", "--trainers", nargs="+", metavar="TRAINER", help="only these trainers, in this order")
    parser.add_argument("--segmentation-cases", choices=("lesion", "all"), default="lesion",
                        help="segmentation means over cases with lesions (default) or over all cases")
    parser.add_argument("-o", "--output", metavar="DIR", help="where to write the tables (default: the dataset's "
                        "results folder)")
    add_root_arguments(parser, "results")
    return parser


def _body(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dscovid.evaluation.cv_summary import collect_cv_summary, format_markdown, write_cv_summary
    from dscovid.io.dataset import find_dataset

    roots = roots_from_args(args)
    # A folder given as a path needs no results root; a name or number is looked up in it.
    root = roots.results if roots.results is not None or Path(args.dataset).is_dir() else roots.require("results")
    results = find_dataset(args.dataset, root)
    rows = collect_cv_summary(results, args.configuration, args.trainers, args.segmentation_cases)
    stem = "cv_summary" + (f"_{args.configuration}" if args.configuration else "")
    markdown_path, csv_path = write_cv_summary(rows, args.output or results, stem)
    print(format_markdown(rows), end="")
    print(f"written: {markdown_path}, {csv_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
