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
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dscovid.io.atomic import write_bytes_atomic
from dscovid.training.data import CacheCase
from dscovid.training.distributed import DistributedContext

log = logging.getLogger(__name__)

#: Sub-folder of the fold folder holding the cached context maps.
CONTEXT_FOLDER = "lesion_context"
#: Default epochs between two refreshes within a joint stage.
DEFAULT_REFRESH_EPOCHS = 10


def context_file(folder: Path, case_name: str) -> Path:
    """Where the cached context map of one case lives."""
    return Path(folder) / f"{case_name}.npy"


def read_context(folder: Path | None, case_name: str) -> np.ndarray | None:
    """The cached (N, H, W) float32 map of ``case_name``, or None when there is none (yet)."""
    if folder is None:
        return None
    path = context_file(folder, case_name)
    try:
        return np.load(path).astype(np.float32, copy=False)
    except FileNotFoundError:
        return None


def predict_context(network: torch.nn.Module, case: CacheCase, configuration: Mapping, device: torch.device,
                    batch_size: int = 2) -> np.ndarray:
    """Ŝ of the whole preprocessed case on the classification grid, (N, H, W) float32, as the predictor makes it."""
    from dscovid.inference.predictor import segment_scan  # imported here: the predictor imports the trainer's files
    from dscovid.preprocessing.resampling import resample_to_grid

    arrays = case.load(("image", "region", "cls_image"))
    image = torch.from_numpy(np.ascontiguousarray(arrays["image"], dtype=np.float32))[None]
    cls_image = torch.from_numpy(np.ascontiguousarray(arrays["cls_image"], dtype=np.float32))[None, None]
    accumulate_on = device if device.type == "cuda" else torch.device("cpu")
    patch = [int(v) for v in configuration["segmentation"]["patch_size_zyx"]]
    scan = segment_scan(network, image.to(accumulate_on), arrays["region"] != 0, cls_image.to(device), patch,
                        step_fraction=1.0, weighting="constant", batch_size=batch_size, device=device,
                        output_device=accumulate_on)
    return resample_to_grid(scan.probability.cpu().numpy(), arrays["cls_image"].shape)


def refresh_contexts(network: torch.nn.Module, cases: Sequence[CacheCase], folder: Path, configuration: Mapping,
                     device: torch.device, context: DistributedContext) -> float:
    """Remake the cached map of every case (each process its share) and wait for all; returns the seconds spent."""
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for case in list(cases)[context.rank::context.world_size]:
                buffer = io.BytesIO()
                np.save(buffer, predict_context(network, case, configuration, device).astype(np.float16))
                write_bytes_atomic(buffer.getvalue(), context_file(folder, case.name))
    finally:
        network.train(was_training)
    context.barrier()
    seconds = time.perf_counter() - started
    log.info("Lesion context: the network's own Ŝ of %d case(s) cached in %s (%.1f s)", len(cases), folder, seconds)
    return seconds


def clear_contexts(folder: Path, context: DistributedContext) -> None:
    """Remove the cache (a run that starts in a separate-parts stage must not see an old run's maps)."""
    if context.is_main and Path(folder).exists():
        shutil.rmtree(folder)
    context.barrier()
