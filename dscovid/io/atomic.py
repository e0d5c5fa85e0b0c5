"""Atomic, verified writes: every file dscovid writes appears whole or not at all.

The content goes to a temporary name in the target's folder. Before the temporary file is renamed over the
target, what was written is checked (its size, and whatever ``verify`` reads back) and flushed to the disk
(``fsync``); an interrupted run (kill -9 included) leaves at most a hidden temporary file, never a half file
under the real name. A write that fails (disk full, quota, read-only file system, no permission, a file where a
folder should be) removes its temporary file and raises a :class:`~dscovid.errors.DscovidError` whose one line
names the target and the reason, for example ``out/case.nii.gz: cannot write (disk full: no space left on
device)``.

All writers open their files through :func:`open_for_writing`, the one place where a test injects a failing
write (``tests/test_faults.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dscovid.errors import DscovidError

log = logging.getLogger(__name__)

#: Mode of written files: what a plain ``open`` gives under the usual umask (mkstemp's 0600 would survive the rename).
FILE_MODE = 0o644

#: A temporary file nobody wrote to for this long is a dead writer's, wherever it ran (see remove_stale_temporaries).
STALE_AFTER_S = 6 * 3600.0

#: Bytes a probe writes to tell a full disk from another failure of a writer that does not report errors (ITK).
_PROBE_BYTES = 1 << 20

_REASONS = {
    errno.ENOSPC: "disk full: no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large for this file system",
}


def describe_os_error(error: OSError) -> str:
    """The reason of a failed file operation in words (``disk full: no space left on device``)."""
    return _REASONS.get(error.errno) or (error.strerror or type(error).__name__).lower()


def write_error(path: str | os.PathLike, error: OSError) -> DscovidError:
    """The one-line error of a failed write of ``path``."""
    return DscovidError(f"{path}: cannot write ({describe_os_error(error)})")


def open_for_writing(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for writing bytes (every atomic writer goes through here)."""
    return open(path, "wb")


def _sync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems cannot fsync a folder, which only weakens durability."""
    try:
        _sync_path(folder)
    except OSError:
        pass


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line error naming the folder (a file in the way, no permission, ...)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if isinstance(error, FileExistsError) or folder.exists() and not folder.is_dir():
            raise DscovidError(f"{folder}: cannot create the folder (a file of that name is in the way)") from None
        raise DscovidError(f"{folder}: cannot create the folder ({describe_os_error(error)})") from None
    return folder


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0])[:40] or "host"


def _writer_tag() -> str:
    """``<pid>@<host>``: which process writes a temporary file (see :func:`remove_stale_temporaries`)."""
    return f"{os.getpid()}@{_host()}"


_TAGGED = re.compile(r"^\..+\.(\d+)@([A-Za-z0-9-]*)\.[a-z0-9_]{8}")
# An older dscovid's temporary name: ``.<target>.<random><suffix>``, where the target ends in the suffix too
# (``.case.nii.gz.k2j4h1x9.nii.gz``), or the suffix is ``.tmp`` (``.plans.json.k2j4h1x9.tmp``).
_UNTAGGED = re.compile(r"^\.(.+)\.[a-z0-9_]{8}(\.[a-z.]+)$")


def _legacy_temporary(name: str, endings: tuple[str, ...]) -> bool:
    match = _UNTAGGED.match(name)
    if match is None or match.group(2) not in endings:
        return False
    return match.group(2) == ".tmp" or match.group(1).endswith(match.group(2))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a killed process that nobody reaped yet (a zombie) writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(folder: str | os.PathLike, legacy_endings: tuple[str, ...] = (),
                             max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files that writers which died left in ``folder``; never a live writer's.

    A temporary file (``.<target>.<pid>@<host>.<random><ending>``) or staging folder (:func:`staged_folder`) is
    stale when its writer was a process of
    this host that no longer runs, or when nobody has written to it for ``max_age_s`` seconds (a writer on
    another machine of a cluster). Files of an older dscovid, without the writer's tag
    (``.<target>.<random><ending>``), are removed only when they end in one of ``legacy_endings`` and are that old.
    Every other file is left alone, hidden or not. Returns the files removed.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host, now = _host(), time.time()
    for candidate in folder.iterdir():
        tagged = _TAGGED.match(candidate.name)
        if tagged is None and not _legacy_temporary(candidate.name, legacy_endings):
            continue
        try:
            is_folder = candidate.is_dir() and not candidate.is_symlink()
            if is_folder and tagged is None or not (is_folder or candidate.is_file()):
                continue  # a staging folder always carries its writer's tag
            idle = now - max([candidate.stat().st_mtime] + [p.stat().st_mtime for p in candidate.iterdir()]
                             if is_folder else [candidate.stat().st_mtime])
        except OSError:
            continue  # renamed or removed by its writer meanwhile
        dead = tagged is not None and tagged.group(2) == host and not _process_alive(int(tagged.group(1)))
        if dead or idle > max_age_s:
            try:
                shutil.rmtree(candidate) if is_folder else candidate.unlink(missing_ok=True)
            except OSError as error:
                log.warning("%s: could not remove a stale temporary file (%s)", candidate, describe_os_error(error))
                continue
            removed.append(candidate)
    return removed


@contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = ".tmp", verify: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once written it is verified, flushed and renamed to ``path``.

    Parameters
    ----------
    path : the final file.
    suffix : the temporary name's ending, for writers that choose the format from it (``.png``, ``.nii.gz``).
    verify : called with the temporary path after the caller wrote it; raises (a :class:`DscovidError` naming
        the problem) when the content is not what was meant to be written. Nothing is renamed then.

    Raises
    ------
    DscovidError
        One line naming ``path`` and the reason when the folder cannot be made, the write or the check fails,
        or the rename fails. The temporary file is removed in every case of failure.
    """
    path = Path(path)
    temporary = _new_temporary(path, suffix)
    try:
        yield temporary
        if verify is not None:
            verify(temporary)
        _sync_path(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException as error:
        _remove_temporary(temporary)
        if isinstance(error, OSError):
            raise write_error(path, error) from None
        raise
    _sync_folder(path.parent)


def _new_temporary(path: Path, suffix: str) -> Path:
    """An empty hidden file beside ``path``, named so that :func:`remove_stale_temporaries` knows its writer."""
    make_folder(path.parent)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise write_error(path, error) from None
    os.close(handle)
    return Path(name)


def _remove_temporary(temporary: Path) -> None:
    try:
        temporary.unlink(missing_ok=True)
    except OSError as cleanup:
        log.warning("%s: could not remove the temporary file (%s)", temporary, describe_os_error(cleanup))


@contextmanager
def scratch_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a hidden temporary file beside ``path`` (named as :func:`atomic_path` names its own, so that
    :func:`remove_stale_temporaries` recognises a dead writer's), removed when the block ends, whatever happens.

    For an intermediate file that never takes a final name (an uncompressed image compressed into another file).
    """
    temporary = _new_temporary(Path(path), suffix)
    try:
        yield temporary
    finally:
        _remove_temporary(temporary)


def check_size(temporary: Path, expected: int, target: str | os.PathLike) -> None:
    """Refuse a file whose size on disk is not ``expected`` bytes (a short write that went unreported)."""
    actual = temporary.stat().st_size
    if actual != expected:
        raise incomplete_write(target, temporary, f"{actual} of {expected} bytes on disk")


def incomplete_write(target: str | os.PathLike, temporary: Path, detail: str) -> DscovidError:
    """The error for a written file found incomplete by a read-back; names a full disk when that is the cause.

    Some writers (ITK's) do not report a failed write; the probe writes a little beside the file to learn whether
    the disk (or the quota) is full.
    """
    probe = None
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{Path(target).name}.{_writer_tag()}.", suffix=".probe",
                                         dir=temporary.parent)
        os.close(handle)
        with open_for_writing(probe) as stream:
            stream.write(bytes(_PROBE_BYTES))
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        return DscovidError(f"{target}: cannot write ({describe_os_error(error)}; the file written was incomplete: "
                            f"{detail})")
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    return DscovidError(f"{target}: cannot write (the file written is incomplete or corrupt: {detail})")


def write_bytes_atomic(data: bytes, path: str | os.PathLike, sync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically, checked and flushed to disk before the rename.

    ``sync`` is kept for callers of the earlier signature; every write is flushed now.
    """
    with atomic_path(path) as temporary:
        with open_for_writing(temporary) as stream:
            stream.write(data)
        check_size(temporary, len(data), path)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(text.encode("utf-8"), path)


@contextmanager
def staged_folder(folder: str | os.PathLike, name: str) -> Iterator[Path]:
    """A hidden folder in ``folder`` whose contents move into ``folder`` together when the block succeeds.

    For the several files of one case: each is written (atomically) into the staging folder, and only when all
    of them are written and checked are they renamed to their final names, one after the other, and the staging
    folder removed. If the block fails, the staging folder is removed and no file under a final name was touched:
    an earlier result of the same case stays whole. A kill leaves the staging folder, named
    ``.<name>.staging.<pid>@<host>.<random>``, which :func:`remove_stale_temporaries` removes later.
    """
    folder = make_folder(folder)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.staging.{_writer_tag()}.", dir=folder))
    except OSError as error:
        raise write_error(folder / name, error) from None
    try:
        yield stage
        for produced in sorted(stage.iterdir()):
            target = folder / produced.name
            if produced.is_dir() and target.is_dir():  # a folder output (a DICOM series) replaces the old one
                old = Path(tempfile.mkdtemp(prefix=f".{produced.name}.old.{_writer_tag()}.", dir=folder))
                os.replace(target, old / produced.name)
                os.replace(produced, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(produced, target)
        _sync_folder(folder)
    except OSError as error:
        raise write_error(folder / name, error) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
