"""Posterior summaries computed a chunk of rows at a time, so that memory stays bounded.

Draws of the reconstruction and of the replicates are ``(S, N, *event)``: for 1000
advection-diffusion fields of 20 x 50 at 100 draws, 400 MB a site. An evaluation needs only a
few numbers per row from them (errors, coverages, residual moments) plus the draws of the
latents, which are small. :func:`posterior_summaries` draws the posterior of a chunk of rows,
keeps those numbers and the latents, and lets the chunk's curves go; the rows may be a tensor
or :class:`~pyro_physvae.data.lazy.LazyRows`, read from their file a chunk at a time.
:func:`streamed_iwae` does the same for the IWAE log-likelihood and
:func:`fit_calibration_in_chunks` for the noise and interval calibration on another split.
Series (:func:`pyro_physvae.evaluate.default_evaluator`) and images
(:mod:`pyro_physvae.images`) are evaluated through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyro_physvae.autoguides import supports_subsampling
from pyro_physvae.data.lazy import LazyRows
from pyro_physvae.diagnostics import (
    NoiseEstimate,
    iwae_log_likelihood,
    noise_channel_axes,
    noise_from_moments,
    pooled_means,
    residual_moments,
    sample_posterior,
    with_noise,
)
from pyro_physvae.report import INTERVAL, Calibration, CalibrationSplit, build_calibration

#: Numbers of one curve site decoded at once (rows x draws x event size) by default: for the
#: pendulum (50 steps) at 100 draws that is 500 rows, for advection-diffusion (20 x 50) 25.
NUMBERS_PER_PASS = 2_500_000

#: The curves of :func:`~pyro_physvae.diagnostics.sample_posterior` that
#: :func:`posterior_summaries` reduces per row instead of keeping.
_CURVES = ("x", "x_raw", "x_mean", "x_P")
#: The per-draw log-likelihoods of each row that :func:`posterior_summaries` keeps ``(S, N)``.
LOG_LIKELIHOODS = ("log_likelihood", "log_likelihood_raw")

#: Per-row entries of :func:`posterior_summaries` (the latents are ``(S, N, ...)``).
PER_ROW = ("x_mean", "x_P", "mse", "mse_P", "predictive_coverage", "predictive_coverage_raw",
           "resid_ml", "resid_plugin", "mean_x", "mean_x2", "mse_P_channel")


def rows_per_chunk(draws: int, event_numel: int, budget: int = NUMBERS_PER_PASS) -> int:
    """Rows per chunk when each row of ``event_numel`` numbers is decoded ``draws`` times:
    ``budget`` numbers a site at once, at least one row."""
    return max(1, budget // max(1, draws * event_numel))


def row_summaries(x: Tensor, draws: Mapping[str, Tensor], *, channel_axes: tuple[int, ...],
                  channel_moments: bool = False) -> dict[str, Tensor]:
    """The per-row numbers of :func:`posterior_summaries` from one chunk's draws.

    Args:
        x: observations ``(n, *event)``.
        draws: ``x_mean``, ``x`` (replicates) and optionally ``x_P``, ``x_raw`` (raw
            replicates, where ``x`` carries a fitted noise), each ``(S, n, *event)``.
        channel_axes: event axes of the noise channels
            (:func:`~pyro_physvae.diagnostics.noise_channel_axes`).
        channel_moments: add the per-channel moments for the variance explained by ``x_P``.

    Returns:
        ``mse``, ``mse_P``, ``predictive_coverage``, ``predictive_coverage_raw`` ``(n,)`` and
        ``resid_ml``, ``resid_plugin`` (and the moments) ``(n, C)``.
    """
    s = draws["x"].shape[0]
    k_lo, k_hi = round((1 - INTERVAL) / 2 * (s - 1)), round((1 + INTERVAL) / 2 * (s - 1))

    def coverage(replicates: Tensor) -> Tensor:
        ranked = replicates.sort(0).values  # nearest-rank quantiles over the draws
        return ((x >= ranked[k_lo]) & (x <= ranked[k_hi])).flatten(1).float().mean(1)

    mean = draws["x_mean"].mean(0)
    out = {"mse": (mean - x).pow(2).flatten(1).mean(1),
           "resid_ml": residual_moments(x, draws["x_mean"], channel_axes),
           "resid_plugin": residual_moments(x, mean, channel_axes),
           "predictive_coverage": coverage(draws["x"]),
           "predictive_coverage_raw": coverage(draws.get("x_raw", draws["x"]))}
    if "x_P" in draws:
        phys = draws["x_P"].mean(0)
        out["mse_P"] = (phys - x).pow(2).flatten(1).mean(1)
        if channel_moments:
            xd, series = x.double(), tuple(range(x.dim() - 2))  # channels: all but the time axis
            out["mean_x"] = pooled_means(xd, series)
            out["mean_x2"] = pooled_means(xd.pow(2), series)
            out["mse_P_channel"] = pooled_means((xd - phys.double()).pow(2), series)
    return out


def posterior_summaries(model: Callable, guide: Callable, x: Tensor | LazyRows, num_samples: int, *,
                        seed: int = 0, chunk: int | None = None, noise: NoiseEstimate | None = None,
                        keep_means: int | None = None, keep_draws: int = 0,
                        channel_moments: bool = False) -> dict[str, Any]:
    """Posterior summaries of the rows ``x (N, *event)``, ``chunk`` rows at a time (default
    :func:`rows_per_chunk`), so that memory is bounded by a chunk's draws plus what is kept:

    * draws of every latent ``(S, N, ...)`` and of each row's log-likelihood ``(S, N)``
      (:data:`LOG_LIKELIHOODS`: with the fitted ``noise`` where given, and the model's own);
    * the posterior means of the curves ``x_mean`` (and ``x_P`` where the model has it)
      ``(K, *event)`` of the first ``K = keep_means`` rows (``None``: all ``N``);
    * the per-row numbers of :func:`row_summaries`: per row ``(N,)`` the mean squared error
      of those means (``mse``, ``mse_P``) and the fraction of elements inside the central
      90% posterior-predictive interval (``predictive_coverage``: with the fitted ``noise``
      where given, see :func:`~pyro_physvae.diagnostics.with_noise`;
      ``predictive_coverage_raw``: with the model's own); per row and channel ``(N, C)``
      the mean squared residual of the draws ``resid_ml`` and of their mean
      ``resid_plugin``; with ``channel_moments``, the moments that
      :func:`variance_explained_from_moments` reduces;
    * ``"draws"``: every draw ``(S, R, *event)`` of ``x`` (replicates, with the fitted noise
      where given; then ``x_raw`` too), ``x_mean`` and ``x_P`` of the first
      ``R = keep_draws`` rows, for the figures.
    """
    n = x.shape[0]
    kept = n if keep_means is None else keep_means
    chunk = chunk or rows_per_chunk(num_samples, int(np.prod(x.shape[1:])))
    if not supports_subsampling(guide):
        chunk = n  # its latents are drawn for all the rows at once
    axes = noise_channel_axes(x.shape[1:], getattr(model, "observation_dims", None))
    parts: list[dict[str, Tensor]] = []
    first: dict[str, list[Tensor]] = {}
    for i, start in enumerate(range(0, n, chunk)):
        xb = x[start:start + chunk]
        # The chunk's rows of the N: a guide fitted to all N rows (a refined one) draws theirs.
        rows = {"size": n, "subsample": torch.arange(start, start + xb.shape[0], device=xb.device)}
        draws = with_noise(sample_posterior(model, guide, xb, num_samples, batch_size=None, seed=seed + i,
                                            **rows), xb, noise, seed=seed + i)
        part = {k: v for k, v in draws.items() if k not in _CURVES}
        part.update(row_summaries(xb, draws, channel_axes=axes, channel_moments=channel_moments))
        for key in ("x_mean", "x_P"):
            if key in draws:  # a mean is a new tensor: the chunk's draws are not kept alive
                part[key] = draws[key][:, :max(0, kept - start)].mean(0)
        if start < keep_draws:
            for key in ("x", "x_raw", "x_mean", "x_P"):
                if key in draws:
                    first.setdefault(key, []).append(draws[key][:, :keep_draws - start].clone())
        parts.append(part)
    out: dict[str, Any] = {k: torch.cat([p[k] for p in parts], dim=0 if k in PER_ROW else 1)
                           for k in parts[0]}
    out["draws"] = {k: torch.cat(v, dim=1) for k, v in first.items()}
    return out


def variance_explained_from_moments(summary: Mapping[str, Tensor]) -> float:
    """``1 - sum (x - x_P)^2 / sum (x - mean)^2`` over all elements, the mean taken per
    channel over rows and time (as :func:`pyro_physvae.evaluate.variance_explained`), from
    the per-row moments ``mean_x``, ``mean_x2``, ``mse_P_channel`` of
    :func:`posterior_summaries` (``channel_moments=True``)."""
    m1, m2 = summary["mean_x"], summary["mean_x2"]
    centred = (m2.mean(0) - m1.mean(0).pow(2)).sum()  # per element of a row, summed over channels
    return float(1.0 - summary["mse_P_channel"].mean(0).sum() / centred)


def streamed_iwae(model: Callable, guide: Callable, x: Tensor | LazyRows, num_particles: int, *,
                  seed: int = 0, chunk: int | None = None) -> Tensor:
    """:func:`~pyro_physvae.diagnostics.iwae_log_likelihood` of each row ``(N,)``, ``chunk``
    rows at a time (default :func:`rows_per_chunk`; ``x`` a tensor or
    :class:`~pyro_physvae.data.lazy.LazyRows`)."""
    n = x.shape[0]
    chunk = chunk or rows_per_chunk(num_particles, int(np.prod(x.shape[1:])))
    if not supports_subsampling(guide):
        chunk = n
    return torch.cat([
        iwae_log_likelihood(model, guide, x[start:start + chunk], num_particles, batch_size=None,
                            seed=seed + i, size=n,
                            subsample=torch.arange(start, min(start + chunk, n), device=x.device))
        for i, start in enumerate(range(0, n, chunk))])


def fit_calibration_in_chunks(model: Any, cal: CalibrationSplit, num_samples: int, *, seed: int = 0,
                              chunk: int | None = None) -> Calibration:
    """The observation noise per channel and the physics parameters' interval
    recalibrations (angles modulo their ``period``) fitted on the calibration split ``cal``
    from ``num_samples`` posterior draws per row, streamed (see
    :func:`posterior_summaries`), with the wall time it took (the guide's fit included).
    Without a split: raw only, with ``cal.reason`` as the note."""
    if cal.dataset is None:
        return Calibration(None, notes=[cal.reason or "not calibrated"])
    start = time.perf_counter()
    x = cal.x
    summary = posterior_summaries(model, cal.guide(), x, num_samples, seed=seed + 1, chunk=chunk,
                                  keep_means=0)
    dims = getattr(model, "observation_dims", None)
    sigma_model = float(model.noise_scale())
    noise = noise_from_moments(summary["resid_ml"], summary["resid_plugin"], event_shape=x.shape[1:],
                               channel_axes=noise_channel_axes(x.shape[1:], dims), observation_dims=dims,
                               sigma_model=sigma_model, split=cal.name)
    names = [p.name for p in model.physics_parameters]
    result = build_calibration(
        cal.name, noise, {n: summary[n] for n in names if n in summary},
        {n: cal.dataset[n].values for n in names if n in cal.dataset},
        periods={p.name: getattr(p, "period", None) for p in model.physics_parameters},
        seq=summary["mse"].sqrt() / sigma_model,
        missing=tuple(n for n in names if n not in cal.dataset))
    result.seq_scale_model = sigma_model
    result.seconds = time.perf_counter() - start
    return result
