"""Our sliding-window engine against MONAI's ``sliding_window_inference``: time and peak memory.

Both run the same small random 3×3×3 conv net over the same volume with the same tiles (constant
weighting, same overlap and batch size); the outputs are checked to agree. Each engine runs in its own
process so that the peak resident memory (CPU) of one does not hide the other's; on CUDA the peak
allocated GPU memory is reported as well.

    python benchmarks/bench_sliding_window.py                        # CPU, (96, 256, 256), patch (24, 128, 128)
    python benchmarks/bench_sliding_window.py --device cuda --shape 400 512 512 --patch 24 256 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time

import torch


def _net(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(channels, channels, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(channels, 1, 3, padding=1),
        torch.nn.Sigmoid(),
    ).eval()


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run(engine: str, args: argparse.Namespace, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = _net(args.channels).to(device)
    image = torch.rand((1,) + tuple(args.shape), generator=torch.Generator().manual_seed(1))
    from monai.inferers import sliding_window_inference

    from dscovid.inference.sliding_window import sliding_window_predict

    def infer(volume: torch.Tensor) -> torch.Tensor:
        if engine == "dscovid":
            return sliding_window_predict(
                net, volume, args.patch, step_fraction=args.step, weighting="constant",
                batch_size=args.batch, device=device, output_device="cpu",
            )
        with torch.no_grad():
            return sliding_window_inference(
                volume[None], roi_size=args.patch, sw_batch_size=args.batch, predictor=net,
                overlap=1.0 - args.step, mode="constant", sw_device=device, device="cpu",
            )[0]

    infer(image[:, : args.patch[0], : args.patch[1], : args.patch[2]])  # warm-up: kernels, lazy imports
    before_mb = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        output = infer(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    checksum = (float(output.double().sum()), float(output[0, ::7, ::13, ::11].double().sum()))
    queue.put({"seconds": min(times), "extra_rss_mb": _rss_mb() - before_mb, "gpu_mb": gpu_mb, "checksum": checksum})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--patch", type=int, nargs=3, default=[24, 128, 128], metavar=("PZ", "PY", "PX"))
    parser.add_argument("--step", type=float, default=0.5, help="step fraction (MONAI overlap = 1 - step)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    results = {}
    for engine in ("dscovid", "monai"):
        queue = context.Queue()
        process = context.Process(target=_run, args=(engine, args, queue))
        process.start()
        results[engine] = queue.get()
        process.join()

    image_mb = 4 * args.shape[0] * args.shape[1] * args.shape[2] / 2**20
    print(f"volume {tuple(args.shape)} (float32 {image_mb:.0f} MB), patch {tuple(args.patch)}, step {args.step}, "
          f"batch {args.batch}, conv net with {args.channels} channels, device {args.device}, "
          f"{args.threads} CPU threads")
    print(f"{'engine':8s} {'seconds':>9s} {'extra RSS MB':>13s} {'peak GPU MB':>12s}")
    for engine, result in results.items():
        print(f"{engine:8s} {result['seconds']:9.2f} {result['extra_rss_mb']:13.0f} {result['gpu_mb']:12.0f}")
    ours, theirs = results["dscovid"], results["monai"]
    print(f"time ratio dscovid/monai: {ours['seconds'] / theirs['seconds']:.2f}; "
          f"extra RSS ratio: {ours['extra_rss_mb'] / max(theirs['extra_rss_mb'], 1.0):.2f}")
    agree = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(ours["checksum"], theirs["checksum"]))
    print(f"outputs agree: {agree} (checksums {ours['checksum']} vs {theirs['checksum']})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
