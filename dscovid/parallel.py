"""Running one function over many cases, in worker processes when asked, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


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
        return [function(item) for item in tqdm(items, **bar)]
    with ProcessPoolExecutor(max_workers=min(num_processes, len(items))) as pool:
        return list(tqdm(pool.map(function, items), **bar))
