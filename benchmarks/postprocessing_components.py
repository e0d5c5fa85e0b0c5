"""What removing small predicted lesion components would do, measured on a prediction folder against its reference.

nnU-Net chooses its post-processing on the validation set; this script is the measurement such a choice needs for
dscovid's lesion masks. For every case of ``dscovid_predict``'s output (run without ``--min-lesion-ml``) and each
volume it applies what ``--min-lesion-ml`` would (:func:`dscovid.prediction.export.drop_small_lesions`: the
26-connected components below the volume are dropped); it also tries emptying the mask of every case the classifier
calls non-pneumonia. It prints, per rule, the mean lesion Dice over the cases with a
reference lesion (paired to no post-processing, 95 % bootstrap interval), and how many reference-empty cases keep
a false alarm. Each case is scored by :func:`dscovid.prediction.postprocessing.score_case`, what
``dscovid_find_postprocessing`` measures. Nothing in the prediction folder is changed.

Examples::

    python benchmarks/postprocessing_components.py --pred WORK/full/predictions/dev/default \\
        --ref WORK/full/raw/Dataset981_AccuracyDev
    python benchmarks/postprocessing_components.py --pred OUT --ref RAW/Dataset002_SyntheticTest --min-lesion-ml 0 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dscovid.evaluation.intervals import bootstrap_interval, paired_bootstrap
from dscovid.parallel import map_cases
from dscovid.prediction.postprocessing import CaseJob, score_case

NON_PNEUMONIA = "non_pneumonia"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, type=Path, help="dscovid_predict output folder")
    parser.add_argument("--ref", required=True, type=Path, help="raw dataset (labelsTr/, dataset.json)")
    parser.add_argument("--min-lesion-ml", nargs="+", type=float, default=[0, 0.1, 0.5, 1, 2, 5, 10],
                        help="the volumes in ml to try, as dscovid_predict --min-lesion-ml (0: none)")
    parser.add_argument("-np", "--processes", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=None, help="per-case rows as JSON")
    args = parser.parse_args()
    thresholds = tuple(sorted(set(args.min_lesion_ml) | {0.0}))
    predicted = json.loads((args.pred / "predictions.json").read_text(encoding="utf-8"))
    entries = {entry["case"]: entry for entry in predicted["cases"]}
    cases = sorted(entries)
    jobs = [CaseJob(case, args.pred / f"{case}.nii.gz", args.ref / "labelsTr" / f"{case}.nii.gz", thresholds)
            for case in cases]
    rows = dict(zip(cases, map_cases(score_case, jobs, args.processes, progress=False)))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    called_non_pneumonia = {c for c in cases if entries[c].get("predicted_class") == NON_PNEUMONIA}

    lesion = [c for c in cases if rows[c]["reference_ml"] > 0]
    empty = [c for c in cases if rows[c]["reference_ml"] == 0]
    base = np.array([rows[c]["dice"][0] for c in lesion])
    print(f"{len(cases)} cases: {len(lesion)} with a reference lesion, {len(empty)} without")
    print("| rule | lesion Dice (%) | − none (paired) | reference-empty cases with a false alarm |")
    print("|---|---|---|---|")

    def line(name: str, dice: np.ndarray, alarms: int) -> None:
        mean, (low, high) = float(np.mean(dice)), bootstrap_interval(dice)
        diff, dlow, dhigh = paired_bootstrap(dice, base)
        print(f"| {name} | {100 * mean:.1f} ({100 * low:.1f}-{100 * high:.1f}) | {100 * diff:+.1f} "
              f"({100 * dlow:+.1f} to {100 * dhigh:+.1f}) | {alarms} of {len(empty)} |")

    for k, threshold in enumerate(thresholds):
        dice = np.array([rows[c]["dice"][k] for c in lesion])
        alarms = sum(rows[c]["kept_ml"][k] > 0 for c in empty)
        line("none" if threshold == 0 else f"--min-lesion-ml {threshold:g}", dice, alarms)
    volumes = sorted(rows[c]["kept_ml"][0] for c in empty)
    if volumes:
        print(f"false-alarm volume on the reference-empty cases: median {np.median(volumes):.2f} ml, "
              f"largest {volumes[-1]:.2f} ml")
    # An emptied mask scores 0 on a case with a reference lesion.
    emptied = np.array([0.0 if c in called_non_pneumonia else rows[c]["dice"][0] for c in lesion])
    alarms = sum(rows[c]["kept_ml"][0] > 0 and c not in called_non_pneumonia for c in empty)
    line("empty the mask when the class is non-pneumonia", emptied, alarms)


if __name__ == "__main__":
    main()
