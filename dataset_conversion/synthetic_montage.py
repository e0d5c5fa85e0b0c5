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


def _pick_slices(case: SyntheticCase) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple, int, int]:
    """The case in standard orientation, its spacing, the axial slice with most lesion and a coronal row through it."""
    image, spacing = to_standard_orientation(case.image_hu, case.geometry)
    lesion, _ = to_standard_orientation(case.lesion, case.geometry)
    lung, _ = to_standard_orientation(case.lung, case.geometry)
    z = int(np.argmax(lesion.sum(axis=(1, 2)))) if lesion.any() else int(np.argmax(lung.sum(axis=(1, 2))))
    y = int(np.argmax(lesion[z].sum(axis=1))) if lesion.any() else image.shape[1] // 2
    return image, lesion, lung, spacing, z, y


_WINDOW = dict(cmap="gray", vmin=-1250, vmax=250, interpolation="nearest")


def _axial(axis, image, lesion, lung, spacing, z, outlines: bool = True) -> None:
    axis.imshow(image[z], aspect=spacing[1] / spacing[2], **_WINDOW)
    if outlines:
        axis.contour(lung[z], [0.5], colors="cyan", linewidths=0.8)
        axis.contour(lesion[z], [0.5], colors="red", linewidths=1.0)


def _coronal(axis, image, lesion, lung, spacing, y) -> None:
    axis.imshow(image[::-1, y], aspect=spacing[0] / spacing[2], **_WINDOW)  # head at the top
    axis.contour(lung[::-1, y], [0.5], colors="cyan", linewidths=0.8)
    axis.contour(lesion[::-1, y], [0.5], colors="red", linewidths=1.0)


def _save(figure, path: str | os.PathLike, dpi: int) -> Path:
    """Save ``figure`` as a PNG at ``path`` (written beside it and renamed, so never left incomplete) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=dpi)
    finally:
        plt.close(figure)
    return path


def save_montage(path: str | os.PathLike, seed: int = 0, cases: list[SyntheticCase] | None = None,
                 variant: str | None = None) -> Path:
    """Draw the first case of each class of ``seed`` (or the given cases) and save a PNG.

    Each row shows the axial slice with most lesion (or the middle slice), in a lung window, and the coronal slice
    through it, with the lesion mask outlined in red and the reference lung mask in cyan. Images are shown in the
    radiological convention (patient's right on the left of the picture). ``variant`` names the synthetic variant
    of the generated cases (default: the default generator).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cases is None:
        first = {name: next(i for i in range(100) if class_for_index(seed, i) == name) for name in CLASS_NAMES}
        cases = [generate_case(seed, first[name], variant=variant) for name in CLASS_NAMES]
    figure, axes = plt.subplots(len(cases), 3, figsize=(13.5, 4.4 * len(cases)),
                                gridspec_kw={"width_ratios": [1, 1, 1]})
    axes = np.atleast_2d(axes)
    for row, case in zip(axes, cases):
        image, lesion, lung, spacing, z, y = _pick_slices(case)
        _axial(row[0], image, lesion, lung, spacing, z)
        _axial(row[1], image, lesion, lung, spacing, z, outlines=False)
        _coronal(row[2], image, lesion, lung, spacing, y)
        meta = case.metadata
        row[0].set_title(f"{case.class_name}: axial, outlines (lesion red, lung cyan)", fontsize=10)
        row[1].set_title(f"{meta['lesion_count']} lesion(s), LVR {meta['lesion_volume_ratio']:.1%}", fontsize=10)
        row[2].set_title(f"coronal; stored as {meta['orientation']}, "
                         f"{' x '.join(f'{s:.2f}' for s in case.geometry.spacing_zyx_mm)} mm", fontsize=10)
        for axis in row:
            axis.set_axis_off()
    return _save(figure, path, dpi=80)


def save_variant_montage(path: str | os.PathLike, seed: int = 0, index: int | None = None,
                         variants: list[str] | None = None) -> Path:
    """Draw one case (default: the first COVID-19 case of ``seed``) in each variant and save a PNG.

    Two variants per row, each as an axial slice without outlines (to see the noise and kernel) and the same
    slice with the lesion (red) and lung (cyan) outlines, in the radiological convention and a lung window.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dataset_conversion.synthetic_variants import VARIANTS

    variants = list(VARIANTS) if variants is None else variants
    if index is None:
        index = next(i for i in range(100) if class_for_index(seed, i) == "covid")
    rows = (len(variants) + 1) // 2
    figure, axes = plt.subplots(rows, 4, figsize=(18.0, 4.6 * rows))
    axes = np.atleast_2d(axes)
    for axis in axes.ravel():
        axis.set_axis_off()
    for k, name in enumerate(variants):
        case = generate_case(seed, index, variant=name)
        image, lesion, lung, spacing, z, _ = _pick_slices(case)
        left, right = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
        _axial(left, image, lesion, lung, spacing, z, outlines=False)
        _axial(right, image, lesion, lung, spacing, z)
        meta = case.metadata
        left.set_title(f"{name}: {' x '.join(f'{s:.2f}' for s in case.geometry.spacing_zyx_mm)} mm, "
                       f"{case.geometry.shape_zyx[2]} px", fontsize=10)
        right.set_title(f"noise {meta['noise_hu']:.0f} HU; {meta['lesion_count']} lesion(s), "
                        f"LVR {meta['lesion_volume_ratio']:.1%}", fontsize=10)
    return _save(figure, path, dpi=60)
