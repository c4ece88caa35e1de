"""Posterior analysis: draws, InferenceData, IWAE, calibration, and `physvae diagnose`."""

from __future__ import annotations

import json
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import make_pair, pendulum_like_data

from pyro_physvae.cli import main as cli_main
from pyro_physvae.diagnostics import (
    calibration,
    central_interval,
    interval_widening,
    iwae_log_likelihood,
    sample_posterior,
    to_inference_data,
)
from pyro_physvae.regularizers import REGULARIZER_SITE
from pyro_physvae.train import TrainConfig, train

N, T, DT = 7, 12, 0.1


# --------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------
def test_sample_posterior_shapes_and_pointwise_log_likelihood(setting):
    model, guide = make_pair(setting, n_steps=T, dt=DT)
    x = pendulum_like_data(N, T, DT)
    d = sample_posterior(model, guide, x, 5, batch_size=3)
    latents = set(model.latent_sites)
    assert latents <= set(d)
    for name in latents:
        assert d[name].shape[:2] == (5, N)
    assert d["x"].shape == d["x_mean"].shape == (5, N, T)
    assert ("x_P" in d) == model.setting.has_physics
    assert "init" not in d  # data, not a posterior quantity
    # The log-likelihood is the model's Normal around x_mean at the observed data, summed over time.
    sigma = model.noise_scale()
    expected = dist.Normal(d["x_mean"], sigma).log_prob(x).sum(-1)
    torch.testing.assert_close(d["log_likelihood"], expected)
    # Replicates scatter around x_mean with the model's noise.
    assert float((d["x"] - d["x_mean"]).std()) == pytest.approx(float(sigma), rel=0.2)


def test_sample_posterior_chunks_agree_with_one_pass(pair_factory):
    model, guide = pair_factory("phys-only", n_steps=T, dt=DT)
    x = pendulum_like_data(N, T, DT)
    whole = sample_posterior(model, guide, x, 2000, batch_size=None, seed=1)
    chunked = sample_posterior(model, guide, x, 2000, batch_size=2, seed=2)
    # Each row's posterior is the same distribution whichever chunk it falls in.
    torch.testing.assert_close(whole["omega"].mean(0), chunked["omega"].mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(whole["omega"].std(0), chunked["omega"].std(0), atol=0.1, rtol=0.1)


# --------------------------------------------------------------------------------------
# InferenceData
# --------------------------------------------------------------------------------------
def test_inference_data_groups_dims_and_netcdf_round_trip(tiny_datasets, tmp_path):
    ds = tiny_datasets["test"]
    model, guide = make_pair("phys+nn+reg", n_steps=ds.sizes["time"], dt=float(ds.attrs["dt"]))
    x = torch.tensor(ds["x"].values)
    idata = to_inference_data(model, guide, x, dataset=ds, num_samples=6)
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "observed_data", "constant_data"}
    post = idata.posterior
    assert post["omega"].dims == ("chain", "draw", "sequence")
    assert post["z_A1"].dims == ("chain", "draw", "sequence", "z_A1_dim")
    assert post["z_A2"].sizes["z_A2_dim"] == 2
    assert post["x_mean"].dims == ("chain", "draw", "sequence", "time")
    assert post.sizes["draw"] == 6 and post.sizes["chain"] == 1
    np.testing.assert_array_equal(post["sequence"].values, ds["sequence"].values)
    np.testing.assert_allclose(post["time"].values, ds["time"].values)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "sequence", "time")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "sequence")
    np.testing.assert_array_equal(idata.observed_data["x"].values, ds["x"].values)
    # True parameters and the time axis travel along; regularizers appear nowhere.
    for name in ("omega", "init", "damping", "forcing_amplitude", "forcing_frequency"):
        np.testing.assert_allclose(idata.constant_data[name].values, ds[name].values)
    assert "time" in idata.constant_data.coords
    for group in idata.groups():
        assert REGULARIZER_SITE not in idata[group].data_vars
    assert list(idata.log_likelihood.data_vars) == ["x"]
    # ArviZ works on it as on any other posterior.
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo)
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    for group in idata.groups():
        xr_equal = back[group].equals(idata[group])
        assert xr_equal, group


def test_inference_data_without_a_dataset_names_its_dims(pair_factory):
    model, guide = pair_factory("nn-only", n_steps=T, dt=DT)
    idata = to_inference_data(model, guide, pendulum_like_data(N, T, DT), num_samples=3)
    assert idata.observed_data["x"].dims == ("sequence", "x_dim")
    assert "omega" not in idata.posterior and "x_P" not in idata.posterior
    assert "constant_data" not in idata.groups()


# --------------------------------------------------------------------------------------
# IWAE
# --------------------------------------------------------------------------------------
def _conjugate(sigma: float = 0.5):
    """z ~ N(0, 1), x | z ~ N(z, sigma): log p(x) and the exact posterior are known."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.7])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, sigma), obs=x)

    def guide_of(loc, scale):
        def guide(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, scale))
        return guide

    post_var = 1.0 / (1.0 + 1.0 / sigma**2)
    exact_guide = guide_of(post_var * x / sigma**2, torch.full_like(x, math.sqrt(post_var)))
    log_px = dist.Normal(0.0, math.sqrt(1.0 + sigma**2)).log_prob(x)
    return x, model, exact_guide, guide_of, log_px


def test_iwae_is_exact_with_the_exact_posterior():
    x, model, exact_guide, _, log_px = _conjugate()
    for k in (1, 7):
        est = iwae_log_likelihood(model, exact_guide, x, k, batch_size=None)
        torch.testing.assert_close(est, log_px, atol=1e-4, rtol=0)


def test_iwae_bound_tightens_with_more_particles():
    x, model, _, guide_of, log_px = _conjugate()
    poor = guide_of(torch.zeros(4), torch.ones(4))
    few = torch.stack([iwae_log_likelihood(model, poor, x, 1, batch_size=None, seed=s) for s in range(200)])
    many = iwae_log_likelihood(model, poor, x, 5000, batch_size=None)
    assert (few.mean(0) < log_px - 0.05).all()  # a strict bound on average at K=1
    torch.testing.assert_close(many, log_px, atol=0.05, rtol=0)


def test_iwae_on_the_pendulum_is_finite_per_sequence(pair_factory):
    model, guide = pair_factory("phys+nn+reg", n_steps=T, dt=DT)
    est = iwae_log_likelihood(model, guide, pendulum_like_data(N, T, DT), 8, batch_size=3)
    assert est.shape == (N,) and torch.isfinite(est).all()


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------
def _posteriors(n: int, spread: float, seed: int = 0):
    """Truths ~ N(m, 1) with posteriors N(m, spread): calibrated iff spread = 1."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=g)
    truth = m + torch.randn(n, generator=g)
    samples = m + spread * torch.randn(4000, n, generator=g)
    return samples, truth


def test_calibration_of_a_calibrated_and_an_overconfident_posterior():
    samples, truth = _posteriors(3000, 1.0)
    table = calibration(samples, truth, levels=(0.5, 0.9))
    np.testing.assert_allclose(table["coverage"].values, [0.5, 0.9], atol=0.03)
    np.testing.assert_allclose(table["mean_width"].values, [2 * 0.674, 2 * 1.645], rtol=0.03)
    tight, truth = _posteriors(3000, 0.2)
    assert float(calibration(tight, truth, levels=(0.9,))["coverage"][0]) < 0.4


def test_interval_widening_restores_coverage_on_new_rows():
    tight, truth = _posteriors(2000, 0.2, seed=1)
    factor = interval_widening(tight, truth, 0.9)
    assert factor == pytest.approx(5.0, rel=0.1)  # the true spread ratio
    test_samples, test_truth = _posteriors(2000, 0.2, seed=2)
    covered = float(calibration(test_samples, test_truth, levels=(0.9,), widen=factor)["coverage"][0])
    assert covered == pytest.approx(0.9, abs=0.03)


def test_calibration_errors():
    with pytest.raises(ValueError, match="need samples"):
        calibration(torch.zeros(5, 3), np.zeros(4))
    with pytest.raises(ValueError, match="level must be in"):
        central_interval(torch.zeros(5, 3), 1.5)
    with pytest.raises(ValueError, match="widen"):
        calibration(torch.zeros(5, 3), np.zeros(3), widen=0.0)


# --------------------------------------------------------------------------------------
# physvae diagnose
# --------------------------------------------------------------------------------------
def test_diagnose_writes_inference_data_tables_and_figures(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train("pendulum", "phys+nn+reg", tiny_data_dir, run,
          TrainConfig(epochs=2, batch_size=32, threads=1), progress=False)
    out = tmp_path / "diag"
    cli_main(["diagnose", str(run), "--samples", "20", "--iwae-particles", "4", "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"inference_data.nc", "summary.csv", "calibration.csv", "calibration.md", "calibration_omega.png",
            "posterior.png", "ppc.png", "reconstructions.png", "diagnostics.json"} <= names
    report = json.loads((out / "diagnostics.json").read_text())
    assert math.isfinite(report["iwae_log_likelihood"]["mean"])
    cal = report["calibration"]["omega"]
    assert set(cal["coverage"]) == {"0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99"}
    assert cal["widening_factor"] > 0
    idata = az.from_netcdf(str(out / "inference_data.nc"))
    assert idata.posterior.sizes["draw"] == 20
    assert "omega" in idata.constant_data
    rows = (out / "calibration.csv").read_text().splitlines()
    assert rows[0] == "parameter,intervals,level,coverage,mean_width" and len(rows) == 1 + 2 * 7
