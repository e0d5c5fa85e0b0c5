"""The dataset validator lists every problem, one line each with the case name; the CLI exits non-zero."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from dscovid.cli.verify_dataset import main as verify_main
from dscovid.errors import DscovidError
from dscovid.io.dataset import find_dataset, make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image
from dscovid.io.validate import verify_dataset

GEOMETRY = Geometry((8, 16, 16), (2.5, 1.5, 1.5), (-12.0, -12.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _ct(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 10, GEOMETRY.shape_zyx).astype(np.int16)
    image[:, 4:12, 3:7] = -850
    image[:, 4:12, 9:13] = -850
    image[:, :, :1] = -1000
    return image


def make_dataset(root, classes=("covid", "cap", "non_pneumonia")):
    folder = root / "Dataset007_Tiny"
    cases = {}
    for index, class_name in enumerate(classes):
        name = f"case_{index:03d}"
        write_image(_ct(index), GEOMETRY, folder / "imagesTr" / f"{name}_0000.nii.gz")
        lesion = np.zeros(GEOMETRY.shape_zyx, np.uint8)
        if class_name != "non_pneumonia":
            lesion[3:5, 6:8, 4:6] = 1
        write_image(lesion, GEOMETRY, folder / "labelsTr" / f"{name}.nii.gz")
        cases[name] = {"class": class_name, "lesion_annotated": True}
    write_json_atomic(make_dataset_json("Dataset007_Tiny", cases), folder / "dataset.json")
    return folder


def test_clean_dataset_has_no_problems(tmp_path, capsys):
    folder = make_dataset(tmp_path)
    assert verify_dataset(folder) == []
    assert verify_main([str(folder), "-q"]) == 0
    assert "dataset is valid" in capsys.readouterr().out


def test_every_problem_is_listed_with_its_case(tmp_path, capsys):
    folder = make_dataset(tmp_path, classes=("covid", "cap", "non_pneumonia", "covid", "cap", "covid"))
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    meta["cases"]["case_001"]["class"] = "flu"  # unknown class
    meta["cases"]["../evil"] = {"class": "covid"}  # unsafe name
    meta["numTraining"] = len(meta["cases"])
    (folder / "dataset.json").write_text(json.dumps(meta))
    # case_002 (non-pneumonia) has lesion voxels; case_003's label is on another grid;
    # case_004's label has a value 2; case_005's image is missing; an unlisted image lies in imagesTr.
    lesion = np.zeros(GEOMETRY.shape_zyx, np.uint8)
    lesion[1, 1, 1] = 1
    write_image(lesion, GEOMETRY, folder / "labelsTr" / "case_002.nii.gz")
    shifted = Geometry(GEOMETRY.shape_zyx, GEOMETRY.spacing_zyx_mm, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_image(np.zeros(GEOMETRY.shape_zyx, np.uint8), shifted, folder / "labelsTr" / "case_003.nii.gz")
    lesion[1, 1, 1] = 2
    write_image(lesion, GEOMETRY, folder / "labelsTr" / "case_004.nii.gz")
    (folder / "imagesTr" / "case_005_0000.nii.gz").unlink()
    shutil.copy(folder / "imagesTr" / "case_000_0000.nii.gz", folder / "imagesTr" / "stray_0000.nii.gz")

    problems = verify_dataset(folder)
    text = "\n".join(problems)
    assert "case_001: unknown class 'flu'" in text
    assert "../evil: case name is not a safe file name" in text
    assert "case_002: a non_pneumonia case has lesion voxels in its label" in text
    assert "case_003: label geometry does not match the image (origin" in text
    assert "case_004: label values must be 0 or 1, found 0, 2" in text
    assert "case_005: image missing" in text
    assert "stray: image" in text and "is not listed in dataset.json" in text
    assert len(problems) == 7, text
    assert verify_main([str(folder), "-q"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 7


def test_bad_images_are_reported_by_case(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"broken")
    flat = sitk.GetImageFromArray(np.full((16, 16), -1000, np.int16))
    sitk.WriteImage(flat, str(folder / "imagesTr" / "case_001_0000.nii.gz"))
    write_image((_ct(2) + 1024).astype(np.uint16), GEOMETRY, folder / "imagesTr" / "case_002_0000.nii.gz")
    problems = verify_dataset(folder, num_processes=2)
    assert len(problems) == 3, problems
    assert problems[0].startswith("case_000: ") and "cannot read the image" in problems[0]
    assert problems[1].startswith("case_001: ") and "is a 2D image" in problems[1]
    assert problems[2].startswith("case_002: ") and "do not look like Hounsfield units" in problems[2]


def test_missing_keys_and_broken_json(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / "dataset.json").write_text("{not json")
    assert verify_dataset(folder)[0].endswith("not valid JSON (Expecting property name enclosed in double quotes at line 1)")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    problems = verify_dataset(folder)
    assert any("missing key 'classes'" in p for p in problems)
    assert any("missing key 'cases'" in p for p in problems)


def test_find_dataset_by_number_name_or_path(tmp_path):
    folder = make_dataset(tmp_path)
    assert find_dataset("7", tmp_path) == folder
    assert find_dataset("007", tmp_path) == folder
    assert find_dataset("Dataset007_Tiny", tmp_path) == folder
    assert find_dataset(str(folder), None) == folder
    with pytest.raises(DscovidError, match="no dataset number 008"):
        find_dataset("8", tmp_path)
    with pytest.raises(DscovidError, match="no data root is set"):
        find_dataset("Dataset007_Tiny", None)


def test_console_script_prints_one_line_for_a_missing_root(tmp_path):
    env = {"PATH": "", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dscovid.cli.verify_dataset", "Dataset001_Absent"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "dscovid_verify_dataset: error: dataset 'Dataset001_Absent' is not a folder, and no data root is set to look it up in"
    )
