"""Finding the lungs on the working grid: the body, the airway, the lungs among the air inside, right and left."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from dscovid.errors import DscovidError
from dscovid.preprocessing.lung.morphology import IN_PLANE, bounding_box, components, erode, fill_holes_per_slice
from dscovid.preprocessing.lung.settings import LEFT_LUNG, RIGHT_LUNG, LungMaskSettings

log = logging.getLogger(__name__)


def body_mask(coarse: np.ndarray, threshold_hu: float) -> np.ndarray:
    """The patient's body: tissue above ``threshold_hu``, its largest 3D component, holes filled per slice."""
    labels, sizes = components(coarse > threshold_hu)
    if len(sizes) < 2:
        raise DscovidError(f"no lung found: no body (nothing above {threshold_hu:g} HU) in the image")
    sizes[0] = 0
    return fill_holes_per_slice(labels == int(np.argmax(sizes)))


def airway(air: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
    """Trachea and main bronchi: small axial air pieces near the mid-line forming a tube down from the top.

    A lung apex is small too but lies lateral to the mid-line; a piece merged with a lung is large. The tube
    must reach the top of the air region (within ``airway_seed_depth_mm``), which a bowel loop does not.
    """
    pixel_mm2 = spacing[1] * spacing[2]
    max_pixels = settings.airway_max_area_mm2 / pixel_mm2
    max_offset = settings.airway_max_offset_mm / spacing[2]
    if not air.any():
        return np.zeros_like(air)
    # The axial air pieces of every slice in one labelling (in-plane connectivity), each with its size, slice and
    # centre; a piece is a candidate when small and near the mid-line of its slice's body.
    labels, sizes = components(air, IN_PLANE)
    z, y, x = np.nonzero(labels)
    piece = labels[z, y, x]
    centres_x = np.bincount(piece, weights=x, minlength=sizes.size) / np.maximum(sizes, 1)
    piece_z = np.zeros(sizes.size, dtype=int)
    piece_z[piece] = z
    columns = body.any(axis=1)  # (Z, X): the body's columns per slice
    first = np.argmax(columns, axis=1)
    last = columns.shape[1] - 1 - np.argmax(columns[:, ::-1], axis=1)
    mid_x = 0.5 * (first + last)
    near = (sizes <= max_pixels) & (np.abs(centres_x - mid_x[piece_z]) <= max_offset)
    near[0] = False
    candidates = near[labels]

    # The top of the air region is its largest component's top (canonical axis 0 runs upward).
    air_labels, sizes = components(air)
    sizes[0] = 0
    top = int(np.flatnonzero((air_labels == int(np.argmax(sizes))).any(axis=(1, 2)))[-1])
    seed_depth = max(1, int(round(settings.airway_seed_depth_mm / spacing[0])))
    tube_labels, _ = components(candidates, np.ones((3, 3, 3), dtype=bool))
    reaching = np.unique(tube_labels[max(0, top - seed_depth + 1) : top + 1])
    reaching = reaching[reaching > 0]
    airway = np.isin(tube_labels, reaching)
    log.debug("airway: %d voxels on the working grid", int(airway.sum()))
    return airway


def pick_lungs(air: np.ndarray, body: np.ndarray, spacing: np.ndarray, settings: LungMaskSettings) -> np.ndarray:
    """Label the right (1) and left (2) lung among the air components inside the body.

    Raises DscovidError when the lungs' air is smaller than ``min_lung_ml`` or never fills ``min_lung_fraction``
    of an axial slice of the body (bowel gas in an abdomen or pelvis CT).
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, sizes = components(air)
    sizes[0] = 0
    if len(sizes) < 2:
        raise DscovidError("no lung found: the air inside the body is only 0 ml")
    order = np.argsort(sizes)[::-1]
    largest = int(order[0])
    lungs = [labels == largest]
    if len(order) > 2 and sizes[order[1]] >= settings.second_lung_min_fraction * sizes[largest]:
        second = labels == int(order[1])
        # A stomach or bowel bubble lies below the lung base; a second lung sits at the height of the first.
        first_z = np.flatnonzero(lungs[0].any(axis=(1, 2)))
        centre_z = float(np.mean(np.nonzero(second)[0]))
        if centre_z >= first_z[0] + 0.25 * (first_z[-1] - first_z[0]):
            lungs.append(second)
    found = np.logical_or.reduce(lungs)
    volume_ml = float(found.sum()) * voxel_ml
    fraction = float(np.max(found.sum(axis=(1, 2)) / np.maximum(1, body.sum(axis=(1, 2)))))
    if volume_ml < settings.min_lung_ml or fraction < settings.min_lung_fraction:
        raise DscovidError(
            f"no lung found: the air inside the body is only {float(air.sum()) * voxel_ml:.0f} ml and fills at "
            f"most {100 * fraction:.0f}% of an axial slice of the body (a chest CT: over "
            f"{100 * settings.min_lung_fraction:.0f}%)"
        )

    mid_x = _mid_line(body, lungs)
    if len(lungs) == 1:
        lungs = _split_if_both_sides(lungs[0], mid_x, spacing)
    sides = np.zeros(air.shape, dtype=np.uint8)
    for lung in lungs:
        # Canonical x runs toward the patient's left.
        centre_x = float(np.mean(np.nonzero(lung)[2]))
        side = LEFT_LUNG if centre_x > mid_x else RIGHT_LUNG
        if (sides == side).any():  # two pieces on one side: the smaller one is a continuation of the other
            side = RIGHT_LUNG if side == LEFT_LUNG else LEFT_LUNG
        sides[lung] = side
    return sides


def _mid_line(body: np.ndarray, lungs: list[np.ndarray]) -> float:
    """The left-right mid-line: the middle of the body's x extent at the height of the lungs.

    Taken from the body, not the lungs, so that a single lung (the other collapsed or removed) gets its side.
    """
    slices = np.flatnonzero(np.logical_or.reduce(lungs).any(axis=(1, 2)))
    columns = np.flatnonzero(body[slices[0] : slices[-1] + 1].any(axis=(0, 1)))
    return 0.5 * (columns[0] + columns[-1])


def _split_if_both_sides(lung: np.ndarray, mid_x: float, spacing: np.ndarray) -> list[np.ndarray]:
    """Split one air component into two lungs when it has substantial volume on both sides of the mid-line.

    The lungs touch only in thin places (the anterior and posterior junction lines, a bronchus): erode in
    plane until two large cores on opposite sides appear, then grow them back inside the lung, each voxel going
    to the core that reaches it first. If erosion never separates them, cut along the mid-line.
    """
    x = np.nonzero(lung)[2]
    left_fraction = float(np.mean(x > mid_x))
    if min(left_fraction, 1.0 - left_fraction) < 0.15:
        return [lung]
    box = bounding_box(lung, np.zeros(3, dtype=int))
    inside = lung[box]
    core = inside
    for erosions in range(1, 9):
        core = erode(core, IN_PLANE)
        labels, sizes = components(core)
        sizes[0] = 0
        if len(sizes) < 3:
            continue
        first, second = (int(i) for i in np.argsort(sizes)[::-1][:2])
        if sizes[second] < 0.15 * sizes[first]:
            continue
        owner = np.where(labels == first, 1, 0).astype(np.uint8) + np.where(labels == second, 2, 0).astype(np.uint8)
        for _ in range(4 * erosions):
            free = inside & (owner == 0)
            grown = ndimage.grey_dilation(owner, footprint=IN_PLANE)
            if not (free & (grown > 0)).any():
                break
            owner[free] = grown[free]
        # Bits the erosion cut off entirely (small, out in the periphery) go by side.
        columns = np.broadcast_to(np.arange(box[2].start, box[2].stop)[None, None, :], inside.shape)
        rest = inside & (owner == 0)
        first_is_right = float(np.mean(np.nonzero(owner == 1)[2])) < float(np.mean(np.nonzero(owner == 2)[2]))
        right, left = (1, 2) if first_is_right else (2, 1)
        owner[rest & (columns <= mid_x)] = right
        owner[rest & (columns > mid_x)] = left
        pieces = []
        for value in (1, 2):
            piece = np.zeros_like(lung)
            piece[box] = owner == value
            pieces.append(piece)
        return pieces
    log.info("lungs touch too broadly to separate by erosion; cutting them along the mid-line")
    columns = np.arange(lung.shape[2])[None, None, :]
    return [lung & (columns <= mid_x), lung & (columns > mid_x)]
