"""Evaluation of image models (observations ``(N, bands, rows, cols)``, e.g. galaxies).

* :func:`evaluate_images`: the galaxy system's ``evaluator`` (what
  :func:`pyro_physvae.evaluate.default_evaluator` does for series), streamed over chunks of
  images so that memory stays bounded (a draw of one 69 x 69 x 3 image is 14283 numbers):
  posterior-mean reconstruction MSE, physics-only MSE, 90% posterior-predictive coverage,
  physics-parameter errors (angles modulo their period), IWAE log-likelihood; figures of
  data / reconstruction / physics only, random generations and traversals of each physics
  parameter; and :func:`rotation_check`, which measures whether a
  traversal of an angle rotates the generated image and changes nothing else.
* angle statistics: :func:`circular_mean`, :func:`error_concentration`, :func:`angle_metrics`.

Angles with a ``period`` (a :class:`~pyro_physvae.models.galaxy.ImageParameter` attribute)
are compared modulo that period: an ellipse at ``theta`` is the same at ``theta + pi``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from torch import Tensor  # noqa: E402

from pyro_physvae.data.galaxy import pixel_grid, rotate_images  # noqa: E402
from pyro_physvae.figures import plot_parameter, save_figure  # noqa: E402
from pyro_physvae.regularizers import wrapped_error  # noqa: E402
from pyro_physvae.report import (  # noqa: E402
    INTERVAL,
    Calibration,
    CalibrationSplit,
    interval_metrics,
    iwae_summary,
    parameter_metrics,
    write_json,
)
from pyro_physvae.summaries import fit_calibration_in_chunks, posterior_summaries, streamed_iwae  # noqa: E402

#: Images decoded at once (images per chunk x draws), which bounds the memory of a pass: at
#: 69 x 69, 25 images x 10 draws raised the peak of a streamed evaluation by 0.25 GB more
#: than 5 x 10 did, at the same speed (``benchmarks/RESULTS.md``, "Data larger than memory").
DECODED_PER_PASS = 50


def images_per_chunk(draws: int) -> int:
    """Images per chunk when each is decoded ``draws`` times: :data:`DECODED_PER_PASS`
    decodes at once, at least one image."""
    return max(1, DECODED_PER_PASS // draws)
#: Images shown in the reconstruction figure (their posterior-mean images are kept).
FIGURE_IMAGES = 6


# -- angles -----------------------------------------------------------------------------------
def circular_mean(samples: Tensor, period: float, dim: int = 0) -> Tensor:
    """Mean direction of angles with ``period`` along ``dim``, in ``[0, period)``."""
    phase = 2 * math.pi * samples / period
    mean = torch.atan2(torch.sin(phase).mean(dim), torch.cos(phase).mean(dim))
    return torch.remainder(mean * period / (2 * math.pi), period)


def circular_correlation(a: np.ndarray, b: np.ndarray, period: float) -> float:
    """Jammalamadaka-SenGupta circular correlation of two angle samples ``(N,)`` with
    ``period``. It is unstable for angles spread uniformly round the circle (their mean
    directions are then ill defined): read it with :func:`error_concentration`."""
    pa, pb = (2 * np.pi * np.asarray(v, dtype=np.float64) / period for v in (a, b))
    ma = np.arctan2(np.sin(pa).mean(), np.cos(pa).mean())
    mb = np.arctan2(np.sin(pb).mean(), np.cos(pb).mean())
    sa, sb = np.sin(pa - ma), np.sin(pb - mb)
    denom = math.sqrt(float((sa**2).sum() * (sb**2).sum()))
    return float((sa * sb).sum() / denom) if denom > 0 else math.nan


def error_concentration(estimate: np.ndarray, truth: np.ndarray, period: float) -> float:
    """Mean resultant length of the angle errors, ``|mean exp(2 pi i (estimate - truth) /
    period)|``: 1 when the estimates match the truth up to a constant offset, near 0 when they
    are unrelated. (Unlike a circular correlation coefficient, it stays well defined for
    angles spread uniformly round the circle, as galaxy orientations are.)"""
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    phase = 2 * np.pi * diff / period
    return float(np.abs(np.exp(1j * phase).mean()))


def angle_metrics(samples: Tensor, truth: np.ndarray, period: float, level: float = INTERVAL,
                  calibration: Calibration | None = None, name: str = "",
                  seq: Tensor | None = None) -> dict[str, Any]:
    """Errors of the posterior circular mean of an angle against the truth, modulo
    ``period``: MAE, RMSE, median absolute error (also in degrees), circular correlation and
    error concentration;
    coverage and mean width of the central ``level`` interval of the draws around their mean
    direction, recalibrated where ``calibration`` has a fit for ``name`` and raw
    (``..._raw``; see :func:`pyro_physvae.report.interval_metrics`). ``samples (S, N)``,
    ``truth (N,)``; ``seq (N,)``: the rows' spread factors for ``"seq-rescale+widen"``."""
    truth_t = torch.as_tensor(np.asarray(truth), dtype=samples.dtype, device=samples.device)
    mean = circular_mean(samples, period)
    err = wrapped_error(mean - truth_t, period).abs()
    deg = 360.0 / (2 * math.pi)
    return {"mae": float(err.mean()), "rmse": float(err.pow(2).mean().sqrt()),
            "median_abs_error": float(err.median()), "mae_deg": float(err.mean()) * deg,
            "median_abs_error_deg": float(err.median()) * deg,
            "corr": circular_correlation(mean.cpu().numpy(), truth, period),
            "error_concentration": error_concentration(mean.cpu().numpy(), truth, period),
            **interval_metrics(samples, np.asarray(truth), calibration, name, level=level, period=period,
                               seq=seq),
            "period": float(period)}


def parameter_summary(samples: Tensor, truth: np.ndarray, period: float | None,
                      calibration: Calibration | None = None, name: str = "",
                      seq: Tensor | None = None) -> dict[str, Any]:
    """Metrics of one physics parameter: :func:`angle_metrics` for an angle, else those of
    :func:`pyro_physvae.report.parameter_metrics` plus the median absolute error; intervals
    recalibrated by ``calibration``'s fit for ``name`` where it has one."""
    if period is not None:
        return angle_metrics(samples, truth, period, calibration=calibration, name=name, seq=seq)
    out = parameter_metrics(samples, truth, calibration=calibration, name=name, seq=seq)
    out["median_abs_error"] = float(np.median(np.abs(samples.mean(0).cpu().numpy() - truth)))
    return out


# -- decoding helpers -----------------------------------------------------------------------------
def mean_latents(summary: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """Posterior means ``(N, ...)`` of the latents ``names`` from draws ``(S, N, ...)``.
    (An angle's draws come from an unwrapped Normal, so their plain mean is its centre.)"""
    return {n: summary[n].mean(0) for n in names if n in summary}


@torch.no_grad()
def decode_latents(model: Any, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's images for latents by site name (physics parameters ``(..., B)``,
    ``z_A2 (..., B, dim)``)."""
    params = {p.name: latents[p.name] for p in model.physics_parameters} or None
    return model.decode(params, latents.get("z_A2"))


def traversal(model: Any, base: Mapping[str, Tensor], name: str, values: Tensor) -> dict[str, Tensor]:
    """Images ``(K, 3, S, S)`` of one galaxy's latents ``base`` (scalars; ``z_A2 (dim,)``)
    with the physics parameter ``name`` set to each of ``values (K,)`` in turn."""
    k = values.shape[0]
    lat = {n: v.expand(k, *v.shape) for n, v in base.items()}
    lat[name] = values
    return decode_latents(model, lat)


def _period(model: Any, name: str) -> float | None:
    return next((getattr(p, "period", None) for p in model.physics_parameters if p.name == name), None)


# -- the rotation check ---------------------------------------------------------------------------
def image_moments(img: Tensor, mask_radius: float = 0.9) -> dict[str, Tensor]:
    """Flux, orientation [rad, modulo pi] and axis ratio (from second moments) of images
    ``(..., C, S, S)`` summed over bands, inside the disk of ``mask_radius``."""
    x, y = pixel_grid(img.shape[-1], dtype=img.dtype, device=img.device)
    w = img.sum(-3) * ((x**2 + y**2) <= mask_radius**2)
    flux = w.sum((-2, -1))
    mx, my = (w * x).sum((-2, -1)) / flux, (w * y).sum((-2, -1)) / flux
    dx, dy = x - mx[..., None, None], y - my[..., None, None]
    mxx, myy = (w * dx**2).sum((-2, -1)) / flux, (w * dy**2).sum((-2, -1)) / flux
    mxy = (w * dx * dy).sum((-2, -1)) / flux
    angle = torch.remainder(0.5 * torch.atan2(2 * mxy, mxx - myy), math.pi)
    root = torch.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
    lam1, lam2 = (mxx + myy) / 2 + root, ((mxx + myy) / 2 - root).clamp_min(0)
    return {"flux": flux, "angle": angle, "axis_ratio": torch.sqrt(lam2 / lam1)}


@torch.no_grad()
def rotation_check(model: Any, base: Mapping[str, Tensor], name: str = "theta", n_angles: int = 8,
                   mask_radius: float = 0.9) -> dict[str, float]:
    """Does a traversal of the angle ``name`` rotate the generated images and change
    nothing else?

    For each galaxy of ``base`` (latents ``(K, ...)``) and ``delta = j pi / n_angles``
    (``j = 1 .. n_angles - 1``), with ``G(a)`` the image at angle ``a`` (other latents fixed),
    inside the disk of ``mask_radius``:

    * ``rotation_residual_fraction``: ``sum_j |G(a0 + delta) - rot_delta G(a0)|^2 /
      sum_j |G(a0 + delta) - G(a0)|^2``, the share of the change that a rigid rotation of
      the first image does not explain (0: a pure rotation; 1: nothing like one); median over
      galaxies. ``..._physics`` is the same for the physics-only images, whose rotation is
      exact up to the resampling error of ``rot``: the floor of this measure;
    * ``orientation_error_deg``: median over galaxies and angles of the error of the images'
      second-moment orientation against ``orientation(G(a0)) + delta``, modulo 180 degrees;
    * ``flux_rel_std``, ``axis_ratio_rel_std``: median over galaxies of the relative standard
      deviation, across the angles, of total flux and second-moment axis ratio.
    """
    a0 = base[name]
    k = a0.shape[0]
    deltas = torch.arange(n_angles, dtype=a0.dtype, device=a0.device) * math.pi / n_angles  # includes 0
    # One angle at a time: decoding the J x K images at once took 0.6 GB at 69 x 69.
    turns = [decode_latents(model, {**base, name: a0 + delta}) for delta in deltas]
    images = {key: torch.stack([turn[key] for turn in turns]) for key in turns[0]}  # (J, K, ...)
    x, y = pixel_grid(images["x_mean"].shape[-1], dtype=a0.dtype, device=a0.device)
    mask = ((x**2 + y**2) <= mask_radius**2).to(a0.dtype)
    out: dict[str, float] = {"n_galaxies": k, "n_angles": n_angles}
    for key, label in (("x_mean", ""), ("x_P", "_physics")):
        if key not in images:
            continue
        g = images[key]  # (J, K, C, S, S)
        rotated = rotate_images(g[0].unsqueeze(0).expand_as(g), deltas[:, None].expand(n_angles, k))
        num = ((g - rotated).pow(2) * mask).sum((-3, -2, -1))[1:].sum(0)
        den = ((g - g[0]).pow(2) * mask).sum((-3, -2, -1))[1:].sum(0)
        out[f"rotation_residual_fraction{label}"] = float((num / den.clamp_min(1e-12)).median())
        if label:
            continue
        mom = image_moments(g, mask_radius)
        err = wrapped_error(mom["angle"] - (mom["angle"][0] + deltas[:, None]), math.pi).abs()[1:]
        out["orientation_error_deg"] = float(err.median()) * 180 / math.pi
        out["flux_rel_std"] = float((mom["flux"].std(0) / mom["flux"].mean(0)).median())
        out["axis_ratio_rel_std"] = float((mom["axis_ratio"].std(0) / mom["axis_ratio"].mean(0)).median())
    return out


# -- figures ----------------------------------------------------------------------------------------
def _rgb(img: Tensor | np.ndarray) -> np.ndarray:
    """``(3, S, S)`` -> ``(S, S, 3)`` clipped to ``[0, 1]`` for ``imshow``."""
    arr = img.detach().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img)
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)


def plot_image_grid(rows: Sequence[Mapping[str, Tensor]], path: Path, *,
                    row_labels: Sequence[str] | None = None, title: str = "", cell: float = 1.7) -> Path:
    """A grid of RGB images: one row per entry of ``rows`` (``{column title: (3, S, S)}``).
    A column titled with a leading ``|`` is drawn as a colour map of its absolute band sum
    (for errors), on one scale for all such panels of the figure, with a colour bar."""
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cell * cols, cell * len(rows) + 0.6), squeeze=False)
    err_max = max((float(v.abs().sum(0).max()) for r in rows for k, v in r.items() if k.startswith("|")),
                  default=1.0) or 1.0
    for i, row in enumerate(rows):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            key, img = list(row.items())[j]
            if key.startswith("|"):
                im = ax.imshow(img.abs().sum(0).cpu().numpy(), cmap="magma", vmin=0, vmax=err_max)
                # One scale for every error panel; the bar says what the colours mean.
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label(
                    "|error| summed over bands", fontsize=6)
            else:
                ax.imshow(_rgb(img))
            if i == 0 or row_labels is None:
                ax.set_title(key, fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_image_reconstructions(ds: xr.Dataset, x: Tensor, draws: Mapping[str, Tensor], path: Path,
                               n: int = 6) -> Path:
    """Data, posterior-mean reconstruction, physics-only part (where the model has one) and
    the absolute error summed over bands, for the first ``n`` images. ``draws`` holds either
    draws ``(S, N, 3, S, S)`` or means ``(N, 3, S, S)`` of ``x_mean`` and ``x_P``."""
    def mean(key: str) -> Tensor:
        v = draws[key]
        return v.mean(0) if v.dim() == x.dim() + 1 else v

    recon = mean("x_mean")
    rows = []
    for i in range(min(n, x.shape[0])):
        row = {"data": x[i], "reconstruction": recon[i]}
        if "x_P" in draws:
            row["physics only"] = mean("x_P")[i]
        row["|reconstruction - data|"] = recon[i] - x[i]
        rows.append(row)
    labels = [f"image {int(s)}" for s in ds["sequence"].values[:len(rows)]]
    return plot_image_grid(rows, path, row_labels=labels)


@torch.no_grad()
def plot_generations(model: Any, path: Path, n: int = 8, seed: int = 0) -> Path:
    """``n`` random images of the model: with physics, parameters drawn uniformly over their
    prior ranges (the user's plausible ranges) and ``z_A2`` from its prior, as the full image and
    its physics-only part; and ``n`` draws of the generative program itself (the Normal priors
    of the physics parameters are wide, 0.866 x the range, so many of those hit the feasible
    range's bounds)."""
    pyro.set_rng_seed(seed)
    rows, labels = [], []
    if model.physics_parameters:
        dev = model._dtype_probe().device
        lat = {p.name: p.sample_uniform((n,), device=dev) for p in model.physics_parameters}
        lat.update({k: torch.randn(n, d, device=dev) for k, d in model.aux_dims.items()})
        images = decode_latents(model, lat)
        rows += [{f"sample {i}": images[key][i] for i in range(n)} for key in ("x_mean", "x_P")]
        labels += ["z_P uniform in range", "its physics part"]
    tr = poutine.trace(model).get_trace(size=n)
    rows.append({f"sample {i}": tr.nodes["x_mean"]["value"][i] for i in range(n)})
    labels.append("model prior")
    return plot_image_grid(rows, path, row_labels=labels, title="random generations")


def traversal_values(model: Any, name: str, n: int) -> Tensor:
    """``n`` values of a physics parameter across its prior range (an angle: one period)."""
    p = next(q for q in model.physics_parameters if q.name == name)
    dev = model._dtype_probe().device
    period = getattr(p, "period", None)
    if period is not None:
        return p.low + torch.arange(n, device=dev) * period / n
    return torch.linspace(p.low, p.high, n, device=dev)


@torch.no_grad()
def plot_traversals(model: Any, base: Mapping[str, Tensor], path: Path, n: int = 7) -> Path:
    """One row per physics parameter: the image of one galaxy's latents ``base`` with that
    parameter swept across its prior range, the others fixed (the paper's interpretable
    control); for an angle, a second row shows the physics-only part."""
    rows, labels = [], []
    for p in model.physics_parameters:
        values = traversal_values(model, p.name, n)
        imgs = traversal(model, base, p.name, values)
        angle = getattr(p, "period", None) is not None
        text = [f"{math.degrees(float(v)):.0f} deg" if angle else f"{float(v):.2f}" for v in values]
        rows.append({f"{p.name}={t}": imgs["x_mean"][i] for i, t in enumerate(text)})
        labels.append(f"vary {p.name}")
    return plot_image_grid(rows, path, row_labels=labels, title="traversals: one physics parameter at a time")


def plot_parameter_recovery(summary: Mapping[str, Tensor], ds: xr.Dataset, model: Any,
                            out: Path) -> list[Path]:
    """Posterior mean against the truth for every physics parameter with one; angles as
    their circular mean modulo the period."""
    paths = []
    for p in model.physics_parameters:
        if p.name not in ds or p.name not in summary:
            continue
        period = getattr(p, "period", None)
        if period is None:
            paths.append(plot_parameter(ds[p.name].values, summary[p.name], p.name, out / f"{p.name}.png"))
            continue
        mean = circular_mean(summary[p.name], period).cpu().numpy()
        truth = np.remainder(ds[p.name].values, period)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(truth, mean, ".", ms=3, alpha=0.6)
        ax.plot([0, period], [0, period], "k--", lw=1)
        ax.set_xlabel(f"true {p.name} (mod {period:.4g})")
        ax.set_ylabel(f"inferred {p.name} (circular mean, mod {period:.4g})")
        paths.append(save_figure(fig, out / f"{p.name}.png"))
    return paths


# -- the whole evaluation ---------------------------------------------------------------------------
def evaluate_images(run: Any, guide: Callable, ds: xr.Dataset, x: Tensor, out: Path, *, split: str = "test",
                    num_samples: int = 100, iwae_particles: int = 50, seed: int = 0,
                    n_traversal: int = 16, refine_steps: int = 0,
                    calibration: CalibrationSplit | None = None) -> dict[str, Any]:
    """Metrics and figures of an image run (see the module docs); writes ``metrics.json``,
    ``reconstructions.png``, ``generations.png`` and, with physics, ``traversals.png``,
    ``<parameter>.png`` to ``out`` and returns the metrics. ``refine_steps`` is recorded in
    the metrics: the per-sequence refinement steps already given to ``guide``.
    ``calibration``: the split to fit the noise per band and the parameters' interval
    recalibrations on (:func:`~pyro_physvae.summaries.fit_calibration_in_chunks`; as
    :func:`pyro_physvae.evaluate.evaluate` does for series); ``None``: raw only."""
    model = run.model
    chunk = images_per_chunk(num_samples)
    cal = fit_calibration_in_chunks(model, calibration or CalibrationSplit(None, reason="not calibrated"),
                                    num_samples, seed=seed, chunk=chunk)
    summary = posterior_summaries(model, guide, x, num_samples, seed=seed, noise=cal.noise,
                                  keep_means=FIGURE_IMAGES, chunk=chunk)
    metrics: dict[str, Any] = {
        "system": run.system.name, "setting": run.setting.value, "split": split,
        "checkpoint_epoch": run.checkpoint["epoch"], "num_samples": num_samples,
        "refine_steps": refine_steps,
        "n_sequences": int(x.shape[0]), "recon_mse": float(summary["mse"].mean())}
    if "mse_P" in summary:  # images of one size: the mean of the per-image errors is the overall one
        metrics["physics_only_mse"] = float(summary["mse_P"].mean())
    metrics["predictive_coverage90"] = float(summary["predictive_coverage"].mean())
    metrics["predictive_coverage90_raw"] = float(summary["predictive_coverage_raw"].mean())
    seq = summary["mse"].sqrt() / cal.seq_scale_model if cal.intervals else None
    for p in model.physics_parameters:
        if p.name in ds and p.name in summary:
            period = getattr(p, "period", None)
            metrics[p.name] = parameter_summary(summary[p.name], ds[p.name].values, period,
                                                calibration=cal, name=p.name, seq=seq)
    metrics["calibration_fit"] = cal.to_dict()
    metrics["notes"] = " ".join(cal.notes)
    iwae = streamed_iwae(model, guide, x, iwae_particles, seed=seed, chunk=images_per_chunk(iwae_particles))
    metrics["iwae_log_likelihood"] = iwae_summary(iwae)
    out.mkdir(parents=True, exist_ok=True)
    plot_image_reconstructions(ds, x, summary, out / "reconstructions.png")
    plot_generations(model, out / "generations.png", seed=seed)
    names = [*(p.name for p in model.physics_parameters), *model.aux_dims]
    base = mean_latents(summary, names)
    if model.physics_parameters:
        first = {k: v[0] for k, v in base.items()}
        plot_traversals(model, first, out / "traversals.png")
        plot_parameter_recovery(summary, ds, model, out)
        angle = next((p.name for p in model.physics_parameters if getattr(p, "period", None)), None)
        if angle is not None:
            k = min(n_traversal, x.shape[0])
            metrics[f"{angle}_traversal"] = rotation_check(model, {n: v[:k] for n, v in base.items()}, angle)
    write_json(metrics, out / "metrics.json")
    return metrics
