"""Locomotion benchmark on the real gait recordings: nn-only against phys+nn+reg.

    python benchmarks/locomotion/run.py [--data ../shared/data/locomotion] [--epochs 3000] [--jobs 2]

Trains (or resumes, or reuses finished runs in ``--out``, default ``benchmarks/locomotion/out``)
at the reference budget, 3000 epochs with batch 100 on the 400 training recordings, read in
place from ``--data``; the checkpoint with the best validation loss is kept. Each run is then
evaluated on every held-out split present in ``--data`` (``valid``; also ``test`` where it
exists), with the best and with the last checkpoint, and ``benchmarks/locomotion/results/``
receives:

* ``results.json`` / ``results.md``: reconstruction MSE, the MSE ratio to nn-only, the share
  of the angles' variance that the physics-only part explains (1 - SSE / SST, SST about each
  joint's mean), the learnt energy's relative drift over a cycle with the model's solver,
  the strongest correlation of a latent with walking speed and with cadence, and the training
  time per epoch;
* ``reconstructions_<setting>_<split>.png``: joint angles with posterior-predictive bands and
  the physics-only part;
* ``<setting>_<split>_metrics.json``: everything ``physvae evaluate`` reports.

The validation split also selects the checkpoint, so its figures for the best checkpoint are
slightly optimistic; the last checkpoint's are not selected on it.
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "locomotion"
SETTINGS = ("nn-only", "phys+nn+reg")


def evaluate_run(run: Path, data: Path, split: str, checkpoint: str) -> dict:
    m = evaluate(run, data, split=split, num_samples=100, checkpoint=checkpoint,
                 out_dir=run / f"eval-{split}-{checkpoint.removesuffix('.pt')}")
    corr = m.get("latent_correlations", {})
    energy = m.get("energy", {})
    return {"recon_mse": m["recon_mse"], "physics_only_mse": m.get("physics_only_mse"),
            "physics_variance_explained": m.get("physics_only_variance_explained"),
            "energy_drift_median": energy.get("relative_drift_median"),
            "energy_drift_max": energy.get("relative_drift_max"),
            "solver": energy.get("solver"), "step": energy.get("step"),
            "speed_strongest": corr.get("speed", {}).get("strongest"),
            "speed_r": corr.get("speed", {}).get("strongest_r"),
            "cadence_strongest": corr.get("cadence", {}).get("strongest"),
            "cadence_r": corr.get("cadence", {}).get("strongest_r"),
            "iwae_log_likelihood": m["iwae_log_likelihood"]["mean"],
            "checkpoint_epoch": m["checkpoint_epoch"], "metrics": m}


def markdown(rows: list[dict]) -> str:
    f = lambda v, p=".3g": "n/a" if v is None else format(v, p)  # noqa: E731
    lines = ["| setting | split | checkpoint (epoch) | recon MSE | MSE / nn-only | physics-only "
             "variance explained | energy drift (median / max) | strongest latent r: speed | "
             "cadence | s/epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        drift = ("n/a" if r["energy_drift_median"] is None
                 else f"{r['energy_drift_median']:.2e} / {r['energy_drift_max']:.2e}")
        lines.append(
            f"| {r['setting']} | {r['split']} | {r['checkpoint']} ({r['checkpoint_epoch']}) | "
            f"{f(r['recon_mse'], '.4g')} | {f(r['mse_ratio'], '.3f')} | "
            f"{f(r['physics_variance_explained'], '.3f')} | {drift} | "
            f"{f(r['speed_r'], '.2f')} ({r['speed_strongest']}) | "
            f"{f(r['cadence_r'], '.2f')} ({r['cadence_strongest']}) | {r['s_per_epoch_median']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    args, rest = p.parse_known_args()
    data = Path(args.data)
    if not (data / "train.npy").is_file() and not (data / "data_train.mat").is_file():
        raise SystemExit(f"no gait recordings in {data}: pass --data DIR (see the README)")
    targs = train_all(["--system", "locomotion", "--data", str(data), "--settings", *SETTINGS, *rest])
    out = Path(targs.out)
    RESULTS.mkdir(exist_ok=True)
    splits = [s for s in ("valid", "test") if (data / f"{s}.npy").is_file()
              or (data / f"data_{s}.mat").is_file()]
    rows = []
    for split in splits:
        for checkpoint in ("best.pt", "last.pt"):
            nn_mse = None
            for setting in SETTINGS:
                run = out / setting
                last = load_checkpoint(run / "last.pt")
                times = {k: float(np.median([h[k] for h in last["history"]]))
                         for k in ("time_epoch", "time_train")}
                r = evaluate_run(run, data, split, checkpoint)
                nn_mse = r["recon_mse"] if setting == "nn-only" else nn_mse
                metrics = r.pop("metrics")
                name = f"{setting}_{split}_{checkpoint.removesuffix('.pt')}"
                (RESULTS / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2))
                shutil.copy(run / f"eval-{split}-{checkpoint.removesuffix('.pt')}" / "reconstructions.png",
                            RESULTS / f"reconstructions_{name}.png")
                r.update({"setting": setting, "split": split, "checkpoint": checkpoint,
                          "mse_ratio": r["recon_mse"] / nn_mse if nn_mse else None,
                          "epochs": last["epoch"],
                          "s_per_epoch_median": times["time_epoch"],
                          "s_per_epoch_train_median": times["time_train"],
                          "torch_threads": last["torch_threads"]})
                rows.append(r)
                print(json.dumps(r), flush=True)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "data": str(data),
            "epochs": targs.epochs, "batch_size": targs.batch_size, "jobs": targs.jobs,
            "threads_per_job": targs.threads}
    (RESULTS / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows)
    (RESULTS / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
