"""The three data roots, resolved once from command-line flags or environment variables.

No module reads the environment at import time: commands build a :class:`Roots` from their parsed
arguments (``Roots.resolve``) and pass it down explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dscovid.errors import DscovidError

_ROOTS = {
    "raw": ("--raw", "DSCOVID_raw"),
    "preprocessed": ("--preprocessed", "DSCOVID_preprocessed"),
    "results": ("--results", "DSCOVID_results"),
}


@dataclass(frozen=True)
class Roots:
    """Where raw datasets, the preprocessed cache and trained models live (any may be unset)."""

    raw: Path | None = None
    preprocessed: Path | None = None
    results: Path | None = None

    @classmethod
    def resolve(
        cls,
        raw: str | os.PathLike | None = None,
        preprocessed: str | os.PathLike | None = None,
        results: str | os.PathLike | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Roots:
        """Take each root from its explicit value, else from its environment variable, else leave it unset."""
        env = os.environ if environ is None else environ
        given = {"raw": raw, "preprocessed": preprocessed, "results": results}
        values = {}
        for key, (_, var) in _ROOTS.items():
            value = given[key] if given[key] is not None else env.get(var) or None
            values[key] = Path(value).expanduser() if value is not None else None
        return cls(**values)

    def require(self, which: str) -> Path:
        """The root named ``which`` ("raw", "preprocessed" or "results"), or a clear error if it is unset."""
        value = getattr(self, which)
        if value is None:
            flag, var = _ROOTS[which]
            raise DscovidError(f"the {which} data folder is not set: pass {flag} DIR or set the environment variable {var}")
        return value
