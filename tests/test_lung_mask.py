"""Classical lung segmentation: phantoms with known lungs and lesions, the real scans, the refusal, the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dataset_conversion import synthetic
from dscovid.cli.lung_mask import main as lung_mask_main
from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry, read_image, read_mask, write_image
from dscovid.io.scans import Scan
from dscovid.preprocessing.lung import (
    LEFT_LUNG,
    RIGHT_LUNG,
    LungMaskSettings,
    lung_volumes_ml,
    segment_lung_sides,
    segment_lungs,
)
from dscovid.preprocessing.lung.filling import _label_maxima
from dscovid.preprocessing.lung.grid import block_mean
from dscovid.preprocessing.lung.morphology import (
    CROSS_3D,
    IN_PLANE,
    _ball_steps,
    convex_hull,
    dilate,
    erode,
    fill_holes_per_slice,
    opening,
)
from dscovid.preprocessing.orientation import reorientation_of

SPACING_ZYX_MM = (4.0, 3.0, 3.0)
REAL_CASES = ("P002", "cap002", "normal001")
REAL_FOLDERS = {"P002": "COVID-19 subjects/P002", "cap002": "Cap subjects/cap002", "normal001": "Normal subjects/normal001"}


def _phantom(with_lungs: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A chest in HU on a (50, 110, 130) grid of 4×3×3 mm, identity direction (x toward the patient's left).

    Body ellipse (muscle 40 HU, 9 mm fat), spine (400 HU), two lung ellipsoids (-850 HU) with the heart between
    them, a trachea from the top slice with two main bronchi into the lungs, a consolidation (30 HU) against the
    lateral pleura of the right lung (part of the reference lung) and -2048 padding outside a round field of view.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = 50, 110, 130
    sz, sy, sx = SPACING_ZYX_MM
    z = (np.arange(nz) * sz)[:, None, None]
    y = ((np.arange(ny) - ny / 2) * sy)[None, :, None]
    x = ((np.arange(nx) - nx / 2) * sx)[None, None, :]
    body = np.broadcast_to((x / 175.0) ** 2 + (y / 140.0) ** 2 <= 1.0, (nz, ny, nx))
    inner = np.broadcast_to((x / 166.0) ** 2 + (y / 131.0) ** 2 <= 1.0, (nz, ny, nx))
    image = np.full((nz, ny, nx), -1000.0)
    image[body] = -100.0
    image[inner] = 40.0
    image[np.broadcast_to((x / 18.0) ** 2 + ((y - 95.0) / 18.0) ** 2 <= 1.0, image.shape)] = 400.0
    lungs = np.zeros(image.shape, dtype=np.uint8)
    lesion = np.zeros(image.shape, dtype=bool)
    trachea = np.zeros(image.shape, dtype=bool)
    if with_lungs:
        for side, centre_x in ((RIGHT_LUNG, -85.0), (LEFT_LUNG, 85.0)):
            lungs[((x - centre_x) / 60.0) ** 2 + (y / 100.0) ** 2 + ((z - 90.0) / 75.0) ** 2 <= 1.0] = side
        lesion = (((x + 140.0) / 12.0) ** 2 + (y / 14.0) ** 2 + ((z - 90.0) / 14.0) ** 2 <= 1.0) & (lungs == RIGHT_LUNG)
        trachea = np.broadcast_to((x / 9.0) ** 2 + ((y + 20.0) / 9.0) ** 2 <= 1.0, image.shape) & (z >= 125.0)
        for sign in (-1.0, 1.0):
            trachea = trachea | (((x - sign * 20.0) / 26.0) ** 2 + ((y + 20.0) / 6.0) ** 2 + ((z - 125.0) / 6.0) ** 2
                                  <= 1.0)
        image[lungs > 0] = -850.0
        image[lesion] = 30.0
        image[trachea] = -1000.0
    image += rng.normal(0.0, 15.0, image.shape)
    image[np.broadcast_to(x**2 + y**2 > 190.0**2, image.shape)] = -2048.0
    return {"image": np.round(image).astype(np.int16), "lungs": lungs, "lesion": lesion, "trachea": trachea & ~(lungs > 0)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom() -> dict[str, np.ndarray]:
    return _phantom()


def test_phantom_lungs_sides_lesion_and_airway(phantom):
    sides = segment_lung_sides(phantom["image"], SPACING_ZYX_MM)
    assert sides.dtype == np.uint8 and sides.shape == phantom["image"].shape
    assert _dice(sides, phantom["lungs"]) > 0.95
    # Sides follow the patient: x index increases toward the patient's left (identity direction).
    for side in (RIGHT_LUNG, LEFT_LUNG):
        assert _dice(sides == side, phantom["lungs"] == side) > 0.95
    # The consolidation against the pleura is inside (a threshold alone would leave it out).
    assert (sides[phantom["lesion"]] > 0).mean() >= 0.97  # measured 0.98: the outer rim at the wall is the loss
    # The trachea above the lungs is not lung.
    above = phantom["trachea"] & (np.arange(phantom["image"].shape[0]) * SPACING_ZYX_MM[0] >= 170.0)[:, None, None]
    assert above.any() and not (sides[above] > 0).any()


def test_orientation_is_read_from_the_direction(phantom):
    """A scan stored with x and z reversed gives the same mask, and right stays right."""
    reference = segment_lung_sides(phantom["image"], SPACING_ZYX_MM)
    flipped = phantom["image"][::-1, :, ::-1]
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    sides = segment_lung_sides(flipped, SPACING_ZYX_MM, direction)
    assert _dice(sides[::-1, :, ::-1] == RIGHT_LUNG, reference == RIGHT_LUNG) > 0.99
    # Transposed axes too (a sagittal-major array), with the direction saying so.
    transposed = np.ascontiguousarray(np.transpose(phantom["image"], (2, 1, 0)))
    swap = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    sides = segment_lung_sides(transposed, SPACING_ZYX_MM[::-1], swap)
    assert _dice(np.transpose(sides, (2, 1, 0)) == LEFT_LUNG, reference == LEFT_LUNG) > 0.99
    # The same array 45 degrees off the swap: a nearest world axis per column picks world y twice (x and y index
    # axes), the best permutation of the three (the preprocessor's) is still the swap, and the mask follows it.
    oblique = (0.075, -0.036, 0.997, -0.704, 0.706, 0.079, 0.706, 0.707, -0.028)
    columns = np.abs(np.reshape(oblique, (3, 3))).argmax(axis=0)
    assert len(set(columns.tolist())) < 3 and reorientation_of(oblique) == reorientation_of(swap)
    assert np.array_equal(segment_lung_sides(transposed, SPACING_ZYX_MM[::-1], oblique), sides)


def test_touching_lungs_are_split_into_right_and_left(phantom):
    image = phantom["image"].copy()
    nz, ny, nx = image.shape
    bridge = np.zeros(image.shape, dtype=bool)
    bridge[10:40, 45:65, nx // 2 - 12 : nx // 2 + 12] = True  # an anterior junction: air across the mid-line
    image[bridge] = -850
    sides = segment_lung_sides(image, SPACING_ZYX_MM)
    volumes = lung_volumes_ml(sides, SPACING_ZYX_MM)
    assert volumes["right"] > 0.35 * (volumes["right"] + volumes["left"])
    assert volumes["left"] > 0.35 * (volumes["right"] + volumes["left"])
    assert _dice(sides[:, :, : nx // 2 - 15] == RIGHT_LUNG, phantom["lungs"][:, :, : nx // 2 - 15] == RIGHT_LUNG) > 0.95


def test_a_single_lung_keeps_its_side(phantom):
    image = phantom["image"].copy()
    image[phantom["lungs"] == LEFT_LUNG] = 40  # the left lung collapsed entirely
    sides = segment_lung_sides(image, SPACING_ZYX_MM)
    assert not (sides == LEFT_LUNG).any()
    assert _dice(sides == RIGHT_LUNG, phantom["lungs"] == RIGHT_LUNG) > 0.95


def test_no_lung_is_refused_with_one_line():
    image = _phantom(with_lungs=False)["image"]
    image[20:30, 50:60, 60:70] = -1000  # a bowel bubble
    with pytest.raises(DscovidError, match="no lung found") as error:
        segment_lungs(image, SPACING_ZYX_MM)
    assert "\n" not in str(error.value)


def _synthetic_scores(indices: range, seed: int = 0, scale: float = 1.0,
                      settings: LungMaskSettings | None = None) -> tuple[list[float], dict[str, float]]:
    """Dice of each generated case against its reference lung, and the lesion fraction inside per class."""
    dices, inside, total = [], {}, {}
    for index in indices:
        image, lesion, lung, geometry, class_name, _ = synthetic.generate_case(seed=seed, index=index, scale=scale)
        mask = segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction, settings)
        dices.append(_dice(mask, lung))
        inside[class_name] = inside.get(class_name, 0) + int((mask[lesion > 0] > 0).sum())
        total[class_name] = total.get(class_name, 0) + int((lesion > 0).sum())
    return dices, {name: inside[name] / count for name, count in total.items() if count}


def _with_and_without(seed: int, index: int, scale: float, step: LungMaskSettings,
                      base: LungMaskSettings | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """(Dice, lesion fraction inside) of one generated case with the ``step`` settings and with ``base``."""
    image, lesion, lung, geometry, _, _ = synthetic.generate_case(seed=seed, index=index, scale=scale)
    scores = []
    for settings in (step, base or LungMaskSettings()):
        mask = segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction, settings)
        scores.append((_dice(mask, lung), float((mask[lesion > 0] > 0).mean())))
    return scores[0], scores[1]


#: The lesion-filling steps switched off one at a time (each setting makes its rule take nothing).
NO_DEEP_DENTS = LungMaskSettings(deep_dent_max_depth_mm=LungMaskSettings.dent_max_depth_mm)
NO_ENCLOSED_BLOBS = LungMaskSettings(enclosed_min_lung_fraction=1.01)


def test_synthetic_cases_dice_and_lesion_coverage():
    """One case of each class (COVID-19 with consolidation, non-pneumonia, CAP): the lungs, and nearly every lesion
    voxel inside (lesions against the mediastinal pleura are what is lost, docs/lung_mask.md)."""
    dices, coverage = _synthetic_scores(range(3))
    assert min(dices) >= 0.95
    assert coverage["covid"] >= 0.95 and coverage["cap"] >= 0.95, coverage


@pytest.mark.slow
def test_synthetic_dataset_dice_and_lesion_coverage():
    """Ten generated cases against their reference lungs and lesion masks."""
    dices, coverage = _synthetic_scores(range(10))
    assert np.mean(dices) >= 0.95 and min(dices) >= 0.9
    for class_name, fraction in coverage.items():
        assert fraction >= 0.97, (class_name, coverage)


def test_consolidation_on_the_heart_is_mostly_inside_through_the_enclosed_blobs():
    """Seed 7 case 4 (CAP) at half scale: one large consolidation lying on the heart, against the mediastinal pleura.

    The enclosed-blob filling takes the part the lung wraps; the part merged with the heart's outline stays out,
    the known limit of the method (docs/lung_mask.md), which the strict xfail below turns into a failure the day it
    is lifted.
    """
    (dice, inside), (_, without) = _with_and_without(7, 4, 0.5, LungMaskSettings(), NO_ENCLOSED_BLOBS)
    assert dice >= 0.95 and inside >= 0.5 and inside >= without + 0.1, (dice, inside, without)


def test_consolidation_filling_the_front_of_a_lung_is_taken_through_deep_costal_dents():
    """Seed 3 case 5 (COVID-19) at half scale: a consolidation filling the anterior half of the left lung, 50-65 mm
    deep per slice.

    Its dents open onto the chest wall only; the deep-dent rule takes them above the lung's base, and both the lung
    and the lesion come out better than without it. The rest lies against the heart.
    """
    (dice, inside), (dice_without, without) = _with_and_without(3, 5, 0.5, LungMaskSettings(), NO_DEEP_DENTS)
    assert dice >= 0.9 and dice > dice_without, (dice, dice_without)
    assert inside >= 0.6 and inside >= without + 0.08, (inside, without)


@pytest.mark.parametrize("index", [9, 4])
def test_consolidations_wrapped_by_the_lung_against_the_mediastinum_and_back_are_inside(index):
    """Seed 1 (the demo's test set) at half scale: case 9, a round consolidation pressed against the mediastinum
    (its dent faces the mediastinum and is 60 mm deep); case 4, one filling the back of the right lung.

    Both are wrapped by the lung in 3D, which the enclosed-blob filling uses: without it most of each stays out.
    Case 4's strip between the lung's hull chord and the curved chest wall stays out unless the chest wall gaps
    are asked for.
    """
    (dice, inside), (_, without) = _with_and_without(1, index, 0.5, LungMaskSettings(), NO_ENCLOSED_BLOBS)
    assert dice >= 0.98 and inside >= 0.9 and inside >= without + 0.4, (dice, inside, without)


@pytest.mark.parametrize("index", [1029, 1026])
def test_consolidation_filling_the_back_of_a_lung_against_the_ribs_is_inside(index):
    """Seed 1 (the demo's test set) at half scale: case 1029 (COVID-19), the back of the left lung consolidated
    against the posterior chest wall; case 1026, the back of the right lung over most of its height.

    The lung wraps them only from the front; with ``chest_wall_gaps`` (opt-in) the rays from the lung's centre to
    the ribs take the tissue beyond the usual gap between lung and ribs. Case 1026's remaining loss is its
    paravertebral part, medial to the rays.
    """
    (dice, inside), (_, default) = _with_and_without(1, index, 0.5, LungMaskSettings(chest_wall_gaps=True))
    assert dice >= 0.95 and inside >= 0.75 and inside >= default + 0.03, (dice, inside, default)


def test_cli_chest_wall_gaps_flag_reaches_the_settings(tmp_path, monkeypatch):
    """Off by default (the preprocessor's masks), on with ``--chest-wall-gaps``."""
    import dscovid.cli.lung_mask as cli

    seen = []
    monkeypatch.setattr(cli, "find_scans", lambda path: [Scan("case", tmp_path / "case.nii.gz")])
    monkeypatch.setattr(cli, "write_lung_masks", lambda scans, out, settings, progress: seen.append(settings) or [])
    for argv, expected in (([], False), (["--chest-wall-gaps"], True)):
        assert cli.main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-q", *argv]) == 0
        assert seen[-1].chest_wall_gaps is expected
    assert LungMaskSettings().chest_wall_gaps is False


@pytest.mark.xfail(strict=True, reason="lesions merged with the heart's outline are left out (docs/lung_mask.md, Limits)")
def test_consolidation_on_the_heart_fully_inside():
    _, coverage = _synthetic_scores(range(4, 5), seed=7, scale=0.5)
    assert coverage["cap"] >= 0.99, coverage


# ------------------------------------------------------------------------------------------- real scans


def _check_real_lungs(sides: np.ndarray, spacing: tuple[float, float, float], case: str) -> None:
    volumes = lung_volumes_ml(sides, spacing)
    for side, millilitres in volumes.items():
        assert 1000.0 <= millilitres <= 4500.0, (case, side, volumes)
    assert 2500.0 <= sum(volumes.values()) <= 8000.0, (case, volumes)


@pytest.mark.realdata
@pytest.mark.parametrize("case", REAL_CASES)
def test_real_scans_two_lungs_of_plausible_volume(test_data, case):
    image, geometry = read_image(test_data / "covid_ct_md_derived" / f"{case}_ct_2p5mm.nii.gz")
    sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
    _check_real_lungs(sides, geometry.spacing_zyx_mm, case)


@pytest.mark.realdata
def test_real_pelvis_is_refused(test_data):
    image, geometry = read_image(test_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    with pytest.raises(DscovidError, match="no lung found: the air inside the body is only"):
        segment_lungs(image, geometry.spacing_zyx_mm, geometry.direction)


@pytest.mark.realdata
def test_lungmask_slices_with_padding_give_two_lungs_in_each_slice(test_data):
    image, geometry = read_image(test_data / "lungmask_testdata")
    assert image.min() == -2048
    sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
    pixel_cm2 = geometry.spacing_zyx_mm[1] * geometry.spacing_zyx_mm[2] / 100.0
    for z in range(image.shape[0]):
        for side in (RIGHT_LUNG, LEFT_LUNG):
            assert (sides[z] == side).sum() * pixel_cm2 > 30.0, (z, side)
        # No padding and no air outside the body in the mask.
        assert not (sides[z] > 0)[image[z] == -2048].any()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("case", REAL_CASES)
def test_real_dicom_series_full_resolution(test_data, case):
    image, geometry = read_image(test_data / "covid_ct_md" / REAL_FOLDERS[case])
    sides = segment_lung_sides(image, geometry.spacing_zyx_mm, geometry.direction)
    _check_real_lungs(sides, geometry.spacing_zyx_mm, case)


# ---------------------------------------------------------------------------------------------- command


def _write_phantom(path: Path, with_lungs: bool) -> Geometry:
    image = _phantom(with_lungs=with_lungs)["image"]
    geometry = Geometry(image.shape, SPACING_ZYX_MM, (-195.0, -165.0, 10.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_image(image, geometry, path)
    return geometry


def test_command_writes_masks_and_reports_failures(tmp_path, capsys):
    inputs = tmp_path / "in"
    geometry = _write_phantom(inputs / "chest_0000.nii.gz", with_lungs=True)
    _write_phantom(inputs / "pelvis.nii.gz", with_lungs=False)
    status = lung_mask_main(["-i", str(inputs), "-o", str(tmp_path / "out"), "-q"])
    assert status == 1
    assert "pelvis: no lung found" in capsys.readouterr().err
    mask, written = read_mask(tmp_path / "out" / "chest.nii.gz", reference=geometry)
    assert written.matches(geometry) and mask.max() == 1
    assert not (tmp_path / "out" / "pelvis.nii.gz").exists()


def test_command_refuses_a_missing_input(tmp_path, capsys):
    assert lung_mask_main(["-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_the_dent_depths_are_scipys_label_maxima():
    """The per-dent depth (largest distance inside each label) equals ``ndimage.maximum`` exactly, which it replaces."""
    rng = np.random.default_rng(4)
    for _ in range(30):
        labels, count = ndimage.label(rng.random((40, 57)) > 0.55)
        values = rng.random((40, 57)) * 30.0
        assert np.array_equal(_label_maxima(values, labels, count),
                              np.asarray(ndimage.maximum(values, labels, np.arange(1, count + 1))))


def _random_masks(seed: int, count: int):
    """Smooth random 3D masks of odd sizes, some a single slice or row thick."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(v) for v in rng.integers(1, 22, 3))
        yield rng, ndimage.gaussian_filter(rng.random(shape), 1.2) > rng.uniform(0.4, 0.6)


def test_the_fast_morphology_is_scipys():
    """The shifted-view dilations, erosions and openings give SciPy's results for every step the lung mask uses."""
    steps = [IN_PLANE, CROSS_3D, *_ball_steps(8.0, np.array([2.0, 1.0, 1.0]))[:2]]
    for rng, mask in _random_masks(5, 25):
        within = rng.random(mask.shape) > 0.3
        for step in steps:
            for iterations in (1, 2):
                assert np.array_equal(dilate(mask, step, iterations), ndimage.binary_dilation(mask, step, iterations))
                assert np.array_equal(dilate(mask, step, iterations, within=within),
                                      ndimage.binary_dilation(mask, step, iterations, mask=within))
                for border in (0, 1):
                    assert np.array_equal(erode(mask, step, iterations, border_value=border),
                                          ndimage.binary_erosion(mask, step, iterations, border_value=border))
                assert np.array_equal(opening(mask, step, iterations), ndimage.binary_opening(mask, step, iterations))
        assert np.array_equal(fill_holes_per_slice(mask), ndimage.binary_fill_holes(mask, IN_PLANE))
        assert np.array_equal(fill_holes_per_slice(~mask), ndimage.binary_fill_holes(~mask, IN_PLANE))
    with pytest.raises(ValueError, match="in-plane cross or square"):
        dilate(np.ones((3, 3, 3), dtype=bool), np.ones((3, 3, 3), dtype=bool))


def test_convex_hull_is_scikit_images():
    """Row by row, the hull is scikit-image's ``convex_hull_image`` pixel for pixel, outline pixels included."""
    from skimage.morphology import convex_hull_image

    rng = np.random.default_rng(6)
    for trial in range(600):
        shape = tuple(int(v) for v in rng.integers(1, 50, 2))
        if trial % 3 == 0:
            mask = rng.random(shape) > rng.uniform(0.9, 0.999)  # scattered points: long thin edges
        elif trial % 3 == 1:
            mask = ndimage.gaussian_filter(rng.random(shape), 2.0) > rng.uniform(0.45, 0.55)
        else:
            mask = np.zeros(shape, dtype=bool)  # a single pixel or a row: the smallest hulls
            mask[rng.integers(shape[0]), rng.integers(shape[1]) : rng.integers(shape[1]) + 1 + trial % 2] = True
        if not mask.any():
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        columns = np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
        expected = np.zeros(shape, dtype=bool)
        expected[box] = convex_hull_image(mask[box])
        assert np.array_equal(convex_hull(mask), expected), trial


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32])
def test_block_mean_is_the_mean_of_the_clipped_blocks(dtype):
    rng = np.random.default_rng(7)
    image = rng.integers(0 if dtype == np.uint16 else -3024, 4000, (37, 23, 40)).astype(dtype)
    for factors in [(1, 1, 1), (2, 2, 2), (3, 2, 3), (4, 3, 3)]:
        nz, ny, nx = (n // f for n, f in zip(image.shape, factors))
        clipped = np.clip(image.astype(np.float64), -1024, 3071)[: nz * factors[0], : ny * factors[1], : nx * factors[2]]
        expected = clipped.reshape(nz, factors[0], ny, factors[1], nx, factors[2]).mean(axis=(1, 3, 5))
        assert np.array_equal(block_mean(image, factors), expected.astype(np.float32))
