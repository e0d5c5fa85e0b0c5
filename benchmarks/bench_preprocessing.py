"""Preprocessing speed and memory on one full-size scan, dscovid against nnU-Net's DefaultPreprocessor.

::

    python benchmarks/bench_preprocessing.py [--work /tmp/dscovid_bench] [--seed 0]
        [--nnunet-python /tmp/nnunet_venv/bin/python] [--spacing Z Y X]

1. Makes one full-size synthetic case (512×512, 200-350 slices; ``dataset_conversion.synthetic``, ``full_size``).
2. Fingerprints and plans it (timed; this makes and caches the lung mask).
3. Preprocesses it with the planned ``3d_paper`` configuration (the data's own spacing) and, with ``--spacing``
   (default 1.5 × 1.0 × 1.0 mm), at a resampled spacing, each in a fresh subprocess: seconds per step, share of each
   step, peak resident memory. Two timings: with the lung mask read from the cache (what ``dscovid_plan_and_preprocess``
   does after the fingerprint) and with the lung segmentation run inside the case.
4. Runs nnU-Net v2's ``DefaultPreprocessor.run_case`` on the same image and label at the same target spacing, in a
   subprocess of a separate virtual environment (``--nnunet-python``; nnunetv2 must not be installed into dscovid's
   environment), with CT normalisation from the same lung HU statistics, and prints both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_DSCOVID_CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
case_dir, plans_file, config, lung_mode, spacing, out_npz = sys.argv[1:7]
import torch
torch.set_num_threads(1)
from dscovid.io.dataset import load_raw_dataset
from dscovid.io.image_io import read_image, read_mask
from dscovid.plans.configuration import Configuration
from dscovid.preprocessing.lung_cache import save_npz_atomic, segment_and_cache
from dscovid.preprocessing.preprocessor import preprocess_image
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
plans = json.loads(Path(plans_file).read_text(encoding="utf-8"))
data = plans["configurations"][config]
if spacing != "planned":
    data["preprocessing"]["target_spacing_zyx_mm"] = [float(v) for v in spacing.split(",")]
configuration = Configuration.from_dict(config, data)
dataset = load_raw_dataset(case_dir)
case = dataset.cases()[0]
timing, memory = {}, {"start": rss_mb()}
t0 = time.perf_counter()
image, geometry = read_image(case.image)
lesion = read_mask(case.label, reference=geometry)[0]
timing["read"] = time.perf_counter() - t0; memory["read"] = rss_mb()
t0 = time.perf_counter()
cache = Path(plans_file).parent / "lung_masks" if lung_mode == "cache" else None
if lung_mode == "segment":
    from dscovid.preprocessing.lung import segment_lungs
    lung = np.asarray(segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction), dtype=np.uint8)
else:
    lung = segment_and_cache(case, image, geometry, cache)
timing["lung_mask"] = time.perf_counter() - t0; memory["lung_mask"] = rss_mb()
arrays, properties = preprocess_image(image, geometry, configuration, lung=lung, lesion=lesion, case_name=case.name)
timing.update(properties["timing_s"]); memory["preprocess"] = rss_mb()
t0 = time.perf_counter()
save_npz_atomic(Path(out_npz), **arrays)
timing["write"] = time.perf_counter() - t0; memory["write"] = rss_mb()
print(json.dumps({"timing_s": timing, "peak_rss_mb": rss_mb(), "rss_after_step_mb": memory,
                  "shape_in": list(geometry.shape_zyx), "spacing_in": list(geometry.spacing_zyx_mm),
                  "shape_out": properties["shape_after_resampling_zyx"]}))
"""

_NNUNET_CHILD = r"""
import json, resource, sys, time
image_file, seg_file, spacing, hu_json = sys.argv[1:5]
import torch
torch.set_num_threads(1)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
spacing = [float(v) for v in spacing.split(",")]
hu = json.loads(hu_json)
plans = {
    "dataset_name": "Dataset990_BenchFull", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": spacing, "original_median_shape_after_transp": [300, 512, 512],
    "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": hu},
    "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [128, 128, 128], "median_image_size_in_voxels": [300, 512, 512],
        "spacing": spacing, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {}, "_kw_requires_import": []},
        "batch_dice": False}},
}
dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
                "file_ending": ".nii.gz"}
manager = PlansManager(plans)
preprocessor = DefaultPreprocessor(verbose=False)
t0 = time.perf_counter()
data, seg, properties = preprocessor.run_case([image_file], seg_file, manager,
                                              manager.get_configuration("3d_fullres"), dataset_json)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape_out": list(data.shape[1:])}))
"""


def _run_child(python: str, code: str, args: list[str]) -> dict:
    result = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(title: str, report: dict) -> str:
    timing = report["timing_s"]
    total = sum(timing.values())
    lines = [f"{title}: {total:.2f} s per case, peak RSS {report['peak_rss_mb']:.0f} MB, "
             f"{report['shape_in']} -> {report['shape_out']}"]
    for step, seconds in timing.items():
        lines.append(f"    {step:<22s} {seconds:8.3f} s  {100 * seconds / total:5.1f} %")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dscovid_bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nnunet-python", default="/tmp/nnunet_venv/bin/python")
    parser.add_argument("--spacing", nargs=3, type=float, default=[1.5, 1.0, 1.0], metavar=("Z", "Y", "X"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from dataset_conversion.synthetic import generate_dataset
    from dscovid.fingerprint.extractor import extract_fingerprint
    from dscovid.io.dataset import load_raw_dataset, write_json_atomic
    from dscovid.planning.planner import plan_experiment

    work = Path(args.work)
    raw = work / "raw" / "Dataset990_BenchFull"
    if not (raw / "dataset.json").exists():
        start = time.perf_counter()
        generate_dataset(raw, 1, seed=args.seed, full_size=True)
        print(f"full-size synthetic case generated in {time.perf_counter() - start:.1f} s")
    dataset = load_raw_dataset(raw)
    case = dataset.cases()[0]
    pre = work / "preprocessed" / raw.name
    start = time.perf_counter()
    fingerprint = extract_fingerprint(dataset, pre, progress=False)
    fingerprint_seconds = time.perf_counter() - start
    plans = plan_experiment(fingerprint, raw.name, dataset.class_names, ["3d_paper"])
    plans_file = write_json_atomic(plans, pre / "plans.json")
    entry = fingerprint["cases"][case.name]
    print(f"case {case.name}: shape {entry['shape_zyx']}, spacing {[round(v, 3) for v in entry['spacing_zyx_mm']]} mm; "
          f"fingerprint (lung segmentation + findings) {fingerprint_seconds:.1f} s")

    spacings = [("planned", "3d_paper at the data's spacing"),
                (",".join(str(v) for v in args.spacing), f"3d_paper resampled to {args.spacing} mm")]
    results = {}
    for index, (spacing, label) in enumerate(spacings):
        # The lung segmentation costs the same at any target spacing: timed once.
        for lung_mode in ("cache", "segment") if index == 0 else ("cache",):
            report = _run_child(sys.executable, _DSCOVID_CHILD,
                                [str(raw), str(plans_file), "3d_paper", lung_mode, spacing, str(work / "out.npz")])
            results[(spacing, lung_mode)] = report
            print(_table(f"dscovid, {label}, lung mask {'from cache' if lung_mode == 'cache' else 'segmented'}",
                         report))
    hu = fingerprint["pooled"]["hu_lung"]
    hu_props = {"mean": hu["mean"], "std": hu["std"], "median": hu["median"], "min": hu["min"], "max": hu["max"],
                "percentile_00_5": hu["percentile_00_5"], "percentile_99_5": hu["percentile_99_5"]}
    if not Path(args.nnunet_python).exists() or subprocess.run(
            [args.nnunet_python, "-c", "import nnunetv2"], capture_output=True).returncode != 0:
        print(f"nnU-Net comparison skipped: no nnunetv2 in {args.nnunet_python} (make a separate venv with nnunetv2)")
        return
    target = [str(v) for v in plans["configurations"]["3d_paper"]["preprocessing"]["target_spacing_zyx_mm"]]
    for spacing, label in spacings:
        spacing_text = ",".join(target) if spacing == "planned" else spacing
        report = _run_child(args.nnunet_python, _NNUNET_CHILD,
                            [str(case.image), str(case.label), spacing_text, json.dumps(hu_props)])
        ours = results[(spacing, "cache")]
        # Like for like: nnU-Net's run_case reads the image and label and preprocesses; it neither reads a lung
        # mask nor writes, and it works on the whole field of view (its crop to non-zero keeps the air).
        ours_comparable = sum(v for k, v in ours["timing_s"].items() if k not in ("lung_mask", "write"))
        print(f"nnU-Net DefaultPreprocessor.run_case, {label}: {report['seconds']:.2f} s (read, crop to non-zero, "
              f"normalise, resample, class locations), peak RSS {report['peak_rss_mb']:.0f} MB, "
              f"shape {report['shape_out']}")
        print(f"    dscovid read + preprocess {ours_comparable:.2f} s (with cached lung mask and write "
              f"{sum(ours['timing_s'].values()):.2f} s): nnU-Net / dscovid = {report['seconds'] / ours_comparable:.1f}x "
              f"time, {report['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x peak memory")

if __name__ == "__main__":
    main()
