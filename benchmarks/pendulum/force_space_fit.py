"""Would a "least action" penalty on the in-ODE force bias omega less than R_ppc's penalty on the
trajectory? The force-space least-squares omega of each test sequence, against the truth.

    python benchmarks/pendulum/force_space_fit.py [--data benchmarks/pendulum/out/data]

R_ppc pulls the physics part towards the physics-only curve nearest to the data, whose omega is
low by 0.160 on average (``omega_bias.py --missing-physics``). A penalty on the net's force
along the trajectory would instead pull omega towards the least-squares fit of the Euler
acceleration ``(theta[t+2] - 2 theta[t+1] + theta[t]) / dt^2`` by ``-omega^2 sin(theta[t])``.
This prints that fit's error on the test split: noise-free re-simulations with the missing
physics switched on and off, and the noisy data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pyro_physvae.data.pendulum import forced_damped_pendulum

OMEGA_RANGE = (0.392, 3.53)


def force_fit(theta: np.ndarray, dt: float) -> np.ndarray:
    """Per sequence, the omega whose ``-omega^2 sin(theta)`` best fits the Euler acceleration."""
    accel = (theta[:, 2:] - 2 * theta[:, 1:-1] + theta[:, :-2]) / dt**2
    s = np.sin(theta[:, :-2])
    w2 = -(accel * s).sum(1) / (s * s).sum(1)
    return np.sqrt(np.clip(w2, OMEGA_RANGE[0] ** 2, OMEGA_RANGE[1] ** 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).parent / "out" / "data")
    args = p.parse_args()
    ds = xr.open_dataset(args.data / "test.nc")
    par = {k: torch.tensor(ds[k].values, dtype=torch.float64)
           for k in ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")}
    t = torch.tensor(ds["time"].values, dtype=torch.float64)
    dt, truth = float(t[1] - t[0]), ds["omega"].values
    for name, damped, forced in (("damped, forced", 1, 1), ("damped only", 1, 0), ("forced only", 0, 1),
                                 ("neither", 0, 0)):
        clean = forced_damped_pendulum(par["init"], par["omega"], par["damping"] * damped,
                                       par["forcing_amplitude"] * forced, par["forcing_frequency"], t)
        err = force_fit(clean.numpy(), dt) - truth
        print(f"force-space fit to clean {name:15s} mean err {err.mean():+.4f}  MAE {np.abs(err).mean():.4f}")
    err = force_fit(ds["x"].values.astype(np.float64), dt) - truth
    print(f"force-space fit to the noisy data       mean err {err.mean():+.4f}  MAE {np.abs(err).mean():.4f}")


if __name__ == "__main__":
    main()
