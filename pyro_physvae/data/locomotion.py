"""Human locomotion: real gait recordings, their on-disk layouts, and a synthetic stand-in.

The real data (Schreiber & Moissenet, Sci. Data 6, 111, 2019, preprocessed as in the
Phys-VAE paper) hold three lower-limb joint angles [rad] over one gait cycle resampled to 101
points, with per-sample properties. Two layouts are read from a user-given directory; the
data are never copied into the package:

* ``<split>.npy``, float array ``(N, 3, 101)``, with optional ``props_<split>.txt`` (one row
  per sample, no header: foot (0 right, 1 left), speed [m/s], stride length [m], step width
  [m], cadence [steps/min]);
* the original MATLAB file ``data_<split>.mat`` with a ``data`` array ``(N, 3, 101)`` (v5 or
  v7.3), with the same optional properties file.

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

def read_split(directory: str | os.PathLike, split: str) -> xr.Dataset:
    """Read ``split`` from ``directory`` in the ``.npy`` or the MATLAB layout (see the
    module docs), with its properties when ``props_<split>.txt`` is there.

    Raises:
        FileNotFoundError: neither ``<split>.npy`` nor ``data_<split>.mat`` exists.
        ValueError: the array has the wrong shape, holds NaN/inf or cannot be read, or the
            properties file does not match it.
    """
    directory = Path(directory)
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
    if x.ndim != 3 or x.shape[1] != N_JOINTS:
        raise ValueError(f"{source}: gait angles must have shape (N, {N_JOINTS}, T), got {x.shape}")
    check_sequences(x, f"gait angles in {source}", rank=3)
    props_path = directory / f"props_{split}.txt"
    props = _read_props(props_path, x.shape[0]) if props_path.is_file() else None
    return make_dataset(x, props, source=source)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cannot read {path} as a .npy array ({e})") from e


def _read_mat(path: Path) -> np.ndarray:
    """The ``data`` array of a MATLAB file: v7.3 files are HDF5 (arrays stored transposed),
    older ones are read by scipy."""
    import h5py
    from scipy.io import loadmat

    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path} has no 'data' array (keys: {list(f.keys())})")
            return np.asarray(f["data"], dtype=np.float32).transpose()
    try:
        content = loadmat(path)
    except (ValueError, OSError, TypeError, NotImplementedError) as e:
        raise ValueError(f"cannot read {path} as a MATLAB file ({e})") from e
    if "data" not in content:
        keys = [k for k in content if not k.startswith("__")]
        raise ValueError(f"{path} has no 'data' array (variables: {keys})")
    return np.asarray(content["data"], dtype=np.float32)


def _read_props(path: Path, n: int) -> np.ndarray:
    try:
        props = np.loadtxt(path, ndmin=2)
    except ValueError as e:
        raise ValueError(f"cannot read {path} as a table of numbers ({e})") from e
    if props.shape != (n, len(PROPERTIES)):
        raise ValueError(f"{path} must have {n} rows (one per sample) of {len(PROPERTIES)} "
                         f"columns ({' '.join(PROPERTIES)}), got shape {props.shape}")
    if not np.isfinite(props).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return props


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
