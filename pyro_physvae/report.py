"""Numbers and files of the evaluation reports, shared by every system's evaluation.

The lowest layer of the evaluation: it imports nothing of the package but
:mod:`pyro_physvae.diagnostics`, so that :mod:`pyro_physvae.evaluate`, the image evaluation
(:mod:`pyro_physvae.images`) and a user's own evaluator can all use it without importing one
another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from torch import Tensor

from pyro_physvae.diagnostics import (
    DEFAULT_INTERVAL_METHOD,
    INTERVAL_METHODS,
    IntervalCalibration,
    NoiseEstimate,
    fit_interval_calibration,
    interval_coverage,
    posterior_offsets,
)

#: Central posterior interval used for coverage and bands.
INTERVAL = 0.90


@dataclass
class CalibrationSplit:
    """The split that noise and intervals are calibrated on (``calibrate_on``), as an
    evaluator receives it.

    Attributes:
        name: the split's name (``"valid"``).
        dataset: its data set, with true parameters where it has them; ``None`` when it is
            not available (then ``reason`` says why and the evaluation is raw only).
        x: its observations ``(M, *event)``.
        guide: builds the guide for ``x`` when called (an AutoGuide run fits one then, so
            the cost is counted in :attr:`Calibration.seconds`).
        reason: why there is no calibration split, or ``None``.
    """

    name: str | None
    dataset: xr.Dataset | None = None
    x: Tensor | None = None
    guide: Callable[[], Callable] | None = None
    reason: str | None = None


@dataclass
class Calibration:
    """What an evaluation fitted on its calibration split (see :func:`build_calibration`).

    Attributes:
        split: the calibration split (``None``: raw only).
        noise: the fitted observation noise (``None``: the model's own).
        intervals: per physics parameter with truths there, the default recalibration.
        alternatives: per such parameter, every method of
            :data:`~pyro_physvae.diagnostics.INTERVAL_METHODS` (for comparison).
        bias: per such parameter, the mean signed error of the posterior centre there.
        seconds: wall time of the calibration (guide, posterior draws, fits) [s].
        notes: sentences for the report (why raw intervals are narrow, what is missing).
        seq_scale_model: the model's noise scale that per-row spread ratios divide by.
        samples, truths: the calibration split's draws ``(S, M)`` and truths ``(M,)`` of the
            parameters with truths (for tables at other levels).
    """

    split: str | None
    noise: NoiseEstimate | None = None
    intervals: dict[str, IntervalCalibration] = field(default_factory=dict)
    alternatives: dict[str, dict[str, IntervalCalibration]] = field(default_factory=dict)
    bias: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    seq_scale_model: float = math.nan
    samples: dict[str, Tensor] = field(default_factory=dict)
    truths: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the ``calibration`` entry of the metrics)."""
        return {"split": self.split, "seconds": self.seconds,
                "noise": self.noise.to_dict() if self.noise is not None else None,
                "interval_method": DEFAULT_INTERVAL_METHOD if self.intervals else None,
                "parameters_calibrated": sorted(self.intervals),
                "bias_on_split": self.bias, "notes": " ".join(self.notes)}


def seq_scale(x: Tensor, x_mean: Tensor, sigma_model: float) -> Tensor:
    """Per row, the RMS residual of the posterior-mean reconstruction over the model's
    noise scale, ``(N,)`` (dimensionless): ``x (N, *event)``, ``x_mean (N, *event)`` or
    draws ``(S, N, *event)`` (averaged first)."""
    mean = x_mean.mean(0) if x_mean.dim() == x.dim() + 1 else x_mean
    return (x - mean).pow(2).flatten(1).mean(1).sqrt() / sigma_model


def build_calibration(split: str, noise: NoiseEstimate | None, samples: Mapping[str, Tensor],
                      truths: Mapping[str, np.ndarray], *, periods: Mapping[str, float | None] | None = None,
                      seq: Tensor | None = None, seconds: float = 0.0, missing: tuple[str, ...] = (),
                      level: float = INTERVAL) -> Calibration:
    """Fit every interval method for each parameter of ``samples`` (draws ``(S, M)`` on
    the calibration split) with a truth in ``truths`` (``(M,)``), and write the notes.

    Args:
        noise: the noise fitted on the split (its ratio to the model's is
            ``"rescale+widen"``'s factor).
        periods: a period per angle parameter.
        seq: ``(M,)`` per-row spread factors (:func:`seq_scale`) for
            ``"seq-rescale+widen"``; without them that method is skipped.
        seconds: the time spent so far on the split (sampling it), added to the record.
        missing: physics parameters of the model without a truth on the split.
    """
    periods = dict(periods or {})
    cal = Calibration(split, noise, seconds=seconds)
    ratio = 1.0
    if noise is not None and math.isfinite(noise.sigma_model) and noise.sigma_model > 0:
        ratio = float(noise.sigma.pow(2).mean().sqrt()) / noise.sigma_model
    for name, draws in samples.items():
        if name not in truths:
            continue
        truth, period = truths[name], periods.get(name)
        fits = {}
        for method in INTERVAL_METHODS:
            if method == "seq-rescale+widen" and seq is None:
                continue
            fits[method] = fit_interval_calibration(draws, truth, level=level, method=method, period=period,
                                                    rescale=ratio, seq_scale=seq, split=split)
        cal.alternatives[name] = fits
        cal.samples[name], cal.truths[name] = draws, np.asarray(truth)
        cal.intervals[name] = fits[DEFAULT_INTERVAL_METHOD]
        _, _, offset = posterior_offsets(draws, truth, period)
        cal.bias[name] = float(-offset.mean())  # centre minus truth
    cal.notes = calibration_notes(cal, missing)
    return cal


def calibration_notes(cal: Calibration, missing: tuple[str, ...] = ()) -> list[str]:
    """Why raw intervals are narrow, and what the calibration could not do."""
    notes = []
    if cal.noise is not None:
        sig = ", ".join(f"{float(v):.3g}" for v in cal.noise.sigma)
        text = (f"Raw posterior intervals and the raw predictive are narrow because training fixes the "
                f"observation noise at the reference value (sigma {cal.noise.sigma_model:.3g}), far below "
                f"the model's misfit on {cal.split} (sigma_hat {sig})")
        if cal.bias:
            text += (", and because the physics parameters share a bias that the likelihood does not see "
                     f"(mean error of the posterior centre on {cal.split}: "
                     + ", ".join(f"{k} {v:+.3g}" for k, v in cal.bias.items()) + ")")
        text += "; the calibrated predictive and log-likelihood use sigma_hat"
        if cal.intervals:
            text += (f", and the calibrated intervals are split-conformal ({DEFAULT_INTERVAL_METHOD}) "
                     f"fitted on {cal.split}'s true parameters.")
        else:
            text += (f". The {cal.split} split has no true physics parameters to calibrate intervals on: "
                     "only the predictive is noise-calibrated.")
        notes.append(text)
    if missing and cal.intervals:
        notes.append(f"The {cal.split} split has no true values of {', '.join(missing)}: their "
                     "intervals are raw only.")
    return notes


def interval_metrics(samples: Tensor, truth: np.ndarray, calibration: Calibration | None, name: str, *,
                     level: float = INTERVAL, period: float | None = None,
                     seq: Tensor | None = None) -> dict[str, Any]:
    """Coverage and mean width of one parameter's central ``level`` intervals: calibrated
    (``coverage90``, ``interval_width``; the raw ones where ``calibration`` has none for
    ``name``), raw (``coverage90_raw``, ``interval_width_raw``), whether they are
    ``calibrated``, the recalibration used and, per method, what the others give
    (``interval_methods``). ``samples (S, N)``, ``truth (N,)``; ``seq (N,)`` the rows'
    factors for ``"seq-rescale+widen"``."""
    key = f"coverage{int(round(level * 100))}"
    raw = interval_coverage(samples, truth, level=level, period=period)
    out: dict[str, Any] = {key: raw["coverage"], "interval_width": raw["mean_width"],
                           f"{key}_raw": raw["coverage"], "interval_width_raw": raw["mean_width"],
                           "calibrated": False}
    fits = calibration.alternatives.get(name, {}) if calibration is not None else {}
    if not fits:
        return out
    methods = {}
    for method, fit in fits.items():
        if method == "seq-rescale+widen" and seq is None:
            continue
        r = interval_coverage(samples, truth, fit, level=level, period=period, seq_scale=seq)
        methods[method] = {key: r["coverage"], "interval_width": r["mean_width"], **fit.to_dict()}
    best = methods[DEFAULT_INTERVAL_METHOD]
    out.update({key: best[key], "interval_width": best["interval_width"], "calibrated": True,
                "interval_calibration": fits[DEFAULT_INTERVAL_METHOD].to_dict(), "interval_methods": methods})
    return out


def parameter_metrics(samples: Tensor, truth: np.ndarray, level: float = INTERVAL,
                      calibration: Calibration | None = None, name: str = "",
                      seq: Tensor | None = None) -> dict[str, Any]:
    """Errors of the posterior mean of one scalar parameter against its truth.

    Args:
        samples: posterior draws ``(S, N)``.
        truth: true values ``(N,)``, in the parameter's units.
        level: probability of the central interval whose coverage and width are reported.
        calibration, name, seq: the calibration fitted on another split and the parameter's
            name in it (see :func:`interval_metrics`); ``None``: raw intervals only.

    Returns:
        ``mae``, ``rmse`` (parameter units), ``corr`` (Pearson correlation of the posterior
        mean with the truth; NaN for one sequence or a constant mean), ``coverage<level%>``
        (fraction of truths inside the central interval, calibrated where a calibration is
        given), ``interval_width`` (its mean width, parameter units), the raw ones
        ``coverage<level%>_raw`` and ``interval_width_raw`` and the rest of
        :func:`interval_metrics`; where the calibration measured the parameter's bias,
        also those of :func:`debiased_errors`.
    """
    mean = samples.mean(0).cpu().numpy()
    err = mean - truth
    corr = float(np.corrcoef(mean, truth)[0, 1]) if len(truth) > 1 and mean.std() > 0 else math.nan
    out = {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "corr": corr}
    if calibration is not None and name in calibration.bias:
        out.update(debiased_errors(samples, truth, calibration.bias[name], calibration.split))
    return {**out, **interval_metrics(samples, truth, calibration, name, level=level, seq=seq)}


def debiased_errors(samples: Tensor, truth: np.ndarray, bias: float, split: str | None) -> dict[str, Any]:
    """Errors of the posterior median corrected by the bias that the calibration split
    measured (``bias``: the mean of centre minus truth there; the centre of the residual
    intervals moves the same way). This uses the calibration split's true parameters, as the
    calibrated intervals do; it corrects a bias shared by all rows and leaves each row's own
    error. ``samples (S, N)``, ``truth (N,)``.

    Returns ``mae_debiased``, ``rmse_debiased`` (parameter units) and ``debiased_by`` (the
    bias subtracted, and the split it was measured on).
    """
    centre, _, _ = posterior_offsets(samples)
    err = centre.cpu().numpy() - bias - truth
    return {"mae_debiased": float(np.abs(err).mean()), "rmse_debiased": float(np.sqrt((err**2).mean())),
            "debiased_by": {"bias": float(bias), "fitted_on": split}}


def iwae_summary(iwae: Tensor) -> dict[str, float]:
    """Mean (with its standard error) and median of per-sequence IWAE log-likelihoods
    ``(N,)`` [nats per sequence]."""
    return {"mean": float(iwae.mean()), "stderr": float(iwae.std() / math.sqrt(iwae.numel())),
            "median": float(iwae.median())}


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` to ``path`` as indented JSON, non-finite floats as ``null``; creates the
    parent directory. Returns ``path``."""
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
