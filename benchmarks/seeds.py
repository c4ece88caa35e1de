"""Spread over training seeds: phys+nn+reg trained with several seeds on the same data.

    python benchmarks/seeds.py --system advdif [--seeds 0 1 2 3 4] [--epochs E] [--jobs 2]
                               [--lr-schedule cosine] [--name NAME]

For each seed, trains phys+nn+reg on the system's benchmark data (generated once with data
seed 0, the data of ``benchmarks/<system>/run.py``; the training seed alone changes), at the
system's benchmark budget unless ``--epochs`` says otherwise, then evaluates the
best-validation checkpoint on the test split with the default ``evaluate`` (calibrated
intervals, fitted on the validation split). Finished runs are kept and partial ones resume, so
the command can be run again after an interruption. Seeds train ``--jobs`` at a time, one
torch thread each.

Writes ``benchmarks/<system>/results/seeds.{json,md}`` (``seeds_cosine.{json,md}`` with
``--lr-schedule cosine``, whose runs go to ``out_seeds_cosine``; ``--name`` names the files
instead, so that a run over some seeds does not replace the summary of others): per seed the
test reconstruction MSE, each physics parameter's MAE (also debiased by the validation split's bias, see
``pyro_physvae.report.debiased_errors``), correlation, calibrated and raw 90% coverage, and the IWAE
log-likelihood; then the mean, median and worst over the seeds (worst: the largest error, the
smallest correlation, the coverage furthest from 0.9).

Budgets (the benchmark's, not always the reference's): pendulum 5000 epochs (the reference),
advection-diffusion 2000 (a tenth of the reference), galaxy 175 epochs at 35 x 35 pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "galaxy"))
from train_all import ensure_data, train_one  # noqa: E402

from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.evaluate import evaluate  # noqa: E402
from pyro_physvae.train import LR_SCHEDULES  # noqa: E402

SETTING = "phys+nn+reg"
BUDGET = {"pendulum": 5000, "advdif": 2000, "galaxy": 175}
EVAL = {"pendulum": {"num_samples": 100, "iwae_particles": 50},
        "advdif": {"num_samples": 100, "iwae_particles": 50},
        "galaxy": {"num_samples": 20, "iwae_particles": 10}}


def benchmark_data(system: str) -> Path:
    """The system's benchmark data directory, written (data seed 0) if missing."""
    data = HERE / system / "out" / "data"
    if system == "galaxy":
        from run import ensure_data as ensure_galaxy  # benchmarks/galaxy/run.py

        ensure_galaxy(data, argparse.Namespace(n_train=1000, n_valid=200, n_test=500,
                                               image_size=35, seed=0))
    else:
        ensure_data(data, 0, system)
    return data


def parameter_rows(metrics: dict) -> dict[str, dict]:
    """Each physics parameter's figures from an evaluation's metrics."""
    keys = ("mae", "mae_debiased", "corr", "coverage90", "coverage90_raw", "interval_width",
            "median_abs_error_deg", "mae_deg")
    return {name: {k: m[k] for k in keys if k in m}
            for name, m in metrics.items() if isinstance(m, dict) and "mae" in m and "coverage90" in m}


def earlier_evaluation(run: Path, system: str) -> dict | None:
    """The metrics of an earlier evaluation of the run's best checkpoint with the same
    settings (``run/eval-test/metrics.json``), so that summarising seeds trained in separate
    processes does not evaluate them again; ``None`` if there is none."""
    path = run / "eval-test" / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    same = (m.get("checkpoint_epoch") == load_checkpoint(run / "best.pt")["epoch"]
            and m.get("num_samples") == EVAL[system]["num_samples"] and m.get("refine_steps") == 0
            and os.path.getmtime(path) > os.path.getmtime(run / "best.pt"))
    return m if same else None


def train_and_evaluate(system: str, seed: int, data: str, out: str, epochs: int,
                       lr_schedule: str = "constant") -> dict:
    """Train one seed (or resume it), evaluate its best checkpoint; the seed's row."""
    run_dir = Path(out) / f"seed{seed}"
    config = {"epochs": epochs, "batch_size": 200, "seed": seed, "threads": 1,
              "checkpoint_every": max(1, epochs // 20), "lr_schedule": lr_schedule}
    t0 = time.perf_counter()
    train_one(system, SETTING, data, str(run_dir), config)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    m = earlier_evaluation(run_dir / SETTING, system) or evaluate(run_dir / SETTING, data, split="test",
                                                                  **EVAL[system])
    history = load_checkpoint(run_dir / SETTING / "last.pt")["history"]
    return {"seed": seed, "best_epoch": m["checkpoint_epoch"], "recon_mse": m["recon_mse"],
            "iwae_log_likelihood": m["iwae_log_likelihood"]["mean"],
            "predictive_coverage90": m.get("predictive_coverage90"),
            "parameters": parameter_rows(m), "train_seconds_this_call": train_s,
            "eval_seconds": time.perf_counter() - t0,
            "s_per_epoch_median": float(np.median([r["time_epoch"] for r in history]))}


def spread(rows: list[dict]) -> dict[str, dict]:
    """Mean, median and worst over seeds of every figure in the rows."""
    def stats(values: list[float], worst) -> dict:
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "median": float(np.median(v)), "worst": float(worst(v)),
                "min": float(v.min()), "max": float(v.max())}

    out = {"recon_mse": stats([r["recon_mse"] for r in rows], np.max),
           "iwae_log_likelihood": stats([r["iwae_log_likelihood"] for r in rows], np.min)}
    for name in rows[0]["parameters"]:
        for key in rows[0]["parameters"][name]:
            if any(key not in r["parameters"][name] for r in rows):
                continue  # e.g. a figure that an earlier version's evaluation lacks
            vals = [r["parameters"][name][key] for r in rows]
            worst = (np.min if key == "corr" else
                     (lambda v: v[np.argmax(np.abs(v - 0.9))]) if key.startswith("coverage") else np.max)
            out[f"{name}_{key}"] = stats(vals, worst)
    return out


def markdown(system: str, rows: list[dict], summary: dict, meta: dict) -> str:
    names = list(rows[0]["parameters"])
    head = ["seed", "best epoch", "test recon MSE"]
    degrees = [n for n in names if "median_abs_error_deg" in rows[0]["parameters"][n]]
    debiased = [n for n in names if f"{n}_mae_debiased" in summary]
    for n in names:
        head += [f"{n} MAE"] + ([f"{n} MAE debiased"] if n in debiased else [])
        head += [f"{n} corr", f"{n} 90% cov. calibrated", f"{n} 90% cov. raw"]
        head += [f"{n} median err [deg]"] if n in degrees else []
    head.append("IWAE / item")
    lines = [f"{system} {SETTING}, {meta['epochs']} epochs, "
             f"learning rate {meta.get('lr_schedule', 'constant')}, seeds {meta['seeds']}, "
             f"{meta['date']}, {meta['machine']}", "",
             "| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]

    def cells(get) -> list[str]:
        c = [f"{get('recon_mse'):.3g}"]
        for n in names:
            c += [f"{get(f'{n}_mae'):.4g}"] + ([f"{get(f'{n}_mae_debiased'):.4g}"] if n in debiased else [])
            c += [f"{get(f'{n}_{k}'):.3f}" for k in ("corr", "coverage90", "coverage90_raw")]
            c += [f"{get(f'{n}_median_abs_error_deg'):.2f}"] if n in degrees else []
        return c + [f"{get('iwae_log_likelihood'):.5g}"]

    for r in rows:
        flat = {"recon_mse": r["recon_mse"], "iwae_log_likelihood": r["iwae_log_likelihood"],
                **{f"{n}_{k}": v for n, p in r["parameters"].items() for k, v in p.items()}}
        row = [str(r["seed"]), str(r["best_epoch"]), *cells(flat.__getitem__)]
        lines.append("| " + " | ".join(row) + " |")
    for stat in ("mean", "median", "worst"):
        row = [f"**{stat}**", "", *cells(lambda k, stat=stat: summary[k][stat])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", required=True, choices=sorted(BUDGET))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=None, help="default: the benchmark's budget")
    p.add_argument("--jobs", type=int, default=2, help="seeds trained side by side")
    p.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default="constant",
                   help="the trainer's learning-rate schedule (default: constant, the reference's, "
                   "which the seeds of 2026-12-03 compare against; advdif's own default is cosine)")
    p.add_argument("--out", default=None, help="default: benchmarks/<system>/out_seeds, with "
                   "_<schedule> appended for a schedule other than constant")
    p.add_argument("--name", default=None, help="results file name, without suffix (default: seeds, "
                   "with _<schedule> appended for a schedule other than constant)")
    args = p.parse_args(argv)
    epochs = args.epochs or BUDGET[args.system]
    tag = "" if args.lr_schedule == "constant" else f"_{args.lr_schedule}"
    name = args.name or f"seeds{tag}"
    out = Path(args.out or HERE / args.system / f"out_seeds{tag}")
    data = benchmark_data(args.system)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train_and_evaluate, args.system, s, str(data), str(out), epochs,
                               args.lr_schedule) for s in args.seeds]
        rows = []
        for f in futures:
            rows.append(f.result())
            print(json.dumps(rows[-1]), flush=True)
    summary = spread(rows)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "system": args.system, "setting": SETTING, "epochs": epochs,
            "lr_schedule": args.lr_schedule,
            "seeds": args.seeds, "jobs": args.jobs, "data": str(data), **EVAL[args.system]}
    results = HERE / args.system / "results"
    results.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "rows": rows, "summary": summary}
    (results / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(args.system, rows, summary, meta)
    (results / f"{name}.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
