"""Energy drift of a trained locomotion run's learnt H under other solvers and steps.

    python benchmarks/locomotion/energy_by_solver.py [RUN] [--data DIR] [--split valid]
        [--checkpoint last.pt] [--three-stage]

The run's own solver made its physics-only trajectories; this re-integrates the same
posterior-mean initial states and energy codes with other fixed-step solvers and sub-steps
and reports the relative drift of H over the cycle (median and maximum over sequences), to
separate what the integrator loses from what the learnt energy is.

``--three-stage`` adds the classical four-stage Runge-Kutta method (torchdiffeq's ``rk4`` is the
3/8 rule) and three-stage third-order methods besides the library's ``heun3``, Ralston's,
Kutta's and the strong-stability-preserving one: candidates for a solve a quarter cheaper than
``rk4``, whose tableaus this script adds to :data:`pyro_physvae.ode.TABLEAUS` for its own run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_physvae.evaluate import load_run
from pyro_physvae.ode import TABLEAUS

HERE = Path(__file__).parent
#: Candidate tableaus, ``(c_i, a_ij)`` per stage and the weights ``b``, as in TABLEAUS.
CANDIDATES = {
    "ralston3": (((0.0, ()), (0.5, (0.5,)), (0.75, (0.0, 0.75))), (2 / 9, 1 / 3, 4 / 9)),
    "kutta3": (((0.0, ()), (0.5, (0.5,)), (1.0, (-1.0, 2.0))), (1 / 6, 2 / 3, 1 / 6)),
    "ssprk3": (((0.0, ()), (1.0, (1.0,)), (0.5, (0.25, 0.25))), (1 / 6, 1 / 6, 2 / 3)),
    "rk4_classic": (((0.0, ()), (0.5, (0.5,)), (0.5, (0.0, 0.5)), (1.0, (0.0, 0.0, 1.0))),
                    (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def drifts(run_dir: str | Path, data: str | Path, solvers: list[tuple[str, int]], *, split: str = "valid",
           checkpoint: str = "last.pt") -> list[dict]:
    """The relative energy drift over a cycle (median and maximum over the split's sequences) of
    ``run_dir``'s learnt energy, re-integrated from the encoder's posterior-mean initial states
    and codes with each ``(method, substeps)`` of ``solvers``."""
    run = load_run(run_dir, checkpoint)
    x = run.system.observations(run.load(split, str(data)))
    with torch.no_grad():
        latents = run.guide(x)  # one draw; the means follow below
        h = run.guide.features(x)
        y0 = run.guide.y0_head(h)[0]
        z = run.guide.z_P_head(h)[0] if "z_P" in latents else None
    rows = []
    for method, substeps in solvers:
        run.model.method, run.model.substeps = method, substeps
        rel = run.model.energy_drift(y0, z)["relative"]
        rows.append({"solver": method, "substeps": substeps, "step": run.model.dt / substeps,
                     "relative_drift_median": float(rel.median()), "relative_drift_max": float(rel.max())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", nargs="?", default=str(HERE / "out" / "phys+nn+reg"))
    p.add_argument("--data", default=str(HERE.parents[1].parent / "shared" / "data" / "locomotion"))
    p.add_argument("--split", default="valid")
    p.add_argument("--checkpoint", default="last.pt")
    p.add_argument("--three-stage", action="store_true", help="also the candidate tableaus (see above)")
    args = p.parse_args()
    torch.set_num_threads(1)
    solvers = [("euler", 1), ("midpoint", 1), ("midpoint", 2), ("midpoint", 4), ("heun3", 1), ("rk4", 1)]
    if args.three_stage:
        TABLEAUS.update(CANDIDATES)
        solvers += [(name, 1) for name in CANDIDATES]
    for row in drifts(args.run, args.data, solvers, split=args.split, checkpoint=args.checkpoint):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
