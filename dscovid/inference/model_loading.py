"""Load the folds of a trained model folder for prediction (docs/formats.md §6).

A model folder is ``$DSCOVID_results/DatasetNNN_Name/<Trainer>__<configuration>/`` with one ``fold_K/`` per
trained fold, each holding ``checkpoint_final.pt``. Checkpoints are read with ``weights_only=True`` (a checkpoint
may not run code); each holds the effective configuration the network was built from and the plans the data was
preprocessed with, so prediction rebuilds exactly the trained network and repeats exactly its preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dscovid.errors import DscovidError
from dscovid.model import build_network
from dscovid.plans.configuration import Configuration, InferenceConfig, Plans
from dscovid.results.checkpoint import FINAL, load_checkpoint
from dscovid.results.model_folder import available_folds, checkpoint_plans, trained_fold_dir

log = logging.getLogger(__name__)


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the predictor keeps 5D weights and patches in on ``device``.

    On the CPU, oneDNN's 3D convolutions run faster on channels-last tensors (the channels innermost, ``(N, Z, Y,
    X, C)`` in memory) than on PyTorch's default layout, and the predictor's results are the same within float
    rounding (``tests/test_predict.py`` checks it; docs/prediction.md, memory layout, gives the timing). On CUDA the
    default layout stays until it is measured there.
    """
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


@dataclass
class TrainedModel:
    """The folds of one trained model, ready to predict.

    Attributes
    ----------
    model_dir : the ``<Trainer>__<configuration>`` folder.
    trainer, configuration_name : from the checkpoints.
    folds : fold names (``"0"``, ``"all"``), in the order of ``networks``.
    networks : one network per fold, in eval mode, on ``device``.
    network_configuration : the effective configuration the networks were built from (fold 0's: the plans
        configuration with the trainer's overrides).
    preprocessing : the plans configuration the training data was preprocessed with.
    plans : the whole plans.
    class_names : the diagnosis classes, in the network's output order.
    device : where the networks are.
    """

    model_dir: Path
    trainer: str
    configuration_name: str
    folds: list[str]
    networks: list[torch.nn.Module]
    network_configuration: Configuration
    preprocessing: Configuration
    plans: Plans
    class_names: list[str]
    device: torch.device
    checkpoint_name: str = FINAL
    dscovid_versions: list[str] = field(default_factory=list)

    @property
    def patch_size_zyx(self) -> tuple[int, int, int]:
        return self.network_configuration.segmentation.patch_size_zyx

    @property
    def inference(self) -> InferenceConfig:
        """The sliding-window settings the model was trained for (the trainer may override the plans')."""
        return self.network_configuration.inference

    def identity(self) -> dict:
        """What makes two prediction runs comparable: the model folder, configuration, trainer and folds."""
        return {
            "model_dir": str(self.model_dir.resolve()),
            "configuration": self.configuration_name,
            "trainer": self.trainer,
            "folds": list(self.folds),
        }


def load_trained_model(
    model_dir: str | Path,
    folds: Sequence[str | int] | None = None,
    device: torch.device | str = "cpu",
    checkpoint_name: str = FINAL,
) -> TrainedModel:
    """Load the chosen folds (default: every fold with a checkpoint) of a model folder onto ``device``.

    Raises
    ------
    DscovidError
        For a missing folder or fold, an unreadable checkpoint, or folds that disagree on the configuration or
        the preprocessing (they could not be averaged).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DscovidError(f"{model_dir}: model folder not found")
    chosen = [str(f) for f in folds] if folds else available_folds(model_dir, checkpoint_name)
    if not chosen:
        raise DscovidError(f"{model_dir}: no trained fold (no fold_*/{checkpoint_name})")
    device = torch.device(device)
    networks, versions = [], []
    reference: dict | None = None
    for fold in chosen:
        fold_dir = trained_fold_dir(model_dir, fold, checkpoint_name)
        path = fold_dir / checkpoint_name
        state = load_checkpoint(path)
        for key in ("network_weights", "configuration", "configuration_name"):
            if key not in state:
                raise DscovidError(f"{path}: not a dscovid checkpoint (no {key!r})")
        name = state["configuration_name"]
        try:
            plans = Plans.from_dict(checkpoint_plans(state, fold_dir))
            preprocessing = plans.configuration(name)
            configuration = Configuration.from_dict(name, state["configuration"])
        except DscovidError as error:
            raise DscovidError(f"{path}: {error}") from None
        if reference is None:
            reference = {"state": state, "plans": plans, "preprocessing": preprocessing, "configuration": configuration}
        else:
            if name != reference["state"]["configuration_name"]:
                raise DscovidError(f"{path}: configuration {name!r} differs from fold {chosen[0]}'s")
            if preprocessing.preprocessing_key() != reference["preprocessing"].preprocessing_key():
                raise DscovidError(f"{path}: preprocessed differently from fold {chosen[0]}; folds cannot be averaged")
        network = build_network(configuration)
        try:
            network.load_state_dict(state["network_weights"])
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise DscovidError(f"{path}: weights do not fit the network of its configuration ({first})") from None
        networks.append(network.to(device, memory_format=inference_memory_format(device)).eval())
        versions.append(str(state.get("dscovid_version", "unknown")))
    state = reference["state"]
    plans = reference["plans"]
    class_names = list(plans.class_names)
    log.info("Loaded %s folds %s from %s", state["configuration_name"], ", ".join(chosen), model_dir)
    return TrainedModel(
        model_dir=model_dir,
        trainer=str(state.get("trainer") or model_dir.name.split("__", 1)[0]),
        configuration_name=state["configuration_name"],
        folds=chosen,
        networks=networks,
        network_configuration=reference["configuration"],
        preprocessing=reference["preprocessing"],
        plans=plans,
        class_names=class_names,
        device=device,
        checkpoint_name=checkpoint_name,
        dscovid_versions=versions,
    )
