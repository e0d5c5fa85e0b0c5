"""A randomly initialised model folder in the layout of a trained one (docs/formats.md §6): a benchmark fixture.

For timing the predictor (``bench_predict.py``) and testing it without training (``tests/test_predict.py`` and
``tests/test_demo.py`` import it: pyproject.toml puts benchmarks/ on pytest's path): the folds are built with
``build_network`` from a plans configuration with the trainer's overrides applied, and saved exactly as the trainer
saves ``checkpoint_final.pt`` (so they load with ``weights_only=True`` through the same code path as real folds).
Their predictions are meaningless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from dscovid import __version__
from dscovid.io.dataset import write_json_atomic
from dscovid.model import build_network
from dscovid.plans.configuration import Plans
from dscovid.results.checkpoint import FINAL, save_checkpoint
from dscovid.training.trainers import get_trainer


def save_untrained_model(
    results_root: str | Path,
    plans: Plans | Mapping,
    configuration_name: str,
    trainer_name: str = "DeepSCCOVIDTrainer",
    folds: Sequence[int | str] = (0,),
    seed: int = 0,
) -> Path:
    """Write ``<results_root>/<dataset>/<trainer>__<configuration>/fold_K/`` with random weights per fold.

    Returns
    -------
    The model folder (``<trainer>__<configuration>``), ready for :func:`dscovid.prediction.predict.predict_cases`.
    """
    plans = plans if isinstance(plans, Plans) else Plans.from_dict(plans)
    configuration = get_trainer(trainer_name).effective_configuration(plans.configuration(configuration_name))
    plans = plans.with_configuration(configuration)
    model_dir = Path(results_root) / plans.dataset_name / f"{trainer_name}__{configuration_name}"
    for index, fold in enumerate(folds):
        torch.manual_seed(seed + index)
        network = build_network(configuration)
        state = {
            "network_weights": network.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "epoch": 0,
            "stage": 0,
            "trainer": trainer_name,
            "configuration_name": configuration_name,
            "configuration": configuration.to_dict(),
            "plans": plans.to_dict(),
            "history": {},
            "ema": None,
            "best_ema": None,
            "dscovid_version": __version__,
        }
        save_checkpoint(state, model_dir / f"fold_{fold}" / FINAL)
        write_json_atomic(plans.to_dict(), model_dir / f"fold_{fold}" / "plans.json")
    return model_dir
