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
from pyro_physvae.validation import check_positive_int, check_sequences

SPLITS = ("train", "valid", "test")


def save_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` (netCDF) atomically: an existing file is replaced only once
    the new one is complete."""
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


def load_dataset(path: str | os.PathLike, *, system: str | None = None) -> xr.Dataset:
    """Read and validate a data set written by :func:`save_dataset`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable netCDF data set, lacks ``x``, holds NaN/inf,
            or belongs to another system than ``system``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as f:
            ds = f.load()
    except Exception as e:  # h5py/h5netcdf raise many types for a damaged file
        raise ValueError(f"cannot read {path} as a netCDF data set ({type(e).__name__}: {e})") from e
    if "x" not in ds:
        raise ValueError(f"{path} has no observation variable 'x' (variables: {list(ds.data_vars)})")
    if ds["x"].dims[0] != "sequence":
        raise ValueError(f"{path}: 'x' must have 'sequence' as its first dimension, has {ds['x'].dims}")
    check_sequences(ds["x"].values, f"'x' in {path}", rank=ds["x"].ndim)
    if system is not None and ds.attrs.get("system", system) != system:
        raise ValueError(f"{path} holds {ds.attrs['system']!r} data, expected {system!r}")
    return ds


def load_split(data_dir: str | os.PathLike, split: str, *, system: str | None = None,
               reader: Callable[[str | os.PathLike, str], xr.Dataset] | None = None) -> xr.Dataset:
    """Load ``<data_dir>/<split>.nc`` (checked to hold ``system`` data, if given); where it
    does not exist, ``reader(data_dir, split)`` reads the split in place from a system's own
    on-disk layout (``System.read_split``, e.g. the real gait recordings; see
    ``System.load_split``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = Path(data_dir) / f"{split}.nc"
    if not path.exists() and reader is not None:
        return reader(data_dir, split)
    return load_dataset(path, system=system)


def to_tensor(values: np.ndarray | xr.DataArray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float tensor in the default dtype on ``device``."""
    arr = values.values if isinstance(values, xr.DataArray) else values
    return torch.as_tensor(np.asarray(arr), dtype=torch.get_default_dtype(), device=device)


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
