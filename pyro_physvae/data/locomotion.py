"""Human locomotion: real gait recordings, their on-disk layouts, and a synthetic stand-in.

The real data (Schreiber & Moissenet, Sci. Data 6, 111, 2019, preprocessed as in the
Phys-VAE paper) hold three lower-limb joint angles [rad] over one gait cycle resampled to 101
points, with per-sample properties. Two layouts are read from a user-given directory; the
data are never copied into the package:

* ``<split>.npy``, float array ``(N, 3, 101)``, with optional ``props_<split>.txt`` (one row
  per sample, no header: foot (0 right, 1 left), speed [m/s], stride length [m], step width
  [m], cadence [steps/min]);
* the reference's MATLAB layout (n-takeishi/phys-vae, data/locomotion/makedata.m):
  ``data_<split>.mat`` with a ``data`` array ``(N, 3, 101)`` (v5 or v7.3) and
  ``prop_<split>.txt``, written by ``writetable(..., 'Delimiter', ' ')``: a header line
  ``foot speed stride_length step_width cadence`` without ``#``, then one row per sample
  (an Octave port writes the same rows with ``dlmwrite``, without the header).

Either properties file name and either form (header or none) goes with either layout.

Data sets hold ``x`` with dims ``(sequence, joint, time)`` and the properties as variables
over ``sequence``. The time axis is the reference's model time, ``dt = 0.02`` per sample
(one cycle lasts 2 time units); ``cycle_percent`` gives the gait-cycle position.

:func:`generate` makes a synthetic set of the same shape (harmonic joint-angle curves whose
amplitudes follow a walking speed) for tests and demonstrations without the real data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pyro_physvae.data.io import check_data_config, generate_splits, uniform_draws
from pyro_physvae.data.reference import (
    check_float32_range,
    check_split,
    read_bytes_head,
    read_npy_array,
    read_text_table,
    select_columns,
)
from pyro_physvae.validation import check_sequences

SYSTEM = "locomotion"
#: Per-sample properties, in the column order of ``props_<split>.txt``.
PROPERTIES = ("foot", "speed", "stride", "step_width", "cadence")
UNITS = {"foot": "0 right, 1 left", "speed": "m/s", "stride": "m", "step_width": "m",
         "cadence": "steps/min", "x": "rad", "time": "model time (2 per cycle)"}
N_JOINTS = 3
DT = 0.02


def make_dataset(x: np.ndarray, props: np.ndarray | None = None, *, dt: float = DT,
                 source: str = "") -> xr.Dataset:
    """A locomotion data set from angles ``x (N, 3, T)`` [rad] and optional properties
    ``props (N, 5)`` (columns :data:`PROPERTIES`)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != N_JOINTS:
        raise ValueError(f"gait angles must have shape (N, {N_JOINTS}, T), got {x.shape}")
    check_sequences(x, "gait angles x", rank=3)
    n, _, n_steps = x.shape
    data_vars: dict[str, tuple] = {"x": (("sequence", "joint", "time"), x, {"units": UNITS["x"]})}
    if props is not None:
        props = np.asarray(props, dtype=np.float64)
        if props.shape != (n, len(PROPERTIES)):
            raise ValueError(f"properties must have shape ({n}, {len(PROPERTIES)}) (one row per "
                             f"sample: {' '.join(PROPERTIES)}), got {props.shape}")
        for j, name in enumerate(PROPERTIES):
            data_vars[name] = (("sequence",), props[:, j], {"units": UNITS[name]})
    coords = {"sequence": np.arange(n), "joint": np.arange(N_JOINTS),
              "time": np.arange(n_steps) * dt,
              "cycle_percent": ("time", np.linspace(0.0, 100.0, n_steps))}
    return xr.Dataset(data_vars, coords=coords,
                      attrs={"system": SYSTEM, "dt": float(dt), "source": source})


# -- the real data's layouts --------------------------------------------------------------

#: Column names of the reference's ``prop_<split>.txt`` (makedata.m's ``writetable``), in its
#: order, mapped to the data-set variable names (which a header may use as well).
REFERENCE_COLUMNS = {"foot": "foot", "speed": "speed", "stride_length": "stride",
                     "step_width": "step_width", "cadence": "cadence"}


def read_split(directory: str | os.PathLike, split: str, *, require_props: bool = False
               ) -> xr.Dataset:
    """Read ``split`` from ``directory`` in the ``.npy`` or the MATLAB layout (see the
    module docs), with its properties from ``props_<split>.txt`` or, as the reference's
    makedata.m names it, ``prop_<split>.txt``.

    The properties file has one row per sample, columns separated by spaces or tabs, and either
    no header (columns :data:`PROPERTIES`, in order) or a header line naming the columns, as
    MATLAB's ``writetable`` writes it (``foot speed stride_length step_width cadence``) or
    after ``#``.

    Args:
        directory: the folder holding the files.
        split: ``train``, ``valid`` or ``test``.
        require_props: whether a properties file must be there (else it is read if present).

    Raises:
        FileNotFoundError: neither ``<split>.npy`` nor ``data_<split>.mat`` exists, or no
            properties file where ``require_props``.
        ValueError: naming the file and the problem: the array has the wrong shape, holds
            NaN/inf or cannot be read, or the properties file is malformed or does not match it.
    """
    directory = Path(directory)
    check_split(split, directory)
    npy, mat = directory / f"{split}.npy", directory / f"data_{split}.mat"
    if npy.is_file():
        x = _read_npy(npy)
        source = str(npy)
    elif mat.is_file():
        x = _read_mat(mat)
        source = str(mat)
    else:
        raise FileNotFoundError(
            f"no locomotion data for split {split!r} in {directory}: expected {npy.name} or "
            f"{mat.name} (and optionally props_{split}.txt)")
    if x.ndim != 3 or x.shape[1] != N_JOINTS or min(x.shape) < 1:
        raise ValueError(f"{source}: gait angles must have shape (N, {N_JOINTS}, T), got {x.shape}")
    check_sequences(x, source, rank=3)
    candidates = [directory / f"props_{split}.txt", directory / f"prop_{split}.txt"]
    present = [p for p in candidates if p.exists()]
    if len(present) > 1:
        raise ValueError(f"both {present[0]} and {present[1]} exist: keep one properties file "
                         f"for split {split!r}")
    if present:
        props = _read_props(present[0], x.shape[0], Path(source).name)
    elif require_props:
        raise FileNotFoundError(f"no properties file for split {split!r}: expected "
                                f"{candidates[0]} or {candidates[1].name} (one row per sample: "
                                f"{' '.join(REFERENCE_COLUMNS)})")
    else:
        props = None
    return make_dataset(x, props, source=source)


def _read_npy(path: Path) -> np.ndarray:
    x = read_npy_array(path, f"gait angles (N, {N_JOINTS}, T) [rad]")
    return check_float32_range(x, path).astype(np.float32)


def _read_mat(path: Path) -> np.ndarray:
    """The ``data`` array ``(N, 3, T)`` of a MATLAB file: v7.3 files are HDF5 (arrays stored
    transposed), older ones are read by scipy. Every problem is a ValueError naming ``path``."""
    import h5py
    from scipy.io import loadmat

    expected = f"a MATLAB file with the gait angles in a numeric array 'data' (N, {N_JOINTS}, T)"
    if read_bytes_head(path, expected) == b"":
        raise ValueError(f"cannot read {path}: the file is empty (0 bytes); expected {expected}")
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise _NoData(f"has no 'data' array (variables: {sorted(f.keys())})")
                node = f["data"]
                if not isinstance(node, h5py.Dataset):
                    raise _NoData("has a group 'data', not an array")
                data = np.asarray(node)
                if data.dtype.kind in "biuf":
                    data = data.transpose()
        else:
            content = loadmat(path)
            if "data" not in content:
                keys = [k for k in content if not k.startswith("__")]
                raise _NoData(f"has no 'data' array (variables: {keys})")
            data = content["data"]
    except _NoData as e:
        raise ValueError(f"{path} {e.args[0]}: expected {expected}") from None
    except Exception as e:  # scipy and h5py raise many types for a damaged file
        raise ValueError(f"cannot read {path}: expected {expected} ({type(e).__name__}: "
                         f"{e})") from e
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' holds {kind} values, not real numbers: expected {expected}")
    return check_float32_range(data, path).astype(np.float32)


class _NoData(Exception):
    """A MATLAB file without a ``data`` array (carries what the file has instead)."""


def _read_props(path: Path, n: int, data_name: str) -> np.ndarray:
    """The properties ``(n, 5)`` (columns :data:`PROPERTIES`) from a text file."""
    table, names = read_text_table(
        path, f"one row of {len(PROPERTIES)} properties per sample ({' '.join(REFERENCE_COLUMNS)})",
        column_names=(*REFERENCE_COLUMNS, *PROPERTIES))
    if table.shape[0] != n:
        raise ValueError(f"{path} must have {n} rows (one per sample of {data_name}), got "
                         f"{table.shape[0]}")
    columns, _ = select_columns(table, names, path, REFERENCE_COLUMNS, n, f"sample of {data_name}")
    foot = columns["foot"]
    if not np.isin(foot, (0.0, 1.0)).all():
        bad = int(np.flatnonzero(~np.isin(foot, (0.0, 1.0)))[0])
        raise ValueError(f"{path}: the foot column must hold 0 (right) or 1 (left), row {bad + 1} "
                         f"holds {foot[bad]:g}")
    return np.stack([columns[name] for name in PROPERTIES], axis=1)


# -- a synthetic stand-in -----------------------------------------------------------------

@dataclass(frozen=True)
class GaitDataConfig:
    """Sizes and ranges of the synthetic gait data (sizes as the real set's)."""

    n_train: int = 400
    n_valid: int = 100
    n_test: int = 100
    n_steps: int = 101
    noise_std: float = 0.01
    speed: tuple[float, float] = (0.4, 1.8)

    def __post_init__(self) -> None:
        check_data_config(self, positive=(), ranges=("speed",))
        if self.speed[0] <= 0:
            raise ValueError(f"walking speeds must be positive, got range {self.speed}")


#: Mean angle [rad] and harmonic amplitudes [rad] and phases per joint at 1 m/s; the
#: amplitudes grow with speed, roughly as sagittal hip, knee and ankle angles do.
_MEAN = np.array([0.2, 0.4, -0.35])
_AMPLITUDE = np.array([[0.35, 0.06, 0.02], [0.25, 0.22, 0.05], [0.08, 0.10, 0.05]])
_PHASE = np.array([[0.0, 1.2, 2.0], [2.6, 0.4, 1.5], [1.8, 3.0, 0.7]])


def gait_curves(speed: torch.Tensor, jitter: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Noise-free synthetic joint angles ``(N, 3, n_steps)`` [rad] for speeds ``(N,)``
    [m/s] and per-sample jitter ``(N, 3, 3)`` of the harmonic amplitudes (relative)."""
    s = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64)
    k = torch.arange(1, 4, dtype=torch.float64)
    amp = torch.as_tensor(_AMPLITUDE) * speed[:, None, None].sqrt() * (1 + jitter)
    waves = torch.cos(2 * math.pi * k[:, None] * s + torch.as_tensor(_PHASE)[..., None])
    return torch.as_tensor(_MEAN)[:, None] + torch.einsum("njk,jks->njs", amp, waves)


def generate_split(n: int, config: GaitDataConfig, generator: torch.Generator,
                   split: str) -> xr.Dataset:
    speed = uniform_draws(config.speed, n, generator)
    jitter = 0.15 * torch.randn(n, N_JOINTS, 3, generator=generator, dtype=torch.float64)
    x = gait_curves(speed, jitter, config.n_steps)
    x = x + config.noise_std * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    stride = 0.7 + 0.35 * speed + 0.05 * torch.randn(n, generator=generator, dtype=torch.float64)
    props = torch.stack((torch.randint(0, 2, (n,), generator=generator).double(), speed, stride,
                         uniform_draws((0.05, 0.15), n, generator), 120.0 * speed / stride), -1)
    ds = make_dataset(x.numpy(), props.numpy(), source=f"synthetic ({split})")
    ds.attrs["synthetic"] = 1
    return ds


def generate(config: GaitDataConfig = GaitDataConfig(), seed: int = 0) -> dict[str, xr.Dataset]:
    """Synthetic train/valid/test gait sets, reproducible from ``seed``."""
    return generate_splits(config, seed, generate_split)
