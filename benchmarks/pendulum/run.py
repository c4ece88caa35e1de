"""Pendulum benchmark: all four settings at the reference budget, evaluated on the test split.

    python benchmarks/pendulum/run.py [--jobs 2]

Trains (or resumes, or reuses finished runs in ``--out``) with 5000 epochs, batch 200 and 1000
training sequences, then writes ``results.json`` and a Markdown table ``results.md`` with test
reconstruction MSE, omega MAE / correlation / 90% coverage, and training time per epoch.
Each run is evaluated twice: with the encoder's posterior (the table's main columns), and with
that posterior refined per test sequence for ``REFINE_STEPS`` SVI steps with the trained model
fixed (``physvae evaluate --refine-steps``; the "refined" columns).
Time per epoch in a run with ``--jobs 2`` is measured with two runs sharing the machine;
``speed.py`` measures it alone.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from train_all import main as train_all  # noqa: E402

from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.evaluate import evaluate  # noqa: E402
from pyro_physvae.settings import SETTINGS  # noqa: E402

#: Per-sequence refinement steps of the second evaluation (near convergence on this data).
REFINE_STEPS = 500


def main() -> None:
    out = Path(train_all(["--system", "pendulum", *sys.argv[1:]]).out)
    rows = []
    for setting in SETTINGS:
        run = out / setting
        last = load_checkpoint(run / "last.pt")
        times = [r["time_epoch"] for r in last["history"]]
        m = evaluate(run, out / "data", split="test", num_samples=100)
        refined = evaluate(run, out / "data", split="test", num_samples=100,
                           out_dir=run / "eval-test-refined", refine_steps=REFINE_STEPS)
        om, om_refined = m.get("omega", {}), refined.get("omega", {})
        rows.append({"setting": setting, "epochs": last["epoch"], "best_epoch": m["checkpoint_epoch"],
                     "recon_mse": m["recon_mse"], "physics_only_mse": m.get("physics_only_mse"),
                     "omega_mae": om.get("mae"), "omega_corr": om.get("corr"),
                     "omega_coverage90": om.get("coverage90"),
                     "iwae_log_likelihood": m["iwae_log_likelihood"]["mean"],
                     "refine_steps": REFINE_STEPS, "recon_mse_refined": refined["recon_mse"],
                     "omega_mae_refined": om_refined.get("mae"),
                     "iwae_log_likelihood_refined": refined["iwae_log_likelihood"]["mean"],
                     "s_per_epoch_median": float(np.median(times)),
                     "torch_threads": last["torch_threads"]})
    meta = {"date": date.today().isoformat(), "machine": platform.platform(),
            "cpu_count": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| setting | test recon MSE | physics-only MSE | omega MAE | omega corr | "
             "omega 90% coverage | IWAE log-lik | best epoch | s/epoch (median) | "
             f"refined ({REFINE_STEPS} steps): recon MSE | omega MAE | IWAE log-lik |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v, p=".4g": "n/a" if v is None else format(v, p)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['setting']} | {f(r['recon_mse'])} | {f(r['physics_only_mse'])} | "
                     f"{f(r['omega_mae'], '.3f')} | {f(r['omega_corr'], '.3f')} | "
                     f"{f(r['omega_coverage90'], '.3f')} | {r['iwae_log_likelihood']:.1f} | "
                     f"{r['best_epoch']} | "
                     f"{r['s_per_epoch_median']:.3f} | {f(r['recon_mse_refined'])} | "
                     f"{f(r['omega_mae_refined'], '.3f')} | {r['iwae_log_likelihood_refined']:.1f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
