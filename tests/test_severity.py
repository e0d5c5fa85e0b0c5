"""The six-zone severity score and the MosMedData category (dscovid.measurements.severity)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dscovid.io.image_io import Geometry
from dscovid.measurements.findings import lung_involvement
from dscovid.measurements.severity import ZONES, involvement_score, mosmed_category, severity_score
from dscovid.prediction.lesion_report import REPORT_KEYS, lesion_report
from dscovid.prediction.output_folder import csv_rows

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_scores_follow_the_documented_intervals():
    for share, score in [(0.0, 0), (math.nan, 0), (1e-9, 1), (0.2499, 1), (0.25, 2), (0.4999, 2), (0.5, 3),
                         (0.7499, 3), (0.75, 4), (1.0, 4)]:
        assert involvement_score(share) == score, share
    assert [mosmed_category(s) for s in (0.0, 0.1, 0.3, 0.6, 0.9)] == ["CT-0", "CT-1", "CT-2", "CT-3", "CT-4"]


def _two_lungs() -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """Two box lungs of 30 slices (z index 5..34) on an identity grid: x < 20 is the patient's right.

    The right lung's lesion fills its upper third completely and half of its lower third; the left lung has one lesion
    voxel in its middle third. With the identity direction, world z grows with the index: index 34 is the top.
    """
    shape = (40, 20, 40)
    lung = np.zeros(shape, np.uint8)
    lung[5:35, 4:16, 2:18] = 1  # right lung (low x = patient's right in LPS)
    lung[5:35, 4:16, 22:38] = 1  # left lung
    lesion = np.zeros(shape, np.uint8)
    lesion[25:35, 4:16, 2:18] = 1  # the top 10 slices of the right lung: its upper zone
    lesion[5:15, 4:16, 2:10] = 1  # half of the right lower zone
    lesion[20, 8, 30] = 1  # one voxel in the left middle zone
    geometry = Geometry(shape, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    return np.zeros(shape, np.int16), lesion, lung, geometry


def test_zone_scores_of_a_phantom_with_known_involvement():
    _, lesion, lung, geometry = _two_lungs()
    result = severity_score(lesion, lung, geometry)
    zones = result["severity_zones"]
    assert list(zones) == list(ZONES)
    assert {name: zones[name]["score"] for name in ZONES} == {
        "right_upper": 4, "right_middle": 0, "right_lower": 3, "left_upper": 0, "left_middle": 1, "left_lower": 0}
    assert zones["right_upper"]["involvement"] == 1.0 and zones["right_lower"]["involvement"] == 0.5
    assert result["severity_score"] == 8
    whole_share = lesion.sum() / lung.sum()  # the lesion lies inside the lung
    assert result["mosmed_category"] == mosmed_category(whole_share) == "CT-2"
    # The zones of one lung add up to its lung's reported involvement, and their volumes to the lung volume.
    involvement = lung_involvement(lesion, lung, geometry)
    voxel_ml = 2.0 / 1000
    for side in ("right", "left"):
        parts = [zones[f"{side}_{part}"] for part in ("upper", "middle", "lower")]
        assert math.isclose(sum(p["lesion_ml"] for p in parts), involvement[side]["lesion_voxels"] * voxel_ml)
        assert math.isclose(sum(p["lung_ml"] for p in parts), involvement[side]["lung_voxels"] * voxel_ml)


def _flipped(geometry: Geometry, axis: int) -> Geometry:
    """The geometry of the same physical object with its array reversed along ``axis`` (0 z, 1 y, 2 x)."""
    direction = geometry.direction_matrix.copy()
    column = 2 - axis  # direction columns are in (x, y, z) order
    matrix = geometry.index_to_world_matrix()
    last = [0, 0, 0]
    last[axis] = geometry.shape_zyx[axis] - 1
    origin = (matrix @ np.array([*last, 1.0]))[:3]
    direction[:, column] *= -1
    return Geometry(geometry.shape_zyx, geometry.spacing_zyx_mm, tuple(origin), tuple(direction.ravel()))


@pytest.mark.parametrize("axis", [0, 2])
def test_zones_are_physical_the_same_object_stored_flipped_scores_the_same(axis):
    """A feet-first (z reversed) or right-left reversed array of the same patient: same zones, same sides."""
    _, lesion, lung, geometry = _two_lungs()
    expected = severity_score(lesion, lung, geometry)
    flipped = severity_score(np.flip(lesion, axis), np.flip(lung, axis), _flipped(geometry, axis))
    assert flipped == expected


def test_a_rotated_scan_takes_the_craniocaudal_axis_from_the_world():
    """An array whose y index runs toward the head (a coronal stack): the thirds follow y, not the z index."""
    shape = (20, 30, 40)
    lung = np.zeros(shape, np.uint8)
    lung[4:16, :, 2:18] = 1  # right
    lung[4:16, :, 22:38] = 1  # left
    lesion = np.zeros(shape, np.uint8)
    lesion[4:16, 20:30, 2:18] = 1  # y 20..29: the right lung's top third once y points to the head
    # index y → world +z (toward the head), index z → world -y (anterior); x stays world x.
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    geometry = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(direction.ravel()))
    zones = severity_score(lesion, lung, geometry)["severity_zones"]
    assert zones["right_upper"]["score"] == 4 and zones["right_middle"]["score"] == 0
    assert zones["right_lower"]["score"] == 0 and zones["left_upper"]["score"] == 0


def test_no_lung_at_all_gives_unmeasurable_zones_scoring_zero():
    shape = (12, 10, 20)
    empty = np.zeros(shape, np.uint8)
    result = severity_score(empty, empty, Geometry(shape, (1.0, 1.0, 1.0), (0, 0, 0), IDENTITY))
    assert all(math.isnan(zone["involvement"]) and zone["score"] == 0 for zone in result["severity_zones"].values())
    assert result["severity_score"] == 0 and result["mosmed_category"] == "CT-0"


def test_the_report_and_its_csv_carry_the_severity():
    image, lesion, lung, geometry = _two_lungs()
    report = lesion_report(image, lesion, lung, geometry)
    assert report["severity_score"] == 8 and report["mosmed_category"] == "CT-2"
    assert report["severity_zones"]["right_upper"]["score"] == 4
    row = csv_rows([{"case": "a", **report}], ["covid"])[0]
    assert set(REPORT_KEYS) <= set(row)
    assert row["right_upper_zone_score"] == 4 and row["left_middle_zone_score"] == 1
    assert row["severity_score"] == 8 and row["mosmed_category"] == "CT-2"


def test_the_montage_title_gives_the_severity():
    from dscovid.prediction.montage import _title

    _, details = _title("c", "covid", {"covid": 0.9}, None, {"lesion_count": 2, "severity_score": 8,
                                                              "mosmed_category": "CT-2"})
    assert "severity 8/24 (CT-2)" in details
