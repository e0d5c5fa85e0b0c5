"""A picture of the synthetic phantoms: one case per class, axial and coronal, lesion and lung outlines."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dataset_conversion.synthetic import SyntheticCase, class_for_index, generate_case
from dscovid.io.atomic import atomic_path
from dscovid.io.dataset import CLASS_NAMES
from dscovid.io.image_io import Geometry


def to_standard_orientation(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute and flip a (z, y, x) array so that its axes run foot→head, anterior→posterior, right→left (LPS).

    Oblique grids are brought to the nearest such orientation (no resampling). Returns the array and its
    spacing in the new (z, y, x) order.
    """
    direction = geometry.direction_matrix  # columns: world (x, y, z) direction of index axes x, y, z
    array_axis_of_world = {}
    signs = {}
    for index_axis in range(3):  # in (x, y, z) order
        world_axis = int(np.argmax(np.abs(direction[:, index_axis])))
        array_axis_of_world[world_axis] = 2 - index_axis
        signs[world_axis] = np.sign(direction[world_axis, index_axis])
    order = [array_axis_of_world[2], array_axis_of_world[1], array_axis_of_world[0]]
    result = np.transpose(array, order)
    for new_axis, world_axis in enumerate((2, 1, 0)):
        if signs[world_axis] < 0:
            result = np.flip(result, axis=new_axis)
    spacing = tuple(geometry.spacing_zyx_mm[a] for a in order)
    return result, spacing


def save_montage(path: str | os.PathLike, seed: int = 0, cases: list[SyntheticCase] | None = None) -> Path:
    """Draw the first case of each class of ``seed`` (or the given cases) and save a PNG.

    Each row shows the axial slice with most lesion (or the middle slice), in a lung window, and the coronal slice
    through it, with the lesion mask outlined in red and the reference lung mask in cyan. Images are shown in the
    radiological convention (patient's right on the left of the picture).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cases is None:
        first = {name: next(i for i in range(100) if class_for_index(seed, i) == name) for name in CLASS_NAMES}
        cases = [generate_case(seed, first[name]) for name in CLASS_NAMES]
    figure, axes = plt.subplots(len(cases), 3, figsize=(13.5, 4.4 * len(cases)),
                                gridspec_kw={"width_ratios": [1, 1, 1]})
    axes = np.atleast_2d(axes)
    for row, case in zip(axes, cases):
        image, spacing = to_standard_orientation(case.image_hu, case.geometry)
        lesion, _ = to_standard_orientation(case.lesion, case.geometry)
        lung, _ = to_standard_orientation(case.lung, case.geometry)
        z = int(np.argmax(lesion.sum(axis=(1, 2)))) if lesion.any() else int(np.argmax(lung.sum(axis=(1, 2))))
        y = int(np.argmax(lesion[z].sum(axis=1))) if lesion.any() else image.shape[1] // 2
        window = dict(cmap="gray", vmin=-1250, vmax=250, interpolation="nearest")
        row[0].imshow(image[z], aspect=spacing[1] / spacing[2], **window)
        row[0].contour(lung[z], [0.5], colors="cyan", linewidths=0.8)
        row[0].contour(lesion[z], [0.5], colors="red", linewidths=1.0)
        row[1].imshow(image[z], aspect=spacing[1] / spacing[2], **window)
        coronal = image[::-1, y]  # head at the top
        row[2].imshow(coronal, aspect=spacing[0] / spacing[2], **window)
        row[2].contour(lung[::-1, y], [0.5], colors="cyan", linewidths=0.8)
        row[2].contour(lesion[::-1, y], [0.5], colors="red", linewidths=1.0)
        meta = case.metadata
        row[0].set_title(f"{case.class_name}: axial, outlines (lesion red, lung cyan)", fontsize=10)
        row[1].set_title(f"{meta['lesion_count']} lesion(s), LVR {meta['lesion_volume_ratio']:.1%}", fontsize=10)
        row[2].set_title(f"coronal; stored as {meta['orientation']}, "
                         f"{' x '.join(f'{s:.2f}' for s in case.geometry.spacing_zyx_mm)} mm", fontsize=10)
        for axis in row:
            axis.set_axis_off()
    figure.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=80)
    finally:
        plt.close(figure)
    return path
