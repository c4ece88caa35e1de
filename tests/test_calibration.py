"""Calibration after training: the fitted observation noise, the noise-calibrated predictive
and log-likelihood, split-conformal physics-parameter intervals, and LOO/WAIC that work."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

from pyro_physvae.diagnostics import (
    INTERVAL_METHODS,
    estimate_noise,
    fit_interval_calibration,
    interval_coverage,
    loo_report,
    noise_channel_axes,
    psis_loo,
    split_chains,
    with_noise,
)
from pyro_physvae.evaluate import diagnose, evaluate, predictive_coverage
from pyro_physvae.report import build_calibration, parameter_metrics
from pyro_physvae.train import TrainConfig, train


# --------------------------------------------------------------------------------------
# The observation noise
# --------------------------------------------------------------------------------------
def _simulated(n: int, sigma: torch.Tensor, posterior_sd: float, seed: int, draws: int = 60):
    """Observations ``(n, C, T)`` = a smooth mean + Normal noise with a known scale per
    channel ``sigma (C,)``, and posterior draws of the reconstruction ``(S, n, C, T)``
    that scatter about the true mean with ``posterior_sd``."""
    g = torch.Generator().manual_seed(seed)
    c, t = sigma.numel(), 40
    phase = torch.rand(n, c, 1, generator=g) * 6
    mean = torch.sin(torch.linspace(0, 6, t) + phase)
    x = mean + sigma[:, None] * torch.randn(n, c, t, generator=g)
    shift = posterior_sd * torch.randn(draws, n, c, 1, generator=g)  # a shift per draw,
    return x, mean + shift - shift.mean(0)  # centred on the true mean


def test_the_channels_of_each_kind_of_observation():
    assert noise_channel_axes((50,), ("time",)) == ()
    assert noise_channel_axes((20, 50), ("space", "time")) == ()  # a field: one noise
    assert noise_channel_axes((3, 101), ("joint", "time")) == (0,)  # one per joint
    assert noise_channel_axes((3, 69, 69), ("band", "row", "col")) == (0,)  # one per band
    assert noise_channel_axes((3, 50)) == (0,)  # unnamed: as_channels' convention


def test_the_noise_estimate_recovers_a_known_sigma_per_channel():
    sigma = torch.tensor([0.05, 0.2, 0.01])
    x, x_mean = _simulated(300, sigma, posterior_sd=0.03, seed=0)
    est = estimate_noise(x, x_mean, observation_dims=("joint", "time"), sigma_model=0.008, split="valid")
    assert est.channel_names == ("joint 0", "joint 1", "joint 2")
    # 12000 residuals per channel: the relative standard error of a scale is ~0.7%; allow 4%.
    # The plug-in estimate sees the noise alone, the ML one the noise plus the posterior
    # spread of x_mean: sigma_ml^2 = sigma^2 + 0.03^2.
    torch.testing.assert_close(est.sigma_plugin, sigma, rtol=0.04, atol=0)
    torch.testing.assert_close(est.sigma_ml, (sigma**2 + 0.03**2).sqrt(), rtol=0.04, atol=0)
    assert est.method == "ml" and torch.equal(est.sigma, est.sigma_ml)
    assert est.scale().shape == (3, 1)
    d = est.to_dict()
    assert d["fitted_on"] == "valid" and d["sigma_model_raw"] == 0.008
    assert set(d["sigma"]) == set(est.channel_names)
    # A single series pools everything into one channel.
    one = estimate_noise(x[:, 1], x_mean[:, :, 1], observation_dims=("time",))
    assert one.channel_names == ("all",) and one.sigma_plugin.item() == pytest.approx(0.2, rel=0.04)


def test_the_predictive_with_the_fitted_noise_covers_nominally():
    sigma = torch.tensor([0.05, 0.2])
    # 400 draws: the empirical 5-95% range of S draws covers about 0.9 (S - 1) / (S + 1).
    x_val, mean_val = _simulated(200, sigma, posterior_sd=0.01, seed=1, draws=400)
    x, mean = _simulated(200, sigma, posterior_sd=0.01, seed=2, draws=400)
    noise = estimate_noise(x_val, mean_val, observation_dims=("joint", "time"), sigma_model=0.008)
    model_ll = torch.distributions.Normal(mean, 0.008).log_prob(x).sum((-2, -1))
    draws = {"x_mean": mean, "x": mean + 0.008 * torch.randn_like(mean), "log_likelihood": model_ll}
    cal = with_noise(draws, x, noise, seed=0)
    assert predictive_coverage(x, cal["x"]) == pytest.approx(0.90, abs=0.02)
    assert predictive_coverage(x, cal["x_raw"]) < 0.3  # the model's own noise is far too small
    torch.testing.assert_close(cal["log_likelihood_raw"], model_ll)
    expected = torch.distributions.Normal(mean, noise.scale()).log_prob(x).sum((-2, -1))
    torch.testing.assert_close(cal["log_likelihood"], expected)
    assert with_noise(draws, x, None) == draws


# --------------------------------------------------------------------------------------
# Split-conformal intervals
# --------------------------------------------------------------------------------------
def _posteriors(n: int, seed: int, period: float | None = None):
    """Overconfident, biased posteriors: centre = truth + 0.3 + N(0, 0.5) error, spread 0.05
    (unrelated to the error), as the trained models' are."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, generator=g) * 3
    centre = truth + 0.3 + 0.5 * torch.randn(n, generator=g)
    samples = centre + 0.05 * torch.randn(400, n, generator=g)
    if period is not None:
        truth, samples = torch.remainder(truth, period), torch.remainder(samples, period)
    return samples, truth


@pytest.mark.parametrize("method", INTERVAL_METHODS)
def test_conformal_intervals_cover_90_percent_of_new_rows(method):
    cal_samples, cal_truth = _posteriors(2000, seed=0)
    samples, truth = _posteriors(3000, seed=1)
    seq = lambda s: 1 + 0.1 * torch.rand(s.shape[1])  # noqa: E731
    fit = fit_interval_calibration(cal_samples, cal_truth, method=method, rescale=7.0,
                                   seq_scale=seq(cal_samples), split="valid")
    raw = interval_coverage(samples, truth)
    got = interval_coverage(samples, truth, fit, seq_scale=seq(samples))
    assert raw["coverage"] < 0.2  # overconfident: spread 0.05 against errors of 0.3 +- 0.5
    assert got["coverage"] == pytest.approx(0.90, abs=0.025)
    assert fit.to_dict()["fitted_on"] == "valid" and fit.n == 2000


def test_the_residual_intervals_are_sharper_when_the_spread_says_nothing_and_rescaling_is_absorbed():
    cal_samples, cal_truth = _posteriors(2000, seed=0)
    samples, truth = _posteriors(3000, seed=1)
    fits = {m: fit_interval_calibration(cal_samples, cal_truth, method=m, rescale=7.0)
            for m in ("residual", "widen", "rescale+widen")}
    width = {m: interval_coverage(samples, truth, f)["mean_width"] for m, f in fits.items()}
    assert width["residual"] < width["widen"]
    # A common rescaling of the spread is absorbed by the conformal factor.
    assert width["rescale+widen"] == pytest.approx(width["widen"], rel=1e-5)
    assert fits["rescale+widen"].factor * 7.0 == pytest.approx(fits["widen"].factor, rel=1e-5)
    # The residual intervals sit where the errors are: the bias of +0.3 is corrected.
    assert (fits["residual"].lower + fits["residual"].upper) / 2 == pytest.approx(-0.3, abs=0.05)


def test_the_debiased_estimate_removes_the_shared_bias_measured_on_the_calibration_split():
    cal_samples, cal_truth = _posteriors(2000, seed=0)
    samples, truth = _posteriors(3000, seed=1)
    cal = build_calibration("valid", None, {"omega": cal_samples}, {"omega": cal_truth.numpy()})
    assert cal.bias["omega"] == pytest.approx(0.3, abs=0.03)
    m = parameter_metrics(samples, truth.numpy(), calibration=cal, name="omega")
    # The row errors are N(0.3, 0.5): the bias leaves E|N(0, 0.5)| = 0.5 sqrt(2 / pi) = 0.40.
    assert m["mae_debiased"] == pytest.approx(0.5 * math.sqrt(2 / math.pi), abs=0.02)
    assert m["mae"] > m["mae_debiased"] + 0.03 and m["rmse"] > m["rmse_debiased"]
    assert m["debiased_by"] == {"bias": cal.bias["omega"], "fitted_on": "valid"}
    # Without a calibration, or for a parameter it has no truths of, there is nothing to correct by.
    assert "mae_debiased" not in parameter_metrics(samples, truth.numpy())
    assert "mae_debiased" not in parameter_metrics(samples, truth.numpy(), calibration=cal, name="other")


def test_conformal_intervals_of_an_angle_wrap_round_the_period():
    period = math.pi
    cal_samples, cal_truth = _posteriors(2000, seed=0, period=period)
    samples, truth = _posteriors(3000, seed=1, period=period)
    fit = fit_interval_calibration(cal_samples, cal_truth, period=period)
    got = interval_coverage(samples, truth, fit, period=period)
    assert got["coverage"] == pytest.approx(0.90, abs=0.025) and got["mean_width"] < period


def test_fit_errors():
    with pytest.raises(ValueError, match="interval method"):
        fit_interval_calibration(torch.zeros(5, 3), np.zeros(3), method="nonsense")
    with pytest.raises(ValueError, match="need draws"):
        fit_interval_calibration(torch.zeros(5), np.zeros(3))
    with pytest.raises(ValueError, match="need draws x_mean"):
        estimate_noise(torch.zeros(4, 5), torch.zeros(4, 5))
    assert split_chains(200) == 4 and split_chains(20) == 4 and split_chains(10) == 2 and split_chains(4) == 1


# --------------------------------------------------------------------------------------
# evaluate and diagnose on a tiny run
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("calibration") / "run"
    torch.set_num_threads(1)
    train("pendulum", "phys+nn+reg", tiny_data_dir, run, TrainConfig(epochs=2, batch_size=16, threads=1),
          progress=False)
    return run


def test_metrics_hold_raw_and_calibrated_figures(tiny_run, tmp_path):
    m = evaluate(tiny_run, num_samples=20, iwae_particles=2, out_dir=tmp_path / "cal")
    on_disk = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    omega = on_disk["omega"]
    assert omega["calibrated"] is True and {"coverage90", "coverage90_raw", "interval_width",
                                             "interval_width_raw", "interval_methods"} <= set(omega)
    assert omega["interval_calibration"]["method"] == "residual"
    bias = on_disk["calibration_fit"]["bias_on_split"]["omega"]
    assert omega["debiased_by"] == {"bias": bias, "fitted_on": "valid"}
    assert omega["mae_debiased"] >= 0 and omega["rmse_debiased"] >= omega["mae_debiased"]
    assert omega["interval_calibration"]["fitted_on"] == "valid" and omega["interval_calibration"]["n"] == 32
    assert set(omega["interval_methods"]) == set(INTERVAL_METHODS)
    fit = on_disk["calibration_fit"]
    assert fit["split"] == "valid" and fit["seconds"] > 0 and fit["noise"]["fitted_on"] == "valid"
    sigma_hat = fit["noise"]["sigma"]["all"]
    assert sigma_hat > 5 * fit["noise"]["sigma_model_raw"]  # an untrained model misfits
    assert "reference" in on_disk["notes"] and "bias" in on_disk["notes"]
    assert 0 <= on_disk["predictive_coverage90_raw"] <= 1
    assert on_disk["predictive_coverage90"] > on_disk["predictive_coverage90_raw"]
    assert m["omega"]["coverage90"] == omega["coverage90"]
    # calibrate_on=None: raw only, and said so.
    raw = evaluate(tiny_run, num_samples=20, iwae_particles=2, out_dir=tmp_path / "raw", calibrate_on=None)
    assert raw["omega"]["calibrated"] is False and "mae_debiased" not in raw["omega"]
    assert raw["omega"]["coverage90"] == raw["omega"]["coverage90_raw"]
    assert raw["calibration_fit"]["split"] is None and "raw" in raw["notes"]
    assert raw["predictive_coverage90"] == raw["predictive_coverage90_raw"]
    # The raw intervals do not depend on the calibration.
    assert raw["omega"]["coverage90_raw"] == omega["coverage90_raw"]


def test_diagnose_inference_data_works_with_loo_summary_and_compare(tiny_run, tmp_path, caplog):
    report = diagnose(tiny_run, num_samples=20, iwae_particles=2, out_dir=tmp_path / "d")
    out = tmp_path / "d"
    assert (out / "pareto_k.png").stat().st_size > 1000
    loo = json.loads((out / "diagnostics.json").read_text())["loo"]
    assert {"elpd_loo", "se_loo", "p_loo", "pareto_k_gt_0.7", "pareto_k_gt_1", "elpd_waic"} <= set(loo)
    assert math.isfinite(loo["elpd_loo"]) and math.isfinite(loo["elpd_waic"])
    assert report["loo_raw"]["n_sequences"] == loo["n_sequences"] == 16
    idata = az.from_netcdf(str(out / "inference_data.nc"))
    assert list(idata.log_likelihood.data_vars) == ["x"] and "log_likelihood_raw" in idata.posterior
    assert idata.log_likelihood.attrs["observation_noise"] == "fitted after training"
    # diagnose computes PSIS-LOO once for the report and the figure: the same figures as anew.
    anew = loo_report(idata)
    assert {k: anew[k] for k in loo if loo[k] is not None} == \
        pytest.approx({k: v for k, v in loo.items() if v is not None}, rel=1e-6)  # JSON: inf as null
    assert loo_report(idata, loo=psis_loo(idata)) == loo_report(idata)
    # The log-likelihood group is the fitted noise's: sum over time of Normal(x_mean, sigma_hat).
    sigma = report["calibration_fit"]["noise"]["sigma"]["all"]
    x = idata.observed_data["x"].values
    mean = idata.posterior["x_mean"].values
    expected = (-0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values, expected, rtol=1e-4)
    caplog.set_level(logging.INFO, logger="arviz")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no NaN R-hat
        summary = az.summary(idata, var_names=["omega", "z_A1", "z_A2"])
        result = az.loo(idata)
        table = az.compare({"a": idata, "b": idata})
    assert not [r for r in caplog.records if "validation" in r.getMessage().lower()]
    assert summary["r_hat"].notna().all() and np.isfinite(result.elpd_loo) and len(table) == 2
