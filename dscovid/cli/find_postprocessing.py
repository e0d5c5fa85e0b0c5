"""``dscovid_find_postprocessing``: choose a model's minimum lesion volume on held-out cases (docs/evaluation.md)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_find_postprocessing",
        description="Measure, on predictions of cases the model did not train on, what dropping the predicted lesion "
        "components below each of several volumes does, choose the volume that removes the most false alarms on "
        "lesion-free cases without costing lesion Dice, and write it to postprocessing.json in the model folder, "
        "where dscovid_predict applies it by default.",
    )
    parser.add_argument("-d", "--dataset", default=None, help="dataset the model was trained on (name or number)")
    parser.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_paper or 3d_cpu")
    parser.add_argument("-tr", "--trainer", default=None, help="trainer name (default: the only one trained)")
    parser.add_argument("-m", "--model-dir", default=None, metavar="MODEL_DIR",
                        help="the <Trainer>__<configuration> folder itself (instead of -d/-c/-tr)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds whose final validations are used (default: every fold that has one)")
    parser.add_argument("--predictions", nargs="+", default=None, metavar="DIR",
                        help="instead of the folds' validations: dscovid_predict output folders of this model on "
                        "held-out cases, made without --min-lesion-ml (their references: --reference)")
    parser.add_argument("--reference", default=None, metavar="RAW_DATASET",
                        help="the raw dataset holding the references (labelsTr/); default: the model's own dataset "
                        "in the raw folder")
    parser.add_argument("--candidates", nargs="+", type=float, default=None, metavar="ML",
                        help="the volumes to try in ml (default: 0.1 to 20; 0, no post-processing, is always tried)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file name in each fold")
    parser.add_argument("--dry-run", action="store_true", help="print the table and the choice, write nothing")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes reading the masks")
    add_root_arguments(parser, "raw", "results")
    return parser


def _body(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dscovid.errors import DscovidError
    from dscovid.plans.configuration import load_plans
    from dscovid.prediction.postprocessing import CANDIDATES_ML, POSTPROCESSING_FILE, find_postprocessing
    from dscovid.results.model_folder import find_model_folder

    roots = roots_from_args(args)
    if args.model_dir is None:
        if args.dataset is None:
            raise DscovidError("say which model: -m MODEL_DIR, or -d DATASET (with -c and -tr if needed)")
        model_dir = find_model_folder(roots.require("results"), args.dataset, args.configuration, args.trainer)
    else:
        model_dir = Path(args.model_dir)
    if args.reference is not None:
        reference = Path(args.reference)
    else:
        plans = load_plans(model_dir / "plans.json")
        reference = roots.require("raw") / plans.dataset_name
    result = find_postprocessing(model_dir, reference, folds=args.folds, predictions=args.predictions,
                                 candidates_ml=args.candidates or CANDIDATES_ML, checkpoint_name=args.checkpoint,
                                 num_processes=args.num_processes, progress=not args.quiet, write=not args.dry_run)
    seen = result["chosen_on"]
    print(f"{seen['cases']} held-out cases ({seen['lesion_cases']} with a reference lesion, "
          f"{seen['lesion_free_cases']} without) from the {seen['source']}")
    print("| minimum lesion volume (ml) | lesion Dice (%) | lesion-free cases with a false alarm | false-alarm ml |")
    print("|---|---|---|---|")
    for row in result["candidates"]:
        dice = "–" if row["lesion_dice"] is None else f"{100 * row['lesion_dice']:.2f}"
        mark = " **chosen**" if row["min_lesion_ml"] == result["min_lesion_ml"] else ""
        print(f"| {row['min_lesion_ml']:g}{mark} | {dice} | {row['false_alarm_cases']} of {seen['lesion_free_cases']} "
              f"| {row['false_alarm_ml']:.1f} |")
    where = "not written (--dry-run)" if args.dry_run else f"written to {model_dir / POSTPROCESSING_FILE}"
    print(f"minimum lesion volume {result['min_lesion_ml']:g} ml; {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
