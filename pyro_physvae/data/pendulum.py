"""Forced damped pendulum data: the paper's generator and the reference text format.

Truth: ``theta'' = -omega^2 sin(theta) - xi theta' + A omega^2 cos(2 pi f t)`` from
``theta(0) ~ U[-1.57, 1.57]``, ``theta'(0) = 0``, observed every ``dt`` for ``n_steps`` steps
with Gaussian noise. Parameter ranges follow the reference work (see DESIGN.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torchdiffeq import odeint

from pyro_physvae.data.io import SPLITS, check_data_config, generate_splits, uniform_draws
from pyro_physvae.validation import check_sequences

SYSTEM = "pendulum"
#: Data-set variable names of the true parameters, in the reference text header's order.
PARAMS = ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")
TEXT_HEADER = ("init", "omega", "gamma", "A", "f")
UNITS = {"init": "rad", "omega": "rad/s", "damping": "1/s", "forcing_amplitude": "1",
         "forcing_frequency": "Hz", "x": "rad", "time": "s"}


@dataclass(frozen=True)
class PendulumDataConfig:
    """Sizes, grid and parameter ranges of the generated data (defaults: the paper's)."""

    n_train: int = 1000
    n_valid: int = 500
    n_test: int = 1000
    n_steps: int = 50
    dt: float = 0.05
    noise_std: float = 0.01
    init: tuple[float, float] = (-1.57, 1.57)
    omega: tuple[float, float] = (0.785, 3.14)
    damping: tuple[float, float] = (0.0, 0.8)
    forcing_amplitude: tuple[float, float] = (0.0, 40.0)
    forcing_frequency: tuple[float, float] = (3.14, 6.28)

    def __post_init__(self) -> None:
        check_data_config(self, positive=("dt",), ranges=PARAMS)


def forced_damped_pendulum(
    init: torch.Tensor,
    omega: torch.Tensor,
    damping: torch.Tensor,
    amplitude: torch.Tensor,
    frequency: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Accurate angle trajectories ``(N, T)`` of the true pendulum (dopri5, float64).

    All parameters have shape ``(N,)``; ``t`` has shape ``(T,)``. Initial velocity is zero.
    """
    p = [v.to(torch.float64) for v in (omega, damping, amplitude, frequency)]
    om, xi, amp, fr = p

    def rhs(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        th, dth = y[..., 0], y[..., 1]
        forcing = amp * om**2 * torch.cos(2 * torch.pi * fr * tt)
        return torch.stack((dth, -(om**2) * torch.sin(th) - xi * dth + forcing), -1)

    y0 = torch.stack((init.to(torch.float64), torch.zeros_like(om)), -1)
    ys = odeint(rhs, y0, t.to(torch.float64), method="dopri5", rtol=1e-9, atol=1e-10)
    return ys[..., 0].T.contiguous()


def generate_split(n: int, config: PendulumDataConfig, generator: torch.Generator,
                   split: str = "train") -> xr.Dataset:
    """One split of ``n`` noisy sequences with their true parameters."""
    params = {name: uniform_draws(getattr(config, name), n, generator) for name in PARAMS}
    t = torch.arange(config.n_steps, dtype=torch.float64) * config.dt
    clean = forced_damped_pendulum(*(params[k] for k in PARAMS), t)
    noise = config.noise_std * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    return make_dataset((clean + noise).numpy(), config.dt, {k: v.numpy() for k, v in params.items()},
                        split=split, attrs={"noise_std": config.noise_std})


def generate(config: PendulumDataConfig = PendulumDataConfig(), seed: int = 0) -> dict[str, xr.Dataset]:
    """All three splits, reproducible from ``seed``."""
    return generate_splits(config, seed, generate_split)


def make_dataset(x: np.ndarray, dt: float, params: dict[str, np.ndarray] | None = None, *,
                 split: str = "", attrs: dict | None = None) -> xr.Dataset:
    """Wrap sequences ``x (N, T)`` [rad] and optional true parameters ``(N,)`` in a Dataset."""
    check_sequences(x, "x", rank=2)
    n, n_steps = x.shape
    data_vars = {"x": (("sequence", "time"), np.asarray(x, dtype=np.float32),
                       {"units": UNITS["x"], "long_name": "observed angle"})}
    for name, values in (params or {}).items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"true parameter {name!r} must have shape ({n},), got {values.shape}")
        data_vars[name] = (("sequence",), values, {"units": UNITS.get(name, "")})
    coords = {"sequence": np.arange(n), "time": ("time", np.arange(n_steps) * dt, {"units": "s"})}
    return xr.Dataset(data_vars, coords,
                      attrs={"system": SYSTEM, "split": split, "dt": float(dt), **(attrs or {})})


# -- the reference implementation's files ---------------------------------------------------
#
# The reference generator (n-takeishi/phys-vae, data/pendulum/generate.py, run by makedata.sh
# with --name train|valid|test) writes per split:
#   args_<split>.json         json.dump of its options: "dt" (0.05 in makedata.sh),
#                             "len_episode", "n_samples", "noise_std", "range_*", "seed", ...
#   data_<split>.txt          np.savetxt(x, fmt="%.9e"): one sequence per row, no header
#   true_params_<split>.txt   np.savetxt(..., fmt="%.9e", header="init omega gamma A f"),
#                             so its first line is "# init omega gamma A f"
# The helpers below read such files (and their advdif and locomotion cousins) and turn every
# problem into a one-line ValueError or FileNotFoundError naming the file.

#: The reference generator's column names of ``true_params_<split>.txt``, in its order,
#: mapped to the data-set variable names (which a header may use as well).
REFERENCE_COLUMNS = dict(zip(TEXT_HEADER, PARAMS, strict=True))
#: Time step [s] of the paper's pendulum data (makedata.sh), used when no ``dt`` is given and
#: no ``args_<split>.json`` records one.
REFERENCE_DT = 0.05


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


def load_reference_text(directory: str | os.PathLike, split: str, dt: float | None = None, *,
                        require_params: bool | None = None) -> xr.Dataset:
    """Read the reference generator's pendulum files for ``split`` (see the comment above):
    ``data_<split>.txt`` (one sequence of angles [rad] per row), ``args_<split>.json`` if
    present (its ``dt`` and ``len_episode``) and ``true_params_<split>.txt`` (header ``#
    init omega gamma A f``, or none: then the columns are in that order; our variable names
    are accepted in the header as well, further columns are ignored).

    Args:
        directory: the folder holding the files.
        split: ``train``, ``valid`` or ``test``.
        dt: time step [s]; default: ``args_<split>.json``'s ``dt``, else 0.05 (the paper's).
        require_params: whether ``true_params_<split>.txt`` must be there; default: where
            ``args_<split>.json`` is (the generator writes both).

    Raises:
        FileNotFoundError: ``data_<split>.txt`` or a required companion file is missing.
        ValueError: naming the file and the problem, for any malformed file.
    """
    directory = Path(directory)
    check_split(split, directory)
    data_file = directory / f"data_{split}.txt"
    if not data_file.is_file():
        raise FileNotFoundError(f"data file not found: {data_file} (the reference generator's "
                                f"data_<split>.txt, one sequence per row)")
    x, _ = read_text_table(data_file, "one sequence of angles [rad] per row")
    if x.shape[1] < 2:
        raise ValueError(f"{data_file}: rows hold 1 value; expected one sequence of at least 2 "
                         f"time steps per row")
    check_float32_range(x, data_file)
    args_file = directory / f"args_{split}.json"
    args = read_args_json(args_file) if args_file.is_file() else {}
    recorded = positive_number(args["dt"], "dt", args_file) if "dt" in args else REFERENCE_DT
    dt = recorded if dt is None else positive_number(dt, "dt", "load_reference_text")
    check_count(args, "len_episode", x.shape[1], args_file, f"{data_file.name} has rows of")
    params, attrs = None, {"source": str(directory)}
    param_file = directory / f"true_params_{split}.txt"
    if param_file.is_file():
        table, names = read_text_table(param_file, "the true parameters, one row per sequence "
                                       f"(columns {' '.join(TEXT_HEADER)})",
                                       column_names=(*TEXT_HEADER, *PARAMS))
        params, ignored = select_columns(table, names, param_file, REFERENCE_COLUMNS, x.shape[0],
                                         f"sequence of {data_file.name}")
        if ignored:
            attrs["ignored_columns"] = " ".join(ignored)
    elif require_params or (require_params is None and args_file.is_file()):
        raise FileNotFoundError(
            f"true parameter file not found: {param_file} (the reference generator writes it "
            f"with {args_file.name}; pass require_params=False to read the data without it)")
    return make_dataset(x, dt, params, split=split, attrs=attrs)
