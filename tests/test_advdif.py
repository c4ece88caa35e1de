"""Advection-diffusion: finite differences, data, model/guide semantics, roll-outs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_physvae.data import advdif as data
from pyro_physvae.data.io import load_split, save_dataset
from pyro_physvae.extrapolation import errors_by_step, horizon_table, rollout
from pyro_physvae.guides.advdif import AdvDifGuide
from pyro_physvae.models.advdif import AdvDifModel
from pyro_physvae.pde import central_difference_matrix, dirichlet_eigenpair, second_difference_matrix
from pyro_physvae.regularizers import PhysVAELoss, phys_vae_regularizers
from pyro_physvae.settings import SETTINGS

X, T, DX, DT = 8, 10, 0.1, 0.02
SMALL_MODEL = {"n_grid": X, "n_steps": T, "dx": DX, "dt": DT, "hidden_aux1": (16,)}
SMALL_GUIDE = {"hidden_feat": (16,), "feat_dim": 16, "hidden_aux": (8,), "hidden_unmixer": (16,),
               "hidden_phys": (8,)}


def make_pair(setting: str, **model_kwargs):
    model = AdvDifModel(setting, **{**SMALL_MODEL, **model_kwargs})
    return model, AdvDifGuide(model, **SMALL_GUIDE)


@pytest.fixture
def fields() -> torch.Tensor:
    """Six noisy advection-diffusion fields ``(6, X, T)`` on the small grid."""
    config = data.AdvDifDataConfig(n_train=6, n_valid=1, n_test=1, n_grid=X, n_steps=T, dx=DX, dt=DT)
    return torch.as_tensor(data.generate(config, seed=1)["train"]["x"].values)


# -- finite differences --------------------------------------------------------------------
def test_second_difference_of_a_parabola_is_its_curvature():
    x = torch.arange(6, dtype=torch.float64) * 0.5
    u = 3.0 * x**2 + x + 1.0
    lap = second_difference_matrix(6, 0.5, dtype=torch.float64)
    assert torch.allclose((lap @ u)[1:-1], torch.full((4,), 6.0, dtype=torch.float64))
    # Zero just outside the grid: the end rows see a ghost value of 0.
    assert torch.isclose((lap @ u)[0], (u[1] - 2 * u[0]) / 0.25)


def test_central_difference_is_exact_for_lines_and_skew_symmetric():
    grad = central_difference_matrix(7, 0.2, dtype=torch.float64)
    x = torch.arange(7, dtype=torch.float64) * 0.2
    assert torch.allclose((grad @ (2 * x - 1))[1:-1], torch.full((5,), 2.0, dtype=torch.float64))
    assert torch.allclose(grad, -grad.T)


@pytest.mark.parametrize("k", [1, 3])
def test_dirichlet_eigenpair(k):
    lam, vec = dirichlet_eigenpair(12, 0.1, k)
    lap = second_difference_matrix(12, 0.1)
    assert torch.allclose(lap @ vec, -lam * vec, atol=1e-3)
    with pytest.raises(ValueError, match="mode k"):
        dirichlet_eigenpair(12, 0.1, 13)


def test_grid_checks():
    with pytest.raises(ValueError, match="at least 2 points"):
        second_difference_matrix(1, 0.1)
    with pytest.raises(ValueError, match="dx must be positive"):
        central_difference_matrix(5, 0.0)


@pytest.mark.parametrize("method,substeps,tol", [("euler", 50, 2e-3), ("rk4", 2, 1e-5),
                                                  ("dopri5", 1, 1e-5)])
def test_physics_matches_the_closed_form_diffusion_of_the_sine_mode(method, substeps, tol):
    """``u(t) = exp(-D lam t) v`` for the sine eigenmode v of the discrete Laplacian."""
    model = AdvDifModel("phys-only", method=method, substeps=substeps, **SMALL_MODEL)
    lam, vec = dirichlet_eigenpair(X, DX, 1)
    d = torch.tensor([0.03, 0.15])
    u = model.physics_only(vec.expand(2, X), d)
    t = torch.arange(T) * DT
    exact = torch.exp(-d[:, None, None] * lam * t) * vec[None, :, None]
    assert u.shape == (2, X, T)
    assert torch.allclose(u, exact, atol=tol, rtol=0)


def test_semi_discrete_diffusion_converges_to_the_continuous_solution():
    """On a refined grid the first mode decays at the continuous rate ``D (pi / L)^2``."""
    n, length = 199, 1.0
    dx = length / (n + 1)
    lam, _ = dirichlet_eigenpair(n, dx, 1)
    assert math.isclose(lam, (math.pi / length) ** 2, rel_tol=1e-4)


# -- data ------------------------------------------------------------------------------------
def test_generator_layout_ranges_and_noise():
    config = data.AdvDifDataConfig(n_train=40, n_valid=5, n_test=5, n_steps=30)
    splits = data.generate(config, seed=3)
    ds = splits["train"]
    assert ds["x"].dims == ("sequence", "space", "time")
    assert ds["x"].shape == (40, 20, 30)
    assert ds.attrs["system"] == "advdif" and ds.attrs["dx"] == 0.1 and ds.attrs["dt"] == 0.02
    np.testing.assert_allclose(ds["space"].values, np.arange(20) * 0.1)
    for name in data.PARAMS:
        lo, hi = getattr(config, name)
        assert ds[name].min() >= lo and ds[name].max() <= hi
    clean = data.true_fields(ds, 30).numpy()
    residual = ds["x"].values - clean
    assert abs(residual.std() - config.noise_std) < 1e-4
    # The initial profile is a * sin(pi x / x_max): zero at both ends of the grid.
    np.testing.assert_allclose(clean[:, [0, -1], 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(clean[:, :, 0].max(1), ds["amplitude"].values, rtol=0.02)
    again = data.generate(config, seed=3)["train"]
    np.testing.assert_array_equal(again["x"].values, ds["x"].values)
    assert not np.array_equal(data.generate(config, seed=4)["train"]["x"].values, ds["x"].values)


def test_truth_is_advected_downstream_and_its_norm_decays():
    ds = data.generate(data.AdvDifDataConfig(n_train=3, n_valid=1, n_test=1, noise_std=0.0,
                                             diffusion=(0.01, 0.01), advection=(0.1, 0.1)))["train"]
    u = data.true_fields(ds, 500).numpy()
    centre = (u * ds["space"].values[None, :, None]).sum(1) / u.sum(1)
    assert np.all(np.diff(centre[:, :200], axis=1) > 0)  # mass moves towards +x
    norm = np.linalg.norm(u, axis=1)
    assert np.all(np.diff(norm, axis=1) <= 1e-12)


def test_netcdf_round_trip(tmp_path):
    ds = data.generate(data.AdvDifDataConfig(n_train=4, n_valid=2, n_test=2, n_steps=6))["valid"]
    save_dataset(ds, tmp_path / "valid.nc")
    back = load_split(tmp_path, "valid", system="advdif")
    np.testing.assert_array_equal(back["x"].values, ds["x"].values)
    np.testing.assert_array_equal(back["diffusion"].values, ds["diffusion"].values)


def _write_reference(directory: Path, split: str, x: np.ndarray, params: np.ndarray | None,
                     dx: float = 0.1, dt: float = 0.02) -> None:
    np.save(directory / f"data_{split}.npy", x)
    (directory / f"args_{split}.json").write_text(json.dumps({"dx": dx, "dt": dt, "seed": 1}))
    if params is not None:
        np.savetxt(directory / f"true_params_{split}.txt", params, fmt="%.9e",
                   header="init_mag dcoeff ccoeff")


def test_reference_npy_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 20, 50))
    params = np.column_stack([rng.uniform(0.5, 1.5, 5), rng.uniform(0.01, 0.1, 5),
                              rng.uniform(0.01, 0.1, 5)])
    _write_reference(tmp_path, "train", x, params, dx=0.15, dt=0.12)
    ds = data.load_reference_npy(tmp_path, "train")
    assert ds["x"].shape == (5, 20, 50) and ds.attrs["dx"] == 0.15 and ds.attrs["dt"] == 0.12
    np.testing.assert_allclose(ds["diffusion"].values, params[:, 1], rtol=1e-8)
    np.testing.assert_allclose(ds["x"].values, x, rtol=1e-6)
    assert data.load_reference_npy(tmp_path, "train", dt=0.5).attrs["dt"] == 0.5


@pytest.mark.parametrize("problem,match", [
    ("missing", "data file not found"),
    ("rank", r"expected an array \(N, n_grid, T\)"),
    ("nan", "NaN"),
    ("header", "header must be"),
    ("rows", "expected 5 rows"),
    ("no_args", "pass dx= and dt="),
])
def test_reference_npy_loader_errors(tmp_path, problem, match):
    x = np.zeros((5, 20, 50))
    params = np.full((5, 3), 0.05)
    if problem == "rank":
        x = np.zeros((5, 20))
    if problem == "nan":
        x[1, 2, 3] = np.nan
    if problem != "missing":
        _write_reference(tmp_path, "train", x, params[:4] if problem == "rows" else params)
    if problem == "header":
        np.savetxt(tmp_path / "true_params_train.txt", params, header="a b c")
    if problem == "no_args":
        (tmp_path / "args_train.json").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        data.load_reference_npy(tmp_path, "train")


# -- model and guide -------------------------------------------------------------------------
def test_sites_and_shapes_in_every_setting(setting, fields):
    model, guide = make_pair(setting)
    guide_trace = poutine.trace(guide).get_trace(fields)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(fields)
    n = fields.shape[0]
    assert trace.nodes["x"]["fn"].event_shape == (X, T)
    assert trace.nodes["x"]["fn"].batch_shape == (n,)
    assert trace.nodes["init"]["value"].shape == (n, X)
    assert trace.nodes["x_mean"]["value"].shape == (n, X, T)
    assert ("diffusion" in trace.nodes) == (setting != "nn-only")
    assert ("z_A1" in trace.nodes) == (setting != "phys-only")
    if setting == "nn-only":
        assert trace.nodes["z_A1"]["value"].shape == (n, 5)
    if setting.startswith("phys+nn"):
        assert trace.nodes["z_A1"]["value"].shape == (n, 4)
        assert torch.equal(trace.nodes["x_PB"]["value"], trace.nodes["x_P"]["value"])
        assert guide_trace.nodes["unmixed"]["value"].shape == (n, X, T)
        assert torch.equal(trace.nodes["x_PA"]["value"], trace.nodes["x_mean"]["value"])
    # The first observed step is the initial state itself.
    assert torch.allclose(trace.nodes["x_mean"]["value"][..., 0], fields[..., 0])


def test_gradients_reach_the_in_ode_net_the_encoder_and_the_diffusion(fields):
    model, guide = make_pair("phys+nn")
    model.aux1.linears[-1].weight.data.normal_(0, 0.1)  # leave the zero start
    loss = Trace_ELBO().differentiable_loss(model, guide, fields)
    loss.backward()
    for net in (model.aux1, guide.aux1, guide.unmixer, guide.phys_features, guide.diffusion_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    d = torch.tensor([0.05, 0.1], requires_grad=True)
    model.decode(fields[:2, :, 0], d, torch.zeros(2, 4))["x_P"].sum().backward()
    assert d.grad is not None and torch.all(d.grad != 0)


def test_time_input_variant_runs_and_reads_time(fields):
    model, guide = make_pair("phys+nn", time_input=True)
    assert model.aux1.linears[0].in_features == X + 2 + 4
    model.aux1.linears[-1].weight.data.normal_(0, 0.1)
    z = torch.zeros(2, 4)
    out = model.decode(fields[:2, :, 0], torch.tensor([0.05, 0.05]), z)
    # Same state, different time: the in-ODE net's output differs through sin t, cos t.
    net = model._in_ode_net(z, model.select_pa, model.into_pa)
    y = torch.cat((fields[:2, :, 0], fields[:2, :, 0]), -1)
    assert not torch.allclose(net(torch.tensor(0.0), y), net(torch.tensor(1.0), y))
    assert out["x_PA"].shape == (2, X, T)


def test_rollout_extends_the_time_axis_and_clamps_the_diffusion(fields):
    model = AdvDifModel("phys-only", **SMALL_MODEL)
    init = fields[:2, :, 0]
    long = model.decode(init, torch.tensor([0.05, 5.0]), None, n_steps=40)["x_mean"]
    assert long.shape == (2, X, 40)
    assert torch.allclose(long[..., :T], model.decode(init, torch.tensor([0.05, 0.2]), None)["x_mean"])


def test_augmentation_draws_diffusion_over_its_range(fields):
    model = AdvDifModel("phys+nn+reg", **SMALL_MODEL)
    truth, sim = model.simulate_augmentation(fields[:, :, 0])
    d = truth["diffusion"]
    assert d.shape == (fields.shape[0],) and sim.shape == fields.shape
    assert torch.all((d >= model.diffusion.low) & (d <= model.diffusion.high))


def test_input_errors(fields):
    model, guide = make_pair("phys+nn")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, 10\)"):
        model(fields[:, :-1])
    with pytest.raises(ValueError, match="3 dimensions"):
        model(fields[:, :, 0])
    with pytest.raises(ValueError, match="time steps"):
        model(fields[..., :-1])
    with pytest.raises(ValueError, match="not physics parameters"):
        model(fields, priors={"omega": pyro.distributions.Normal(0.0, 1.0)})
    with pytest.raises(ValueError, match="n_grid"):
        AdvDifModel(n_grid=2)
    with pytest.raises(ValueError, match="dx must be positive"):
        AdvDifModel(dx=0.0)


def test_prior_override_reaches_the_site(fields):
    model = AdvDifModel("phys-only", **SMALL_MODEL)
    prior = pyro.distributions.Delta(torch.tensor(0.07))
    tr = poutine.trace(model).get_trace(fields, priors={"diffusion": prior})
    assert torch.allclose(tr.nodes["diffusion"]["value"], torch.tensor(0.07))


def test_ppc_sums_over_space_and_time(fields):
    """With no out-of-ODE net, R_ppc = 0.5 |x_PA - x_P|^2 over the whole field."""
    model, guide = make_pair("phys+nn+reg")
    model.aux1.linears[-1].weight.data.normal_(0, 0.1)
    (ppc,) = phys_vae_regularizers(alpha=1.0, beta=0.0, gamma=0.0)
    loss = PhysVAELoss(Trace_ELBO(), [ppc])
    pyro.set_rng_seed(3)
    loss.loss(model, guide, fields)
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(guide).get_trace(fields)
    tr = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(fields)
    expected = 0.5 * (tr.nodes["x_PA"]["value"] - tr.nodes["x_P"]["value"]).pow(2).sum((-1, -2))
    assert loss.last_terms["ppc"] == pytest.approx(float(expected.detach().mean()), rel=1e-4)
    assert float(expected.detach().mean()) > 0


# -- extrapolation ---------------------------------------------------------------------------
def test_errors_by_step_and_horizon_table():
    truth = torch.ones(2, 3, 5)
    pred = truth.clone()
    pred[..., 3:] += 0.5
    pred[1, :, 4] *= 3.0  # sequence 1's norm grows 4.5x at the last step
    e = errors_by_step(pred, truth)
    np.testing.assert_allclose(e["mse"][:3], 0.0)
    assert e["mse"][3] == pytest.approx(0.25)
    assert e["relative_rmse"][3] == pytest.approx(0.5)
    assert e["norm_ratio"][4] == pytest.approx(4.5)
    table = horizon_table(e, (3, 4))
    assert table["3"]["mse"] == 0.0 and table["4"]["mean_mse_to_here"] == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="differ"):
        errors_by_step(pred[..., :4], truth)


def test_rollout_of_the_physics_reproduces_pure_diffusion():
    """phys-only with the guide's D replaced by the truth: the roll-out equals the truth."""
    config = data.AdvDifDataConfig(n_train=3, n_valid=1, n_test=1, n_grid=X, n_steps=T,
                                   noise_std=0.0, advection=(0.0, 0.0))
    ds = data.generate(config, seed=0)["train"]
    x = torch.as_tensor(ds["x"].values)
    model = AdvDifModel("phys-only", substeps=20, **SMALL_MODEL)
    truth_d = torch.as_tensor(ds["diffusion"].values, dtype=torch.float32)

    def guide(x, subsample=None, **kwargs):
        with pyro.plate("data", x.shape[0], subsample=subsample) as idx:
            pyro.sample("diffusion", pyro.distributions.Delta(truth_d[idx]))

    curves = rollout(model, guide, x, 200, num_samples=2)
    truth = data.true_fields(ds, 200).float()
    assert curves["x_mean"].shape == (3, X, 200)
    assert torch.allclose(curves["x_mean"], truth, atol=2e-3)
    with pytest.raises(ValueError, match="cannot be rolled out"):
        from pyro_physvae.models.pendulum import PendulumModel
        rollout(PendulumModel("phys-only", n_steps=5, dt=0.1), guide, torch.zeros(2, 5), 10)


@pytest.mark.parametrize("setting", SETTINGS)
def test_model_runs_with_the_adaptive_solver(setting, fields):
    model, guide = make_pair(setting, method="dopri5", rtol=1e-4, atol=1e-5)
    assert math.isfinite(Trace_ELBO().loss(model, guide, fields))


@pytest.mark.parametrize("kwargs,match", [
    ({"n_grid": 2}, "n_grid must be at least 3"),
    ({"dx": 0.0}, "dx must be positive"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
    ({"diffusion": (0.1, 0.01)}, "range of diffusion must have low <= high"),
    ({"diffusion": (-0.1, 0.1)}, "diffusion coefficients must be >= 0"),
    ({"n_steps": 0}, "n_steps must be a positive integer"),
])
def test_generator_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.AdvDifDataConfig(**kwargs)


def test_truth_needs_the_true_parameters():
    ds = data.make_dataset(np.zeros((2, 5, 4)), 0.1, 0.02)
    with pytest.raises(ValueError, match="lacks the true parameters"):
        data.true_fields(ds, 10)
