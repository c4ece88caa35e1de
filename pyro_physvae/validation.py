"""Input checks that fail early with a message naming the problem."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor


def check_sequences(
    x: Tensor | np.ndarray, name: str = "x", *, n_steps: int | None = None, rank: int = 2
) -> None:
    """Check a batch of sequences: real numbers (not bool, complex, strings or objects), the
    right rank, length, non-empty and all values finite.

    Args:
        x: array of shape ``(N, ..., T)`` with ``rank`` dimensions.
        name: how the data is called in error messages.
        n_steps: expected length of the last (time) axis, if known.
        rank: expected number of dimensions.
    """
    check_real_dtype(x.dtype, name)
    shape = tuple(x.shape)
    if len(shape) != rank:
        raise ValueError(f"{name} must have {rank} dimensions (sequence, ..., time), got shape {shape}")
    if shape[0] < 1:
        raise ValueError(f"{name} holds no sequences (shape {shape})")
    if rank > 1 and shape[-1] < 1:
        raise ValueError(f"{name} has no time steps (shape {shape})")
    if 0 in shape:
        raise ValueError(f"{name} is empty along dimension {shape.index(0)} (shape {shape})")
    if n_steps is not None and shape[-1] != n_steps:
        raise ValueError(f"{name} has {shape[-1]} time steps per sequence, the model expects {n_steps}")
    finite = torch.isfinite(x).all() if isinstance(x, Tensor) else np.isfinite(x).all()
    if not bool(finite):
        bad = (~torch.isfinite(x)) if isinstance(x, Tensor) else ~np.isfinite(x)
        bad = bad.cpu().numpy() if isinstance(bad, Tensor) else bad
        rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
        raise ValueError(f"{name} contains NaN or infinite values (first bad sequences: {rows})")


def check_real_dtype(dtype: np.dtype | torch.dtype, name: str = "x") -> None:
    """Raise a ``ValueError`` unless ``dtype`` (a NumPy or torch dtype) holds real numbers:
    integers or floating point, not bool, complex, strings or objects."""
    if isinstance(dtype, torch.dtype):
        real = dtype is not torch.bool and not dtype.is_complex
    else:
        real = np.dtype(dtype).kind in "iuf"
    if not real:
        shown = str(dtype).removeprefix("torch.")
        raise ValueError(f"{name} has dtype {shown}, expected real numbers")


def check_positive_number(value: object, name: str) -> float:
    """Return ``value`` as a float if it is one finite positive real number (a Python or
    NumPy scalar, or an array of one element), else raise a ``ValueError`` naming ``name``."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    number = float(arr.reshape(()))
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite positive number, got {number}")
    return number


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer (an int, or a float with an
    integer value), else raise ``ValueError`` naming ``name``."""
    whole = (isinstance(value, numbers.Integral) or
             (isinstance(value, float) and value.is_integer()))
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
