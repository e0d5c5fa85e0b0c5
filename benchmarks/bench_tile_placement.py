"""A trained model predicted with each sliding-window tile placement, side by side (docs/prediction.md, the engine).

Uses the working folder of ``benchmarks/bench_accuracy.py`` (its trained models and evaluation sets): the model
predicts one set once per placement (``dscovid_predict --tile-placement``), one after the other in one run, each
scored by the evaluator. Prints per placement the lesion Dice, accuracy and macro AUC with 95 % intervals, the paired
difference to the first placement, how many cases change class, the Dice of the masks against the first
placement's, the mean tiles run and the median network seconds per scan.

    python benchmarks/bench_tile_placement.py --work /data/bench_accuracy --set dev --run lesionGate
    python benchmarks/bench_tile_placement.py --work /data/bench_accuracy --set dev --run lesionGate \
        --step 1.0 --disable-tta
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_accuracy import _fmt, case_table, figures, paired
from bench_precision import _fmt_diff_fine, add_model_arguments, chosen_model, mask_agreement, network_seconds

from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.evaluation.intervals import bootstrap_interval
from dscovid.inference.sliding_window import PLACEMENTS
from dscovid.prediction.predict import predict_cases

CLASS_NAMES = ["covid", "cap", "non_pneumonia"]


def mean_tiles(out_dir: Path) -> float:
    summary = json.loads((out_dir / "predictions.json").read_text(encoding="utf-8"))
    return float(np.mean([case["tiles"]["run"] for case in summary["cases"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, processes=1)
    parser.add_argument("--placements", nargs="+", default=["region", "region_sized"], choices=PLACEMENTS)
    parser.add_argument("--step", type=float, default=None, help="sliding-window step (default: the plans')")
    parser.add_argument("--disable-tta", action="store_true", help="no test-time mirroring")
    args = parser.parse_args()
    base, model, model_dir, reference = chosen_model(args)
    setting = f"step{args.step or 'plans'}{'_notta' if args.disable_tta else ''}"
    folders, walls = {}, {}
    for placement in args.placements:
        folders[placement] = base / "placement" / args.set / f"{args.run}@{setting}@{placement}"
        started = time.perf_counter()
        predict_cases(model_dir=model_dir, inputs=reference / "imagesTr", output_dir=folders[placement], folds=["0"],
                      device="cpu", checkpoint_name=model.checkpoint, num_workers=args.processes, progress=False,
                      overwrite=True, min_lesion_ml=0.0, step_fraction=args.step, mirroring=not args.disable_tta,
                      tile_placement=placement)
        walls[placement] = time.perf_counter() - started
        evaluate_folder(folders[placement], reference, folders[placement] / "summary.json", plots=False,
                        num_processes=args.processes)
    tables = {name: case_table(folder / "summary.json", CLASS_NAMES) for name, folder in folders.items()}
    first = args.placements[0]
    cases = sorted(tables[first])
    print(f"\n{args.run} on the {args.set} set ({len(cases)} cases), step {args.step or 'of the plans'}, "
          f"{'no mirroring' if args.disable_tta else 'mirrored'}; %, 95 % intervals; {torch.get_num_threads()} threads")
    print(f"| placement | lesion Dice | accuracy | macro AUC | Dice − {first} | accuracy − {first} | cases changing "
          f"class | masks' Dice to {first} | tiles (mean) | network s/scan (median) | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, table in tables.items():
        row = figures(table)
        diff = paired(table, tables[first]) if name != first else {}
        changed = sum(int(np.argmax(table[k]["probabilities"]) != np.argmax(tables[first][k]["probabilities"]))
                      for k in cases)
        agreement = mask_agreement(folders[first], folders[name], cases) if name != first else None
        similar = "–" if agreement is None else (
            f"{100 * agreement.mean():.1f} ({100 * bootstrap_interval(agreement)[0]:.1f}-"
            f"{100 * bootstrap_interval(agreement)[1]:.1f})")
        print(f"| {name} | {_fmt(row.get('dice'))} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('macro_auc'))} | "
              f"{_fmt_diff_fine(diff.get('dice'))} | {_fmt_diff_fine(diff.get('accuracy'))} | {changed} | {similar} | "
              f"{mean_tiles(folders[name]):.1f} | {network_seconds(folders[name]):.3f} | {walls[name]:.0f} s |")


if __name__ == "__main__":
    main()
