"""Evaluation of trained runs: posterior samples, metrics, figures and counterfactuals."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from pyro.infer import Predictive  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.checkpoint import load_checkpoint  # noqa: E402
from pyro_physvae.data.io import load_split  # noqa: E402
from pyro_physvae.settings import Setting  # noqa: E402
from pyro_physvae.systems import System, get_system  # noqa: E402
from pyro_physvae.train import resolve_device  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: Central posterior interval used for coverage and bands.
INTERVAL = 0.90


@dataclass
class Run:
    """A trained model/guide pair loaded from a run directory."""

    system: System
    setting: Setting
    model: PyroModule
    guide: PyroModule
    checkpoint: dict[str, Any]
    path: Path


def load_run(run_dir: str | Path, checkpoint: str = "best.pt", device: str = "cpu") -> Run:
    """Rebuild the model and guide of ``run_dir`` from ``checkpoint`` (weights only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    state = load_checkpoint(run_dir / checkpoint, map_location=device)
    system = get_system(state["system"])
    setting = Setting.parse(state["setting"])
    pyro.clear_param_store()
    model, guide = system.build(setting, state["model_kwargs"], state["guide_kwargs"])
    model.load_state_dict(state["model_state"])
    guide.load_state_dict(state["guide_state"])
    model.to(device).eval()
    guide.to(device).eval()
    return Run(system, setting, model, guide, state, run_dir)


@torch.no_grad()
def posterior_predictive(model: PyroModule, guide: PyroModule, x: Tensor, num_samples: int = 100,
                         *, batch_size: int = 250, seed: int = 0) -> dict[str, Tensor]:
    """Draw latents from the guide and, given them, the model's curves and new data.

    Args:
        x: observed sequences ``(N, T)``.
        num_samples: posterior draws S per sequence.
        batch_size: sequences per chunk (bounds memory).

    Returns:
        Tensors with leading dims ``(S, N)``: every latent site, the model's deterministic
        curves (``x_mean``, ``x_P``, ...) and ``x``, posterior-predictive data.
    """
    check_positive_int(num_samples, "num_samples")
    pyro.set_rng_seed(seed)
    latent_names = set(model.latent_sites)
    chunks: list[dict[str, Tensor]] = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        guide_draws = Predictive(guide, num_samples=num_samples, parallel=True)(xb)
        latents = {k: v for k, v in guide_draws.items() if k in latent_names}
        model_draws = Predictive(model, posterior_samples=latents, parallel=True)(
            None, init=xb[:, 0]
        )
        chunks.append({**latents, **{k: v for k, v in model_draws.items() if k != "init"}})
    return {k: torch.cat([c[k] for c in chunks], dim=1) for k in chunks[0]}


def interval(samples: Tensor, level: float = INTERVAL) -> tuple[Tensor, Tensor]:
    """Central ``level`` interval over the first (sample) dimension."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    lo, hi = torch.quantile(samples, q.to(samples.device), dim=0)
    return lo, hi


def parameter_metrics(samples: Tensor, truth: np.ndarray, level: float = INTERVAL) -> dict[str, float]:
    """MAE, RMSE and Pearson correlation of the posterior mean; coverage and mean width of
    the central interval. ``samples (S, N)``, ``truth (N,)``."""
    mean = samples.mean(0).cpu().numpy()
    lo, hi = (v.cpu().numpy() for v in interval(samples, level))
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
    lo, hi = interval(draws["x"])
    out["predictive_coverage90"] = float(((x >= lo) & (x <= hi)).float().mean())
    for name in physics_names:
        if name in ds and name in draws:
            out[name] = parameter_metrics(draws[name], ds[name].values)
    return out


def plot_reconstructions(ds: xr.Dataset, x: Tensor, draws: dict[str, Tensor], path: Path,
                         n: int = 9) -> Path:
    """Data, posterior-mean reconstruction, 90% posterior-predictive band and, where the
    model has physics, the physics-only curve, for the first ``n`` sequences."""
    t = ds["time"].values
    n = min(n, x.shape[0])
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    lo, hi = interval(draws["x"])
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


def plot_parameter(truth: np.ndarray, samples: Tensor, name: str, path: Path) -> Path:
    """Posterior mean with 90% intervals against the true value."""
    mean = samples.mean(0).cpu().numpy()
    lo, hi = (v.cpu().numpy() for v in interval(samples))
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


def evaluate(run_dir: str | Path, data_dir: str | Path, *, split: str = "test",
             num_samples: int = 100, out_dir: str | Path | None = None,
             checkpoint: str = "best.pt", device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Evaluate a run on a split: writes ``metrics.json`` and figures to ``out_dir``
    (default ``run_dir/eval-<split>``) and returns the metrics."""
    run = load_run(run_dir, checkpoint, str(resolve_device(device)))
    ds = load_split(data_dir, split, system=run.system.name)
    x = run.system.observations(ds, device)
    draws = posterior_predictive(run.model, run.guide, x, num_samples, seed=seed)
    physics = tuple(p.name for p in run.model.physics_parameters)
    metrics = {"system": run.system.name, "setting": run.setting.value, "split": split,
               "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
               **compute_metrics(ds, x, draws, physics)}
    out = Path(out_dir) if out_dir else Path(run_dir) / f"eval-{split}"
    plot_reconstructions(ds, x, draws, out / "reconstructions.png")
    for name in physics:
        if name in ds:
            plot_parameter(ds[name].values, draws[name], name, out / f"{name}.png")
    write_json(metrics, out / "metrics.json")
    return metrics


def counterfactual(run_dir: str | Path, data_dir: str | Path, *, split: str = "test",
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
    ds = load_split(data_dir, split, system="pendulum")
    missing = [v for v in ("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")
               if v not in ds]
    if missing:
        raise ValueError(f"{split} data lacks the true parameters {missing} needed for the truth")
    ds = ds.isel(sequence=slice(0, check_positive_int(n_sequences, "n_sequences")))
    x = run.system.observations(ds)
    draws = posterior_predictive(run.model, run.guide, x, num_samples, seed=seed)
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
