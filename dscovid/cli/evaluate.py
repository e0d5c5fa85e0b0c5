"""``dscovid_evaluate``: segmentation and classification metrics of a prediction folder against references."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from dscovid.cli._common import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_evaluate",
        description="Evaluate the output folder of dscovid_predict against reference lesion masks and diagnoses: "
        "writes summary.json, a per-case CSV, ROC curves and a confusion matrix (docs/evaluation.md).",
    )
    parser.add_argument("-ref", required=True, metavar="DIR",
                        help="reference lesion masks <case>.nii.gz, or a raw dataset folder (labelsTr/ + dataset.json)")
    parser.add_argument("-pred", required=True, metavar="DIR", help="output folder of dscovid_predict")
    parser.add_argument("--dataset-json", metavar="FILE",
                        help="dataset.json giving each case's class (default: the raw dataset's own when -ref is one)")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="evaluate only these cases")
    parser.add_argument("--lungs", metavar="DIR",
                        help="lung masks <case>.nii.gz: count specificity inside the lungs (default: whole volume)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                        help="tolerance of the normalised surface Dice in mm (default 1)")
    parser.add_argument("-o", "--output", metavar="FILE", help="summary file (default PRED/summary.json)")
    parser.add_argument("-np", "--num-processes", type=int, default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the ROC and confusion-matrix figures")
    return parser


def _body(args: argparse.Namespace) -> int:
    from dscovid.evaluation.evaluate import evaluate_folder

    summary = evaluate_folder(
        args.pred, args.ref, args.output, dataset_json=args.dataset_json, cases=args.cases, lung_dir=args.lungs,
        nsd_tolerance_mm=args.nsd_tolerance, num_processes=args.num_processes, plots=not args.no_plots,
    )
    shown = {"segmentation (all cases)": summary["segmentation"]["mean"],
             "segmentation (cases with lesions)": summary["segmentation"]["lesion_cases"]["mean"]}
    if summary["classification"] is not None:
        shown["classification"] = {"accuracy": summary["classification"]["accuracy"], **summary["classification"]["macro"]}
    print(json.dumps(shown, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
