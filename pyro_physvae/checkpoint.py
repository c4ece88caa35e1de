"""Checkpoint files: atomic, verified by a digest, read back without executing code.

A checkpoint is the ``torch.save`` serialisation of a run's state (format 2) behind a
one-line header that holds the SHA-256 digest of that serialisation::

    PYRO-PHYSVAE-CHECKPOINT 2 <64 hex digits>\\n<payload>

:func:`load_checkpoint` refuses a file whose payload does not match its digest, so a
damaged checkpoint (a flipped byte, a truncated copy) is found on load instead of giving
wrong results. Payloads are read with ``weights_only=True``: a checkpoint cannot run code.
Files of format 1 (before digests: a bare ``torch.save`` zip archive) are still read, with
a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_physvae.files import atomic_write_bytes

FORMAT_VERSION = 2
MAGIC = b"PYRO-PHYSVAE-CHECKPOINT"
_HEADER_LEN = len(MAGIC) + 3 + 64 + 1  # magic, " 2 ", digest, newline
_ZIP = b"PK\x03\x04"

#: What every run checkpoint holds; :func:`load_checkpoint` refuses one without them.
RUN_KEYS = ("system", "setting", "model_kwargs", "guide_kwargs", "train_config", "epoch",
            "model_state", "guide_state")


class CheckpointError(ValueError):
    """A checkpoint file is damaged, incomplete or not a pyro-physvae checkpoint."""


def encode_checkpoint(state: Mapping[str, Any]) -> bytes:
    """The bytes of a checkpoint of ``state``: header with digest, then the payload.

    A ``history`` of per-epoch records with the same numeric fields is stored as one table
    (a tensor), which serialises in a fraction of the time of thousands of dictionaries;
    :func:`load_checkpoint` gives it back as records."""
    state = dict(state)
    if "history" in state:
        state["history"] = _history_table(state["history"])
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return MAGIC + b" %d " % FORMAT_VERSION + digest + b"\n" + payload


def _history_table(history: Any) -> Any:
    """``[{field: number}, ...]`` as ``{"fields", "integer_fields", "values" (N, F)}``; any
    other history is kept as it is."""
    if not isinstance(history, list) or not history or not all(isinstance(r, dict) for r in history):
        return history
    names = list(history[0])
    if any(r.keys() != history[0].keys() for r in history):
        return history
    try:
        flat = np.fromiter((r[k] for r in history for k in names), dtype=np.float64,
                           count=len(history) * len(names))
    except (TypeError, ValueError):
        return history
    integers = [k for k, v in history[0].items() if isinstance(v, int) and not isinstance(v, bool)]
    return {"fields": names, "integer_fields": integers,
            "values": torch.from_numpy(flat.reshape(len(history), len(names)))}


def _history_records(history: Any) -> Any:
    """The inverse of :func:`_history_table`."""
    if not (isinstance(history, dict) and set(history) == {"fields", "integer_fields", "values"}):
        return history
    names, integers = history["fields"], set(history["integer_fields"])
    return [{k: int(v) if k in integers else v for k, v in zip(names, row, strict=True)}
            for row in history["values"].tolist()]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint of ``state`` to ``path`` atomically: readers see the old file or
    the new one, never a partial write."""
    return write_checkpoint_bytes(encode_checkpoint(state), path)


def write_checkpoint_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write the output of :func:`encode_checkpoint` to ``path`` atomically (to write one
    state under several names without serialising it again)."""
    return atomic_write_bytes(path, data)


def _payload(path: Path, data: bytes) -> bytes:
    """The verified payload of a checkpoint file's ``data``."""
    if data.startswith(_ZIP):  # format 1: no digest to check
        warnings.warn(f"{path} was written before checkpoints carried a digest (format 1); "
                      "it is read without verification", UserWarning, stacklevel=3)
        return data
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a pyro-physvae checkpoint (unknown header)")
    header, payload = data[:_HEADER_LEN], data[_HEADER_LEN:]
    try:
        _, version, digest = header.decode("ascii").split()
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is damaged: its header is unreadable") from None
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} is a checkpoint of format {version}; this version reads "
                              f"format {FORMAT_VERSION}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is damaged: its contents do not match the digest "
                              f"stored in it (a changed or truncated file, {len(data)} bytes)")
    return payload


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    required: Iterable[str] = RUN_KEYS) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Checks the digest, that the state holds the keys ``required`` (default: those of a
    training run) and that every floating-point tensor in its model and guide states is
    finite.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) the file is damaged, incomplete, holds
            non-finite weights, or is not a checkpoint of a known format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    payload = _payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not its format
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or not a "
                              f"pyro-physvae checkpoint ({_reason(e)})") from e
    if not isinstance(state, dict) or state.get("format_version") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{path} is not a pyro-physvae checkpoint of format {FORMAT_VERSION}")
    if "history" in state:
        state["history"] = _history_records(state["history"])
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    for key in ("model_state", "guide_state"):
        check_finite_state(state.get(key) or {}, f"{path} {key}")
    return state


def _reason(error: Exception) -> str:
    """One line from torch's (often long, multi-line) loading error."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch refused to build an object that is not a tensor or a plain type
        detail = text.split(marker, 1)[1].strip().split(". ")[0]
        return f"it holds objects other than weights, which are never built: {detail}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def check_finite_state(state: Mapping[str, Any], what: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state`` (a module's
    ``state_dict``) that is not a tensor or holds NaN or infinite values."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} is not a state dictionary (got {type(state).__name__})")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}[{name!r}] is not a tensor (got {type(value).__name__})")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what}[{name!r}] holds NaN or infinite values")


def load_module_state(module: torch.nn.Module, state: Mapping[str, Any], what: str) -> None:
    """``module.load_state_dict(state)``, with a :class:`CheckpointError` in one line naming
    the first tensor that is missing, unexpected or of another shape than the module's."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = details[0] if details else str(e).splitlines()[0]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise CheckpointError(f"{what} does not fit {type(module).__name__}: {first}{more}") from None
