"""Energy drift of a trained locomotion run's learnt H under other solvers and steps.

    python benchmarks/locomotion/energy_by_solver.py [RUN] [--data DIR] [--split valid]

The run's own solver made its physics-only trajectories; this re-integrates the same
posterior-mean initial states and energy codes with other fixed-step solvers and sub-steps
and reports the relative drift of H over the cycle (median and maximum over sequences), to
separate what the integrator loses from what the learnt energy is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_physvae.evaluate import load_run

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", nargs="?", default=str(HERE / "out" / "phys+nn+reg"))
    p.add_argument("--data", default=str(HERE.parents[1].parent / "shared" / "data" / "locomotion"))
    p.add_argument("--split", default="valid")
    p.add_argument("--checkpoint", default="last.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run, args.checkpoint)
    x = run.system.observations(run.load(args.split, args.data))
    with torch.no_grad():
        latents = run.guide(x)  # one draw; the means follow below
        h = run.guide.features(x)
        y0 = run.guide.y0_head(h)[0]
        z = run.guide.z_P_head(h)[0] if "z_P" in latents else None
    rows = []
    for method, substeps in (("euler", 1), ("midpoint", 1), ("midpoint", 2), ("midpoint", 4), ("rk4", 1)):
        run.model.method, run.model.substeps = method, substeps
        rel = run.model.energy_drift(y0, z)["relative"]
        rows.append({"solver": method, "substeps": substeps, "step": run.model.dt / substeps,
                     "relative_drift_median": float(rel.median()), "relative_drift_max": float(rel.max())})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
