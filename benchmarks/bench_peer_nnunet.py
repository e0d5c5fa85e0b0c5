"""Throughput of nnU-Net v2's own predictor on a folder of synthetic chest CTs: the peer of ``bench_predict.py --scans``.

What it measures: ``nnUNetPredictor.predict_from_files`` (nnunetv2 2.8.1, the function behind ``nnUNetv2_predict``)
on a folder of ``*_0000.nii.gz`` scans, with ``-np`` worker processes for preprocessing and for the export
(``num_processes_preprocessing`` and ``num_processes_segmentation_export``), half-overlapping tiles with Gaussian
weighting, and test-time mirroring unless ``--disable-tta``. It prints the wall time of the folder, seconds per scan,
scans per hour, the peak resident memory of this process (which runs the network), the peak proportional memory (PSS,
sampled from /proc) of the largest worker and of all the call's processes together and, on CUDA, the peak allocated
GPU memory; before that, one scan alone in its own call (first-scan latency, worker start included) and the time to
load the model folder. Per scan it records the preprocessed shape, the number of tiles, the network evaluations per
tile (8 with mirroring over three axes) and the network's seconds.

The model is a 3d_fullres nnU-Net with randomly initialised weights (the time does not depend on the weights; nothing
is downloaded), built with nnU-Net's own code in a work folder that ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` point into:

1. a raw dataset (``imagesTr``, ``labelsTr``, ``dataset.json`` with channel ``CT`` and labels background / lesion)
   of the first ``--train-cases`` scans of the folder: a generated scan's label is its lesion mask, a scan of
   ``--folder`` gets the threshold label HU > 0 (the plans depend on the images' spacings and shapes; the label
   only feeds the intensity statistics of the CT normalisation);
2. nnU-Net's dataset integrity check, fingerprint extraction and experiment planner (``--planner``, by default the
   classic ``ExperimentPlanner``: ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres`` without the preprocessing);
3. ``nnUNetTrainer`` (via ``get_trainer_from_args``, as ``nnUNetv2_train`` makes it) builds the network from the
   plans (He initialisation, seeded), its optimiser and mirroring axes, and writes ``fold_0/checkpoint_final.pth``
   with its own ``save_checkpoint``; ``plans.json``, ``dataset.json`` and ``dataset_fingerprint.json`` are copied
   beside it as its ``on_train_start`` does. ``nnUNetPredictor.initialize_from_trained_model_folder`` loads it.

Synthetic scans are made as ``bench_predict.py`` makes them (``generate_case(seed, index, full_size=True)``,
written with ``dscovid.io.image_io.write_image``); ``--small`` uses the small grid for quick checks.

nnunetv2 pulls other versions of packages that dscovid shares (and a CUDA torch unless torch is pinned), so it runs
from its own virtual environment, never the project's ``.venv``. On a CPU machine (this project's: the local CPU
wheel; torchvision is pinned to torch 2.13's release so that pip does not replace torch; it is installed but nnU-Net's
predictor does not import it)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 nnunetv2==2.8.1
    /work/peers-venv/bin/pip install -e . --no-deps      # dscovid, for generate_case and write_image

On a GPU machine the same commands where pip finds PyPI's torch 2.13.0 (the CUDA build) rather than a local CPU
wheel. Then, from the repository root::

    /work/peers-venv/bin/python benchmarks/bench_peer_nnunet.py --small --scans 2 --threads 1 --workers 1 \\
        --disable-tta                                              # a quick check that everything runs
    /work/peers-venv/bin/python benchmarks/bench_peer_nnunet.py --device cpu --scans 1 --no-single --disable-tta
    /work/peers-venv/bin/python benchmarks/bench_peer_nnunet.py --device cuda --threads 8 --workers 4 --scans 50
    /work/peers-venv/bin/python benchmarks/bench_peer_nnunet.py --folder /data/scans --device cuda --json peer.json

On the CPU a full-size scan is well over a hundred 3d_fullres tiles in float32 (nnU-Net uses autocast on CUDA only), each
run eight times with mirroring: a CPU figure needs ``--disable-tta`` and few scans. The work folder (a new temporary
folder unless ``--work``) holds the scans, the nnU-Net folders and the predictions; a temporary one is removed at the
end unless ``--keep`` (a ``--folder`` is never touched), so ``--work DIR`` then ``--folder DIR/scans`` predicts the
same generated scans again. Compare with our predictor on the same scans: ``bench_predict.py --configurations 3d_cpu
--no-peers --scans N --workers NP`` makes the same seed's same cases (``--seed``, ``--index``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_predict import _rss_gb  # peak resident memory of this process (the one that runs the network)

DATASET_ID = 991
DATASET_NAME = f"Dataset{DATASET_ID}_DscovidPeer"
CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANNERS = ("ExperimentPlanner", "nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL")


class _TreeMemory(threading.Thread):
    """Samples the memory of this process and its descendants (nnU-Net's workers) from /proc every 0.5 s.

    ``RUSAGE_CHILDREN`` cannot tell (a spawned child is forked from this process before it runs Python anew, so its
    peak counts this process's pages), and resident sizes count pages that forked processes share once in each. The
    proportional set size (PSS, ``/proc/PID/smaps_rollup``) splits shared pages among their processes: records the
    largest worker's and the largest sum over this process and its descendants started during the call.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.largest_worker_gb = 0.0
        self.total_gb = 0.0
        self._done = threading.Event()
        self._earlier = set(self._tree()) - {os.getpid()}  # e.g. a Manager that an earlier call left running

    @staticmethod
    def _tree() -> list[int]:
        parents = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [], [os.getpid()]
        while frontier:
            pid = frontier.pop()
            tree.append(pid)
            frontier.extend(child for child, parent in parents.items() if parent == pid)
        return tree

    @staticmethod
    def _pss_gb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) / 2**20  # kB
        except OSError:
            pass
        return 0.0

    def run(self) -> None:
        while not self._done.wait(0.5):
            pss = {pid: self._pss_gb(pid) for pid in self._tree() if pid not in self._earlier}
            workers = [v for pid, v in pss.items() if pid != os.getpid()]
            self.largest_worker_gb = max(self.largest_worker_gb, max(workers, default=0.0))
            self.total_gb = max(self.total_gb, sum(pss.values()))

    def stop(self) -> None:
        self._done.set()
        self.join()


def _scan_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_0000.nii.gz"))


def make_scans(folder: Path, count: int, seed: int, index: int, small: bool, train_cases: int,
               train_images: Path, train_labels: Path) -> None:
    """Write ``count`` synthetic scans into ``folder``; the first ``train_cases`` also as nnU-Net training cases."""
    from dataset_conversion.synthetic import generate_case
    from dscovid.io.image_io import write_image

    lesion_voxels = 0
    for i in range(max(count, train_cases)):
        case = generate_case(seed, index + i, full_size=not small)
        if i < train_cases:
            lesion_voxels += int(case.lesion.sum())
        name = f"scan{i:03d}"
        if i < count:
            write_image(case.image_hu, case.geometry, folder / f"{name}_0000.nii.gz")
        if i < train_cases:
            if i < count:
                shutil.copyfile(folder / f"{name}_0000.nii.gz", train_images / f"{name}_0000.nii.gz")
            else:
                write_image(case.image_hu, case.geometry, train_images / f"{name}_0000.nii.gz")
            write_image(case.lesion.astype(np.uint8), case.geometry, train_labels / f"{name}.nii.gz")
        print(f"  {name}: {case.geometry.shape_zyx} at {np.round(case.geometry.spacing_zyx_mm, 3)} mm "
              f"({case.class_name}, {int(case.lesion.sum())} lesion voxels)", flush=True)
        if i == train_cases - 1 and lesion_voxels == 0:  # nnU-Net's CT normalisation needs foreground intensities
            raise SystemExit(f"the {train_cases} training cases have no lesion: use more --train-cases or another "
                             "--index")


def take_training_cases(scans: list[Path], train_images: Path, train_labels: Path) -> None:
    """The given scans as nnU-Net training cases, each labelled HU > 0 (its geometry copied from the scan)."""
    import SimpleITK as sitk

    for scan in scans:
        case = scan.name[: -len("_0000.nii.gz")]
        shutil.copyfile(scan, train_images / scan.name)
        image = sitk.ReadImage(str(scan))
        label = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(image) > 0).astype(np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(train_labels / f"{case}.nii.gz"), useCompression=True)


def build_model(work: Path, planner_name: str, gpu_memory_gb: float | None, workers: int, seed: int) -> Path:
    """Fingerprint, plan and save a randomly initialised 3d_fullres fold 0 with nnU-Net's code; the model folder."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiment_dataset
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    planner = ExperimentPlanner if planner_name == "ExperimentPlanner" else getattr(residual_encoder_unet_planners,
                                                                                    planner_name)
    extract_fingerprint_dataset(DATASET_ID, num_processes=workers, check_dataset_integrity=True, clean=True,
                                verbose=False, show_progress_bar=False)
    _, plans_identifier = plan_experiment_dataset(DATASET_ID, planner, gpu_memory_target_in_gb=gpu_memory_gb)
    preprocessed = work / "nnUNet_preprocessed" / DATASET_NAME
    # nnUNetv2_preprocess copies dataset.json here; the trainer reads it from here.
    shutil.copyfile(work / "nnUNet_raw" / DATASET_NAME / "dataset.json", preprocessed / "dataset.json")

    torch.manual_seed(seed)
    trainer = get_trainer_from_args(str(DATASET_ID), CONFIGURATION, 0, TRAINER, plans_identifier,
                                    device=torch.device("cpu"))
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              trainer.dataset_json)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    # What nnUNetTrainer.on_train_start writes beside the folds for inference.
    model_dir = Path(trainer.output_folder_base)
    save_json(trainer.plans_manager.plans, str(model_dir / "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, str(model_dir / "dataset.json"), sort_keys=False)
    shutil.copyfile(preprocessed / "dataset_fingerprint.json", model_dir / "dataset_fingerprint.json")
    return model_dir


def _plans_summary(model_dir: Path) -> dict:
    plans = json.loads((model_dir / "plans.json").read_text())
    config = plans["configurations"][CONFIGURATION]
    arch = config["architecture"]
    kwargs = arch["arch_kwargs"]
    return {
        "plans_name": plans["plans_name"],
        "configurations_planned": sorted(plans["configurations"]),
        "patch_size": config["patch_size"],
        "spacing": config["spacing"],
        "median_image_size_in_voxels": config["median_image_size_in_voxels"],
        "batch_size": config["batch_size"],
        "normalization": config["normalization_schemes"],
        "network": arch["network_class_name"].rsplit(".", 1)[-1],
        "n_stages": kwargs.get("n_stages"),
        "features_per_stage": kwargs.get("features_per_stage"),
        "strides": kwargs.get("strides"),
        "kernel_sizes": kwargs.get("kernel_sizes"),
        "transpose_forward": plans["transpose_forward"],
    }


def _counting_predictor(device, use_mirroring: bool):
    """nnU-Net's predictor, recording per scan the preprocessed shape, the tiles and the network's seconds."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class CountingPredictor(nnUNetPredictor):
        records: list[dict]

        def _internal_get_sliding_window_slicers(self, image_size):
            slicers = super()._internal_get_sliding_window_slicers(image_size)
            self.records.append({"preprocessed_shape": [int(s) for s in image_size], "tiles": len(slicers)})
            return slicers

        def predict_logits_from_preprocessed_data(self, data):
            start = time.perf_counter()
            logits = super().predict_logits_from_preprocessed_data(data)  # ends on the CPU (synchronised)
            self.records[-1]["network_s"] = time.perf_counter() - start
            return logits

    predictor = CountingPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                  perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                  verbose_preprocessing=False, allow_tqdm=False)
    predictor.records = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return predictor


def _predict(predictor, inputs, out: Path, workers: int) -> dict:
    """One ``predict_from_files`` call; its wall time and per-scan records (checked: every scan written)."""
    predictor.records = []
    count = len(inputs) if isinstance(inputs, list) else len(_scan_files(Path(inputs)))
    memory = _TreeMemory()
    memory.start()
    start = time.perf_counter()
    try:
        predictor.predict_from_files(inputs if isinstance(inputs, list) else str(inputs), str(out),
                                     save_probabilities=False, overwrite=True, num_processes_preprocessing=workers,
                                     num_processes_segmentation_export=workers)
    finally:
        wall = time.perf_counter() - start
        memory.stop()
    written = len(list(out.glob("*.nii.gz")))
    if written != count:
        raise RuntimeError(f"nnU-Net wrote {written} of {count} segmentations into {out}")
    return {"scans": count, "wall_s": wall, "s_per_scan": wall / count, "scans_per_hour": 3600.0 * count / wall,
            "peak_rss_gb": _rss_gb(), "peak_pss_gb_largest_worker": memory.largest_worker_gb,
            "peak_pss_gb_all_processes": memory.total_gb, "per_scan": predictor.records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None,
                        help="predict this folder of *_0000.nii.gz scans (default: generate --scans synthetic scans)")
    parser.add_argument("--scans", type=int, default=10, help="synthetic scans to generate (without --folder)")
    parser.add_argument("--small", action="store_true", help="the small synthetic grid instead of 512×512 (quick check)")
    parser.add_argument("--seed", type=int, default=3, help="synthetic dataset seed (bench_predict.py's default)")
    parser.add_argument("--index", type=int, default=0, help="first synthetic case index")
    parser.add_argument("--train-cases", type=int, default=3,
                        help="scans (the folder's first) that make nnU-Net's raw dataset for fingerprint and plans")
    parser.add_argument("--planner", choices=PLANNERS, default="ExperimentPlanner",
                        help="nnU-Net experiment planner (default: the classic one, PlainConvUNet)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="the planner's GPU memory target (default: the planner's own, 8 GB for ExperimentPlanner)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the process that runs the network")
    parser.add_argument("--workers", type=int, default=2,
                        help="-np: processes for preprocessing and for export (nnUNetv2_predict's -npp and -nps)")
    parser.add_argument("--disable-tta", action="store_true", help="no test-time mirroring (nnUNetv2_predict's flag)")
    parser.add_argument("--no-single", action="store_true", help="skip the one-scan call (first-scan latency)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder, kept at the end (default: a new temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder (scans, nnU-Net folders, "
                        "predictions)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.folder is None and args.scans < 1:
        parser.error("--scans must be at least 1")

    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet_peer_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(work / name)  # before nnunetv2 is imported; the worker processes inherit them

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raw = work / "nnUNet_raw" / DATASET_NAME
    if raw.exists():
        shutil.rmtree(raw)
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        shutil.rmtree(work / name / DATASET_NAME, ignore_errors=True)
    train_images, train_labels = raw / "imagesTr", raw / "labelsTr"
    train_images.mkdir(parents=True)
    train_labels.mkdir(parents=True)

    start = time.perf_counter()
    if args.folder is not None:
        folder = args.folder
        scans = _scan_files(folder)
        if not scans:
            parser.error(f"no *_0000.nii.gz scans in {folder}")
        take_training_cases(scans[: args.train_cases], train_images, train_labels)
        print(f"folder {folder}: {len(scans)} scans; the first {min(args.train_cases, len(scans))} labelled HU > 0 "
              "for nnU-Net's fingerprint and plans")
    else:
        folder = work / "scans"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        print(f"generating {args.scans} {'small' if args.small else 'full-size'} synthetic scans (seed {args.seed}, "
              f"cases {args.index}-{args.index + args.scans - 1}) into {folder}", flush=True)
        make_scans(folder, args.scans, args.seed, args.index, args.small, args.train_cases, train_images, train_labels)
        scans = _scan_files(folder)
        print(f"generated in {time.perf_counter() - start:.0f} s")

    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(raw), {0: "CT"}, {"background": 0, "lesion": 1},
                          len(list(train_images.glob("*.nii.gz"))), ".nii.gz", dataset_name=DATASET_NAME,
                          description="dscovid synthetic chest CTs, for timing nnU-Net's predictor",
                          converted_by="benchmarks/bench_peer_nnunet.py", license="Apache-2.0")
    start = time.perf_counter()
    model_dir = build_model(work, args.planner, args.gpu_memory_gb, args.workers, args.seed)
    plans = _plans_summary(model_dir)
    print(f"\nnnU-Net model folder (random weights) {model_dir}, fingerprint + plans + checkpoint in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"plans {plans['plans_name']} ({', '.join(plans['configurations_planned'])}); {CONFIGURATION}: patch "
          f"{plans['patch_size']} at spacing {np.round(plans['spacing'], 3).tolist()} mm (median image "
          f"{plans['median_image_size_in_voxels']}), batch {plans['batch_size']}, {plans['network']} with "
          f"{plans['n_stages']} stages {plans['features_per_stage']}", flush=True)

    predictor = _counting_predictor(device, use_mirroring=not args.disable_tta)
    start = time.perf_counter()
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    load_s = time.perf_counter() - start
    mirror_axes = predictor.allowed_mirroring_axes if not args.disable_tta else None
    evaluations = 2 ** len(mirror_axes) if mirror_axes else 1

    single = None
    if not args.no_single:
        single = _predict(predictor, [[str(scans[0])]], work / "out_single", args.workers)
    gpu_single = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    folder_run = _predict(predictor, folder, work / "out_folder", args.workers)
    folder_run["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    tiles = [r["tiles"] for r in folder_run["per_scan"]]
    network = [r["network_s"] for r in folder_run["per_scan"]]
    result = {
        "peer": "nnunetv2 " + _version("nnunetv2"),
        "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "threads": args.threads,
        "workers": args.workers,
        "tile_step_size": 0.5,
        "mirror_axes": list(mirror_axes) if mirror_axes else None,
        "network_evaluations_per_tile": evaluations,
        "small": bool(args.small) if args.folder is None else None,
        "folder": str(args.folder) if args.folder is not None else None,
        "planner": args.planner,
        "plans": plans,
        "model_load_s": load_s,
        "single": single,
        "peak_gpu_gb_single": gpu_single if single else None,
        "folder_run": folder_run,
        "tiles_per_scan_mean": float(np.mean(tiles)) if tiles else None,
        "network_s_per_scan_mean": float(np.mean(network)) if network else None,
    }

    print(f"\n== nnU-Net {result['peer'].split()[-1]} predictor, {CONFIGURATION}, on {result['device']}: "
          f"{args.threads} torch threads, -np {args.workers}, step 0.5, mirroring "
          f"{result['mirror_axes'] or 'off'} ({evaluations} network evaluations per tile); model loaded in {load_s:.1f} s")
    if single:
        r = single["per_scan"][0]
        print(f"one scan alone: {single['wall_s']:.1f} s (network {r['network_s']:.1f} s for {r['tiles']} tiles over "
              f"{r['preprocessed_shape']}); peak CPU resident {single['peak_rss_gb']:.2f} GB (PSS: largest worker "
              f"{single['peak_pss_gb_largest_worker']:.2f} GB, all processes {single['peak_pss_gb_all_processes']:.2f} GB)"
              + (f", GPU allocated {gpu_single:.2f} GB" if gpu_single is not None else ""))
    f = folder_run
    print(f"folder of {f['scans']} scans, -np {args.workers}: {f['wall_s']:.1f} s, {f['s_per_scan']:.2f} s per scan, "
          f"{f['scans_per_hour']:.0f} scans per hour; tiles per scan {min(tiles)}-{max(tiles)} (mean "
          f"{np.mean(tiles):.0f}), network {np.mean(network):.1f} s per scan; peak CPU resident {f['peak_rss_gb']:.2f} GB "
          f"(PSS: largest worker {f['peak_pss_gb_largest_worker']:.2f} GB, all processes "
          f"{f['peak_pss_gb_all_processes']:.2f} GB)"
          + (f", GPU allocated {f['peak_gpu_gb']:.2f} GB" if f["peak_gpu_gb"] is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.keep or args.work is not None:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
