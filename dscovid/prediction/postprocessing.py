"""The post-processing a model's predictions get by default, chosen on cases the model did not train on.

nnU-Net decides its post-processing on its cross-validation predictions and stores the decision beside the model.
dscovid's post-processing step is dropping the predicted lesion components below a volume
(:func:`~dscovid.prediction.export.drop_small_lesions`, ``dscovid_predict --min-lesion-ml``). Which volume is right
depends on the data (a fixed 5 ml would delete the lesions of a dataset whose lesions are small), so
:func:`find_postprocessing` measures every candidate volume on predictions of held-out cases, the folds' final
validations or any prediction folder of the model with its references, and writes the choice to
``postprocessing.json`` in the model folder; :func:`model_postprocessing` gives the predictor that choice.

The rule (:func:`choose_min_lesion_ml`): among the volumes that cost no lesion Dice (the mean over the cases with a
reference lesion is at least that of no post-processing), the one that leaves the fewest lesion-free cases with a
false alarm, then the least false-alarm volume, then the smallest volume. A choice is tied to the checkpoints it was
measured with (their SHA-256): after a fold is retrained, the predictor does not apply it and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscovid.errors import DscovidError
from dscovid.inference.model_loading import TrainedModel
from dscovid.io.dataset import load_raw_dataset, write_json_atomic
from dscovid.io.image_io import read_mask
from dscovid.measurements.components import label
from dscovid.parallel import map_cases
from dscovid.prediction.output_folder import output_files
from dscovid.results.checkpoint import FINAL
from dscovid.results.model_folder import available_folds, trained_fold_dir

log = logging.getLogger(__name__)

POSTPROCESSING_FILE = "postprocessing.json"

#: The minimum lesion volumes (ml) tried by default; 0 is always among them (no post-processing).
CANDIDATES_ML = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)


@dataclass(frozen=True)
class CaseJob:
    """One held-out case: its predicted mask, its reference mask and the volumes to try."""

    case: str
    prediction: Path
    reference: Path
    candidates_ml: tuple[float, ...]


def score_case(job: CaseJob) -> dict:
    """Lesion Dice and false-alarm volume of one case under each candidate volume.

    The predicted mask is labelled once (26-connected, as :func:`~dscovid.prediction.export.drop_small_lesions`);
    a component is dropped under a candidate when its volume is below it, the same comparison the predictor makes.
    """
    reference, geometry = read_mask(job.reference)
    prediction, _ = read_mask(job.prediction, geometry)
    reference = reference != 0
    labels, count = label(prediction, 26)
    voxel_ml = float(np.prod(geometry.spacing_zyx_mm)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    overlaps = np.bincount(labels[reference], minlength=count + 1)[1:]
    reference_voxels = int(np.count_nonzero(reference))
    dice, kept_ml = [], []
    for threshold in job.candidates_ml:
        kept = sizes * voxel_ml >= threshold if threshold > 0 else np.ones(count, bool)
        kept_voxels = int(sizes[kept].sum())
        total = kept_voxels + reference_voxels
        dice.append(1.0 if total == 0 else 2.0 * int(overlaps[kept].sum()) / total)
        kept_ml.append(kept_voxels * voxel_ml)
    return {"case": job.case, "reference_ml": reference_voxels * voxel_ml, "dice": dice, "kept_ml": kept_ml}


def choose_min_lesion_ml(rows: Sequence[dict], candidates_ml: Sequence[float]) -> dict:
    """The table of every candidate over ``rows`` (from :func:`score_case`) and the chosen volume (module rule)."""
    lesion = [row for row in rows if row["reference_ml"] > 0]
    empty = [row for row in rows if row["reference_ml"] == 0]
    table = []
    for k, threshold in enumerate(candidates_ml):
        table.append({
            "min_lesion_ml": float(threshold),
            "lesion_dice": float(np.mean([row["dice"][k] for row in lesion])) if lesion else None,
            "false_alarm_cases": sum(row["kept_ml"][k] > 0 for row in empty),
            "false_alarm_ml": float(sum(row["kept_ml"][k] for row in empty)),
        })
    baseline = table[list(candidates_ml).index(0.0)]
    # "No lesion Dice lost": exact up to float summation error; one true voxel dropped changes the mean far more.
    allowed = [row for row in table
               if baseline["lesion_dice"] is None or row["lesion_dice"] >= baseline["lesion_dice"] - 1e-9]
    chosen = min(allowed, key=lambda row: (row["false_alarm_cases"], row["false_alarm_ml"], row["min_lesion_ml"]))
    return {"min_lesion_ml": chosen["min_lesion_ml"], "lesion_cases": len(lesion), "lesion_free_cases": len(empty),
            "candidates": table}


def checkpoint_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_predictions(folder: Path) -> dict:
    path = folder / "predictions.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DscovidError(f"{path}: not found (predict the held-out cases first)") from None
    except (OSError, ValueError) as error:
        raise DscovidError(f"{path}: unreadable ({error})") from None
    if not isinstance(value, dict) or not isinstance(value.get("cases"), list):
        raise DscovidError(f"{path}: not a dscovid_predict summary")
    return value


def _check_predictions_of(summary: dict, folder: Path, model_dir: Path, checkpoint_name: str,
                          inside_model: bool) -> list[str]:
    """The folds of ``summary`` after checking it holds predictions of this model without post-processing.

    A fold's final validation lies in the model folder; any other folder must name this model folder."""
    if not inside_model and Path(str(summary.get("model_dir"))).resolve() != model_dir.resolve():
        raise DscovidError(f"{folder}: holds predictions of the model in {summary.get('model_dir')}, not {model_dir}")
    expected = model_dir.name.split("__", 1)
    made_by = [summary.get("trainer"), summary.get("configuration")]
    if len(expected) == 2 and made_by != expected:
        raise DscovidError(f"{folder}: holds predictions of {made_by[0]}__{made_by[1]}, not of {model_dir.name}")
    if summary.get("checkpoint", FINAL) != checkpoint_name:
        raise DscovidError(f"{folder}: predicted with {summary.get('checkpoint')}, not {checkpoint_name}")
    if float(summary.get("min_lesion_ml") or 0.0) != 0.0:
        raise DscovidError(f"{folder}: predicted with --min-lesion-ml {summary['min_lesion_ml']}; the choice needs "
                           "predictions without post-processing")
    folds = [str(fold) for fold in summary.get("folds") or []]
    if not folds:
        raise DscovidError(f"{folder}: predictions.json does not say which folds made it")
    return folds


def _jobs(folder: Path, summary: dict, reference_dir: Path, candidates: tuple[float, ...]) -> list[CaseJob]:
    raw = load_raw_dataset(reference_dir)
    jobs = []
    for entry in summary["cases"]:
        case = entry["case"]
        reference = raw.label_path(case)
        if not reference.is_file():
            raise DscovidError(f"{reference}: no reference mask for the predicted case {case}")
        jobs.append(CaseJob(case, folder / output_files(case)["mask"], reference, candidates))
    return jobs


def find_postprocessing(
    model_dir: str | Path,
    reference_dir: str | Path,
    folds: Sequence[str | int] | None = None,
    predictions: Sequence[str | Path] | None = None,
    candidates_ml: Sequence[float] = CANDIDATES_ML,
    checkpoint_name: str = FINAL,
    num_processes: int = 1,
    progress: bool = True,
    write: bool = True,
) -> dict:
    """Choose the model's minimum lesion volume on held-out predictions and write ``postprocessing.json``.

    Parameters
    ----------
    model_dir : the ``<Trainer>__<configuration>`` folder.
    reference_dir : the raw dataset (``labelsTr/``) holding the held-out cases' reference masks.
    folds : the folds whose final validations (``fold_K/validation/``) are used; default: every trained fold that
        has one. Ignored when ``predictions`` is given.
    predictions : instead, ``dscovid_predict`` output folders of this model on other held-out cases (made without
        ``--min-lesion-ml``), whose references lie in ``reference_dir``.
    candidates_ml : the volumes to try (0, no post-processing, is always added).
    write : write ``postprocessing.json`` (False: only measure).

    Returns
    -------
    What is written: the chosen ``min_lesion_ml``, every candidate's lesion Dice and false alarms, the cases, and
    the SHA-256 of each fold's checkpoint the predictions were made with.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DscovidError(f"{model_dir}: model folder not found")
    bad = [c for c in candidates_ml if not float(c) >= 0]  # NaN too
    if bad:
        raise DscovidError(f"candidate volumes must be 0 or more ml, got {bad[0]}")
    candidates = tuple(sorted({float(c) for c in candidates_ml} | {0.0}))
    if predictions:
        folders = [Path(folder) for folder in predictions]
        source = "prediction folders"
    else:
        chosen = [str(f) for f in folds] if folds else available_folds(model_dir, checkpoint_name)
        folders = [trained_fold_dir(model_dir, fold, checkpoint_name) / "validation" for fold in chosen]
        missing = [str(folder) for folder in folders if not (folder / "predictions.json").is_file()]
        if folds is None:
            folders = [folder for folder in folders if (folder / "predictions.json").is_file()]
        elif missing:
            raise DscovidError(f"{missing[0]}: no final validation (train the fold to its end, or dscovid_train "
                               "--val-only)")
        if not folders:
            raise DscovidError(f"{model_dir}: no fold has a final validation to choose on")
        source = "final validations"
    jobs, used_folds = [], set()
    for folder in folders:
        summary = _read_predictions(folder)
        fold_names = _check_predictions_of(summary, folder, model_dir, checkpoint_name, inside_model=not predictions)
        used_folds.update(fold_names)
        jobs += _jobs(folder, summary, Path(reference_dir), candidates)
    if not jobs:
        raise DscovidError(f"no predicted case in {', '.join(str(f) for f in folders)}")
    names = [job.case for job in jobs]
    if len(set(names)) != len(names):
        raise DscovidError("a case is predicted in more than one of the folders: each case must count once")
    rows = map_cases(score_case, jobs, num_processes, desc="post-processing", progress=progress)
    result = choose_min_lesion_ml(rows, candidates)
    digests = {}
    for fold in sorted(used_folds):
        digests[fold] = checkpoint_digest(trained_fold_dir(model_dir, fold, checkpoint_name) / checkpoint_name)
    result = {
        "min_lesion_ml": result["min_lesion_ml"],
        "rule": "no lesion Dice lost; then fewest lesion-free cases with a false alarm, least false-alarm volume, "
                "smallest volume",
        "chosen_on": {"source": source, "folders": [str(f.resolve()) for f in folders], "cases": len(rows),
                      "lesion_cases": result["lesion_cases"], "lesion_free_cases": result["lesion_free_cases"]},
        "checkpoint": checkpoint_name,
        "checkpoint_sha256": digests,
        "candidates": result["candidates"],
    }
    if write:
        write_json_atomic(result, model_dir / POSTPROCESSING_FILE)
    return result


def model_postprocessing(model: TrainedModel) -> float:
    """The minimum lesion volume ``postprocessing.json`` chose for ``model``'s checkpoints (0 when none applies)."""
    path = model.model_dir / POSTPROCESSING_FILE
    if not path.is_file():
        return 0.0
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        volume = float(value["min_lesion_ml"])
        digests = dict(value["checkpoint_sha256"])
        checkpoint = value["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: unreadable (%s); no post-processing applied", path, error)
        return 0.0
    if checkpoint != model.checkpoint_name:
        log.warning("%s: chosen for %s, not %s; no post-processing applied", path, checkpoint, model.checkpoint_name)
        return 0.0
    for fold in model.folds:
        file = trained_fold_dir(model.model_dir, fold, model.checkpoint_name) / model.checkpoint_name
        if digests.get(fold) != checkpoint_digest(file):
            log.warning("%s: chosen for other weights than %s (a fold retrained, or not among those it was chosen "
                        "on); no post-processing applied (run "
                        "dscovid_find_postprocessing again)", path, file)
            return 0.0
    if not volume >= 0:
        log.warning("%s: invalid minimum lesion volume %s; no post-processing applied", path, volume)
        return 0.0
    log.info("Post-processing from %s: lesion components below %g ml are dropped", path, volume)
    return volume
