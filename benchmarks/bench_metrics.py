"""Our segmentation metrics against MedPy and MONAI on one full-size case: time and values.

A large smooth lesion (a few hundred ml) in a 512×512×300 volume with 1.0×0.7×0.7 mm voxels, and a prediction that
is the lesion grown, shrunk and shifted in places. Every implementation gets the same masks and spacing:

- ours: :func:`dscovid.evaluation.metrics.segmentation_metrics` (DSC, sens., spec., NSD, RMSD, HD95, ASSD in one call);
- MedPy: ``hd95`` and ``assd`` (each runs its own distance transforms over the whole volume);
- MONAI: ``compute_surface_dice`` (surfels, ``use_subvoxels=True``, the same method as ours) and
  ``compute_hausdorff_distance`` at the 95th percentile.

Times are the wall-clock and the CPU seconds (all threads of this process) of one call each, one after the other;
on a shared machine the CPU time is the fairer comparison. HD95 values differ by design
between MedPy (percentile of both directions pooled, also ours) and MONAI (larger directed percentile).

    python benchmarks/bench_metrics.py                       # full size
    python benchmarks/bench_metrics.py --shape 150 256 256   # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage


def make_masks(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A large irregular lesion and a perturbed copy of it, as boolean (Z, Y, X) arrays."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2
    radii = np.array(shape) * np.array([0.2, 0.13, 0.115])
    ellipsoid = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (xx - centre[2] * 0.7) / radii[2]
    ) ** 2
    coarse = ndimage.zoom(rng.standard_normal(tuple(s // 8 for s in shape)), 8, order=1)
    coarse = np.pad(coarse, [(0, s - c) for s, c in zip(shape, coarse.shape)], mode="edge")
    reference = ellipsoid + 0.35 * coarse < 1.0
    noise = ndimage.zoom(rng.standard_normal(tuple(s // 16 for s in shape)), 16, order=1)
    noise = np.pad(noise, [(0, s - c) for s, c in zip(shape, noise.shape)], mode="edge")
    prediction = ellipsoid + 0.35 * coarse + 0.15 * noise < 1.0
    prediction = np.roll(prediction, (2, -3, 4), axis=(0, 1, 2))
    return reference, prediction


def _time(function, *args, **kwargs):
    """(wall seconds, CPU seconds, return value) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return (time.perf_counter() - wall, time.process_time() - cpu), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.7, 0.7), metavar=("Z", "Y", "X"))
    parser.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    parser.add_argument("--skip", nargs="*", default=(), choices=("medpy", "monai"), help="leave out a library")
    args = parser.parse_args()
    spacing = tuple(args.spacing)

    reference, prediction = make_masks(tuple(args.shape))
    voxel_ml = float(np.prod(spacing)) / 1000
    print(f"volume {tuple(args.shape)}, spacing {spacing} mm, reference {reference.sum() * voxel_ml:.0f} ml, "
          f"prediction {prediction.sum() * voxel_ml:.0f} ml")

    from dscovid.evaluation.metrics import segmentation_metrics

    rows = []

    def add(name, seconds, values):
        rows.append((name, seconds, values))
        print(f"{name}: wall {seconds[0]:.1f} s, CPU {seconds[1]:.1f} s, {values}", flush=True)

    seconds, ours = _time(segmentation_metrics, prediction, reference, spacing, args.tolerance)
    add("ours: all metrics", seconds, f"NSD {ours['nsd']:.4f}, HD95 {ours['hd95']:.3f}, "
        f"ASSD {ours['assd']:.3f}, RMSD {ours['rmsd']:.3f}, DSC {ours['dsc']:.4f}")
    baseline = seconds[1]

    if "medpy" not in args.skip:
        from medpy.metric import binary

        seconds, value = _time(binary.hd95, prediction, reference, voxelspacing=spacing)
        add("MedPy hd95", seconds, f"HD95 {value:.3f}")
        seconds, value = _time(binary.assd, prediction, reference, voxelspacing=spacing)
        add("MedPy assd", seconds, f"ASSD {value:.3f}")
    if "monai" not in args.skip:
        import torch
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice

        def one_hot(mask: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(mask)
            return torch.stack([~tensor, tensor])[None]  # (1, 2, Z, Y, X), background first

        y_pred, y = one_hot(prediction), one_hot(reference)
        seconds, value = _time(compute_surface_dice, y_pred, y, [args.tolerance], spacing=spacing, use_subvoxels=True)
        add("MONAI compute_surface_dice", seconds, f"NSD {float(value):.4f}")
        seconds, value = _time(compute_hausdorff_distance, y_pred, y, percentile=95, spacing=spacing)
        add("MONAI compute_hausdorff_distance", seconds, f"HD95 (max directed) {float(value):.3f}")

    print(f"\n| {'implementation':34s} | wall s | CPU s | CPU × ours | values |")
    print(f"|{'-' * 36}|-------:|------:|-----------:|--------|")
    for name, (wall, cpu), values in rows:
        print(f"| {name:34s} | {wall:6.1f} | {cpu:5.1f} | {cpu / baseline:10.1f} | {values} |", flush=True)


if __name__ == "__main__":
    main()
