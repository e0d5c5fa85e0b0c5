"""``run_demo``: the whole pipeline on the built-in synthetic dataset, from generation to an HTML report.

Everything lives under one folder (default ``./dscovid_demo``)::

    raw/Dataset001_Synthetic/        training cases (seed 0, case_0000 ...)
    raw/Dataset002_SyntheticTest/    the test set (another seed, case_1000 ...)
    preprocessed/                    plans and the 3d_cpu cache
    results/                         the trained fold 0 (DeepSCCOVIDTrainer__3d_cpu/fold_0)
    predictions/                     dscovid_predict output for the test set
    evaluation/                      summary.json, summary_cases.csv, ROC and confusion PNGs
    report/                          report.html with its PNGs (montages/ per test case)
    demo_stages.json                 what each stage did and how long it took

Each stage first checks its outputs and is skipped when they are complete, so a second run reuses everything and an
interrupted run continues (training resumes from ``checkpoint_latest.pt``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.io.dataset import load_dataset_json, write_json_atomic
from dscovid.io.stamps import file_stamp, is_older
from dscovid.roots import Roots

log = logging.getLogger("dscovid.demo")

TRAIN_DATASET = "Dataset001_Synthetic"
TEST_DATASET = "Dataset002_SyntheticTest"
CONFIGURATION = "3d_cpu"
TRAINER = "DeepSCCOVIDTrainer"
FOLD = 0
TRAIN_SEED = 0
TEST_SEED = 1
STAGES_FILE = "demo_stages.json"
VERIFIED_MARKER = ".demo_verified.json"


@dataclass
class StageRecord:
    """One stage of a demo run: ``status`` is ``done`` (work was done now) or ``reused`` (outputs were complete)."""

    name: str
    status: str
    seconds: float
    detail: str
    work_seconds: float | None = None  # time of the run that did the work (kept when a later run reuses it)


@dataclass
class DemoResult:
    """Where everything went and what each stage did."""

    out_dir: Path
    report: Path
    summary: dict
    stages: list[StageRecord] = field(default_factory=list)


@dataclass(frozen=True)
class DemoPaths:
    """The demo folder's layout (module docstring)."""

    out_dir: Path

    @property
    def roots(self) -> Roots:
        return Roots(raw=self.out_dir / "raw", preprocessed=self.out_dir / "preprocessed",
                     results=self.out_dir / "results")

    @property
    def train_raw(self) -> Path:
        return self.out_dir / "raw" / TRAIN_DATASET

    @property
    def test_raw(self) -> Path:
        return self.out_dir / "raw" / TEST_DATASET

    @property
    def preprocessed(self) -> Path:
        return self.out_dir / "preprocessed" / TRAIN_DATASET

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "results" / TRAIN_DATASET / f"{TRAINER}__{CONFIGURATION}"

    @property
    def fold_dir(self) -> Path:
        return self.model_dir / f"fold_{FOLD}"

    @property
    def predictions(self) -> Path:
        return self.out_dir / "predictions"

    @property
    def evaluation(self) -> Path:
        return self.out_dir / "evaluation"

    @property
    def report(self) -> Path:
        return self.out_dir / "report"


def _test_first_index(cases: int) -> int:
    """The first test case number: 1000, or past the training cases when there are more than 1000 of them."""
    return max(1000, cases)


# ------------------------------------------------------------------------------------------------ the stages


def _synthetic_is_complete(folder: Path, n_cases: int, seed: int, first_index: int, scale: float) -> str | None:
    """Why ``folder`` is not the wanted synthetic dataset (None when it is complete and verified)."""
    from dataset_conversion.synthetic import GENERATOR_VERSION

    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        return "not generated yet"
    try:
        meta = load_dataset_json(meta_path)
    except DscovidError as error:
        return f"unreadable dataset.json ({error})"
    made = meta.get("synthetic") or {}
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_cases": n_cases, "first_index": first_index,
              "full_size": False, "scale": float(scale), "variant": "default"}
    # Datasets written before variants existed are the default ones.
    differences = [key for key, value in wanted.items() if made.get(key, "default" if key == "variant" else None) != value]
    if differences:
        return f"generated with other settings ({', '.join(differences)})"
    marker = folder / VERIFIED_MARKER
    if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")) != file_stamp(meta_path):
        return "not verified yet"
    return None


def _generate(folder: Path, n_cases: int, seed: int, first_index: int, scale: float, num_processes: int) -> str:
    from dataset_conversion.synthetic import generate_dataset
    from dscovid.io.validate import require_valid_dataset

    reason = _synthetic_is_complete(folder, n_cases, seed, first_index, scale)
    if reason is None:
        return ""
    if reason != "not verified yet":
        log.info("%s: %s; generating %d cases", folder.name, reason, n_cases)
        generate_dataset(folder, n_cases, seed, first_index=first_index, num_processes=num_processes, scale=scale)
    require_valid_dataset(folder, num_processes=num_processes)
    write_json_atomic(file_stamp(folder / "dataset.json"), folder / VERIFIED_MARKER)
    meta = load_dataset_json(folder / "dataset.json")
    counts: dict[str, int] = {}
    for entry in meta["cases"].values():
        counts[entry["class"]] = counts.get(entry["class"], 0) + 1
    return (f"{len(meta['cases'])} cases (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            + f"), seed {seed}, verified")


def _preprocess(paths: DemoPaths, num_processes: int, progress: bool) -> str:
    from dscovid.planning.plan_and_preprocess import plan_and_preprocess

    # verify=False: the generation stage has just verified the dataset (reading every case again costs minutes).
    result = plan_and_preprocess(paths.train_raw, paths.roots.preprocessed, configurations=[CONFIGURATION],
                                 presets=[CONFIGURATION], num_processes=num_processes, verify=False,
                                 progress=progress)
    processed, skipped = result["preprocessed"]["processed"], result["preprocessed"]["skipped"]
    if not processed:
        return ""
    configuration = result["plans"].configuration(CONFIGURATION)
    return (f"{len(processed)} case(s) preprocessed ({len(skipped)} up to date), patch "
            f"{list(configuration.segmentation.patch_size_zyx)}")


def _training_overrides(paths: DemoPaths, epochs_scale: float, epochs: int | None) -> int | None:
    """The epochs override handed to the trainer (None: the plans' own numbers)."""
    if epochs is not None:
        return epochs
    if epochs_scale == 1.0:
        return None
    from dscovid.plans.configuration import load_plans

    stages = load_plans(paths.preprocessed / "plans.json").configuration(CONFIGURATION).training.stages
    # The trainer's override gives every stage the same count; 3d_cpu's stages are of equal length.
    return max(1, round(epochs_scale * max(stage.epochs for stage in stages)))


def _train(paths: DemoPaths, epochs: int | None, iterations: int | None, device: str, cases: int) -> str:
    from dscovid.results.checkpoint import FINAL, LATEST
    from dscovid.training.run import run_training
    from dscovid.training.splits import DEFAULT_NUM_FOLDS

    if (paths.fold_dir / FINAL).is_file():
        return ""
    # Ten folds as the paper; fewer when a tiny run has fewer cases (every fold needs a validation case).
    resume = (paths.fold_dir / LATEST).is_file()
    if resume:
        log.info("training: resuming from %s", paths.fold_dir / LATEST)
    result = run_training(paths.roots, TRAIN_DATASET, CONFIGURATION, FOLD, TRAINER, continue_training=resume,
                          device=device, epochs=epochs, iterations_per_epoch=iterations, num_workers=1,
                          num_folds=min(DEFAULT_NUM_FOLDS, cases), run_final_validation=False)
    return f"fold {FOLD}: {result.epochs} epochs" + (" (resumed)" if resume else "") + f", {paths.fold_dir}"


def _predictions_complete(paths: DemoPaths, test_cases: list[str]) -> bool:
    from dscovid.results.checkpoint import FINAL

    summary_path = paths.predictions / "predictions.json"
    if is_older(summary_path, paths.fold_dir / FINAL):
        return False  # not predicted yet, or predicted by an older model
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    entries = {entry["case"]: entry for entry in summary.get("cases", [])}
    if summary.get("failed") or set(entries) != set(test_cases):
        return False
    return all((paths.predictions / name).is_file() for entry in entries.values()
               for name in (entry.get("files") or {}).values())


def _predict(paths: DemoPaths, device: str, progress: bool) -> str:
    from dscovid.prediction.predict import predict_cases

    test_cases = sorted(load_dataset_json(paths.test_raw / "dataset.json")["cases"])
    if _predictions_complete(paths, test_cases):
        return ""
    summary = predict_cases(paths.model_dir, paths.test_raw / "imagesTr", paths.predictions, folds=[FOLD],
                            configuration=CONFIGURATION, device=device, overwrite=True, progress=progress)
    if summary["failed"]:
        reasons = "; ".join(f"{f['case']}: {f['reason']}" for f in summary["failed"][:3])
        raise DscovidError(f"{paths.predictions}: {len(summary['failed'])} test case(s) failed ({reasons})")
    seconds = [sum(entry.get("timing_s", {}).values()) for entry in summary["cases"]]
    return f"{len(summary['cases'])} test cases, {sum(seconds) / max(1, len(seconds)):.1f} s per case"


def _evaluate(paths: DemoPaths, num_processes: int) -> str:
    from dscovid.evaluation.evaluate import evaluate_folder

    summary_path = paths.evaluation / "summary.json"
    predictions = paths.predictions / "predictions.json"
    if not is_older(summary_path, predictions):
        return ""
    summary = evaluate_folder(paths.predictions, paths.test_raw, summary_path, num_processes=num_processes)
    dice = summary["segmentation"]["lesion_cases"]["mean"]["dsc"]
    accuracy = (summary["classification"] or {}).get("accuracy", math.nan)
    return f"DSC {_fmt(dice)} over the cases with lesions, accuracy {_fmt(accuracy)}"


def _montages(paths: DemoPaths, progress: bool) -> str:
    from dscovid.prediction.montage import montage_file_name, save_montages

    predictions_path = paths.predictions / "predictions.json"
    summary = json.loads(predictions_path.read_text(encoding="utf-8"))
    meta = load_dataset_json(paths.test_raw / "dataset.json")
    folder = paths.report / "montages"
    stale = [entry for entry in summary["cases"] if is_older(folder / montage_file_name(entry["case"]), predictions_path)]
    if not stale:
        return ""
    images = {case: paths.test_raw / "imagesTr" / f"{case}_0000.nii.gz" for case in meta["cases"]}
    references = {case: paths.test_raw / "labelsTr" / f"{case}.nii.gz" for case in meta["cases"]}
    classes = {case: entry["class"] for case, entry in meta["cases"].items()}
    save_montages(paths.predictions, stale, images, reference_paths=references, true_classes=classes,
                  output_dir=folder, progress=progress)
    return f"{len(stale)} montage(s) in {folder}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ the run


def run_demo(
    out_dir: str | os.PathLike = "dscovid_demo",
    cases: int = 60,
    test_cases: int = 30,
    epochs_scale: float = 1.0,
    num_processes: int = 2,
    *,
    scale: float = 1.0,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> DemoResult:
    """Generate, plan and preprocess, train fold 0, predict and evaluate the test set, and write the report.

    Parameters
    ----------
    out_dir : the demo folder (layout in the module docstring); created if needed.
    cases, test_cases : synthetic training and test cases (the test set has another seed and case numbers from
        1000).
    epochs_scale : multiplies the 3d_cpu epochs of every training stage (e.g. 0.5 halves the training time).
    num_processes : worker processes for generation, preprocessing and evaluation.
    scale : voxel-count scale of the synthetic cases (< 1 for tiny test runs; see ``generate_case``).
    epochs, iterations_per_epoch : explicit trainer overrides (tests); ``epochs`` wins over ``epochs_scale``.
    device : training and prediction device (``cpu``, ``cuda`` or ``auto``).

    Returns
    -------
    A :class:`DemoResult` with the report's path, the evaluation summary and a record per stage (also written to
    ``out_dir/demo_stages.json``).
    """
    if cases < 2 or test_cases < 1:
        raise DscovidError(f"the demo needs at least 2 training cases and 1 test case, got {cases} and {test_cases}")
    if not epochs_scale > 0:
        raise DscovidError(f"--epochs-scale must be positive, got {epochs_scale}")
    if num_processes < 1:
        raise DscovidError(f"-np must be at least 1, got {num_processes}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = DemoPaths(Path(out_dir).resolve())
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    stages_path = paths.out_dir / STAGES_FILE
    previous = {}
    if stages_path.is_file():
        previous = {record["name"]: record for record in json.loads(stages_path.read_text(encoding="utf-8")).get("stages", [])}
    records: list[StageRecord] = []

    def stage(name: str, work: Callable[[], str]) -> None:
        start = time.perf_counter()
        detail = work()
        seconds = time.perf_counter() - start
        if detail:
            record = StageRecord(name, "done", seconds, detail, seconds)
            log.info("[demo] %-10s done in %s: %s", name, _duration(seconds), detail)
        else:
            earlier = previous.get(name, {})
            record = StageRecord(name, "reused", seconds, earlier.get("detail", "outputs complete"),
                                 earlier.get("work_seconds"))
            log.info("[demo] %-10s reused (checked in %s): %s", name, _duration(seconds), record.detail)
        records.append(record)
        write_json_atomic({"out_dir": str(paths.out_dir), "stages": [asdict(r) for r in records]}, stages_path)

    total_start = time.perf_counter()
    stage("generate", lambda: _generate(paths.train_raw, cases, TRAIN_SEED, 0, scale, num_processes))
    stage("test set", lambda: _generate(paths.test_raw, test_cases, TEST_SEED, _test_first_index(cases), scale,
                                        num_processes))
    stage("preprocess", lambda: _preprocess(paths, num_processes, progress))
    epochs_override = _training_overrides(paths, epochs_scale, epochs)
    stage("train", lambda: _train(paths, epochs_override, iterations_per_epoch, device, cases))
    stage("predict", lambda: _predict(paths, device, progress))
    stage("evaluate", lambda: _evaluate(paths, num_processes))
    stage("montages", lambda: _montages(paths, progress))

    from dscovid.demo.html_report import write_report

    summary = json.loads((paths.evaluation / "summary.json").read_text(encoding="utf-8"))
    settings = {"training cases": cases, "test cases": test_cases, "case scale": scale, "configuration": CONFIGURATION,
                "trainer": TRAINER, "fold": FOLD, "device": device,
                "epochs override": epochs_override if epochs_override is not None else "none (plans)",
                "iterations override": iterations_per_epoch if iterations_per_epoch is not None else "none (plans)"}
    start = time.perf_counter()
    report = write_report(paths.report, paths.evaluation / "summary.json", paths.predictions / "predictions.json",
                          paths.fold_dir, paths.report / "montages", records, settings)
    records.append(StageRecord("report", "done", time.perf_counter() - start, str(report),
                               time.perf_counter() - start))
    write_json_atomic({"out_dir": str(paths.out_dir), "stages": [asdict(r) for r in records]}, stages_path)
    log.info("[demo] %-10s done in %s: %s", "report", _duration(records[-1].seconds), report)
    log.info("[demo] finished in %s; open %s", _duration(time.perf_counter() - total_start), report)
    return DemoResult(paths.out_dir, report, summary, records)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
