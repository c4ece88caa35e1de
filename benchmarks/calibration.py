"""Calibrated posteriors on trained runs: raw against calibrated coverage, noise, LOO/WAIC.

For each run (default: the pendulum and advection-diffusion phys+nn+reg benchmark runs) this
draws the posterior of the validation split once and of the test split once, and reports on
the test split:

* the observation noise fitted on the validation split (``ml`` and ``plugin`` estimates per
  channel, :func:`pyro_physvae.diagnostics.estimate_noise`) against the model's own;
* the 90% posterior-predictive coverage of the test observations: raw (model noise) and with
  each fitted noise;
* per physics parameter: raw 90% interval coverage and mean width, and the same after each
  split-conformal recalibration fitted on the validation split's truths
  (:data:`pyro_physvae.diagnostics.INTERVAL_METHODS`);
* PSIS-LOO (elpd_loo, se, p_loo, shares of Pareto k > 0.7 and > 1) and WAIC of the
  per-sequence log-likelihood with each noise, and raw;
* the wall time of the calibration (sampling the validation split and fitting).

Writes ``calibration_<date>.json``, ``calibration_<date>.md`` and Pareto-k plots to ``--out``
(default ``benchmarks/calibration_results``); the log is what it prints (``tee`` it).

    python benchmarks/calibration.py --threads 1 \
        | tee benchmarks/calibration_results/calibration_2026-12-03.log
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pyro_physvae.diagnostics import (
    INTERVAL_METHODS,
    draws_to_inference_data,
    interval_coverage,
    loo_report,
    plot_pareto_k,
    raw_loo_report,
    sample_posterior,
    split_chains,
    with_noise,
)
from pyro_physvae.evaluate import (
    calibration_split,
    fit_calibration,
    load_run,
    physics_names,
    predictive_coverage,
)
from pyro_physvae.report import INTERVAL, seq_scale, write_json

HERE = Path(__file__).resolve().parent
RUNS = {"pendulum": "/work/bench/runs/pendulum", "advdif": "/work/bench/runs/advdif"}
#: Posterior draws per sequence: advection-diffusion's fields (20 x 50) cost 20 times the
#: pendulum's memory per draw.
DRAWS = {"pendulum": 200, "advdif": 100}


def measure(name: str, run_dir: str, num_samples: int, n_test: int | None, seed: int, out: Path
            ) -> dict[str, Any]:
    """Every figure of the module docs for one run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old-format checkpoints load with a warning
        run = load_run(run_dir)
    print(f"\n== {name}: {run.system.name} {run.setting.value}, checkpoint epoch "
          f"{run.checkpoint['epoch']}, {num_samples} draws per sequence", flush=True)
    ds = run.load("test")
    if n_test is not None:
        ds = ds.isel(sequence=slice(0, n_test))
    x = run.system.observations(ds)
    cal_split = calibration_split(run, "test", "valid", None, lambda xs: run.guide)
    cal = fit_calibration(run, cal_split, num_samples, seed)
    print(f"calibration on valid ({cal_split.x.shape[0]} sequences): {cal.seconds:.1f} s", flush=True)
    start = time.perf_counter()
    draws = sample_posterior(run.model, run.guide, x, num_samples, seed=seed)
    test_seconds = time.perf_counter() - start
    noise = cal.noise
    result: dict[str, Any] = {
        "run": run_dir, "system": run.system.name, "setting": run.setting.value,
        "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
        "n_valid": int(cal_split.x.shape[0]), "n_test": int(x.shape[0]),
        "calibration_seconds": cal.seconds, "test_sampling_seconds": test_seconds,
        "noise": noise.to_dict(), "notes": " ".join(cal.notes),
    }
    # Predictive coverage and LOO with each noise estimate, and raw.
    predictive, loo = {}, {}
    for method in ("ml", "plugin"):
        nd = with_noise(draws, x, replace(noise, method=method), seed=seed)
        predictive[method] = predictive_coverage(x, nd["x"])
        small = {k: v for k, v in nd.items() if k not in ("x_mean", "x_P", "x_raw")}  # memory
        idata = draws_to_inference_data(small, x, dataset=ds, chains=split_chains(num_samples),
                                        noise=replace(noise, method=method))
        loo[method] = loo_report(idata)
        if method == noise.method:
            loo["raw"] = raw_loo_report(idata)
            plot_pareto_k(idata, out / f"pareto_k_{name}.png",
                          title=f"{name}: PSIS-LOO with the fitted noise ({method})")
        del nd, small, idata
    predictive["raw"] = predictive_coverage(x, draws["x"])
    result["predictive_coverage90"] = predictive
    result["loo"] = loo
    print(f"noise sigma: model {noise.sigma_model:.4g}; ml {_fmt(noise.sigma_ml)}; plugin "
          f"{_fmt(noise.sigma_plugin)}", flush=True)
    print("predictive 90% coverage (test): " + ", ".join(f"{k} {v:.3f}" for k, v in predictive.items()))
    for k, r in loo.items():
        print(f"LOO [{k}]: elpd_loo {r['elpd_loo']:.1f} (se {r['se_loo']:.1f}), p_loo {r['p_loo']:.1f}, "
              f"k>0.7 {r['pareto_k_gt_0.7']:.1%}, k>1 {r['pareto_k_gt_1']:.1%}; elpd_waic "
              f"{r['elpd_waic']:.1f}, p_waic {r['p_waic']:.1f}")
    # Physics-parameter intervals.
    seq = seq_scale(x, draws["x_mean"], cal.seq_scale_model)
    params = {}
    for p in physics_names(run.model):
        if p not in ds or p not in cal.alternatives:
            continue
        truth = ds[p].values
        mean = draws[p].mean(0).numpy()
        rows = {"raw": interval_coverage(draws[p], truth, level=INTERVAL)}
        for method in INTERVAL_METHODS:
            fit = cal.alternatives[p][method]
            rows[method] = {**interval_coverage(draws[p], truth, fit, level=INTERVAL, seq_scale=seq),
                            **fit.to_dict()}
        params[p] = {"mae": float(abs(mean - truth).mean()), "bias_test": float((mean - truth).mean()),
                     "bias_valid": cal.bias[p], "intervals": rows}
        print(f"{p}: MAE {params[p]['mae']:.4g}, bias test {params[p]['bias_test']:+.4g} "
              f"(valid {cal.bias[p]:+.4g})")
        for method, r in rows.items():
            extra = {k: r[k] for k in ("factor", "rescale", "lower", "upper") if k in r}
            print(f"   {method:>18}: 90% coverage {r['coverage']:.3f}, mean width {r['mean_width']:.4g}  "
                  + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    result["parameters"] = params
    return result


def _fmt(v: torch.Tensor) -> str:
    return ", ".join(f"{float(s):.4g}" for s in v)


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``benchmarks/RESULTS.md``'s section."""
    lines = ["| run | noise sigma: model / ml / plugin | predictive 90% cov.: raw / ml / plugin | "
             "elpd_loo (se), k>0.7, k>1 [ml] | elpd_waic [ml] | elpd_loo, k>0.7 [raw] | calibration s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["runs"].items():
        n, pc, lm, lr = r["noise"], r["predictive_coverage90"], r["loo"]["ml"], r["loo"]["raw"]
        ml = ", ".join(f"{v:.4g}" for v in n["sigma_ml"].values())
        pl = ", ".join(f"{v:.4g}" for v in n["sigma_plugin"].values())
        lines.append(f"| {name} | {n['sigma_model_raw']:.4g} / {ml} / {pl} | {pc['raw']:.3f} / "
                     f"{pc['ml']:.3f} / {pc['plugin']:.3f} | {_num(lm['elpd_loo'])} ({_num(lm['se_loo'])}), "
                     f"{lm['pareto_k_gt_0.7']:.1%}, {lm['pareto_k_gt_1']:.1%} | {_num(lm['elpd_waic'])} | "
                     f"{_num(lr['elpd_loo'])}, {lr['pareto_k_gt_0.7']:.1%} | "
                     f"{r['calibration_seconds']:.1f} |")
    lines += ["", "| run | parameter | intervals | 90% coverage (test) | mean width | fit on valid |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results["runs"].items():
        for p, entry in r["parameters"].items():
            for method, row in entry["intervals"].items():
                fit = ", ".join(f"{k} {row[k]:.4g}" for k in ("factor", "rescale", "lower", "upper")
                                if k in row)
                lines.append(f"| {name} | {p} | {method} | {row['coverage']:.3f} | {row['mean_width']:.4g} | "
                             f"{fit or '-'} |")
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else "nan"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--n-test", type=int, default=None, help="first N test sequences (default: all)")
    parser.add_argument("--samples", type=int, default=None, help="draws per sequence (default: per run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--date", default="2026-12-03")
    parser.add_argument("--out", type=Path, default=HERE / "calibration_results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "date": args.date, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"python {platform.python_version()}, torch {torch.__version__}", "runs": {}}
    for name in args.runs:
        results["runs"][name] = measure(name, RUNS[name], args.samples or DRAWS[name], args.n_test,
                                        args.seed, args.out)
    results["seconds"] = time.perf_counter() - start
    write_json(results, args.out / f"calibration_{args.date}.json")
    (args.out / f"calibration_{args.date}.md").write_text(markdown(results))
    print("\n" + markdown(results))
    print(f"total {results['seconds']:.0f} s; written to {args.out}")
    json.dumps(results)  # fail loudly on anything not serialisable


if __name__ == "__main__":
    main()
