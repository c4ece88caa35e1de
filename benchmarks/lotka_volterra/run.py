"""Lotka-Volterra benchmark (a user-defined system): the four settings over several seeds.

    python benchmarks/lotka_volterra/run.py [--epochs 150] [--jobs 2] [--seeds 0 1]

Everything goes through the ``physvae`` command with ``--plugin``, as a user would run it: per
seed, ``generate`` (data seed = the seed; 500/100/250 train/valid/test sequences of 50 steps),
``train --threads 1 --quiet`` for each setting (training seed = the seed), then ``evaluate``
without ``--plugin`` (the run directory reloads the system). ``--jobs`` runs go side by side.
Writes ``benchmarks/lotka_volterra/results/results.json`` and ``results.md``: per setting the
test reconstruction MSE, physics-only MSE and, for a (prey growth) and c (predator death), the
posterior-mean MAE and correlation with the truth, as the mean and the worst over seeds. Finished
runs in ``--out`` (``eval-test/metrics.json`` present) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PLUGIN = ROOT / "examples" / "lotka_volterra" / "lotka_volterra_guide.py"
#: Longest first, so that the side-by-side jobs finish together.
SETTINGS = ("phys+nn+reg", "phys+nn", "nn-only", "phys-only")
SIZES = {"n-train": 500, "n-valid": 100, "n-test": 250}
#: Metric (path in metrics.json) -> whether lower is better (for "worst over seeds").
METRICS = {"recon_mse": True, "physics_only_mse": True, "a.mae": True, "a.corr": False,
           "c.mae": True, "c.corr": False}


def physvae(*args: str, plugin: bool = True) -> None:
    """Run ``physvae`` with one torch thread, raising with the end of stderr if it fails."""
    cmd = [sys.executable, "-m", "pyro_physvae.cli", *(("--plugin", str(PLUGIN)) if plugin else ()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def run_one(out: Path, seed: int, setting: str, epochs: int) -> dict:
    """Train and evaluate one setting on one seed's data; returns its metrics (+ wall times)."""
    run = out / f"seed{seed}" / setting
    metrics_file = run / "eval-test" / "metrics.json"
    if not metrics_file.is_file():
        t0 = time.perf_counter()
        physvae("train", "--system", "lotka-volterra", "--data", str(out / f"seed{seed}" / "data"),
                "--out", str(run), "--setting", setting, "--epochs", str(epochs), "--seed", str(seed),
                "--threads", "1", "--quiet")
        t1 = time.perf_counter()
        physvae("evaluate", str(run), "--samples", "100", plugin=False)
        times = {"train_s": t1 - t0, "evaluate_s": time.perf_counter() - t1}
        (run / "bench_times.json").write_text(json.dumps(times))
    return {**json.loads(metrics_file.read_text()), **json.loads((run / "bench_times.json").read_text())}


def pick(metrics: dict, path: str) -> float:
    value = metrics
    for key in path.split("."):
        if key not in value:
            return float("nan")
        value = value[key]
    return float(value)


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Per setting and metric: the value of each seed, their mean and the worst."""
    out = {}
    for setting, by_seed in runs.items():
        table = {}
        for path, lower in METRICS.items():
            values = {seed: pick(m, path) for seed, m in by_seed.items()}
            arr = np.array(list(values.values()))
            if np.isnan(arr).all():
                continue
            worst = np.nanmax(arr) if lower else np.nanmin(arr)
            table[path] = {"per_seed": values, "mean": float(np.nanmean(arr)), "worst": float(worst)}
        table["train_s_per_epoch"] = float(np.mean([m["train_s"] / m["epochs"] for m in by_seed.values()]))
        out[setting] = table
    return out


def markdown(summary: dict, meta: dict) -> str:
    cols = list(METRICS)
    lines = [f"# Lotka-Volterra benchmark ({meta['date']})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Seeds {meta['seeds']}, {meta['epochs']} epochs, batch 100, data {SIZES}; test split. "
             "Each cell: mean over seeds (worst).", "",
             "| setting | " + " | ".join(cols) + " | train s/epoch |",
             "| --- " * (len(cols) + 2) + "|"]
    for setting, table in summary.items():
        cells = [f"{table[c]['mean']:.4g} ({table[c]['worst']:.4g})" if c in table else "-" for c in cols]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {table['train_s_per_epoch']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=HERE / "out")
    args = p.parse_args(argv)
    for seed in args.seeds:
        if not (args.out / f"seed{seed}" / "data" / "test.nc").is_file():
            physvae("generate", "--system", "lotka-volterra", "--out", str(args.out / f"seed{seed}" / "data"),
                    "--seed", str(seed), *(f"--{k}={v}" for k, v in SIZES.items()))
    tasks = [(seed, s) for s in SETTINGS for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda task: run_one(args.out, task[0], task[1], args.epochs), tasks))
    runs: dict[str, dict[int, dict]] = {}
    for (seed, setting), m in zip(tasks, done, strict=True):
        runs.setdefault(setting, {})[seed] = {**m, "epochs": args.epochs}
    meta = {"date": datetime.now().isoformat(timespec="minutes"), "epochs": args.epochs, "seeds": args.seeds,
            "command": "python benchmarks/lotka_volterra/run.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} jobs of 1 thread"}
    summary = summarise(runs)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "results.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    (HERE / "results" / "results.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return summary


if __name__ == "__main__":
    main()
