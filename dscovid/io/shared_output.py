"""An output folder that several runs may write at once, and that must never be one of the inputs.

A prediction folder is shared: K cluster jobs (``--num-parts``) or two users' runs write into it at the same time,
a rerun adds to it, a killed run leaves it half done. So no run keeps the folder's summary in memory. Each case
has one small record file, written atomically when the case ends:

::

    <output>/records/<case>.result.json     the case's entry of predictions.json (its latest success)
    <output>/records/<case>.failure.json    why its latest attempt failed (removed by a later success)
    <output>/records/identity.json          the model and settings whose predictions the folder holds
    <output>/records/.lock                  taken (flock) while the identity is claimed or the summary rebuilt

and the summary (``predictions.json``, ``predictions.csv``) is rebuilt from all records under the lock, at the end of
every run: whichever run ends last writes a summary that lists every case once.

:func:`check_output_folder` refuses, before anything is written, an output folder that equals, lies inside or
contains an input (the inputs would be overwritten by, or read back as, outputs), and one that cannot be written
(a file, a folder under a file, ``/proc``, a read-only file system), each in one line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dscovid.errors import DscovidError
from dscovid.io.atomic import describe_os_error, make_folder, write_text_atomic
from dscovid.io.dataset import case_file

log = logging.getLogger(__name__)

RECORDS_FOLDER = "records"
IDENTITY_FILE = "identity.json"
_RESULT, _FAILURE = ".result.json", ".failure.json"


# ------------------------------------------------------------------------------------- the folder and the inputs


def check_output_folder(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path:
    """Create ``output_dir`` if needed and make sure it may be written; refuse it where it would touch an input.

    Refused, in one line each: an output folder that is an input folder, lies inside one (a second run would
    take the outputs for new scans), or contains an input (a scan's output would be written over it, or over its
    neighbours); one that is an existing file or lies under a file; one where nothing can be written (``/proc``,
    ``/sys``, a read-only file system, no permission). Nothing is written when it is refused.

    Returns
    -------
    The output folder.
    """
    output = Path(output_dir)
    resolved = output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if not source.exists():
            continue  # reported by whoever reads the inputs
        if source.is_dir() and resolved == source:
            raise DscovidError(f"{output}: the output folder is the input folder {given}; choose another output "
                               f"folder (the outputs would be written among, and over, the scans)")
        if source.is_dir() and resolved.is_relative_to(source):
            raise DscovidError(f"{output}: the output folder lies inside the input folder {given}; choose a folder "
                               f"outside it (a later run would read the outputs as scans)")
        if source.is_relative_to(resolved):
            raise DscovidError(f"{output}: the output folder contains the input {given}; choose another output "
                               f"folder (outputs are named like scans and could replace them)")
    if output.exists() and not output.is_dir():
        raise DscovidError(f"{output}: exists and is a file, not a folder; choose an output folder")
    make_folder(output)
    try:
        handle, probe = tempfile.mkstemp(prefix=".dscovid_write_check.", dir=output)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise DscovidError(f"{output}: the output folder cannot be written ({describe_os_error(error)})") from None
    return output


# ------------------------------------------------------------------------------------------------ the lock


@contextmanager
def folder_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the output folder's lock (an exclusive ``flock`` on ``records/.lock``; waits for another holder).

    Held only for moments: while a run claims the folder for its model and while a summary is rebuilt. Where
    ``flock`` does not exist (Windows) or the file system refuses it, runs are not serialised (with a warning), and
    the last summary written wins; the records are never lost.
    """
    records = make_folder(Path(output_dir) / RECORDS_FOLDER)
    if sys.platform == "win32":  # pragma: no cover - no flock
        yield
        return
    import fcntl

    try:
        handle = open(records / ".lock", "a+b")  # noqa: SIM115 - closed below
    except OSError as error:
        raise DscovidError(f"{records / '.lock'}: cannot open the lock file ({describe_os_error(error)})") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:  # a file system without flock (Lustre mounted without it, some NFS set-ups)
            log.warning("%s: cannot lock (%s); going on without the lock", records / ".lock",
                        describe_os_error(error))
        yield
    finally:
        handle.close()  # releases the lock


# --------------------------------------------------------------------------------------------- the records


def records_folder(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / RECORDS_FOLDER


def read_identity(output_dir: str | os.PathLike) -> dict | None:
    """The identity recorded for the folder, or None (a new folder); an unreadable one is an empty dict."""
    path = records_folder(output_dir) / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_identity(output_dir: str | os.PathLike, identity: dict) -> None:
    write_text_atomic(json.dumps(identity, indent=2) + "\n", records_folder(output_dir) / IDENTITY_FILE)


def write_result(output_dir: str | os.PathLike, entry: dict) -> None:
    """Record a case's success (its predictions.json entry) and forget an earlier failure of it."""
    name = entry["case"]
    folder = records_folder(output_dir)
    write_text_atomic(json.dumps(entry, indent=1, allow_nan=False) + "\n", case_file(folder, name, _RESULT))
    case_file(folder, name, _FAILURE).unlink(missing_ok=True)


def write_failure(output_dir: str | os.PathLike, failure: dict) -> None:
    """Record why a case failed; an earlier result of the case stays (its files were not touched)."""
    write_text_atomic(json.dumps(failure, indent=1) + "\n",
                      case_file(records_folder(output_dir), failure["case"], _FAILURE))


def has_result(output_dir: str | os.PathLike, name: str) -> bool:
    return case_file(records_folder(output_dir), name, _RESULT).exists()


def read_records(output_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Every case's result and every failure recorded in the folder, each sorted by case name.

    A record that cannot be read (a disk that failed under a record is impossible: they are written atomically;
    but a user may edit one) is skipped with a warning naming it.
    """
    folder = records_folder(output_dir)
    results, failures = [], []
    if not folder.is_dir():
        return results, failures
    for path in sorted(folder.iterdir()):
        kind = results if path.name.endswith(_RESULT) else failures if path.name.endswith(_FAILURE) else None
        if kind is None or path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("case"), str):
                raise ValueError("not a case record")
        except (OSError, ValueError) as error:
            log.warning("%s: record skipped (%s)", path, error)
            continue
        kind.append(record)
    return sorted(results, key=lambda r: r["case"]), sorted(failures, key=lambda r: r["case"])


def remove_records(output_dir: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Forget the records of ``names`` (default: every case record and the identity)."""
    folder = records_folder(output_dir)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.endswith((_RESULT, _FAILURE)) or (names is None and path.name == IDENTITY_FILE):
            if names is None or any(path.name in (f"{n}{_RESULT}", f"{n}{_FAILURE}") for n in names):
                path.unlink(missing_ok=True)
