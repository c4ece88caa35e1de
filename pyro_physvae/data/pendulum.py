"""Forced damped pendulum data: the paper's generator and the reference text format.

Truth: ``theta'' = -omega^2 sin(theta) - xi theta' + A omega^2 cos(2 pi f t)`` from
``theta(0) ~ U[-1.57, 1.57]``, ``theta'(0) = 0``, observed every ``dt`` for ``n_steps`` steps
with Gaussian noise. Parameter ranges follow the reference work (see DESIGN.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torchdiffeq import odeint

from pyro_physvae.data.io import check_data_config, generate_splits, uniform_draws
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


def load_reference_text(directory: str | os.PathLike, split: str, dt: float = 0.05) -> xr.Dataset:
    """Read the reference implementation's ``data_<split>.txt`` (one sequence per row) and,
    if present, ``true_params_<split>.txt`` (header ``init omega gamma A f``)."""
    directory = Path(directory)
    data_file = directory / f"data_{split}.txt"
    if not data_file.is_file():
        raise FileNotFoundError(f"data file not found: {data_file}")
    x = _read_table(data_file)
    if x.ndim == 1:
        x = x[None, :]
    params = None
    param_file = directory / f"true_params_{split}.txt"
    if param_file.is_file():
        with open(param_file) as f:
            header = f.readline().split()
        if tuple(header) != TEXT_HEADER:
            expected, got = " ".join(TEXT_HEADER), " ".join(header)
            raise ValueError(f"{param_file}: header must be {expected!r}, got {got!r}")
        table = _read_table(param_file, skiprows=1)
        if table.ndim == 1 and table.size == len(TEXT_HEADER):
            table = table[None, :]  # a single sequence
        if table.ndim != 2 or table.shape != (x.shape[0], len(TEXT_HEADER)):
            raise ValueError(f"{param_file}: expected {x.shape[0]} rows of {len(TEXT_HEADER)} "
                             f"values (one per sequence), got shape {table.shape}")
        params = dict(zip(PARAMS, table.T, strict=True))
    return make_dataset(x, dt, params, split=split, attrs={"source": str(directory)})


def _read_table(path: Path, skiprows: int = 0) -> np.ndarray:
    try:
        arr = np.loadtxt(path, dtype=np.float64, skiprows=skiprows, ndmin=1)
    except ValueError as e:
        raise ValueError(f"{path}: not a whitespace-separated table of numbers ({e})") from e
    if arr.size == 0:
        raise ValueError(f"{path} is empty")
    check_sequences(arr.reshape(arr.shape[0], -1), str(path))
    return arr
