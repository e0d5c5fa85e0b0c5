"""Where the memory of one prediction goes: resident memory sampled every 20 ms, labelled with the predictor's phase.

``bench_predict.py`` gives the peak of a whole prediction; this says in which phase (reading and preprocessing,
the network, the export) it is reached and how the memory moves inside the phase, e.g. per sliding-window tile.
The scan is the benchmark's full-size phantom (seed 3, case 0), edge-padded or cropped to ``--slices``, generated in
a separate process so that its generation does not count; the model is randomly initialised (the memory does not
depend on the weights).

    python benchmarks/profile_predict_memory.py --configuration 3d_paper --slices 400 --step 1.0 --disable-tta \\
        --work /tmp/profile --json /tmp/profile/timeline.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The predictor's functions whose calls name a phase.
PHASES = ("load_case", "run_networks", "_timed_export")


def _write_scan(scan: str, fingerprint_file: str, slices: int | None) -> None:
    from bench_predict import _fingerprint, benchmark_case

    from dscovid.io.image_io import write_image

    case = benchmark_case(3, 0, full_size=True, slices=slices)
    write_image(case.image_hu, case.geometry, scan)
    Path(fingerprint_file).write_text(json.dumps(_fingerprint(case)))


def _resident_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configuration", default="3d_paper")
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--step", type=float, default=None)
    parser.add_argument("--disable-tta", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile-batch", type=int, default=None,
                        help="sliding-window tiles per network call (default: the predictor's choice for the device)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None, help="write the timeline (seconds, phase, GB) here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    scan = args.work / f"bench{args.slices or ''}_0000.nii.gz"
    fingerprint_file = args.work / f"fingerprint{args.slices or ''}.json"
    if not scan.exists() or not fingerprint_file.exists():
        writer = multiprocessing.get_context("spawn").Process(target=_write_scan,
                                                              args=(str(scan), str(fingerprint_file), args.slices))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit("generating the scan failed")

    from untrained_model import save_untrained_model

    import dscovid.prediction.predict as predict
    from dscovid.inference.model_loading import load_trained_model
    from dscovid.planning.planner import plan_experiment

    plans = plan_experiment(json.loads(fingerprint_file.read_text()), "Dataset990_Bench",
                            ["covid", "cap", "non_pneumonia"], [args.configuration])
    model = load_trained_model(save_untrained_model(args.work / "results", plans, args.configuration),
                               device=torch.device("cpu"))
    active: list[str] = []

    def labelled(name: str, call):
        def run(*a, **k):
            active.append(name)
            try:
                return call(*a, **k)
            finally:
                active.remove(name)
        return run

    for name in PHASES:
        setattr(predict, name, labelled(name, getattr(predict, name)))

    timeline: list[tuple[float, str, float]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            timeline.append((round(time.perf_counter() - start, 2), "+".join(active) or "other", round(_resident_gb(), 3)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = predict.predict_cases(model=model, inputs=str(scan), output_dir=args.work / "out",
                                    device=torch.device("cpu"), step_fraction=args.step, progress=False,
                                    overwrite=True, mirroring=not args.disable_tta, batch_size=args.tile_batch)
    done.set()
    sampler.join()
    if summary["failed"]:
        raise SystemExit(f"prediction failed: {summary['failed']}")
    entry = summary["cases"][0]
    print(f"{args.configuration}, scan {scan.name}: seconds {entry['timing_s']}, tiles {entry.get('tiles')}")
    print(f"peak resident {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB (the kernel's count)")
    print("| phase | lowest | highest (sampled) |\n|---|---|---|")
    for phase in dict.fromkeys(p for _, p, _ in timeline):
        values = [gb for _, p, gb in timeline if p == phase]
        print(f"| {phase} | {min(values):.2f} GB | {max(values):.2f} GB |")
    if args.json is not None:
        args.json.write_text(json.dumps(timeline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
