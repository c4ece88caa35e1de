"""Evaluation of trained runs: posterior samples, metrics, figures and counterfactuals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.autoguides import fit_local_guide, refine_amortized_guide  # noqa: E402
from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.diagnostics import (  # noqa: E402
    calibration,
    central_interval,
    draws_to_inference_data,
    interval_widening,
    iwae_log_likelihood,
    markdown_table,
    plot_calibration,
    sample_posterior,
)
from pyro_physvae.files import atomic_write  # noqa: E402
from pyro_physvae.settings import Setting  # noqa: E402
from pyro_physvae.systems import System, get_system  # noqa: E402
from pyro_physvae.train import build_pair, resolve_device  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: Central posterior interval used for coverage and bands.
INTERVAL = 0.90


@dataclass
class Run:
    """A trained model/guide pair loaded from a run directory.

    For a run trained with an AutoGuide, ``guide`` is ``None``: its latents belong to the
    training sequences, and :meth:`guide_for` fits a fresh one for the sequences at hand.
    """

    system: System
    setting: Setting
    model: PyroModule
    guide: PyroModule | None
    checkpoint: dict[str, Any]
    path: Path
    guide_kind: str = "amortized"

    def load(self, split: str, data_dir: str | Path | None = None) -> xr.Dataset:
        """A split of ``data_dir``, by default the directory the run was trained on."""
        return self.system.load_split(data_dir or self.checkpoint["data_dir"], split)

    def guide_for(self, x: Tensor, *, steps: int = 1000, seed: int = 0,
                  refine_steps: int = 0) -> Callable:
        """A guide over the latents of the sequences ``x``: the amortized encoder itself
        (refined per sequence for ``refine_steps`` steps if that is positive, see
        :func:`~pyro_physvae.autoguides.refine_amortized_guide`), or an AutoGuide of the
        run's kind fitted with the model held fixed for ``steps`` steps."""
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        if self.guide is None:
            return fit_local_guide(self.model, self.guide_kind, x, steps=steps, seed=seed)
        if refine_steps:
            return refine_amortized_guide(self.model, self.guide, x, steps=refine_steps, seed=seed)
        return self.guide

    def applied_refine_steps(self, refine_steps: int) -> int:
        """The refinement steps :meth:`guide_for` applies: ``refine_steps`` for an amortized
        run, none for an AutoGuide run (its guide is fitted to the sequences anyway)."""
        return refine_steps if self.guide is not None else 0


def load_run(run_dir: str | Path, checkpoint: str = "best.pt", device: str = "cpu") -> Run:
    """Rebuild the model and guide of ``run_dir`` from ``checkpoint`` (weights only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    state = load_checkpoint(run_dir / checkpoint, map_location=device)
    system = get_system(state["system"], source=state.get("system_source"))
    setting = Setting.parse(state["setting"])
    kind = state.get("train_config", {}).get("guide", "amortized")
    pyro.clear_param_store()
    model, guide = build_pair(system, setting, kind, state["model_kwargs"], state["guide_kwargs"])
    if kind == "amortized":
        guide.load_state_dict(state["guide_state"])
        guide.to(device).eval()
    else:
        guide = None  # its latents are the training sequences'; see Run.guide_for
    model.load_state_dict(state["model_state"])
    model.to(device).eval()
    return Run(system, setting, model, guide, state, run_dir, kind)


def parameter_metrics(samples: Tensor, truth: np.ndarray, level: float = INTERVAL) -> dict[str, float]:
    """MAE, RMSE and Pearson correlation of the posterior mean; coverage and mean width of
    the central interval. ``samples (S, N)``, ``truth (N,)``."""
    mean = samples.mean(0).cpu().numpy()
    lo, hi = (v.cpu().numpy() for v in central_interval(samples, level))
    err = mean - truth
    corr = float(np.corrcoef(mean, truth)[0, 1]) if len(truth) > 1 and mean.std() > 0 else math.nan
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "corr": corr, f"coverage{int(level * 100)}": float(((truth >= lo) & (truth <= hi)).mean()),
            "interval_width": float((hi - lo).mean())}


def compute_metrics(ds: xr.Dataset, x: Tensor, draws: dict[str, Tensor],
                    physics_names: tuple[str, ...]) -> dict[str, Any]:
    """Reconstruction MSE of the posterior-mean reconstruction (per element) and, for every
    physics parameter with a true value in ``ds``, its error, correlation and coverage."""
    recon = draws["x_mean"].mean(0)
    out: dict[str, Any] = {"n_sequences": int(x.shape[0]),
                           "recon_mse": float((recon - x).pow(2).mean())}
    if "x_P" in draws:
        out["physics_only_mse"] = float((draws["x_P"].mean(0) - x).pow(2).mean())
        out["physics_only_variance_explained"] = variance_explained(x, draws["x_P"].mean(0))
    lo, hi = central_interval(draws["x"], INTERVAL)
    out["predictive_coverage90"] = float(((x >= lo) & (x <= hi)).float().mean())
    for name in physics_names:
        if name in ds and name in draws:
            out[name] = parameter_metrics(draws[name], ds[name].values)
    return out


def variance_explained(x: Tensor, curve: Tensor) -> float:
    """``1 - sum (x - curve)^2 / sum (x - mean)^2`` over all elements of ``x (N, *event)``,
    the mean taken per channel (the dimension after the sequence one: each joint angle,
    each grid point) over sequences and time; for ``(N, T)`` one overall mean."""
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True) if x.dim() > 2 else x.mean()
    return float(1.0 - (x - curve).pow(2).sum() / (x - mean).pow(2).sum())


def latent_correlations(draws: dict[str, Tensor], ds: xr.Dataset, covariates: tuple[str, ...],
                        sites: tuple[str, ...]) -> dict[str, Any]:
    """Pearson correlation of each dimension of each latent's posterior mean with each
    per-sequence covariate in ``ds`` (e.g. walking speed). Returns ``{covariate: {"site[i]":
    r}}`` plus, per covariate, the latent dimension with the largest ``|r|``."""
    means: dict[str, np.ndarray] = {}
    for site in sites:
        if site in draws:
            m = draws[site].mean(0).cpu().numpy()
            m = m[:, None] if m.ndim == 1 else m.reshape(m.shape[0], -1)
            for i in range(m.shape[1]):
                means[f"{site}[{i}]"] = m[:, i]
    out: dict[str, Any] = {}
    for cov in covariates:
        if cov not in ds or ds[cov].dims != ("sequence",):
            continue
        values = ds[cov].values.astype(float)
        table = {k: (float(np.corrcoef(v, values)[0, 1]) if v.std() > 0 and values.std() > 0
                     else math.nan) for k, v in means.items()}
        finite = {k: r for k, r in table.items() if math.isfinite(r)}
        best = max(finite, key=lambda k: abs(finite[k])) if finite else None
        out[cov] = {"by_latent": table, "strongest": best,
                    "strongest_r": finite[best] if best else math.nan}
    return out


def plot_reconstructions(ds: xr.Dataset, x: Tensor, draws: dict[str, Tensor], path: Path,
                         n: int = 9) -> Path:
    """Data, posterior-mean reconstruction, 90% posterior-predictive band and, where the
    model has physics, the physics-only curve, for the first ``n`` sequences. Space-time
    fields ``(N, X, T)`` are drawn as images by :func:`plot_field_reconstructions`, several
    channels over time ``(N, C, T)`` by :func:`plot_channel_reconstructions`."""
    if x.dim() == 4:  # images (N, bands, rows, cols)
        from pyro_physvae.images import plot_image_reconstructions

        return plot_image_reconstructions(ds, x, draws, path, n=min(n, 6))
    if x.dim() == 3:
        if ds["x"].dims[1] == "space":
            return plot_field_reconstructions(ds, x, draws, path, n=min(n, 3))
        return plot_channel_reconstructions(ds, x, draws, path, n=min(n, 4))
    t = ds["time"].values
    n = min(n, x.shape[0])
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    lo, hi = central_interval(draws["x"], INTERVAL)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.fill_between(t, lo[i].cpu(), hi[i].cpu(), color="C0", alpha=0.25, label="90% predictive")
        ax.plot(t, draws["x_mean"][:, i].mean(0).cpu(), color="C0", label="reconstruction")
        if "x_P" in draws:
            ax.plot(t, draws["x_P"][:, i].mean(0).cpu(), "--", color="C2", label="physics only")
        ax.plot(t, x[i].cpu(), ".", color="k", ms=3, label="data")
        ax.set_title(f"sequence {int(ds['sequence'][i])}", fontsize=9)
    axes.flat[0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel(f"time [{ds['time'].attrs.get('units', 's')}]")
    return _save(fig, path)


def plot_channel_reconstructions(ds: xr.Dataset, x: Tensor, draws: dict[str, Tensor], path: Path,
                                 n: int = 4) -> Path:
    """Series with several channels ``(N, C, T)`` (e.g. joint angles): one row per sequence
    (the first ``n``), one panel per channel, each with the data, the posterior-mean
    reconstruction, its 90% posterior-predictive band and the physics-only part ``x_P``."""
    n, channels = min(n, x.shape[0]), x.shape[1]
    t = ds["cycle_percent"].values if "cycle_percent" in ds.coords else ds["time"].values
    xlabel = "gait cycle [%]" if "cycle_percent" in ds.coords else "time"
    lo, hi = central_interval(draws["x"], INTERVAL)
    fig, axes = plt.subplots(n, channels, figsize=(3.4 * channels, 2.3 * n), squeeze=False)
    for i in range(n):
        for c in range(channels):
            ax = axes[i, c]
            ax.fill_between(t, lo[i, c].cpu(), hi[i, c].cpu(), color="C0", alpha=0.25,
                            label="90% predictive")
            ax.plot(t, draws["x_mean"][:, i, c].mean(0).cpu(), color="C0", label="reconstruction")
            if "x_P" in draws:
                ax.plot(t, draws["x_P"][:, i, c].mean(0).cpu(), "--", color="C2",
                        label="physics only")
            ax.plot(t, x[i, c].cpu(), ".", color="k", ms=2, label="data")
            ax.set_title(f"sequence {int(ds['sequence'][i])}, channel {c}", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    return _save(fig, path)


def plot_field_reconstructions(ds: xr.Dataset, x: Tensor, draws: dict[str, Tensor], path: Path,
                               n: int = 3) -> Path:
    """For the first ``n`` fields ``(X, T)``: data, posterior-mean reconstruction, the
    physics-only part (where the model has physics) and reconstruction minus data."""
    rows = []
    for i in range(min(n, x.shape[0])):
        recon = draws["x_mean"][:, i].mean(0)
        row = {"data": x[i], "reconstruction": recon}
        if "x_P" in draws:
            row["physics only"] = draws["x_P"][:, i].mean(0)
        row["reconstruction - data"] = recon - x[i]
        rows.append({k: v.cpu().numpy() for k, v in row.items()})
    t = ds["time"].values
    return plot_field_grid(rows, path, t_max=float(t[-1]), signed=("reconstruction - data",),
                           labels=[f"sequence {int(s)}" for s in ds["sequence"].values[:len(rows)]])


def plot_field_grid(rows: list[dict[str, np.ndarray]], path: Path, *, t_max: float,
                    signed: tuple[str, ...] = (), labels: list[str] | None = None,
                    title: str = "") -> Path:
    """Images of fields ``(X, T)``, space vertical and time horizontal: one row per entry of
    ``rows``, one panel per key. Panels named in ``signed`` (differences) get a diverging
    colour map symmetric about zero; the others share their row's colour range."""
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.6 * cols, 2.2 * len(rows) + 0.4),
                             squeeze=False)
    for r, row in enumerate(rows):
        vmax = max(float(np.abs(v).max()) for k, v in row.items() if k not in signed) or 1.0
        for ax, (key, img) in zip(axes[r], row.items(), strict=True):
            lim = max(float(np.abs(img).max()), 1e-12) if key in signed else vmax
            im = ax.imshow(img, aspect="auto", cmap="RdBu_r" if key in signed else "viridis",
                           vmin=-lim, vmax=lim, interpolation="nearest",
                           extent=(0.0, t_max, img.shape[0] - 0.5, -0.5))
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(key if labels is None else f"{key}, {labels[r]}", fontsize=8)
            ax.set_ylabel("grid point", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("time [s]")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_parameter(truth: np.ndarray, samples: Tensor, name: str, path: Path) -> Path:
    """Posterior mean with 90% intervals against the true value."""
    mean = samples.mean(0).cpu().numpy()
    lo, hi = (v.cpu().numpy() for v in central_interval(samples, INTERVAL))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.errorbar(truth, mean, yerr=[mean - lo, hi - mean], fmt=".", ms=3, alpha=0.5, elinewidth=0.5)
    edge = [min(truth.min(), lo.min()), max(truth.max(), hi.max())]
    ax.plot(edge, edge, "k--", lw=1)
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"inferred {name} (mean, 90% interval)")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj: Any, path: Path) -> Path:
    """JSON with NaN written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(u) for k, u in v.items()}
        if isinstance(v, list | tuple):
            return [clean(u) for u in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2))
    return path


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
             num_samples: int = 100, out_dir: str | Path | None = None,
             checkpoint: str = "best.pt", device: str = "cpu", seed: int = 0,
             guide_steps: int = 1000, iwae_particles: int = 50,
             refine_steps: int = 0) -> dict[str, Any]:
    """Evaluate a run on a split: writes ``metrics.json`` and figures to ``out_dir``
    (default ``run_dir/eval-<split>``) and returns the metrics, among them the mean IWAE
    log-likelihood per sequence (``iwae_particles`` importance samples), which compares
    settings. An AutoGuide run fits its guide on the split first (``guide_steps`` steps); an
    amortized run's posterior is refined per sequence for ``refine_steps`` steps if that is
    positive (semi-amortized inference; ``0``: the encoder's posterior as it is)."""
    run = load_run(run_dir, checkpoint, str(resolve_device(device)))
    ds = run.load(split, data_dir)
    x = run.system.observations(ds, device)
    guide = run.guide_for(x, steps=guide_steps, seed=seed, refine_steps=refine_steps)
    if x.dim() == 4:  # images (N, bands, rows, cols): streamed summaries, image figures, traversals
        from pyro_physvae.images import evaluate_images

        out = Path(out_dir) if out_dir else Path(run_dir) / f"eval-{split}"
        return evaluate_images(run, guide, ds, x, out, split=split, num_samples=num_samples,
                               iwae_particles=iwae_particles, seed=seed,
                               refine_steps=run.applied_refine_steps(refine_steps))
    draws = sample_posterior(run.model, guide, x, num_samples, seed=seed)
    physics = tuple(p.name for p in run.model.physics_parameters)
    iwae = iwae_log_likelihood(run.model, guide, x, iwae_particles, seed=seed)
    metrics = {"system": run.system.name, "setting": run.setting.value, "split": split,
               "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
               "refine_steps": run.applied_refine_steps(refine_steps),
               **compute_metrics(ds, x, draws, physics), "iwae_log_likelihood": _iwae_summary(iwae)}
    if run.system.covariates:
        metrics["latent_correlations"] = latent_correlations(
            draws, ds, run.system.covariates, tuple(run.model.latent_sites))
    if callable(getattr(run.model, "energy_drift", None)) and run.setting.has_physics:
        metrics["energy"] = energy_report(run.model, draws)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval-{split}"
    plot_reconstructions(ds, x, draws, out / "reconstructions.png")
    for name in physics:
        if name in ds:
            plot_parameter(ds[name].values, draws[name], name, out / f"{name}.png")
    write_json(metrics, out / "metrics.json")
    return metrics


def energy_report(model: PyroModule, draws: dict[str, Tensor]) -> dict[str, Any]:
    """Conservation of a learnt energy along the physics-only trajectories of the
    posterior-mean latents, with the model's own solver and step (``model.energy_drift``):
    the relative drift over the window by its median, mean and maximum over sequences, and
    the absolute drift."""
    y0 = draws["y0"].mean(0)
    z = draws["z_P"].mean(0) if "z_P" in draws else None
    result = model.energy_drift(y0, z)
    rel = result["relative"]
    return {"solver": model.method, "step": model.dt / model.substeps,
            "relative_drift_median": float(rel.median()), "relative_drift_mean": float(rel.mean()),
            "relative_drift_max": float(rel.max()),
            "absolute_drift_median": float(result["drift"].median()),
            "energy0_std": float(result["energy"][:, 0].std())}


def diagnose(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
             num_samples: int = 200, iwae_particles: int = 100, calibrate_on: str | None = "valid",
             out_dir: str | Path | None = None, checkpoint: str = "best.pt", seed: int = 0,
             guide_steps: int = 1000, refine_steps: int = 0) -> dict[str, Any]:
    """Posterior diagnostics of a run on a split, written to ``out_dir``
    (default ``run_dir/diagnose-<split>``):

    * ``inference_data.nc``: ArviZ InferenceData (posterior, posterior_predictive,
      log_likelihood, observed_data, constant_data);
    * ``summary.csv``: ``az.summary`` of the physics parameters per sequence;
    * ``calibration.csv`` / ``.md`` and ``calibration.png``: coverage of central intervals of
      each physics parameter at several levels, raw and, when ``calibrate_on`` names a split
      with true values, with intervals widened by the factor that gives 90% coverage there;
    * ``posterior.png`` (forest plot with the truth), ``ppc.png`` (``az.plot_ppc``),
      ``reconstructions.png`` (posterior-predictive bands over time);
    * ``diagnostics.json``: reconstruction metrics, IWAE test log-likelihood, coverages.

    An AutoGuide run fits its guide on each split first (``guide_steps`` steps); an amortized
    run's posterior is refined per sequence on each split for ``refine_steps`` steps if that
    is positive (see :func:`evaluate`).
    """
    run = load_run(run_dir, checkpoint)
    ds = run.load(split, data_dir)
    x = run.system.observations(ds)

    def guide_for(x: Tensor) -> Callable:
        return run.guide_for(x, steps=guide_steps, seed=seed, refine_steps=refine_steps)

    guide = guide_for(x)
    draws = sample_posterior(run.model, guide, x, num_samples, seed=seed)
    physics = tuple(p.name for p in run.model.physics_parameters)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"diagnose-{split}"
    out.mkdir(parents=True, exist_ok=True)

    idata = draws_to_inference_data(draws, x, dataset=ds)
    atomic_write(out / "inference_data.nc", idata.to_netcdf)
    if physics:
        summary = az.summary(idata, var_names=list(physics), kind="stats", hdi_prob=INTERVAL)
        summary.to_csv(out / "summary.csv")
    iwae = iwae_log_likelihood(run.model, guide, x, iwae_particles, seed=seed)
    report: dict[str, Any] = {
        "system": run.system.name, "setting": run.setting.value, "guide": run.guide_kind,
        "split": split, "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
        "refine_steps": run.applied_refine_steps(refine_steps),
        **compute_metrics(ds, x, draws, physics),
        "iwae_log_likelihood": _iwae_summary(iwae),
    }
    report["calibration"] = _calibrate(run, draws, ds, physics, data_dir, calibrate_on, num_samples,
                                       guide_for, seed, out)
    plot_reconstructions(ds, x, draws, out / "reconstructions.png")
    _plot_forest(idata, physics, ds, out / "posterior.png")
    az.plot_ppc(idata, num_pp_samples=min(50, num_samples), random_seed=seed)
    _save(plt.gcf(), out / "ppc.png")
    write_json(report, out / "diagnostics.json")
    return report


def _iwae_summary(iwae: Tensor) -> dict[str, float]:
    """Mean (with its standard error) and median of per-sequence IWAE log-likelihoods [nats]."""
    return {"mean": float(iwae.mean()), "stderr": float(iwae.std() / math.sqrt(iwae.numel())),
            "median": float(iwae.median())}


def _calibrate(run: Run, draws: dict[str, Tensor], ds: xr.Dataset, physics: tuple[str, ...],
               data_dir: str | Path | None, calibrate_on: str | None, num_samples: int,
               guide_for: Callable[[Tensor], Callable], seed: int, out: Path) -> dict[str, Any]:
    """Calibration tables of every physics parameter with a truth; see :func:`diagnose`.
    ``guide_for(x)`` gives the guide for the calibration split's sequences ``x``."""
    names = [p for p in physics if p in ds]
    if not names:
        return {}
    held_out = None
    if calibrate_on is not None and calibrate_on != ds.attrs.get("split"):
        cal_ds = run.load(calibrate_on, data_dir)
        if all(p in cal_ds for p in names):
            x_cal = run.system.observations(cal_ds)
            guide = guide_for(x_cal)
            held_out = (cal_ds, sample_posterior(run.model, guide, x_cal, num_samples, seed=seed + 1))
    result, rows = {}, []
    for name in names:
        tables = {"posterior": calibration(draws[name], ds[name].values)}
        entry: dict[str, Any] = {"coverage": _coverage_by_level(tables["posterior"])}
        if held_out is not None:
            factor = interval_widening(held_out[1][name], held_out[0][name].values, INTERVAL)
            widened = calibration(draws[name], ds[name].values, widen=factor)
            tables[f"widened x{factor:.3g} on {calibrate_on}"] = widened
            entry.update(widening_factor=factor, widened_coverage=_coverage_by_level(widened))
        for label, table in tables.items():
            rows += [{"parameter": name, "intervals": label, "level": float(r.level),
                      "coverage": float(r.coverage), "mean_width": float(r.mean_width)}
                     for r in table.to_dataframe().reset_index().itertuples()]
        plot_calibration(tables, out / f"calibration_{name}.png", title=f"{name}: {run.setting.value}")
        result[name] = entry
    table = pd.DataFrame(rows)
    table.to_csv(out / "calibration.csv", index=False)
    (out / "calibration.md").write_text(markdown_table(table))
    return result


def _coverage_by_level(table: xr.Dataset) -> dict[str, float]:
    return {f"{level:g}": float(c) for level, c in zip(table["level"].values, table["coverage"].values,
                                                       strict=True)}


def _plot_forest(idata: az.InferenceData, physics: tuple[str, ...], ds: xr.Dataset, path: Path,
                 n: int = 12) -> None:
    """Forest plot (90% intervals) of the physics parameters of the first ``n`` sequences,
    with the true values as crosses where known."""
    if not physics:
        return
    seqs = idata.posterior["sequence"].values[:n]
    axes = az.plot_forest(idata, var_names=list(physics), coords={"sequence": seqs}, combined=True,
                          hdi_prob=INTERVAL, figsize=(5, 0.35 * n * len(physics) + 1))
    ax = np.ravel(axes)[0]
    ticks = ax.get_yticks()
    for name in physics:
        if name in ds:
            truth = ds[name].sel(sequence=seqs).values
            # plot_forest lists the first sequence at the top.
            ax.plot(truth, sorted(ticks, reverse=True)[:len(truth)], "x", color="C3", label=f"true {name}")
    ax.legend(fontsize=7)
    _save(ax.figure, path)


def counterfactual(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
                   factors: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 3.0), n_sequences: int = 100,
                   num_samples: int = 100, out_dir: str | Path | None = None,
                   checkpoint: str = "best.pt", seed: int = 0) -> dict[str, Any]:
    """Decode sequences with their inferred omega multiplied by each factor and compare with
    the true forced damped pendulum whose omega is multiplied by the same factor.

    The other latents stay at their posterior means; omega is not clamped to its range, so
    factors up to 3 leave the training range. Writes ``counterfactual.json`` (MSE per factor
    for the full model and its physics-only part) and ``counterfactual.png``.
    """
    from pyro_physvae.data.pendulum import forced_damped_pendulum

    for f in factors:
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"factors must be positive and finite, got {f}")
    run = load_run(run_dir, checkpoint)
    if run.system.name != "pendulum":
        raise ValueError(f"counterfactuals are defined for the pendulum, not {run.system.name!r}")
    if not run.setting.has_physics:
        raise ValueError("a counterfactual needs a physics parameter; the nn-only model has none")
    ds = run.load(split, data_dir)
    missing = [v for v in ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")
               if v not in ds]
    if missing:
        raise ValueError(f"{split} data lacks the true parameters {missing} needed for the truth")
    ds = ds.isel(sequence=slice(0, check_positive_int(n_sequences, "n_sequences")))
    x = run.system.observations(ds)
    draws = sample_posterior(run.model, run.guide_for(x, seed=seed), x, num_samples, seed=seed)
    mean = {k: draws[k].mean(0) for k in run.model.latent_sites}
    t = torch.tensor(ds["time"].values)
    truth_params = [torch.tensor(ds[v].values) for v in
                    ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")]
    results, curves = [], {}
    with torch.no_grad():
        for f in factors:
            omega = mean["omega"] * f
            dec = run.model.decode(x[:, 0], omega, mean.get("z_A1"), mean.get("z_A2"), clamp=False)
            p = list(truth_params)
            p[1] = p[1] * f
            true = forced_damped_pendulum(*p, t).to(x.dtype)
            results.append({"factor": f,
                            "mse": float((dec["x_mean"] - true).pow(2).mean()),
                            "physics_only_mse": float((dec["x_P"] - true).pow(2).mean())})
            curves[f] = (true, dec["x_mean"], dec["x_P"])
    out = Path(out_dir) if out_dir else Path(run_dir) / f"counterfactual-{split}"
    _plot_counterfactual(ds["time"].values, curves, out / "counterfactual.png")
    report = {"system": "pendulum", "setting": run.setting.value, "split": split,
              "n_sequences": int(x.shape[0]), "results": results}
    write_json(report, out / "counterfactual.json")
    return report


def _plot_counterfactual(t: np.ndarray, curves: dict[float, tuple[Tensor, Tensor, Tensor]],
                         path: Path, n: int = 3) -> Path:
    factors = list(curves)
    fig, axes = plt.subplots(n, len(factors), figsize=(2.8 * len(factors), 2.2 * n), squeeze=False)
    for j, f in enumerate(factors):
        true, full, phys = curves[f]
        for i in range(min(n, true.shape[0])):
            ax = axes[i, j]
            ax.plot(t, true[i], "k", lw=1.2, label="truth")
            ax.plot(t, full[i], "C0", label="Phys-VAE")
            ax.plot(t, phys[i], "C2--", label="physics part")
            if i == 0:
                ax.set_title(f"omega x {f:g}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)
