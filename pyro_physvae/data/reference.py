"""Readers of the reference implementation's files (Takeishi & Kalousis's generators and
preprocessing: whitespace tables written by ``numpy.savetxt`` or MATLAB's ``writetable``,
``.npy`` arrays, ``args_<split>.json`` option files), shared by the systems' importers.

Every problem becomes a one-line ValueError or FileNotFoundError that names the file and what it
should hold.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np

from pyro_physvae.data.io import SPLITS


def check_float32_range(x: np.ndarray, where: str | os.PathLike) -> np.ndarray:
    """``x`` if its values fit in float32 (as data sets store observations), else a
    ValueError naming ``where``: a larger finite value would turn into inf."""
    limit = float(np.finfo(np.float32).max)
    if x.size and np.isfinite(x).all() and float(np.abs(x).max()) > limit:
        raise ValueError(f"{where}: values up to {float(np.abs(x).max()):.4g} in magnitude exceed "
                         f"the float32 range ({limit:.4g}) in which observations are stored")
    return x


def check_split(split: str, directory: str | os.PathLike) -> str:
    """``split`` if it is one of ``train``, ``valid``, ``test``, else a ValueError."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {directory}: choose one of {', '.join(SPLITS)}")
    return split


def read_bytes(path: Path, expected: str) -> bytes:
    """The content of ``path``; a missing file is a FileNotFoundError and any other failure a
    ValueError, both naming ``path`` and what it should hold (``expected``)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: expected {expected}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: expected {expected} ({type(e).__name__}: {e})") from e


def _floats(tokens: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        return None


def _count(n: int) -> str:
    return f"{n} value{'' if n == 1 else 's'}"


def _is_number(token: str) -> bool:
    return _floats([token]) is not None


def read_text_table(path: Path, expected: str, *, column_names: Collection[str] = ()
                    ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """A table of numbers as written by ``np.savetxt`` or MATLAB's ``writetable`` /
    ``dlmwrite``: one row per line, values separated by spaces or tabs (scientific notation
    fine), blank lines and ``#`` comments skipped.

    The column names, if any, come from the last comment line before the first row (``# a b``
    or ``#a b``, as ``np.savetxt(header=...)`` writes them) or from a leading line of words
    without ``#`` (MATLAB's ``writetable`` header) in which at least one word is one of
    ``column_names`` (case-insensitive).

    Returns:
        ``(table, names)``: a float64 array ``(rows, columns)`` and the column names (``None``
        where the file has none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path`` and what it should hold (``expected``): the file is empty,
            not text, holds a word that is not a number, rows of different lengths, NaN or inf.
    """
    raw = read_bytes(path, expected)
    if not raw:
        raise ValueError(f"{path} is empty (0 bytes): expected {expected}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file (byte {e.start} is not UTF-8): "
                         f"expected {expected}") from None
    if "\x00" in text:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes): expected {expected}")
    known = {c.lower() for c in column_names}
    names: tuple[str, ...] | None = None
    rows: list[list[float]] = []
    first_row = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        content, hash_mark, comment = line.partition("#")
        tokens = content.split()
        if not tokens:
            if hash_mark and not rows and comment.split():
                names = tuple(comment.split())
            continue
        values = _floats(tokens)
        if values is None:
            if (not rows and any(t.lower() in known for t in tokens)
                    and not any(_is_number(t) for t in tokens)):
                names = tuple(tokens)  # a header line without "#" (MATLAB writetable)
                continue
            bad = next(t for t in tokens if not _is_number(t))
            raise ValueError(f"{path}: not a whitespace-separated table of numbers: line {lineno} "
                             f"holds {bad!r}; expected {expected}")
        if rows and len(values) != len(rows[0]):
            raise ValueError(f"{path}: not a whitespace-separated table of numbers: line {lineno} "
                             f"has {_count(len(values))}, line {first_row} has {_count(len(rows[0]))} "
                             f"(rows of different length)")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{path}: line {lineno} contains NaN or infinite values; expected "
                             f"{expected}, all finite")
        if not rows:
            first_row = lineno
        rows.append(values)
    if not rows:
        what = "only a header or comments" if names or "#" in text else "only blank space"
        raise ValueError(f"{path} holds no numbers ({what}): expected {expected}")
    return np.asarray(rows, dtype=np.float64), names


def select_columns(table: np.ndarray, names: tuple[str, ...] | None, path: Path,
                   columns: dict[str, str], n_rows: int, rows_are: str
                   ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The columns of a table read by :func:`read_text_table`, by name.

    Args:
        table: ``(rows, columns)`` values.
        names: the file's column names, or ``None``: then the columns are taken to be
            ``columns``' keys, in that order.
        path: the file (for messages).
        columns: the reference writer's column names, in its order, mapped to ours; a header
            may use either (case-insensitive), in any order, with further columns.
        n_rows: the number of rows the table must have (one per sequence of the data).
        rows_are: what one row describes, for messages (e.g. "sequence of data_train.txt").

    Returns:
        ``({our name: (n_rows,) values}, names of the further columns, which are ignored)``.
    """
    reference = tuple(columns)
    labels = names if names is not None else reference
    if table.shape != (n_rows, len(labels)):
        raise ValueError(f"{path}: expected {n_rows} rows of {len(labels)} values (one per "
                         f"{rows_are}; columns {' '.join(labels)}), got {table.shape[0]} "
                         f"row{'s' if table.shape[0] != 1 else ''} of {table.shape[1]}")
    lookup = {k.lower(): v for k, v in columns.items()}
    lookup.update({v.lower(): v for v in columns.values()})
    found: dict[str, int] = {}
    ignored = []
    for j, label in enumerate(labels):
        ours = lookup.get(label.lower())
        if ours is None:
            ignored.append(label)
        elif ours in found:
            raise ValueError(f"{path}: the header {' '.join(labels)!r} names the column of {ours!r} "
                             f"twice")
        else:
            found[ours] = j
    missing = [ref for ref, ours in columns.items() if ours not in found]
    if missing:
        raise ValueError(f"{path}: header must be {' '.join(reference)!r}, got {' '.join(labels)!r} "
                         f"(no column for {' '.join(missing)})")
    return {ours: table[:, found[ours]] for ours in columns.values()}, tuple(ignored)


def read_npy_array(path: Path, expected: str) -> np.ndarray:
    """A real-valued array from a ``.npy`` file, read without unpickling.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path`` and what it should hold (``expected``): the file is empty,
            not a ``.npy`` file (a ``.npz`` archive, text, ...), truncated, or holds Python
            objects, complex numbers, strings or records.
    """
    raw_head = read_bytes_head(path, expected)
    if not raw_head:
        raise ValueError(f"cannot read {path}: the file is empty (0 bytes); expected a .npy "
                         f"array of {expected}")
    if raw_head.startswith(b"PK"):
        raise ValueError(f"cannot read {path}: a zip (.npz) archive, not a .npy array; expected "
                         f"{expected}")
    if not raw_head.startswith(b"\x93NUMPY"):
        raise ValueError(f"cannot read {path}: not a .npy file (it lacks the NumPy magic "
                         f"string); expected {expected}")
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            available = os.fstat(f.fileno()).st_size - f.tell()
    except Exception as e:  # numpy raises ValueError, EOFError, SyntaxError, ... for bad headers
        raise ValueError(f"cannot read {path}: expected a .npy file holding {expected} "
                         f"({type(e).__name__}: {e})") from e
    if dtype.hasobject:
        raise ValueError(f"cannot read {path}: it holds Python objects (dtype {dtype}), which "
                         f"are never unpickled; expected {expected} as numbers")
    if dtype.kind not in "biuf":
        kind = "complex numbers" if dtype.kind == "c" else f"values of dtype {dtype}"
        raise ValueError(f"cannot read {path}: it holds {kind}; expected {expected} as real "
                         f"numbers")
    needed = math.prod(shape) * dtype.itemsize
    if available < needed:
        raise ValueError(f"cannot read {path}: truncated: its header announces an array of shape "
                         f"{shape} ({dtype}, {needed} bytes of data), the file holds {available} "
                         f"bytes")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # any failure of the library means a bad file here
        raise ValueError(f"cannot read {path}: expected a .npy file holding {expected} "
                         f"({type(e).__name__}: {e})") from e
    return np.asarray(x)


def read_bytes_head(path: Path, expected: str, n: int = 8) -> bytes:
    """The first ``n`` bytes of ``path`` (errors as :func:`read_bytes`)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: expected {expected}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: expected {expected} ({type(e).__name__}: {e})") from e


def read_args_json(path: Path) -> dict[str, object]:
    """The options a reference generator saved in ``args_<split>.json`` (a JSON object).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid JSON or not a JSON object.
    """
    expected = "the reference generator's options as a JSON object (e.g. {\"dt\": 0.05, ...})"
    raw = read_bytes(path, expected)
    try:
        args = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "empty file" if not raw.strip() else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: not valid JSON ({reason}); expected {expected}") from None
    if not isinstance(args, dict):
        raise ValueError(f"{path}: expected {expected}, got a JSON {type(args).__name__}")
    return args


def positive_number(value: object, name: str, where: str | os.PathLike) -> float:
    """``value`` as a float if it is a finite number > 0, else a ValueError naming ``where``."""
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
    if not ok:
        raise ValueError(f"{where}: {name!r} must be a positive number, got {value!r}")
    return float(value)


def check_count(args: dict[str, object], key: str, actual: int, path: Path, what: str) -> None:
    """If ``args`` records ``key``, it must be the integer ``actual`` (``what`` says where the
    data have that many)."""
    if key not in args:
        return
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    if value != actual:
        raise ValueError(f"{path}: {key!r} is {value}, but {what} {actual}: the files do not "
                         f"belong together")


def read_true_params(directory: Path, split: str, n_rows: int, data_file: Path, args_file: Path,
                     header: tuple[str, ...], names: tuple[str, ...], require: bool | None
                     ) -> tuple[dict[str, np.ndarray] | None, dict[str, str]]:
    r"""The reference generator's ``true_params_<split>.txt``: one row per sequence of
    ``data_file`` (``n_rows``), columns named ``header`` in the generator's order (a header
    line may use those names or our ``names``; further columns are ignored and listed in the
    returned attributes). Without the file: ``None``, or a FileNotFoundError where it is
    ``require``\ d (default: where ``args_file`` exists, as the generator writes both)."""
    attrs = {"source": str(directory)}
    param_file = directory / f"true_params_{split}.txt"
    if not param_file.is_file():
        if require or (require is None and args_file.is_file()):
            raise FileNotFoundError(
                f"true parameter file not found: {param_file} (the reference generator writes it "
                f"with {args_file.name}; pass require_params=False to read the data without it)")
        return None, attrs
    table, found = read_text_table(param_file, "the true parameters, one row per sequence "
                                   f"(columns {' '.join(header)})", column_names=(*header, *names))
    params, ignored = select_columns(table, found, param_file, dict(zip(header, names, strict=True)),
                                     n_rows, f"sequence of {data_file.name}")
    if ignored:
        attrs["ignored_columns"] = " ".join(ignored)
    return params, attrs
