"""``dscovid_predict``: lesion masks, diagnoses and lesion reports for unseen chest CT (docs/prediction.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dscovid.cli._common import add_root_arguments, roots_from_args, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscovid_predict",
        description="Predict lesion masks, class probabilities, evidence maps and lesion reports with a trained "
        "model. Outputs lie on each input's original grid (same size, spacing, origin and direction).",
    )
    parser.add_argument("-i", "--input", required=True, nargs="+", metavar="IN",
                        help="a folder of *_0000.nii.gz or other volumes or DICOM series sub-folders, or files")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    parser.add_argument("-d", "--dataset", default=None, help="dataset the model was trained on (name or number)")
    parser.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_paper or 3d_cpu")
    parser.add_argument("-tr", "--trainer", default=None, help="trainer name (default: the only one trained)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to average (default: every trained fold), e.g. -f 0 1 2 or -f all")
    parser.add_argument("-m", "--model-dir", default=None, metavar="MODEL_DIR",
                        help="the <Trainer>__<configuration> folder itself (instead of -d/-c/-tr)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pt", help="checkpoint file name in each fold")
    parser.add_argument("--step", type=float, default=None,
                        help="sliding-window step as a fraction of the patch: 1.0 no overlap (paper), 0.5 half "
                        "(default: the configuration's)")
    parser.add_argument("--tile-placement", choices=("grid", "region", "region_sized"), default=None,
                        help="sliding-window tiles: grid over the volume, region (fitted to the lungs) or region_sized "
                        "(fitted in size too) (default: the configuration's)")
    parser.add_argument("--disable-tta", action="store_true",
                        help="no test-time mirroring: each fold runs once (half the network time, for a slow device)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write <case>_lesion_prob.nii.gz and <case>_lung.nii.gz")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available (mixed precision), else cpu")
    parser.add_argument("-np", "--num-workers", type=int, default=1,
                        help="cases read and preprocessed ahead: 1 = a background thread, N > 1 = N processes")
    parser.add_argument("--peripheral-thickness", type=float, default=10.0, metavar="MM",
                        help="peripheral thickness of the reported peripheral lesion ratio, in mm (default 10)")
    parser.add_argument("--min-lesion-ml", type=float, default=0.0, metavar="ML",
                        help="drop predicted lesion components smaller than ML millilitres (default 0: keep all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace predictions of another model already in OUT instead of refusing")
    parser.add_argument("--dicom", action=argparse.BooleanOptionalAction, default=None,
                        help="write <case>_seg.dcm (DICOM-SEG: lesion and lung) and <case>_sr.dcm (DICOM structured "
                        "report, TID 1500) referencing the source series; default: on for DICOM series input. --dicom "
                        "refuses other input, --no-dicom writes none")
    parser.add_argument("--num-parts", type=int, default=1, metavar="K",
                        help="split the cases into K parts (for K jobs or GPUs sharing the same -i and -o; "
                        "default 1)")
    parser.add_argument("--part-id", type=int, default=0, metavar="I",
                        help="predict part I (0..K-1): every K-th case, sorted by name, from the I-th on")
    parser.add_argument("--accept-implausible", action="store_true",
                        help="predict scans the plausibility rule refuses (too few slices, too thick, a lung volume "
                        "no chest holds; docs/reliability.md), flagged, instead of failing them")
    parser.add_argument("--png", action="store_true",
                        help="also draw <case>_montage.png: axial slices through the lesions with the predicted outline "
                        "and the evidence map, the class and the probabilities")
    add_root_arguments(parser, "results")
    return parser


def _run(args: argparse.Namespace) -> int:
    from dscovid.errors import DscovidError
    from dscovid.prediction.predict import predict_cases
    from dscovid.results.model_folder import find_model_folder

    if args.model_dir is None:
        if args.dataset is None:
            raise DscovidError("say which model to use: -m MODEL_DIR, or -d DATASET (with -c and -tr if needed)")
        model_dir = find_model_folder(roots_from_args(args).require("results"), args.dataset, args.configuration,
                                      args.trainer)
    else:
        model_dir = args.model_dir
    if args.num_workers < 1:
        raise DscovidError(f"-np must be at least 1, got {args.num_workers}")
    summary = predict_cases(
        model_dir=model_dir,
        inputs=args.input,
        output_dir=args.output,
        folds=args.folds,
        configuration=args.configuration,
        device=args.device,
        step_fraction=args.step,
        save_probabilities=args.save_probabilities,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        peripheral_thickness_mm=args.peripheral_thickness,
        checkpoint_name=args.checkpoint,
        progress=not args.quiet,
        dicom=args.dicom,
        num_parts=args.num_parts,
        part_id=args.part_id,
        accept_implausible=args.accept_implausible,
        min_lesion_ml=args.min_lesion_ml,
        mirroring=not args.disable_tta,
        tile_placement=args.tile_placement,
    )
    from dscovid.io.scans import find_scans
    from dscovid.prediction.inputs import select_part

    # This run's cases only: the folder also lists earlier runs' cases and, with parts, the other parts'.
    mine = {case.name: case.path for case in select_part(find_scans(args.input), args.num_parts, args.part_id)}
    if args.png:
        from dscovid.prediction.montage import save_montages

        save_montages(args.output, [e for e in summary["cases"] if e["case"] in mine], mine, progress=not args.quiet)
    failed = [failure["case"] for failure in summary["failed"] if failure["case"] in mine]
    if failed:
        print(f"dscovid_predict: {len(failed)} case(s) failed: {', '.join(failed)} (reasons above and in "
              f"{args.output}/predictions.json)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
