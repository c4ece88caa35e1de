"""Input checks that fail early with a message naming the problem."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def check_sequences(
    x: Tensor | np.ndarray, name: str = "x", *, n_steps: int | None = None, rank: int = 2
) -> None:
    """Check a batch of sequences: the right rank, length, non-empty and all values finite.

    Args:
        x: array of shape ``(N, ..., T)`` with ``rank`` dimensions.
        name: how the data is called in error messages.
        n_steps: expected length of the last (time) axis, if known.
        rank: expected number of dimensions.
    """
    shape = tuple(x.shape)
    if len(shape) != rank:
        raise ValueError(f"{name} must have {rank} dimensions (sequence, ..., time), got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} holds no sequences (shape {shape})")
    if n_steps is not None and shape[-1] != n_steps:
        raise ValueError(f"{name} has {shape[-1]} time steps per sequence, the model expects {n_steps}")
    finite = torch.isfinite(x).all() if isinstance(x, Tensor) else np.isfinite(x).all()
    if not bool(finite):
        bad = (~torch.isfinite(x)) if isinstance(x, Tensor) else ~np.isfinite(x)
        rows = np.unique(np.nonzero(np.asarray(bad))[0])[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first bad sequences: {rows})")


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
