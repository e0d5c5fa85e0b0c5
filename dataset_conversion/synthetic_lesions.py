"""Pneumonia lesions of the synthetic phantoms, drawn to follow the four findings of the paper (section III-B).

Per class (numbers from the paper, Fig. 1 d-i):

- **COVID-19**: about 4.4 lesions per scan (55 % of scans with 4 or more), lesion volume ratio about 14 %
  (above 12 % in about half of the scans), mostly ground-glass opacity (-960..-600 HU), lesions widely varying in
  size, scattered and peripheral (subpleural).
- **CAP**: about 1.7 lesions (55 % with exactly one), lesion volume ratio about 4.4 % (above 12 % in about 5 %),
  central (near the hila), ground-glass and consolidation (-70..140 HU) mixed; some consolidations lie against
  the pleura.
- **non-pneumonia**: no lesion.

A lesion is a union of a few rotated ellipsoids (a lobulated blob) clipped to the lung. Its size is set from a
target volume drawn per scan (the lesion volume ratio) and calibrated by Monte-Carlo integration inside the lung,
so the ratio holds whatever the grid. Placement uses an analytic depth below the pleura (in-plane, like the
paper's peripheral lesion ratio) computed on random points of the lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset_conversion.synthetic_anatomy import Anatomy, lung_mask

#: Lesions per scan for COVID-19 (1..12) and CAP (1..5): P(count). Planned COVID-19 lesions that touch merge into
#: one, so the planned mean (4.9) is above the paper's 4.4.
COVID_COUNT_PROBABILITIES = np.array([0.08, 0.12, 0.17, 0.15, 0.12, 0.10, 0.08, 0.06, 0.045, 0.035, 0.025, 0.015])
CAP_COUNT_PROBABILITIES = np.array([0.55, 0.24, 0.12, 0.05, 0.04])

#: Gamma shape and scale of the per-scan lesion volume ratio (mean = shape × scale).
COVID_LVR_GAMMA = (2.3, 0.073)
CAP_LVR_GAMMA = (2.0, 0.0215)


@dataclass(frozen=True)
class Lesion:
    """One lesion: a union of ellipsoids in patient mm and how it is painted.

    Attributes
    ----------
    kind : ``"ggo"`` (ground glass), ``"consolidation"`` or ``"mixed"`` (ground glass with a consolidated core).
    centres : (K, 3) ellipsoid centres (X, Y, Z) in mm.
    axes : (K, 3) semi-axes in mm.
    rotations : (K, 3, 3) rotation of each ellipsoid (columns: its axes in patient coordinates).
    level_hu : attenuation of the ground glass (or of the consolidation for ``kind == "consolidation"``).
    core_hu : attenuation of the consolidated core of a mixed lesion.
    edge_mm : width of the soft edge blending the lesion into the lung.
    target_volume_ml : volume the lesion was sized for (inside the lung).
    """

    kind: str
    centres: np.ndarray
    axes: np.ndarray
    rotations: np.ndarray
    level_hu: float
    core_hu: float
    edge_mm: float
    target_volume_ml: float

    def radius(self, X, Y, Z) -> np.ndarray:
        """Normalised radius (≤ 1 inside) of the union of ellipsoids at each point (float32)."""
        shape = np.broadcast_shapes(np.shape(X), np.shape(Y), np.shape(Z))
        best = np.full(shape, np.inf, dtype=np.float32)
        for centre, axes, rotation in zip(self.centres, self.axes, self.rotations):
            dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
            total = np.zeros(shape, dtype=np.float32)
            for k in range(3):
                local = dx * rotation[0, k] + dy * rotation[1, k] + dz * rotation[2, k]
                total += (local / axes[k]) ** 2
            np.minimum(best, total, out=best)
        return np.sqrt(best)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (low, high) in patient mm that holds the lesion."""
        reach = self.axes.max(axis=1)[:, None]
        return (self.centres - reach).min(axis=0), (self.centres + reach).max(axis=0)

    def summary(self) -> dict:
        """JSON-ready description for the case metadata."""
        return {"kind": self.kind, "target_volume_ml": round(self.target_volume_ml, 2),
                "centre_patient_mm": [round(float(v), 1) for v in self.centres[0]],
                "level_hu": round(self.level_hu, 1)}


@dataclass(frozen=True)
class LungSample:
    """Random points of the lungs with their in-plane depth below the pleura (mm), the in-plane direction toward
    the nearest pleura (unit vectors), and the lung volume (ml)."""

    points: np.ndarray
    depth_mm: np.ndarray
    outward: np.ndarray
    volume_ml: float


_IN_PLANE = np.array([[np.cos(a), np.sin(a), 0.0] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)])


def sample_lung(anatomy: Anatomy, rng: np.random.Generator, count: int = 16000, probes: int = 900) -> LungSample:
    """Estimate the lung volume and sample points inside the lung with their distance to the lung's edge in-plane.

    The depth is measured along 8 in-plane rays (the paper's peripheral rim is an in-plane erosion) in 2.5 mm
    steps up to 60 mm.
    """
    low = np.array([-1.1 * anatomy.a_in, -1.1 * anatomy.b_in_ant, anatomy.base_z])
    high = np.array([1.1 * anatomy.a_in, 1.1 * anatomy.b_in_post, anatomy.apex_z])
    points = rng.uniform(low, high, size=(count, 3))
    inside = lung_mask(anatomy, points[:, 0], points[:, 1], points[:, 2])
    volume_ml = float(inside.mean() * np.prod(high - low) / 1000.0)
    candidates = points[inside][:probes]
    depth, outward = pleura_depth(anatomy, candidates)
    return LungSample(points=candidates, depth_mm=depth, outward=outward, volume_ml=volume_ml)


def pleura_depth(anatomy: Anatomy, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane depth below the pleura (mm) of lung ``points`` (N, 3) and the unit vector toward the nearest pleura.

    Measured along 8 in-plane rays in 2.5 mm steps up to 60 mm (a point deeper than that gets 60).
    """
    depth = np.full(len(points), 60.0)
    outward = np.tile(_IN_PLANE[0], (len(points), 1))
    for step in np.arange(2.5, 61.0, 2.5):
        probe = points[:, None, :] + step * _IN_PLANE[None, :, :]
        outside = ~lung_mask(anatomy, probe[..., 0], probe[..., 1], probe[..., 2])
        hit = outside.any(axis=1) & (depth >= 60.0)
        depth[hit] = step - 1.25
        outward[hit] = _IN_PLANE[np.argmax(outside[hit], axis=1)]
    return depth, outward


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def _in_lung_volume_ml(lesion: Lesion, anatomy: Anatomy, rng: np.random.Generator, count: int = 3000) -> float:
    low, high = lesion.bounds()
    points = rng.uniform(low, high, size=(count, 3))
    X, Y, Z = points.T
    inside = (lesion.radius(X, Y, Z) <= 1.0) & lung_mask(anatomy, X, Y, Z)
    return float(inside.mean() * np.prod(high - low) / 1000.0)


def _blob(centre: np.ndarray, radius_mm: float, elongation_z: float, parts: int, rng: np.random.Generator,
          outward: np.ndarray | None = None, flatness: float = 1.0):
    """Ellipsoid centres, semi-axes and rotations of a lobulated blob of about ``radius_mm`` around ``centre``.

    With ``outward`` (unit vector toward the nearest pleura) the blob is flattened along it by ``flatness`` and
    widened along the pleura (same volume): a subpleural lesion spreads under the pleura rather than into the lung.
    """
    centres, axes, rotations = [centre], [], []
    if outward is not None:
        tangent = np.cross(outward, [0.0, 0.0, 1.0])
        tangent /= max(np.linalg.norm(tangent), 1e-9)
        frame = np.stack([outward, tangent, np.cross(outward, tangent)], axis=1)
        stretch = np.array([flatness, flatness**-0.5, flatness**-0.5])
    for k in range(parts):
        if k:
            offset = rng.normal(size=3)
            if outward is not None:
                offset -= 0.8 * (offset @ outward) * outward
            offset *= rng.uniform(0.3, 0.75) * radius_mm / np.linalg.norm(offset)
            centres.append(centre + offset)
        scale = radius_mm * (1.0 if k == 0 else rng.uniform(0.45, 0.8))
        if outward is not None:
            axes.append(scale * rng.uniform(0.75, 1.25, 3) * stretch)
            rotations.append(frame @ _small_rotation(rng, 15.0))
        else:
            axes.append(scale * rng.uniform(0.6, 1.3, 3) * np.array([1.0, 1.0, elongation_z]))
            rotations.append(_random_rotation(rng) if elongation_z == 1.0 else _small_rotation(rng))
    return np.array(centres), np.array(axes), np.array(rotations)


def _small_rotation(rng: np.random.Generator, degrees: float = 25.0) -> np.ndarray:
    """A rotation by up to ``degrees`` about a random axis (keeps an elongated lesion roughly cranio-caudal)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-degrees, degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _choose_centre(sample: LungSample, weights: np.ndarray, placed: list[tuple[np.ndarray, float]], radius: float,
                   rng: np.random.Generator, separation: float = 1.0) -> int:
    """Pick a lung point (its index) by weight, away from the lesions already placed (so they stay separate).

    ``separation`` scales the distance kept (below 1 lesions may touch and merge)."""
    weights = weights.copy()
    for centre, other in placed:
        distance = np.linalg.norm(sample.points - centre, axis=1)
        weights[distance < separation * (1.05 * (radius + other) + 6.0)] *= 1e-6
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        weights = np.ones(len(weights))
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def plan_lesions(anatomy: Anatomy, class_name: str, rng: np.random.Generator, sample: LungSample | None = None,
                 count_factor: float = 1.0, volume_ratio_factor: float = 1.0,
                 volume_range_ml: tuple[float, float] | None = None, separation: float = 1.0) -> list[Lesion]:
    """Draw the lesions of one scan of class ``class_name`` (``covid``, ``cap`` or ``non_pneumonia``).

    Parameters
    ----------
    anatomy, class_name, rng : the patient, the diagnosis and the random stream of the lesions.
    sample : random lung points (drawn from ``rng`` when not given).
    count_factor : multiplies the number of lesions drawn for the class (rounded up, at least 1).
    volume_ratio_factor : multiplies the lesion volume ratio drawn for the class (clipped to 0.4-45 %).
    volume_range_ml : (min, max) volume of one lesion in ml; default at least 2 ml (COVID-19) or 6 ml (CAP).
    separation : scales the distance kept between lesions when they are placed (below 1 they may touch).
    The defaults are the paper-tuned phantoms; the other values make the variants of
    :mod:`dataset_conversion.synthetic_variants`.
    """
    if class_name == "non_pneumonia":
        return []
    if class_name not in ("covid", "cap"):
        raise ValueError(f"unknown class {class_name!r}")
    sample = sample or sample_lung(anatomy, rng)
    covid = class_name == "covid"
    probabilities = COVID_COUNT_PROBABILITIES if covid else CAP_COUNT_PROBABILITIES
    count = int(rng.choice(len(probabilities), p=probabilities / probabilities.sum())) + 1
    if count_factor != 1.0:
        count = max(1, int(np.ceil(count * count_factor)))
    shape, scale = COVID_LVR_GAMMA if covid else CAP_LVR_GAMMA
    ratio = float(np.clip(rng.gamma(shape, scale) * volume_ratio_factor, 0.004, 0.45))
    # COVID lesions vary widely in size (small Dirichlet concentration); CAP lesions are more alike.
    shares = rng.dirichlet(np.full(count, 0.9 if covid else 2.5))
    if volume_range_ml is None:
        volumes = np.maximum(ratio * sample.volume_ml * shares, 2.0 if covid else 6.0)
    else:
        volumes = np.clip(ratio * sample.volume_ml * shares, *volume_range_ml)
    H = anatomy.lung_height_mm
    X, Y, Z = sample.points.T
    hilum_distance = np.minimum(
        np.linalg.norm(sample.points - anatomy.hilum_right, axis=1),
        np.linalg.norm(sample.points - anatomy.hilum_left, axis=1),
    )
    if covid:
        kinds = rng.choice(["ggo", "mixed", "consolidation"], size=count, p=[0.78, 0.18, 0.04])
    else:
        case_kind = rng.choice(["consolidation", "ggo", "mixed"], p=[0.5, 0.3, 0.2])
        kinds = [case_kind if rng.uniform() < 0.75 else rng.choice(["consolidation", "ggo"]) for _ in range(count)]
    # Lower and posterior lungs are favoured (COVID-19 lesions are mostly basal and dorsal).
    lower = np.exp(-0.6 * Z / (0.5 * H)) * (1.0 + 0.8 * np.clip(Y / anatomy.b_in_post, 0, 1))
    lesions, placed = [], []
    for volume, kind in sorted(zip(volumes, kinds), key=lambda item: -item[0]):
        radius = float((3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))
        if covid:
            target_depth = rng.uniform(0.0, 0.35) * radius
            weights = np.exp(-0.5 * ((sample.depth_mm - target_depth) / 5.0) ** 2) * lower
            elongation, parts, edge = 1.0, int(rng.integers(2, 5)), rng.uniform(2.0, 4.0)
        else:
            pleural = kind == "consolidation" and rng.uniform() < 0.12
            target_depth = (rng.uniform(0.1, 0.4) * radius) if pleural else max(1.0 * radius, 22.0)
            weights = np.exp(-0.5 * ((sample.depth_mm - target_depth) / 6.0) ** 2)
            if not pleural:
                weights *= np.exp(-hilum_distance / 60.0)
            elongation, parts, edge = rng.uniform(1.2, 1.7), int(rng.integers(1, 4)), rng.uniform(1.0, 2.0)
        choice = _choose_centre(sample, weights + 1e-12, placed, radius, rng, separation)
        centre = sample.points[choice]
        outward = sample.outward[choice] if covid else None
        centres, axes, rotations = _blob(centre, radius / elongation ** (1 / 3), elongation, parts, rng,
                                         outward=outward, flatness=rng.uniform(0.45, 0.8))
        if kind == "consolidation":
            level, core = rng.uniform(5.0, 50.0), 0.0
        elif kind == "mixed":
            level, core = rng.uniform(-760.0, -640.0), rng.uniform(0.0, 45.0)
        else:
            level, core = rng.uniform(-790.0, -650.0) if covid else rng.uniform(-770.0, -620.0), 0.0
        lesion = Lesion(kind=str(kind), centres=centres, axes=axes, rotations=rotations, level_hu=float(level),
                        core_hu=float(core), edge_mm=float(edge), target_volume_ml=float(volume))
        # Size to the target volume inside the lung: a subpleural blob loses what the pleura cuts off.
        for _ in range(3):
            measured = _in_lung_volume_ml(lesion, anatomy, rng)
            factor = float(np.clip((volume / max(measured, 1e-3)) ** (1.0 / 3.0), 0.7, 1.6))
            if abs(factor - 1.0) < 0.04:
                break
            lesion = Lesion(kind=lesion.kind, centres=centre + (lesion.centres - centre) * factor,
                            axes=lesion.axes * factor, rotations=lesion.rotations, level_hu=lesion.level_hu,
                            core_hu=lesion.core_hu, edge_mm=lesion.edge_mm, target_volume_ml=lesion.target_volume_ml)
        lesions.append(lesion)
        placed.append((centre, float(lesion.axes.max())))
    return lesions
