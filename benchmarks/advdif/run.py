"""Advection-diffusion benchmark: the four settings at a fixed budget, evaluated on the test
split and rolled out far past the training window.

    python benchmarks/advdif/run.py [--epochs 2000] [--jobs 2]

Trains (or resumes, or reuses finished runs in ``--out``) on 1000 training sequences with batch
200, then for each setting writes, under ``benchmarks/advdif/results/``:

* ``results.json`` / ``results.md``: test reconstruction MSE, diffusion-coefficient MAE,
  correlation and 90% coverage, the extrapolation error (MSE and relative RMSE against the true
  advection-diffusion solution) at 200, 500 and 1000 steps, whether the roll-out blew up (the
  field's norm grew), and training time per epoch;
* ``extrapolation_error.png``: MSE against the number of steps rolled out, all settings;
* ``space_time_<setting>.png``: truth, model and error over 1000 steps for three sequences.

The reference budget is 20000 epochs; the default 2000 keeps the whole benchmark near an hour
on a 2-core machine. Time per epoch from these runs is measured with ``--jobs`` runs sharing
the machine; ``python benchmarks/speed.py --system advdif`` measures it alone.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from train_all import main as train_all  # noqa: E402

from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.evaluate import evaluate  # noqa: E402
from pyro_physvae.extrapolation import extrapolate, plot_error_by_step  # noqa: E402
from pyro_physvae.settings import SETTINGS  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HORIZONS = (50, 200, 500, 1000)


def evaluate_setting(out: Path, setting: str, n_extrapolate: int) -> tuple[dict, dict]:
    run = out / setting
    last = load_checkpoint(run / "last.pt")
    m = evaluate(run, out / "data", split="test", num_samples=100)
    ext = extrapolate(run, out / "data", split="test", n_steps=max(HORIZONS),
                      n_sequences=n_extrapolate, horizons=HORIZONS)
    shutil.copy(run / "extrapolate-test" / "space_time.png", RESULTS / f"space_time_{setting}.png")
    d = m.get("diffusion", {})
    row = {"setting": setting, "epochs": last["epoch"], "best_epoch": m["checkpoint_epoch"],
           "recon_mse": m["recon_mse"], "physics_only_mse": m.get("physics_only_mse"),
           "diffusion_mae": d.get("mae"), "diffusion_corr": d.get("corr"),
           "diffusion_coverage90": d.get("coverage90"),
           "iwae_log_likelihood": m["iwae_log_likelihood"]["mean"],
           "blowup": ext["blowup"],
           **{f"extrap_mse_{h}": ext["horizons"]["x_mean"][str(h)]["mse"] for h in HORIZONS},
           **{f"extrap_rel_rmse_{h}": ext["horizons"]["x_mean"][str(h)]["relative_rmse"] for h in HORIZONS},
           "max_norm_ratio": ext["horizons"]["x_mean"][str(max(HORIZONS))]["max_norm_ratio"],
           "s_per_epoch_median": float(np.median([r["time_epoch"] for r in last["history"]])),
           "s_per_epoch_train_median": float(np.median([r["time_train"] for r in last["history"]])),
           "torch_threads": last["torch_threads"]}
    return row, ext


def markdown(rows: list[dict]) -> str:
    f = lambda v, p=".3g": "n/a" if v is None else format(v, p)  # noqa: E731
    lines = ["| setting | test recon MSE | D MAE | D corr | D 90% coverage | extrap. MSE @200 | "
             "@500 | @1000 | rel. RMSE @1000 | norm grew | best epoch | s/epoch (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {f(r['recon_mse'])} | {f(r['diffusion_mae'], '.4f')} | "
                     f"{f(r['diffusion_corr'], '.3f')} | {f(r['diffusion_coverage90'], '.3f')} | "
                     f"{f(r['extrap_mse_200'])} | {f(r['extrap_mse_500'])} | {f(r['extrap_mse_1000'])} | "
                     f"{f(r['extrap_rel_rmse_1000'])} | {'yes' if r['blowup'] else 'no'} | "
                     f"{r['best_epoch']} | {r['s_per_epoch_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    n_extrapolate = 500
    if "--extrapolate-sequences" in argv:
        i = argv.index("--extrapolate-sequences")
        n_extrapolate = int(argv[i + 1])
        del argv[i:i + 2]
    if "--epochs" not in argv:
        argv = ["--epochs", "2000", *argv]
    args = train_all(["--system", "advdif", *argv])
    out = Path(args.out)
    RESULTS.mkdir(exist_ok=True)
    rows, curves = [], {}
    for setting in args.settings:
        row, ext = evaluate_setting(out, setting, n_extrapolate)
        rows.append(row)
        curves[setting] = ext["by_step"]["x_mean"]["mse"]
        print(json.dumps(row), flush=True)
    plot_error_by_step(curves, RESULTS / "extrapolation_error.png", train_steps=50)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "epochs": args.epochs, "jobs": args.jobs, "threads_per_job": args.threads,
            "extrapolated_sequences": n_extrapolate, "settings_order": list(SETTINGS)}
    (RESULTS / "results.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                      "extrapolation_mse_by_step": curves}, indent=2))
    table = markdown(rows)
    (RESULTS / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
