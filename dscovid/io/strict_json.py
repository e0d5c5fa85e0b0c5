"""Values made fit for strict JSON, which has no NaN, no infinity and no numpy types."""

from __future__ import annotations

import math

import numpy as np


def json_safe(value: object) -> object:
    """``value`` with NaN and infinities replaced by None (``null``: not defined), numpy scalars by Python ones,
    tuples by lists and dictionary keys by strings, at any depth."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
