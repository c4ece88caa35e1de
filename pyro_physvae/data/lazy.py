"""Data sets larger than memory: observations read from their netCDF file in chunks.

A data set's small variables (true parameters, coordinates, attributes) are read into
memory as usual; its observations ``x``, which can be gigabytes (50,000 galaxy images of
69 x 69 x 3 are 2.9 GB), stay in the file. :class:`LazyRows` reads the rows asked for,
whether a slice, an index or a minibatch of indices in any order, and is what the trainer
(``TrainConfig.stream``) and the image evaluation take in place of the observation tensor.
:func:`write_rows_in_parts` writes such a file part by part, so that making one never needs
it all in memory either.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import torch
import xarray as xr
from torch import Tensor

from pyro_physvae.data.io import check_dataset, dataset_source, require_data_file, to_tensor, unreadable
from pyro_physvae.files import atomic_write
from pyro_physvae.validation import check_positive_int, check_sequences

#: Rows read at a time where a whole file is scanned (the checks): 14 MB of 69 x 69 x 3
#: float32 images.
SCAN_ROWS = 256


class LazyRows:
    """The observations ``x`` of a netCDF data set, read from the file when indexed.

    Indexing gives a tensor in torch's default dtype on ``device``, with the overflow check
    of :func:`~pyro_physvae.data.io.to_tensor`: ``rows[i]`` one row ``(*event)``,
    ``rows[a:b]`` rows ``(B, *event)``, ``rows[idx]`` for 1-d integer indices in any order,
    repeats allowed (a minibatch), ``(len(idx), *event)``. ``shape``, ``dtype``, ``device``,
    ``dim()`` and ``len()`` are those of the tensor the whole split would be, which is never
    made.

    Args:
        path: the netCDF (HDF5) file, as :func:`~pyro_physvae.data.io.save_dataset` writes.
        variable: the observation variable.
        device: where the rows read go.
    """

    def __init__(self, path: str | os.PathLike, variable: str = "x",
                 device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.variable = variable
        self.device = torch.device(device)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {self.path} as a netCDF data set ({e})") from e
        if variable not in self._file or not isinstance(self._file[variable], h5py.Dataset):
            self._file.close()
            raise ValueError(f"{self.path} has no observation variable {variable!r}")
        self._data = self._file[variable]
        self.shape = torch.Size(self._data.shape)
        self.dtype = torch.get_default_dtype()

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split as a tensor of :attr:`dtype`."""
        return int(np.prod(self.shape)) * torch.finfo(self.dtype).bits // 8

    def __repr__(self) -> str:
        return f"LazyRows({str(self.path)!r}, shape={tuple(self.shape)}, device={self.device})"

    def __getitem__(self, key: int | slice | Tensor | np.ndarray | list[int]) -> Tensor:
        if isinstance(key, slice):
            return self._tensor(self._data[key])
        if isinstance(key, (int, np.integer)) or (isinstance(key, Tensor) and key.dim() == 0):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} is out of range for {len(self)} rows of {self.path}")
            return self._tensor(self._data[i])
        return self._tensor(self._take(key))

    def _take(self, key: Tensor | np.ndarray | list[int]) -> np.ndarray:
        """Rows at the 1-d integer indices ``key``: HDF5 reads increasing unique indices, so
        the rows are read in that order and put back in the order asked for."""
        idx = np.asarray(key.cpu() if isinstance(key, Tensor) else key)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise IndexError(f"rows are selected by a slice, an int or 1-d integer indices, got "
                             f"{idx.dtype} indices of shape {idx.shape}")
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices out of range for {len(self)} rows of {self.path}")
        unique, inverse = np.unique(idx, return_inverse=True)
        if unique.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self._data.dtype)
        return self._data[unique][inverse]

    def _tensor(self, values: np.ndarray) -> Tensor:
        return to_tensor(values, self.device, name=f"'{self.variable}' of {self.path}")

    def chunks(self, size: int = SCAN_ROWS) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows[start:start + size])`` over the whole split, in order."""
        check_positive_int(size, "size")
        for start in range(0, len(self), size):
            yield start, self[start:start + size]

    def to(self, device: torch.device | str) -> LazyRows:
        """The same rows, read onto ``device``."""
        return LazyRows(self.path, self.variable, device)

    def check(self, rows: int = SCAN_ROWS) -> None:
        """Scan the file as :func:`~pyro_physvae.validation.check_sequences` checks a tensor
        (finite values), ``rows`` at a time; the message names the file and the first bad row."""
        for start, xb in self.chunks(rows):
            try:
                check_sequences(xb, f"'{self.variable}' of {self.path}", rank=xb.ndim)
            except ValueError as e:
                raise ValueError(f"{e} (in rows {start}-{start + xb.shape[0] - 1})") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> LazyRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        raise TypeError("LazyRows holds an open file; pass its path to other processes")


def open_lazy_dataset(path: str | os.PathLike, *, system: str | None = None,
                      variable: str = "x") -> xr.Dataset:
    """A netCDF data set with every variable but ``variable`` read into memory and
    ``variable`` left in the file; validated as :func:`~pyro_physvae.data.io.load_dataset`
    validates, with ``variable`` scanned in chunks. ``ds.encoding["source"]`` is the file."""
    path = require_data_file(path)
    try:
        f = xr.open_dataset(path, engine="h5netcdf")
        # The other variables are read now; ``variable`` stays a lazily indexed array of
        # the file (reading ``.values`` would load it whole: use :func:`lazy_rows`).
        ds = f.drop_vars(variable, errors="ignore").load()
        if variable in f:
            ds[variable] = f[variable]
    except Exception as e:  # h5py/h5netcdf raise many types for a damaged file
        raise unreadable(path, e) from e
    ds.encoding["source"] = str(path)
    ds.attrs["_lazy_variable"] = variable
    check_dataset(ds, system=system, check_values=False)
    with LazyRows(path, variable) as rows:
        rows.check()
    return ds


def is_lazy(ds: xr.Dataset) -> bool:
    """Whether ``ds`` came from :func:`open_lazy_dataset` (its observations are in the file)."""
    return "_lazy_variable" in ds.attrs


def lazy_rows(ds: xr.Dataset, device: torch.device | str = "cpu") -> LazyRows:
    """The :class:`LazyRows` of a data set opened by :func:`open_lazy_dataset`."""
    if not is_lazy(ds):
        raise ValueError(f"{dataset_source(ds)} was read into memory, not opened lazily")
    return LazyRows(ds.encoding["source"], ds.attrs["_lazy_variable"], device)


def write_rows_in_parts(path: str | os.PathLike, parts: Iterable[xr.Dataset], n_rows: int, *,
                        dim: str = "sequence", chunk_rows: int = 64) -> Path:
    """Write the concatenation of ``parts`` along ``dim`` to the netCDF file ``path``
    without holding more than one part in memory.

    The first part gives the variables, dimensions, coordinates other than ``dim`` and
    attributes (written by xarray, with ``dim`` unlimited); every later part must have the
    same variables along ``dim``, and together they must have ``n_rows`` rows. Variables
    along ``dim`` are stored in HDF5 chunks of ``chunk_rows`` rows, so that a minibatch
    reads few chunks; ``dim``'s coordinate is ``0 .. n_rows - 1``. The file appears only
    once complete (:func:`~pyro_physvae.files.atomic_write`). Returns ``path``.
    """
    check_positive_int(n_rows, "n_rows")
    check_positive_int(chunk_rows, "chunk_rows")

    def write(tmp: Path) -> None:
        parts_iter = iter(parts)
        first = next(parts_iter, None)
        if first is None:
            raise ValueError("write_rows_in_parts needs at least one part")
        if dim not in first.dims:
            raise ValueError(f"the first part has no dimension {dim!r} (it has {tuple(first.dims)})")
        if first.sizes[dim] > n_rows:
            raise ValueError(f"the parts hold more than the {n_rows} rows declared along {dim!r}")
        along = [name for name, var in first.variables.items() if dim in var.dims and name != dim]
        encoding = {name: {"chunksizes": tuple(min(chunk_rows, n_rows) if d == dim else first.sizes[d]
                                               for d in first[name].dims)} for name in along}
        first.drop_vars(dim, errors="ignore").to_netcdf(tmp, engine="h5netcdf", unlimited_dims=[dim],
                                                        encoding=encoding)
        start = first.sizes[dim]
        with h5netcdf.File(tmp, "a") as f:
            for part in parts_iter:
                start = _append_part(f, part, along, start, n_rows, dim)
            if start != n_rows:
                raise ValueError(f"the parts hold {start} rows along {dim!r}, expected {n_rows}")
            f.create_variable(dim, (dim,), data=np.arange(n_rows))

    return atomic_write(path, write)


def _append_part(f: h5netcdf.File, part: xr.Dataset, along: list[str], start: int, n_rows: int,
                 dim: str) -> int:
    """Write ``part``'s variables ``along`` ``dim`` from row ``start`` on; the next start."""
    extra = sorted(name for name, var in part.variables.items()
                   if dim in var.dims and name != dim and name not in along)
    if extra:
        raise ValueError(f"a part has the variable {extra[0]!r}, which the first part lacks")
    size = int(part.sizes.get(dim, 0))
    if start + size > n_rows:
        raise ValueError(f"the parts hold more than the {n_rows} rows declared along {dim!r}")
    f.resize_dimension(dim, start + size)
    for name in along:
        var = part[name]
        axis = var.dims.index(dim)
        index = tuple(slice(start, start + size) if i == axis else slice(None) for i in range(var.ndim))
        f.variables[name][index] = var.values
    return start + size


def row_chunks(x: Tensor | LazyRows, size: int) -> Iterator[Tensor]:
    """The rows of ``x`` (a tensor or :class:`LazyRows`) as tensors of ``size`` rows at most,
    in order."""
    check_positive_int(size, "size")
    for start in range(0, x.shape[0], size):
        yield x[start:start + size]


def in_memory(x: Tensor | LazyRows) -> Tensor:
    """``x`` as one tensor: the rows of a :class:`LazyRows` all read (memory: the whole split)."""
    return x[:] if isinstance(x, LazyRows) else x


#: glibc's ``mallopt`` parameter for the size above which blocks are mapped on their own.
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, so that
    freeing it returns it to the system at once.

    By default glibc raises that threshold up to 32 MB as blocks are freed, and the tensors
    of a chunk (a few MB each) then come from its heap, which keeps their pages after they are
    freed: streamed evaluation of 69 x 69 images grew to 1.17 GB instead of 0.89 GB, and the
    evaluation of 8000 advection-diffusion fields to 2.7 GB instead of 0.8 GB. The CLI calls
    this for ``train --stream``, ``evaluate`` and ``diagnose``; a script that evaluates large
    splits through the Python API should call it first. Process-wide; returns ``False`` (and
    does nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
