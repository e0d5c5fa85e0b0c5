"""A trained model predicted in float32 and in the automatic precision (bfloat16 on a CPU with AMX), side by side.

Uses the working folder of ``benchmarks/bench_accuracy.py`` (its trained models and evaluation sets): the model
predicts one set twice in one run, once with ``DSCOVID_PRECISION=float32`` and once with the automatic choice
(``dscovid.model.precision``), each scored by the evaluator. Prints per precision the lesion Dice, accuracy and macro
AUC with 95 % intervals, the paired difference to float32, how many cases change class, the Dice of the two
precisions' masks against each other, and the median network seconds per scan.

    python benchmarks/bench_precision.py --work /data/bench_accuracy --set dev
    python benchmarks/bench_precision.py --work /data/bench_accuracy --set dev --run crossStitch
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from bench_accuracy import CONFIGURATION, MODELS, Model, _fmt, case_table, dataset_name, figures, paired

from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.evaluation.intervals import bootstrap_interval
from dscovid.model.precision import PRECISION_ENV, precision_name
from dscovid.prediction.predict import predict_cases
from dscovid.roots import Roots
from dscovid.training.run import model_folder

CLASS_NAMES = ["covid", "cap", "non_pneumonia"]


def predict(model_dir: Path, checkpoint: str, images: Path, out_dir: Path, reference: Path, choice: str,
            processes: int) -> float:
    """Predict and evaluate with ``DSCOVID_PRECISION=choice``; returns the wall seconds."""
    previous = os.environ.get(PRECISION_ENV)
    os.environ[PRECISION_ENV] = choice
    try:
        started = time.perf_counter()
        predict_cases(model_dir=model_dir, inputs=images, output_dir=out_dir, folds=["0"], device="cpu",
                      checkpoint_name=checkpoint, num_workers=processes, progress=False, overwrite=True,
                      min_lesion_ml=0.0)
        seconds = time.perf_counter() - started
    finally:
        if previous is None:
            os.environ.pop(PRECISION_ENV, None)
        else:
            os.environ[PRECISION_ENV] = previous
    evaluate_folder(out_dir, reference, out_dir / "summary.json", plots=False, num_processes=processes)
    return seconds


def _fmt_diff_fine(value: tuple | None) -> str:
    """A paired difference in points with two decimals (the precisions differ by hundredths)."""
    return "–" if not value else f"{100 * value[0]:+.2f} ({100 * value[1]:+.2f} to {100 * value[2]:+.2f})"


def mask_agreement(first: Path, second: Path, cases: list[str]) -> np.ndarray:
    """Dice of the two folders' masks per case (1 where both are empty)."""
    values = []
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(first / f"{case}.nii.gz"))) > 0
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / f"{case}.nii.gz"))) > 0
        total = int(a.sum()) + int(b.sum())
        values.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return np.array(values)


def network_seconds(out_dir: Path) -> float:
    summary = json.loads((out_dir / "predictions.json").read_text(encoding="utf-8"))
    return float(np.median([case["timing_s"]["network"] for case in summary["cases"]]))


def add_model_arguments(parser: argparse.ArgumentParser, processes: int = 2) -> None:
    """The arguments that pick one trained model of bench_accuracy.py's working folder and one of its sets."""
    parser.add_argument("--work", required=True, type=Path, help="bench_accuracy.py's working folder")
    parser.add_argument("--set", default="dev", choices=("dev", "test"))
    parser.add_argument("--run", default="default", choices=sorted(MODELS), help="which trained model")
    parser.add_argument("-np", "--processes", type=int, default=processes)
    parser.add_argument("--threads", type=int, default=2)


def chosen_model(args: argparse.Namespace) -> tuple[Path, Model, Path, Path]:
    """(the working folder's ``full``, the model, its folder, the evaluation set's raw dataset); sets the threads."""
    torch.set_num_threads(args.threads)
    base = args.work / "full"
    roots = Roots(raw=base / "raw", preprocessed=base / "preprocessed", results=base / "results")
    model = MODELS[args.run]
    model_dir = model_folder(roots.results, dataset_name("train"), model.trainer, CONFIGURATION)
    return base, model, model_dir, roots.raw / dataset_name(args.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    args = parser.parse_args()
    base, model, model_dir, reference = chosen_model(args)
    automatic = precision_name("cpu")
    if automatic == "float32":
        raise SystemExit("this CPU has no native bfloat16: the automatic precision is float32, nothing to compare")
    folders, walls = {}, {}
    for choice, name in (("float32", "float32"), ("auto", automatic)):
        folders[name] = base / "precision" / args.set / f"{args.run}@{name}"
        walls[name] = predict(model_dir, model.checkpoint, reference / "imagesTr", folders[name], reference, choice,
                              args.processes)
    tables = {name: case_table(folder / "summary.json", CLASS_NAMES) for name, folder in folders.items()}
    cases = sorted(tables["float32"])
    agreement = mask_agreement(folders["float32"], folders[automatic], cases)
    changed = sum(int(np.argmax(tables["float32"][k]["probabilities"]) != np.argmax(tables[automatic][k]["probabilities"]))
                  for k in cases)
    print(f"\n{args.run} on the {args.set} set ({len(cases)} cases), %, 95 % intervals; "
          f"{torch.get_num_threads()} threads, -np {args.processes}")
    print("| precision | lesion Dice | accuracy | macro AUC | Dice − float32 | accuracy − float32 | "
          "network s/scan (median) | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, table in tables.items():
        row = figures(table)
        diff = paired(table, tables["float32"]) if name != "float32" else {}
        print(f"| {name} | {_fmt(row.get('dice'))} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('macro_auc'))} | "
              f"{_fmt_diff_fine(diff.get('dice'))} | {_fmt_diff_fine(diff.get('accuracy'))} | "
              f"{network_seconds(folders[name]):.3f} | {walls[name]:.0f} s |")
    low, high = bootstrap_interval(agreement)
    print(f"\nmasks of the two precisions against each other: mean Dice {100 * agreement.mean():.2f} "
          f"({100 * low:.2f}-{100 * high:.2f}), lowest {100 * agreement.min():.2f}; "
          f"cases whose class changes: {changed} of {len(cases)}")


if __name__ == "__main__":
    main()
