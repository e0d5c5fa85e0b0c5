"""Reorientation of (z, y, x) arrays to one canonical orientation by axis permutation and flips only.

The canonical orientation is SimpleITK's identity direction: index axis x runs towards the patient's left,
y towards posterior, z towards superior (world LPS; DICOM calls such an image "LPS", ITK "RAI"). A scan is
brought there by the permutation of its array axes and the flips that make its direction matrix nearest to the
identity. Nothing is interpolated, so the mapping is exactly invertible. An oblique scan keeps the rotation that
a permutation cannot remove: its canonical direction ``D @ P`` is close to, but not exactly, the identity and is
recorded (``residual_direction``) so that the canonical array still has an exact world position.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dscovid.io.image_io import Geometry

_WORLD_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # (negative, positive) end of world x, y, z in LPS


@dataclass(frozen=True)
class Reorientation:
    """How a (z, y, x) array maps onto the canonical orientation.

    Attributes
    ----------
    transpose_zyx : canonical array axis ``c`` is original array axis ``transpose_zyx[c]`` (``np.transpose``).
    flip_zyx : after transposing, canonical axes that were flipped (``True`` = reversed).
    """

    transpose_zyx: tuple[int, int, int]
    flip_zyx: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.transpose_zyx == (0, 1, 2) and not any(self.flip_zyx)

    def to_dict(self) -> dict:
        return {"transpose_zyx": list(self.transpose_zyx), "flip_zyx": list(self.flip_zyx)}

    @classmethod
    def from_dict(cls, data: dict) -> Reorientation:
        return cls(tuple(int(v) for v in data["transpose_zyx"]), tuple(bool(v) for v in data["flip_zyx"]))


def axis_codes(direction: tuple[float, ...] | np.ndarray) -> str:
    """The three letters naming where the x, y and z index axes point (``"LPS"`` for the identity direction).

    Each letter is the world end (L/R, P/A, S/I) nearest to the index axis, as in ITK's
    ``DICOMOrientImageFilter.GetOrientationFromDirectionCosines``.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    letters = []
    for k in range(3):
        column = matrix[:, k]
        world = int(np.argmax(np.abs(column)))
        letters.append(_WORLD_LETTERS[world][1 if column[world] > 0 else 0])
    return "".join(letters)


def _best_permutation(matrix: np.ndarray) -> tuple[int, int, int]:
    """``perm[w]`` = index axis (x, y, z numbering) whose direction is nearest world axis ``w``."""
    # Six candidates: exhaustive search is exact where a greedy argmax per column can pick one axis twice.
    return max(itertools.permutations(range(3)), key=lambda perm: sum(abs(matrix[w, perm[w]]) for w in range(3)))


def canonical_reorientation(geometry: Geometry) -> Reorientation:
    """The permutation and flips bringing an array with ``geometry`` nearest to the identity direction."""
    return reorientation_of(geometry.direction)


def reorientation_of(direction: Sequence[float] | np.ndarray | None) -> Reorientation:
    """The permutation and flips bringing an array with this direction (SimpleITK's 9 numbers, ``None`` for the
    identity) nearest to the identity direction."""
    if direction is None:
        return Reorientation((0, 1, 2), (False, False, False))
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    perm = _best_permutation(matrix)
    # Canonical array axis c (z, y, x) is world axis w = 2 - c; its source index axis k (x, y, z) is
    # array axis 2 - k.
    transpose = tuple(2 - perm[2 - c] for c in range(3))
    flips = tuple(bool(matrix[2 - c, perm[2 - c]] < 0) for c in range(3))
    return Reorientation(transpose, flips)


def to_canonical(array: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Apply ``reorientation`` to a (z, y, x) array (a view where possible; no interpolation)."""
    if reorientation.is_identity:
        return array
    result = np.transpose(array, reorientation.transpose_zyx)
    flipped = tuple(axis for axis, flip in enumerate(reorientation.flip_zyx) if flip)
    return np.flip(result, flipped) if flipped else result


def from_canonical(array: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Undo :func:`to_canonical`: a canonical (z, y, x) array back in the original axis order and directions."""
    if reorientation.is_identity:
        return array
    flipped = tuple(axis for axis, flip in enumerate(reorientation.flip_zyx) if flip)
    result = np.flip(array, flipped) if flipped else array
    return np.transpose(result, np.argsort(reorientation.transpose_zyx))


def canonical_geometry(geometry: Geometry, reorientation: Reorientation) -> Geometry:
    """The geometry of ``to_canonical(array, reorientation)``: same voxels in the world, permuted and flipped.

    Its direction is the residual rotation (the identity for an axis-aligned scan).
    """
    old_index_to_world = geometry.index_to_world_matrix()  # (z, y, x, 1) -> (x, y, z, 1)
    shape = np.asarray(geometry.shape_zyx)[list(reorientation.transpose_zyx)]
    # Canonical index i_c along axis c is original index (shape_c - 1 - i_c) when flipped, else i_c,
    # along original axis transpose[c].
    canon_to_old = np.zeros((4, 4))
    canon_to_old[3, 3] = 1.0
    for c, (axis, flip) in enumerate(zip(reorientation.transpose_zyx, reorientation.flip_zyx)):
        canon_to_old[axis, c] = -1.0 if flip else 1.0
        canon_to_old[axis, 3] = float(shape[c] - 1) if flip else 0.0
    affine = old_index_to_world @ canon_to_old  # canonical (z, y, x, 1) -> world (x, y, z, 1)
    spacing_zyx = np.linalg.norm(affine[:3, :3], axis=0)
    direction_zyx_columns = affine[:3, :3] / spacing_zyx[None, :]
    direction = direction_zyx_columns[:, ::-1]  # columns back to (x, y, z) index order
    return Geometry(
        shape_zyx=tuple(int(v) for v in shape),
        spacing_zyx_mm=tuple(float(v) for v in spacing_zyx),
        origin_xyz_mm=tuple(float(v) for v in affine[:3, 3]),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )
