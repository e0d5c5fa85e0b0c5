"""dscovid_convert: converted and skipped cases printed, exit status non-zero only when nothing converted or bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dscovid.cli.convert import main


def _write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_cli_reports_skipped_cases_and_exit_status(tmp_path: Path, capsys) -> None:
    source = tmp_path / "COVID-19-20"
    ct = np.full((4, 8, 8), -1000, np.int16)
    _write(ct, source / "volume-covid19-A-0001_ct.nii.gz")
    _write(np.zeros((4, 8, 8), np.uint8), source / "volume-covid19-A-0001_seg.nii.gz")
    _write(ct + 1200, source / "volume-covid19-A-0002_ct.nii.gz")  # no air: not HU
    out = tmp_path / "Dataset109_CLI"
    assert main(["-q", "covid19_20", "-i", str(source), "-o", str(out), "-np", "2"]) == 0
    printed = capsys.readouterr().out
    assert "1 case(s) converted" in printed and "skipped volume-covid19-A-0002:" in printed and "Hounsfield" in printed
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["conversion"]["converter"] == "covid19_20"

    (source / "volume-covid19-A-0001_ct.nii.gz").unlink()
    assert main(["covid19_20", "-i", str(source), "-o", str(tmp_path / "Dataset110_None"), "-q"]) == 1
    assert not (tmp_path / "Dataset110_None" / "dataset.json").exists()


def test_cli_input_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["mosmed", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "Dataset111_X")]) == 1
    assert capsys.readouterr().err.strip().endswith("MosMedData source folder not found")
    (tmp_path / "studies" / "CT-0").mkdir(parents=True)
    assert main(["mosmed", "-i", str(tmp_path), "-o", str(tmp_path / "not_a_dataset_name")]) == 1
    assert "DatasetNNN_Name" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_another_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "Dataset112_Other"
    out.mkdir()
    (out / "dataset.json").write_text('{"name": "Dataset112_Other", "cases": {}}')
    source = tmp_path / "src"
    _write(np.full((4, 8, 8), -1000, np.int16), source / "volume-covid19-A-0001_ct.nii.gz")
    assert main(["covid19_20", "-i", str(source), "-o", str(out)]) == 1
    assert "not by dscovid_convert" in capsys.readouterr().err
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8")) == {"name": "Dataset112_Other", "cases": {}}
