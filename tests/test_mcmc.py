"""NUTS over a few sequences' latents with the networks fixed, and the amortization gap.

The main fixture simulates two sequences from a physics-only model with known omega and the
model's own noise level, so that the exact posterior is known to be a narrow peak at the
truth whose width follows from the Fisher information; the other tests check the
InferenceData, the frozen networks, the gap table by hand, bad input, the run-directory
report and the example script. Chains are short (the whole file runs in well under a
minute on one busy core).
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL_GUIDE, SMALL_MODEL, make_pair
from pyro.ops.integrator import potential_grad

from pyro_physvae.data.io import SPLITS, save_dataset
from pyro_physvae.diagnostics import markdown_table
from pyro_physvae.mcmc import (
    GAP_COLUMNS,
    LatentLayout,
    _candidates,
    _GuardedPotential,
    amortization_gap,
    amortized_samples,
    check_sequence_indices,
    dense_inverse_mass,
    frozen_parameters,
    log_joint,
    nuts_report,
    nuts_to_inference_data,
    plot_amortization_gap,
    posterior_summary,
    run_nuts,
    starting_values,
)
from pyro_physvae.ode import IntegrationError
from pyro_physvae.systems import SYSTEMS, get_system
from pyro_physvae.train import TrainConfig, train

OMEGA_TRUE = (1.3, 2.6)  # rad/s
#: Draws and warm-up per chain of the NUTS runs on every system (two chains): a smoke run.
NUTS_DRAWS, NUTS_WARMUP = 10, 10
INIT = (0.6, -0.4)  # rad


def simulate(model, seed: int = 1) -> torch.Tensor:
    """Sequences ``(2, T)`` from the physics-only curve plus the model's own noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean = model.physics_only(torch.tensor(INIT), torch.tensor(OMEGA_TRUE))
    return mean + model.noise_scale() * torch.randn(mean.shape, generator=g)


def laplace_sd(model, x: torch.Tensor) -> torch.Tensor:
    """Posterior sd of omega per sequence from the Fisher information at the truth:
    ``(sum_t (d x_P / d omega)^2 / sigma^2 + 1 / prior_var)^(-1/2)``."""
    omega = torch.tensor(OMEGA_TRUE, requires_grad=True)
    curves = model.physics_only(x[:, 0], omega)
    jac = torch.stack([torch.autograd.grad(curves[:, t].sum(), omega, retain_graph=True)[0]
                       for t in range(curves.shape[1])], -1)
    info = jac.pow(2).sum(-1) / model.noise_scale().pow(2) + 1 / model.omega.prior_scale**2
    return info.rsqrt().detach()


@pytest.fixture(scope="module")
def phys_only_run():
    torch.manual_seed(0)
    model, guide = make_pair("phys-only", n_steps=12, dt=0.1)
    x = simulate(model)
    mcmc = run_nuts(model, x, guide=guide, num_samples=100, warmup_steps=60, num_chains=2, seed=0)
    return model, guide, x, mcmc


def exact_posterior(model, x: torch.Tensor, halfwidth: float = 0.08,
                    n: int = 1601) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of omega's exact posterior per sequence, by quadrature of the log joint
    density on a fine grid around the truth (omega is the only latent of phys-only)."""
    grid = torch.linspace(-halfwidth, halfwidth, n)[:, None] + torch.tensor(OMEGA_TRUE)
    with torch.no_grad():
        logp = log_joint(model, x, {"omega": grid})
    w = torch.softmax(logp.double(), 0)
    mean = (w * grid).sum(0)
    return mean.float(), (w * (grid - mean) ** 2).sum(0).sqrt().float()


def test_nuts_recovers_known_omega(phys_only_run) -> None:
    model, _, x, mcmc = phys_only_run
    omega = mcmc.get_samples(group_by_chain=True)["omega"]
    assert omega.shape == (2, 100, 2)
    draws = omega.reshape(-1, 2)
    mean, sd = draws.mean(0), draws.std(0)
    exact_mean, exact_sd = exact_posterior(model, x)
    # The exact posterior is narrow (a few 1e-3 rad/s, as the Fisher information predicts)
    # and within a few sds of the truth; NUTS matches its mean and width.
    assert torch.allclose(exact_sd, laplace_sd(model, x), rtol=0.1)
    assert (exact_sd < 0.02).all()
    assert ((exact_mean - torch.tensor(OMEGA_TRUE)).abs() < 4 * exact_sd).all()
    assert ((mean - exact_mean).abs() < 0.4 * exact_sd).all(), (mean, exact_mean, exact_sd)
    assert torch.allclose(sd, exact_sd, rtol=0.3), (sd, exact_sd)
    summary = az.summary(nuts_to_inference_data(mcmc, model, x), round_to="none")
    assert summary["r_hat"].max() < 1.05
    assert summary["ess_bulk"].min() > 80


def test_inference_data_groups_and_dims(phys_only_run) -> None:
    model, _, x, mcmc = phys_only_run
    idata = nuts_to_inference_data(mcmc, model, x, sequence_ids=[7, 3])
    assert {"posterior", "sample_stats", "observed_data", "log_likelihood"} <= set(idata.groups())
    assert idata.posterior["omega"].dims == ("chain", "draw", "sequence")
    assert idata.posterior.sizes["chain"] == 2
    assert list(idata.posterior["sequence"].values) == [7, 3]
    # Only x is observed data: the deterministic curves are no observations.
    assert list(idata.observed_data.data_vars) == ["x"]
    assert idata.observed_data["x"].dims == ("sequence", "time")
    np.testing.assert_allclose(idata.observed_data["time"].values, model.t.numpy())
    np.testing.assert_allclose(idata.observed_data["x"].values, x.numpy())
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "sequence")
    assert idata.sample_stats["diverging"].dims == ("chain", "draw")
    summary = az.summary(idata)
    assert {"r_hat", "ess_bulk", "ess_tail"} <= set(summary.columns)
    with pytest.raises(ValueError, match="not the data"):
        nuts_to_inference_data(mcmc, model, x + 1.0)


def test_gap_table_against_the_draws(phys_only_run) -> None:
    model, guide, x, mcmc = phys_only_run
    table = amortization_gap(model, guide, x, mcmc, num_samples=200, truth={"omega": OMEGA_TRUE})
    assert tuple(table.columns) == GAP_COLUMNS
    assert list(table["sequence"]) == [0, 1] and list(table["parameter"]) == ["omega"] * 2
    nuts = mcmc.get_samples()["omega"].numpy()
    q = amortized_samples(guide, x, ["omega"], num_samples=200)["omega"]
    np.testing.assert_allclose(table["nuts_mean"], nuts.mean(0), rtol=1e-6)
    np.testing.assert_allclose(table["amortized_mean"], q.mean(0), rtol=1e-6)
    gap = (q.mean(0) - nuts.mean(0)) / nuts.std(0, ddof=1)
    np.testing.assert_allclose(table["mean_gap_sd"], gap, rtol=1e-5)
    np.testing.assert_allclose(table["truth"], OMEGA_TRUE)
    # An untrained encoder is far wider than the exact posterior.
    assert (table["sd_ratio"] > 10).all()


def test_gap_table_by_hand() -> None:
    model, guide = make_pair("phys-only", n_steps=12, dt=0.1)
    x = simulate(model)
    # NUTS draws: sequence 0 takes the values 1, 2, 3, 4 (mean 2.5, sd sqrt(5/3)) in both
    # chains; the encoder's draws are 4 and 6 (mean 5, sd sqrt(2)).
    nuts = np.tile([[1.0, 10.0], [2.0, 10.5], [3.0, 11.0], [4.0, 11.5]], (2, 1, 1))  # (chain, draw, K)
    idata = az.from_dict(posterior={"omega": nuts})
    amortized = {"omega": np.array([[4.0, 0.0], [6.0, 0.0]])}
    table = amortization_gap(model, guide, x, idata, amortized=amortized, level=0.5)
    row = table.iloc[0]
    assert row["nuts_mean"] == pytest.approx(2.5)
    assert row["nuts_sd"] == pytest.approx(math.sqrt(8 * 1.25 / 7))
    assert row["amortized_sd"] == pytest.approx(math.sqrt(2.0))
    assert row["mean_gap_sd"] == pytest.approx(2.5 / math.sqrt(10 / 7))
    assert row["sd_ratio"] == pytest.approx(math.sqrt(2.0) / math.sqrt(10 / 7))
    assert (row["amortized_lo"], row["amortized_hi"]) == pytest.approx((4.5, 5.5))
    assert math.isnan(row["truth"])
    md = markdown_table(table)
    assert md.splitlines()[0].startswith("| sequence | parameter | truth |")
    assert len(md.splitlines()) == 2 + 2


def test_plot_amortization_gap(phys_only_run, tmp_path: Path) -> None:
    model, guide, x, mcmc = phys_only_run
    q = amortized_samples(guide, x, ["omega"], num_samples=100)
    path = plot_amortization_gap(mcmc, q, tmp_path / "figs" / "gap.png", truth=OMEGA_TRUE)
    assert path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_starting_values_find_the_mode_without_a_guide() -> None:
    model, _ = make_pair("phys-only", n_steps=12, dt=0.1)
    x = simulate(model)
    init = starting_values(model, x, num_chains=3, seed=0)
    starts, scale = init.values["omega"], init.scale["omega"]
    assert starts.shape == (3, 2)
    expected = laplace_sd(model, x)
    # Within a few posterior sds of the truth, distinct per chain, scale ~ Laplace sd.
    assert ((starts - torch.tensor(OMEGA_TRUE)).abs() < 6 * expected).all()
    assert len(set(starts[:, 0].tolist())) == 3
    assert torch.allclose(scale, expected, rtol=0.5)


def test_networks_are_fixed_and_not_sampled() -> None:
    torch.manual_seed(0)
    model, guide = make_pair("phys+nn", n_steps=12, dt=0.1)
    with torch.no_grad():  # make the out-of-ODE net matter
        model.aux2.linears[-1].weight.normal_(0.0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = simulate(model)[:1]
    mcmc = run_nuts(model, x, guide=guide, num_samples=8, warmup_steps=8, num_chains=1, seed=1,
                    mass_matrix="laplace+adapt")
    samples = mcmc.get_samples(group_by_chain=True)
    assert set(samples) == set(model.latent_sites) == {"omega", "z_A1", "z_A2"}
    assert samples["z_A2"].shape == (1, 8, 1, model.dim_z_aux2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in guide.parameters())
    assert torch.isfinite(samples["omega"]).all()


def test_parallel_chains_in_worker_processes(monkeypatch) -> None:
    import pyro.infer.mcmc.api as mcmc_api

    # Pyro runs chains in processes only with a free CPU per chain; pretend there are some.
    monkeypatch.setattr(mcmc_api.mp, "cpu_count", lambda: 8)
    model, _ = make_pair("phys-only", n_steps=12, dt=0.1)
    x = simulate(model)[:1]
    mcmc = run_nuts(model, x, num_samples=5, warmup_steps=5, num_chains=2, seed=0,
                    chain_method="parallel", mp_context="fork")
    assert isinstance(mcmc.sampler, mcmc_api._MultiSampler)
    omega = mcmc.get_samples(group_by_chain=True)["omega"]
    assert omega.shape == (2, 5, 1)
    assert not torch.equal(omega[0], omega[1])
    assert ((omega - OMEGA_TRUE[0]).abs() < 0.1).all()
    assert nuts_to_inference_data(mcmc, model, x).posterior.sizes["chain"] == 2


def test_nn_only_has_no_gap_rows() -> None:
    model, guide = make_pair("nn-only", n_steps=12, dt=0.1)
    x = simulate(make_pair("phys-only", n_steps=12, dt=0.1)[0])[:1]
    mcmc = run_nuts(model, x, guide=guide, num_samples=6, warmup_steps=6, num_chains=1,
                    mass_matrix="diagonal")
    assert set(mcmc.get_samples()) == {"z_A1", "z_A2"}
    table = amortization_gap(model, guide, x, mcmc, num_samples=10)
    assert tuple(table.columns) == GAP_COLUMNS and len(table) == 0
    with_z = amortization_gap(model, guide, x, mcmc, num_samples=10, parameters=["z_A1"])
    assert list(with_z["parameter"]) == ["z_A1[0]", "z_A1[1]"]
    assert with_z["r_hat"].isna().all()  # one chain: no R-hat


def test_dense_inverse_mass_follows_pyro_order() -> None:
    model, _ = make_pair("phys+nn", n_steps=12, dt=0.1)
    layout = LatentLayout.of(model)
    assert layout.names == ("omega", "z_A1", "z_A2") and layout.dim == 4
    K, D = 2, layout.dim
    # Label every scalar by (sequence, position in the layout), then flatten as Pyro does.
    labels = layout.unflatten(torch.arange(K * D).reshape(K, D))
    pyro_flat = torch.cat([labels[name].reshape(-1) for name in sorted(labels)])
    correlation = torch.arange(K * D * D, dtype=torch.float32).reshape(K, D, D)
    mass = dense_inverse_mass(layout, correlation)
    for i, a in enumerate(pyro_flat.tolist()):
        for j, b in enumerate(pyro_flat.tolist()):
            same = a // D == b // D
            expected = correlation[a // D, a % D, b % D] if same else 0.0
            assert mass[i, j] == expected


def test_frozen_parameters_restore_flags_after_errors() -> None:
    net = torch.nn.Linear(2, 2)
    net.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen_parameters(net, None):
        assert not net.weight.requires_grad
        raise RuntimeError("boom")
    assert net.weight.requires_grad and not net.bias.requires_grad


def test_ode_blow_up_is_an_infinite_potential() -> None:
    def potential(z):
        raise IntegrationError("the ODE solution is not finite")

    grads, energy = potential_grad(_GuardedPotential(potential), {"omega": torch.ones(2)})
    assert energy == math.inf
    assert torch.equal(grads["omega"], torch.zeros(2))


@pytest.mark.parametrize(
    "sequences, message",
    [([], "no sequences"), ([0, 16], "out of range"), ([-1], "out of range"),
     ([1, 1], "repeat"), ([0.5], "integers")],
)
def test_bad_sequence_indices(sequences, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_sequence_indices(sequences, 16)


def test_bad_arguments() -> None:
    model, _ = make_pair("phys-only", n_steps=12, dt=0.1)
    x = simulate(model)
    with pytest.raises(ValueError, match="time steps"):
        run_nuts(model, x[:, :5], num_samples=2, warmup_steps=2, num_chains=1)
    with pytest.raises(ValueError, match="chain_method"):
        run_nuts(model, x, num_samples=2, warmup_steps=2, chain_method="threads")
    with pytest.raises(ValueError, match="target_accept_prob"):
        run_nuts(model, x, target_accept_prob=1.5)
    with pytest.raises(ValueError, match="mass_matrix"):
        run_nuts(model, x, mass_matrix="dense")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("nuts_run")
    train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir,
          TrainConfig(epochs=2, batch_size=32, threads=1), model_kwargs=SMALL_MODEL,
          guide_kwargs=SMALL_GUIDE, progress=False)
    return run_dir


def test_nuts_report_writes_everything(tiny_run: Path, tiny_datasets, tmp_path: Path) -> None:
    out = tmp_path / "nuts"
    report = nuts_report(tiny_run, sequences=(2, 0), num_samples=6, warmup_steps=6,
                         num_chains=2, out_dir=out, amortized_draws=50)
    for name in ("nuts.nc", "summary.csv", "amortization_gap.csv", "amortization_gap.md",
                 "amortization_gap.png"):
        assert (out / name).is_file(), name
    assert report["setting"] == "phys+nn+reg" and report["sequences"] == [2, 0]
    idata = az.from_netcdf(out / "nuts.nc")
    assert idata.posterior["z_A1"].dims == ("chain", "draw", "sequence", "z_A1_dim")
    assert idata.posterior.sizes["chain"] == 2
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert report["max_r_hat"] == pytest.approx(summary["r_hat"].max())
    assert report["min_ess_bulk"] == pytest.approx(summary["ess_bulk"].min())
    gap = pd.read_csv(out / "amortization_gap.csv")
    assert list(gap["sequence"]) == [2, 0]
    truth = tiny_datasets["test"]["omega"].values
    np.testing.assert_allclose(gap["truth"], truth[[2, 0]], rtol=1e-6)
    assert np.isfinite(gap["mean_gap_sd"]).all()
    assert report["gap"].shape == gap.shape


def test_nuts_report_rejects_bad_sequences(tiny_run: Path) -> None:
    with pytest.raises(ValueError, match=r"out of range: the split has 16 sequences"):
        nuts_report(tiny_run, sequences=(0, 99))
    with pytest.raises(ValueError, match="no sequences"):
        nuts_report(tiny_run, sequences=())


def test_example_script_runs(tmp_path: Path, monkeypatch) -> None:
    path = Path(__file__).parents[1] / "examples" / "pendulum_nuts.py"
    argv = ["--out", str(tmp_path / "ex"), "--n-train", "32", "--n-steps", "20", "--epochs", "1",
            "--batch", "32", "--hidden", "16", "--sequences", "0,1", "--samples", "6",
            "--warmup", "6", "--chains", "2"]
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    report = runpy.run_path(str(path), run_name="not_main")["main"](argv)
    assert len(report["gap"]) == 2
    assert np.isfinite(report["max_r_hat"])
    assert Path(report["files"]["amortization_gap.png"]).is_file()


# -- every built-in system -------------------------------------------------------------------
def tiny_system(name: str, setting: str = "phys+nn+reg"):
    """A system's tiny data sets (``test_sizes["data"]``) and an untrained model and guide of
    its tiny sizes; the networks' last layers start at zero, so the model is its physics."""
    system = get_system(name)
    sizes = system.test_sizes
    datasets = system.generate(seed=0, **sizes["data"])
    model_kwargs = {**system.model_kwargs_from_data(datasets["test"]), **sizes["model"]}
    model, guide = system.build(setting, model_kwargs, sizes["guide"])
    return system, datasets, model, guide


@pytest.mark.slow
@pytest.mark.parametrize("name", SYSTEMS)
def test_nuts_on_every_system(name: str) -> None:
    system, datasets, model, guide = tiny_system(name)
    ds = datasets["test"].isel(sequence=[3, 1])
    x = system.observations(ds)
    # A smoke run (trees capped at 16 leapfrog steps to bound the cost): R-hat < 1.01 on every
    # latent needs a few hundred draws per chain, minutes per system on one busy core.
    mcmc = run_nuts(model, x, guide=guide, num_samples=NUTS_DRAWS, warmup_steps=NUTS_WARMUP,
                    num_chains=2, seed=0, max_tree_depth=4)
    idata = nuts_to_inference_data(mcmc, model, x, sequence_ids=[3, 1], predictive=True)
    summary = posterior_summary(idata, model, round_to="none")
    assert len(summary) == sum(math.prod(s) for s in model.latent_event_shapes().values()) * 2
    assert np.isfinite(summary["mean"]).all() and (summary["sd"] > 0).all()

    # Every latent, with {site}_dim for a vector; x with the model's observation dims.
    shapes = model.latent_event_shapes()
    assert set(idata.posterior.data_vars) == set(model.latent_sites)
    for site in model.latent_sites:
        assert idata.posterior[site].dims == ("chain", "draw", "sequence",
                                              *(f"{site}_dim" for _ in shapes[site]))
        assert idata.posterior[site].shape[2:] == (2, *shapes[site])
    obs = model.observation_dims
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "sequence", *obs)
    assert idata.posterior_predictive["x"].shape == (2, NUTS_DRAWS, *x.shape)
    assert idata.observed_data["x"].dims == ("sequence", *obs)
    np.testing.assert_allclose(idata.observed_data["x"].values, x.numpy())
    assert list(idata.posterior["sequence"].values) == [3, 1]
    for dim, values in model.observation_coords().items():
        np.testing.assert_allclose(idata.observed_data[dim].values, values.numpy())
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "sequence")
    assert np.isfinite(idata.log_likelihood["x"].values).all()

    # The gap table: a row per sequence and physics parameter, angles modulo their period.
    truth = {p.name: ds[p.name].values for p in model.physics_parameters if p.name in ds}
    table = amortization_gap(model, guide, x, idata, num_samples=200, truth=truth,
                             sequence_ids=[3, 1])
    names = [p.name for p in model.physics_parameters]
    assert list(table["parameter"]) == [n for n in names for _ in range(2)]
    assert (table["nuts_lo"] <= table["nuts_mean"]).all() and (table["nuts_mean"] <= table["nuts_hi"]).all()
    for p in model.physics_parameters:
        period = getattr(p, "period", None)
        if period is not None:
            rows = table[table["parameter"] == p.name]
            assert ((rows["truth"] - rows["nuts_mean"]).abs() <= period / 2).all()
            assert ((rows["amortized_hi"] - rows["amortized_lo"]) <= period).all()


def test_candidates_stay_bounded_with_many_physics_parameters() -> None:
    _, datasets, model, guide = tiny_system("galaxy")
    x = get_system("galaxy").observations(datasets["test"])[:2]
    layout = LatentLayout.of(model)
    assert len(model.physics_parameters) == 4
    assert layout.names == ("A", "I0", "e", "theta", "z_A2")
    cand = _candidates(model, x, layout, guide, 16)
    # mean + 16 draws + 4 sweeps of 4 points + a 16-point Latin hypercube, not 16 ** 4.
    assert cand.shape == (1 + 16 + 16 + 16, 2, layout.dim)
    design = cand[-16:, 0]
    for p in model.physics_parameters:
        pos = layout.positions(p.name).start
        grid = torch.linspace(p.low, p.high, 16)
        # Each parameter's grid is used once in the design (a Latin hypercube).
        torch.testing.assert_close(design[:, pos].sort().values, grid)
    # A pendulum keeps its single grid of 16 points over omega's range.
    pend, pend_guide = make_pair("phys+nn", n_steps=12, dt=0.1)
    pend_layout = LatentLayout.of(pend)
    assert _candidates(pend, simulate(pend), pend_layout, pend_guide, 16).shape[0] == 1 + 16 + 16


def test_angles_are_compared_modulo_their_period() -> None:
    _, _, model, guide = tiny_system("galaxy", "phys-only")
    period = math.pi
    # NUTS draws near pi (one chain a period lower), encoder draws near 0, truth at 0.02:
    # modulo pi they all agree to within a few hundredths.
    rng = np.random.default_rng(0)
    nuts = np.stack([period - 0.01 + 0.01 * rng.standard_normal(400),
                     -0.01 + 0.01 * rng.standard_normal(400)])[..., None]  # (chain, draw, 1)
    idata = az.from_dict(posterior={p.name: nuts if p.name == "theta" else rng.random((2, 400, 1))
                                    for p in model.physics_parameters})
    amortized = {p.name: rng.random((300, 1)) for p in model.physics_parameters}
    amortized["theta"] = 0.05 * rng.standard_normal((300, 1))
    x = torch.zeros(1, *model.observation_shape())
    table = amortization_gap(model, guide, x, idata, amortized=amortized,
                             truth={"theta": [0.02]}).set_index("parameter")
    row = table.loc["theta"]
    # One representative of the angle (a whole number of periods apart from -0.01) ...
    assert math.remainder(row["nuts_mean"] + 0.01, period) == pytest.approx(0.0, abs=2e-3)
    assert row["nuts_sd"] == pytest.approx(0.01, rel=0.15)
    assert row["r_hat"] < 1.01  # the two chains sit in different branches of one angle
    # ... and the truth and the encoder's draws in the same window around it.
    assert row["truth"] - row["nuts_mean"] == pytest.approx(0.03, abs=2e-3)
    assert row["amortized_mean"] - row["nuts_mean"] == pytest.approx(0.01, abs=0.01)
    assert row["amortized_sd"] == pytest.approx(0.05, rel=0.15)
    assert row["nuts_lo"] < row["nuts_mean"] < row["nuts_hi"] < row["nuts_lo"] + 0.1
    assert math.isnan(table.loc["I0", "truth"]) and table.loc["I0", "r_hat"] < 1.1
    summary = posterior_summary(idata, model, round_to="none")
    assert summary.loc["theta[0]", "r_hat"] < 1.01
    assert summary.loc["theta[0]", "sd"] == pytest.approx(row["nuts_sd"], rel=1e-6)
    assert az.summary(idata, var_names=["theta"])["r_hat"].max() > 1.5  # unwrapped: no mixing


@pytest.fixture(scope="module")
def tiny_advdif_run(tmp_path_factory) -> tuple[Path, Path]:
    system, datasets, _, _ = tiny_system("advdif")
    data_dir = tmp_path_factory.mktemp("advdif_data")
    for split in SPLITS:
        save_dataset(datasets[split], data_dir / f"{split}.nc")
    run_dir = tmp_path_factory.mktemp("advdif_run")
    sizes = system.test_sizes
    train(system, "phys+nn+reg", data_dir, run_dir, TrainConfig(epochs=2, batch_size=16, threads=1),
          model_kwargs=dict(sizes["model"]), guide_kwargs=dict(sizes["guide"]), progress=False)
    return data_dir, run_dir


@pytest.mark.slow
def test_nuts_report_of_another_system(tiny_advdif_run, tmp_path: Path) -> None:
    data_dir, run_dir = tiny_advdif_run
    out = tmp_path / "nuts"
    report = nuts_report(run_dir, sequences=(4, 0), num_samples=20, warmup_steps=20,
                         num_chains=2, out_dir=out, amortized_draws=50)
    assert report["system"] == "advdif" and report["sequences"] == [4, 0]
    for name in ("nuts.nc", "summary.csv", "amortization_gap.csv", "amortization_gap.md",
                 "amortization_gap.png"):
        assert (out / name).is_file(), name
    idata = az.from_netcdf(out / "nuts.nc")
    test = get_system("advdif").load_split(data_dir, "test")
    assert idata.observed_data["x"].dims == ("sequence", "space", "time")
    # The data set's coordinates (grid positions [m], times [s]) travel with x.
    np.testing.assert_allclose(idata.observed_data["space"].values, test["space"].values)
    np.testing.assert_allclose(idata.observed_data["time"].values, test["time"].values)
    np.testing.assert_allclose(idata.observed_data["x"].values, test["x"].values[[4, 0]])
    assert idata.posterior["z_A1"].dims == ("chain", "draw", "sequence", "z_A1_dim")
    gap = pd.read_csv(out / "amortization_gap.csv")
    assert list(gap["parameter"]) == ["diffusion"] * 2
    np.testing.assert_allclose(gap["truth"], test["diffusion"].values[[4, 0]], rtol=1e-6)
    summary = pd.read_csv(out / "summary.csv", index_col=0)
    assert report["max_r_hat"] == pytest.approx(summary["r_hat"].max())


@pytest.mark.slow
def test_nuts_command_on_another_system(tiny_advdif_run, tmp_path: Path, capsys) -> None:
    from pyro_physvae.cli import main

    _, run_dir = tiny_advdif_run
    main(["nuts", str(run_dir), "--sequences", "0,1", "--chains", "2", "--samples", "10",
          "--warmup", "10", "--amortized-draws", "20", "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert "| sequence | parameter |" in printed and "max R-hat" in printed
    assert (tmp_path / "cli" / "nuts.nc").is_file()
