"""Posterior analysis: draws, InferenceData, IWAE, calibration, and `physvae diagnose`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import make_pair, pendulum_like_data

from pyro_physvae.cli import main as cli_main
from pyro_physvae.data.io import save_dataset
from pyro_physvae.diagnostics import (
    calibration,
    central_interval,
    interval_widening,
    iwae_log_likelihood,
    sample_posterior,
    to_inference_data,
)
from pyro_physvae.evaluate import counterfactual, decode_unclamped, diagnose, evaluate, load_run
from pyro_physvae.figures import as_channels, channel_labels, time_axis, value_label
from pyro_physvae.regularizers import REGULARIZER_SITE
from pyro_physvae.systems import SYSTEMS, System, get_system, register_system, unregister_system
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
    # 20 independent draws, split into 4 chains of 5 for ArviZ's chain-based diagnostics.
    assert idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == 20
    assert "omega" in idata.constant_data
    rows = (out / "calibration.csv").read_text().splitlines()
    # raw, widened and recalibrated (the default method) at each of the 7 levels
    assert rows[0] == "parameter,intervals,level,coverage,mean_width" and len(rows) == 1 + 3 * 7


# --------------------------------------------------------------------------------------
# Evaluation through the System entry: every built-in system, and a user's own
# --------------------------------------------------------------------------------------
def _train_tiny(system: System, root: Path) -> Path:
    """Data of ``system``'s test sizes in ``root/data`` and a one-epoch phys+nn+reg run in
    ``root/run``."""
    sizes = system.test_sizes
    for split, ds in system.generate(seed=0, **sizes["data"]).items():
        save_dataset(ds.assign_attrs(system=system.name), root / "data" / f"{split}.nc")
    train(system, "phys+nn+reg", root / "data", root / "run", TrainConfig(epochs=1, batch_size=16),
          model_kwargs=sizes["model"], guide_kwargs=sizes["guide"], progress=False)
    return root / "run"


@pytest.fixture(scope="module", params=SYSTEMS)
def tiny_system_run(request, tmp_path_factory) -> tuple[System, Path]:
    """Each built-in system trained for one epoch at its test sizes: ``(system, run_dir)``."""
    system = get_system(request.param)
    return system, _train_tiny(system, tmp_path_factory.mktemp(f"eval-{system.name}"))


def test_evaluate_every_builtin_system(tiny_system_run):
    system, run = tiny_system_run
    m = evaluate(run, num_samples=4, iwae_particles=4)
    out = run / "eval-test"
    assert m["system"] == system.name and m["n_sequences"] == system.test_sizes["data"]["n_test"]
    assert math.isfinite(m["recon_mse"]) and math.isfinite(m["iwae_log_likelihood"]["mean"])
    assert json.loads((out / "metrics.json").read_text())["recon_mse"] == pytest.approx(m["recon_mse"])
    assert (out / "reconstructions.png").stat().st_size > 1000
    ds = get_system(system.name).load_split(run.parent / "data", "test")
    with_truth = [p for p in load_run(run).model.physics_parameters if p.name in ds]
    assert with_truth or system.name == "locomotion"  # its physics latents have no truth
    for p in with_truth:
        assert set(m[p.name]) >= {"mae", "corr", "coverage90"}
        assert (out / f"{p.name}.png").stat().st_size > 1000
    # The System's hooks: locomotion's covariates and energy report (extra_metrics), the
    # galaxy's own evaluator (random generations).
    assert ("energy" in m) == (system.name == "locomotion")
    assert ("latent_correlations" in m) == bool(system.covariates)
    assert (out / "generations.png").is_file() == (system.name == "galaxy")


def test_diagnose_every_builtin_system(tiny_system_run):
    system, run = tiny_system_run
    report = diagnose(run, num_samples=4, iwae_particles=4, calibrate_on=None)
    out = run / "diagnose-test"
    names = {f.name for f in out.iterdir()}
    assert {"inference_data.nc", "diagnostics.json", "reconstructions.png", "ppc.png"} <= names
    assert (out / "reconstructions.png").stat().st_size > 1000
    assert report["system"] == system.name and math.isfinite(report["iwae_log_likelihood"]["mean"])
    physics = {p.name for p in load_run(run).model.physics_parameters}
    assert set(report["calibration"]) == physics & set(get_system(system.name).load_split(
        run.parent / "data", "test").data_vars)


def test_counterfactual_follows_the_systems_truth(tiny_system_run, tmp_path):
    system, run = tiny_system_run
    if system.counterfactual_truth is None:
        with pytest.raises(ValueError, match="counterfactual_truth"):
            counterfactual(run, factors=(2.0,), n_sequences=4, num_samples=4, out_dir=tmp_path)
        assert not (tmp_path / "counterfactual.json").exists()
        return
    report = counterfactual(run, factors=(0.5, 3.0), n_sequences=4, num_samples=4, out_dir=tmp_path)
    name = load_run(run).model.physics_parameters[0].name
    assert report["parameter"] == name and report["clamped"] is False
    assert [r["factor"] for r in report["results"]] == [0.5, 3.0]
    assert all(math.isfinite(r["mse"]) and math.isfinite(r["physics_only_mse"]) for r in report["results"])
    assert (tmp_path / "counterfactual.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not a physics parameter"):
        counterfactual(run, parameter="nonsense", n_sequences=2, num_samples=2, out_dir=tmp_path)


def test_a_users_system_without_hooks_gets_the_generic_evaluation_and_a_clear_refusal(tmp_path):
    mine = register_system(replace(get_system("pendulum"), name="my-pendulum", counterfactual_truth=None))
    try:
        run = _train_tiny(mine, tmp_path)
        m = evaluate(run, num_samples=4, iwae_particles=4)
        assert m["system"] == "my-pendulum" and set(m["omega"]) >= {"mae", "coverage90"}
        assert (run / "eval-test" / "reconstructions.png").stat().st_size > 1000
        with pytest.raises(ValueError, match="my-pendulum system has no counterfactual truth.*"
                                             "counterfactual_truth"):
            counterfactual(run, factors=(2.0,), n_sequences=4, num_samples=4)
        assert cli_main(["counterfactual", str(run), "--factors", "2"]) == 2
    finally:
        unregister_system("my-pendulum")


def test_the_pendulums_counterfactual_truth_is_its_data_and_scales_omega(tiny_datasets):
    ds = tiny_datasets["test"]
    truth = get_system("pendulum").counterfactual_truth
    same = truth(ds, "omega", 1.0)
    assert same.shape == ds["x"].shape
    noise = float(ds.attrs["noise_std"])
    assert float((same - torch.tensor(ds["x"].values, dtype=same.dtype)).pow(2).mean().sqrt()) < 2 * noise
    faster = truth(ds, "omega", 2.0)
    assert float((faster - same).abs().max()) > 0.1
    with pytest.raises(ValueError, match="no parameter 'init' to scale"):
        truth(ds, "init", 2.0)


def test_decode_sites_can_leave_the_feasible_range(pair_factory, small_data):
    model, _ = pair_factory("phys-only")
    init = model.initial_condition(small_data)
    fast = {"omega": torch.full((small_data.shape[0],), 3 * model.omega.high)}
    clamped = model.decode_sites(init, fast)["x_P"]
    free, was_clamped = decode_unclamped(model, init, fast)
    assert not was_clamped
    at_bound = model.decode_sites(init, {"omega": torch.full_like(fast["omega"], model.omega.high)})["x_P"]
    torch.testing.assert_close(clamped, at_bound)
    assert float((free["x_P"] - clamped).abs().max()) > 0.1


def test_generic_figure_labels_come_from_the_data_set(tiny_datasets):
    pend = tiny_datasets["test"]
    assert time_axis(pend, pend.sizes["time"])[1] == "time [s]"
    assert channel_labels(pend, 1) == [""] and value_label(pend) == "observed angle [rad]"
    gait = get_system("locomotion").generate(seed=0, n_train=2, n_valid=2, n_test=2, n_steps=11)["test"]
    assert channel_labels(gait, 3) == ["joint 0", "joint 1", "joint 2"]
    assert channel_labels(gait, 5) == [f"channel {c}" for c in range(5)]
    values, label = time_axis(gait, 11, "cycle_percent")
    assert values[-1] == 100.0 and label == "cycle_percent"
    assert as_channels(torch.zeros(4, 7)).shape == (4, 1, 7)
    assert as_channels(torch.zeros(2, 4, 3, 5, 7), lead=2).shape == (2, 4, 15, 7)
