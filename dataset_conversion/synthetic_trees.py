"""Branching pulmonary vessel and airway trees of the synthetic phantoms, and their rendering as partial volumes.

A tree is a list of cylinders (segments) in patient mm, grown from the hila by repeated asymmetric bifurcation and
kept inside the lungs. Rendering does not look at every voxel for every segment: each cylinder is filled with
random points (a few per voxel of its volume, at least one every half voxel along its axis), each point carries
its share of the cylinder's volume, and the shares are splatted trilinearly onto the grid. The sum per voxel is
the fraction of the voxel that the tree occupies, so a vessel thinner than a voxel shows as the faint partial-volume
line that it is on a real scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_conversion.synthetic_anatomy import Anatomy, lung_mask


@dataclass(frozen=True)
class Segments:
    """Cylinders of a tree: ``start`` and ``end`` (N, 3) in patient mm (X, Y, Z), ``radius`` (N,) in mm."""

    start: np.ndarray
    end: np.ndarray
    radius: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)


def _inside(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    return lung_mask(anatomy, points[:, 0], points[:, 1], points[:, 2])


def _perpendicular(directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to each (unit) direction."""
    random = rng.normal(size=directions.shape)
    random -= np.sum(random * directions, axis=1, keepdims=True) * directions
    return random / np.maximum(np.linalg.norm(random, axis=1, keepdims=True), 1e-9)


def _rotate_towards(directions: np.ndarray, normals: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.cos(angles)[:, None] * directions + np.sin(angles)[:, None] * normals


def grow_tree(
    anatomy: Anatomy,
    roots: np.ndarray,
    directions: np.ndarray,
    radii: np.ndarray,
    rng: np.random.Generator,
    min_radius_mm: float,
    length_factor: tuple[float, float] = (6.0, 9.0),
    max_segments: int = 6000,
) -> Segments:
    """Grow a tree from root points by asymmetric bifurcation, keeping every segment end inside the lungs.

    Parameters
    ----------
    anatomy : the patient.
    roots, directions : (R, 3) start points (mm) and initial directions of the root branches.
    radii : (R,) root radii in mm.
    rng : random generator (the tree depends on it only).
    min_radius_mm : branches thinner than this are not grown.
    length_factor : a branch is ``U(*length_factor) × radius + 2`` mm long.
    max_segments : stop growing beyond this many segments.

    Returns
    -------
    The segments of all generations.
    """
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    tips, heads, sizes = np.asarray(roots, float), directions, np.asarray(radii, float)
    starts, ends, out_radii = [], [], []
    total = 0
    while len(tips) and total < max_segments:
        lengths = rng.uniform(*length_factor, size=len(tips)) * sizes + 2.0
        candidates = tips + heads * lengths[:, None]
        ok = _inside(anatomy, candidates)
        # A branch that would leave the lung is tried at half length once, then dropped.
        short = tips + heads * (0.5 * lengths[:, None])
        retry = ~ok & _inside(anatomy, short)
        candidates[retry] = short[retry]
        keep = ok | retry
        tips, heads, sizes, candidates = tips[keep], heads[keep], sizes[keep], candidates[keep]
        starts.append(tips)
        ends.append(candidates)
        out_radii.append(sizes)
        total += len(tips)
        # Children: a major branch continuing nearly straight and a minor one at a wider angle.
        n = len(tips)
        normals = _perpendicular(heads, rng)
        major = _rotate_towards(heads, normals, np.radians(rng.uniform(8, 25, n)))
        minor = _rotate_towards(heads, -normals, np.radians(rng.uniform(35, 65, n)))
        major_r = sizes * rng.uniform(0.74, 0.86, n)
        minor_r = sizes * rng.uniform(0.55, 0.72, n)
        grow_again = np.concatenate([major_r, minor_r]) >= min_radius_mm
        tips = np.concatenate([candidates, candidates])[grow_again]
        heads = np.concatenate([major, minor])[grow_again]
        heads /= np.linalg.norm(heads, axis=1, keepdims=True)
        sizes = np.concatenate([major_r, minor_r])[grow_again]
    if not starts:
        empty = np.zeros((0, 3))
        return Segments(empty, empty, np.zeros(0))
    return Segments(np.concatenate(starts), np.concatenate(ends), np.concatenate(out_radii))


def _root_directions(anatomy: Anatomy, side: float, rng: np.random.Generator, count: int) -> np.ndarray:
    """Initial branch directions from a hilum toward the upper, lower, anterior, posterior and lateral lung."""
    targets = np.array([
        [side * 0.45, 0.05, 0.42],  # upper lobe
        [side * 0.5, -0.55, 0.1],  # anterior
        [side * 0.75, 0.1, 0.0],  # lateral
        [side * 0.45, 0.6, -0.25],  # posterior basal
        [side * 0.5, -0.3, -0.35],  # anterior basal
        [side * 0.35, 0.55, 0.2],  # posterior upper
        [side * 0.7, 0.35, -0.3],  # lateral basal
    ])[:count]
    targets = targets * np.array([anatomy.a_in, anatomy.b_in_post, anatomy.lung_height_mm])
    return targets + rng.normal(scale=10.0, size=targets.shape)


def pulmonary_vessels(anatomy: Anatomy, rng: np.random.Generator) -> Segments:
    """Pulmonary arteries and veins of both lungs (one tree per lobar root, radii from ~6 mm down to ~0.7 mm)."""
    trees = []
    for side, hilum in ((-1.0, anatomy.hilum_right), (1.0, anatomy.hilum_left)):
        targets = _root_directions(anatomy, side, rng, 7)
        roots = np.repeat(hilum[None, :], len(targets), axis=0) + rng.normal(scale=3.0, size=(len(targets), 3))
        roots[:, 0] += side * 6.0  # start just inside the lung at the hilum
        directions = targets - roots
        radii = rng.uniform(4.0, 6.0, len(targets))
        trees.append(grow_tree(anatomy, roots, directions, radii, rng, min_radius_mm=0.7))
    return _concatenate(trees)


def airways(anatomy: Anatomy, rng: np.random.Generator) -> Segments:
    """Intrapulmonary bronchi from the hila (lumen radius from ~5 mm down to ~1.2 mm)."""
    trees = []
    for side, hilum in ((-1.0, anatomy.hilum_right), (1.0, anatomy.hilum_left)):
        targets = _root_directions(anatomy, side, rng, 5)
        roots = np.repeat(hilum[None, :] + np.array([side * 5.0, 6.0, 0.0]), len(targets), axis=0)
        radii = rng.uniform(3.5, 5.0, len(targets))
        trees.append(grow_tree(anatomy, roots, targets - roots, radii, rng, min_radius_mm=1.2,
                               length_factor=(5.0, 8.0)))
    return _concatenate(trees)


def _concatenate(trees: list[Segments]) -> Segments:
    return Segments(
        np.concatenate([t.start for t in trees]),
        np.concatenate([t.end for t in trees]),
        np.concatenate([t.radius for t in trees]),
    )


def occupancy(
    segments: Segments,
    patient_to_index: np.ndarray,
    shape_zyx: tuple[int, int, int],
    voxel_volume_mm3: float,
    min_spacing_mm: float,
    rng: np.random.Generator,
    radius_scale: float = 1.0,
    radius_offset_mm: float = 0.0,
    points_per_voxel: float = 3.0,
) -> np.ndarray:
    """Fraction of each voxel covered by the cylinders, by Monte-Carlo splatting (see the module docstring).

    Parameters
    ----------
    segments : the cylinders in patient mm.
    patient_to_index : 4×4 matrix from homogeneous patient (X, Y, Z, 1) to continuous voxel index (z, y, x, 1).
    shape_zyx : grid shape.
    voxel_volume_mm3, min_spacing_mm : volume of one voxel and its smallest spacing.
    rng : random generator for the point positions (rendering noise only).
    radius_scale, radius_offset_mm : the rendered radius is ``radius × radius_scale + radius_offset_mm``.
    points_per_voxel : density of the points in the cylinders' volume.

    Returns
    -------
    float32 array ``shape_zyx`` in [0, 1].
    """
    result = np.zeros(int(np.prod(shape_zyx)), dtype=np.float32)
    if len(segments) == 0:
        return result.reshape(shape_zyx)
    radius = np.maximum(segments.radius * radius_scale + radius_offset_mm, 0.05)
    axis = segments.end - segments.start
    length = np.linalg.norm(axis, axis=1)
    volume = np.pi * radius**2 * length
    counts = np.maximum(np.ceil(volume / voxel_volume_mm3 * points_per_voxel), np.ceil(2 * length / min_spacing_mm))
    counts = counts.astype(np.int64)
    owner = np.repeat(np.arange(len(radius)), counts)
    unit = axis / np.maximum(length, 1e-9)[:, None]
    e1 = _perpendicular(unit, rng)
    e2 = np.cross(unit, e1)
    t = rng.uniform(size=owner.size)
    rho = radius[owner] * np.sqrt(rng.uniform(size=owner.size))
    phi = rng.uniform(0, 2 * np.pi, size=owner.size)
    points = (segments.start[owner] + t[:, None] * axis[owner]
              + (rho * np.cos(phi))[:, None] * e1[owner] + (rho * np.sin(phi))[:, None] * e2[owner])
    weights = (volume / counts / voxel_volume_mm3)[owner]
    index = points @ patient_to_index[:3, :3].T + patient_to_index[:3, 3]
    base = np.floor(index).astype(np.int64)
    fraction = index - base
    shape = np.asarray(shape_zyx)
    flats, shares = [], []
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        at = base + offset
        share = weights * np.prod(np.where(offset == 1, fraction, 1.0 - fraction), axis=1)
        valid = np.all((at >= 0) & (at < shape), axis=1)
        flats.append(np.ravel_multi_index(tuple(at[valid].T), shape_zyx))
        shares.append(share[valid])
    flat = np.concatenate(flats)
    if flat.size:
        # Sum only over the range the points touch: a full-size grid has ~10^8 voxels.
        low = int(flat.min())
        summed = np.bincount(flat - low, weights=np.concatenate(shares))
        result[low:low + summed.size] = np.minimum(summed, 1.0)
    return result.reshape(shape_zyx)
