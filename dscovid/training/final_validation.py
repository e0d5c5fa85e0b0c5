"""After training: the real predictor on the fold's held-out raw cases, then the evaluation metrics.

Writes ``fold_K/validation/`` (the predictor's masks, ``predictions.json``/``.csv``) and
``fold_K/validation/summary.json`` (``dscovid.evaluation``). The held-out cases are read from the raw dataset
(``$DSCOVID_raw/DatasetNNN_Name/imagesTr``), because validation must go through the whole pipeline a user runs,
preprocessing and export included. It is skipped, with a warning that says why, when the raw dataset is not
available (for example when only the preprocessed cache was copied to a cluster node).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from dscovid.errors import DscovidError
from dscovid.evaluation.evaluate import evaluate_folder
from dscovid.io.dataset import load_raw_dataset
from dscovid.prediction.predict import predict_cases
from dscovid.roots import Roots

log = logging.getLogger("dscovid.training")


def validate_fold(
    fold_dir: Path, roots: Roots, dataset_dir: Path, configuration: str, val_cases: list[str], device: torch.device
) -> dict | None:
    """Predict the held-out cases with ``checkpoint_final.pt`` and evaluate them; the summary, or None if skipped."""
    if not val_cases:
        log.info("No held-out cases (fold 'all'): final validation skipped")
        return None
    if roots.raw is None or not (roots.raw / dataset_dir.name).is_dir():
        log.warning("Final validation skipped: the raw dataset %s is not available (set --raw or DSCOVID_raw)",
                    dataset_dir.name)
        return None
    raw_dir = roots.raw / dataset_dir.name
    raw = load_raw_dataset(raw_dir)
    images = [raw.image_path(case) for case in val_cases]
    absent = [str(p) for p in images if not p.exists()]
    if absent:
        raise DscovidError(f"final validation: raw image(s) missing: {', '.join(absent[:3])}")
    out_dir = fold_dir / "validation"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a re-validation replaces the old one entirely
    log.info("Final validation: predicting %d held-out cases into %s", len(images), out_dir)
    predictions = predict_cases(model_dir=fold_dir.parent, inputs=images, output_dir=out_dir,
                                folds=[fold_dir.name.removeprefix("fold_")], configuration=configuration,
                                device=device, progress=False, min_lesion_ml=0.0)
    for failure in predictions.get("failed", []):
        log.warning("Final validation: %s could not be predicted: %s", failure["case"], failure["reason"])
    summary = evaluate_folder(out_dir, raw_dir, out_dir / "summary.json", cases=val_cases)
    log.info("Final validation written to %s", out_dir / "summary.json")
    return summary
