"""The accuracy benchmark: dscovid's default, the plain baseline and the ablations on large unseen test sets.

Three synthetic datasets, each made by ``dscovid_make_synthetic`` with its own seed:

* **training**: 60 cases, seed 0 (the demo's training set); every model trains fold 0 of it with ``3d_cpu``;
* **development** (``dev``): seed 1 from case 1030 (after the demo's 30 test cases); every choice of settings is
  made on it;
* **test**: seed 97 from case 5000, a seed no development used; it only reports.

Each model is trained once (``run_training``), predicted by the real predictor and scored by the real evaluator;
the table gives the lesion Dice over the cases with lesions and the accuracy and macro AUC over all cases, each
with its 95 % bootstrap interval over the cases (``dscovid.evaluation.intervals``), and every model's paired
difference to the default. Everything is cached in ``--work`` (data, models, predictions), so a second run only
does what is missing, and models can be added one at a time.

``--variants thick_noisy wide_small`` adds evaluation sets of other generator variants (the same patients and
seeds, ``dscovid_make_synthetic --variant``: a model trained on the default phantoms, tested on phantoms made
differently); ``--train-variant NAME`` trains on a variant's training set instead (self-configuration: the planner
and every stage run on it with no hand change). Such rows are named ``model~NAME``.

``--train-cases N`` trains on N cases of the training seed instead of 60 (the first 60 are the demo's), in its own
data folders; its rows are named ``modelnN`` and paired to the default model trained on 60.

``--folds K`` trains folds 0 to K-1 of the same model (the cross-validation's folds; fold 0 is the one every other
row uses) and predicts with their ensemble, as ``dscovid_predict`` does by default for a model with several trained
folds; its rows are named ``modelfK`` and paired to the single-fold default. The training time is the sum of the
folds'.

``--configuration NAME`` trains and predicts the models with another configuration of the training set's plans;
``--preset FILE`` plans it first from a preset file (a copy of ``plans/3d_cpu.json`` with another ``name`` and the
setting under test). Its rows are named ``model@NAME`` and paired to the default model of ``3d_cpu``.

Models (``--models``): ``default`` (``DeepSCCOVIDTrainer``), ``stage1`` (the same training's network at the end of
pre-training, before the joint stage), ``plain`` (``PlainCascadeTrainer``, none of the paper's parts),
``inceptionStem``, ``taskAware``, ``paperParts`` (the paper's parts that ``3d_cpu`` leaves out, one at a time and
both), ``noCrossStitch``, ``noTaskAware``, ``convStem``, ``noFindings``, ``lastSideOutput``, ``detachLesionMap``,
``scannerAug`` (other scanners' looks in the augmentation), ``lesionSampling`` (forced patches drawn per lesion, not
per voxel), ``contextDegrade`` (the classifier's lesion context loses lesions as on unseen scans),
``classifierDropout`` (dropout before the classifier's linear layer), ``lesionGate`` (the classifier sees the image
only at and around the lesions), ``noLesionGate`` (the classifier sees the whole image, as in the paper),
``segOnly`` / ``clsOnly`` (the paper's single-task rows). ``noTaskAware``, ``convStem`` and ``lesionGate`` are the
default itself on today's ``3d_cpu``; they remain for other configurations (and for models trained before the
lesion gate was the default: the results folders are named by trainer).

Examples::

    python benchmarks/bench_accuracy.py --work /data/bench_accuracy --models default plain   # ~1.5 h on 2 cores
    python benchmarks/bench_accuracy.py --work /data/bench_accuracy --sets dev --report      # table only
    python benchmarks/bench_accuracy.py --work /data/bench_accuracy --models default --variants default thick_noisy
    python benchmarks/bench_accuracy.py --work /data/bench_accuracy --models default --train-variant thick_noisy \
        --variants thick_noisy
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dscovid.cli.make_synthetic import main as make_synthetic
from dscovid.cli.plan_and_preprocess import main as plan_and_preprocess
from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.evaluation.intervals import bootstrap_interval, paired_bootstrap, wilson_interval
from dscovid.evaluation.metrics import roc_auc
from dscovid.io.dataset import write_json_atomic
from dscovid.model.precision import precision_name
from dscovid.prediction.predict import predict_cases
from dscovid.results.checkpoint import FINAL, load_checkpoint, stage_checkpoint
from dscovid.roots import Roots
from dscovid.training.run import model_folder, run_training
from dscovid.training.splits import DEFAULT_NUM_FOLDS

CONFIGURATION = "3d_cpu"
DEFAULT_VARIANT = "default"
#: the training set's size (the demo's); another ``--train-cases`` gets its own data folders and run names
TRAIN_CASES = 60
#: role → (seed, first case index); the same for every generator variant, so a variant set holds the same patients.
ROLES = {"train": (0, 0), "dev": (1, 1030), "test": (97, 5000)}
#: the first dataset number of each variant's three datasets (train, dev, test)
VARIANT_NUMBERS = {"default": 980, "thick_noisy": 983, "wide_small": 986, "thick_slices": 970, "sharp_noisy": 973,
                   "wide_fov": 976, "small_lesions": 960, "large_lesions": 963}


def dataset_name(role: str, variant: str = DEFAULT_VARIANT) -> str:
    """``Dataset980_AccuracyTrain``, ``Dataset984_AccuracyDevThickNoisy``, ..."""
    number = VARIANT_NUMBERS[variant] + list(ROLES).index(role)
    suffix = "" if variant == DEFAULT_VARIANT else "".join(part.title() for part in variant.split("_"))
    return f"Dataset{number}_Accuracy{role.title()}{suffix}"


def set_id(role: str, variant: str) -> str:
    """The evaluation set's folder name: ``dev``, ``test``, ``dev-thick_noisy``, ..."""
    return role if variant == DEFAULT_VARIANT else f"{role}-{variant}"


def run_id(key: str, configuration: str = CONFIGURATION, train_variant: str = DEFAULT_VARIANT,
           epochs_scale: float = 1.0, seed: int | None = None, train_cases: int = TRAIN_CASES, folds: int = 1) -> str:
    """A trained model's name: ``key``, plus ``@configuration``, ``~training variant``, ``xF`` (epochs scale),
    ``sN`` (training seed), ``nN`` (training cases) and ``fK`` (an ensemble of K folds) where not the defaults."""
    return (key + ("" if configuration == CONFIGURATION else f"@{configuration}")
            + ("" if train_variant == DEFAULT_VARIANT else f"~{train_variant}")
            + ("" if epochs_scale == 1.0 else f"x{epochs_scale:g}") + ("" if seed is None else f"s{seed}")
            + ("" if train_cases == TRAIN_CASES else f"n{train_cases}") + ("" if folds == 1 else f"f{folds}"))


@dataclass(frozen=True)
class Model:
    label: str
    trainer: str
    checkpoint: str = FINAL


MODELS = {
    "default": Model("dscovid default (joint, 3d_cpu)", "DeepSCCOVIDTrainer"),
    "stage1": Model("default after stage 1 (no joint stage)", "DeepSCCOVIDTrainer", stage_checkpoint(1)),
    "plain": Model("plain cascade (none of the paper's parts)", "PlainCascadeTrainer"),
    "noCrossStitch": Model("without cross-stitch", "DeepSCCOVIDTrainer_noCrossStitch"),
    "crossStitch": Model("with the paper's cross-stitch unit", "DeepSCCOVIDTrainer_crossStitch"),
    "noTaskAware": Model("without task-aware loss", "DeepSCCOVIDTrainer_noTaskAware"),
    "convStem": Model("plain convolution instead of inception", "DeepSCCOVIDTrainer_convStem"),
    "inceptionStem": Model("with the paper's inception stem", "DeepSCCOVIDTrainer_inceptionStem"),
    "taskAware": Model("with the paper's task-aware loss", "DeepSCCOVIDTrainer_taskAware"),
    "paperParts": Model("with all three (the paper's network and loss)", "DeepSCCOVIDTrainer_paperParts"),
    "noFindings": Model("without findings head", "DeepSCCOVIDTrainer_noFindings"),
    "lastSideOutput": Model("without the fusion of the coarse side outputs", "DeepSCCOVIDTrainer_lastSideOutput"),
    "detachLesionMap": Model("without the classification gradient into Ŝ", "DeepSCCOVIDTrainer_detachLesionMap"),
    "scannerAug": Model("with other scanners' looks in the augmentation", "DeepSCCOVIDTrainer_scannerAug"),
    "scannerNoise": Model("with other scanners' noise alone in the augmentation", "DeepSCCOVIDTrainer_scannerNoise"),
    "lesionSampling": Model("with per-lesion sampling of the forced patches", "DeepSCCOVIDTrainer_lesionSampling"),
    "contextDegrade": Model("with the lesion context degraded as on unseen scans", "DeepSCCOVIDTrainer_contextDegrade"),
    "falseLesions": Model("with false lesions on healthy lung in the classifier's lesion map",
                          "DeepSCCOVIDTrainer_falseLesions"),
    "classifierDropout": Model("with dropout 0.5 before the classifier's linear layer",
                               "DeepSCCOVIDTrainer_classifierDropout"),
    "lesionGate": Model("with the classifier's features gated by the lesion map", "DeepSCCOVIDTrainer_lesionGate"),
    "noLesionGate": Model("without the classifier's lesion gate", "DeepSCCOVIDTrainer_noLesionGate"),
    "segOnly": Model("segmentation only (w/o Cls.)", "SegmentationTrainer"),
    "clsOnly": Model("classification only (w/o Seg.)", "ClassificationTrainer"),
}


def ensure_dataset(roots: Roots, role: str, variant: str, count: int, processes: int, scale: float) -> str:
    """Generate one dataset unless it exists with that many cases; returns its name."""
    name = dataset_name(role, variant)
    meta = roots.raw / name / "dataset.json"
    if meta.exists() and len(json.loads(meta.read_text(encoding="utf-8"))["cases"]) == count:
        return name
    seed, first = ROLES[role]
    started = time.perf_counter()
    make_synthetic(["-o", str(roots.raw / name), "-n", str(count), "--seed", str(seed), "--first-index", str(first),
                    "--variant", variant, "-np", str(processes), "--scale", str(scale), "-q"])
    print(f"[data] {name}: {count} cases, seed {seed}, in {time.perf_counter() - started:.0f} s", flush=True)
    return name


def ensure_training_set(roots: Roots, variant: str, count: int, processes: int, scale: float,
                        configuration: str, preset: Path | None) -> str:
    """Generate and preprocess the training set of a variant (planning ``configuration`` from ``preset``)."""
    name = ensure_dataset(roots, "train", variant, count, processes, scale)
    common = ["-np", str(processes), "--raw", str(roots.raw), "--preprocessed", str(roots.preprocessed), "-q"]
    if not (roots.preprocessed / name / CONFIGURATION).is_dir():
        plan_and_preprocess(["-d", name, "-c", CONFIGURATION, *common])
    plans_file = roots.preprocessed / name / "plans.json"
    if configuration not in json.loads(plans_file.read_text(encoding="utf-8"))["configurations"]:
        if preset is None:
            raise SystemExit(f"{plans_file}: no configuration {configuration!r}; pass --preset FILE to plan it")
        plan_and_preprocess(["-d", name, "-c", configuration, "--presets", "3d_paper", "3d_cpu", str(preset), *common])
    return name


def ensure_model(roots: Roots, train_set: str, model: Model, configuration: str, device: str, workers: int,
                 smoke: bool = False, epochs_scale: float = 1.0, results: Path | None = None,
                 seed: int | None = None, fold: int = 0) -> dict:
    """Train the model's trainer on one fold unless its checkpoint exists; returns its training record.

    ``epochs_scale`` F gives every stage ``round(F × the longest stage's epochs)`` epochs (as ``dscovid_demo
    --epochs-scale``), in its own results folder ``results``; ``seed`` replaces the plans' training seed.
    """
    fold_dir = model_folder(results or roots.results, train_set, model.trainer, configuration) / f"fold_{fold}"
    record_path = fold_dir / "bench_training.json"
    if (fold_dir / FINAL).exists() and record_path.exists():
        return json.loads(record_path.read_text(encoding="utf-8"))
    started = time.perf_counter()
    logging.getLogger("dscovid").setLevel(logging.INFO)
    epochs = None
    if epochs_scale != 1.0:
        plans = json.loads((roots.preprocessed / train_set / "plans.json").read_text(encoding="utf-8"))
        epochs = round(epochs_scale * max(s["epochs"] for s in plans["configurations"][configuration]["training"]["stages"]))
    run_training(Roots(raw=roots.raw, preprocessed=roots.preprocessed, results=results or roots.results), train_set,
                 configuration, fold, model.trainer, continue_training=(fold_dir / "checkpoint_latest.pt").exists(),
                 device=device, num_workers=workers, run_final_validation=False, epochs=1 if smoke else epochs,
                 iterations_per_epoch=3 if smoke else None, seed=seed)
    logging.getLogger("dscovid").setLevel(logging.WARNING)
    trained = load_checkpoint(fold_dir / FINAL)  # what the trainer computed in, after its kernel check
    record = {"trainer": model.trainer, "configuration": configuration, "training_set": train_set,
              "fold": fold, "epochs_scale": epochs_scale, "seed": seed,
              "training_s": time.perf_counter() - started, "threads": torch.get_num_threads(),
              "precision": trained.get("precision", precision_name(device)),
              "float32_layers": trained.get("float32_layers", [])}
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def combined_record(records: list[dict]) -> dict:
    """One training record for an ensemble: the first fold's, with the folds' summed training time."""
    if len(records) == 1:
        return records[0]
    return {**records[0], "fold": [record.get("fold", 0) for record in records],
            "training_s": sum(record["training_s"] for record in records)}


def ensure_predictions(roots: Roots, work: Path, run: str, model_dir: Path, checkpoint: str, evaluation_set: str,
                       dataset: str, device: str, processes: int, folds: int = 1) -> Path:
    """Predict and evaluate one model (the ensemble of its folds 0 to ``folds`` - 1) on one set unless its summary
    exists; returns the summary file."""
    out_dir = work / "predictions" / evaluation_set / run
    summary_file = out_dir / "summary.json"
    if summary_file.exists():
        return summary_file
    started = time.perf_counter()
    predict_cases(model_dir=model_dir, inputs=roots.raw / dataset / "imagesTr", output_dir=out_dir,
                  folds=[str(fold) for fold in range(folds)],
                  device=device, checkpoint_name=checkpoint, num_workers=processes, progress=False, overwrite=True,
                  min_lesion_ml=0.0)  # the network as it is: no model folder's post-processing
    evaluate_folder(out_dir, roots.raw / dataset, summary_file, plots=False, num_processes=processes)
    print(f"[predict] {run} on {evaluation_set}: {time.perf_counter() - started:.0f} s", flush=True)
    return summary_file


def case_table(summary_file: Path, class_names: list[str]) -> dict[str, dict]:
    """Per case: lesion Dice (cases with lesions), correctness, true class index and class probabilities."""
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    cases: dict[str, dict] = {}
    for row in (summary.get("segmentation") or {}).get("per_case") or []:
        if row.get("class") != "non_pneumonia":
            cases.setdefault(row["case"], {})["dice"] = float(row["dsc"])
    for row in (summary.get("classification") or {}).get("per_case") or []:
        entry = cases.setdefault(row["case"], {})
        entry["correct"] = float(row["predicted_class"] == row["class"])
        entry["label"] = class_names.index(row["class"])
        entry["probabilities"] = [float(row["probabilities"][name]) for name in class_names]
    return cases


def macro_auc(rows: np.ndarray) -> float:
    """One-vs-rest AUC averaged over the classes present; rows = [label, p_0, ..., p_K-1]."""
    labels = rows[:, 0].astype(int)
    aucs = [roc_auc((labels == k).astype(int), rows[:, 1 + k]) for k in range(rows.shape[1] - 1)
            if 0 < (labels == k).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def figures(cases: dict[str, dict]) -> dict:
    dice = np.array([c["dice"] for c in cases.values() if "dice" in c])
    correct = np.array([c["correct"] for c in cases.values() if "correct" in c])
    rows = np.array([[c["label"], *c["probabilities"]] for c in cases.values() if "label" in c])
    result: dict = {"n_cases": len(cases), "n_lesion_cases": len(dice)}
    if len(dice):
        result["dice"] = (float(dice.mean()), *bootstrap_interval(dice))
    if len(correct):
        result["accuracy"] = (float(correct.mean()), *wilson_interval(int(correct.sum()), len(correct)))
        result["macro_auc"] = (macro_auc(rows), *bootstrap_interval(rows, macro_auc, resamples=2000))
    return result


def paired(cases: dict[str, dict], reference: dict[str, dict]) -> dict:
    """Paired differences (this model − reference) over the cases both have."""
    result = {}
    lesion = sorted(k for k in cases if "dice" in cases[k] and "dice" in reference.get(k, {}))
    if lesion:
        result["dice"] = paired_bootstrap([cases[k]["dice"] for k in lesion], [reference[k]["dice"] for k in lesion])
    scored = sorted(k for k in cases if "correct" in cases[k] and "correct" in reference.get(k, {}))
    if scored:
        result["accuracy"] = paired_bootstrap([cases[k]["correct"] for k in scored],
                                              [reference[k]["correct"] for k in scored])
    return result


def _fmt(value: tuple | None, scale: float = 100.0) -> str:
    if not value or not np.isfinite(value[0]):
        return "–"
    return f"{scale * value[0]:.1f} ({scale * value[1]:.1f}-{scale * value[2]:.1f})"


def _fmt_diff(value: tuple | None) -> str:
    if not value:
        return "–"
    return f"{100 * value[0]:+.1f} ({100 * value[1]:+.1f} to {100 * value[2]:+.1f})"


def run_label(key: str, configuration: str = CONFIGURATION, train_variant: str = DEFAULT_VARIANT,
              epochs_scale: float = 1.0, seed: int | None = None, train_cases: int = TRAIN_CASES,
              folds: int = 1) -> str:
    """The table's name of a run (see :func:`run_id`)."""
    return (MODELS[key].label + ("" if configuration == CONFIGURATION else f", {configuration}")
            + ("" if train_variant == DEFAULT_VARIANT else f", trained on {train_variant}")
            + ("" if epochs_scale == 1.0 else f", {epochs_scale:g}x the epochs")
            + ("" if seed is None else f", training seed {seed}")
            + ("" if train_cases == TRAIN_CASES else f", {train_cases} training cases")
            + ("" if folds == 1 else f", ensemble of {folds} folds"))


def report(work: Path, runs: dict[str, str], evaluation_sets: list[str], records: dict[str, dict]) -> dict:
    """Print one table per evaluation set (rows paired to the ``default`` run) and return the figures.

    ``runs``: run id → label.
    """
    class_names = ["covid", "cap", "non_pneumonia"]
    results: dict = {}
    for evaluation_set in evaluation_sets:
        folder = work / "predictions" / evaluation_set
        tables = {run: case_table(folder / run / "summary.json", class_names)
                  for run in runs if (folder / run / "summary.json").exists()}
        if not tables:
            continue
        reference = tables.get("default")
        n = max(len(t) for t in tables.values())
        print(f"\n{evaluation_set} set ({n} cases), %, 95 % intervals; differences paired to the default")
        print("| model | lesion Dice | accuracy | macro AUC | Dice − default | accuracy − default | training |")
        print("|---|---|---|---|---|---|---|")
        for run, cases in tables.items():
            row = figures(cases)
            diff = paired(cases, reference) if reference is not None and run != "default" else {}
            seconds = (records.get(run) or {}).get("training_s")
            print(f"| {runs[run]} | {_fmt(row.get('dice'))} | {_fmt(row.get('accuracy'))} | "
                  f"{_fmt(row.get('macro_auc'))} | {_fmt_diff(diff.get('dice'))} | {_fmt_diff(diff.get('accuracy'))} | "
                  f"{f'{seconds / 60:.1f} min' if seconds else '–'} |")
            results.setdefault(evaluation_set, {})[run] = {**row, "paired_to_default": diff,
                                                           "training": records.get(run)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="working folder (data, models, predictions)")
    parser.add_argument("--models", nargs="+", default=["default", "stage1", "plain"], choices=sorted(MODELS))
    parser.add_argument("--sets", nargs="+", default=["dev", "test"], choices=("dev", "test"))
    parser.add_argument("--variants", nargs="+", default=[DEFAULT_VARIANT], choices=sorted(VARIANT_NUMBERS),
                        help="generator variants of the evaluation sets (default: the default generator)")
    parser.add_argument("--train-variant", default=DEFAULT_VARIANT, choices=sorted(VARIANT_NUMBERS),
                        help="generator variant of the training set (self-configuration on another dataset)")
    parser.add_argument("--dev-cases", type=int, default=200)
    parser.add_argument("--test-cases", type=int, default=200)
    parser.add_argument("--train-cases", type=int, default=TRAIN_CASES,
                        help="training set size (the same seed: a larger set holds the smaller one's cases)")
    parser.add_argument("-np", "--processes", type=int, default=2, help="processes for data, prediction, evaluation")
    parser.add_argument("--workers", type=int, default=1, help="training loader processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configuration", default=CONFIGURATION, help="configuration of the training set's plans")
    parser.add_argument("--preset", type=Path, default=None, help="preset file that plans --configuration")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="train F times longer (rows named modelxF; a ceiling of the CPU budget)")
    parser.add_argument("--seed", type=int, default=None,
                        help="another training seed (rows named modelsN; the spread between trainings)")
    parser.add_argument("--folds", type=int, default=1,
                        help="train folds 0 to K-1 and predict with their ensemble (rows named modelfK)")
    parser.add_argument("--report", action="store_true", help="only print the tables of what is already done")
    parser.add_argument("--smoke", action="store_true",
                        help="a few minutes' check of the path: small cases, 1 epoch of 3 iterations per stage")
    args = parser.parse_args()
    for option in ("dev_cases", "test_cases", "train_cases", "folds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.folds > DEFAULT_NUM_FOLDS:
        parser.error(f"--folds must be at most {DEFAULT_NUM_FOLDS} (the cross-validation's folds)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    work = args.work.resolve() / ("smoke" if args.smoke else "full")
    roots = Roots(raw=work / "raw", preprocessed=work / "preprocessed", results=work / "results")
    # Another training-set size lives in its own raw and preprocessed folders (the dataset keeps its name).
    n_suffix = "" if args.train_cases == TRAIN_CASES else f"_n{args.train_cases}"
    train_roots = Roots(raw=work / f"raw{n_suffix}", preprocessed=work / f"preprocessed{n_suffix}",
                        results=roots.results)
    counts = {"dev": args.dev_cases, "test": args.test_cases}
    scale = 0.6 if args.smoke else 1.0
    train_set = dataset_name("train", args.train_variant)
    evaluation_sets = [(set_id(role, variant), role, variant) for variant in args.variants for role in args.sets]
    records: dict[str, dict] = {}
    if not args.report:
        train_set = ensure_training_set(train_roots, args.train_variant, args.train_cases, args.processes, scale,
                                        args.configuration, args.preset)
        for _, role, variant in evaluation_sets:
            ensure_dataset(roots, role, variant, counts[role], args.processes, scale)
    spec = (args.configuration, args.train_variant, args.epochs_scale, args.seed, args.train_cases, args.folds)
    runs = {run_id(key, *spec): run_label(key, *spec) for key in args.models}
    suffix = (("" if args.epochs_scale == 1.0 else f"_x{args.epochs_scale:g}")
              + ("" if args.seed is None else f"_s{args.seed}") + n_suffix)
    results_root = work / f"results{suffix}"
    for key, run in zip(args.models, list(runs)):
        model = MODELS[key]
        model_dir = model_folder(results_root, train_set, model.trainer, args.configuration)
        record_files = [model_dir / f"fold_{fold}" / "bench_training.json" for fold in range(args.folds)]
        if args.report:
            if all(path.exists() for path in record_files):
                records[run] = combined_record([json.loads(path.read_text(encoding="utf-8")) for path in record_files])
            continue
        records[run] = combined_record([
            ensure_model(train_roots, train_set, model, args.configuration, args.device, args.workers, args.smoke,
                         args.epochs_scale, results_root, args.seed, fold) for fold in range(args.folds)])
        for evaluation_set, role, variant in evaluation_sets:
            ensure_predictions(roots, work, run, model_dir, model.checkpoint, evaluation_set,
                               dataset_name(role, variant), args.device, args.processes, args.folds)
    if "default" not in runs:
        runs = {"default": run_label("default"), **runs}  # the reference every row is paired to
    results = report(work, runs, [name for name, _, _ in evaluation_sets], records)
    # Merged into what earlier calls wrote: each call reports only its own models and sets.
    path = work / "bench_accuracy.json"
    merged = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for evaluation_set, rows in results.items():
        merged.setdefault(evaluation_set, {}).update(rows)
    write_json_atomic(merged, path)


if __name__ == "__main__":
    main()
