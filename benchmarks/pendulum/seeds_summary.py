"""Five seeds of pendulum phys+nn+reg (beta = 10, reference budget): each run's best validation
loss and the test metrics of its best checkpoint, their mean and spread, and the run that the
validation loss alone would pick; then the same test metrics with the encoder's posterior
refined per sequence (``eval-test-refined``, written by ``physvae evaluate RUN --refine-steps
500 --out RUN/eval-test-refined``; for seed 0 by ``run.py``).

    cd benchmarks/pendulum && python seeds_summary.py

Reads the run directories (and their ``physvae evaluate`` output) made by the commands in
``results/run_2026-11-22.log`` (seed 0), ``results/beta10_seeds_full_budget.log`` (seeds 1, 2)
and ``results/seeds_3_4_full_budget.log`` (seeds 3, 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: seed -> (run directory, metrics of its best checkpoint on the test split)
RUNS = {0: ("out/phys+nn+reg", "out/phys+nn+reg/eval-test/metrics.json"),
        1: ("out_beta10_seeds/seed1", "out_beta10_seeds/seed1/eval-test-best/metrics.json"),
        2: ("out_beta10_seeds/seed2", "out_beta10_seeds/seed2/eval-test-best/metrics.json"),
        3: ("out_seeds/seed3", "out_seeds/seed3/eval-test-best/metrics.json"),
        4: ("out_seeds/seed4", "out_seeds/seed4/eval-test-best/metrics.json")}
MSE_TARGET, MAE_TARGET = 0.005, 0.15


def _summarise(label: str, seeds: list[int], mse: list[float], mae: list[float]) -> None:
    mse_a, mae_a = np.array(mse), np.array(mae)
    print(f"{label}: mean over seeds: MSE {mse_a.mean():.5f} (sd {mse_a.std(ddof=1):.5f}), "
          f"omega MAE {mae_a.mean():.3f} (sd {mae_a.std(ddof=1):.3f})")
    both = [s for s, a, b in zip(seeds, mse, mae, strict=True) if a <= MSE_TARGET and b <= MAE_TARGET]
    print(f"{label}: both targets (MSE <= {MSE_TARGET}, MAE <= {MAE_TARGET}): seeds {both}; "
          f"MSE alone: seeds {[s for s, a in zip(seeds, mse, strict=True) if a <= MSE_TARGET]}")


def main() -> None:
    seeds, val, mse, mae = [], [], [], []
    for seed, (run, metrics) in RUNS.items():
        m = json.loads(Path(metrics).read_text())
        history = torch.load(f"{run}/best.pt", weights_only=True)["history"]
        seeds.append(seed)
        val.append(min(r["val_loss"] for r in history))
        mse.append(m["recon_mse"])
        mae.append(m["omega"]["mae"])
        print(f"seed {seed}: best val loss {val[-1]:.1f} (epoch {m['checkpoint_epoch']}), "
              f"test MSE {mse[-1]:.5f}, omega MAE {mae[-1]:.3f}, corr {m['omega']['corr']:.3f}")
    _summarise("encoder", seeds, mse, mae)
    print("rank by validation loss:", [seeds[i] for i in np.argsort(val)],
          "; by test MSE:", [seeds[i] for i in np.argsort(mse)])
    i = int(np.argmin(val))
    print(f"run picked by validation loss among the five: seed {seeds[i]} "
          f"(test MSE {mse[i]:.5f}, omega MAE {mae[i]:.3f})")
    refined = {seed: Path(run) / "eval-test-refined" / "metrics.json" for seed, (run, _) in RUNS.items()}
    missing = [seed for seed, path in refined.items() if not path.is_file()]
    if missing:
        print(f"refined evaluations missing for seeds {missing}")
        return
    mse_r, mae_r = [], []
    for seed, path in refined.items():
        m = json.loads(path.read_text())
        mse_r.append(m["recon_mse"])
        mae_r.append(m["omega"]["mae"])
        print(f"seed {seed}, refined ({m['refine_steps']} steps): test MSE {mse_r[-1]:.5f}, "
              f"omega MAE {mae_r[-1]:.3f}, IWAE {m['iwae_log_likelihood']['mean']:.1f}")
    _summarise("refined", seeds, mse_r, mae_r)


if __name__ == "__main__":
    main()
