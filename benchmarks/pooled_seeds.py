"""Compare two models over several training seeds each, paired over the same cases.

One training moves the accuracy benchmark's figures by up to 4 points (docs/evaluation.md), so a choice between two
models rests on two or more trainings of each. This script takes the prediction folders of each model's trainings
on one evaluation set (each holding the ``summary.json`` that ``dscovid_evaluate`` writes, as
``bench_accuracy.py`` leaves them), averages every case's lesion Dice and correctness over a model's trainings, and
reports the difference of the means (candidate − reference) with a paired percentile bootstrap over the cases::

    python benchmarks/pooled_seeds.py --reference P/dev/default P/dev/defaults1 \\
        --candidate P/dev/falseLesions P/dev/falseLesionss1

Only cases every folder scored enter (lesion Dice: the cases with lesions). A missing folder or ``summary.json``, or
one that is not a ``dscovid_evaluate`` summary, is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_accuracy import case_table  # noqa: E402

from dscovid.evaluation.intervals import paired_bootstrap  # noqa: E402
from dscovid.io.dataset import CLASS_NAMES  # noqa: E402

MEASURES = (("dice", "lesion Dice"), ("correct", "accuracy"))


def read_tables(folders: list[Path]) -> list[dict[str, dict]]:
    """The per-case table of each prediction folder's ``summary.json``."""
    tables = []
    for folder in folders:
        summary = folder / "summary.json"
        if not summary.is_file():
            raise SystemExit(f"{folder}: no summary.json (evaluate the predictions with dscovid_evaluate first)")
        try:
            table = case_table(summary, list(CLASS_NAMES))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SystemExit(f"{summary}: not a dscovid_evaluate summary ({type(error).__name__}: {error})") from None
        if not table:
            raise SystemExit(f"{summary}: no scored case (not a dscovid_evaluate summary of predictions)")
        tables.append(table)
    return tables


def pooled(reference: list[dict[str, dict]], candidate: list[dict[str, dict]]) -> dict[str, dict]:
    """Per measure: the cases, each model's mean over cases of its seed-averaged values, and the paired difference."""
    result = {}
    everyone = reference + candidate
    for key, _ in MEASURES:
        cases = sorted(set.intersection(*(set(k for k, row in table.items() if key in row) for table in everyone)))
        if not cases:
            continue
        ref = np.array([np.mean([table[c][key] for table in reference]) for c in cases])
        cand = np.array([np.mean([table[c][key] for table in candidate]) for c in cases])
        result[key] = {"cases": len(cases), "reference": float(ref.mean()), "candidate": float(cand.mean()),
                       "difference": paired_bootstrap(cand, ref)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, nargs="+", required=True, help="the reference model's folders")
    parser.add_argument("--candidate", type=Path, nargs="+", required=True, help="the candidate model's folders")
    args = parser.parse_args(argv)
    result = pooled(read_tables(args.reference), read_tables(args.candidate))
    print(f"| measure | cases | reference ({len(args.reference)} trainings) | candidate ({len(args.candidate)} "
          "trainings) | difference (95 % CI) |")
    print("|---|---|---|---|---|")
    for key, label in MEASURES:
        if key in result:
            row = result[key]
            diff, low, high = (100 * v for v in row["difference"])
            print(f"| {label} | {row['cases']} | {100 * row['reference']:.2f} | {100 * row['candidate']:.2f} "
                  f"| {diff:+.2f} ({low:+.2f} to {high:+.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
