"""Where one case's export goes with a trained model: the whole export, each of its parts, and the lung mask.

The export measures the lesions the network marks (the lesion report) and writes them with the evidence map, so its
time depends on the weights; ``bench_predict.py`` with random weights marks litres of lesion. This script takes a
trained model (``--model``, a ``<Trainer>__<configuration>`` folder such as the demo's), predicts one full-size
synthetic scan of ``bench_predict.py``'s seed (``--index``: case 0 is the benchmark scan, without lesions; case 1 is
COVID-19) up to the network once, then times, ``--repeats`` times each in this process:

* ``export_case`` as the predictor calls it (files written to a temporary folder, three threads);
* its parts one at a time: the evidence map resampled, quantised and written; the lesion probability and the
  network's region resampled to the scan; the mask written; the lesion report;
* the classical lung mask of the same scan (``segment_lung_sides``), the preprocessing's largest part.

Every repeat is printed, since this machine's spread between repeats is as large as most changes to one part;
compare two versions of the code by running the script for each, interleaved, on an idle machine.

    python benchmarks/bench_export_parts.py \\
        --model dscovid_demo/results/Dataset001_Synthetic/DeepSCCOVIDTrainer__3d_cpu --index 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _repeat(function: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a trained <Trainer>__<configuration> folder")
    parser.add_argument("--index", type=int, default=1, help="case of bench_predict.py's seed (1: COVID-19)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench_predict import benchmark_case

    from dscovid.errors import DscovidError
    from dscovid.inference.engine import run_networks
    from dscovid.inference.model_loading import load_trained_model
    from dscovid.io.image_io import read_mask, write_image
    from dscovid.io.scans import Scan
    from dscovid.prediction import export
    from dscovid.prediction.inputs import load_case
    from dscovid.prediction.lesion_report import lesion_report
    from dscovid.prediction.output_folder import output_files
    from dscovid.preprocessing.lung import segment_lung_sides
    from dscovid.preprocessing.preprocessor import original_crop_slices, restore_crop

    work = Path(tempfile.mkdtemp(prefix="dscovid_bench_export_parts_"))
    try:
        case = benchmark_case(args.seed, args.index)
        scan = work / "bench_0000.nii.gz"
        write_image(case.image_hu, case.geometry, scan)
        reference_ml = float(np.count_nonzero(case.lesion)) * float(np.prod(case.geometry.spacing_zyx_mm)) / 1000.0
        del case
        try:
            model = load_trained_model(args.model)
        except DscovidError as error:
            raise SystemExit(f"--model {args.model}: {error}") from None
        loaded = load_case(Scan("bench", scan), model.preprocessing)
        start = time.perf_counter()
        output = run_networks(model, loaded.image, loaded.region_preprocessed, loaded.cls_image)
        network_s = time.perf_counter() - start
        names = list(model.class_names)
        entry = export.export_case(loaded, output, work / "out", names)  # also the warm-up
        properties, geometry = loaded.properties, loaded.geometry
        box = original_crop_slices(properties)
        # The mask the export wrote (thresholded, limited to the lung and its margin): what the report measures.
        lesion, _ = read_mask(work / "out" / output_files("bench")["mask"], geometry)
        lung = np.maximum(loaded.lung, lesion)
        print(f"scan {geometry.shape_zyx}, case {args.index} of seed {args.seed}: the model marks "
              f"{entry['lesion_volume_ml']:.0f} ml of lesion (reference {reference_ml:.0f} ml), calls it "
              f"{entry['predicted_class']}; network {network_s:.2f} s (once); {args.threads} threads")
        rows = {
            "export_case (the predictor's export)": lambda: export.export_case(loaded, output, work / "out", names),
            "evidence map: resample, quantise, write": lambda: export._write_evidence(
                output.evidence, properties, geometry, work / "evidence.nii.gz", None),
            "lesion probability resampled and thresholded": lambda: restore_crop(
                output.lesion_probability, properties, export.LESION_THRESHOLD),
            "network region resampled": lambda: restore_crop(loaded.region_preprocessed, properties, 0.5),
            "mask written": lambda: write_image(lesion, geometry, work / "mask.nii.gz"),
            "lesion report": lambda: lesion_report(loaded.image_hu, lesion, lung, geometry, box=box),
            "lung mask (preprocessing)": lambda: segment_lung_sides(loaded.image_hu, geometry.spacing_zyx_mm,
                                                                    geometry.direction),
        }
        print("\n| part | median s | every repeat |\n|---|---|---|")
        for label, function in rows.items():
            seconds = _repeat(function, args.repeats)
            print(f"| {label} | {statistics.median(seconds):.2f} | {' '.join(f'{s:.2f}' for s in seconds)} |",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
