"""Staleness stamps (dscovid.io.stamps) shared by conversion, preprocessing and the demo; strict JSON values."""

from __future__ import annotations

import math
import os

import numpy as np

from dscovid.io.stamps import digest, file_stamp, is_older
from dscovid.io.strict_json import json_safe


def test_a_file_stamp_changes_with_the_content_or_the_time(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"1234")
    first = file_stamp(path)
    assert first == file_stamp(path) and first["size"] == 4
    os.utime(path, ns=(first["mtime_ns"], first["mtime_ns"] + 10**9))  # touched: same bytes, newer time
    assert file_stamp(path) != first
    assert file_stamp(tmp_path / "gone") == {"name": "gone", "missing": True}


def test_a_folder_stamp_sees_an_added_file(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"ab")
    before = file_stamp(tmp_path / "series")
    (tmp_path / "series" / "2.dcm").write_bytes(b"")  # no bytes, maybe the same time: the count still differs
    after = file_stamp(tmp_path / "series")
    assert (before["files"], after["files"]) == (1, 2) and after != before


def test_digest_ignores_key_order_only():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1, "b": [1, 2]}) != digest({"a": 1, "b": [2, 1]})
    assert len(digest({})) == 16


def test_is_older(tmp_path):
    source, output = tmp_path / "predictions.json", tmp_path / "summary.json"
    source.write_text("{}")
    assert is_older(output, source)  # missing
    output.write_text("{}")
    time_ns = source.stat().st_mtime_ns
    os.utime(output, ns=(time_ns, time_ns))
    assert not is_older(output, source)  # written at the same time counts as up to date
    os.utime(output, ns=(time_ns - 1, time_ns - 1))
    assert is_older(output, source)


def test_json_safe():
    value = {1: (np.float32(0.5), math.nan, -math.inf), "n": np.int64(3), "ok": np.bool_(True), "s": "x"}
    assert json_safe(value) == {"1": [0.5, None, None], "n": 3, "ok": True, "s": "x"}
    assert type(json_safe(np.int64(3))) is int and type(json_safe(np.bool_(True))) is bool
