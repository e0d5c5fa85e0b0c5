"""Atomic writes: a failing writer leaves the old file untouched and no temporary file behind."""

from __future__ import annotations

import stat

import pytest

from dscovid.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = write_text_atomic("old", tmp_path / "summary.json")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_written_files_are_readable_by_others(tmp_path):
    path = write_bytes_atomic(b"\x00\x01", tmp_path / "sub" / "checkpoint.pt", sync=True)
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
