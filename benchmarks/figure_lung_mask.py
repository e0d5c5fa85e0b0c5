"""Draw ``docs/figures/lung_mask_real.png``: the lung mask outline on the three real COVID-CT-MD scans.

::

    python benchmarks/figure_lung_mask.py [--data $DSCOVID_TEST_DATA] [-o docs/figures/lung_mask_real.png]

One row per scan (COVID-19 P002, CAP cap002, normal001, full-resolution DICOM): an axial slice through the lower
lobes, where the lesions of these cases lie, and a coronal slice through the middle of the lungs; right lung red,
left lung cyan, lung window (-1350..150 HU), with the lung volumes in the titles.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

CASES = (("P002", "COVID-19 subjects/P002", "COVID-19"), ("cap002", "Cap subjects/cap002", "CAP"),
         ("normal001", "Normal subjects/normal001", "normal"))


def draw_lung_mask_figure(data: Path, output: Path) -> Path:
    """Segment the three scans under ``data/covid_ct_md`` and write the figure to ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dscovid.io.image_io import read_image
    from dscovid.preprocessing.lung import LEFT_LUNG, RIGHT_LUNG, lung_volumes_ml, segment_lung_sides

    figure, axes = plt.subplots(len(CASES), 2, figsize=(10, 5 * len(CASES)), gridspec_kw={"width_ratios": [1, 1]})
    for row, (case, folder, diagnosis) in zip(axes, CASES):
        image, geometry = read_image(data / "covid_ct_md" / folder)
        sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
        volumes = lung_volumes_ml(sides, geometry.spacing_zyx_mm)
        slices = np.flatnonzero(sides.any(axis=(1, 2)))
        # Identity direction here: z index grows toward the head, so a third of the way up is the lower lobes.
        axial = int(slices[0] + 0.3 * (slices[-1] - slices[0]))
        coronal = int(np.mean(np.nonzero(sides.any(axis=(0, 2)))[0]))
        sz, sy, sx = geometry.spacing_zyx_mm
        views = (
            (image[axial], sides[axial], sy / sx, "upper", f"axial z={axial}"),
            (image[:, coronal, :], sides[:, coronal, :], sz / sx, "lower", f"coronal y={coronal}"),
        )
        for axis, (picture, labels, aspect, origin, where) in zip(row, views):
            axis.imshow(picture, cmap="gray", vmin=-1350, vmax=150, aspect=aspect, origin=origin)
            for side, colour in ((RIGHT_LUNG, "red"), (LEFT_LUNG, "cyan")):
                if (labels == side).any():
                    axis.contour(labels == side, levels=[0.5], colors=colour, linewidths=0.8)
            axis.set_title(f"{case} ({diagnosis}), {where}: right {volumes['right'] / 1000:.2f} l, "
                           f"left {volumes['left'] / 1000:.2f} l", fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DSCOVID_TEST_DATA"),
                        help="the real CT test data folder (default: $DSCOVID_TEST_DATA)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/figures/lung_mask_real.png"))
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data or DSCOVID_TEST_DATA is required")
    print(draw_lung_mask_figure(args.data, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
