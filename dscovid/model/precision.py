"""The reduced precision the network runs in, per device (docs/training.md, docs/prediction.md).

Training and prediction run the network under ``torch.autocast`` where the hardware computes faster in a 16-bit
format: float16 on CUDA (with a gradient scaler in training), bfloat16 on a CPU that multiplies bfloat16 natively
(Intel AMX or AVX-512 BF16: oneDNN's convolutions run several times faster there), float32 elsewhere, where
bfloat16 would be emulated and slower. The weights, the optimiser state and every loss term stay float32; the
geometry (``grid_sample``) and the findings head's measurements opt out of autocast themselves.

``DSCOVID_PRECISION=float32`` in the environment turns autocast off on every device (to reproduce a float32 run, or
to compare); ``auto``, the default, is the rule above.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

PRECISION_ENV = "DSCOVID_PRECISION"
CHOICES = ("auto", "float32")


def precision_choice() -> str:
    """``DSCOVID_PRECISION`` (``auto`` when unset); anything else is refused in one line."""
    choice = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{PRECISION_ENV}={os.environ[PRECISION_ENV]!r}: must be one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the network on ``device``, or None for float32."""
    device = torch.device(device)
    if precision_choice() == "float32":
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """``float32`` for None (no autocast), else the dtype's name: ``bfloat16``, ``float16``."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def precision_name(device: torch.device | str) -> str:
    """What the network computes in on ``device`` (for the records)."""
    return dtype_name(autocast_dtype(device))


def autocast(device: torch.device | str):
    """``torch.autocast`` in :func:`autocast_dtype`'s precision, or a no-op context for float32."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
