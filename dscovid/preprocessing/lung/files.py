"""``dscovid_lung_mask``'s files: one mask per scan, written on the scan's own grid."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from dscovid.errors import DscovidError
from dscovid.io.image_io import read_image, write_image
from dscovid.io.scans import Scan, case_name_problems
from dscovid.parallel import progress_bar
from dscovid.preprocessing.lung.segment import lung_volumes_ml, segment_lung_sides
from dscovid.preprocessing.lung.settings import LungMaskSettings

log = logging.getLogger(__name__)


def write_lung_masks(
    scans: Sequence[Scan],
    output_dir: str | os.PathLike,
    settings: LungMaskSettings | None = None,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """Segment each scan (:func:`dscovid.io.scans.find_scans`) and write ``<output_dir>/<case>.nii.gz`` (uint8 0/1)
    on the scan's own grid.

    A case that fails (a name already taken, unreadable, no lung) is skipped and reported; the others still run.

    Returns
    -------
    ``(case, reason)`` for each failed case, in input order.
    """
    output_dir = Path(output_dir)
    failures = []
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        for scan, problem in progress_bar(list(zip(scans, case_name_problems(scans))), desc="lung masks", unit="scan",
                                          disable=not progress):
            case = scan.name
            if problem is not None:
                failures.append((case, problem))
                continue
            try:
                image, geometry = read_image(scan.path)
                started = time.perf_counter()
                sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction, settings)
                seconds = time.perf_counter() - started
                write_image((sides > 0).astype(np.uint8), geometry, output_dir / f"{case}.nii.gz")
            except DscovidError as error:
                failures.append((case, str(error)))
                continue
            volumes = lung_volumes_ml(sides, geometry.spacing_zyx_mm)
            log.info("%s: right lung %.0f ml, left lung %.0f ml (%.1f s)", case, volumes["right"], volumes["left"],
                     seconds)
    return failures
