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
from pyro_physvae.data.reference import (
    check_count,
    check_float32_range,
    check_split,
    positive_number,
    read_args_json,
    read_text_table,
    read_true_params,
)
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
# The reference generator's files are read with the helpers of pyro_physvae.data.reference.
#: Time step [s] of the paper's pendulum data (makedata.sh), used when no ``dt`` is given and
#: no ``args_<split>.json`` records one.
REFERENCE_DT = 0.05


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
    params, attrs = read_true_params(directory, split, x.shape[0], data_file, args_file, TEXT_HEADER,
                                     PARAMS, require_params)
    return make_dataset(x, dt, params, split=split, attrs=attrs)
