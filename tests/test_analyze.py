"""``dscovid_analyze`` on a small hand-made raw dataset: per-class findings, lung-mask sources, figures, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from dscovid.analysis.analyze import analyze_dataset
from dscovid.cli.analyze import main as analyze_main
from dscovid.errors import DscovidError
from dscovid.io.dataset import make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, write_image
from dscovid.measurements.findings import case_findings

SHAPE = (10, 40, 48)
GEOMETRY = Geometry(SHAPE, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _lungs() -> np.ndarray:
    _, yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]]
    right = ((yy - 20) / 16.0) ** 2 + ((xx - 12) / 9.0) ** 2 < 1
    left = ((yy - 20) / 16.0) ** 2 + ((xx - 36) / 9.0) ** 2 < 1
    lung = right | left
    lung[0] = lung[-1] = False
    return lung.astype(np.uint8)


def _lesions(kind: str) -> np.ndarray:
    lesion = np.zeros(SHAPE, dtype=np.uint8)
    if kind == "covid":  # two peripheral lesions, one in each lung
        lesion[3:6, 18:22, 4:6] = 1
        lesion[5:8, 10:14, 43:45] = 1
    elif kind == "cap":  # one central lesion in the right lung
        lesion[4:7, 18:23, 10:15] = 1
    return lesion & _lungs()


@pytest.fixture
def raw_dataset(tmp_path):
    root = tmp_path / "raw" / "Dataset950_Findings"
    lung = _lungs()
    cases = {}
    for name, kind, lung_folder in (("case_a", "covid", "lungsTr"), ("case_b", "cap", "lungsReference"),
                                    ("case_c", "non_pneumonia", "lungsTr"), ("case_d", "covid", None)):
        image = np.where(lung > 0, -850, 30).astype(np.int16)
        image[_lesions(kind) > 0] = -650 if kind == "covid" else 20
        image[:, :2, :] = -1000  # outside air
        write_image(image, GEOMETRY, root / "imagesTr" / f"{name}_0000.nii.gz")
        if name != "case_d":
            write_image(_lesions(kind), GEOMETRY, root / "labelsTr" / f"{name}.nii.gz")
        if lung_folder:
            write_image(lung, GEOMETRY, root / lung_folder / f"{name}.nii.gz")
        cases[name] = {"class": kind, "lesion_annotated": name != "case_d"}
    write_json_atomic(make_dataset_json("Dataset950_Findings", cases), root / "dataset.json")
    return root


def test_findings_per_case_and_per_class(raw_dataset, tmp_path):
    out = tmp_path / "out"
    summary = analyze_dataset(raw_dataset, out, thicknesses_mm=(0.0, 2.0, 4.0, 8.0))
    assert summary["skipped"] == ["case_d"]  # lesions not annotated
    rows = {row["case"]: row for row in summary["per_case"]}
    assert rows["case_a"]["lung_source"] == "lungsTr" and rows["case_b"]["lung_source"] == "lungsReference"
    expected = case_findings(np.where(_lungs() > 0, -850, 30), _lesions("covid"), _lungs(), GEOMETRY.spacing_zyx_mm,
                             (0.0, 2.0, 4.0, 8.0), geometry=GEOMETRY)
    assert rows["case_a"]["lesion_count"] == expected["lesion_count"] == 2
    assert rows["case_a"]["plr"]["ratio"] == pytest.approx(expected["plr"]["ratio"])
    assert rows["case_a"]["involvement"]["right"]["lesion_voxels"] > 0
    assert rows["case_a"]["involvement"]["left"]["lesion_voxels"] > 0
    assert rows["case_b"]["involvement"]["left"]["lesion_voxels"] == 0
    covid, cap = summary["classes"]["covid"], summary["classes"]["cap"]
    # Finding 4: COVID lesions are peripheral and scattered, the CAP lesion central.
    assert covid["plr"]["mean"][1] > cap["plr"]["mean"][1]
    assert covid["spread_mm"]["mean"] > 20 and cap["spread_mm"]["mean"] == 0.0
    # Finding 3: the density windows pool the voxels of all lesions of a class.
    assert covid["hu"]["window_fractions"]["ggo_-960_-600"] == pytest.approx(1.0)
    assert cap["hu"]["window_fractions"]["consolidation_-70_140"] == pytest.approx(1.0)
    assert sum(covid["hu"]["histogram"]) == int(_lesions("covid").sum())
    non = summary["classes"]["non_pneumonia"]
    assert non["lesion_count"]["values"] == [0] and non["plr"]["n"] == 0
    assert non["lesion_volume_ratio"]["mean"] == 0.0
    on_disk = json.loads((out / "findings.json").read_text(encoding="utf-8"))
    assert on_disk["classes"]["covid"]["lesion_count"]["values"] == [2]
    for letter in "defghi":
        assert len(list(out.glob(f"fig1_{letter}_*.png"))) == 1
    assert (out / "fig1_findings.png").stat().st_size > 0


def test_lungs_are_segmented_when_no_mask_is_given(raw_dataset, tmp_path, monkeypatch):
    import dscovid.preprocessing.lung as lung

    for path in (raw_dataset / "lungsTr").iterdir():
        path.unlink()
    calls = []

    def fake_segment_lungs(image_hu, spacing_zyx_mm, direction=None, settings=None):
        calls.append(tuple(spacing_zyx_mm))
        return _lungs()

    monkeypatch.setattr(lung, "segment_lungs", fake_segment_lungs)
    summary = analyze_dataset(raw_dataset, tmp_path / "out", thicknesses_mm=(0.0, 5.0), figures=False)
    sources = {row["case"]: row["lung_source"] for row in summary["per_case"]}
    assert sources == {"case_a": "segmented", "case_b": "lungsReference", "case_c": "segmented"}
    assert calls == [GEOMETRY.spacing_zyx_mm] * 2


def test_missing_lung_segmentation_is_a_clear_error(raw_dataset, tmp_path, monkeypatch):
    for path in (raw_dataset / "lungsTr").iterdir():
        path.unlink()
    monkeypatch.setitem(sys.modules, "dscovid.preprocessing.lung", None)  # import now fails
    with pytest.raises(DscovidError, match="case case_a: no lung mask .* lung segmentation is not available"):
        analyze_dataset(raw_dataset, tmp_path / "out", figures=False)


def test_parallel_workers_give_the_same_findings(raw_dataset, tmp_path):
    serial = analyze_dataset(raw_dataset, tmp_path / "a", thicknesses_mm=(0.0, 3.0), figures=False)
    parallel = analyze_dataset(raw_dataset, tmp_path / "b", thicknesses_mm=(0.0, 3.0), figures=False,
                               num_processes=2)
    assert serial["per_case"] == parallel["per_case"]


def test_command_line(raw_dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    raw_root = str(raw_dataset.parent)
    assert analyze_main(["-d", "950", "--raw", raw_root, "-o", str(out), "--max-thickness", "6", "--no-figures",
                         "-q"]) == 0
    assert json.loads((out / "findings.json").read_text(encoding="utf-8"))["plr_thickness_mm"] == [0, 1, 2, 3, 4, 5, 6]
    assert "covid: 1 CTs" in capsys.readouterr().out
    assert analyze_main(["-d", "951", "--raw", raw_root, "-o", str(out)]) == 1
    assert "no dataset number 951" in capsys.readouterr().err
    assert analyze_main(["-d", "950", "--raw", raw_root, "-o", str(out), "--cases", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
