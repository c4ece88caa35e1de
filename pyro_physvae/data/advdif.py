"""Advection-diffusion data: the paper's generator and the reference ``.npy`` format.

Truth: ``u_t = D u_xx - c u_x`` on ``n_grid`` points ``x_i = i dx`` (zero just outside the
grid), discretised by second-order central differences and solved accurately (dopri5,
float64). Initial profile ``a sin(pi x / x_max)`` with ``x_max = (n_grid - 1) dx``. Each
sequence has its own amplitude ``a``, diffusion coefficient ``D`` and advection velocity
``c``; observations every ``dt`` with Gaussian noise. Ranges follow the reference work.

Data sets hold ``x`` with dims ``(sequence, space, time)`` and the true ``amplitude``,
``diffusion`` and ``advection`` over ``sequence``.
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
from pyro_physvae.data.reference import (
    check_count,
    check_float32_range,
    check_split,
    positive_number,
    read_args_json,
    read_npy_array,
    read_true_params,
)
from pyro_physvae.pde import central_difference_matrix, second_difference_matrix
from pyro_physvae.validation import check_positive_int, check_sequences

SYSTEM = "advdif"
#: True parameters, in the order of the reference ``true_params_<split>.txt`` columns.
PARAMS = ("amplitude", "diffusion", "advection")
TEXT_HEADER = ("init_mag", "dcoeff", "ccoeff")
UNITS = {"amplitude": "1", "diffusion": "length^2/s", "advection": "length/s", "x": "1",
         "space": "length", "time": "s"}


@dataclass(frozen=True)
class AdvDifDataConfig:
    """Sizes, grid and parameter ranges of the generated data (defaults: the paper's)."""

    n_train: int = 1000
    n_valid: int = 500
    n_test: int = 1000
    n_grid: int = 20
    n_steps: int = 50
    dx: float = 0.1
    dt: float = 0.02
    noise_std: float = 1e-3
    amplitude: tuple[float, float] = (0.5, 1.5)
    diffusion: tuple[float, float] = (0.01, 0.1)
    advection: tuple[float, float] = (0.01, 0.1)

    def __post_init__(self) -> None:
        check_data_config(self, positive=("dx", "dt"), ranges=PARAMS)
        if check_positive_int(self.n_grid, "n_grid") < 3:
            raise ValueError(f"n_grid must be at least 3, got {self.n_grid}")
        if self.diffusion[0] < 0:
            raise ValueError(f"diffusion coefficients must be >= 0, got range {self.diffusion}")


def grid(n_grid: int, dx: float) -> np.ndarray:
    """Grid points ``0, dx, ..., (n_grid - 1) dx``."""
    return np.arange(n_grid) * dx


def initial_profile(amplitude: torch.Tensor, n_grid: int, dx: float) -> torch.Tensor:
    """``(N, n_grid)`` profiles ``a sin(pi x / x_max)`` for amplitudes ``a (N,)``."""
    x = torch.as_tensor(grid(n_grid, dx), dtype=amplitude.dtype)
    return amplitude[:, None] * torch.sin(torch.pi * x / x[-1])


def advection_diffusion(u0: torch.Tensor, diffusion: torch.Tensor, advection: torch.Tensor,
                        t: torch.Tensor, dx: float) -> torch.Tensor:
    """Accurate solutions ``(N, n_grid, T)`` of ``u_t = D u_xx - c u_x`` (dopri5, float64).

    Args:
        u0: initial fields ``(N, n_grid)``.
        diffusion, advection: ``(N,)`` coefficients D and c.
        t: ``(T,)`` output times starting at 0 [s].
        dx: grid spacing.
    """
    u0 = u0.to(torch.float64)
    n = u0.shape[-1]
    lap = second_difference_matrix(n, dx, dtype=torch.float64)
    grad = central_difference_matrix(n, dx, dtype=torch.float64)
    d = diffusion.to(torch.float64)[:, None]
    c = advection.to(torch.float64)[:, None]

    def rhs(_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return d * (u @ lap.T) - c * (u @ grad.T)

    us = odeint(rhs, u0, t.to(torch.float64), method="dopri5", rtol=1e-10, atol=1e-12)
    return us.permute(1, 2, 0).contiguous()


def generate_split(n: int, config: AdvDifDataConfig, generator: torch.Generator,
                   split: str = "train") -> xr.Dataset:
    """One split of ``n`` noisy space-time fields with their true parameters."""
    params = {name: uniform_draws(getattr(config, name), n, generator) for name in PARAMS}
    t = torch.arange(config.n_steps, dtype=torch.float64) * config.dt
    u0 = initial_profile(params["amplitude"], config.n_grid, config.dx)
    clean = advection_diffusion(u0, params["diffusion"], params["advection"], t, config.dx)
    noise = config.noise_std * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    return make_dataset((clean + noise).numpy(), config.dx, config.dt,
                        {k: v.numpy() for k, v in params.items()}, split=split,
                        attrs={"noise_std": config.noise_std})


def generate(config: AdvDifDataConfig = AdvDifDataConfig(), seed: int = 0) -> dict[str, xr.Dataset]:
    """All three splits, reproducible from ``seed``."""
    return generate_splits(config, seed, generate_split)


def make_dataset(x: np.ndarray, dx: float, dt: float, params: dict[str, np.ndarray] | None = None,
                 *, split: str = "", attrs: dict | None = None) -> xr.Dataset:
    """Wrap fields ``x (N, n_grid, T)`` and optional true parameters ``(N,)`` in a Dataset."""
    check_sequences(x, "x", rank=3)
    for name, value in (("dx", dx), ("dt", dt)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    n, n_grid, n_steps = x.shape
    data_vars = {"x": (("sequence", "space", "time"), np.asarray(x, dtype=np.float32),
                       {"units": UNITS["x"], "long_name": "observed field u"})}
    for name, values in (params or {}).items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"true parameter {name!r} must have shape ({n},), got {values.shape}")
        data_vars[name] = (("sequence",), values, {"units": UNITS.get(name, "")})
    coords = {"sequence": np.arange(n),
              "space": ("space", grid(n_grid, dx), {"units": UNITS["space"]}),
              "time": ("time", np.arange(n_steps) * dt, {"units": "s"})}
    return xr.Dataset(data_vars, coords, attrs={"system": SYSTEM, "split": split, "dx": float(dx),
                                                "dt": float(dt), **(attrs or {})})


#: The reference generator's column names of ``true_params_<split>.txt``, in its order,
#: mapped to the data-set variable names (which a header may use as well).


def load_reference_npy(directory: str | os.PathLike, split: str, *, dx: float | None = None,
                       dt: float | None = None, require_params: bool | None = None) -> xr.Dataset:
    """Read the reference generator's advection-diffusion files for ``split``.

    The generator (n-takeishi/phys-vae, data/advdif/generate.py) writes
    ``data_<split>.npy`` (``np.save`` of a float64 array ``(N, n_grids, len_episode)``),
    ``args_<split>.json`` (its options: ``dx``, ``dt``, ``n_grids``, ``len_episode``, ...) and
    ``true_params_<split>.txt`` (``np.savetxt`` with ``header="init_mag dcoeff ccoeff"``,
    i.e. a first line ``# init_mag dcoeff ccoeff``; without a header the columns are taken in
    that order; our variable names are accepted in the header too, further columns ignored).

    Args:
        directory: the folder holding the files.
        split: ``train``, ``valid`` or ``test``.
        dx, dt: grid spacing and time step [s]; given here they take precedence over
            ``args_<split>.json``, which is then needed only for what is not given.
        require_params: whether ``true_params_<split>.txt`` must be there; default: where
            ``args_<split>.json`` is (the generator writes both).

    Raises:
        FileNotFoundError: ``data_<split>.npy``, or a companion file that is needed, is missing.
        ValueError: naming the file and the problem, for any malformed file.
    """
    directory = Path(directory)
    check_split(split, directory)
    data_file = directory / f"data_{split}.npy"
    if not data_file.is_file():
        raise FileNotFoundError(f"data file not found: {data_file} (the reference generator's "
                                f"data_<split>.npy, fields (N, n_grid, T))")
    x = read_npy_array(data_file, "fields (N, n_grid, T)")
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"{data_file}: expected an array (N, n_grid, T), got shape {x.shape}")
    if x.shape[1] < 3:
        raise ValueError(f"{data_file}: expected an array (N, n_grid, T) with n_grid >= 3, got "
                         f"shape {x.shape}")
    check_sequences(x, str(data_file), rank=3)
    check_float32_range(x, data_file)
    args_file = directory / f"args_{split}.json"
    args = read_args_json(args_file) if args_file.is_file() else {}
    grid: dict[str, float] = {}
    for name, given in (("dx", dx), ("dt", dt)):
        if name in args:  # checked even where a given value takes precedence
            grid[name] = positive_number(args[name], name, args_file)
        if given is not None:
            grid[name] = positive_number(given, name, "load_reference_npy")
        elif name not in grid and not args_file.is_file():
            raise FileNotFoundError(f"{args_file} not found: it holds the grid spacing 'dx' and the "
                                    f"time step 'dt' of the data; pass dx= and dt= (--dx, --dt)")
        elif name not in grid:
            raise ValueError(f"{args_file} has no {name!r}: expected the reference generator's "
                             f"options with the grid spacing 'dx' and time step 'dt' (or pass "
                             f"dx= and dt=)")
    check_count(args, "n_grids", x.shape[1], args_file, f"{data_file.name} has grids of")
    check_count(args, "len_episode", x.shape[2], args_file, f"{data_file.name} has sequences of")
    params, attrs = read_true_params(directory, split, x.shape[0], data_file, args_file, TEXT_HEADER,
                                     PARAMS, require_params)
    return make_dataset(x, grid["dx"], grid["dt"], params, split=split, attrs=attrs)


def true_fields(ds: xr.Dataset, n_steps: int) -> torch.Tensor:
    """Noise-free truth ``(N, n_grid, n_steps)`` of a data set's sequences from their true
    ``amplitude``, ``diffusion`` and ``advection`` (float64), on the data set's grid and
    time step; ``n_steps`` may run far past the observed window."""
    missing = [p for p in PARAMS if p not in ds]
    if missing:
        raise ValueError(f"the data set lacks the true parameters {missing}: its truth is unknown")
    check_positive_int(n_steps, "n_steps")
    dx, dt = float(ds.attrs["dx"]), float(ds.attrs["dt"])
    params = {p: torch.as_tensor(ds[p].values, dtype=torch.float64) for p in PARAMS}
    u0 = initial_profile(params["amplitude"], int(ds.sizes["space"]), dx)
    t = torch.arange(n_steps, dtype=torch.float64) * dt
    return advection_diffusion(u0, params["diffusion"], params["advection"], t, dx)
