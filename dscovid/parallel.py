"""Running one function over many cases, in worker processes when asked, with a progress bar.

Worker processes end with their parent: each asks Linux for a signal when the process that started it dies
(:func:`exit_with_parent`), so a ``kill -9`` of a command leaves no worker behind that would go on writing into
an output folder a re-run is already using.

Progress bars go to stderr. On a terminal they redraw in place; anywhere else (a pipe, a cluster job's log file)
they print a whole line at most every :data:`LOG_INTERVAL_S` seconds, so that every logged line, a case's failure
for example, starts on a line of its own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 30.0

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies; exit now if the parent is already gone.

    Called first thing in every worker process, with the pid of the process that started it (``parent_pid``,
    recorded by the parent: a worker whose parent died before this call has been handed to another process and
    cannot tell otherwise). The signal comes when the thread that started the worker ends, which for dscovid's
    pools is the thread that runs the whole pool (the pools never outlive the call that made them). Elsewhere
    than on Linux nothing is asked.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def init_worker(parent_pid: int | None = None) -> None:
    """Initializer of dscovid's worker processes: end with the parent, one thread each (a process per core)."""
    exit_with_parent(parent_pid)
    import torch

    torch.set_num_threads(1)


def process_pool(num_processes: int) -> ProcessPoolExecutor:
    """A pool of ``num_processes`` fresh (spawned) workers that end with their parent."""
    return ProcessPoolExecutor(max_workers=num_processes, mp_context=get_context("spawn"), initializer=init_worker,
                               initargs=(os.getpid(),))


class _LineStream:
    """What a progress bar writes, turned into whole lines (for a stderr that is not a terminal)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **options) -> tqdm:
    """A ``tqdm`` bar on stderr (``options`` as tqdm's); whole lines every :data:`LOG_INTERVAL_S` s off a terminal."""
    stream = options.pop("file", None) or sys.stderr
    if not options.get("disable") and not getattr(stream, "isatty", lambda: False)():
        options.update(file=_LineStream(stream), mininterval=LOG_INTERVAL_S, ascii=True, dynamic_ncols=False,
                       ncols=100)
    else:
        options["file"] = stream
    return tqdm(iterable, **options)


def map_cases(
    function: Callable[[Item], Result], items: Sequence[Item], num_processes: int = 1, desc: str = "cases",
    progress: bool = True,
) -> list[Result]:
    """``[function(item) for item in items]``, in order, in up to ``num_processes`` processes, with a progress bar.

    ``function`` must be picklable (a module-level function) when ``num_processes > 1``. The bar is hidden for a
    single item or with ``progress=False``.
    """
    bar = dict(total=len(items), desc=desc, unit="case", disable=not progress or len(items) < 2)
    if num_processes <= 1 or len(items) < 2:
        return [function(item) for item in progress_bar(items, **bar)]
    with ProcessPoolExecutor(max_workers=min(num_processes, len(items)), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        return list(progress_bar(pool.map(function, items), **bar))
