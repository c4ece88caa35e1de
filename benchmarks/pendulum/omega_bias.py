"""Where the pendulum's omega bias comes from.

    python benchmarks/pendulum/omega_bias.py [RUN] [--checkpoint best.pt] [--data DIR]
    python benchmarks/pendulum/omega_bias.py --missing-physics [--data DIR]

The trained phys+nn+reg model underestimates omega (mean error -0.07 to -0.27 rad/s over five
seeds, growing with the damping). This script separates what the data do from what
the model does, on the test split:

* the **least-squares physics-only fit**: for each sequence, the omega whose frictionless,
  unforced pendulum (from the sequence's first angle, at rest) is nearest to the data in
  squared error, over a grid of 311 values on [0.4, 3.5], for several solvers. This is where
  the "least action" regularizer R_ppc pulls the physics part, whatever the networks;
* for the run ``RUN`` (default ``benchmarks/pendulum/out_v2/phys+nn+reg``): the encoder's
  omega on the data, the encoder's omega on clean physics-only curves of the *true* omega
  (what R_DA,2 trains), the least-squares fit to the unmixed signal, and the decoder's error
  with the encoder's omega against the true omega (same auxiliary latents).

Each line gives the mean error, MAE, and the correlations of the error with the true omega
and the damping.

``--missing-physics`` asks which part of the missing physics biases the least-squares fit:
it re-simulates the test split's sequences without noise from their true parameters, as they
are and with the damping, the forcing or both switched off, and fits each set with the RK4
physics-only curve. No run is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pyro_physvae.data.io import load_split
from pyro_physvae.data.pendulum import forced_damped_pendulum
from pyro_physvae.evaluate import load_run
from pyro_physvae.models.pendulum import PendulumModel

HERE = Path(__file__).parent
GRID = torch.linspace(0.4, 3.5, 311)


def least_squares_omega(model: PendulumModel, init: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sequence, the grid omega whose physics-only curve is nearest to ``target (N, T)``."""
    with torch.no_grad():
        err = torch.stack([(model.physics_only(init, torch.full_like(init, float(w))) - target)
                           .pow(2).mean(-1) for w in GRID])
    return GRID[err.argmin(0)]


def report(name: str, estimate: torch.Tensor, truth: np.ndarray, damping: np.ndarray) -> None:
    err = estimate.numpy() - truth
    print(f"{name:48s} mean err {err.mean():+.4f}  MAE {np.abs(err).mean():.4f}  "
          f"r(err, omega) {np.corrcoef(err, truth)[0, 1]:+.2f}  "
          f"r(err, damping) {np.corrcoef(err, damping)[0, 1]:+.2f}", flush=True)


def missing_physics(ds: xr.Dataset) -> None:
    """Least-squares fits (RK4) to noise-free re-simulations of ``ds`` with parts switched off."""
    params = {k: torch.tensor(ds[k].values, dtype=torch.float64)
              for k in ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")}
    t = torch.tensor(ds["time"].values, dtype=torch.float64)
    truth, damping = ds["omega"].values, ds["damping"].values
    model = PendulumModel("phys-only", method="rk4")
    for name, keep_damping, keep_forcing in (("damped, forced", True, True),
                                             ("damped only", True, False),
                                             ("forced only", False, True),
                                             ("neither", False, False)):
        xi = params["damping"] * keep_damping
        amplitude = params["forcing_amplitude"] * keep_forcing
        clean = forced_damped_pendulum(params["init"], params["omega"], xi, amplitude,
                                       params["forcing_frequency"], t).float()
        report(f"least-squares fit (rk4) to clean {name}",
               least_squares_omega(model, clean[:, 0], clean), truth, damping)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=str(HERE / "out_v2" / "phys+nn+reg"))
    p.add_argument("--checkpoint", default="best.pt")
    p.add_argument("--data", default=str(HERE / "out" / "data"))
    p.add_argument("--missing-physics", action="store_true",
                   help="only split the least-squares bias between damping and forcing")
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = load_split(args.data, "test", system="pendulum")
    x = torch.tensor(ds["x"].values, dtype=torch.float32)
    init = x[:, 0]
    truth, damping = ds["omega"].values, ds["damping"].values
    print(f"test split of {args.data}: {len(truth)} sequences")
    if args.missing_physics:
        missing_physics(ds)
        return
    for method, substeps in (("euler", 1), ("euler", 4), ("midpoint", 1), ("rk4", 1)):
        model = PendulumModel("phys-only", method=method, substeps=substeps)
        report(f"least-squares physics-only fit ({method} x{substeps})",
               least_squares_omega(model, init, x), truth, damping)

    run = load_run(args.run, args.checkpoint)
    model, guide = run.model, run.guide
    print(f"run {args.run} ({args.checkpoint}, epoch {run.checkpoint['epoch']}, solver {model.method})")
    omega_true = torch.tensor(truth, dtype=torch.float32)
    with torch.no_grad():
        h = guide.features(x)
        locs = {site: getattr(guide, attr)(h)[0] for site, attr in guide.aux_encoders.items()}
        unmixed = guide.unmix(x, locs)
        omega_enc = guide.omega_posterior(unmixed)[0]
        omega_clean = guide.omega_posterior(model.physics_only(init, omega_true))[0]
        mse_enc = (model.decode(init, omega_enc, locs["z_A1"], locs["z_A2"])["x_mean"] - x).pow(2).mean()
        mse_true = (model.decode(init, omega_true, locs["z_A1"], locs["z_A2"])["x_mean"] - x).pow(2).mean()
    report("encoder mean on the data", omega_enc, truth, damping)
    report("encoder mean on clean physics of the true omega", omega_clean, truth, damping)
    report(f"least-squares physics-only fit to the unmixed ({model.method})",
           least_squares_omega(model, init, unmixed), truth, damping)
    print(f"decoder MSE with the encoder's omega {float(mse_enc):.5f}, "
          f"with the true omega (same z_A1, z_A2) {float(mse_true):.5f}")


if __name__ == "__main__":
    main()
