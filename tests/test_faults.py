"""Fault injection: dscovid under a full disk, kill -9, concurrent runs, misuse and bad input (issue 16).

The rule every test here checks: no user file is changed or deleted unless the user asked for it, no file under a
final name is ever incomplete, and every failure is one line naming the file (or case) and the reason, with a
non-zero exit. docs/reliability.md lists each guarantee with the test that shows it.

A full disk is simulated two ways: portably, by replacing the one function every writer opens its files with
(:func:`dscovid.io.atomic.open_for_writing`) by one whose writes fail with ENOSPC, and by ITK writing short files
without an error (what ITK does on a full disk); and for real on a 256 KiB tmpfs where the tests run as root and
may mount (skipped elsewhere).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_raw_dataset, phantom, save_fake_model, small_plans

from dataset_conversion import synthetic
from dscovid.errors import DscovidError
from dscovid.io import atomic
from dscovid.io.atomic import write_bytes_atomic, write_text_atomic
from dscovid.io.dataset import load_raw_dataset, make_dataset_json, write_json_atomic
from dscovid.io.image_io import Geometry, read_image, write_image
from dscovid.io.validate import verify_dataset
from dscovid.preprocessing.lung_cache import save_npz_atomic
from dscovid.preprocessing.preprocessor import preprocess_dataset
from dscovid.results.checkpoint import save_checkpoint

GEOMETRY = Geometry((24, 48, 48), (2.5, 1.5, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


# ------------------------------------------------------------------------------------------- fault injectors


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (as a full disk does)."""

    def __init__(self, path, room: int) -> None:
        self._stream = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._stream.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._stream.write(data)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def fileno(self) -> int:
        return self._stream.fileno()

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(room=0, only=None)``: from now on, writes of files whose name contains ``only`` fail."""
    real = atomic.open_for_writing

    def install(room: int = 0, only: str | None = None) -> None:
        def failing(path):
            return _FullDisk(path, room) if only is None or only in Path(path).name else real(path)

        monkeypatch.setattr(atomic, "open_for_writing", failing)

    return install


@pytest.fixture
def itk_short_writes(monkeypatch):
    """ITK on a full disk: ``WriteImage`` leaves a short file and raises nothing."""
    real = sitk.WriteImage

    def short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as stream:
            stream.truncate(size * 2 // 5)

    monkeypatch.setattr(sitk, "WriteImage", short)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs (only where the tests run as root and may mount; skipped elsewhere)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root and mount (the portable simulation runs everywhere)")
    mount_point = tmp_path / "tiny_fs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def _ct(seed: int = 0) -> np.ndarray:
    image, _, _ = phantom(GEOMETRY.shape_zyx, seed=seed)
    return image


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------- 2. a full disk: writers outside the predictor


def test_disk_full_in_a_json_write_is_one_line_and_keeps_the_old_file(tmp_path, full_disk):
    target = write_json_atomic({"old": True}, tmp_path / "plans.json")
    full_disk(room=10)
    with pytest.raises(DscovidError) as caught:
        write_json_atomic({"new": "x" * 10_000}, target)
    assert str(caught.value) == f"{target}: cannot write (disk full: no space left on device)"
    assert json.loads(target.read_text(encoding="utf-8")) == {"old": True}
    assert _names(tmp_path) == ["plans.json"]  # no temporary file left


def test_disk_full_in_a_csv_text_and_checkpoint_write(tmp_path, full_disk):
    full_disk(room=100)
    for write in (lambda: write_text_atomic("a,b\n" * 1000, tmp_path / "predictions.csv"),
                  lambda: write_bytes_atomic(b"\0" * 5000, tmp_path / "context.npy"),
                  lambda: save_checkpoint({"weights": torch.zeros(2000)}, tmp_path / "checkpoint_latest.pt")):
        with pytest.raises(DscovidError, match="disk full"):
            write()
    assert _names(tmp_path) == []


def test_disk_full_in_the_preprocessing_cache_fails_that_case_only(tmp_path, full_disk):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}, {"class": "covid"}])
    out = tmp_path / "pre" / folder.name
    full_disk(room=1000, only="case_001.npz")
    result = preprocess_dataset(load_raw_dataset(folder), out, small_plans(), ["3d_test"], progress=False)
    assert result["failed"] == ["case_001"] and result["processed"] == ["case_000", "case_002"]
    assert _names(out / "3d_test") == ["case_000.json", "case_000.npz", "case_002.json", "case_002.npz"]


def test_an_image_written_short_without_an_error_never_gets_its_final_name(tmp_path, itk_short_writes, full_disk):
    """ITK prints "wrote only N of M bytes" and goes on; the read-back catches it, the probe names the full disk."""
    target = tmp_path / "case_evidence.nii.gz"
    target.write_bytes(b"the user's own file")
    with pytest.raises(DscovidError) as caught:
        write_image(np.random.default_rng(0).random(GEOMETRY.shape_zyx, dtype=np.float32), GEOMETRY, target)
    message = str(caught.value)
    assert message.startswith(f"{target}: cannot write (the file written is incomplete or corrupt") and "\n" not in message
    full_disk(room=0)  # now the disk is full too: the error says so
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        with pytest.raises(DscovidError, match=r"cannot write \(disk full"):
            write_image(np.ones(GEOMETRY.shape_zyx, np.uint8), GEOMETRY, tmp_path / f"mask{ending}")
    assert target.read_bytes() == b"the user's own file"
    assert _names(tmp_path) == ["case_evidence.nii.gz"]


def test_a_scaled_evidence_map_written_short_or_on_a_full_disk_never_gets_its_final_name(tmp_path, monkeypatch,
                                                                                          full_disk):
    """The evidence map's own path (ITK writes the plain file, dscovid sets the scaling and gzips it): ITK's short
    write is caught before the gzip, a full disk during the gzip fails the write; neither leaves a file."""
    target = tmp_path / "case_evidence.nii.gz"
    target.write_bytes(b"the user's own file")
    codes = np.random.default_rng(0).integers(0, 255, GEOMETRY.shape_zyx, dtype=np.uint8)
    full_disk(room=1000)
    with pytest.raises(DscovidError) as caught:
        write_image(codes, GEOMETRY, target, scaling=(0.01, -1.0))
    assert str(caught.value) == f"{target}: cannot write (disk full: no space left on device)"
    assert target.read_bytes() == b"the user's own file" and _names(tmp_path) == ["case_evidence.nii.gz"]
    monkeypatch.setattr(atomic, "open_for_writing", lambda path: open(path, "wb"))  # noqa: SIM115
    real = sitk.WriteImage

    def short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) * 2 // 5)

    monkeypatch.setattr(sitk, "WriteImage", short)
    with pytest.raises(DscovidError, match=r"the file written is incomplete or corrupt: the file is truncated"):
        write_image(codes, GEOMETRY, target, scaling=(0.01, -1.0))
    assert target.read_bytes() == b"the user's own file" and _names(tmp_path) == ["case_evidence.nii.gz"]


def test_a_header_and_data_pair_appears_whole_or_not_at_all(tmp_path, itk_short_writes):
    with pytest.raises(DscovidError, match="incomplete"):
        write_image(_ct(), GEOMETRY, tmp_path / "scan.mhd", compress=False)
    assert _names(tmp_path) == []


def test_a_real_full_disk(tiny_filesystem):
    """256 KiB of tmpfs: ITK's short write, np.savez, JSON and a checkpoint all fail with 'disk full', leave nothing."""
    kept = write_json_atomic({"kept": True}, tiny_filesystem / "kept.json")
    noise = np.random.default_rng(1).random((32, 64, 64), dtype=np.float32)  # 512 KiB that gzip cannot shrink
    writes = {
        "evidence.nii.gz": lambda path: write_image(noise, GEOMETRY.__class__((32, 64, 64), (1, 1, 1), (0, 0, 0),
                                                                             GEOMETRY.direction), path),
        "case.npz": lambda path: save_npz_atomic(path, image=noise),
        "kept.json": lambda path: write_json_atomic({"values": noise.ravel()[:40_000].tolist()}, path),
        "checkpoint.pt": lambda path: save_checkpoint({"weights": torch.from_numpy(noise)}, path),
    }
    for name, write in writes.items():
        with pytest.raises(DscovidError) as caught:
            write(tiny_filesystem / name)
        assert str(caught.value).startswith(f"{tiny_filesystem / name}: cannot write (disk full"), caught.value
    assert _names(tiny_filesystem) == ["kept.json"]
    assert json.loads(kept.read_text(encoding="utf-8")) == {"kept": True}


def test_a_truncated_npz_beside_a_whole_json_is_not_up_to_date(tmp_path):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}])
    out = tmp_path / "pre" / folder.name
    dataset = load_raw_dataset(folder)
    preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)
    npz = out / "3d_test" / "case_001.npz"
    with open(npz, "r+b") as stream:  # a copy cut short, or a disk that filled up before the fsync existed
        stream.truncate(npz.stat().st_size // 2)
    again = preprocess_dataset(dataset, out, small_plans(), ["3d_test"], progress=False)
    assert again["processed"] == ["case_001"] and again["skipped"] == ["case_000"]
    with np.load(npz) as data:
        assert data["image"].size > 0


def test_a_damaged_cache_file_is_named_when_training_reads_it(tmp_path):
    from dscovid.training.data import list_cache_cases

    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}])
    out = tmp_path / "pre" / folder.name
    preprocess_dataset(load_raw_dataset(folder), out, small_plans(), ["3d_test"], progress=False)
    npz = out / "3d_test" / "case_000.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 3])
    with pytest.raises(DscovidError) as caught:
        list_cache_cases(out / "3d_test")
    assert str(caught.value).startswith(f"{npz}: damaged preprocessed file") and "dscovid_plan_and_preprocess" in str(caught.value)
    # A member whose bytes were damaged in place (same size, CRC wrong) is named when it is read.
    npz.write_bytes(data)
    cases = list_cache_cases(out / "3d_test")
    with zipfile.ZipFile(npz) as archive:
        offset = archive.getinfo("image.npy").header_offset + 200
    damaged = bytearray(data)
    damaged[offset:offset + 64] = b"\xff" * 64
    npz.write_bytes(bytes(damaged))
    with pytest.raises(DscovidError, match=f"{npz}: damaged preprocessed file.*BadZipFile"):
        cases["case_000"].load()


def test_a_truncated_gzip_reports_how_much_it_holds(tmp_path):
    """Not "0 of N bytes" for every truncation: the bytes that could be decompressed."""
    path = write_image(np.random.default_rng(2).integers(-1000, 400, GEOMETRY.shape_zyx).astype(np.int16), GEOMETRY,
                       tmp_path / "scan.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(DscovidError) as caught:
        read_image(path)
    expected = 352 + 2 * int(np.prod(GEOMETRY.shape_zyx))
    message = str(caught.value)
    assert f"of {expected} bytes of image data" in message and "truncated" in message
    recovered = int(message.split("(")[-1].split(" of ")[0])
    assert 0.4 * expected < recovered < expected
    with gzip.open(path, "rb") as stream:  # what Python itself recovers, as a cross-check
        try:
            stream.read()
        except EOFError:
            pass


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    from dscovid.io.atomic import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = atomic._host()
    dead_file = tmp_path / f".case.nii.gz.{dead_pid}@{host}.abcd1234.nii.gz"
    live_file = tmp_path / f".case2.nii.gz.{os.getpid()}@{host}.abcd1234.nii.gz"
    old_foreign = tmp_path / ".case3.npz.77@otherhost.abcd1234.tmp"
    fresh_foreign = tmp_path / ".case4.npz.77@otherhost.abcd1234.tmp"
    old_legacy = [tmp_path / ".case5.npz.abcd1234.tmp", tmp_path / ".case6.nii.gz.k2j4h1x9.nii.gz"]  # older dscovid's
    old_user_files = [tmp_path / ".hidden_by_the_user", tmp_path / ".config.settings", tmp_path / ".notes.abcdefgh.txt",
                      tmp_path / ".scan.backup12.nii.gz"]
    for path in (dead_file, live_file, old_foreign, fresh_foreign, *old_legacy, *old_user_files):
        path.write_bytes(b"x")
    for path in (old_foreign, *old_legacy, *old_user_files):
        os.utime(path, (time.time() - 7 * 3600,) * 2)
    removed = remove_stale_temporaries(tmp_path, legacy_endings=(".tmp", ".nii.gz"))
    assert sorted(p.name for p in removed) == sorted([dead_file.name, old_foreign.name, *(p.name for p in old_legacy)])
    assert _names(tmp_path) == sorted([live_file.name, fresh_foreign.name, *(p.name for p in old_user_files)])


# ------------------------------------------------------------------------- 4. workers end when their parent dies

_SLOW_PREPROCESSING = textwrap.dedent("""
    import sys, time
    import dscovid.preprocessing.preprocessor as pre
    original = pre.preprocess_image
    def slow(*args, **kwargs):  # spawned workers import this file too: they are slowed the same way
        time.sleep(1.5)
        return original(*args, **kwargs)
    pre.preprocess_image = slow
    if __name__ == "__main__":
        from dscovid.cli.plan_and_preprocess import main
        sys.exit(main(sys.argv[1:]))
""")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_minus_nine_of_plan_and_preprocess_leaves_no_worker_and_the_rerun_finishes(tmp_path):
    folder = make_raw_dataset(tmp_path / "raw", [{"class": c} for c in ("covid", "cap", "non_pneumonia") * 3])
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(small_plans().to_dict()))
    script = tmp_path / "slow_preprocessing.py"
    script.write_text(_SLOW_PREPROCESSING)
    args = ["-d", str(folder), "--preprocessed", str(tmp_path / "pre"), "--plans", str(plans), "-np", "2", "-q"]
    process = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    target = tmp_path / "pre" / folder.name / "3d_test"
    try:
        deadline = time.monotonic() + 180
        while not list(target.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        workers = _children(process.pid)
        assert len(workers) >= 2  # the two workers (and the resource tracker)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 20
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _running(pid)]
    for pid in survivors:  # do not leave them to other tests
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "workers outlived their parent"
    written = {p.name: p.stat().st_mtime_ns for p in target.iterdir() if not p.name.startswith(".")}
    time.sleep(2.0)  # a surviving worker would write (or rewrite) a case in this time
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir() if not p.name.startswith(".")} == written

    from dscovid.cli.plan_and_preprocess import main

    assert main(args[:-3] + ["-np", "1", "-q"]) == 0
    assert sorted(p.stem for p in target.glob("*.npz")) == sorted(f"case_{i:03d}" for i in range(9))
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def _parent_death_signal(_: object = None) -> int:
    """The signal this process gets when its parent dies (Linux prctl PR_GET_PDEATHSIG); 0 for none."""
    import ctypes

    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value))
    return value.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_map_cases_workers_ask_for_the_parent_death_signal():
    """map_cases: the validator's, the evaluation's and the analysis's workers."""
    from dscovid.parallel import map_cases

    assert map_cases(_parent_death_signal, [0, 1], num_processes=2, progress=False) == [signal.SIGKILL] * 2


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_spawned_workers_ask_for_the_parent_death_signal():
    """The spawn pools: fingerprint, preprocessing and prediction."""
    from dscovid.parallel import process_pool

    with process_pool(1) as pool:
        assert pool.submit(_parent_death_signal).result() == signal.SIGKILL


class _RunsCode:
    """Unpickling this would create ``marker``: what a checkpoint loaded with weights_only=False could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from dscovid.results.checkpoint import load_checkpoint

    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint_final.pt"
    torch.save({"network_weights": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(DscovidError, match=f"{path}: not a readable dscovid checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------- 6. case names checked where paths are built


def test_a_case_id_with_dot_dot_writes_nothing_outside_even_without_the_validator(tmp_path, capsys):
    from dscovid.cli.plan_and_preprocess import main

    folder = make_raw_dataset(tmp_path / "raw" / "a" / "b", [{"class": "covid"}, {"class": "cap"}])
    evil = "../../../x/evil"
    outside = folder / "imagesTr" / f"{evil}_0000.nii.gz"  # raw/a/x/evil_0000.nii.gz: the image exists there
    outside.parent.mkdir(parents=True)
    shutil.copy(folder / "imagesTr" / "case_000_0000.nii.gz", outside)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    meta["cases"][evil] = {"class": "covid", "lesion_annotated": False}
    meta["numTraining"] = 3
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = main(["-d", str(folder), "--preprocessed", str(tmp_path / "pre"), "--no-verify", "-np", "1", "-q",
                 "-c", "3d_cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{evil}: case name is not a safe file name" in err
    assert [p.name for p in tmp_path.rglob("evil*")] == ["evil_0000.nii.gz"]  # the user's file only
    assert not [p for p in map(str, tmp_path.rglob("*")) if p not in before and not p.startswith(str(tmp_path / "pre"))]


def test_every_per_case_path_builder_refuses_an_unsafe_name(tmp_path):
    from dscovid.io.dataset import case_file
    from dscovid.preprocessing.lung_cache import _cache_path

    dataset = load_raw_dataset(make_raw_dataset(tmp_path, [{"class": "covid"}]))
    for build in (lambda n: case_file(tmp_path, n, ".npz"), lambda n: _cache_path(tmp_path, n),
                  dataset.image_path, dataset.label_path, dataset.lung_path):
        for name in ("../evil", "a/b", ".hidden", "..", "", "x" * 300):
            with pytest.raises(DscovidError, match="not a safe file name"):
                build(name)


# --------------------------------------------------------------------------------------------- 8. the validator


def _tiny_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "Dataset950_Faults"
    cases = {}
    for index, class_name in enumerate(("covid", "cap", "non_pneumonia")):
        name = f"case_{index:03d}"
        write_image(_ct(index), GEOMETRY, folder / "imagesTr" / f"{name}_0000.nii.gz")
        cases[name] = {"class": class_name, "lesion_annotated": False}
    write_json_atomic(make_dataset_json(folder.name, cases), folder / "dataset.json")
    return folder


def test_a_case_listed_twice_is_refused_with_its_name(tmp_path, capsys):
    from dscovid.cli.plan_and_preprocess import main as preprocess_main
    from dscovid.cli.verify_dataset import main as verify_main

    folder = _tiny_dataset(tmp_path)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    entries = [f'"{name}": {json.dumps(entry)}' for name, entry in meta["cases"].items()]
    # The same case twice with two classes: JSON would keep the last and the case would silently change class.
    entries.append('"case_000": {"class": "cap", "lesion_annotated": false}')
    meta["cases"] = "@CASES@"
    text = json.dumps(meta).replace('"@CASES@"', "{" + ", ".join(entries) + "}")
    (folder / "dataset.json").write_text(text, encoding="utf-8")
    problems = verify_dataset(folder)
    assert len(problems) == 1 and "'case_000'" in problems[0] and "given twice" in problems[0]
    assert verify_main([str(folder), "-q"]) == 1
    assert preprocess_main(["-d", str(folder), "--preprocessed", str(tmp_path / "pre"), "--no-verify", "-q"]) == 1
    shown = capsys.readouterr()
    assert "Traceback" not in shown.err and (shown.out + shown.err).count("'case_000'") == 2


@pytest.mark.parametrize("key, value, expected", [
    ("class", ["covid"], "case_001: class must be a class name (a string), found list ['covid']"),
    ("class", 0, "case_001: class must be a class name (a string), found int 0"),
    ("class", None, "case_001: class must be a class name (a string), found NoneType None"),
    ("lesion_annotated", "yes", "case_001: lesion_annotated must be true or false, found 'yes'"),
    ("metadata", [1, 2], "case_001: metadata must be an object, found list"),
])
def test_every_case_value_is_type_checked_in_verify_and_in_preprocessing(tmp_path, capsys, key, value, expected):
    from dscovid.cli.plan_and_preprocess import main as preprocess_main

    folder = _tiny_dataset(tmp_path)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    meta["cases"]["case_001"][key] = value
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    assert expected in verify_dataset(folder)
    code = preprocess_main(["-d", str(folder), "--preprocessed", str(tmp_path / "pre"), "--no-verify", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and "Traceback" not in err


@pytest.mark.parametrize("key, value, expected", [
    ("numTraining", "3", "numTraining must be a whole number, found '3'"),
    ("numTraining", True, "numTraining must be a whole number, found True"),
    ("classes", ["covid", "cap"], "classes must map at least two names to consecutive indices"),
    ("classes", {"covid": 0, "cap": True, "non_pneumonia": 2}, "classes must map at least two names"),
    ("labels", {"background": False, "lesion": True}, "labels must be"),
    ("channel_names", ["CT"], "channel_names must be"),
    ("file_ending", 7, "file_ending must be one of"),
    ("file_ending", ".png", "file_ending must be one of"),
    ("intensity_unit", ["HU"], "intensity_unit must be"),
    ("name", 12, "name must be a string"),
    ("cases", [], "cases must be an object"),
])
def test_every_dataset_json_value_is_type_checked(tmp_path, key, value, expected):
    folder = _tiny_dataset(tmp_path)
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    meta[key] = value
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    problems = verify_dataset(folder)
    assert any(expected in p and str(folder / "dataset.json") in p for p in problems), problems


# ----------------------------------------------------------------------------------------- 9. plausibility


def test_the_plausibility_rule_refuses_a_slab_and_fifty_mm_slices_and_flags_the_unusual():
    from dscovid.io.plausibility import check_plausibility

    chest = Geometry((120, 512, 512), (2.5, 0.7, 0.7), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert check_plausibility(chest, 5200.0).verdict == "plausible"
    slab = Geometry((2, 512, 512), (5.0, 0.6, 0.6), (0, 0, 0), chest.direction)
    found = check_plausibility(slab)
    assert found.verdict == "refused" and found.refusals[0].startswith("2 slices along the body axis")
    thick = Geometry((8, 512, 512), (50.0, 0.7, 0.7), (0, 0, 0), chest.direction)
    found = check_plausibility(thick, 32500.0)
    assert any("50 mm apart" in r for r in found.refusals) and any("lung volume 32.5 l" in r for r in found.refusals)
    mosmed_like = Geometry((40, 512, 512), (8.0, 0.7, 0.7), (0, 0, 0), chest.direction)
    found = check_plausibility(mosmed_like, 4000.0)
    assert found.verdict == "flagged" and found.flags == ["thick slices: 8 mm apart (above 5 mm, small lesions may be "
                                                          "missed)"]
    cropped = Geometry((112, 102, 122), (1.5, 1.5, 1.5), (0, 0, 0), chest.direction)
    assert check_plausibility(cropped, 600.0).verdict == "flagged"


def test_the_body_axis_is_found_in_a_scan_stored_sideways():
    from dscovid.io.plausibility import check_plausibility, lung_volume_ml

    # z index axis along world x, x index axis along world z: the body axis is index axis x (2).
    direction = (0, 0, 1, 0, 1, 0, 1, 0, 0)
    sideways = Geometry((512, 512, 3), (0.7, 0.7, 5.0), (0, 0, 0), direction)
    found = check_plausibility(sideways)
    assert found.measured["slices"] == 3 and found.verdict == "refused"
    lung = np.zeros((512, 512, 3), np.uint8)
    lung[:100, :100, :] = 1
    assert lung_volume_ml(lung, sideways) == pytest.approx(100 * 100 * 3 * 0.7 * 0.7 * 5.0 / 1000)


# ------------------------------------------------------------------------------------------- 10. small items


@pytest.mark.realdata
def test_the_multi_series_warning_names_the_series(test_data, tmp_path, caplog):
    folder = tmp_path / "two_series"
    folder.mkdir()
    for source in (test_data / "lungmask_testdata").glob("*.dcm"):
        shutil.copy(source, folder / source.name)
    for source in (test_data / "totalsegmentator" / "example_ct_dicom").iterdir():
        shutil.copy(source, folder / source.name)
    with caplog.at_level(logging.WARNING):
        read_image(folder)
    message = next(r.getMessage() for r in caplog.records if "DICOM series found" in r.getMessage())
    assert "using  " not in message and "(20 slices, first file" in message
    assert 'the series "CT Body 3.0" without a SeriesInstanceUID' in message


def test_the_model_error_names_the_dataset_folder_not_the_number_typed(tmp_path):
    from dscovid.results.model_folder import find_model_folder

    (tmp_path / "Dataset001_X" / "DeepSCCOVIDTrainer__3d_cpu").mkdir(parents=True)
    with pytest.raises(DscovidError) as caught:
        find_model_folder(tmp_path, "1", "3d_paper")
    assert str(caught.value).startswith(f"{tmp_path / 'Dataset001_X'}: no trained model")


def test_a_failure_line_starts_its_own_line_in_a_log_file(tmp_path):
    """Off a terminal (a cluster job's log) progress is printed as whole lines; no case line is glued to a bar."""
    folder = make_raw_dataset(tmp_path / "raw", [{"class": "covid"}, {"class": "cap"}, {"class": "covid"}])
    lung = folder / "lungsTr" / "case_001.nii.gz"
    write_image(np.zeros(read_image(lung, check_hu=False)[0].shape, np.uint8), read_image(lung, check_hu=False)[1], lung)
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(small_plans().to_dict()))
    done = subprocess.run([sys.executable, "-m", "dscovid.cli.plan_and_preprocess", "-d", str(folder), "--preprocessed",
                           str(tmp_path / "pre"), "--plans", str(plans), "-np", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any(line.startswith("dscovid_plan_and_preprocess: error: case_001: no lung found") for line in lines), \
        done.stderr
    assert "\r" not in done.stderr
    assert any(line.startswith("fingerprint:") for line in lines)  # progress, on lines of its own


# ------------------------------------------------------------------------------------- bad input, kind by kind
#
# Every kind of bad input a user can hand a command, each answered with one line that names the file (or case)
# and the reason, and a non-zero exit; no traceback. docs/reliability.md counts these kinds.


def _verify(folder: Path) -> tuple:
    from dscovid.cli.verify_dataset import main

    return main, [str(folder), "-q"]


def _preprocess(folder: Path, *extra: str) -> tuple:
    from dscovid.cli.plan_and_preprocess import main

    return main, ["-d", str(folder), "--preprocessed", str(folder.parent / "pre"), "-np", "1", "-q", *extra]


def _edit_meta(folder: Path, edit) -> Path:
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    edit(meta)
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _image(folder: Path, case: str = "case_001") -> Path:
    return folder / "imagesTr" / f"{case}_0000.nii.gz"


def _with_labels(folder: Path) -> Path:
    def annotate(meta):
        for entry in meta["cases"].values():
            entry["lesion_annotated"] = True

    for case in ("case_000", "case_001", "case_002"):
        write_image(np.zeros(GEOMETRY.shape_zyx, np.uint8), GEOMETRY, folder / "labelsTr" / f"{case}.nii.gz")
    return _edit_meta(folder, annotate)


def _write_sitk(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), True)
    return path


def _truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _dataset_kind(kind: str, tmp_path: Path):
    folder = _tiny_dataset(tmp_path)
    json_path = folder / "dataset.json"
    if kind == "dataset folder missing":
        return (*_verify(tmp_path / "Dataset951_Nowhere"), "Dataset951_Nowhere")
    if kind == "dataset.json missing":
        json_path.unlink()
        return (*_verify(folder), f"{json_path}: not found")
    if kind == "dataset.json not JSON":
        json_path.write_text("{'cases': }", encoding="utf-8")
        return (*_verify(folder), f"{json_path}: not valid JSON")
    if kind == "dataset.json not UTF-8":
        json_path.write_bytes(b'{"name": "\xff\xfe"}')
        return (*_verify(folder), f"{json_path}: not valid JSON (not UTF-8")
    if kind == "dataset.json not an object":
        json_path.write_text("[1, 2]", encoding="utf-8")
        return (*_verify(folder), f"{json_path}: must hold a JSON object")
    if kind == "dataset.json a folder":
        json_path.unlink()
        json_path.mkdir()
        return (*_verify(folder), f"{json_path}: is a folder")
    if kind == "required key missing":
        _edit_meta(folder, lambda m: m.pop("classes"))
        return (*_verify(folder), f"{json_path}: missing key 'classes'")
    if kind == "case listed twice":
        json_path.write_text(json_path.read_text(encoding="utf-8").replace(
            '"cases": {', '"cases": {"case_002": {"class": "covid"}, ', 1), encoding="utf-8")
        return (*_verify(folder), "given twice in one object: 'case_002'")
    if kind == "class of a wrong type":
        _edit_meta(folder, lambda m: m["cases"]["case_001"].update({"class": ["covid"]}))
        return (*_preprocess(folder, "--no-verify"), "case_001: class must be a class name (a string)")
    if kind == "unknown class":
        _edit_meta(folder, lambda m: m["cases"]["case_001"].update({"class": "flu"}))
        return (*_verify(folder), "case_001: unknown class 'flu'")
    if kind == "lesion_annotated not true/false":
        _edit_meta(folder, lambda m: m["cases"]["case_001"].update({"lesion_annotated": "no"}))
        return (*_verify(folder), "case_001: lesion_annotated must be true or false")
    if kind == "numTraining wrong":
        _edit_meta(folder, lambda m: m.update({"numTraining": 7}))
        return (*_verify(folder), "numTraining is 7 but 3 cases are listed")
    if kind == "classes not consecutive":
        _edit_meta(folder, lambda m: m.update({"classes": {"covid": 0, "cap": 2, "non_pneumonia": 3}}))
        return (*_verify(folder), "classes must map at least two names to consecutive indices")
    if kind == "file_ending unsupported":
        _edit_meta(folder, lambda m: m.update({"file_ending": ".jpg"}))
        return (*_verify(folder), "file_ending must be one of")
    if kind == "case name unsafe":
        _edit_meta(folder, lambda m: (m["cases"].update({"../x": {"class": "covid"}}), m.update({"numTraining": 4})))
        return (*_verify(folder), "../x: case name is not a safe file name")
    if kind == "image missing":
        _image(folder).unlink()
        return (*_verify(folder), f"case_001: image missing ({_image(folder)})")
    if kind == "image not listed":
        shutil.copy(_image(folder), _image(folder, "stray"))
        return (*_verify(folder), f"stray: image {_image(folder, 'stray')} is not listed")
    if kind == "file of another channel or format in imagesTr":
        shutil.copy(_image(folder), folder / "imagesTr" / "case_001_0001.nii.gz")
        return (*_verify(folder), "case_001_0001.nii.gz: file in imagesTr does not end in _0000.nii.gz")
    if kind == "image unreadable":
        _image(folder).write_bytes(b"not an image at all" * 50)
        return (*_verify(folder), f"case_001: {_image(folder)}: cannot read the image")
    if kind == "image empty (0 bytes)":
        _image(folder).write_bytes(b"")
        return (*_verify(folder), f"case_001: {_image(folder)}: cannot read the image")
    if kind == "image truncated":
        _truncate(_image(folder), 0.6)
        return (*_verify(folder), f"case_001: {_image(folder)}:")
    if kind == "image 2D":
        _write_sitk(sitk.Image(64, 64, sitk.sitkInt16), _image(folder))
        return (*_verify(folder), "is a 2D image of size 64x64")
    if kind == "image 4D":
        _write_sitk(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), _image(folder))
        return (*_verify(folder), "is a 4D image")
    if kind == "image with colour components":
        _write_sitk(sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3), _image(folder))
        return (*_verify(folder), "has 3 components per voxel")
    if kind == "image with NaN":
        array = _ct(1).astype(np.float32)
        array[3, 4, 5] = np.nan
        write_image(array, GEOMETRY, _image(folder))
        return (*_verify(folder), "contains 1 NaN or infinite voxels")
    if kind == "image not in HU":
        write_image((_ct(1) + 1024).astype(np.int16), GEOMETRY, _image(folder))
        return (*_verify(folder), "do not look like Hounsfield units")
    if kind == "label on another grid":
        _with_labels(folder)
        moved = Geometry(GEOMETRY.shape_zyx, GEOMETRY.spacing_zyx_mm, (5.0, 0.0, 0.0), GEOMETRY.direction)
        write_image(np.zeros(GEOMETRY.shape_zyx, np.uint8), moved, folder / "labelsTr" / "case_001.nii.gz")
        return (*_verify(folder), "case_001: label geometry does not match the image")
    if kind == "label values not 0/1":
        _with_labels(folder)
        write_image(np.full(GEOMETRY.shape_zyx, 2, np.uint8), GEOMETRY, folder / "labelsTr" / "case_001.nii.gz")
        return (*_verify(folder), "case_001: label values must be 0 or 1, found 2")
    if kind == "non-pneumonia case with lesion voxels":
        _with_labels(folder)
        write_image(np.ones(GEOMETRY.shape_zyx, np.uint8), GEOMETRY, folder / "labelsTr" / "case_002.nii.gz")
        return (*_verify(folder), "case_002: a non_pneumonia case has lesion voxels in its label")
    if kind == "annotated case without label":
        _with_labels(folder)
        (folder / "labelsTr" / "case_001.nii.gz").unlink()
        return (*_verify(folder), "case_001: lesion_annotated is true but the label")
    if kind == "lung mask on another grid":
        small = Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0), GEOMETRY.direction)
        write_image(np.ones((4, 4, 4), np.uint8), small, folder / "lungsTr" / "case_001.nii.gz")
        return (*_verify(folder), "case_001: lung mask geometry does not match the image")
    if kind == "scan without lungs":
        write_image(np.full(GEOMETRY.shape_zyx, -1000, np.int16), GEOMETRY, folder / "imagesTr" / "case_001_0000.nii.gz")
        array = np.full(GEOMETRY.shape_zyx, -1000, np.int16)
        array[:, 8:40, 8:40] = 40  # a block of soft tissue in air: no lung anywhere
        write_image(array, GEOMETRY, _image(folder))
        return (*_preprocess(folder, "-c", "3d_cpu"), "case_001: no lung found")
    if kind == "plans file of another dataset":
        plans = tmp_path / "plans.json"
        plans.write_text(json.dumps(small_plans().to_dict()), encoding="utf-8")
        return (*_preprocess(folder, "--plans", str(plans)), "the plans are for Dataset900_Tiny, not Dataset950_Faults")
    if kind == "plans file with a wrong value":
        bad = small_plans().to_dict()
        bad["dataset_name"] = folder.name
        bad["configurations"]["3d_test"]["segmentation"]["patch_size_zyx"] = [8, -16, 16]
        plans = tmp_path / "plans.json"
        plans.write_text(json.dumps(bad), encoding="utf-8")
        return (*_preprocess(folder, "--plans", str(plans)), f"{plans}: configurations.3d_test.segmentation.patch_size_zyx")
    if kind == "-np below 1":
        return (*_preprocess(folder, "-np", "0"), "-np must be at least 1, got 0")
    if kind == "preprocessed root under a file":
        (tmp_path / "a_file").write_text("x", encoding="utf-8")
        main, argv = _preprocess(folder)
        argv[argv.index("--preprocessed") + 1] = str(tmp_path / "a_file" / "pre")
        return main, argv, "a_file"
    raise AssertionError(kind)


DATASET_KINDS = [
    "dataset folder missing", "dataset.json missing", "dataset.json not JSON", "dataset.json not UTF-8",
    "dataset.json not an object", "dataset.json a folder", "required key missing", "case listed twice",
    "class of a wrong type", "unknown class", "lesion_annotated not true/false", "numTraining wrong",
    "classes not consecutive", "file_ending unsupported", "case name unsafe", "image missing", "image not listed",
    "file of another channel or format in imagesTr", "image unreadable", "image empty (0 bytes)", "image truncated",
    "image 2D", "image 4D", "image with colour components", "image with NaN", "image not in HU",
    "label on another grid", "label values not 0/1", "non-pneumonia case with lesion voxels",
    "annotated case without label", "lung mask on another grid", "scan without lungs",
    "plans file of another dataset", "plans file with a wrong value", "-np below 1", "preprocessed root under a file",
]


def _one_line_failure(main, argv, expected, capsys) -> None:
    code = main(argv)
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert code != 0, text
    assert "Traceback" not in text, text
    assert any(expected in line for line in text.splitlines()), f"{expected!r} not on one line of:\n{text}"


@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_bad_dataset_input_is_one_line(tmp_path, capsys, kind):
    main, argv, expected = _dataset_kind(kind, tmp_path)
    _one_line_failure(main, argv, expected, capsys)


@pytest.fixture(scope="module")
def preprocessed_tiny(tmp_path_factory) -> Path:
    """A preprocessed root holding Dataset900_Tiny (3d_test), made once for the training kinds."""
    root = tmp_path_factory.mktemp("preprocessed_tiny")
    folder = make_raw_dataset(root / "raw", [{"class": c} for c in ("covid", "cap", "non_pneumonia", "covid")])
    out = root / "pre" / folder.name
    preprocess_dataset(load_raw_dataset(folder), out, small_plans(), ["3d_test"], progress=False)
    write_json_atomic(small_plans().to_dict(), out / "plans.json")
    write_json_atomic(load_raw_dataset(folder).meta, out / "dataset.json")
    return root


def _training_kind(kind: str, tmp_path: Path, source: Path):
    from dscovid.cli.train import main

    shutil.copytree(source / "pre", tmp_path / "pre")
    argv = ["0", "-d", "Dataset900_Tiny", "-c", "3d_test", "--preprocessed", str(tmp_path / "pre"), "--results",
            str(tmp_path / "res"), "--device", "cpu", "--no-validation", "--workers", "0", "-q"]
    cache = tmp_path / "pre" / "Dataset900_Tiny" / "3d_test"
    if kind == "preprocessed case damaged":
        _truncate(cache / "case_002.npz", 0.5)
        return main, argv, f"{cache / 'case_002.npz'}: damaged preprocessed file"
    if kind == "preprocessed case properties not JSON":
        (cache / "case_002.json").write_text("{", encoding="utf-8")
        return main, argv, f"{cache / 'case_002.json'}: not valid JSON"
    if kind == "fold unknown":
        return main, ["eleven", *argv[1:]], "fold must be a number or 'all', got 'eleven'"
    if kind == "configuration not planned":
        argv[argv.index("3d_test")] = "3d_huge"
        return main, argv, "no configuration '3d_huge'"
    if kind == "no preprocessed data":
        shutil.rmtree(cache)
        return main, argv, "preprocessed data not found"
    raise AssertionError(kind)


TRAINING_KINDS = ["preprocessed case damaged", "preprocessed case properties not JSON", "fold unknown",
                  "configuration not planned", "no preprocessed data"]


@pytest.mark.parametrize("kind", TRAINING_KINDS)
def test_bad_training_input_is_one_line(tmp_path, capsys, preprocessed_tiny, kind):
    main, argv, expected = _training_kind(kind, tmp_path, preprocessed_tiny)
    _one_line_failure(main, argv, expected, capsys)


# ============================================================================================ the predictor
#
# A model with random weights (conftest.save_fake_model) and small synthetic chest CTs; what is checked holds for
# any weights.


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory) -> Path:

    return save_fake_model(tmp_path_factory.mktemp("fault_results"), folds=(0,))


@pytest.fixture(scope="module")
def chest_scan(tmp_path_factory) -> Path:
    """A small synthetic chest CT (.nii.gz) that passes every check."""
    case = synthetic.generate_case(seed=7, index=1, scale=0.5)
    return write_image(case.image_hu, case.geometry, tmp_path_factory.mktemp("scans") / "chest.nii.gz")


def _pelvis(path: Path) -> Path:
    """A scan without lungs: a block of soft tissue in air (the case fails in the lung mask)."""
    array = np.full((40, 64, 64), -1000, np.int16)
    array[:, 10:54, 10:54] = 40
    return write_image(array, Geometry((40, 64, 64), (5.0, 5.0, 5.0), (0, 0, 0), GEOMETRY.direction), path)


def _predict(model: Path, inputs, output: Path, *extra: str, capsys=None) -> tuple[int, str]:
    from dscovid.cli.predict import main

    argv = ["-i", *[str(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])], "-o", str(output),
            "-m", str(model), "--device", "cpu", "--step", "1", "-q", *extra]  # non-overlapping tiles: fast
    code = main(argv)
    text = ""
    if capsys is not None:
        shown = capsys.readouterr()
        text = shown.out + shown.err
    return code, text


def _fingerprints(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- 1. the output folder and the inputs


@pytest.mark.parametrize("layout", ["equal", "inside", "contains", "contains a file input"])
def test_an_output_folder_that_equals_lies_inside_or_contains_an_input_is_refused(fake_model, chest_scan, tmp_path,
                                                                                  capsys, layout):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(chest_scan, scans / "scan.nii.gz")
    _pelvis(scans / "pelvis.nii.gz")
    before = _fingerprints(tmp_path)
    inputs, output = {"equal": (scans, scans), "inside": (scans, scans / "predictions"),
                      "contains": (scans, tmp_path), "contains a file input": (scans / "scan.nii.gz", scans)}[layout]
    code, text = _predict(fake_model, inputs, output, capsys=capsys)
    assert code == 1 and "Traceback" not in text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(output) in lines[0] and "input" in lines[0], text
    assert _fingerprints(tmp_path) == before  # the scans untouched, nothing written


def test_a_failed_case_removes_only_what_this_run_wrote(fake_model, tmp_path, capsys):
    """The output folder holds a user's file named like the failing case's output: it stays."""
    scans, output = tmp_path / "scans", tmp_path / "out"
    _pelvis(scans / "pelvis.nii.gz")
    output.mkdir()
    (output / "pelvis.nii.gz").write_bytes(b"the user's own file")
    (output / "pelvis_montage.png").write_bytes(b"another")
    code, text = _predict(fake_model, scans, output, capsys=capsys)
    assert code == 1 and "pelvis: failed:" in text
    assert (output / "pelvis.nii.gz").read_bytes() == b"the user's own file"
    assert (output / "pelvis_montage.png").read_bytes() == b"another"


def test_a_case_that_fails_again_keeps_its_earlier_result(fake_model, chest_scan, tmp_path, monkeypatch, capsys):
    """A rerun whose export of a case fails (here ITK writes a short file) leaves the earlier files and record."""
    scans, output = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(chest_scan, scans / "chest.nii.gz")
    assert _predict(fake_model, scans, output, capsys=capsys)[0] == 0
    before = _fingerprints(output)
    real = sitk.WriteImage

    def short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        with open(path, "r+b") as stream:
            stream.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(sitk, "WriteImage", short)
    code, text = _predict(fake_model, scans, output, capsys=capsys)
    assert code == 1 and "chest: failed:" in text and "incomplete" in text
    after = _fingerprints(output)
    for name, data in before.items():
        if name.endswith((".nii.gz", ".result.json")):
            assert after[name] == data, name  # the earlier files and record, byte for byte
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in summary["cases"]] == ["chest"]
    assert summary["failed"][0]["case"] == "chest" and summary["failed"][0]["earlier_result_kept"] is True
    assert not [p for p in output.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- 2. a full disk in the predictor


def test_disk_full_during_export_fails_that_case_in_one_line_and_the_summary_is_written(fake_model, chest_scan,
                                                                                         tmp_path, monkeypatch,
                                                                                         full_disk, capsys):
    scans, output = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    shutil.copy(chest_scan, scans / "good.nii.gz")
    shutil.copy(chest_scan, scans / "full.nii.gz")
    real = sitk.WriteImage

    def short_for_one_case(image, path, *args, **kwargs):  # ITK on a full disk: a short file, no error
        real(image, path, *args, **kwargs)
        if Path(path).name.startswith(".full_evidence"):
            with open(path, "r+b") as stream:
                stream.truncate(os.path.getsize(path) // 3)

    monkeypatch.setattr(sitk, "WriteImage", short_for_one_case)
    full_disk(only=".probe")  # and the probe finds the disk full
    code, text = _predict(fake_model, scans, output, capsys=capsys)
    assert code == 1
    lines = [line for line in text.splitlines() if line.startswith("full: failed:")]
    assert len(lines) == 1 and "disk full" in lines[0] and "full_evidence.nii.gz" in lines[0], text
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in summary["cases"]] == ["good"]
    assert [f["case"] for f in summary["failed"]] == ["full"] and "disk full" in summary["failed"][0]["reason"]
    assert not list(output.glob("full*")) and not [p for p in output.iterdir() if p.name.startswith(".")]
    assert (output / "good.nii.gz").exists() and (output / "good_evidence.nii.gz").exists()


# ------------------------------------------------------------------ 3. two runs into one output folder at once


def test_a_run_that_ends_while_another_is_running_loses_none_of_its_cases(fake_model, chest_scan, tmp_path):
    """Run B starts and ends inside run A (called from A's per-case hook); both runs' cases are listed at the end."""
    from dscovid.prediction.predict import predict_cases

    first, second, output = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, names in ((first, ("a1", "a2")), (second, ("b1",))):
        folder.mkdir()
        for name in names:
            shutil.copy(chest_scan, folder / f"{name}.nii.gz")
    host = atomic._host()
    live = output / f".a2.nii.gz.{os.getpid()}@{host}.abcd1234.nii.gz"  # a live writer's temporary file
    output.mkdir()
    live.write_bytes(b"being written")
    ran = []

    def run_b_inside_a(entry: dict) -> None:
        if not ran:
            ran.append(predict_cases(fake_model, second, output, device="cpu", progress=False, step_fraction=1.0))

    summary_a = predict_cases(fake_model, first, output, device="cpu", progress=False, step_fraction=1.0,
                              on_case=run_b_inside_a)
    assert [c["case"] for c in ran[0]["cases"]] == ["a1", "b1"]  # B saw A's finished case
    stored = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in stored["cases"]] == ["a1", "a2", "b1"] == [c["case"] for c in summary_a["cases"]]
    rows = (output / "predictions.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["a1", "a2", "b1"]
    assert live.read_bytes() == b"being written"  # neither run removed a live writer's file


@pytest.mark.slow
def test_two_predict_processes_into_one_folder_both_finish_and_both_are_listed(fake_model, chest_scan, tmp_path):
    output = tmp_path / "out"
    runs = []
    for part in ("a", "b"):
        folder = tmp_path / part
        folder.mkdir()
        for index in range(2):
            shutil.copy(chest_scan, folder / f"{part}{index}.nii.gz")
        runs.append(subprocess.Popen([sys.executable, "-m", "dscovid.cli.predict", "-i", str(folder), "-o", str(output),
                                      "-m", str(fake_model), "--device", "cpu", "--step", "1", "-q"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    stored = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in stored["cases"]] == ["a0", "a1", "b0", "b1"] and stored["failed"] == []
    for case in ("a0", "a1", "b0", "b1"):
        assert read_image(output / f"{case}.nii.gz", check_hu=False)[0].shape


# ------------------------------------------------------------------- 4. predict's workers end with their parent


_SLOW_PREDICTION = textwrap.dedent("""
    import sys, time
    import dscovid.prediction.inputs as inputs
    original = inputs.load_case
    def slow(*args, **kwargs):  # the spawned readers import this file too: they are slowed the same way
        time.sleep(2.0)
        return original(*args, **kwargs)
    inputs.load_case = slow
    import dscovid.prediction.predict as predict
    predict.load_case = slow
    if __name__ == "__main__":
        from dscovid.cli.predict import main
        sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_minus_nine_of_predict_leaves_no_worker(fake_model, chest_scan, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for index in range(6):
        shutil.copy(chest_scan, scans / f"c{index}.nii.gz")
    script = tmp_path / "slow_prediction.py"
    script.write_text(_SLOW_PREDICTION)
    process = subprocess.Popen([sys.executable, str(script), "-i", str(scans), "-o", str(tmp_path / "out"), "-m",
                                str(fake_model), "--device", "cpu", "-np", "2", "-q"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(process.pid)
        assert process.poll() is None and len(workers) >= 2
        time.sleep(1.0)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 20
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _running(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "prediction workers outlived their parent"


# --------------------------------------------------------------------------------- 5. parts of one input folder


def test_parts_share_one_input_and_one_output_folder_and_every_case_is_listed_once(fake_model, chest_scan, tmp_path,
                                                                                   capsys):
    scans, output = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for name in ("c0", "c1", "c2"):
        shutil.copy(chest_scan, scans / f"{name}.nii.gz")
    seen = []
    for part in (1, 0):
        code, _ = _predict(fake_model, scans, output, "--num-parts", "2", "--part-id", str(part), capsys=capsys)
        assert code == 0
        seen.append([c["case"] for c in json.loads((output / "predictions.json").read_text(encoding="utf-8"))["cases"]])
    assert seen == [["c1"], ["c0", "c1", "c2"]]  # part 1: every second case from the second on
    code, text = _predict(fake_model, scans, output, "--num-parts", "2", "--part-id", "2", capsys=capsys)
    assert code == 1 and "--part-id must be in 0..1, got 2" in text


# ----------------------------------------------------------------------------------- 7. unwritable output folders


@pytest.mark.parametrize("where", ["an existing file", "under a file", "under /proc", "under /sys"])
def test_an_unwritable_output_folder_is_one_line(fake_model, chest_scan, tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    output = {"an existing file": tmp_path / "a_file", "under a file": tmp_path / "a_file" / "out",
              "under /proc": Path("/proc/dscovid_out"), "under /sys": Path("/sys/dscovid_out")}[where]
    if not output.parent.exists():
        pytest.skip(f"{output.parent} does not exist here")
    code, text = _predict(fake_model, chest_scan, output, capsys=capsys)
    lines = [line for line in text.splitlines() if "error:" in line]
    assert code == 1 and "Traceback" not in text and len(lines) == 1 and str(output) in lines[0], text
    assert (tmp_path / "a_file").read_text(encoding="utf-8") == "x"


@pytest.fixture
def read_only_folder(tiny_filesystem):
    """A folder on a read-only file system (a tmpfs remounted read-only)."""
    (tiny_filesystem / "out").mkdir()
    (tiny_filesystem / "out" / "earlier.txt").write_text("kept", encoding="utf-8")
    done = subprocess.run(["mount", "-o", "remount,ro", str(tiny_filesystem)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only ({done.stderr.strip()})")
    return tiny_filesystem / "out"


def test_a_read_only_output_folder_is_one_line(fake_model, chest_scan, read_only_folder, capsys):
    code, text = _predict(fake_model, chest_scan, read_only_folder, capsys=capsys)
    lines = [line for line in text.splitlines() if "error:" in line]
    assert code == 1 and "Traceback" not in text and len(lines) == 1, text
    assert str(read_only_folder) in lines[0] and "read-only file system" in lines[0]


# ---------------------------------------------------------------------------------- 9. implausible scans


def _resampled(chest_scan: Path, path: Path, spacing_z_mm: float | None = None, slices: int | None = None) -> Path:
    image, geometry = read_image(chest_scan)
    if slices is not None:
        start = image.shape[0] // 2
        image = image[start:start + slices]
        geometry = Geometry(tuple(image.shape), geometry.spacing_zyx_mm, geometry.origin_xyz_mm, geometry.direction)
    if spacing_z_mm is not None:
        step = max(1, round(spacing_z_mm / geometry.spacing_zyx_mm[0]))
        image = image[::step]
        geometry = Geometry(tuple(image.shape), (geometry.spacing_zyx_mm[0] * step, *geometry.spacing_zyx_mm[1:]),
                            geometry.origin_xyz_mm, geometry.direction)
    return write_image(image, geometry, path)


def test_implausible_scans_are_refused_and_unusual_ones_flagged(fake_model, chest_scan, tmp_path, capsys):
    scans, output = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    _resampled(chest_scan, scans / "slab.nii.gz", slices=2)
    _resampled(chest_scan, scans / "thick.nii.gz", spacing_z_mm=50.0)
    shutil.copy(chest_scan, scans / "chest.nii.gz")  # 7 mm slices: flagged, predicted
    code, text = _predict(fake_model, scans, output, capsys=capsys)
    assert code == 1
    assert any(line.startswith("slab: failed:") and "implausible chest CT: 2 slices" in line for line in text.splitlines())
    assert any(line.startswith("thick: failed:") and "mm apart" in line for line in text.splitlines())
    assert any(line.startswith("chest: flagged:") and "thick slices" in line for line in text.splitlines())
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    (entry,) = summary["cases"]
    assert entry["case"] == "chest" and entry["plausibility"]["verdict"] == "flagged"
    assert entry["plausibility"]["measured"]["lung_volume_ml"] > 1000
    assert sorted(f["case"] for f in summary["failed"]) == ["slab", "thick"]
    header, row = (output / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert "plausibility" in header.split(",") and "flagged" in row
    # Asked for, the refused ones are predicted too, with what is wrong as flags.
    code, _ = _predict(fake_model, scans / "slab.nii.gz", output, "--accept-implausible", capsys=capsys)
    assert code == 0
    summary = json.loads((output / "predictions.json").read_text(encoding="utf-8"))
    slab = next(c for c in summary["cases"] if c["case"] == "slab")
    assert slab["plausibility"]["verdict"] == "refused" and slab["plausibility"]["accepted"] is True


# -------------------------------------------------------------------------------------- 10. the predictor's lines


@pytest.mark.slow
def test_predict_failure_lines_are_not_glued_to_the_progress_bar(fake_model, chest_scan, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    _pelvis(scans / "a_pelvis.nii.gz")
    shutil.copy(chest_scan, scans / "b_chest.nii.gz")
    done = subprocess.run([sys.executable, "-m", "dscovid.cli.predict", "-i", str(scans), "-o", str(tmp_path / "out"),
                           "-m", str(fake_model), "--device", "cpu", "--step", "1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1
    assert "\r" not in done.stderr
    assert any(line.startswith("a_pelvis: failed: ") for line in done.stderr.splitlines()), done.stderr


def _prediction_kind(kind: str, tmp_path: Path, model: Path, chest_scan: Path):
    from dscovid.cli.predict import main

    scans, output = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()

    def run(*extra: str, inputs: Path = scans, out: Path = output, model_dir: Path = model):
        return main, ["-i", str(inputs), "-o", str(out), "-m", str(model_dir), "--device", "cpu", "-q", *extra]

    def one_scan(name: str = "scan.nii.gz") -> Path:
        return Path(shutil.copy(chest_scan, scans / name))

    if kind == "input missing":
        return (*run(inputs=tmp_path / "nowhere"), f"{tmp_path / 'nowhere'}: no such file or folder")
    if kind == "input folder without scans":
        (scans / "notes.txt").write_text("x", encoding="utf-8")
        return (*run(), f"{scans}: no CT volume")
    if kind == "output folder is the input folder":
        one_scan()
        return (*run(out=scans), "the output folder is the input folder")
    if kind == "output folder inside the input folder":
        one_scan()
        return (*run(out=scans / "out"), "the output folder lies inside the input folder")
    if kind == "output folder contains the input":
        return (*run(inputs=one_scan(), out=scans), "the output folder contains the input")
    if kind == "output is an existing file":
        (tmp_path / "a_file").write_text("x", encoding="utf-8")
        one_scan()
        return (*run(out=tmp_path / "a_file"), "exists and is a file, not a folder")
    if kind == "output under a file":
        (tmp_path / "a_file").write_text("x", encoding="utf-8")
        one_scan()
        return (*run(out=tmp_path / "a_file" / "out"), "cannot create the folder (a part of the path is a file")
    if kind == "output under /proc":
        one_scan()
        return (*run(out=Path("/proc/dscovid_out")), "/proc/dscovid_out: cannot create the folder")
    if kind == "output holds another model's predictions":
        one_scan()
        (output / "records").mkdir(parents=True)
        (output / "records" / "identity.json").write_text(json.dumps({"trainer": "Other", "folds": ["3"]}),
                                                          encoding="utf-8")
        return (*run(), "already holds predictions of another model or setting")
    if kind == "model folder missing":
        one_scan()
        return (*run(model_dir=tmp_path / "no_model"), str(tmp_path / "no_model"))
    if kind == "fold not trained":
        one_scan()
        return (*run("-f", "7"), "fold 7 has no checkpoint_final.pt")
    if kind == "checkpoint damaged":
        damaged = tmp_path / "model"
        shutil.copytree(model, damaged)
        checkpoint = damaged / "fold_0" / "checkpoint_final.pt"
        _truncate(checkpoint, 0.5)
        one_scan()
        return (*run(model_dir=damaged), f"{checkpoint}: not a readable dscovid checkpoint")
    if kind == "-np below 1":
        one_scan()
        return (*run("-np", "0"), "-np must be at least 1, got 0")
    if kind == "sliding-window step out of range":
        one_scan()
        return (*run("--step", "2"), "the sliding-window step must be in (0, 1], got 2.0")
    if kind == "part outside the parts":
        one_scan()
        return (*run("--num-parts", "3", "--part-id", "3"), "--part-id must be in 0..2, got 3")
    if kind == "--dicom with a volume":
        one_scan()
        return (*run("--dicom"), "--dicom needs DICOM series input")
    # one case that fails; its line names the case and the file
    if kind == "scan unreadable":
        (scans / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        return (*run(), f"bad: failed: {scans / 'bad.nii.gz'}: cannot read the image")
    if kind == "scan truncated":
        _truncate(one_scan("cut.nii.gz"), 0.5)
        return (*run(), f"cut: failed: {scans / 'cut.nii.gz'}:")
    if kind == "scan 2D":
        _write_sitk(sitk.Image(64, 64, sitk.sitkInt16), scans / "flat.nii.gz")
        return (*run(), "flat: failed: " + str(scans / "flat.nii.gz") + ": is a 2D image")
    if kind == "scan with NaN":
        array = _ct().astype(np.float32)
        array[1, 2, 3] = np.nan
        write_image(array, GEOMETRY, scans / "nan.mha")
        return (*run(), "nan: failed: " + str(scans / "nan.mha") + ": contains 1 NaN")
    if kind == "scan not in HU":
        write_image((_ct() + 1024).astype(np.int16), GEOMETRY, scans / "raw.nii.gz")
        return (*run(), "raw: failed: " + str(scans / "raw.nii.gz") + ": intensities range")
    if kind == "scan without lungs":
        _pelvis(scans / "pelvis.nii.gz")
        return (*run(), "pelvis: failed: " + str(scans / "pelvis.nii.gz") + ": no lung found")
    if kind == "scan a slab of 2 slices":
        _resampled(chest_scan, scans / "slab.nii.gz", slices=2)
        return (*run(), "slab: failed: " + str(scans / "slab.nii.gz") + ": implausible chest CT: 2 slices")
    if kind == "scan of 50 mm slices":
        _resampled(chest_scan, scans / "thick.nii.gz", spacing_z_mm=50.0)
        return (*run(), "thick: failed: " + str(scans / "thick.nii.gz") + ": implausible chest CT:")
    if kind == "case name not a safe file name":
        one_scan("a b.nii.gz")
        return (*run(), "a b: failed: " + str(scans / "a b.nii.gz") + ": case name 'a b' is not a safe file name")
    if kind == "two scans with one case name":
        one_scan("twin.nii.gz")
        one_scan("twin_0000.nii.gz")
        return (*run(), "is already used by")
    raise AssertionError(kind)


PREDICTION_KINDS = [
    "input missing", "input folder without scans", "output folder is the input folder",
    "output folder inside the input folder", "output folder contains the input", "output is an existing file",
    "output under a file", "output under /proc", "output holds another model's predictions", "model folder missing",
    "fold not trained", "checkpoint damaged", "-np below 1", "sliding-window step out of range",
    "part outside the parts", "--dicom with a volume", "scan unreadable", "scan truncated", "scan 2D",
    "scan with NaN", "scan not in HU", "scan without lungs", "scan a slab of 2 slices", "scan of 50 mm slices",
    "case name not a safe file name", "two scans with one case name",
]


@pytest.mark.parametrize("kind", PREDICTION_KINDS)
def test_bad_prediction_input_is_one_line(tmp_path, capsys, fake_model, chest_scan, kind):
    if kind == "output under /proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    main, argv, expected = _prediction_kind(kind, tmp_path, fake_model, chest_scan)
    _one_line_failure(main, argv, expected, capsys)
