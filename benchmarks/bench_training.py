"""Train fold 0 of a 60-case synthetic dataset with the CPU configuration, then test on 30 unseen synthetic cases.

The whole user path: ``dscovid_make_synthetic`` (training set seed 0, test set seed 1 from index 1000: the same
cases as ``dscovid_demo``'s, so the two report on one test set),
``dscovid_plan_and_preprocess -c 3d_cpu``, ``run_training`` (fold 0, the plans' two stages, final validation on
the fold's held-out cases), ``predict_cases`` on the test set and ``evaluate_folder``. Prints the wall time of
each step, the lesion Dice and the classification accuracy. About 15 minutes on a quiet 2-core machine (the
planner sizes the 3d_cpu configuration's iterations to its CPU-time budget).

``--trainer`` picks another trainer: ``SegmentationTrainer`` and ``ClassificationTrainer`` give the single-task
rows of the paper's Table II, so the difference to ``DeepSCCOVIDTrainer`` is the multi-task gain on this data.
``--smoke`` is a 1-2 minute version (12 + 4 small cases, 1 epoch of 3 iterations per stage) that checks the path.

``--configuration 3d_paper --full-size --device cuda`` trains the paper's configuration on full-size phantoms
(512×512 slices) on a GPU; ``-np`` sets the processes that generate, preprocess and read cases, ``--workers`` the
training loader's. Full-size datasets get their own names, so both kinds can share one working folder.

Examples::

    python benchmarks/bench_training.py                      # ~15 min
    python benchmarks/bench_training.py --trainer SegmentationTrainer
    python benchmarks/bench_training.py --smoke
    python benchmarks/bench_training.py --configuration 3d_paper --full-size --device cuda -np 16 --workers 12 \
        --train-cases 30 --test-cases 15 --epochs 10 --iterations 30
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from dscovid.cli.make_synthetic import main as make_synthetic
from dscovid.cli.plan_and_preprocess import main as plan_and_preprocess
from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.prediction.predict import predict_cases
from dscovid.roots import Roots
from dscovid.training.run import model_folder, run_training
from dscovid.training.trainers import DEFAULT_TRAINER, TRAINERS

TRAIN, TEST = "Dataset960_SynthTrain", "Dataset961_SynthTest"
FULL_TRAIN, FULL_TEST = "Dataset970_SynthFullTrain", "Dataset971_SynthFullTest"


def _timed(label: str, times: dict, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    times[label] = time.perf_counter() - start
    print(f"[{label}] {times[label]:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=".bench/training", help="working folder (raw, preprocessed, results)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, choices=sorted(TRAINERS))
    parser.add_argument("--smoke", action="store_true", help="a 1-2 minute check of the whole path")
    parser.add_argument("--train-cases", type=int, default=None)
    parser.add_argument("--test-cases", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    parser.add_argument("--iterations", type=int, default=None, help="override every stage's iterations")
    parser.add_argument("--configuration", default="3d_cpu", help="plans configuration (default 3d_cpu)")
    parser.add_argument("--full-size", action="store_true", help="full-size phantoms (512x512 slices)")
    parser.add_argument("-np", "--processes", type=int, default=1,
                        help="processes for generation, preprocessing and reading test cases (default 1)")
    parser.add_argument("--no-fold-validation", action="store_true",
                        help="skip the final validation of the fold's held-out cases (the test set is predicted anyway)")
    parser.add_argument("--workers", type=int, default=1, help="training loader processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where training and prediction run (the budget is sized for 2 CPU cores)")
    parser.add_argument("--fresh", action="store_true", help="delete the working folder's results first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)

    n_train = args.train_cases or (12 if args.smoke else 60)
    n_test = args.test_cases or (4 if args.smoke else 30)
    epochs, iterations = (1, 3) if args.smoke else (args.epochs, args.iterations)
    scale = ["--scale", "0.6"] if args.smoke else []
    size = ["--full-size"] if args.full_size else []
    train_name, test_name = (FULL_TRAIN, FULL_TEST) if args.full_size else (TRAIN, TEST)
    config = args.configuration
    work = Path(args.work).resolve() / ("smoke" if args.smoke else "full")
    roots = Roots(raw=work / "raw", preprocessed=work / "preprocessed", results=work / "results")
    times: dict[str, float] = {}

    # Data is reused between runs (and trainers); the model of this trainer is retrained from scratch.
    processes = str(args.processes)
    for name, n, seed, first in ((train_name, n_train, 0, 0), (test_name, n_test, 1, 1000)):
        if not (roots.raw / name / "dataset.json").exists():
            _timed(f"synthesise {name} ({n} cases)", times, make_synthetic,
                   ["-o", str(roots.raw / name), "-n", str(n), "--seed", str(seed), "--first-index", str(first),
                    "-np", processes, "-q", *scale, *size])
    if not (roots.preprocessed / train_name / config).is_dir():
        _timed("plan and preprocess", times, plan_and_preprocess,
               ["-d", train_name, "-c", config, "-np", processes, "--raw", str(roots.raw), "--preprocessed",
                str(roots.preprocessed), "-q"])
    model_dir = model_folder(roots.results, train_name, args.trainer, config)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    logging.getLogger("dscovid").setLevel(logging.INFO)  # the epoch lines
    result = _timed(f"train fold 0 ({args.trainer})", times, run_training, roots, train_name, config, 0,
                    args.trainer, device=args.device, epochs=epochs, iterations_per_epoch=iterations,
                    num_workers=args.workers, run_final_validation=not args.no_fold_validation)
    logging.getLogger("dscovid").setLevel(logging.WARNING)
    out_dir = work / "test_predictions" / f"{args.trainer}__{config}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    _timed(f"predict {n_test} test cases", times, predict_cases, model_dir=model_dir,
           inputs=roots.raw / test_name / "imagesTr", output_dir=out_dir, folds=["0"], device=args.device,
           num_workers=args.processes, progress=False)
    summary = _timed("evaluate", times, evaluate_folder, out_dir, roots.raw / test_name, out_dir / "summary.json",
                     plots=False, num_processes=args.processes)

    seg, cls = summary.get("segmentation") or {}, summary.get("classification") or {}
    fold_summary = result.validation_summary or {}
    print()
    print(f"trainer {args.trainer}, configuration {config}, fold 0 on {args.device}, {n_train} training cases "
          f"({'smoke' if args.smoke else 'full'} run), tested on {n_test} unseen cases")
    print(f"{'':32} {'Dice (lesion cases)':>20} {'Dice (all)':>11} {'accuracy':>9}")
    for label, block_seg, block_cls in (("fold-0 held-out validation", (fold_summary.get("segmentation") or {}),
                                         (fold_summary.get("classification") or {})),
                                        ("test set (seed 1)", seg, cls)):
        lesion = (block_seg.get("lesion_cases") or {}).get("mean", {}).get("dsc")
        every = (block_seg.get("mean") or {}).get("dsc")
        accuracy = block_cls.get("accuracy")
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
        print(f"{label:32} {fmt(lesion):>20} {fmt(every):>11} {fmt(accuracy):>9}")
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    (work / f"bench_training_{args.trainer}{'' if config == '3d_cpu' else '__' + config}.json").write_text(json.dumps(
        {"trainer": args.trainer, "configuration": config, "times_s": times, "test_summary_file": str(out_dir / "summary.json"),
         "test_dice_lesion_cases": (seg.get("lesion_cases") or {}).get("mean", {}).get("dsc"),
         "test_accuracy": cls.get("accuracy"), "test_macro_auc": (cls.get("macro") or {}).get("auc"),
         "test_nsd": (seg.get("lesion_cases") or {}).get("mean", {}).get("nsd")}, indent=2))
    print_multitask_gain(work, config)


def print_multitask_gain(work: Path, configuration: str) -> None:
    """The paper's "multi-task gain" rows from the runs of this working folder (one JSON per trainer)."""
    runs = {}
    for path in sorted(work.glob("bench_training_*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("configuration", "3d_cpu") == configuration:
            runs[record["trainer"]] = record
    joint = runs.get(DEFAULT_TRAINER)
    singles = [name for name in ("SegmentationTrainer", "ClassificationTrainer") if name in runs]
    if joint is None or not singles:
        print("(multi-task gain: run this benchmark with the joint and a single-task trainer in the same --work)")
        return
    fmt = lambda v: f"{100 * v:6.1f}" if isinstance(v, (int, float)) else "   n/a"  # noqa: E731
    print()
    print("Multi-task gain on the test set (Table II layout, %; rows measured in this working folder)")
    print(f"{'':40} {'DSC':>6} {'NSD':>6} {'Acc.':>6} {'AUC':>6}")
    rows = [("w/o Cls. (SegmentationTrainer)", runs.get("SegmentationTrainer")),
            ("w/o Seg. (ClassificationTrainer)", runs.get("ClassificationTrainer")),
            ("DeepSC-COVID (joint)", joint)]
    for label, record in rows:
        if record is None:
            continue
        # A single-task network has no output for the other task: its empty lesion masks or constant class are
        # not a measurement, so those columns stay blank.
        seg = record["trainer"] != "ClassificationTrainer"
        cls = record["trainer"] != "SegmentationTrainer"
        blank = "     –"
        print(f"{label:40} {fmt(record.get('test_dice_lesion_cases')) if seg else blank} "
              f"{fmt(record.get('test_nsd')) if seg else blank} {fmt(record.get('test_accuracy')) if cls else blank} "
              f"{fmt(record.get('test_macro_auc')) if cls else blank}")
    seg_only, cls_only = runs.get("SegmentationTrainer"), runs.get("ClassificationTrainer")
    gain = lambda a, b: (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None  # noqa: E731
    print(f"{'multi-task gain (joint - single task)':40} "
          f"{fmt(gain(joint.get('test_dice_lesion_cases'), (seg_only or {}).get('test_dice_lesion_cases')))} "
          f"{fmt(gain(joint.get('test_nsd'), (seg_only or {}).get('test_nsd')))} "
          f"{fmt(gain(joint.get('test_accuracy'), (cls_only or {}).get('test_accuracy')))} "
          f"{fmt(gain(joint.get('test_macro_auc'), (cls_only or {}).get('test_macro_auc')))}")


if __name__ == "__main__":
    main()
