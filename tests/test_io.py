"""Image I/O: geometry round trips on real scans, and one clear refusal per kind of bad input."""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from dscovid.errors import DscovidError
from dscovid.io import parallel_gzip
from dscovid.io.image_io import (
    Geometry,
    quantize_uint8,
    read_image,
    read_mask,
    read_sitk,
    strip_ending,
    uint8_scaling,
    write_image,
)
from dscovid.roots import Roots


def _sitk_geometry_tuple(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.mark.realdata
def test_dicom_series_round_trips_to_nifti(test_data, tmp_path):
    series = test_data / "covid_ct_md" / "COVID-19 subjects" / "P002"
    array, geometry = read_image(series)
    assert array.shape == (133, 512, 512) == geometry.shape_zyx
    written = write_image(array, geometry, tmp_path / "P002.nii.gz")
    original = read_sitk(series)
    again = sitk.ReadImage(str(written))
    size, spacing, origin, direction = _sitk_geometry_tuple(original)
    size2, spacing2, origin2, direction2 = _sitk_geometry_tuple(again)
    assert size == size2
    np.testing.assert_allclose(spacing, spacing2, atol=1e-6)
    np.testing.assert_allclose(origin, origin2, atol=1e-4)
    np.testing.assert_allclose(direction, direction2, atol=1e-7)
    array2, geometry2 = read_image(written)
    np.testing.assert_array_equal(array, array2)
    assert geometry.matches(geometry2, tolerance_mm=1e-4)
    # HU: air about -1000, the lungs are in there.
    assert array.min() <= -1000 and (array < -900).mean() > 0.2


@pytest.mark.realdata
def test_index_to_world_matches_simpleitk_on_a_real_scan(test_data):
    path = test_data / "covid_ct_md_derived"
    scan = sorted(path.glob("*_ct_2p5mm.nii.gz"))[0]
    image = sitk.ReadImage(str(scan))
    geometry = Geometry.of(image)
    matrix = geometry.index_to_world_matrix()
    for index_zyx in [(0, 0, 0), (10, 20, 30), (geometry.shape_zyx[0] - 1, 5, 7)]:
        expected = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in reversed(index_zyx)))
        got = matrix @ np.array([*index_zyx, 1.0])
        np.testing.assert_allclose(got[:3], expected, atol=1e-6)


def test_oblique_geometry_survives_a_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 400, size=(7, 9, 11)).astype(np.int16)
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    geometry = Geometry((7, 9, 11), (2.5, 0.7, 0.8), (-120.5, 33.0, 410.25), tuple(rotation.ravel()))
    for ending in (".nii.gz", ".mha", ".nrrd"):
        path = write_image(array, geometry, tmp_path / f"oblique{ending}")
        back, back_geometry = read_image(path)
        np.testing.assert_array_equal(back, array)
        assert back_geometry.matches(geometry, tolerance_mm=1e-4), back_geometry.describe_difference(geometry)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    geometry = Geometry((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError):
        write_image(np.zeros((3, 4, 6), np.int16), geometry, tmp_path / "bad.nii.gz")
    write_image(np.full((3, 4, 5), -1000, np.int16), geometry, tmp_path / "good.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.nii.gz"]


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_a_scaled_image_reads_back_as_float_within_half_a_code(tmp_path, ending):
    """Evidence maps are stored as uint8 codes with the NIfTI scaling: readers get float32 within half a code of the
    map, 0 exactly where the map is 0, and the same geometry."""
    geometry = Geometry((7, 30, 41), (2.5, 0.7, 0.9), (-3.0, 4.5, 100.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    values = np.random.default_rng(3).normal(0.02, 0.05, geometry.shape_zyx).astype(np.float32)
    values[:2] = 0.0
    slope, intercept = uint8_scaling(values.min(), values.max())
    written = write_image(quantize_uint8(values, slope, intercept), geometry, tmp_path / f"evidence{ending}",
                          scaling=(slope, intercept))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"evidence{ending}"]  # no intermediate file left
    image = sitk.ReadImage(str(written))
    assert image.GetPixelID() == sitk.sitkFloat32
    read_back = sitk.GetArrayFromImage(image)
    assert slope <= (values.max() - values.min()) / 250
    assert np.abs(read_back - values).max() <= slope / 2 * (1 + 1e-6)
    assert (read_back[:2] == 0).all()
    assert geometry.matches(Geometry.of(image), tolerance_mm=1e-4)
    # nibabel (a reader we did not write; TotalSegmentator's) applies the same scaling to its (x, y, z) array.
    scaled = nibabel.load(str(written))
    assert scaled.get_data_dtype() == np.uint8
    np.testing.assert_allclose(scaled.get_fdata().transpose(2, 1, 0), read_back, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="NIfTI"):
        write_image(np.zeros(geometry.shape_zyx, np.uint8), geometry, tmp_path / "x.mha", scaling=(slope, intercept))


@pytest.mark.parametrize(("low", "high"), [(-0.19, 0.15), (0.2, 0.9), (-5.0, -1.0), (0.0, 0.0), (-1e-6, 3e4)])
def test_uint8_scaling_spans_the_range_and_zero_exactly(low, high):
    slope, intercept = uint8_scaling(low, high)
    zero_code = -intercept / slope
    assert zero_code == int(zero_code) and 0 <= zero_code <= 255
    assert np.float32(zero_code) * np.float32(slope) + np.float32(intercept) == 0.0
    assert intercept <= min(low, 0.0) and 255 * slope + intercept >= max(high, 0.0)
    codes = quantize_uint8(np.array([low, high, 0.0], np.float32), slope, intercept)
    assert np.abs(codes * slope + intercept - [low, high, 0.0]).max() <= slope / 2 + 1e-9


@pytest.mark.parametrize("size", [0, 1, 5000, 3 * 4096 + 17])
def test_parallel_gzip_is_one_standard_member(size, monkeypatch):
    """Blocks deflated by several threads make one gzip member any reader takes, with the right CRC and length."""
    monkeypatch.setattr(parallel_gzip, "BLOCK_BYTES", 4096)
    data = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8).tobytes()
    target = io.BytesIO()
    written = parallel_gzip.gzip_stream(io.BytesIO(data), target, level=6, threads=3)
    packed = target.getvalue()
    assert written == len(packed)
    assert gzip.decompress(packed) == data
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert decompressor.decompress(packed) == data and decompressor.eof and decompressor.unused_data == b""


def test_strip_ending():
    assert strip_ending("case_0000.nii.gz") == "case_0000"
    assert strip_ending("/a/b/scan.mha") == "scan"


# --- refused inputs: one clear line naming the file --------------------------------------------------


def _write(tmp_path, array, name="img.nii.gz", spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()] if image.GetDimension() <= 3 else (1.0,) * image.GetDimension())
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _ct(shape=(6, 8, 8)):
    array = np.full(shape, 40, np.int16)
    array[:, :2] = -1000
    return array


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_refuses_truncated_nifti(tmp_path, ending):
    # SimpleITK itself silently pads a truncated NIfTI with zeros.
    good = _write(tmp_path, np.random.default_rng(0).integers(-1000, 500, (20, 32, 32)).astype(np.int16), "s" + ending)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{ending}"
    truncated.write_bytes(data[: len(data) // 2])
    read_image(good)
    with pytest.raises(DscovidError, match=r"truncated\.nii(\.gz)?: (the file is truncated|cannot read)"):
        read_image(truncated)


def test_refuses_truncated_metaimage(tmp_path):
    good = _write(tmp_path, _ct((20, 32, 32)), "scan.nrrd")
    data = good.read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    with pytest.raises(DscovidError, match=r"cut\.nrrd: cannot read the image, the file is unreadable or truncated"):
        read_image(tmp_path / "cut.nrrd")


def test_refuses_garbage_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(DscovidError, match=r"garbage\.nii\.gz: cannot read the image"):
        read_image(path)


def test_refuses_missing_file(tmp_path):
    with pytest.raises(DscovidError, match="no such file or folder"):
        read_image(tmp_path / "absent.nii.gz")


@pytest.mark.realdata
def test_refuses_single_dicom_slice(test_data):
    path = test_data / "pydicom" / "CT_small.dcm"
    with pytest.raises(DscovidError, match=r"CT_small\.dcm: is a 2D image of size 128x128"):
        read_image(path)


def test_refuses_2d_and_4d(tmp_path):
    with pytest.raises(DscovidError, match="is a 2D image"):
        read_image(_write(tmp_path, np.full((8, 8), -1000, np.int16), "flat.nii.gz"))
    four = sitk.JoinSeries([sitk.GetImageFromArray(_ct()) for _ in range(3)])
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(four, str(path))
    with pytest.raises(DscovidError, match=r"four\.nii\.gz: is a 4D image"):
        read_image(path)


@pytest.mark.parametrize("ending", [".mha", ".nii", ".nii.gz"])
def test_refuses_nan(tmp_path, ending):
    # ITK's NIfTI reader turns NaN into 0: the NIfTI cases check that we look at the file itself.
    array = _ct().astype(np.float32)
    array[2, 3, 4] = np.nan
    array[1, 1, 1] = np.inf
    with pytest.raises(DscovidError, match=rf"nan{re.escape(ending)}: contains 2 NaN or infinite voxels"):
        read_image(_write(tmp_path, array, "nan" + ending))


def test_refuses_intensities_that_are_not_hounsfield_units(tmp_path):
    raw = (_ct() + 1024).astype(np.uint16)  # stored values without the rescale: air near 0
    with pytest.raises(DscovidError, match=r"raw\.nii\.gz: intensities range 24\.\.1064 do not look like Hounsfield"):
        read_image(_write(tmp_path, raw, "raw.nii.gz"))
    eight_bit = np.linspace(0, 255, 6 * 8 * 8).reshape(6, 8, 8).astype(np.uint8)
    with pytest.raises(DscovidError, match="do not look like Hounsfield units"):
        read_image(_write(tmp_path, eight_bit, "png_like.nii.gz"))
    read_image(_write(tmp_path, raw, "raw2.nii.gz"), check_hu=False)  # allowed when asked


def test_mask_values_and_geometry_are_checked(tmp_path):
    reference = Geometry((6, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[2, 2, 2] = 2
    with pytest.raises(DscovidError, match=r"mask values must be 0 or 1, found 0, 2"):
        read_mask(_write(tmp_path, labels, "two.nii.gz"))
    shifted = _write(tmp_path, np.zeros((6, 8, 8), np.uint8), "shifted.nii.gz", spacing=(1.0, 1.0, 2.0))
    with pytest.raises(DscovidError, match=r"shifted\.nii\.gz: geometry does not match its image \(spacing"):
        read_mask(shifted, reference=reference)


@pytest.mark.realdata
def test_several_series_in_one_folder_takes_the_largest(test_data, tmp_path):
    # Two copies of a series with different SeriesInstanceUIDs: the 2-slice lungmask series and the
    # 20-slice TotalSegmentator series in one folder.
    for source in (test_data / "lungmask_testdata").glob("*.dcm"):
        os.symlink(source, tmp_path / f"a_{source.name}")
    for source in (test_data / "totalsegmentator" / "example_ct_dicom").iterdir():
        os.symlink(source, tmp_path / f"b_{source.name}")
    array, geometry = read_image(tmp_path)
    assert geometry.shape_zyx[0] == 20


def test_roots_resolve_from_flags_then_environment():
    environ = {"DSCOVID_raw": "/env/raw", "DSCOVID_results": "/env/results"}
    roots = Roots.resolve(raw="/flag/raw", environ=environ)
    assert str(roots.raw) == "/flag/raw"
    assert str(roots.results) == "/env/results"
    assert roots.preprocessed is None
    with pytest.raises(DscovidError, match=r"pass --preprocessed DIR or set the environment variable DSCOVID_preprocessed"):
        roots.require("preprocessed")
