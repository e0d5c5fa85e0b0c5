"""Is the training data loader ever the bottleneck? Loader batches/s against the training step's batches/s.

Measures, for one configuration:

- the loader (lesion-oversampled patches, the case's classification grid, full augmentation) in 0..K background
  worker processes, in batches per second;
- the training step of that configuration (the real trainer's ``train_step``: forward, loss, backward, Adam; stage 1
  "separate" and stage 2 "joint"), in seconds per batch, on the CPU or a CUDA GPU (mixed precision);

and prints whether the loader keeps up, and the loader rate a GPU step would need.

Data: a real preprocessed dataset (``--preprocessed DIR -d DATASET -c CONFIG``), or a synthetic cache written
to a temporary folder in the docs/formats.md §2 format at a chosen volume size (``--preset``), so the benchmark
also runs on a machine with no data (a GPU node). Examples::

    python benchmarks/bench_dataloader.py --preset 3d_cpu --workers 0 1 2
    python benchmarks/bench_dataloader.py --preset 3d_paper --device cuda --workers 0 4 8 --volume-shape 160 320 400
    python benchmarks/bench_dataloader.py --preprocessed $DSCOVID_preprocessed -d 1 -c 3d_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dscovid import __version__
from dscovid.plans.configuration import Configuration, Plans
from dscovid.plans.presets import preset_configuration
from dscovid.training.augmentation import AugmentationSettings
from dscovid.training.base_trainer import TrainingSetup
from dscovid.training.data import list_cache_cases
from dscovid.training.loader import build_loader, close_loader
from dscovid.training.trainers import DeepSCCOVIDTrainer

DEFAULT_SHAPES = {"3d_cpu": (72, 64, 92), "3d_paper": (160, 320, 400)}
DEFAULT_SPACING = {"3d_cpu": (4.3, 3.2, 3.2), "3d_paper": (1.5, 0.8, 0.8)}


def write_synthetic_cache(folder: Path, configuration: Configuration, n_cases: int, shape_zyx, seed: int = 0) -> Path:
    """``n_cases`` phantom cases (two lungs, lesion blobs) in the cache format, at ``shape_zyx``."""
    rng = np.random.default_rng(seed)
    data_dir = folder / configuration.data_identifier
    data_dir.mkdir(parents=True, exist_ok=True)
    z, y, x = shape_zyx
    zz, yy, xx = np.ogrid[:z, :y, :x]
    lungs = np.zeros(shape_zyx, dtype=bool)
    for cx in (0.3, 0.7):
        lungs |= ((zz - z / 2) / (0.45 * z)) ** 2 + ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - cx * x) / (0.2 * x)) ** 2 <= 1
    grid = configuration.classification.grid_zyx
    for index in range(n_cases):
        class_index = index % 3
        image = np.where(lungs, rng.uniform(0.15, 0.3, shape_zyx).astype(np.float32), 0).astype(np.float32)
        lesion = np.zeros(shape_zyx, dtype=np.uint8)
        if class_index != 2:
            centre = np.argwhere(lungs)[rng.integers(lungs.sum())]
            r = 0.08 * np.array(shape_zyx)
            blob = ((zz - centre[0]) / r[0]) ** 2 + ((yy - centre[1]) / r[1]) ** 2 + ((xx - centre[2]) / r[2]) ** 2 <= 1
            lesion[blob & lungs] = 1
            image[lesion > 0] = 0.7
        to_grid = lambda a: F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=grid,  # noqa: E731
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
        name = f"case_{index:04d}"
        np.savez(data_dir / f"{name}.npz", image=image, lesion=lesion, lung=lungs.astype(np.uint8),
                 cls_image=to_grid(image), cls_lesion=to_grid(lesion))
        locations = np.argwhere(lesion)
        locations = locations[rng.choice(len(locations), min(len(locations), 10000), replace=False)] if len(
            locations) else locations
        (data_dir / f"{name}.json").write_text(json.dumps({
            "case": name, "class_index": class_index, "class_name": ["covid", "cap", "non_pneumonia"][class_index],
            "lesion_annotated": True, "lesion_voxels": int(lesion.sum()), "lesion_locations_zyx": locations.tolist()}))
    return data_dir


def loader_rate(cases, configuration: Configuration, workers: int, batches: int) -> float:
    """Batches per second of the augmented training loader with ``workers`` background processes."""
    training = configuration.training
    loader = build_loader(cases, training.batch_size, configuration.segmentation.patch_size_zyx,
                          configuration.preprocessing.target_spacing_zyx_mm, training.oversample_foreground,
                          AugmentationSettings(), 0, workers)
    try:
        for _ in range(max(2, workers)):  # warm-up: start the workers, fill their queues once
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches / (time.perf_counter() - start)
    finally:
        close_loader(loader)


def step_time(cases, configuration: Configuration, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per training step of the real trainer, per stage mode (batches prepared beforehand)."""
    plans = Plans("bench", "bench", __version__, ("covid", "cap", "non_pneumonia"), {configuration.name: configuration})
    setup = TrainingSetup(plans, configuration.name, configuration, list(cases), [], Path(tempfile.mkdtemp()),
                          device=device, num_workers=0)
    trainer = DeepSCCOVIDTrainer(setup)
    loader = build_loader(cases, trainer.batch_size, configuration.segmentation.patch_size_zyx,
                          configuration.preprocessing.target_spacing_zyx_mm, 0.33, AugmentationSettings(), 1, 0)
    batches = [next(loader) for _ in range(steps + 1)]
    result = {}
    for index in range(len(trainer.stages)):
        trainer.on_stage_start(index)
        trainer.train_step(batches[0])  # warm-up (cuDNN autotuning, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches[1:]:
            trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result[trainer.step_mode(trainer.stages[index])] = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", default=None, help="a preprocessed root (default: a synthetic cache)")
    parser.add_argument("-d", "--dataset", default=None)
    parser.add_argument("-c", "--configuration", default="3d_cpu")
    parser.add_argument("--preset", default="3d_cpu", help="preset for the synthetic cache (3d_cpu, 3d_paper)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--volume-shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the training step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        if args.preprocessed:
            from dscovid.io.dataset import find_dataset
            from dscovid.training.run import read_plans

            dataset_dir = find_dataset(args.dataset, Path(args.preprocessed))
            configuration = read_plans(dataset_dir / "plans.json").configuration(args.configuration)
            cases = list(list_cache_cases(dataset_dir / configuration.data_identifier).values())
            source = f"{dataset_dir.name} / {args.configuration} ({len(cases)} cases)"
        else:
            configuration = preset_configuration(args.preset, DEFAULT_SPACING.get(args.preset, (2, 1, 1)))
            shape = tuple(args.volume_shape or DEFAULT_SHAPES.get(args.preset, (64, 128, 128)))
            started = time.perf_counter()
            data_dir = write_synthetic_cache(Path(scratch), configuration, args.cases, shape)
            cases = list(list_cache_cases(data_dir).values())
            source = (f"synthetic cache, preset {args.preset}, {args.cases} cases of {shape} voxels "
                      f"(written in {time.perf_counter() - started:.1f} s)")
        batch_size = configuration.training.batch_size
        print(f"data: {source}; patch {list(configuration.segmentation.patch_size_zyx)}, grid "
              f"{list(configuration.classification.grid_zyx)}, batch {batch_size}; {os.cpu_count()} CPUs; "
              f"torch threads {torch.get_num_threads()}")
        steps = step_time(cases, configuration, torch.device(args.device), args.steps)
        need = 1.0 / min(v for k, v in steps.items() if k != "peak_memory_gb")
        print(f"training step on {args.device}: " + ", ".join(
            f"{k} {v:.3f} s" if k != "peak_memory_gb" else f"peak {v:.1f} GB" for k, v in steps.items())
            + f" -> consumes up to {need:.2f} batches/s")
        print(f"{'workers':>8} {'batches/s':>10} {'ms/batch':>9}  verdict")
        for workers in args.workers:
            rate = loader_rate(cases, configuration, workers, args.batches)
            verdict = "keeps up" if rate >= need else f"BOTTLENECK ({rate / need:.0%} of the step rate)"
            print(f"{workers:>8} {rate:>10.2f} {1000 / rate:>9.1f}  {verdict}")
        print(f"A GPU step of t seconds needs the loader to deliver 1/t batches/s; this configuration's step on "
              f"{args.device} needs {need:.2f} batches/s (per process; each DDP process has its own loader).")


if __name__ == "__main__":
    main()
