"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain JSON-like values only.

A checkpoint holds ``network_weights`` (state dict), ``optimizer_state``, ``grad_scaler_state`` (or None),
``epoch`` (the next global epoch to run), ``stage`` (its index), ``trainer``, ``configuration_name``,
``configuration`` (the effective configuration dictionary, after the trainer's overrides), ``plans`` (the whole
plans dictionary), ``history`` (per-epoch metrics, lists of floats), ``best_ema`` and ``dscovid_version``.
Files are written to a temporary name and renamed, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from dscovid.errors import DscovidError
from dscovid.io.atomic import write_bytes_atomic

LATEST, BEST, FINAL = "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"


def stage_checkpoint(stage_number: int) -> str:
    """The checkpoint written when stage ``stage_number`` (1-based) ends and another follows (ablations: the
    network after pre-training, before the joint stage)."""
    return f"checkpoint_stage{stage_number}.pt"


def save_checkpoint(state: dict, path: Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(buffer.getvalue(), path, sync=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint without running any code from it (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise DscovidError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file; torch raises several types
        raise DscovidError(f"{path}: not a readable dscovid checkpoint ({type(error).__name__}: {error})") from None


def to_cpu(state: object) -> object:
    """A copy of a (nested) state dict with every tensor moved to the CPU, for device-independent checkpoints."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(value) for value in state)
    return state
