"""The analytic chest of the synthetic phantoms: tissues as functions of patient coordinates in mm.

Patient coordinates ``(X, Y, Z)`` are LPS axes centred in the thorax: ``X`` grows toward the patient's left,
``Y`` toward the back, ``Z`` toward the head, all in mm. Every function here takes coordinate arrays of any
(broadcastable) shape, so the same anatomy can be sampled on any voxel grid (spacing changes the resolution, not
the anatomy) and at scattered points (lesion placement, vessel growth).

The model is deliberately simple but has what a chest CT shows and what a lung segmentation or a lesion model must
cope with: skin and subcutaneous fat, chest-wall and back muscles, ribs with cortex and marrow, costal cartilage,
sternum, scapulae, the spine (vertebral bodies, discs, canal, posterior elements), the mediastinum (fat, heart,
aorta, pulmonary trunk, vena cava, trachea and main bronchi, oesophagus), two lungs with diaphragm domes, apices,
costophrenic recesses and a dependent density gradient, and the upper abdomen (liver, spleen, stomach with gas).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Hounsfield values of air and of the tissues that do not vary between phantoms.
AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
CSF_HU = 12.0
DISC_HU = 85.0
CARTILAGE_HU = 120.0


@dataclass(frozen=True)
class Anatomy:
    """The numbers that fix one patient's chest (all lengths in mm, patient coordinates as in the module doc).

    ``a_in``, ``b_in_ant``, ``b_in_post`` are the semi-axes of the inner thoracic outline (inside the ribs) at its
    widest; the chest wall layers (``rib_mm``, ``muscle_mm``, ``back_muscle_mm``, ``fat_mm``) surround it. The lungs
    span ``Z`` in about ``[-H/2, H/2]`` with ``H = lung_height_mm``.
    """

    a_in: float
    b_in_ant: float
    b_in_post: float
    rib_mm: float
    muscle_mm: float
    back_muscle_mm: float
    fat_mm: float
    lung_height_mm: float
    dome_right_mm: float
    dome_left_mm: float
    mediastinum_half_width_mm: float
    mediastinum_shift_mm: float
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    vertebra_y_mm: float
    vertebra_axes: tuple[float, float]
    rib_pitch_mm: float
    rib_width_mm: float
    rib_phase_mm: float
    rib_slope: float
    disc_phase_mm: float
    aorta_radius_mm: float
    trachea_radius_mm: float
    carina_z_mm: float
    blood_hu: float
    lung_hu: float
    lung_gradient_hu: float
    vertebra_hu: float
    liver_hu: float
    texture_waves: tuple[tuple[float, float, float, float, float], ...]
    atelectasis_mm: float
    emphysema: bool

    @property
    def apex_z(self) -> float:
        return 0.5 * self.lung_height_mm

    @property
    def base_z(self) -> float:
        return -0.5 * self.lung_height_mm

    @property
    def hilum_right(self) -> np.ndarray:
        return np.array([self.mediastinum_shift_mm - self.mediastinum_half_width_mm - 4.0, 0.0,
                         0.06 * self.lung_height_mm])

    @property
    def hilum_left(self) -> np.ndarray:
        return np.array([self.mediastinum_shift_mm + self.mediastinum_half_width_mm + 4.0, 0.0,
                         0.04 * self.lung_height_mm])

    @property
    def carina(self) -> np.ndarray:
        return np.array([0.0, 0.1 * self.b_in_post, self.carina_z_mm])

    @property
    def top_z(self) -> float:
        """Upper end of the field that must be scanned (above the lung apices)."""
        return self.apex_z + 25.0

    @property
    def bottom_z(self) -> float:
        """Lower end of the field that must be scanned (below the costophrenic recesses)."""
        return self.base_z - 30.0

    def body_half_extent(self) -> tuple[float, float, float]:
        """Largest half-widths of the body along X, and anterior/posterior extents along Y (mm)."""
        lateral = self.a_in * 1.04 + self.rib_mm + self.muscle_mm + 5.0 + self.fat_mm
        anterior = self.b_in_ant * 1.02 + self.rib_mm + self.muscle_mm + self.fat_mm
        posterior = self.b_in_post + self.rib_mm + self.back_muscle_mm + self.fat_mm
        return lateral, anterior, posterior


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: size, chest-wall thickness, organ positions and densities vary between patients."""
    size = float(np.clip(rng.normal(1.0, 0.07), 0.84, 1.18))
    build = float(rng.uniform(0.0, 1.0))  # 0 lean .. 1 obese: subcutaneous fat thickness
    a_in = 138.0 * size * rng.uniform(0.95, 1.05)
    b_ant = 84.0 * size * rng.uniform(0.92, 1.08)
    b_post = 92.0 * size * rng.uniform(0.92, 1.08)
    height = 235.0 * size * rng.uniform(0.9, 1.1)
    contrast = rng.uniform() < 0.15  # a few scans with intravenous contrast: bright blood
    waves = []
    for _ in range(6):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(12.0, 45.0)
        k = 2.0 * np.pi / wavelength * direction
        waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(3, 8))))
    return Anatomy(
        a_in=a_in,
        b_in_ant=b_ant,
        b_in_post=b_post,
        rib_mm=rng.uniform(9.0, 12.0) * size,
        muscle_mm=rng.uniform(6.0, 12.0) * size,
        back_muscle_mm=rng.uniform(30.0, 42.0) * size,
        fat_mm=5.0 + 28.0 * build**1.5,
        lung_height_mm=height,
        dome_right_mm=rng.uniform(0.3, 0.4) * height,
        dome_left_mm=rng.uniform(0.24, 0.33) * height,
        mediastinum_half_width_mm=rng.uniform(0.11, 0.14) * a_in,
        mediastinum_shift_mm=rng.uniform(0.02, 0.07) * a_in,
        heart_centre=(0.2 * a_in * rng.uniform(0.8, 1.2), -0.28 * b_ant, -0.2 * height * rng.uniform(0.9, 1.1)),
        heart_axes=(0.42 * a_in * rng.uniform(0.9, 1.12), 0.55 * b_ant, 0.24 * height * rng.uniform(0.9, 1.1)),
        vertebra_y_mm=0.74 * b_post,
        vertebra_axes=(21.0 * size, 16.0 * size),
        rib_pitch_mm=rng.uniform(26.0, 32.0) * size,
        rib_width_mm=rng.uniform(7.0, 10.0) * size,
        rib_phase_mm=rng.uniform(0.0, 30.0),
        rib_slope=rng.uniform(40.0, 50.0) * size,
        disc_phase_mm=rng.uniform(0.0, 30.0),
        aorta_radius_mm=rng.uniform(11.0, 15.0) * size,
        trachea_radius_mm=rng.uniform(8.0, 10.0) * size,
        carina_z_mm=0.12 * height,
        blood_hu=float(rng.uniform(160.0, 280.0)) if contrast else float(rng.uniform(35.0, 50.0)),
        lung_hu=float(rng.uniform(-905.0, -870.0)),
        lung_gradient_hu=float(rng.uniform(25.0, 70.0)),
        vertebra_hu=float(rng.uniform(320.0, 420.0)),
        liver_hu=float(rng.uniform(50.0, 65.0)),
        texture_waves=tuple(waves),
        atelectasis_mm=float(rng.uniform(4.0, 10.0)) if rng.uniform() < 0.3 else 0.0,
        emphysema=bool(rng.uniform() < 0.12),
    )


# ----------------------------------------------------------------------------------------------------------------
# Shapes


def _taper(anatomy: Anatomy, Z: np.ndarray) -> np.ndarray:
    """Scale of the thoracic outline along Z: narrow toward the apices, slightly wider at the bases."""
    H = anatomy.lung_height_mm
    upper = np.clip((Z - 0.05 * H) / (0.5 * H), 0.0, 1.2)
    lower = np.clip(-Z / (0.5 * H), 0.0, 1.5)
    return 1.0 - 0.32 * upper**2 + 0.04 * lower


def _shoulder(anatomy: Anatomy, Z: np.ndarray) -> np.ndarray:
    """Extra muscle (mm) of the shoulder girdle above the upper chest, keeping the body outline wide there."""
    H = anatomy.lung_height_mm
    return 28.0 * np.clip((Z - 0.25 * H) / (0.35 * H), 0.0, 1.0) ** 1.5


def thorax_radius(anatomy: Anatomy, X, Y, Z, outward_mm=0.0, back_extra_mm=0.0):
    """Normalised elliptic radius (< 1 inside) of the inner thoracic outline grown by ``outward_mm``.

    ``back_extra_mm`` grows the posterior half further (the back muscles are thicker than the chest wall).
    """
    taper = _taper(anatomy, Z)
    a = anatomy.a_in * taper + outward_mm
    b = np.where(Y < 0, anatomy.b_in_ant * (0.5 + 0.5 * taper) + outward_mm,
                 anatomy.b_in_post * (0.6 + 0.4 * taper) + outward_mm + back_extra_mm)
    return np.sqrt((X / a) ** 2 + (Y / b) ** 2)


def dome_z(anatomy: Anatomy, X, Y):
    """Height (Z, mm) of the diaphragm under each point: two domes, the right one higher, deep posterior recesses."""
    H = anatomy.lung_height_mm
    a, b = anatomy.a_in, 0.5 * (anatomy.b_in_ant + anatomy.b_in_post)
    right = anatomy.dome_right_mm * np.clip(1.0 - ((X + 0.42 * a) / (0.78 * a)) ** 2 - ((Y + 0.15 * b) / b) ** 2, 0, 1)
    left = anatomy.dome_left_mm * np.clip(1.0 - ((X - 0.42 * a) / (0.78 * a)) ** 2 - ((Y + 0.15 * b) / b) ** 2, 0, 1)
    return -0.5 * H + 0.03 * H * (1.0 - Y / b) + np.maximum(right, left)


def apex_z(anatomy: Anatomy, X, Y):
    """Height (Z, mm) of the lung apex above each point: one dome per lung."""
    H = anatomy.lung_height_mm
    a = anatomy.a_in
    lateral = (np.abs(X - anatomy.mediastinum_shift_mm) - 0.45 * a) / (0.6 * a)
    sagittal = (Y - 0.15 * anatomy.b_in_post) / (0.9 * anatomy.b_in_post)
    return 0.5 * H - 0.22 * H * (lateral**2 + sagittal**2)


def _ellipsoid(X, Y, Z, centre, axes):
    return ((X - centre[0]) / axes[0]) ** 2 + ((Y - centre[1]) / axes[1]) ** 2 + ((Z - centre[2]) / axes[2]) ** 2


def capsule_distance(X, Y, Z, start, end):
    """Distance (mm) from each point to the segment ``start``-``end`` (3-vectors in patient mm)."""
    start = np.asarray(start, dtype=float)
    axis = np.asarray(end, dtype=float) - start
    length2 = float(axis @ axis)
    dx, dy, dz = X - start[0], Y - start[1], Z - start[2]
    t = np.clip((dx * axis[0] + dy * axis[1] + dz * axis[2]) / length2, 0.0, 1.0)
    return np.sqrt((dx - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dz - t * axis[2]) ** 2)


def _great_vessels(anatomy: Anatomy) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Capsules (start, end, radius) of the aorta, pulmonary trunk and arteries, and superior vena cava."""
    H, a, bp, ba = anatomy.lung_height_mm, anatomy.a_in, anatomy.b_in_post, anatomy.b_in_ant
    heart_top = anatomy.heart_centre[2] + 0.6 * anatomy.heart_axes[2]
    arch_z = 0.24 * H
    r = anatomy.aorta_radius_mm
    ascending = np.array([0.03 * a, -0.22 * ba, heart_top]), np.array([0.02 * a, -0.2 * ba, arch_z])
    arch = np.array([0.02 * a, -0.2 * ba, arch_z]), np.array([0.16 * a, 0.42 * bp, arch_z])
    descending = np.array([0.16 * a, 0.42 * bp, arch_z]), np.array([0.12 * a, 0.45 * bp, anatomy.base_z - 40.0])
    trunk = np.array([0.08 * a, -0.38 * ba, heart_top - 10.0]), np.array([0.16 * a, -0.1 * ba, 0.1 * H])
    right_pa = np.array([0.16 * a, -0.1 * ba, 0.1 * H]), anatomy.hilum_right
    left_pa = np.array([0.16 * a, -0.1 * ba, 0.1 * H]), anatomy.hilum_left
    svc = np.array([-0.13 * a, -0.15 * ba, 0.45 * H]), np.array([-0.1 * a, -0.2 * ba, heart_top - 15.0])
    return [(*ascending, r * 1.1), (*arch, r), (*descending, r * 0.9), (*trunk, r * 1.05),
            (*right_pa, r * 0.75), (*left_pa, r * 0.7), (*svc, r * 0.75)]


def _airway_capsules(anatomy: Anatomy) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Trachea and the two main bronchi (start, end, outer radius)."""
    carina = anatomy.carina
    top = np.array([0.0, 0.05 * anatomy.b_in_post, anatomy.top_z + 80.0])
    r = anatomy.trachea_radius_mm
    return [(top, carina, r), (carina, anatomy.hilum_right, 0.72 * r), (carina, anatomy.hilum_left, 0.65 * r)]


def mediastinum_mask(anatomy: Anatomy, X, Y, Z, margin_mm=0.0):
    """Everything between the lungs that they may not enter: the central band, heart, spine, aorta (with a margin)."""
    H = anatomy.lung_height_mm
    upper = np.clip((Z - 0.05 * H) / (0.3 * H), 0.0, 1.0)
    # Widest around the trachea and great vessels, narrow where the lungs meet in front of and behind them.
    profile = 0.35 + 0.65 * np.exp(-(((Y - 0.05 * anatomy.b_in_post) / (0.5 * anatomy.b_in_post)) ** 2))
    half_width = anatomy.mediastinum_half_width_mm * (1.0 + 0.3 * upper) * profile + margin_mm
    band = np.abs(X - anatomy.mediastinum_shift_mm) < half_width
    heart_axes = tuple(v + margin_mm for v in anatomy.heart_axes)
    heart = _ellipsoid(X, Y, Z, anatomy.heart_centre, heart_axes) < 1.0
    va, vb = anatomy.vertebra_axes
    spine = (X / (va + 6 + margin_mm)) ** 2 + ((Y - anatomy.vertebra_y_mm) / (vb + 8 + margin_mm)) ** 2 < 1.0
    mask = band | heart | spine
    for start, end, radius in _great_vessels(anatomy)[2:3]:  # the descending aorta runs beside the spine
        mask |= capsule_distance(X, Y, Z, start, end) < radius + 2.0 + margin_mm
    return mask


def lung_mask(anatomy: Anatomy, X, Y, Z):
    """True inside either lung (including its vessels and small airways), at each point."""
    inside = thorax_radius(anatomy, X, Y, Z) < 1.0
    inside &= Z > dome_z(anatomy, X, Y)
    inside &= Z < apex_z(anatomy, X, Y)
    inside &= ~mediastinum_mask(anatomy, X, Y, Z)
    return inside


def is_left(anatomy: Anatomy, X) -> np.ndarray:
    """True on the patient's left of the mediastinum (LPS: larger X)."""
    return np.asarray(X) > anatomy.mediastinum_shift_mm


def texture(anatomy: Anatomy, X, Y, Z, scale: float = 1.0):
    """A smooth random field (HU, about ±15) that varies over 1-5 cm, shared by every grid of one patient."""
    field = np.zeros(np.broadcast_shapes(np.shape(X), np.shape(Y), np.shape(Z)), dtype=np.float32)
    for kx, ky, kz, phase, amplitude in anatomy.texture_waves:
        field += amplitude * np.cos(kx * scale * X + ky * scale * Y + kz * scale * Z + phase)
    return field


# ----------------------------------------------------------------------------------------------------------------
# Tissues


def tissue_hu(anatomy: Anatomy, X, Y, Z):
    """Hounsfield values of the anatomy at each point, before vessels, airways beyond the hila, lesions and blur.

    Each structure is evaluated only on the points of the compartment that can hold it (for speed).

    Returns
    -------
    hu : float32 array of the broadcast shape, in HU.
    lung : bool array, True inside the lungs (where ``hu`` holds lung parenchyma).
    """
    X, Y, Z = np.broadcast_arrays(X, Y, Z)
    H = anatomy.lung_height_mm
    hu = np.full(X.shape, AIR_HU, dtype=np.float32)
    lung = np.zeros(X.shape, dtype=bool)

    back = anatomy.back_muscle_mm - anatomy.muscle_mm
    wall = anatomy.rib_mm + anatomy.muscle_mm
    body = thorax_radius(anatomy, X, Y, Z, wall + anatomy.fat_mm + _shoulder(anatomy, Z), back) < 1.0
    x, y, z = X[body], Y[body], Z[body]
    h = np.full(x.shape, FAT_HU, dtype=np.float32)
    muscle = thorax_radius(anatomy, x, y, z, wall + _shoulder(anatomy, z), back) < 1.0
    h[muscle] = MUSCLE_HU
    r_in = thorax_radius(anatomy, x, y, z)
    outside_ribs = thorax_radius(anatomy, x, y, z, anatomy.rib_mm) >= 1.0
    _on(h, muscle & outside_ribs, _scapulae, anatomy, x, y, z)
    # Ribs fill the outer part of the rib layer; the inner part is intercostal muscle and pleura.
    _on(h, ~outside_ribs & (thorax_radius(anatomy, x, y, z, 0.3 * anatomy.rib_mm) >= 1.0), _ribs, anatomy, x, y, z)

    inner = r_in < 1.0
    xi, yi, zi = x[inner], y[inner], z[inner]
    # Inside the ribs but outside the lungs: mediastinal fat, with neck soft tissue above the apices.
    hi = np.full(xi.shape, FAT_HU, dtype=np.float32)
    dome = dome_z(anatomy, xi, yi)
    apex = apex_z(anatomy, xi, yi)
    hi[(zi > apex) & (zi > 0.3 * H)] = 30.0
    below = zi <= dome
    _on(hi, below, _abdomen, anatomy, xi, yi, zi, dome)
    central = ~below & (np.abs(xi) < 0.6 * anatomy.a_in)
    _on(hi, central, _mediastinum, anatomy, xi, yi, zi)
    lung_inner = ~below & (zi < apex) & ~mediastinum_mask(anatomy, xi, yi, zi)
    hi[lung_inner] = _parenchyma(anatomy, xi[lung_inner], yi[lung_inner], zi[lung_inner], dome[lung_inner])
    h[inner] = hi
    spine = (np.abs(x) < 45.0) & (y > anatomy.vertebra_y_mm - anatomy.vertebra_axes[1] - 2.0)
    spine &= ~_inside_indices(inner, lung_inner | below)
    _on(h, spine, _spine, anatomy, x, y, z)
    hu[body] = h
    in_body_lung = np.zeros(x.shape, dtype=bool)
    in_body_lung[inner] = lung_inner
    lung[body] = in_body_lung
    return hu, lung


def _inside_indices(outer: np.ndarray, inner_selection: np.ndarray) -> np.ndarray:
    """Expand a selection made on ``array[outer]`` back to the shape of ``outer``."""
    full = np.zeros(outer.shape, dtype=bool)
    full[outer] = inner_selection
    return full


def _on(hu: np.ndarray, select: np.ndarray, paint, anatomy: Anatomy, X, Y, Z, *extra) -> None:
    """Run ``paint(anatomy, hu_subset, X, Y, Z, *extra)`` on the selected points only and write the result back."""
    if not select.any():
        return
    subset = hu[select]
    paint(anatomy, subset, X[select], Y[select], Z[select], *(e[select] for e in extra))
    hu[select] = subset


def _parenchyma(anatomy: Anatomy, X, Y, Z, dome):
    """Lung parenchyma HU: denser toward the back (gravity), smooth texture, optional emphysema and atelectasis."""
    b = anatomy.b_in_post
    value = anatomy.lung_hu + anatomy.lung_gradient_hu * np.clip((Y + b) / (2 * b), 0, 1) + texture(anatomy, X, Y, Z)
    if anatomy.emphysema:
        # Centrilobular emphysema: patches of very low attenuation in the upper lungs.
        patches = texture(anatomy, X, Y, Z, scale=2.3) > 14.0
        value = np.where(patches & (Z > 0), -965.0, value)
    if anatomy.atelectasis_mm > 0:
        # Dependent subpleural atelectasis at the bases: a dense posterior band that is not pneumonia.
        posterior_depth = (1.0 - thorax_radius(anatomy, X, Y, Z)) * b
        band = (Y > 0.3 * b) & (posterior_depth < anatomy.atelectasis_mm) & (Z < dome + 0.35 * anatomy.lung_height_mm)
        value = np.where(band, -420.0 + 2.0 * texture(anatomy, X, Y, Z, scale=1.7), value)
    return value.astype(np.float32)


def _ribs(anatomy: Anatomy, hu, X, Y, Z):
    """Rib layer: ribs as oblique bands (cortex bright, marrow darker), cartilage anteriorly, the sternum."""
    # A rib descends from the spine to the sternum: its height drops with the angle from the back.
    from_back = np.arccos(np.clip(Y / np.maximum(np.hypot(X, Y), 1e-3), -1.0, 1.0))
    phase = np.mod(Z + anatomy.rib_slope * from_back + anatomy.rib_phase_mm, anatomy.rib_pitch_mm)
    rib = (phase < anatomy.rib_width_mm) & (Z < anatomy.apex_z + 10) & (Z > anatomy.base_z - 15)
    sternal = np.abs(X) < 16.0
    cartilage = rib & (Y < -0.55 * anatomy.b_in_ant) & (np.abs(X) < 0.55 * anatomy.a_in)
    edge = np.minimum(phase, anatomy.rib_width_mm - phase) < 1.8
    bone = rib & ~cartilage & ~sternal
    hu[bone] = np.where(edge[bone], 750.0, 330.0)
    hu[cartilage & ~sternal] = CARTILAGE_HU
    sternum = sternal & (Y < 0) & (Z < 0.4 * anatomy.lung_height_mm) & (Z > -0.35 * anatomy.lung_height_mm)
    hu[sternum] = 420.0


def _scapulae(anatomy: Anatomy, hu, X, Y, Z):
    """Flat bone plates in the upper back muscles, lateral to the spine."""
    H = anatomy.lung_height_mm
    middle = thorax_radius(anatomy, X, Y, Z, anatomy.rib_mm + 12.0, 6.0)
    plate = (np.abs(middle - 1.0) * anatomy.b_in_post < 2.5) & (Y > 0.35 * anatomy.b_in_post)
    plate &= (np.abs(X) > 0.35 * anatomy.a_in) & (Z > -0.05 * H) & (Z < 0.42 * H)
    hu[plate] = 520.0


def _spine(anatomy: Anatomy, hu, X, Y, Z):
    """Vertebral bodies with discs and cortex, the spinal canal, laminae, spinous and transverse processes."""
    va, vb = anatomy.vertebra_axes
    vy = anatomy.vertebra_y_mm
    radius = np.sqrt((X / va) ** 2 + ((Y - vy) / vb) ** 2)
    vertebral_body = radius < 1.0
    disc = np.mod(Z + anatomy.disc_phase_mm, anatomy.rib_pitch_mm) < 6.0
    hu[vertebral_body] = anatomy.vertebra_hu
    hu[vertebral_body & (radius > 0.85)] = 700.0
    hu[vertebral_body & disc] = DISC_HU
    canal_y = vy + vb + 11.0
    canal_r = np.sqrt(X**2 + (Y - canal_y) ** 2)
    lamina = (canal_r < 16.0) & (canal_r >= 9.5) & (Y > vy + 0.6 * vb)
    spinous = (np.abs(X) < 4.5) & (Y > canal_y) & (Y < canal_y + 42.0)
    transverse = (np.abs(X) < 40.0) & (np.abs(X) > 8.0) & (np.abs(Y - canal_y + 2.0) < 5.5)
    hu[(lamina | spinous | transverse) & ~disc] = 560.0
    hu[canal_r < 9.5] = CSF_HU


def _mediastinum(anatomy: Anatomy, hu, X, Y, Z):
    """Heart, great vessels, trachea, main bronchi and oesophagus (points inside the chest, above the diaphragm)."""
    inside_heart = _ellipsoid(X, Y, Z, anatomy.heart_centre, anatomy.heart_axes)
    heart = inside_heart < 1.0
    hu[heart] = MUSCLE_HU
    if anatomy.blood_hu > 100:  # with contrast the chambers light up inside the myocardium
        hu[inside_heart < 0.55] = anatomy.blood_hu
    for start, end, radius in _great_vessels(anatomy):
        hu[capsule_distance(X, Y, Z, start, end) < radius] = anatomy.blood_hu
    oesophagus = (np.abs(X - 0.06 * anatomy.a_in) < 9.0) & (np.abs(Y - 0.3 * anatomy.b_in_post) < 7.0)
    hu[oesophagus] = 35.0
    for start, end, radius in _airway_capsules(anatomy):
        distance = capsule_distance(X, Y, Z, start, end)
        wall = max(1.5, 0.2 * radius)
        hu[distance < radius] = 30.0
        hu[distance < radius - wall] = AIR_HU


def _abdomen(anatomy: Anatomy, hu, X, Y, Z, dome):
    """Below the diaphragm: diaphragm muscle, liver on the right, stomach (with a gas cap) and spleen on the left."""
    hu[:] = 25.0
    a, bp, ba = anatomy.a_in, anatomy.b_in_post, anatomy.b_in_ant
    liver = (Z < dome - 5.0) & (X < 0.12 * a + 0.2 * (Y + bp))
    hu[liver] = anatomy.liver_hu
    top_left = anatomy.base_z + anatomy.dome_left_mm
    stomach_centre = (0.42 * a, -0.35 * ba, top_left - 45.0)
    stomach = (_ellipsoid(X, Y, Z, stomach_centre, (0.3 * a, 0.42 * ba, 40.0)) < 1.0) & ~liver
    hu[stomach] = 15.0
    hu[stomach & (Z > stomach_centre[2] + 22.0)] = AIR_HU
    spleen = _ellipsoid(X, Y, Z, (0.62 * a, 0.45 * bp, top_left - 35.0), (0.2 * a, 0.38 * bp, 45.0)) < 1.0
    hu[spleen & ~stomach] = 48.0
    hu[Z > dome - 5.0] = MUSCLE_HU  # the diaphragm
