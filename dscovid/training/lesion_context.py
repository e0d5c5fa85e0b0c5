"""The classifier's lesion context made from the network's own prediction (``network.lesion_context: "prediction"``).

At inference the classifier sees Ŝ of the whole scan, the lesion subnet's prediction, resampled onto the
classification grid. A training step runs the lesion subnet on one patch only, so outside the patch something
must stand in for Ŝ: the ground truth (``"ground_truth"``) teaches the classifier to trust a lesion map that is
cleaner than anything it will get at inference, where false positives then push a non-pneumonia or CAP scan
towards COVID-19. With ``"prediction"`` the trainer instead runs the current network over every training and
validation scan (sliding window over the lung region, as the predictor does, but with non-overlapping tiles to
keep it cheap), resamples Ŝ onto the grid and caches it in ``fold_K/lesion_context/<case>.npy``; the loader
hands that map over in place of the ground truth. The cache is remade at the start of every joint stage and then
every ``training.lesion_context_refresh_epochs`` epochs (default 10), so it follows the lesion subnet as it
learns. Stages that train the two parts separately (stage 1) keep the ground truth: the lesion subnet is not
trained yet.

The files are written atomically; the loader's worker processes read a case's file each time they draw it, so
they pick up a refresh without being restarted.

**Hard negatives.** The same refresh knows where the network is wrong: with ``training.hard_negative_fraction``
f > 0 it also stores up to 2,000 false-positive voxels per annotated case (Ŝ ≥ 0.5 where the target is 0) in
``fold_K/hard_negatives/<case>.npy``, and a fraction f of the patches that are not forced onto a lesion is then
centred on one of them (with the same jitter as lesion patches). On the synthetic data the false positives sit
where healthy lung is denser (the dependent posterior lung, the bases above the diaphragm): a uniformly random
patch rarely shows them, a mined one does.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dscovid.inference.engine import segment_scan
from dscovid.io.atomic import write_bytes_atomic
from dscovid.plans.configuration import Configuration
from dscovid.preprocessing.resampling import resample_to_grid
from dscovid.training.data import CacheCase
from dscovid.training.distributed import DistributedContext

log = logging.getLogger(__name__)

#: Sub-folder of the fold folder holding the cached context maps.
CONTEXT_FOLDER = "lesion_context"
#: Sub-folder of the fold folder holding the mined false-positive voxels.
HARD_NEGATIVE_FOLDER = "hard_negatives"
#: At most this many false-positive voxel indices are kept per case.
MAX_HARD_NEGATIVES = 2000


def context_file(folder: Path, case_name: str) -> Path:
    """Where the cached context map of one case lives."""
    return Path(folder) / f"{case_name}.npy"


def _read_cached(folder: Path | None, case_name: str) -> np.ndarray | None:
    if folder is None:
        return None
    try:
        return np.load(context_file(folder, case_name))
    except FileNotFoundError:
        return None


def read_context(folder: Path | None, case_name: str) -> np.ndarray | None:
    """The cached (N, H, W) float32 map of ``case_name``, or None when there is none (yet)."""
    cached = _read_cached(folder, case_name)
    return None if cached is None else cached.astype(np.float32, copy=False)


def read_hard_negatives(folder: Path | None, case_name: str) -> np.ndarray | None:
    """The stored (K, 3) false-positive voxel indices of ``case_name``, or None."""
    cached = _read_cached(folder, case_name)
    return None if cached is None else cached.astype(np.int64, copy=False).reshape(-1, 3)


def false_positive_locations(probability: np.ndarray, target: np.ndarray, case_name: str,
                             count: int = MAX_HARD_NEGATIVES, threshold: float = 0.5) -> np.ndarray:
    """Up to ``count`` voxel indices (K, 3) where Ŝ ≥ threshold but the target is 0, drawn reproducibly."""
    wrong = np.argwhere((probability >= threshold) & (target == 0))
    if len(wrong) > count:
        rng = np.random.default_rng(np.frombuffer(case_name.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        wrong = wrong[np.sort(rng.choice(len(wrong), size=count, replace=False))]
    return wrong.astype(np.int32)


def predict_scan(network: torch.nn.Module, case: CacheCase, configuration: Configuration, device: torch.device,
                 batch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Ŝ on the classification grid (N, H, W) and on the preprocessed grid (Z, Y, X), both float32."""
    arrays = case.load(("image", "region", "cls_image"))
    image = torch.from_numpy(np.ascontiguousarray(arrays["image"], dtype=np.float32))[None]
    cls_image = torch.from_numpy(np.ascontiguousarray(arrays["cls_image"], dtype=np.float32))[None, None]
    accumulate_on = device if device.type == "cuda" else torch.device("cpu")
    patch = list(configuration.segmentation.patch_size_zyx)
    scan = segment_scan(network, image.to(accumulate_on), arrays["region"] != 0, cls_image.to(device), patch,
                        step_fraction=1.0, weighting="constant", batch_size=batch_size, device=device,
                        output_device=accumulate_on,
                        placement=configuration.inference.tile_placement)
    probability = scan.probability.cpu().numpy()
    return resample_to_grid(probability, arrays["cls_image"].shape), probability


def _save_npy(array: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(buffer.getvalue(), path)


def refresh_contexts(network: torch.nn.Module, cases: Sequence[CacheCase], folder: Path, configuration: Configuration,
                     device: torch.device, context: DistributedContext, hard_negative_folder: Path | None = None,
                     mine_cases: Sequence[str] = ()) -> float:
    """Remake the cached map of every case (each process its share) and wait for all; returns the seconds spent.

    With ``hard_negative_folder``, the false positives of the annotated cases named in ``mine_cases`` (the
    training cases: validation stays unbiased) are stored there too.
    """
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hard_negative_folder is not None:
        Path(hard_negative_folder).mkdir(parents=True, exist_ok=True)
    mine = set(mine_cases)
    mined = 0
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for case in list(cases)[context.rank::context.world_size]:
                on_grid, probability = predict_scan(network, case, configuration, device)
                _save_npy(on_grid.astype(np.float16), context_file(folder, case.name))
                if hard_negative_folder is not None and case.name in mine and case.lesion_annotated:
                    target = case.load(("lesion",))["lesion"]
                    locations = false_positive_locations(probability, target, case.name)
                    _save_npy(locations, context_file(hard_negative_folder, case.name))
                    mined += len(locations)
    finally:
        network.train(was_training)
    context.barrier()
    seconds = time.perf_counter() - started
    log.info("Lesion context: the network's own Ŝ of %d case(s) cached in %s (%.1f s)%s", len(cases), folder, seconds,
             f"; {mined} false-positive voxels kept as hard negatives" if hard_negative_folder is not None else "")
    return seconds


def clear_contexts(folder: Path, context: DistributedContext) -> None:
    """Remove the cache (a run that starts in a separate-parts stage must not see an old run's maps)."""
    if context.is_main and Path(folder).exists():
        shutil.rmtree(folder)
    context.barrier()


# ------------------------------------------------------------------------------- the component a trainer holds


class GroundTruthContext:
    """The classifier sees the ground truth (``cls_lesion``) outside the patch: nothing is cached or refreshed.

    What a trainer holds for ``network.lesion_context`` ``"ground_truth"`` or ``"none"``, and for single-task
    networks.
    """

    folder: Path | None = None
    hard_negative_folder: Path | None = None
    hard_negative_fraction: float = 0.0

    def on_train_start(self, fresh: bool, context: DistributedContext) -> None:
        """Nothing to prepare."""

    def on_epoch_start(self, network: torch.nn.Module, train_cases: Sequence[CacheCase],
                       val_cases: Sequence[CacheCase], epoch_in_stage: int, joint: bool, configuration: Configuration,
                       device: torch.device, context: DistributedContext) -> None:
        """Nothing to refresh."""


class PredictedContext(GroundTruthContext):
    """The network's own cached whole-scan Ŝ in place of the ground truth, refreshed during the joint stages, and
    optionally the false positives it mines on the way (the hard negatives).

    Parameters
    ----------
    folder : where the context maps are cached (``fold_K/lesion_context``).
    refresh_epochs : epochs between two refreshes within a joint stage (``training.lesion_context_refresh_epochs``).
    hard_negative_folder : where the mined false positives go (``fold_K/hard_negatives``), or None for none.
    hard_negative_fraction : fraction of the patches not forced onto a lesion that are centred on one of them.
    """

    def __init__(self, folder: Path, refresh_epochs: int, hard_negative_folder: Path | None = None,
                 hard_negative_fraction: float = 0.0):
        self.folder = Path(folder)
        self.refresh_epochs = max(int(refresh_epochs), 1)
        self.hard_negative_folder = hard_negative_folder
        self.hard_negative_fraction = hard_negative_fraction if hard_negative_folder is not None else 0.0

    def on_train_start(self, fresh: bool, context: DistributedContext) -> None:
        """A run that starts in a separate-parts stage (or has nothing left to train) removes an old run's maps."""
        if fresh:
            clear_contexts(self.folder, context)
            if self.hard_negative_folder is not None:
                clear_contexts(self.hard_negative_folder, context)

    def on_epoch_start(self, network: torch.nn.Module, train_cases: Sequence[CacheCase],
                       val_cases: Sequence[CacheCase], epoch_in_stage: int, joint: bool, configuration: Configuration,
                       device: torch.device, context: DistributedContext) -> None:
        """In a joint stage: remake the maps at its start, every ``refresh_epochs`` and whenever one is missing."""
        if not joint:
            return
        cases = list({case.name: case for case in [*train_cases, *val_cases]}.values())
        missing = any(not context_file(self.folder, case.name).exists() for case in cases)
        if missing or epoch_in_stage % self.refresh_epochs == 0:
            refresh_contexts(network, cases, self.folder, configuration, device, context, self.hard_negative_folder,
                             [case.name for case in train_cases])


def lesion_context_for(configuration: Configuration, fold_dir: Path) -> tuple[GroundTruthContext, list[str]]:
    """The lesion-context component a trainer of ``configuration`` holds, and notes on plans settings it leaves unused.

    A joint network with ``network.lesion_context`` ``"prediction"`` gets a :class:`PredictedContext` (with hard
    negatives when ``training.hard_negative_fraction`` > 0); any other a :class:`GroundTruthContext`, and the hard
    negatives, which are mined by the context refresh, are then not used.
    """
    training, notes = configuration.training, []
    if configuration.network.tasks == "joint" and configuration.network.lesion_context == "prediction":
        hard_negatives = fold_dir / HARD_NEGATIVE_FOLDER if training.hard_negative_fraction > 0 else None
        return PredictedContext(fold_dir / CONTEXT_FOLDER, training.lesion_context_refresh_epochs, hard_negatives,
                                training.hard_negative_fraction), notes
    if training.hard_negative_fraction > 0:
        # A single-task or ground-truth-context run of the same plans trains without them.
        notes.append(f"training.hard_negative_fraction {training.hard_negative_fraction:.2f} not used: hard "
                     "negatives are mined by the lesion-context refresh of a joint network with "
                     "network.lesion_context 'prediction'")
    return GroundTruthContext(), notes
