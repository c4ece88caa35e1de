"""netCDF input and output of data sets, with validation and atomic writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from pyro_physvae.files import atomic_write
from pyro_physvae.validation import (
    check_positive_int,
    check_positive_number,
    check_real_dtype,
    check_sequences,
)

SPLITS = ("train", "valid", "test")
#: Attributes of a data set that must be finite positive numbers where present, with what
#: they mean (for the messages).
POSITIVE_ATTRIBUTES = {"dt": "the time step", "dx": "the grid spacing"}


def save_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` (netCDF) atomically: an existing file is replaced only once
    the new one is complete."""
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def load_dataset(path: str | os.PathLike, *, system: str | None = None) -> xr.Dataset:
    """Read and validate a data set written by :func:`save_dataset`.

    The file's path stays with the data set as ``ds.encoding["source"]`` (see
    :func:`dataset_source`), for later messages.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable netCDF data set, lacks ``x`` or holds one that
            is not a non-empty array ``(sequence, ..., time)`` of finite real numbers, has a
            ``dt``/``dx`` attribute that is not a finite positive number or a ``time``
            coordinate that does not increase, or belongs to another system than ``system``.
    """
    path = require_data_file(path)
    try:
        with xr.open_dataset(path, engine="h5netcdf") as f:
            ds = f.load()
    except Exception as e:  # h5py/h5netcdf raise many types for a damaged file
        raise unreadable(path, e) from e
    ds.encoding["source"] = str(path)
    check_dataset(ds, system=system)
    return ds


def require_data_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; a ``FileNotFoundError`` where it does not exist and a
    ``ValueError`` where it is a directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a directory, expected a netCDF file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a file that h5py/h5netcdf cannot read as a netCDF data set."""
    return ValueError(f"cannot read {path} as a netCDF data set ({type(error).__name__}: {error})")


def check_dataset(ds: xr.Dataset, *, system: str | None = None, check_values: bool = True) -> None:
    """Validate a data set as :func:`load_dataset` does (its messages name
    :func:`dataset_source`): ``x`` present, of real numbers, shaped ``(sequence, ..., time)``
    with no empty dimension and all values finite (the values only with ``check_values``:
    a data set left in its file is scanned in chunks instead, see
    :func:`~pyro_physvae.data.lazy.open_lazy_dataset`); the attributes in
    :data:`POSITIVE_ATTRIBUTES` (``dt``, ``dx``) finite positive numbers where present; a
    numeric ``time`` coordinate strictly increasing; and the ``system`` attribute, where
    present, equal to ``system`` (if given)."""
    where = dataset_source(ds)
    if "x" not in ds:
        raise ValueError(f"{where} has no observation variable 'x' (variables: {list(ds.data_vars)})")
    x = ds["x"]
    check_real_dtype(x.dtype, f"'x' in {where}")
    if x.ndim < 1 or x.dims[0] != "sequence":
        raise ValueError(f"'x' in {where} must have 'sequence' as its first dimension, has {x.dims}")
    if x.ndim < 2:
        raise ValueError(f"'x' in {where} must have the dimensions (sequence, ..., time), has {x.dims}")
    empty = [d for d in x.dims if x.sizes[d] == 0]
    if empty:
        what = {"sequence": "no sequences", x.dims[-1]: "no time steps"}.get(empty[0],
                                                                           f"an empty {empty[0]!r} dimension")
        raise ValueError(f"'x' in {where} has {what} (shape {dict(x.sizes)})")
    if check_values:
        check_sequences(x.values, f"'x' in {where}", rank=x.ndim)
    for name, meaning in POSITIVE_ATTRIBUTES.items():
        if name in ds.attrs:
            check_positive_number(ds.attrs[name], f"the attribute {name!r} ({meaning}) of {where}")
    if "time" in ds.coords and ds["time"].ndim == 1 and ds["time"].dtype.kind in "iuf":
        # The truth of counterfactuals is simulated on it (e.g. the pendulum's).
        t = ds["time"].values
        bad = np.nonzero(~np.isfinite(t))[0].tolist() + (np.nonzero(~(np.diff(t) > 0))[0] + 1).tolist()
        if bad:
            raise ValueError(f"the 'time' coordinate of {where} must be finite and strictly "
                             f"increasing; it is not at index {min(bad)} (value {t[min(bad)]})")
    if system is not None and ds.attrs.get("system", system) != system:
        raise ValueError(f"{where} holds {ds.attrs['system']!r} data, expected {system!r}")


def dataset_source(ds: xr.Dataset) -> str:
    """Where a data set came from, for messages: its file (``ds.encoding["source"]``, which
    xarray and :func:`load_dataset` set, and :func:`load_split` for a system's own layout),
    else ``"the data set"``."""
    return str(ds.encoding.get("source") or "the data set")


def require_dimension(ds: xr.Dataset, dim: str) -> int:
    """The size of dimension ``dim`` of the data set; a ``ValueError`` naming the data set
    and the dimensions of ``x`` where it has none."""
    if dim not in ds.sizes:
        dims = ds["x"].dims if "x" in ds else tuple(ds.sizes)
        raise ValueError(f"{dataset_source(ds)} has no dimension {dim!r} (its 'x' has {dims})")
    return int(ds.sizes[dim])


def require_attribute(ds: xr.Dataset, name: str, meaning: str) -> float:
    """The attribute ``name`` of the data set (``meaning``: what it is, e.g. "the time
    step"), which must be a finite positive number; a ``ValueError`` naming the data set
    where it is missing or is not."""
    if name not in ds.attrs:
        raise ValueError(f"{dataset_source(ds)} lacks the attribute {name!r} ({meaning})")
    return check_positive_number(ds.attrs[name], f"the attribute {name!r} ({meaning}) of "
                                 f"{dataset_source(ds)}")


def check_data_dir(data_dir: str | os.PathLike, splits: tuple[str, ...] = SPLITS, *,
                   own_layout: bool = False, what: str = "data directory") -> Path:
    """Check that ``data_dir`` is a directory holding ``<split>.nc`` for each of ``splits``
    (only that it is a directory where the system reads its ``own_layout``, see
    :func:`load_split`) and return it as a ``Path``.

    Raises:
        FileNotFoundError: the directory or a split's file does not exist.
        ValueError: ``data_dir`` is a file.
    """
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{what} {path} is a file, expected a directory")
    if not own_layout:
        for split in splits:
            if not (path / f"{split}.nc").exists():
                raise FileNotFoundError(f"{what} {path} has no {split}.nc")
    return path


def load_split(data_dir: str | os.PathLike, split: str, *, system: str | None = None,
               reader: Callable[[str | os.PathLike, str], xr.Dataset] | None = None,
               open_file: Callable[..., xr.Dataset] | None = None) -> xr.Dataset:
    """Load ``<data_dir>/<split>.nc`` (checked to hold ``system`` data, if given); where it
    does not exist, ``reader(data_dir, split)`` reads the split in place from a system's own
    on-disk layout (``System.read_split``, e.g. the real gait recordings; see
    ``System.load_split``).

    ``open_file(path, system=...)`` reads a netCDF split instead of :func:`load_dataset`,
    e.g. :func:`~pyro_physvae.data.lazy.open_lazy_dataset`, which leaves ``x`` in the file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    check_data_dir(data_dir, (split,), own_layout=reader is not None)
    path = Path(data_dir) / f"{split}.nc"
    if not path.exists() and reader is not None:
        ds = reader(data_dir, split)
        ds.encoding.setdefault("source", f"the {split} split of {data_dir}")
        check_dataset(ds, system=system)
        return ds
    return (open_file or load_dataset)(path, system=system)


def to_tensor(values: np.ndarray | xr.DataArray, device: torch.device | str = "cpu", *,
              name: str = "the values") -> torch.Tensor:
    """Float tensor in the default dtype on ``device``, of the same shape as ``values``.

    NaN and infinite values pass as they are (e.g. true parameters unknown for some
    sequences), but finite values that the cast turns infinite (float64 beyond float32's
    range, about 3.4e38) raise a ``ValueError`` naming ``name``; so do values that are not
    real numbers (strings, objects, complex).
    """
    arr = np.asarray(values.values if isinstance(values, xr.DataArray) else values)
    if arr.dtype.kind not in "biuf":
        check_real_dtype(arr.dtype, name)
    dtype = torch.get_default_dtype()
    tensor = torch.as_tensor(arr, dtype=dtype, device=device)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > tensor.element_size():
        overflow = np.isfinite(arr) & ~torch.isfinite(tensor).cpu().numpy()
        if overflow.any():
            largest = float(np.abs(arr[np.isfinite(arr)]).max())
            raise ValueError(f"values in {name} overflow {str(dtype).removeprefix('torch.')} "
                             f"(largest |x| = {largest:.3g})")
    return tensor


def generate_splits(config: Any, seed: int,
                    generate_split: Callable[[int, Any, torch.Generator, str], xr.Dataset]
                    ) -> dict[str, xr.Dataset]:
    """The three splits of a synthetic data set, reproducible from ``seed``: one generator
    feeds ``generate_split(n, config, generator, split)`` for the sizes ``config.n_train``,
    ``n_valid`` and ``n_test`` in turn. The seed and the config are kept as attributes."""
    g = torch.Generator().manual_seed(int(seed))
    sizes = {"train": config.n_train, "valid": config.n_valid, "test": config.n_test}
    out = {split: generate_split(sizes[split], config, g, split) for split in SPLITS}
    for ds in out.values():
        ds.attrs.update({"seed": int(seed), **{f"config_{k}": str(v) for k, v in asdict(config).items()}})
    return out


def uniform_draws(low_high: tuple[float, float], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` float64 draws, uniform on ``[low, high]``."""
    low, high = low_high
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def check_data_config(config: Any, positive: tuple[str, ...], ranges: tuple[str, ...]) -> None:
    """Validate a generator config: positive split sizes ``n_train``, ``n_valid``,
    ``n_test`` and length ``n_steps``, the fields ``positive`` > 0, ``noise_std`` >= 0, and
    every ``(low, high)`` field named in ``ranges`` with ``low <= high``."""
    for name in ("n_train", "n_valid", "n_test", "n_steps"):
        check_positive_int(getattr(config, name), name)
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if not config.noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {config.noise_std}")
    for name in ranges:
        lo, hi = getattr(config, name)
        if not lo <= hi:
            raise ValueError(f"range of {name} must have low <= high, got ({lo}, {hi})")
