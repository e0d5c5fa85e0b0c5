"""Segmentation and classification metrics against hand-computed values and reference implementations.

References (test-only): DeepMind's ``surface_distance`` for NSD, MedPy for HD95/ASSD, scikit-learn for the
classification metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dscovid.evaluation import metrics

SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.7, 1.1), (1.0, 0.74, 0.74)]


@pytest.fixture(scope="module")
def surface_distance():
    """DeepMind's package, made to run on numpy 2 (it still uses the removed alias ``np.Inf``)."""
    module = pytest.importorskip("surface_distance")
    if not hasattr(np, "Inf"):
        module.metrics.np = _NumpyWithInf()
    return module


class _NumpyWithInf:
    Inf = np.inf

    def __getattr__(self, name):
        return getattr(np, name)


def _medpy():
    return pytest.importorskip("medpy.metric.binary")


def _random_blob(shape, seed, fill=0.5, smooth=2.0):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return noise > np.quantile(noise, 1.0 - fill * 0.3)


# ---------------------------------------------------------------- hand-computed values on small shapes


def test_overlap_counts_by_hand():
    reference = np.zeros((4, 5, 6), dtype=bool)
    reference[1:3, 1:4, 1:4] = True  # 18 voxels
    prediction = np.zeros_like(reference)
    prediction[1:3, 2:4, 1:5] = True  # 16 voxels, 12 shared
    result = metrics.segmentation_metrics(prediction, reference, (1, 1, 1))
    assert result["dsc"] == pytest.approx(2 * 12 / (18 + 16))
    assert result["sensitivity"] == pytest.approx(12 / 18)
    assert result["specificity"] == pytest.approx((120 - 18 - 4) / (120 - 18))
    roi = np.zeros_like(reference)
    roi[:, :, :5] = True  # 100 voxels, 18 lesion, all 4 false positives inside
    assert metrics.segmentation_metrics(prediction, reference, (1, 1, 1), roi=roi)["specificity"] == pytest.approx(
        (100 - 18 - 4) / (100 - 18)
    )


@pytest.mark.parametrize("shift", [1, 2, 5])
def test_distances_of_two_single_voxels_by_hand(shift):
    spacing = (2.0, 0.5, 0.8)
    reference = np.zeros((3, 3, 12), dtype=bool)
    reference[1, 1, 2] = True
    prediction = np.zeros_like(reference)
    prediction[1, 1, 2 + shift] = True
    result = metrics.segmentation_metrics(prediction, reference, spacing)
    distance = shift * spacing[2]
    assert result["rmsd"] == pytest.approx(distance)
    assert result["hd95"] == pytest.approx(distance)
    assert result["assd"] == pytest.approx(distance)
    assert result["dsc"] == 0.0
    # Surfels sit on the voxel corners: the 4 corners facing the other voxel are (shift - 1) voxels from it.
    tolerance = (shift - 1) * spacing[2]
    assert metrics.segmentation_metrics(prediction, reference, spacing, nsd_tolerance_mm=tolerance)["nsd"] == 0.5
    assert metrics.segmentation_metrics(prediction, reference, spacing, nsd_tolerance_mm=distance)["nsd"] == 1.0


def test_rmsd_by_hand_for_a_slab_and_its_thicker_copy():
    # A 1-voxel slab and the same slab two voxels thick: per column the surface voxels are one voxel (distance 0 to
    # itself) versus two (distances 0 and 1 voxel along z), so the pooled squared distances are 0, 0, 0, s².
    spacing = (3.0, 1.0, 1.0)
    reference = np.zeros((6, 8, 8), dtype=bool)
    reference[2, 2:6, 2:6] = True
    prediction = reference.copy()
    prediction[3, 2:6, 2:6] = True
    result = metrics.segmentation_metrics(prediction, reference, spacing)
    assert result["rmsd"] == pytest.approx(math.sqrt(16 * 3.0**2 / (16 + 32)))
    assert result["assd"] == pytest.approx(16 * 3.0 / (16 + 32))


def test_empty_mask_conventions():
    empty = np.zeros((5, 6, 7), dtype=bool)
    lesion = empty.copy()
    lesion[2, 2:4, 2:4] = True
    both = metrics.segmentation_metrics(empty, empty, (1, 1, 1))
    assert (both["dsc"], both["nsd"], both["rmsd"], both["hd95"], both["specificity"]) == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert math.isnan(both["sensitivity"])
    false_alarm = metrics.segmentation_metrics(lesion, empty, (1, 1, 1))
    assert false_alarm["dsc"] == 0.0 and false_alarm["nsd"] == 0.0 and false_alarm["specificity"] < 1.0
    assert math.isnan(false_alarm["hd95"]) and math.isnan(false_alarm["rmsd"]) and math.isnan(false_alarm["sensitivity"])
    missed = metrics.segmentation_metrics(empty, lesion, (1, 1, 1))
    assert missed["dsc"] == 0.0 and missed["sensitivity"] == 0.0 and missed["nsd"] == 0.0
    assert math.isnan(missed["rmsd"])
    summary = metrics.mean_metrics([both, false_alarm, missed])
    assert summary["mean"]["dsc"] == pytest.approx(1 / 3) and summary["n"]["dsc"] == 3
    assert summary["mean"]["rmsd"] == 0.0 and summary["n"]["rmsd"] == 1
    assert summary["n"]["sensitivity"] == 1


def test_lesion_touching_the_image_border():
    reference = np.zeros((4, 6, 6), dtype=bool)
    reference[:, :3, :3] = True
    result = metrics.segmentation_metrics(reference, reference, (1, 1, 1))
    assert result["dsc"] == 1.0 and result["nsd"] == 1.0 and result["hd95"] == 0.0


# ---------------------------------------------------------------- against DeepMind's surface_distance and MedPy


@pytest.mark.parametrize("spacing", SPACINGS)
def test_surfel_area_table_equals_deepmind_table(surface_distance, spacing):
    expected = surface_distance.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    assert metrics.surfel_area_table(spacing) == pytest.approx(expected, abs=1e-12)


def _check_against_references(prediction, reference, spacing, surface_distance, medpy, tolerances=(1.0, 2.0)):
    ours = metrics.segmentation_metrics(prediction, reference, spacing, nsd_tolerance_mm=tolerances[0])
    distances = surface_distance.compute_surface_distances(reference, prediction, spacing)
    for tolerance in tolerances:
        expected = surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)
        got = metrics.segmentation_metrics(prediction, reference, spacing, nsd_tolerance_mm=tolerance)["nsd"]
        assert got == pytest.approx(expected, abs=1e-9), f"NSD at {tolerance} mm"
    assert ours["hd95"] == pytest.approx(medpy.hd95(prediction, reference, voxelspacing=spacing), rel=1e-9)
    assert ours["assd"] == pytest.approx(medpy.assd(prediction, reference, voxelspacing=spacing), rel=1e-9)
    assert ours["dsc"] == pytest.approx(medpy.dc(prediction, reference))
    assert ours["sensitivity"] == pytest.approx(medpy.sensitivity(prediction, reference))
    assert ours["specificity"] == pytest.approx(medpy.specificity(prediction, reference))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_random_shapes_agree_with_references(surface_distance, seed, spacing):
    medpy = _medpy()
    reference = _random_blob((20, 24, 22), seed)
    prediction = _random_blob((20, 24, 22), seed + 100)
    prediction |= ndimage.binary_erosion(reference)  # partly overlapping, partly not
    _check_against_references(prediction, reference, spacing, surface_distance, medpy, tolerances=(0.5, 1.0, 2.5))


@pytest.fixture(scope="module")
def real_masks(test_data):
    """(name, mask, spacing_zyx_mm) of each real COVID-19 lesion mask, read once for the module."""
    import SimpleITK as sitk

    folder = test_data / "covid19_20_lesion_masks"
    paths = sorted(folder.glob("*.nii.gz"))
    if not paths:
        pytest.skip(f"no lesion masks in {folder}")
    masks = []
    for path in paths:
        image = sitk.ReadImage(str(path))
        masks.append((path.name, sitk.GetArrayFromImage(image) != 0, tuple(reversed(image.GetSpacing()))))
    return masks


def _window_around_a_lesion(mask, size=(24, 64, 64)):
    """A window centred on the largest lesion of the axial slice with most lesion (cheaper than a 3D labelling)."""
    z = int(np.argmax(np.count_nonzero(mask, axis=(1, 2))))
    labels, _ = ndimage.label(mask[z])
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    centre = [z] + [int(np.mean(axis)) for axis in np.nonzero(labels == largest)]
    box = tuple(
        slice(max(0, min(c - s // 2, n - s)), max(0, min(c - s // 2, n - s)) + s)
        for c, s, n in zip(centre, size, mask.shape)
    )
    return np.ascontiguousarray(mask[box])


def test_real_lesion_shapes_agree_with_references(real_masks, surface_distance):
    medpy = _medpy()
    for name, mask, spacing in real_masks:
        # A window around the largest lesion keeps MedPy's whole-volume distance transforms fast.
        reference = _window_around_a_lesion(mask)
        assert reference.sum() > 1000, name
        spacing = (spacing[0] * 2.0, spacing[1], spacing[2])  # more anisotropic than the file
        eroded = ndimage.binary_erosion(reference, iterations=1)
        shifted = np.roll(reference, (1, 3, -2), axis=(0, 1, 2))
        cropped = reference.copy()
        cropped[:, :, : reference.shape[2] // 2] = False
        for prediction in (eroded, shifted, cropped | eroded[::-1]):
            _check_against_references(prediction, reference, spacing, surface_distance, medpy)


def test_real_mask_against_itself_and_empty(real_masks):
    for name, mask, spacing in real_masks:
        result = metrics.segmentation_metrics(mask, mask, spacing)
        assert result["dsc"] == 1.0 and result["nsd"] == 1.0 and result["hd95"] == 0.0, name
        assert metrics.segmentation_metrics(np.zeros_like(mask), mask, spacing)["nsd"] == 0.0


# ---------------------------------------------------------------- classification against scikit-learn


def _random_predictions(seed, n=60, classes=3, ties=False):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    logits = rng.standard_normal((n, classes)) + 1.5 * np.eye(classes)[truth]
    if ties:
        logits = np.round(logits, 0)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return truth, probabilities


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, False)])
def test_classification_metrics_match_sklearn(seed, ties):
    sk = pytest.importorskip("sklearn.metrics")
    names = ["covid", "cap", "non_pneumonia"]
    truth, probabilities = _random_predictions(seed, ties=ties)
    result = metrics.classification_metrics(truth, probabilities, names)
    predicted = probabilities.argmax(axis=1)
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert result["confusion_matrix"] == sk.confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()
    recalls = sk.recall_score(truth, predicted, labels=[0, 1, 2], average=None)
    f1s = sk.f1_score(truth, predicted, labels=[0, 1, 2], average=None)
    for index, name in enumerate(names):
        row = result["per_class"][name]
        assert row["sensitivity"] == pytest.approx(recalls[index])
        assert row["f1"] == pytest.approx(f1s[index])
        assert row["auc"] == pytest.approx(sk.roc_auc_score(truth == index, probabilities[:, index]))
        specificity = sk.recall_score(truth != index, predicted != index)
        assert row["specificity"] == pytest.approx(specificity)
    assert result["macro"]["f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro"))
    assert result["macro"]["auc"] == pytest.approx(
        sk.roc_auc_score(truth, probabilities, multi_class="ovr", average="macro")
    )
    # Class names instead of indices give the same result.
    assert metrics.classification_metrics([names[t] for t in truth], probabilities, names) == result


def test_roc_curve_matches_sklearn_and_its_area_is_the_auc():
    sk = pytest.importorskip("sklearn.metrics")
    truth, probabilities = _random_predictions(3, ties=True)
    labels, scores = truth == 1, probabilities[:, 1]
    fpr, tpr = metrics.roc_curve(labels, scores)
    ref_fpr, ref_tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    assert fpr == pytest.approx(ref_fpr) and tpr == pytest.approx(ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores))


def test_absent_class_gives_nan_not_a_crash():
    names = ["covid", "cap", "non_pneumonia"]
    truth = [0, 0, 2, 2]
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    result = metrics.classification_metrics(truth, probabilities, names)
    cap = result["per_class"]["cap"]
    assert math.isnan(cap["sensitivity"]) and math.isnan(cap["auc"]) and cap["f1"] == 0.0
    assert result["accuracy"] == pytest.approx(0.75)
    # Macro means skip the undefined values.
    expected = np.mean([result["per_class"][n]["auc"] for n in ("covid", "non_pneumonia")])
    assert result["macro"]["auc"] == pytest.approx(expected)
