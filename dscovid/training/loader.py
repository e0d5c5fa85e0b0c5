"""Training batches: random patches with lesion oversampling, the case's classification grid, labels and flags.

A batch is a dictionary of numpy arrays (converted to tensors by the trainer):

==================  ======================  ==========================================================
key                 shape, dtype            meaning
==================  ======================  ==========================================================
``data``            (B, 1, Z, Y, X) float32 image patch, [0, 1]
``seg``             (B, 1, Z, Y, X) float32 lesion mask of the patch, 0/1 (all 0 when not annotated)
``cls_image``       (B, 1, N, H, W) float32 the whole case on the classification grid
``cls_lesion``      (B, 1, N, H, W) float32 its lesion fraction per grid cell (the lesion context), or the
                                            network's own cached Ŝ there (``context_dir``, lesion_context.py)
``patch_box``       (B, 2, 3) float64       start and size (z, y, x) of the patch, preprocessed voxels
``volume_shape``    (B, 3) float64          preprocessed volume shape (Z, Y, X)
``class_index``     (B,) int64              diagnosis class
``lesion_annotated`` (B,) bool              False: skip this sample's segmentation loss
``keys``            list of str             case names
==================  ======================  ==========================================================

Batches are produced and augmented (:mod:`dscovid.training.augmentation`) in background worker processes
(batchgenerators' ``MultiThreadedAugmenter``, which returns the workers' batches in a fixed round-robin order);
each worker draws from its own generator seeded by ``(run seed, worker)``, so a seeded run sees the same batches.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from dscovid.parallel import exit_with_parent
from dscovid.training.augmentation import (
    AugmentationSettings,
    augment_sample,
    draw_spatial_matrix,
    resample_grid,
    resample_patch,
)
from dscovid.training.data import CacheCase
from dscovid.training.lesion_context import read_context, read_hard_negatives
from dscovid.training.sampling import choose_start, crop, forced_lesion_flags, lesion_start, lesion_voxel_groups


class PatchLoader(DataLoader):
    """batchgenerators data loader drawing cases with replacement and cutting one patch per sample.

    Parameters
    ----------
    cases : list of CacheCase
    batch_size : int
        Samples per batch (per process under DDP).
    patch_size_zyx : (3,) ints
    spacing_zyx_mm : (3,) floats
        Preprocessed voxel spacing (rotations are done in millimetres).
    oversample_foreground : float
        Fraction of each batch forced to contain lesion (nnU-Net's 0.33), for cases that have lesion locations.
    augmentation : AugmentationSettings
        ``AugmentationSettings.none()`` for validation batches.
    seed : int
        Seed of this loader's own generator (each worker process re-seeds it from its worker seed).
    context_dir : Path or None
        Folder of cached whole-scan predictions (``network.lesion_context: "prediction"``); a case with a file
        there gets it as ``cls_lesion`` instead of its ground truth (re-read each time, so refreshes show up).
    hard_negative_dir, hard_negative_fraction : mined false-positive voxels; that fraction of the patches not
        forced onto a lesion is centred on one of them when the case has any.
    lesion_sampling : ``"voxel"``: a forced patch is centred on one of the case's sampled lesion voxels (nnU-Net's
        rule; a lesion's share of the patches grows with its volume); ``"lesion"``: on a lesion (26-connected) chosen
        uniformly, then one of its voxels (``training.lesion_sampling``).
    """

    def __init__(
        self,
        cases: Sequence[CacheCase],
        batch_size: int,
        patch_size_zyx: Sequence[int],
        spacing_zyx_mm: Sequence[float],
        oversample_foreground: float,
        augmentation: AugmentationSettings,
        seed: int = 0,
        num_threads: int = 1,
        context_dir: Path | None = None,
        hard_negative_dir: Path | None = None,
        hard_negative_fraction: float = 0.0,
        lesion_sampling: str = "voxel",
    ):
        if lesion_sampling not in ("voxel", "lesion"):
            raise ValueError(f"lesion_sampling must be 'voxel' or 'lesion', got {lesion_sampling!r}")
        super().__init__(list(cases), batch_size, num_threads_in_multithreaded=max(num_threads, 1),
                         seed_for_shuffle=seed, infinite=True)
        self.patch_size = tuple(int(s) for s in patch_size_zyx)
        self.spacing = tuple(float(s) for s in spacing_zyx_mm)
        self.forced = forced_lesion_flags(batch_size, oversample_foreground)
        self.augmentation = augmentation
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.parent_pid = os.getpid()  # the training process, which the workers must not outlive
        self.context_dir = context_dir
        self.hard_negative_dir = hard_negative_dir
        self.hard_negative_fraction = float(hard_negative_fraction)
        self.lesion_sampling = lesion_sampling
        self._lesion_groups: dict[str, list[np.ndarray]] = {}  # per case, made on first use in each worker

    def lesion_groups(self, case: CacheCase, lesion: np.ndarray) -> list[np.ndarray] | None:
        """The case's lesions for per-lesion sampling (None with voxel sampling or without annotated lesions)."""
        if self.lesion_sampling != "lesion" or not case.lesion_annotated or not len(case.lesion_locations_zyx):
            return None
        if case.name not in self._lesion_groups:
            self._lesion_groups[case.name] = lesion_voxel_groups(lesion)
        return self._lesion_groups[case.name]

    def set_thread_id(self, thread_id: int) -> None:
        # Called once inside each background worker: its own stream, reproducible from the run seed.
        super().set_thread_id(thread_id)
        self.rng = np.random.default_rng([self.seed, thread_id])
        exit_with_parent(self.parent_pid, signal.SIGTERM)

    def make_sample(self, case: CacheCase, force_lesion: bool) -> dict:
        """One sample of ``case`` (arrays without the batch axis)."""
        arrays = case.load()
        predicted = read_context(self.context_dir, case.name)
        if predicted is not None:  # the network's own cached Ŝ stands in for the ground truth (lesion_context.py)
            arrays["cls_lesion"] = predicted
        shape = arrays["image"].shape
        start = None
        if not force_lesion and self.hard_negative_fraction > 0 and self.rng.random() < self.hard_negative_fraction:
            wrong = read_hard_negatives(self.hard_negative_dir, case.name)
            if wrong is not None and len(wrong):  # a patch on the network's own false positives (lesion_context.py)
                start = lesion_start(shape, self.patch_size, wrong, self.rng)
        if start is None:
            groups = self.lesion_groups(case, arrays["lesion"]) if force_lesion else None
            start = choose_start(shape, self.patch_size, case.lesion_locations_zyx, force_lesion, self.rng, groups)
        matrix = draw_spatial_matrix(self.augmentation, self.spacing, self.rng)
        if matrix is None:
            image = crop(arrays["image"], start, self.patch_size).astype(np.float32)
            lesion = crop(arrays["lesion"], start, self.patch_size).astype(np.float32)
            cls_image, cls_lesion = arrays["cls_image"], arrays["cls_lesion"]
        else:
            image = resample_patch(arrays["image"], start, self.patch_size, matrix)
            lesion = (resample_patch(arrays["lesion"], start, self.patch_size, matrix) >= 0.5).astype(np.float32)
            cls_image = resample_grid(arrays["cls_image"], shape, start, self.patch_size, matrix)
            cls_lesion = resample_grid(arrays["cls_lesion"], shape, start, self.patch_size, matrix)
        if not case.lesion_annotated:
            lesion = np.zeros_like(lesion)
        cell_mm = np.asarray(shape, dtype=np.float64) * self.spacing / np.asarray(cls_lesion.shape, dtype=np.float64)
        sample = {
            "data": image[None],
            "seg": lesion[None],
            "cls_image": np.asarray(cls_image, dtype=np.float32)[None],
            "cls_lesion": np.asarray(cls_lesion, dtype=np.float32)[None],
            "patch_box": np.array([start, self.patch_size], dtype=np.float64),
            "volume_shape": np.array(shape, dtype=np.float64),
            "cell_mm": cell_mm,
            "cell_ml": float(np.prod(cell_mm)) / 1000.0,
            "class_index": case.class_index,
            "lesion_annotated": case.lesion_annotated,
            "key": case.name,
        }
        return augment_sample(sample, self.augmentation, self.rng)

    def generate_train_batch(self) -> dict:
        picks = self.rng.integers(len(self._data), size=self.batch_size)
        samples = [self.make_sample(self._data[int(i)], force) for i, force in zip(picks, self.forced)]
        return collate(samples)


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch dictionary (see the module docstring)."""
    batch = {key: np.stack([s[key] for s in samples]) for key in
             ("data", "seg", "cls_image", "cls_lesion", "patch_box", "volume_shape")}
    batch["class_index"] = np.array([s["class_index"] for s in samples], dtype=np.int64)
    batch["lesion_annotated"] = np.array([s["lesion_annotated"] for s in samples], dtype=bool)
    batch["keys"] = [s["key"] for s in samples]
    return batch


def build_loader(
    cases: Sequence[CacheCase],
    batch_size: int,
    patch_size_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    oversample_foreground: float,
    augmentation: AugmentationSettings,
    seed: int,
    num_workers: int,
    context_dir: Path | None = None,
    hard_negative_dir: Path | None = None,
    hard_negative_fraction: float = 0.0,
    lesion_sampling: str = "voxel",
):
    """An endless iterator of (augmented) batches, in ``num_workers`` background processes (0: in this process).

    Call ``_finish()`` on the result (or use :func:`close_loader`) to stop the workers.
    """
    loader = PatchLoader(cases, batch_size, patch_size_zyx, spacing_zyx_mm, oversample_foreground, augmentation,
                         seed=seed, num_threads=num_workers, context_dir=context_dir,
                         hard_negative_dir=hard_negative_dir, hard_negative_fraction=hard_negative_fraction,
                         lesion_sampling=lesion_sampling)
    if num_workers <= 0:
        return SingleThreadedAugmenter(loader, None)
    # Random draws come from each worker's own generator (PatchLoader.set_thread_id), not from these seeds.
    return MultiThreadedAugmenter(loader, None, num_workers, num_cached_per_queue=2, seeds=list(range(num_workers)),
                                  pin_memory=False, timeout=60)


def close_loader(loader) -> None:
    """Stop a loader's worker processes (no-op for the in-process one)."""
    finish = getattr(loader, "_finish", None)
    if finish is not None:
        finish()
