"""How often can the diagnosis of a synthetic phantom be told at all? The accuracy ceiling of the phantoms.

The class of a phantom reaches its image only through the lesions the generator draws for it: the patient (anatomy),
the grid, the scanner and the vessel trees are drawn from streams that do not depend on the class
(``dataset_conversion.synthetic.generate_case``). So the lesion plan (how many lesions, their kinds, volumes,
attenuations, edges, shapes and where they lie) holds everything an image can say about the class, and more: the
plan sees lesions the rendering merges, clips or blurs. A classifier given the plans of many phantoms therefore
estimates how accurate any model of the images can be; where COVID-19 and CAP plans look alike, no network can
tell them apart either.

The script redraws the plans exactly as the generator does (the same random streams: it checks the kinds and volumes
against a dataset's ``dataset.json`` when ``--check`` names one), turns each into per-case features, trains
scikit-learn's gradient-boosted trees on ``--train`` plans of one seed and reports the accuracy on ``--test`` plans
of another (95 % Wilson interval, the confusion matrix), for several training sizes (a plateau says the estimate
has converged). Two feature sets: ``all`` (everything the plan holds) and ``findings`` (only what the paper's four
findings measure: count, volume ratio, attenuation, spread and peripheral share), which shows how much of the
separation lies in the lesions' shape and position.

With ``--dataset RAW --predictions PRED`` (a generated raw dataset and ``dscovid_predict``'s output for it) it also
asks where a trained model loses: the same six measurements of the predictor's lesion report (lesion count and
volume, volume ratio, peripheral ratio at 10 mm, mean and spread of the lesion HU) are computed once from the
reference masks and once from the predicted masks, with the same code and the same (reference) lungs, and a
classifier on each is scored by repeated 5-fold cross-validation over the cases. If the reference masks' measurements
tell the classes apart and the predicted masks' do not, the diagnosis is limited by the segmentation. The reference
lesions (26-connected) are also listed by class, kind (median HU above -300: dense) and volume with the share the
prediction detects (more than 10 % of its voxels predicted).

With ``--fit-dataset RAW --fit-predictions PRED`` as well, the classifiers of the predicted masks' measurements are
fitted on those predictions (e.g. the model's own training cases, predicted by it) and scored on ``--predictions``,
instead of cross-validated within them: whether such a classifier could be shipped with a single trained fold.

Needs scikit-learn (the ``test`` extra, which ``make install`` installs).

    python benchmarks/ceiling_diagnosis.py --train 1000 4000 --test 4000 --json ceiling.json \
        --check $DSCOVID_raw/Dataset981_AccuracyDev
    python benchmarks/ceiling_diagnosis.py --train --dataset $DSCOVID_raw/Dataset981_AccuracyDev \
        --predictions WORK/predictions/dev/default --json measurements.json
    python benchmarks/ceiling_diagnosis.py --train --dataset $DSCOVID_raw/Dataset981_AccuracyDev \
        --predictions WORK/predictions/dev/default --fit-dataset $DSCOVID_raw/Dataset980_AccuracyTrain \
        --fit-predictions TRAINING_CASES_PREDICTED
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_conversion.synthetic import _rng, class_for_index  # noqa: E402
from dataset_conversion.synthetic_anatomy import sample_anatomy  # noqa: E402
from dataset_conversion.synthetic_lesions import plan_lesions, pleura_depth, sample_lung  # noqa: E402
from dscovid.evaluation.intervals import wilson_interval  # noqa: E402

CLASSES = ("covid", "cap", "non_pneumonia")
KINDS = ("ggo", "mixed", "consolidation")

#: Per-lesion quantities; each case gets their volume-weighted mean, minimum and maximum.
LESION_FEATURES = ("log_volume_ml", "level_hu", "core_hu", "edge_mm", "parts", "depth_mm", "depth_per_radius",
                   "hilum_mm", "z_rel", "y_rel", "z_elongation", "flatness", "outward_flatness")
#: The subset the paper's findings measure (with the count, the volume ratio and the spread).
FINDINGS_FEATURES = ("level_hu", "core_hu", "depth_mm")


def _lesion_row(lesion, anatomy, depth: float) -> dict[str, float]:
    volume = lesion.target_volume_ml
    radius = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    centre = lesion.centres[0]
    hilum = min(np.linalg.norm(centre - anatomy.hilum_right), np.linalg.norm(centre - anatomy.hilum_left))
    # Extent of the main ellipsoid along each patient axis: sqrt(sum_k (R[i, k] a_k)^2).
    extent = np.sqrt(((lesion.rotations[0] * lesion.axes[0][None, :]) ** 2).sum(axis=1))
    axes = np.sort(lesion.axes[0])
    return {
        "log_volume_ml": float(np.log(volume)),
        "level_hu": lesion.level_hu,
        "core_hu": lesion.core_hu,
        "edge_mm": lesion.edge_mm,
        "parts": float(len(lesion.centres)),
        "depth_mm": float(depth),
        "depth_per_radius": float(depth / radius),
        "hilum_mm": float(hilum),
        "z_rel": float(centre[2] / anatomy.lung_height_mm),
        "y_rel": float(centre[1] / anatomy.b_in_post),
        "z_elongation": float(extent[2] / np.sqrt(extent[0] * extent[1])),
        "flatness": float(axes[0] / axes[2]),
        "outward_flatness": float(axes[0] / axes[1]),
    }


def case_features(seed: int, index: int) -> tuple[str, dict[str, float], list[tuple[str, float]]]:
    """The class of case ``(seed, index)``, its plan's features, and its lesions' (kind, target volume)."""
    class_name = class_for_index(seed, index)
    anatomy = sample_anatomy(_rng(seed, index, 0))
    lesion_rng = _rng(seed, index, 1)
    sample = sample_lung(anatomy, lesion_rng)
    lesions = plan_lesions(anatomy, class_name, lesion_rng, sample)
    features: dict[str, float] = {"count": float(len(lesions))}
    volumes = np.array([lesion.target_volume_ml for lesion in lesions])
    features["volume_ratio"] = float(volumes.sum() / sample.volume_ml) if len(lesions) else 0.0
    for kind in KINDS:
        features[f"n_{kind}"] = float(sum(lesion.kind == kind for lesion in lesions))
    if lesions:
        centres = np.array([lesion.centres[0] for lesion in lesions])
        depths = pleura_depth(anatomy, centres)[0]
        rows = [_lesion_row(lesion, anatomy, depth) for lesion, depth in zip(lesions, depths)]
        weights = volumes / volumes.sum()
        for name in LESION_FEATURES:
            values = np.array([row[name] for row in rows])
            features[f"{name}_mean"] = float(weights @ values)
            features[f"{name}_min"] = float(values.min())
            features[f"{name}_max"] = float(values.max())
        features["spread_mm"] = float(np.sqrt(((centres - centres.mean(axis=0)) ** 2).sum(axis=1).mean()))
        features["peripheral_share"] = float(weights @ (depths <= 15.0))
    else:
        for name in LESION_FEATURES:
            for stat in ("mean", "min", "max"):
                features[f"{name}_{stat}"] = np.nan
        features["spread_mm"] = np.nan
        features["peripheral_share"] = np.nan
    summary = [(lesion.kind, round(lesion.target_volume_ml, 2)) for lesion in lesions]
    return class_name, features, summary


def _draw(args: tuple[int, int, int]) -> list[tuple[str, dict[str, float], list]]:
    seed, start, count = args
    return [case_features(seed, index) for index in range(start, start + count)]


def draw_cases(seed: int, first: int, count: int, workers: int) -> tuple[np.ndarray, list[str], np.ndarray, list]:
    """Features (cases × columns, NaN where a case has no lesion), their names, the classes (indices of CLASSES)."""
    chunk = 200
    jobs = [(seed, start, min(chunk, first + count - start)) for start in range(first, first + count, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_draw, jobs))
    else:
        parts = [_draw(job) for job in jobs]
    cases = [case for part in parts for case in part]
    names = list(cases[0][1])
    X = np.array([[features[name] for name in names] for _, features, _ in cases], dtype=np.float64)
    y = np.array([CLASSES.index(class_name) for class_name, _, _ in cases])
    return X, names, y, [summary for _, _, summary in cases]


def check_against_generator(seed: int, count: int = 4) -> None:
    """Refuse to run when the redrawn plans of the first cases of ``seed`` differ from what the generator draws."""
    from dataset_conversion.synthetic import generate_case

    for index in range(count):
        _, _, summary = case_features(seed, index)
        lesions = generate_case(seed, index, scale=0.25).metadata["lesions"]
        if [(lesion["kind"], lesion["target_volume_ml"]) for lesion in lesions] != summary:
            raise SystemExit(f"seed {seed} case {index}: the redrawn plan differs from the generator's; "
                             "update case_features to the generator")


def check_against_dataset(raw: Path, workers: int) -> int:
    """Compare the redrawn plans with a generated dataset's recorded lesions; returns the number of cases checked."""
    dataset = json.loads((raw / "dataset.json").read_text())
    synthetic = dataset["synthetic"]
    if synthetic.get("variant", "default") != "default":
        raise SystemExit(f"{raw}: variant {synthetic['variant']!r}; the ceiling is for the default phantoms")
    seed, first, count = synthetic["seed"], synthetic["first_index"], synthetic["n_cases"]
    _, _, y, summaries = draw_cases(seed, first, count, workers)
    for offset, (label, summary) in enumerate(zip(y, summaries)):
        case = dataset["cases"][f"case_{first + offset:04d}"]
        recorded = [(lesion["kind"], lesion["target_volume_ml"]) for lesion in case["metadata"]["lesions"]]
        if CLASSES[label] != case["class"] or recorded != summary:
            raise SystemExit(f"case_{first + offset:04d}: the redrawn plan differs from {raw / 'dataset.json'}")
    return count


def fit_and_score(X_train, y_train, X_test, y_test, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(max_iter=600, learning_rate=0.05, early_stopping=True,
                                           validation_fraction=0.15, n_iter_no_change=30, random_state=seed)
    model.fit(X_train, y_train)
    predicted = model.predict(X_test)
    pneumonia = y_test < 2
    return {**_score(predicted, y_test), "covid_vs_cap_errors": int((predicted[pneumonia] != y_test[pneumonia]).sum()),
            "iterations": int(model.n_iter_)}


def _score(predicted: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, its 95 % Wilson interval and the confusion matrix (rows: true class)."""
    correct = int((predicted == y).sum())
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    np.add.at(confusion, (y, predicted), 1)
    return {"accuracy": correct / len(y), "interval": list(wilson_interval(correct, len(y))),
            "confusion": confusion.tolist()}


#: The report's measurements used by ``--predictions`` (names of the per-case columns).
MEASUREMENTS = ("lesion_count", "log_lesion_ml", "lesion_volume_ratio", "peripheral_ratio_10mm", "hu_mean", "hu_std")
#: Lesion volume bins (ml) of the detection table.
VOLUME_BINS_ML = (0.0, 10.0, 30.0, 100.0, np.inf)


def _measurements(image, lesion, lung, spacing) -> list[float]:
    """The six report measurements of one lesion mask; a case without lesion gets fixed out-of-range values."""
    from dscovid.measurements.findings import case_findings

    findings = case_findings(image, lesion, lung, spacing, thicknesses_mm=(10.0,))
    if findings["lesion_count"] == 0:
        return [0.0, 0.0, 0.0, -1.0, -1100.0, 0.0]
    return [float(findings["lesion_count"]), float(np.log1p(findings["lesion_volume_ml"])),
            float(findings["lesion_volume_ratio"]), float(findings["plr"]["ratio"][0]),
            float(findings["hu"]["mean"]), float(findings["hu"]["std"])]


def _detections(image, reference, prediction, spacing) -> list[tuple[float, bool, float]]:
    """(volume ml, dense, share of voxels predicted) of each 26-connected reference lesion."""
    from scipy import ndimage

    from dscovid.measurements.findings import STRUCTURE_26

    labels, _ = ndimage.label(reference, STRUCTURE_26)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == index
        rows.append((float(inside.sum()) * voxel_ml, bool(np.median(image[box][inside]) > -300.0),
                     float(prediction[box][inside].mean())))
    return rows


def _classifiers() -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {"gradient-boosted trees": lambda: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05),
            "logistic regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))}


def read_measurements(raw: Path, predictions: Path) -> tuple[dict, np.ndarray, np.ndarray, list]:
    """The six measurements of every predicted case from its reference and its predicted mask.

    Returns (rows {"reference": [...], "predicted": [...]}, class indices, the network's class indices, detections).
    """
    from dscovid.io.dataset import load_raw_dataset
    from dscovid.io.image_io import read_image

    dataset = load_raw_dataset(raw)
    reference_folder = dataset.meta.get("synthetic", {}).get("lung_reference_folder", "lungsReference")
    if not (raw / reference_folder).is_dir():
        raise SystemExit(f"{raw}: no {reference_folder}/ folder (the reference lungs of a generated dataset)")
    if not (predictions / "predictions.json").is_file():
        raise SystemExit(f"{predictions}: no predictions.json (not a dscovid_predict output folder)")
    predicted = {case["case"]: case for case in json.loads((predictions / "predictions.json").read_text())["cases"]}
    rows, labels, network, detections = {"reference": [], "predicted": []}, [], [], []
    for case in dataset.cases():
        if case.name not in predicted:
            continue
        image, geometry = read_image(case.image)
        reference = read_image(case.label, check_hu=False)[0] > 0
        prediction = read_image(predictions / f"{case.name}{dataset.file_ending}", check_hu=False)[0] > 0
        lung = read_image(raw / reference_folder / f"{case.name}{dataset.file_ending}", check_hu=False)[0] > 0
        spacing = geometry.spacing_zyx_mm
        rows["reference"].append(_measurements(image, reference, lung, spacing))
        rows["predicted"].append(_measurements(image, prediction, lung, spacing))
        labels.append(CLASSES.index(case.class_name))
        network.append(CLASSES.index(predicted[case.name]["predicted_class"]))
        detections += [(case.class_name, *row) for row in _detections(image, reference, prediction, spacing)]
    return rows, np.array(labels), np.array(network), detections


def measurement_ceiling(raw: Path, predictions: Path, repeats: int = 5) -> dict:
    """Cross-validated accuracy of the report's measurements from reference vs predicted masks, and detections."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rows, y, network, detections = read_measurements(raw, predictions)
    result = {"cases": len(y), "network_accuracy": float((network == y).mean()), "classifiers": []}
    for source, values in rows.items():
        X = np.array(values)
        for model_name, model in _classifiers().items():
            scores, confusion = [], np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
            for repeat in range(repeats):
                folds = StratifiedKFold(5, shuffle=True, random_state=repeat)
                guessed = cross_val_predict(model(), X, y, cv=folds)
                scores.append(float((guessed == y).mean()))
                np.add.at(confusion, (y, guessed), 1)
            result["classifiers"].append({"masks": source, "model": model_name, "accuracy_mean": float(np.mean(scores)),
                                          "accuracy_range": [min(scores), max(scores)],
                                          "confusion_summed": confusion.tolist()})
    table = []
    for class_name in CLASSES[:2]:
        for dense in (True, False):
            for low, high in zip(VOLUME_BINS_ML[:-1], VOLUME_BINS_ML[1:]):
                hits = [share for name, volume, is_dense, share in detections
                        if name == class_name and is_dense == dense and low <= volume < high]
                if hits:
                    table.append({"class": class_name, "kind": "dense" if dense else "ground glass",
                                  "volume_ml": [low, None if np.isinf(high) else high], "lesions": len(hits),
                                  "detected": float(np.mean(np.array(hits) > 0.1)),
                                  "voxel_sensitivity": float(np.mean(hits))})
    result["detection"] = table
    return result


def fitted_on_other_predictions(fit_raw: Path, fit_predictions: Path, raw: Path, predictions: Path) -> dict:
    """A classifier of the predicted masks' six measurements fitted on one set of predictions (e.g. the model's own
    training cases, the only labelled predictions a single trained fold has) and scored on another."""
    fit_rows, fit_y, fit_network, _ = read_measurements(fit_raw, fit_predictions)
    rows, y, network, _ = read_measurements(raw, predictions)
    result = {"fitted_on": str(fit_predictions), "fit_cases": len(fit_y),
              "network_accuracy_on_fit_cases": float((fit_network == fit_y).mean()), "scored_on": str(predictions),
              "cases": len(y), "network": _score(network, y), "classifiers": []}
    for model_name, model in _classifiers().items():
        guessed = model().fit(np.array(fit_rows["predicted"]), fit_y).predict(np.array(rows["predicted"]))
        result["classifiers"].append({"model": model_name, **_score(guessed, y)})
    return result


def _print_fitted(result: dict) -> None:
    low, high = result["network"]["interval"]
    print(f"\nfitted on {result['fit_cases']} cases' predictions (the network's accuracy on them "
          f"{100 * result['network_accuracy_on_fit_cases']:.1f} %), scored on {result['cases']} cases")
    print("| classifier of the predicted masks' six measurements | accuracy (95 % CI) | confusion |")
    print("|---|---|---|")
    print(f"| the network's own | {100 * result['network']['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) "
          f"| {result['network']['confusion']} |")
    for row in result["classifiers"]:
        low, high = row["interval"]
        print(f"| {row['model']} | {100 * row['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) | {row['confusion']} |")


def _print_measurements(result: dict) -> None:
    print(f"\n{result['cases']} cases; the network's own accuracy {100 * result['network_accuracy']:.1f} %")
    print("| lesion masks | classifier on the six measurements | accuracy, mean of 5 x 5-fold CV (range) |")
    print("|---|---|---|")
    for row in result["classifiers"]:
        low, high = row["accuracy_range"]
        print(f"| {row['masks']} | {row['model']} | {100 * row['accuracy_mean']:.1f} ({100 * low:.1f}-{100 * high:.1f}) |")
    print("\n| class | kind | volume (ml) | lesions | detected | voxels found |")
    print("|---|---|---|---|---|---|")
    for row in result["detection"]:
        low, high = row["volume_ml"]
        span = f"{low:g}-{high:g}" if high is not None else f">= {low:g}"
        print(f"| {row['class']} | {row['kind']} | {span} | {row['lesions']} | {100 * row['detected']:.0f} % "
              f"| {100 * row['voxel_sensitivity']:.0f} % |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, nargs="*", default=[1000, 4000, 12000],
                        help="training sizes (plans of --train-seed; the largest is drawn, smaller ones are its "
                             "head); none skips the plans' ceiling")
    parser.add_argument("--test", type=int, default=6000, help="plans of --test-seed to score on")
    parser.add_argument("--train-seed", type=int, default=4101)
    parser.add_argument("--test-seed", type=int, default=4102)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--check", type=Path, default=None,
                        help="a generated default-variant raw dataset whose recorded lesions the plans must match")
    parser.add_argument("--dataset", type=Path, default=None, help="a raw dataset with lungsReference/ (--predictions)")
    parser.add_argument("--predictions", type=Path, default=None, help="dscovid_predict's output for --dataset")
    parser.add_argument("--fit-dataset", type=Path, default=None,
                        help="with --fit-predictions: fit the measurements' classifiers on these predictions "
                             "instead of cross-validating over --dataset")
    parser.add_argument("--fit-predictions", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if (args.dataset is None) != (args.predictions is None):
        parser.error("--dataset and --predictions go together")
    if (args.fit_dataset is None) != (args.fit_predictions is None) or (args.fit_dataset and args.dataset is None):
        parser.error("--fit-dataset and --fit-predictions go together, with --dataset and --predictions")

    result: dict = {"train_seed": args.train_seed, "test_seed": args.test_seed, "rows": []}
    if args.check is not None:
        started = time.perf_counter()
        result["checked_cases"] = check_against_dataset(args.check, args.workers)
        print(f"{result['checked_cases']} plans of {args.check} redrawn identically "
              f"({time.perf_counter() - started:.0f} s)")
    if args.fit_dataset is not None:
        result["fitted"] = fitted_on_other_predictions(args.fit_dataset, args.fit_predictions, args.dataset,
                                                       args.predictions)
        _print_fitted(result["fitted"])
    elif args.dataset is not None:
        result["measurements"] = measurement_ceiling(args.dataset, args.predictions)
        _print_measurements(result["measurements"])
    if not args.train:
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    check_against_generator(args.train_seed)
    started = time.perf_counter()
    X_all, names, y_all, _ = draw_cases(args.train_seed, 0, max(args.train), args.workers)
    X_test, _, y_test, _ = draw_cases(args.test_seed, 0, args.test, args.workers)
    print(f"drew {len(y_all)} + {len(y_test)} plans in {time.perf_counter() - started:.0f} s")
    findings = [i for i, name in enumerate(names)
                if name in ("count", "volume_ratio", "spread_mm", "peripheral_share")
                or name.rsplit("_", 1)[0] in FINDINGS_FEATURES]
    feature_sets = {"all": list(range(len(names))), "findings": findings}
    print("| features | training plans | accuracy (95 % CI) | COVID-19/CAP errors | confusion |")
    print("|---|---|---|---|---|")
    for set_name, columns in feature_sets.items():
        for size in sorted(args.train):
            row = fit_and_score(X_all[:size][:, columns], y_all[:size], X_test[:, columns], y_test, seed=0)
            row.update(features=set_name, train=size, columns=[names[i] for i in columns])
            result["rows"].append(row)
            low, high = row["interval"]
            print(f"| {set_name} | {size} | {100 * row['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) "
                  f"| {row['covid_vs_cap_errors']} of {int((y_test < 2).sum())} | {row['confusion']} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
