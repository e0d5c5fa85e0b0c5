"""Time dscovid_predict on a full-size synthetic chest CT, and its sliding window against MONAI's.

For each configuration (3d_paper, 3d_cpu): plan it from the scan's own fingerprint, save a randomly initialised
fold (the network's time does not depend on the weights), predict the scan with ``predict_cases`` and print seconds
per scan split into read / preprocess / network / export, the peak memory (CPU resident, and GPU allocated on CUDA), and
the network's achieved GFLOP/s against a plain matrix product on the same device. Then the same lesion branch is run
through MONAI's ``sliding_window_inference`` (same patch, step, batch and precision, the cross-stitch fed the same
way) over (a) the preprocessed lung box and (b) the whole scan resampled to the target spacing, as a MONAI pipeline
without lung cropping would; our lung-restricted run is compared with both.

Each configuration runs in its own process so that the peak memory of one is not that of another (or of the
synthetic scan's generation).

    python benchmarks/bench_predict.py                                  # both configurations, CUDA if available
    python benchmarks/bench_predict.py --configurations 3d_cpu --device cpu
    python benchmarks/bench_predict.py --configurations 3d_cpu --device cpu --no-peers --scans 20 --workers 2
    python benchmarks/bench_predict.py --configurations 3d_cpu --device cpu --no-peers --slices 400   # peak RAM

The export's time does depend on them: it measures the lesions the network marks, and random weights mark several
litres. ``--model DIR`` times a trained model instead (a ``<Trainer>__<configuration>`` folder, e.g. the demo's),
on its own plans; ``--index`` picks a scan with lesions (the seed's case 0 has none, case 1 is COVID-19).

    python benchmarks/bench_predict.py --model dscovid_demo/results/Dataset001_Synthetic/DeepSCCOVIDTrainer__3d_cpu \
        --device cpu --no-peers --index 1

``--scans N`` also predicts a folder of N scans (the same seed's next cases) in one call with ``--workers``
reading and preprocessing ahead, and prints seconds per scan and scans per hour (throughput); ``--no-peers`` leaves
out the MONAI runs (for a configuration whose whole-scan MONAI run would take minutes on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rss_gb() -> float:
    """This process's own peak resident memory in GiB.

    Linux's ``VmHWM`` (the process image's high-water mark), not ``ru_maxrss``: a spawned child's ``ru_maxrss``
    starts at its parent's peak (it survives the fork and the exec), here the parent that generated the scan.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fingerprint(case) -> dict:
    """The pooled fingerprint the planner needs, from the one scan (its spacing and lung box)."""
    spacing = [float(v) for v in case.geometry.spacing_zyx_mm]
    nonzero = np.nonzero(case.lung)
    box = [int(a.max() - a.min() + 1) for a in nonzero]
    box_mm = [b * s for b, s in zip(box, spacing)]
    return {
        "pooled": {
            "median_lung_box_mm_zyx": box_mm,
            "class_counts": {"covid": 1, "cap": 1, "non_pneumonia": 1},
            "median_spacing_zyx_mm": spacing,
            "median_shape_zyx": list(case.geometry.shape_zyx),
            "num_cases": 3,
            "spacings_zyx_mm": [spacing] * 3,
            "lung_box_shapes_zyx": [box] * 3,
        }
    }


def _matmul_gflops(device: torch.device) -> float:
    """Achieved GFLOP/s of a large matrix product in the precision the predictor uses there."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    repeats = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _segment_flops(network, patch, device, i_cls, shape) -> float:
    """FLOPs of the lesion branch on one patch (convolutions and matrix products, multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    cross = network.uses_cross_stitch
    patch_t = torch.zeros((1, 1, *patch), device=device)
    box = torch.tensor([[(0, 0, 0), patch]])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network.segment_patches(patch_t, box if cross else None, shape if cross else None, i_cls if cross else None)
    return float(counter.get_total_flops())


def _scan_shape(scan: str) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(scan)
    reader.ReadImageInformation()
    return tuple(reversed(reader.GetSize()))


def benchmark_case(seed: int, index: int, full_size: bool = True, slices: int | None = None):
    """The benchmark's phantom, cropped or edge-padded to ``slices`` slices (the peak memory of a longer scan)."""
    from dataset_conversion.synthetic import generate_case
    from dscovid.io.image_io import Geometry

    case = generate_case(seed, index, full_size=full_size)
    if slices:
        from bench_dicom_export import fit_slices

        image = fit_slices(case.image_hu, slices)
        geometry = Geometry(image.shape, case.geometry.spacing_zyx_mm, case.geometry.origin_xyz_mm,
                            case.geometry.direction)
        case = dataclasses.replace(case, image_hu=image, lung=fit_slices(case.lung, slices), geometry=geometry)
    return case


def _run_configuration(args: dict, queue) -> None:
    from untrained_model import save_untrained_model

    from dscovid.inference.model_loading import load_trained_model
    from dscovid.inference.sliding_window import plan_tiles, sliding_window_predict
    from dscovid.io.scans import Scan
    from dscovid.model.precision import autocast
    from dscovid.planning.planner import plan_experiment
    from dscovid.prediction.inputs import load_case
    from dscovid.prediction.predict import predict_cases
    from dscovid.preprocessing.resampling import resample_image, shape_for_spacing

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    work = Path(args["work"])
    name = args["configuration"]
    if args["model"]:
        model_dir = Path(args["model"])
    else:
        plans = plan_experiment(args["fingerprint"], "Dataset990_Bench", ["covid", "cap", "non_pneumonia"], [name])
        model_dir = save_untrained_model(work / "results", plans, name)
    model = load_trained_model(model_dir, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = predict_cases(
        model=model,
        inputs=args["scan"],
        output_dir=work / f"out_{name}",
        device=device,
        step_fraction=args["step"],
        progress=False,
        overwrite=True,
        mirroring=args["mirroring"],
        batch_size=args["tile_batch"],
        tile_placement=args["placement"],
    )
    wall = time.perf_counter() - start
    rss_predict = _rss_gb()
    gpu_predict = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if summary["failed"]:
        raise RuntimeError(f"prediction failed: {summary['failed']}")
    entry = summary["cases"][0]
    folder = None
    if args["folder"]:
        # Throughput: a folder of scans in one call, reading and preprocessing the next scans in ``workers``
        # processes while the network and the export run the current one.
        count = len(list(Path(args["folder"]).glob("*_0000.nii.gz")))
        start = time.perf_counter()
        folder_summary = predict_cases(model=model, inputs=args["folder"], output_dir=work / f"out_folder_{name}",
                                       device=device, step_fraction=args["step"], progress=False, overwrite=True,
                                       num_workers=args["workers"], mirroring=args["mirroring"],
                                       batch_size=args["tile_batch"], tile_placement=args["placement"])
        seconds = time.perf_counter() - start
        if folder_summary["failed"]:
            raise RuntimeError(f"prediction failed: {folder_summary['failed']}")
        folder = {"scans": count, "workers": args["workers"], "wall_s": seconds, "s_per_scan": seconds / count,
                  "scans_per_hour": 3600.0 * count / seconds, "peak_rss_gb": _rss_gb()}
    if not args["peers"]:
        queue.put({"configuration": name, "device": str(device), "precision": summary["precision"],
                   "mirror_axes": summary["mirror_axes"], "scan_shape_zyx": list(_scan_shape(args["scan"])),
                   "timing_s": entry["timing_s"], "wall_s": wall, "tiles": entry["tiles"], "tile_batch": args["tile_batch"],
                   "lesion_volume_ml": entry["lesion_volume_ml"], "trained": bool(args["model"]),
                   "tile_placement": summary.get("tile_placement", model.inference.tile_placement),
                   "peak_rss_gb_predict": rss_predict, "peak_gpu_gb_predict": gpu_predict, "folder": folder})
        return

    # The lesion branch alone: ours over the lung tiles, MONAI over the lung box and over the whole scan (MONAI is
    # imported only here, so the peak memory of a run without the peers is the predictor's).
    from monai.inferers import sliding_window_inference

    loaded = load_case(Scan("bench", Path(args["scan"])), model.preprocessing)
    network = model.networks[0]
    patch = model.patch_size_zyx
    settings = model.inference
    step = args["step"] or settings.step_fraction
    batch = settings.batch_size
    cls_t = torch.from_numpy(loaded.cls_image)[None, None].to(device)
    with torch.no_grad(), autocast(device):
        i_cls = network.encode_classification(cls_t)
    volume = torch.from_numpy(loaded.image)[None].to(device)

    def ours_fn(x, boxes, shape=tuple(loaded.image.shape)):
        with autocast(device):
            return network.segment_patches(x, boxes, shape, i_cls).lesion_probability.float()

    def monai_fn_for(shape):
        def monai_fn(x, slices):
            boxes = torch.tensor([[[s.start for s in sl[-3:]], list(patch)] for sl in slices])
            with autocast(device):
                return network.segment_patches(x, boxes, shape, i_cls).lesion_probability.float()

        return monai_fn

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))

    out_device = device if device.type == "cuda" else torch.device("cpu")
    lung = loaded.region_preprocessed != 0
    placement = args["placement"] or settings.tile_placement
    ours_s, ours_gpu = timed(
        lambda: sliding_window_predict(
            ours_fn, volume, patch, step, "constant", batch, region=lung, device=device, output_device=out_device,
            with_boxes=True, placement=placement,
        )
    )
    box_s, box_gpu = timed(
        lambda: sliding_window_inference(
            volume[None],
            patch,
            batch,
            monai_fn_for(tuple(volume.shape[1:])),
            overlap=1 - step,
            mode="constant",
            sw_device=device,
            device=out_device,
            with_coord=True,
        )
    )
    # The whole scan at the target spacing (no lung crop), windowed as in preprocessing.
    preprocessing = model.preprocessing.preprocessing
    low, high = preprocessing.hu_window
    whole = (np.clip(loaded.image_hu.astype(np.float32), low, high) - low) / (high - low)
    canonical_spacing = loaded.properties["canonical_geometry"]["spacing_zyx_mm"]
    whole = resample_image(whole, shape_for_spacing(whole.shape, canonical_spacing, preprocessing.target_spacing_zyx_mm))
    whole_t = torch.from_numpy(whole)[None].to(device)
    whole_s, whole_gpu = timed(
        lambda: sliding_window_inference(
            whole_t[None],
            patch,
            batch,
            monai_fn_for(tuple(whole_t.shape[1:])),
            overlap=1 - step,
            mode="constant",
            sw_device=device,
            device=out_device,
            with_coord=True,
        )
    )

    flops_patch = _segment_flops(network, patch, device, i_cls, tuple(loaded.image.shape))
    tiles_run = len(plan_tiles(loaded.image.shape, patch, step, lung, placement))
    queue.put(
        {
            "configuration": name,
            "device": str(device),
            "precision": summary["precision"],
            "mirror_axes": summary["mirror_axes"],
            "scan_shape_zyx": list(loaded.image_hu.shape),
            "preprocessed_shape_zyx": list(loaded.image.shape),
            "whole_scan_at_target_spacing_zyx": list(whole.shape),
            "patch_zyx": list(patch),
            "step_fraction": step,
            "timing_s": entry["timing_s"],
            "wall_s": wall,
            "folder": folder,
            "tiles": entry["tiles"],
            "tile_placement": placement,
            "tiles_lesion_branch": tiles_run,
            "tiles_grid_over_lung": len(plan_tiles(loaded.image.shape, patch, step, lung)),
            "tiles_whole_scan": len(plan_tiles(whole.shape, patch, step)),
            "peak_rss_gb_predict": rss_predict,
            "peak_rss_gb_all": _rss_gb(),
            "peak_gpu_gb_predict": gpu_predict,
            "segment_gflop_per_patch": flops_patch / 1e9,
            "segment_gflops_achieved": flops_patch * tiles_run / ours_s / 1e9,
            "matmul_gflops": _matmul_gflops(device),
            "lesion_branch_s": {"dscovid_lung_tiles": ours_s, "monai_lung_box": box_s, "monai_whole_scan": whole_s},
            "lesion_branch_peak_gpu_gb": {
                "dscovid_lung_tiles": ours_gpu,
                "monai_lung_box": box_gpu,
                "monai_whole_scan": whole_gpu,
            },
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", nargs="+", default=["3d_paper", "3d_cpu"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="the small grid instead of 512×512 (quick check)")
    parser.add_argument("--step", type=float, default=None, help="sliding-window step (default: the plans')")
    parser.add_argument("--disable-tta", action="store_true", help="no test-time mirroring (dscovid_predict's flag)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--slices", type=int, default=None,
                        help="crop or edge-pad the scan to this many slices (e.g. 400: peak memory of a long scan)")
    parser.add_argument("--scans", type=int, default=1,
                        help="also predict a folder of this many scans in one call (throughput)")
    parser.add_argument("--workers", type=int, default=1, help="-np of the folder run (reading and preprocessing)")
    parser.add_argument("--tile-batch", type=int, default=None,
                        help="sliding-window tiles per network call (default: the predictor's choice for the device)")
    parser.add_argument("--tile-placement", default=None, choices=("grid", "region", "region_sized"),
                        help="sliding-window tile placement (dscovid_predict's flag; default: the plans')")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained model folder (<Trainer>__<configuration>) instead of a randomly initialised "
                             "one planned from the scan; --configurations is then that model's")
    parser.add_argument("--no-peers", action="store_true",
                        help="only the predictor's own timing (not the lesion branch beside MONAI)")
    args = parser.parse_args(argv)
    if args.model is not None:
        if not (args.model / "plans.json").is_file() or "__" not in args.model.name:
            parser.error(f"--model {args.model}: not a trained model folder (<Trainer>__<configuration> with plans.json)")
        args.configurations = [args.model.name.rsplit("__", 1)[1]]

    from dataset_conversion.synthetic import generate_case
    from dscovid.io.image_io import write_image

    work = Path(tempfile.mkdtemp(prefix="dscovid_bench_"))
    start = time.perf_counter()
    case = benchmark_case(args.seed, args.index, not args.small, args.slices)
    scan = work / "bench_0000.nii.gz"
    write_image(case.image_hu, case.geometry, scan)
    print(
        f"synthetic scan {case.geometry.shape_zyx} at {np.round(case.geometry.spacing_zyx_mm, 3)} mm "
        f"({case.class_name}), generated in {time.perf_counter() - start:.0f} s; device {args.device}"
    )
    fingerprint = _fingerprint(case)
    del case
    folder = None
    if args.scans > 1:
        folder = work / "folder"
        start = time.perf_counter()
        for index in range(args.scans):
            other = generate_case(args.seed, args.index + index, full_size=not args.small)
            write_image(other.image_hu, other.geometry, folder / f"bench{index:03d}_0000.nii.gz")
        print(f"a folder of {args.scans} scans (the seed's cases {args.index}-{args.index + args.scans - 1}), "
              f"generated in {time.perf_counter() - start:.0f} s")
        del other

    context = multiprocessing.get_context("spawn")
    results = []
    for name in args.configurations:
        queue = context.Queue()
        job = {
            "configuration": name,
            "device": args.device,
            "threads": args.threads,
            "work": str(work),
            "scan": str(scan),
            "fingerprint": fingerprint,
            "step": args.step,
            "mirroring": not args.disable_tta,
            "peers": not args.no_peers,
            "folder": str(folder) if folder else None,
            "workers": args.workers,
            "tile_batch": args.tile_batch,
            "placement": args.tile_placement,
            "model": str(args.model) if args.model else None,
        }
        process = context.Process(target=_run_configuration, args=(job, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"{name}: failed (exit {process.exitcode})")
            continue
        results.append(queue.get())

    for r in results:
        t = r["timing_s"]
        print(f"\n== {r['configuration']} on {r['device']} ({r.get('precision')}, mirror axes {r.get('mirror_axes')}): "
              f"scan {r['scan_shape_zyx']}, {r['tiles']['run']} tiles ({r.get('tile_placement')} placement)")
        print(
            f"seconds per scan: read {t['read']:.2f}  preprocess {t['preprocess']:.2f}  network {t['network']:.2f}"
            f"  export {t['export']:.2f}  (wall {r['wall_s']:.2f}); peak CPU resident {r['peak_rss_gb_predict']:.2f} GB"
        )
        if "lesion_volume_ml" in r:
            weights = "trained" if r["trained"] else "random"
            print(f"the network ({weights} weights) marked {r['lesion_volume_ml']:.0f} ml of lesion (the export measures it)")
        if r.get("folder"):
            f = r["folder"]
            print(f"folder of {f['scans']} scans, -np {f['workers']}: {f['wall_s']:.1f} s, {f['s_per_scan']:.2f} s per "
                  f"scan, {f['scans_per_hour']:.0f} scans per hour, peak CPU resident {f['peak_rss_gb']:.2f} GB")
        if "lesion_branch_s" not in r:
            continue
        lb = r["lesion_branch_s"]
        print(f"preprocessed {r['preprocessed_shape_zyx']}, patch {r['patch_zyx']}, step {r['step_fraction']}")
        print(
            f"peak memory: CPU resident {r['peak_rss_gb_predict']:.2f} GB during prediction "
            f"({r['peak_rss_gb_all']:.2f} GB with the MONAI runs), GPU allocated {r['peak_gpu_gb_predict']:.2f} GB"
        )
        print(
            f"lesion branch: {r['segment_gflop_per_patch']:.1f} GFLOP per patch, achieved "
            f"{r['segment_gflops_achieved']:.0f} GFLOP/s vs matmul {r['matmul_gflops']:.0f} GFLOP/s "
            f"({100 * r['segment_gflops_achieved'] / r['matmul_gflops']:.1f} %)"
        )
        print(
            f"tiles ({r['tile_placement']} placement, step {r['step_fraction']}): {r['tiles_lesion_branch']} over the "
            f"lung ({r['tiles_grid_over_lung']} on the volume grid), {r['tiles']['total']} in the lung box, "
            f"{r['tiles_whole_scan']} over the whole scan"
        )
        print(
            f"lesion branch time: dscovid (lung tiles) {lb['dscovid_lung_tiles']:.2f} s, MONAI lung box "
            f"{lb['monai_lung_box']:.2f} s (ratio {lb['monai_lung_box'] / lb['dscovid_lung_tiles']:.2f}x), "
            f"MONAI whole scan {lb['monai_whole_scan']:.2f} s "
            f"(ratio {lb['monai_whole_scan'] / lb['dscovid_lung_tiles']:.2f}x)"
        )
        gpu = r["lesion_branch_peak_gpu_gb"]
        if r["device"].startswith("cuda"):
            print(
                f"lesion branch peak GPU GB: dscovid {gpu['dscovid_lung_tiles']:.2f}, MONAI lung box "
                f"{gpu['monai_lung_box']:.2f}, MONAI whole scan {gpu['monai_whole_scan']:.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if len(results) == len(args.configurations) else 1


if __name__ == "__main__":
    sys.exit(main())
