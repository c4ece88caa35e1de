"""Locomotion phys+nn+reg trained with different fixed-grid solvers: accuracy, energy drift, time.

    python benchmarks/locomotion/solvers.py [--runs benchmarks/locomotion/out_solvers]
        [--solvers heun3 rk4] [--data ../shared/data/locomotion] [--name solvers]

Reads the runs ``RUNS/<solver>`` (phys+nn+reg trained with ``physvae train --system locomotion
--setting phys+nn+reg --solver <solver> --threads 1 --seed 0`` at the reference budget) and
``RUNS/nn-only`` (the same for nn-only, the reconstruction baseline). Each run is evaluated on
the validation split with its best and its last checkpoint (``physvae evaluate``'s figures: the
reconstruction MSE, the share of the angles' variance that the physics-only part explains, the
learnt energy's relative drift over a cycle with the run's own solver). Then each phys+nn+reg
run's learnt energy is re-integrated with every other solver of the list, from the same
posterior-mean initial states and codes, to separate what the solver loses from what the
learnt energy is. Training time per epoch is the median over each run's history (training
loop only; the runs' load is what it was when they trained, so compare runs trained side by
side). Writes ``benchmarks/locomotion/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pyro_physvae.train import read_history

sys.path.insert(0, str(Path(__file__).parent))
from energy_by_solver import drifts  # noqa: E402
from run import evaluate_run  # noqa: E402

HERE = Path(__file__).parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "locomotion"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=HERE / "out_solvers")
    p.add_argument("--solvers", nargs="+", default=["heun3", "rk4"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--name", default="solvers", help="output file name, without suffix")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for checkpoint in ("best.pt", "last.pt"):
        nn_mse = evaluate_run(args.runs / "nn-only", args.data, "valid", checkpoint)["recon_mse"]
        rows.append({"run": "nn-only", "checkpoint": checkpoint, "recon_mse": nn_mse})
        for solver in args.solvers:
            run = args.runs / solver
            r = evaluate_run(run, args.data, "valid", checkpoint)
            times = [h["time_train"] for h in read_history(run)]
            rows.append({"run": solver, "checkpoint": checkpoint, "epoch": r["checkpoint_epoch"],
                         "recon_mse": r["recon_mse"], "mse_ratio": r["recon_mse"] / nn_mse,
                         "variance_explained": r["physics_variance_explained"],
                         "drift_median": r["energy_drift_median"], "drift_max": r["energy_drift_max"],
                         "solver": r["solver"], "s_per_epoch_train_median": float(np.median(times))})
            print(json.dumps(rows[-1]), flush=True)
    cross = {trained: {r["solver"]: {"median": r["relative_drift_median"], "max": r["relative_drift_max"]}
                       for r in drifts(args.runs / trained, args.data, [(m, 1) for m in args.solvers])}
             for trained in args.solvers}
    lines = ["| run | checkpoint (epoch) | valid MSE | MSE / nn-only | physics-only variance explained "
             "| energy drift, own solver (median / max) | training s/epoch (median) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["run"] == "nn-only":
            lines.append(f"| nn-only | {r['checkpoint']} | {r['recon_mse']:.4g} | 1 | | | |")
            continue
        lines.append(f"| {r['run']} | {r['checkpoint']} ({r['epoch']}) | {r['recon_mse']:.4g} | "
                     f"{r['mse_ratio']:.3f} | {r['variance_explained']:.3f} | "
                     f"{100 * r['drift_median']:.3f}% / {100 * r['drift_max']:.3f}% | "
                     f"{r['s_per_epoch_train_median']:.3f} |")
    lines += ["", "Learnt energy (last checkpoint) re-integrated with each solver, drift median / max:", "",
              "| trained with | " + " | ".join(args.solvers) + " |", "| --- " * (1 + len(args.solvers)) + "|"]
    for trained, by in cross.items():
        lines.append(f"| {trained} | " + " | ".join(f"{100 * d['median']:.3f}% / {100 * d['max']:.3f}%"
                                                     for d in by.values()) + " |")
    out = HERE / "results"
    (out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "cross_drift": cross}, indent=2))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
