"""Evaluation of trained runs: posterior samples, metrics, figures and counterfactuals.

What is particular to a system reaches this module only through its
:class:`~pyro_physvae.systems.System` entry: its own evaluation (``evaluator``), its
reconstruction figure (``plot_reconstructions``), further metrics (``extra_metrics``), the
per-sequence covariates whose correlation with the latents is reported (``covariates``) and the
truth of counterfactuals (``counterfactual_truth``). Without them, a system gets the generic
evaluation of :func:`default_evaluator` and the figures of :mod:`pyro_physvae.figures`, which
take any observation ``(N, *channels, T)``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
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
from pyro_physvae.checkpoint import load_checkpoint, load_module_state  # noqa: E402
from pyro_physvae.data.lazy import LazyRows, in_memory  # noqa: E402
from pyro_physvae.devices import resolve_device  # noqa: E402
from pyro_physvae.diagnostics import (  # noqa: E402
    DEFAULT_INTERVAL_METHOD,
    calibration,
    central_interval,
    conformal_calibration,
    draws_to_inference_data,
    interval_widening,
    loo_report,
    markdown_table,
    plot_calibration,
    plot_pareto_k,
    psis_loo,
    raw_loo_report,
    sample_posterior,
    split_chains,
)
from pyro_physvae.figures import (  # noqa: E402
    as_channels,
    plot_channel_reconstructions,
    plot_counterfactual,
    plot_parameter,
    save_figure,
)
from pyro_physvae.files import atomic_write  # noqa: E402
from pyro_physvae.report import (  # noqa: E402
    INTERVAL,
    Calibration,
    CalibrationSplit,
    iwae_summary,
    parameter_metrics,
    write_json,
)
from pyro_physvae.settings import Setting  # noqa: E402
from pyro_physvae.summaries import (  # noqa: E402
    LOG_LIKELIHOODS,
    PER_ROW,
    fit_calibration_in_chunks,
    posterior_summaries,
    streamed_iwae,
    variance_explained_from_moments,
)
from pyro_physvae.systems import System, get_system  # noqa: E402
from pyro_physvae.train import build_pair  # noqa: E402
from pyro_physvae.validation import check_positive_int  # noqa: E402

#: Sequences whose every draw is kept for the reconstruction figure of
#: :func:`default_evaluator` (the figure shows at most 9).
FIGURE_SEQUENCES = 9

#: Sequences whose replicates and curves a streamed :func:`diagnose` writes by default (every
#: draw of every sequence of a set larger than memory would make a file ``num_samples`` times
#: the data's size).
STREAMED_PREDICTIVE_SEQUENCES = 1000

#: Factors of the physics parameter in :func:`counterfactual` by default.
COUNTERFACTUAL_FACTORS = (0.2, 0.5, 1.0, 2.0, 3.0)


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

    def load(self, split: str, data_dir: str | Path | None = None, *, lazy: bool = False) -> xr.Dataset:
        """A split of ``data_dir``, by default the directory the run was trained on, checked
        to fit the trained model (its length, time step, ...); ``lazy``: its observations
        stay in the file (see :meth:`System.load_split`)."""
        ds = self.system.load_split(data_dir or self.checkpoint["data_dir"], split, lazy=lazy)
        self.system.check_data_fits(ds, self.checkpoint["model_kwargs"])
        return ds

    def guide_for(self, x: Tensor | LazyRows, *, steps: int = 1000, seed: int = 0,
                  refine_steps: int = 0) -> Callable:
        """A guide over the latents of the sequences ``x``: the amortized encoder itself
        (refined per sequence for ``refine_steps`` steps if that is positive, see
        :func:`~pyro_physvae.autoguides.refine_amortized_guide`, in chunks for
        :class:`~pyro_physvae.data.lazy.LazyRows`), or an AutoGuide of the run's kind fitted
        with the model held fixed for ``steps`` steps (on all the rows at once, read into
        memory)."""
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        if self.guide is None:
            return fit_local_guide(self.model, self.guide_kind, in_memory(x), steps=steps, seed=seed)
        if refine_steps:
            return refine_amortized_guide(self.model, self.guide, x, steps=refine_steps, seed=seed)
        return self.guide

    def applied_refine_steps(self, refine_steps: int) -> int:
        """The refinement steps :meth:`guide_for` applies: ``refine_steps`` for an amortized
        run, none for an AutoGuide run (its guide is fitted to the sequences anyway)."""
        return refine_steps if self.guide is not None else 0


def load_run(run_dir: str | Path, checkpoint: str = "best.pt", device: str | torch.device = "cpu") -> Run:
    """Rebuild the model and guide of ``run_dir`` from ``checkpoint`` (weights only), on
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; a checkpoint written on any device
    loads on any other)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    device = resolve_device(str(device))
    # Read onto the CPU, where the modules are built; the modules then move as a whole.
    state = load_checkpoint(run_dir / checkpoint, map_location="cpu")
    system = get_system(state["system"], source=state.get("system_source"))
    setting = Setting.parse(state["setting"])
    kind = state.get("train_config", {}).get("guide", "amortized")
    pyro.clear_param_store()
    model, guide = build_pair(system, setting, kind, state["model_kwargs"], state["guide_kwargs"])
    if kind == "amortized":
        load_module_state(guide, state["guide_state"], f"{run_dir / checkpoint} guide_state")
        guide.to(device).eval()
    else:
        guide = None  # its latents are the training sequences'; see Run.guide_for
    load_module_state(model, state["model_state"], f"{run_dir / checkpoint} model_state")
    model.to(device).eval()
    return Run(system, setting, model, guide, state, run_dir, kind)


def summary_metrics(ds: xr.Dataset, summary: Mapping[str, Tensor], physics: tuple[str, ...],
                    calibration: Calibration | None = None) -> dict[str, Any]:
    """Reconstruction MSE of the posterior-mean reconstruction (per element), the coverage
    of the observations by the central 90% posterior-predictive intervals and, for every
    physics parameter with a true value in ``ds``, its error, correlation and coverage, from
    the per-row summaries of :func:`~pyro_physvae.summaries.posterior_summaries`.

    Where the draws held raw replicates ``x_raw``, ``predictive_coverage90`` is that of the
    noise-calibrated replicates and ``predictive_coverage90_raw`` that of the model's own
    noise. ``calibration``: the interval recalibrations fitted on another split (see
    :func:`~pyro_physvae.report.parameter_metrics`).
    """
    mse = summary["mse"]  # rows of one size: the mean of the rows' errors is the overall one
    out: dict[str, Any] = {"n_sequences": int(mse.shape[0]), "recon_mse": float(mse.mean())}
    if "mse_P" in summary:
        out["physics_only_mse"] = float(summary["mse_P"].mean())
        if "mse_P_channel" in summary:
            out["physics_only_variance_explained"] = variance_explained_from_moments(summary)
    out["predictive_coverage90"] = float(summary["predictive_coverage"].mean())
    out["predictive_coverage90_raw"] = float(summary["predictive_coverage_raw"].mean())
    seq = None
    if calibration is not None and calibration.intervals:
        seq = mse.sqrt() / calibration.seq_scale_model
    for name in physics:
        if name in ds and name in summary:
            out[name] = parameter_metrics(summary[name], ds[name].values, calibration=calibration,
                                          name=name, seq=seq)
    return out


def predictive_coverage(x: Tensor, replicates: Tensor, level: float = INTERVAL) -> float:
    """Fraction of the elements of ``x (N, *event)`` inside the central ``level`` interval
    of the replicates ``(S, N, *event)``."""
    lo, hi = central_interval(replicates, level)
    return float(((x >= lo) & (x <= hi)).float().mean())


def calibration_split(run: Run, split: str, calibrate_on: str | None, data_dir: str | Path | None,
                      guide_for: Callable[[Tensor], Callable], device: str = "cpu", *,
                      lazy: bool = False) -> CalibrationSplit:
    """The split ``calibrate_on`` of the run's data, for calibrating the evaluation of
    ``split``; a :class:`~pyro_physvae.report.CalibrationSplit` with a ``reason`` and no data
    when there is none (``None``, the evaluated split itself, or a missing file). ``lazy``:
    its observations are :class:`~pyro_physvae.data.lazy.LazyRows`."""
    if calibrate_on is None:
        return CalibrationSplit(None, reason="calibrate_on=None: raw intervals and predictive only")
    if calibrate_on == split:
        return CalibrationSplit(None, reason=f"calibrate_on is the evaluated split {split!r}: a split "
                                             "calibration needs another; raw only")
    try:
        cal_ds = run.load(calibrate_on, data_dir, lazy=lazy)
    except FileNotFoundError as err:
        return CalibrationSplit(None, reason=f"no {calibrate_on!r} split to calibrate on ({err}); raw only")
    x_cal = run.system.observations(cal_ds, device)
    return CalibrationSplit(calibrate_on, cal_ds, x_cal, guide=lambda: guide_for(x_cal))


def fit_calibration(run: Run, cal: CalibrationSplit, num_samples: int, seed: int = 0) -> Calibration:
    """Fit the observation noise and the physics-parameter interval recalibrations on the
    calibration split ``cal`` from ``num_samples`` posterior draws per sequence, a chunk of
    sequences at a time (:func:`~pyro_physvae.summaries.fit_calibration_in_chunks`; see
    :func:`~pyro_physvae.diagnostics.estimate_noise`,
    :func:`~pyro_physvae.report.build_calibration`); its wall time, the guide's fit
    included, is recorded. Without a split: raw only, with ``cal.reason`` as the note."""
    return fit_calibration_in_chunks(run.model, cal, num_samples, seed=seed)


def calibration_report(cal: Calibration) -> dict[str, Any]:
    """The metrics' ``calibration_fit`` entry and ``notes`` sentence of a calibration."""
    return {"calibration_fit": cal.to_dict(), "notes": " ".join(cal.notes)}


def variance_explained(x: Tensor, curve: Tensor) -> float:
    """``1 - sum (x - curve)^2 / sum (x - mean)^2`` over all elements of observations
    ``x (N, *channels, T)``, the mean taken per channel (each joint angle, each grid point)
    over sequences and time; a single series ``(N, T)`` is one channel, one overall mean."""
    xs = as_channels(x)
    mean = xs.mean((0, 2), keepdim=True)
    return float(1.0 - (xs - as_channels(curve)).pow(2).sum() / (xs - mean).pow(2).sum())


def latent_correlations(draws: dict[str, Tensor], ds: xr.Dataset, covariates: tuple[str, ...],
                        sites: tuple[str, ...]) -> dict[str, Any]:
    """Pearson correlation of each dimension of each latent's posterior mean with each
    per-sequence covariate in ``ds`` (e.g. walking speed). Returns ``{covariate: {"site[i]":
    r}}`` plus, per covariate, the latent dimension with the largest ``|r|``."""
    means: dict[str, np.ndarray] = {}
    for site in sites:
        if site in draws:
            m = draws[site].mean(0).cpu().numpy()
            m = m.reshape(m.shape[0], -1)  # (N, dims): a scalar latent is one column
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


def plot_reconstructions(system: System, ds: xr.Dataset, x: Tensor, draws: Mapping[str, Tensor],
                         path: Path) -> Path:
    """The reconstruction figure of ``system`` (its ``plot_reconstructions``; default:
    :func:`~pyro_physvae.figures.plot_channel_reconstructions`, each channel of the
    observations ``(N, *channels, T)`` over time). ``draws``: ``x``, ``x_mean`` and
    optionally ``x_P``, each ``(S, N, *channels, T)``."""
    plot = system.plot_reconstructions or plot_channel_reconstructions
    return plot(ds, x, draws, path)


def physics_names(model: PyroModule) -> tuple[str, ...]:
    """Names of the model's physics parameters (none for nn-only)."""
    return tuple(p.name for p in model.physics_parameters)


def _header(run: Run, split: str, num_samples: int, refine_steps: int) -> dict[str, Any]:
    """What every report of a run says first: system, setting, split, epoch, draws."""
    return {"system": run.system.name, "setting": run.setting.value, "split": split,
            "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
            "refine_steps": refine_steps}


def evaluation_folder(split: str, checkpoint: str = "best.pt") -> str:
    """The default folder of an evaluation within the run directory: ``eval-<split>`` for
    the best-validation checkpoint, ``eval-<split>-<name>`` for another (``last.pt``:
    ``eval-test-last``), so that evaluations of different checkpoints never overwrite each
    other."""
    name = Path(checkpoint).name.removesuffix(".pt")
    return f"eval-{split}" if name == "best" else f"eval-{split}-{name}"


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
             num_samples: int = 100, out_dir: str | Path | None = None,
             checkpoint: str = "best.pt", device: str = "cpu", seed: int = 0,
             guide_steps: int = 1000, iwae_particles: int = 50,
             refine_steps: int = 0, calibrate_on: str | None = "valid",
             stream: bool = False) -> dict[str, Any]:
    """Evaluate a run on a split: writes ``metrics.json`` and figures to ``out_dir``
    (default ``run_dir/`` :func:`evaluation_folder`: ``eval-<split>`` for ``best.pt``,
    ``eval-<split>-last`` for ``last.pt``) and returns the metrics, among them the mean IWAE
    log-likelihood per sequence (``iwae_particles`` importance samples), which compares
    settings. An AutoGuide run fits its guide on the split first (``guide_steps`` steps); an
    amortized run's posterior is refined per sequence for ``refine_steps`` steps if that is
    positive (semi-amortized inference; ``0``: the encoder's posterior as it is).

    Calibration (``calibrate_on``, default the validation split; ``None``: raw only): the
    observation noise is fitted there (:func:`~pyro_physvae.diagnostics.estimate_noise`)
    and used for the posterior predictive (``predictive_coverage90``, the bands of the
    reconstruction figure), and where that split has true physics parameters their
    intervals are recalibrated there (split-conformal,
    :data:`~pyro_physvae.diagnostics.DEFAULT_INTERVAL_METHOD`) and applied to ``split``
    (``coverage90``, ``interval_width``). The raw figures stay as ``..._raw``; the
    ``calibration`` entry records the noise, the fits, their cost in seconds (the extra
    posterior draws of the calibration split) and ``notes`` says why raw intervals are
    narrow, or what could not be calibrated.

    The evaluation is the system's ``evaluator`` where it has one, else
    :func:`default_evaluator`; an evaluator that takes no ``calibration`` keyword is run
    uncalibrated, with a warning.

    ``stream``: read the observations from their files in chunks for data larger than
    memory. The evaluator then receives them as :class:`~pyro_physvae.data.lazy.LazyRows`
    (:func:`default_evaluator` and the image evaluator, :mod:`pyro_physvae.images`, stream
    them through :mod:`pyro_physvae.summaries`, and so does the refinement); an AutoGuide
    run's guide is fitted on the split read into memory.
    """
    run = load_run(run_dir, checkpoint, str(resolve_device(device)))
    ds = run.load(split, data_dir, lazy=stream)
    evaluator = run.system.evaluator or default_evaluator
    x = run.system.observations(ds, device)
    refine = run.applied_refine_steps(refine_steps)

    def guide_for(xs: Tensor) -> Callable:
        return run.guide_for(xs, steps=guide_steps, seed=seed, refine_steps=refine_steps)

    guide = guide_for(x)
    out = Path(out_dir) if out_dir else Path(run_dir) / evaluation_folder(split, checkpoint)
    kwargs: dict[str, Any] = {}
    if _accepts(evaluator, "calibration"):
        kwargs["calibration"] = calibration_split(run, split, calibrate_on, data_dir, guide_for, device,
                                                  lazy=stream)
    elif calibrate_on is not None:
        warnings.warn(f"the {run.system.name} system's evaluator takes no calibration= keyword: "
                      "its metrics are not calibrated", stacklevel=2)
    return evaluator(run, guide, ds, x, out, split=split, num_samples=num_samples,
                     iwae_particles=iwae_particles, seed=seed, refine_steps=refine, **kwargs)


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (or any keyword)."""
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def default_evaluator(run: Run, guide: Callable, ds: xr.Dataset, x: Tensor | LazyRows, out: Path, *,
                      split: str = "test", num_samples: int = 100, iwae_particles: int = 50,
                      seed: int = 0, refine_steps: int = 0,
                      calibration: CalibrationSplit | None = None) -> dict[str, Any]:
    """The evaluation of a system without its own ``evaluator``.

    From ``num_samples`` posterior draws of ``guide`` on the observations ``x (N, *event)``
    of ``ds`` (a tensor, or :class:`~pyro_physvae.data.lazy.LazyRows` read from the file a
    chunk at a time), summarised a chunk of sequences at a time
    (:func:`~pyro_physvae.summaries.posterior_summaries`) so that memory does not grow with
    the draws of the curves: :func:`summary_metrics`, the IWAE log-likelihood
    (``iwae_particles`` particles), the latents' correlations with the system's
    ``covariates`` and the system's ``extra_metrics`` (given the draws of every latent);
    writes ``metrics.json``, ``reconstructions.png`` (the first :data:`FIGURE_SEQUENCES`
    sequences, see :func:`plot_reconstructions`) and ``<parameter>.png`` per physics
    parameter with a truth to ``out``. ``refine_steps`` (already given to ``guide``) is
    recorded. ``calibration``: the split to calibrate noise and intervals on (see
    :func:`evaluate`; ``None``: raw only). Returns the metrics.
    """
    system, model = run.system, run.model
    cal = fit_calibration(run, calibration or CalibrationSplit(None, reason="not calibrated"),
                          num_samples, seed)
    summary = posterior_summaries(model, guide, x, num_samples, seed=seed, noise=cal.noise, keep_means=0,
                                  keep_draws=FIGURE_SEQUENCES, channel_moments=True)
    physics = physics_names(model)
    iwae = streamed_iwae(model, guide, x, iwae_particles, seed=seed)
    metrics = {**_header(run, split, num_samples, refine_steps),
               **summary_metrics(ds, summary, physics, cal),
               "iwae_log_likelihood": iwae_summary(iwae), **calibration_report(cal)}
    if system.covariates:
        metrics["latent_correlations"] = latent_correlations(summary, ds, system.covariates,
                                                             tuple(model.latent_sites))
    latents = {k: v for k, v in summary.items() if k not in (*PER_ROW, *LOG_LIKELIHOODS, "draws")}
    if system.extra_metrics is not None:
        metrics.update(system.extra_metrics(model, latents, ds))
    shown = summary["draws"]
    plot_reconstructions(system, ds, x[:shown["x"].shape[1]], shown, out / "reconstructions.png")
    for name in physics:
        if name in ds:
            plot_parameter(ds[name].values, summary[name], name, out / f"{name}.png",
                           units=ds[name].attrs.get("units", ""),
                           calibration=cal.intervals.get(name))
    write_json(metrics, out / "metrics.json")
    return metrics


def diagnose(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
             num_samples: int = 200, iwae_particles: int = 100, calibrate_on: str | None = "valid",
             out_dir: str | Path | None = None, checkpoint: str = "best.pt", seed: int = 0,
             guide_steps: int = 1000, refine_steps: int = 0, chains: int = 4,
             device: str = "cpu", stream: bool = False,
             predictive_sequences: int | None = None) -> dict[str, Any]:
    """Posterior diagnostics of a run on a split, written to ``out_dir``
    (default ``run_dir/diagnose-<split>``):

    * ``inference_data.nc``: ArviZ InferenceData (posterior, posterior_predictive,
      log_likelihood, observed_data, constant_data). With a calibration split, the
      posterior predictive and the per-sequence ``log_likelihood`` (summed over the event
      dims) use the noise fitted there (:func:`~pyro_physvae.diagnostics.estimate_noise`),
      so that ``az.loo``, ``az.waic`` and ``az.compare`` work on it; the model's own
      per-sequence log-likelihood is the posterior variable ``log_likelihood_raw``. The
      ``num_samples`` independent draws are split into up to ``chains`` chains
      (:func:`~pyro_physvae.diagnostics.split_chains`), so that ``az.summary`` runs its
      R-hat/ESS without shape-validation errors;
    * ``summary.csv``: ``az.summary(kind="stats")`` of the physics parameters per sequence
      (R-hat and ESS of independent draws say nothing of convergence);
    * ``calibration.csv`` / ``.md`` and ``calibration_<parameter>.png``: coverage of central
      intervals of each physics parameter at several levels: raw and, when ``calibrate_on``
      names a split with true values, widened by the factor that gives 90% coverage there
      and recalibrated by the default method fitted there at each level;
    * ``pareto_k.png``: the Pareto shape of each sequence's PSIS-LOO weights;
    * ``posterior.png`` (forest plot with the truth), ``ppc.png`` (``az.plot_ppc``),
      ``reconstructions.png`` (posterior-predictive bands over time);
    * ``diagnostics.json``: reconstruction metrics, IWAE test log-likelihood, coverages
      (calibrated and raw), ``loo`` (``elpd_loo``, its ``se_loo``, ``p_loo``, the shares of
      Pareto ``k`` above 0.7 and 1, ``elpd_waic``; see
      :func:`~pyro_physvae.diagnostics.loo_report`) and ``loo_raw`` with the model's noise,
      the fitted noise and the calibration's cost in seconds.

    An AutoGuide run fits its guide on each split first (``guide_steps`` steps); an amortized
    run's posterior is refined per sequence on each split for ``refine_steps`` steps if that
    is positive (see :func:`evaluate`). ``device``: where the model, the guide and the data
    live (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the draws go to the CPU for ArviZ and the files.

    The posterior is drawn a chunk of sequences at a time
    (:func:`~pyro_physvae.summaries.posterior_summaries`); every draw of the latents and of the
    per-sequence log-likelihood is kept, and of the replicates and curves those of the first
    ``predictive_sequences`` sequences (default: all; with ``stream``,
    :data:`STREAMED_PREDICTIVE_SEQUENCES`). With fewer than all, the curves go to the
    ``posterior_predictive`` group and ``observed_data`` holds those sequences (see
    :func:`~pyro_physvae.diagnostics.draws_to_inference_data`); the metrics, LOO and the
    calibration cover every sequence. ``stream``: read the observations from their files in
    chunks, for data larger than memory (as :func:`evaluate` does).
    """
    check_positive_int(num_samples, "num_samples")
    run = load_run(run_dir, checkpoint, device)
    ds = run.load(split, data_dir, lazy=stream)
    x = run.system.observations(ds, device)
    n = x.shape[0]
    if predictive_sequences is None:
        predictive_sequences = min(n, STREAMED_PREDICTIVE_SEQUENCES) if stream else n
    check_positive_int(predictive_sequences, "predictive_sequences")
    shown = min(predictive_sequences, n)

    def guide_for(x: Tensor | LazyRows) -> Callable:
        return run.guide_for(x, steps=guide_steps, seed=seed, refine_steps=refine_steps)

    cal_split = calibration_split(run, split, calibrate_on, data_dir, guide_for, device, lazy=stream)
    cal = fit_calibration(run, cal_split, num_samples, seed)
    guide = guide_for(x)
    summary = posterior_summaries(run.model, guide, x, num_samples, seed=seed, noise=cal.noise, keep_means=0,
                                  keep_draws=shown, channel_moments=True)
    draws = {**{k: v for k, v in summary.items() if k not in PER_ROW and k != "draws"}, **summary["draws"]}
    x_shown = x[:shown]
    physics = physics_names(run.model)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"diagnose-{split}"
    out.mkdir(parents=True, exist_ok=True)

    idata = draws_to_inference_data(draws, x_shown, dataset=ds, chains=split_chains(num_samples, chains),
                                    noise=cal.noise)
    atomic_write(out / "inference_data.nc", idata.to_netcdf)
    if physics:
        summary_table = az.summary(idata, var_names=list(physics), kind="stats", hdi_prob=INTERVAL)
        summary_table.to_csv(out / "summary.csv")
    iwae = streamed_iwae(run.model, guide, x, iwae_particles, seed=seed)
    loo = psis_loo(idata)  # once, for the report and the figure
    report: dict[str, Any] = {
        **_header(run, split, num_samples, run.applied_refine_steps(refine_steps)),
        "guide": run.guide_kind, **summary_metrics(ds, summary, physics, cal),
        "iwae_log_likelihood": iwae_summary(iwae), "predictive_sequences": shown,
        "loo": loo_report(idata, loo=loo), "loo_raw": raw_loo_report(idata), **calibration_report(cal),
    }
    plot_pareto_k(loo, out / "pareto_k.png")
    report["calibration"] = _calibrate(run, draws, ds, physics, cal, out)
    plot_reconstructions(run.system, ds, x_shown, draws, out / "reconstructions.png")
    _plot_forest(idata, physics, ds, out / "posterior.png")
    az.plot_ppc(idata, num_pp_samples=min(50, num_samples), random_seed=seed)
    save_figure(plt.gcf(), out / "ppc.png")
    write_json(report, out / "diagnostics.json")
    return report


def _calibrate(run: Run, draws: dict[str, Tensor], ds: xr.Dataset, physics: tuple[str, ...],
               cal: Calibration, out: Path) -> dict[str, Any]:
    """Calibration tables of every physics parameter with a truth; see :func:`diagnose`.
    ``cal`` holds the calibration split's draws and truths (from :func:`fit_calibration`)."""
    names = [p for p in physics if p in ds]
    if not names:
        return {}
    result, rows = {}, []
    for name in names:
        tables = {"posterior": calibration(draws[name], ds[name].values)}
        entry: dict[str, Any] = {"coverage": _coverage_by_level(tables["posterior"])}
        if name in cal.truths:
            held_out, truth_cal = cal.samples[name], cal.truths[name]
            factor = interval_widening(held_out, truth_cal, INTERVAL)
            widened = calibration(draws[name], ds[name].values, widen=factor)
            tables[f"widened x{factor:.3g} on {cal.split}"] = widened
            recal = conformal_calibration(held_out, truth_cal, draws[name], ds[name].values)
            tables[f"{DEFAULT_INTERVAL_METHOD} conformal on {cal.split}"] = recal
            entry.update(widening_factor=factor, widened_coverage=_coverage_by_level(widened),
                         calibrated_method=DEFAULT_INTERVAL_METHOD,
                         calibrated_coverage=_coverage_by_level(recal))
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
    save_figure(ax.figure, path)


def counterfactual(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test",
                   factors: Sequence[float] = COUNTERFACTUAL_FACTORS, parameter: str | None = None,
                   n_sequences: int = 100, num_samples: int = 100, out_dir: str | Path | None = None,
                   checkpoint: str = "best.pt", seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Decode sequences with one inferred physics parameter multiplied by each factor and
    compare with the system's truth with the true parameter multiplied by the same factor
    (the system's ``counterfactual_truth``).

    The other latents stay at their posterior means (``num_samples`` draws); the scaled
    parameter is not clamped to its feasible range, so factors such as 3 leave the training
    range. ``parameter``: the physics parameter to scale (default: the model's first).
    Writes ``counterfactual.json`` (per factor the MSE of the full decoding and, where the
    model records one, of its physics-only part ``x_P``, against the truth) and
    ``counterfactual.png`` to ``out_dir`` (default ``run_dir/counterfactual-<split>``).
    ``device``: where the model and the data live (the truth is moved there).

    Raises:
        ValueError: a factor that is not positive and finite; a system without
            ``counterfactual_truth``; a model without physics parameters; an unknown
            ``parameter``.
    """
    factors = tuple(float(f) for f in factors)
    for f in factors:
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"factors must be positive and finite, got {f}")
    run = load_run(run_dir, checkpoint, device)
    name = _counterfactual_parameter(run, parameter)
    ds = run.load(split, data_dir)
    ds = ds.isel(sequence=slice(0, check_positive_int(n_sequences, "n_sequences")))
    x = run.system.observations(ds, device)
    draws = sample_posterior(run.model, run.guide_for(x, seed=seed), x, num_samples, seed=seed)
    mean = {k: draws[k].mean(0) for k in run.model.latent_sites}
    init = run.model.initial_condition(x)
    results, curves, clamped = [], {}, False
    with torch.no_grad():
        for f in factors:
            true = run.system.counterfactual_truth(ds, name, f).to(x)  # x's dtype and device
            dec, clamped = decode_unclamped(run.model, init, {**mean, name: mean[name] * f})
            row = {"factor": f, "mse": float((dec["x_mean"] - true).pow(2).mean())}
            if "x_P" in dec:
                row["physics_only_mse"] = float((dec["x_P"] - true).pow(2).mean())
            results.append(row)
            curves[f] = (true, dec["x_mean"], dec.get("x_P"))
    out = Path(out_dir) if out_dir else Path(run_dir) / f"counterfactual-{split}"
    plot_counterfactual(ds, curves, name, out / "counterfactual.png")
    report = {"system": run.system.name, "setting": run.setting.value, "split": split,
              "parameter": name, "clamped": clamped, "n_sequences": int(x.shape[0]), "results": results}
    write_json(report, out / "counterfactual.json")
    return report


def _counterfactual_parameter(run: Run, parameter: str | None) -> str:
    """The physics parameter a counterfactual scales, after checking that the run's system
    and model allow one."""
    if run.system.counterfactual_truth is None:
        raise ValueError(f"the {run.system.name} system has no counterfactual truth: its System "
                         "entry sets no counterfactual_truth(ds, name, factor) hook")
    physics = physics_names(run.model)
    if not physics:
        raise ValueError(f"a counterfactual needs a physics parameter; the {run.setting.value} model "
                         "has none")
    if parameter is None:
        return physics[0]
    if parameter not in physics:
        raise ValueError(f"{parameter!r} is not a physics parameter of this model; choose one of "
                         f"{list(physics)}")
    return parameter


def decode_unclamped(model: PyroModule, init: Tensor | None, latents: Mapping[str, Tensor]
                     ) -> tuple[dict[str, Tensor], bool]:
    """``model.decode_sites(init, latents, clamp=False)``, and ``False`` (not clamped).

    A model whose ``decode_sites`` takes no ``clamp`` keyword decodes as it always does,
    with a warning, and ``True`` is returned: its physics parameters may have been clamped.
    """
    params = inspect.signature(model.decode_sites).parameters
    if "clamp" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return model.decode_sites(init, latents, clamp=False), False
    warnings.warn(f"{type(model).__name__}.decode_sites takes no clamp= keyword: values beyond the "
                  "feasible range may be clamped", stacklevel=2)
    return model.decode_sites(init, latents), True
