"""Scan discovery (dscovid.io.scans): the one set of rules behind ``dscovid_predict -i`` and ``dscovid_lung_mask -i``."""

from __future__ import annotations

import numpy as np
import pytest

from dscovid.cli.lung_mask import main as lung_mask_main
from dscovid.errors import DscovidError
from dscovid.io.image_io import Geometry, read_mask, write_image
from dscovid.io.scans import case_name_problems, find_scans, is_dicom_file


def _fake_series(folder, files=1):
    folder.mkdir(parents=True)
    for k in range(files):
        (folder / f"1.2.840.{k}").write_bytes(b"\0" * 128 + b"DICM")  # named by UID, no .dcm ending
    return folder


def test_volumes_channels_series_and_single_files(tmp_path):
    geometry = Geometry((4, 5, 6), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    volume = np.zeros((4, 5, 6), np.int16)
    write_image(volume, geometry, tmp_path / "a_0000.nii.gz")
    write_image(volume, geometry, tmp_path / "a_0001.nii.gz")  # a second channel: not CT, skipped
    write_image(volume, geometry, tmp_path / "scan.mha")
    series = _fake_series(tmp_path / "patient7")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.dcm").write_bytes(b"\0" * 128 + b"DICM")
    scans = find_scans(tmp_path)
    assert [(s.name, s.path.name) for s in scans] == [("a", "a_0000.nii.gz"), ("patient7", "patient7"),
                                                      ("scan", "scan.mha")]
    assert [s.name for s in find_scans(series)] == ["patient7"]
    assert [s.name for s in find_scans(tmp_path / "scan.mha")] == ["scan"]
    assert is_dicom_file(series / "1.2.840.0") and not is_dicom_file(tmp_path / "notes.txt")
    with pytest.raises(DscovidError, match="no such file"):
        find_scans(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DscovidError, match="no CT volume"):
        find_scans(tmp_path / "empty")


def test_series_at_any_depth_and_through_links(tmp_path):
    """An archive of links to series folders (and a link back up the tree, which must not loop)."""
    store = tmp_path / "store"
    _fake_series(store / "2021" / "P001" / "CT", files=2)
    _fake_series(store / "2021" / "P002")
    archive = tmp_path / "archive"
    (archive / "covid").mkdir(parents=True)
    (archive / "covid" / "P001").symlink_to(store / "2021" / "P001", target_is_directory=True)
    (archive / "P002").symlink_to(store / "2021" / "P002", target_is_directory=True)
    (archive / "covid" / "loop").symlink_to(archive, target_is_directory=True)
    scans = find_scans(archive)
    assert [(s.name, s.path.relative_to(archive).as_posix()) for s in scans] == [("CT", "covid/P001/CT"),
                                                                                 ("P002", "P002")]


def test_two_series_with_one_name_fail_one_case_not_the_run(tmp_path):
    _fake_series(tmp_path / "a" / "CT")
    _fake_series(tmp_path / "b" / "CT")
    _fake_series(tmp_path / "b" / "bad name")
    scans = find_scans(tmp_path)
    problems = dict(zip([s.path.relative_to(tmp_path).as_posix() for s in scans], case_name_problems(scans)))
    assert problems["a/CT"] is None
    assert "already used" in problems["b/CT"] and "not a safe file name" in problems["b/bad name"]
    twice = find_scans([tmp_path / "a" / "CT", tmp_path / "a" / "CT"])
    assert case_name_problems(twice)[0] is None and "already used" in case_name_problems(twice)[1]


@pytest.mark.realdata
def test_series_folders_named_by_folder(test_data):
    lungmask = test_data / "lungmask_testdata"
    assert [(s.name, s.path) for s in find_scans(lungmask)] == [("lungmask_testdata", lungmask)]
    assert [s.name for s in find_scans(test_data / "covid_ct_md")] == ["P002", "cap002", "normal001"]


@pytest.mark.realdata
def test_lung_mask_command_reads_a_folder_of_linked_series(test_data, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "patient1").symlink_to(test_data / "lungmask_testdata", target_is_directory=True)
    assert lung_mask_main(["-i", str(archive), "-o", str(tmp_path / "out"), "-q"]) == 0
    mask, _ = read_mask(tmp_path / "out" / "patient1.nii.gz")
    assert mask.shape[0] == 2 and mask.any()
