"""Locomotion: gait data layouts, the Hamiltonian model/guide, training and evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive

from pyro_physvae.cli import main
from pyro_physvae.data import locomotion as data
from pyro_physvae.data.io import load_split
from pyro_physvae.evaluate import evaluate, latent_correlations, variance_explained
from pyro_physvae.guides.locomotion import LocomotionGuide
from pyro_physvae.models.locomotion import LocomotionModel, relative_energy_drift
from pyro_physvae.regularizers import phys_vae_regularizers
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, train

REAL = Path(__file__).parents[1].parent / "shared" / "data" / "locomotion"
T = 21
SMALL_MODEL = {"n_steps": T, "hidden_energy": (16,), "hidden_aux2": (16,), "dim_z_aux2": 3}
SMALL_GUIDE = {"hidden_feat": (16,), "feat_dim": 16, "hidden_heads": (8,)}
PROPS = np.array([[0, 1.2, 1.3, 0.1, 110.0], [1, 0.8, 1.1, 0.09, 90.0]])


def make_pair(setting: str, **model_kwargs):
    model = LocomotionModel(setting, **{**SMALL_MODEL, **model_kwargs})
    return model, LocomotionGuide(model, **SMALL_GUIDE)


@pytest.fixture
def angles() -> torch.Tensor:
    """Six synthetic gait cycles ``(6, 3, T)``."""
    config = data.GaitDataConfig(n_train=6, n_valid=1, n_test=1, n_steps=T)
    return torch.as_tensor(data.generate(config, seed=1)["train"]["x"].values)


# -- data ------------------------------------------------------------------------------------
def test_npy_layout_with_properties(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 3, T)).astype(np.float32)
    np.save(tmp_path / "train.npy", x)
    np.savetxt(tmp_path / "props_train.txt", PROPS)
    ds = get_system("locomotion").load_split(tmp_path, "train")  # read in place: no train.nc here
    assert ds["x"].dims == ("sequence", "joint", "time") and ds["x"].shape == (2, 3, T)
    np.testing.assert_allclose(ds["x"].values, x)
    assert ds["speed"].values.tolist() == [1.2, 0.8] and ds["cadence"].attrs["units"] == "steps/min"
    assert ds.attrs["system"] == "locomotion" and float(ds["time"][1]) == pytest.approx(0.02)


def test_matlab_layout_v5_without_properties(tmp_path):
    from scipy.io import savemat

    x = np.random.default_rng(1).normal(size=(4, 3, T))
    savemat(tmp_path / "data_valid.mat", {"data": x})
    ds = data.read_split(tmp_path, "valid")
    np.testing.assert_allclose(ds["x"].values, x.astype(np.float32))
    assert "speed" not in ds


def test_matlab_layout_v73_hdf5(tmp_path):
    import h5py

    x = np.random.default_rng(2).normal(size=(4, 3, T)).astype(np.float32)
    with h5py.File(tmp_path / "data_test.mat", "w") as f:
        f["data"] = x.transpose()  # MATLAB writes column-major arrays transposed
    assert np.array_equal(data.read_split(tmp_path, "test")["x"].values, x)


@pytest.mark.parametrize(("problem", "match"), [
    ("missing", "expected test.npy or data_test.mat"),
    ("rank", r"shape \(N, 3, T\)"),
    ("nan", "NaN"),
    ("props_rows", "must have 2 rows"),
    ("props_text", "table of numbers"),
    ("corrupt", "cannot read"),
    ("mat_key", "no 'data' array"),
])
def test_reader_errors_name_the_problem(tmp_path, problem, match):
    x = np.zeros((2, 3, T), dtype=np.float32)
    if problem == "rank":
        x = np.zeros((2, T), dtype=np.float32)
    if problem == "nan":
        x[1, 2, 3] = np.nan
    if problem == "corrupt":
        (tmp_path / "test.npy").write_bytes(b"not an array")
    elif problem == "mat_key":
        from scipy.io import savemat

        savemat(tmp_path / "data_test.mat", {"angles": x})
    elif problem != "missing":
        np.save(tmp_path / "test.npy", x)
    if problem == "props_rows":
        np.savetxt(tmp_path / "props_test.txt", PROPS[:1])
    if problem == "props_text":
        (tmp_path / "props_test.txt").write_text("a b c d e\n1 2 3 4 5\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        data.read_split(tmp_path, "test")


def test_synthetic_generator_is_seeded_and_follows_speed():
    config = data.GaitDataConfig(n_train=200, n_valid=2, n_test=2, n_steps=T, noise_std=0.0)
    a, b = data.generate(config, seed=5), data.generate(config, seed=5)
    assert np.array_equal(a["train"]["x"].values, b["train"]["x"].values)
    ds = a["train"]
    assert ds["x"].shape == (200, 3, T) and set(data.PROPERTIES) <= set(ds.data_vars)
    swing = ds["x"].values.max(-1) - ds["x"].values.min(-1)  # range of each joint angle
    assert np.corrcoef(swing[:, 0], ds["speed"].values)[0, 1] > 0.5
    cadence = 120 * ds["speed"].values / ds["stride"].values
    np.testing.assert_allclose(ds["cadence"].values, cadence)
    with pytest.raises(ValueError, match="positive"):
        data.GaitDataConfig(speed=(0.0, 1.0))


@pytest.mark.skipif(not (REAL / "train.npy").is_file(), reason="real gait data not present")
def test_real_gait_recordings_load_with_their_properties():
    for split, n in (("train", 400), ("valid", 100)):
        ds = get_system("locomotion").load_split(REAL, split)
        assert ds["x"].shape == (n, 3, 101) and ds["speed"].shape == (n,)
        assert 0.1 < float(ds["speed"].mean()) < 3 and 50 < float(ds["cadence"].mean()) < 200
        assert float(np.abs(ds["x"]).max()) < math.pi  # radians


# -- the model -------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS)
def test_sites_and_shapes_in_every_setting(setting, angles):
    model, guide = make_pair(setting)
    guide_tr = poutine.trace(guide).get_trace(angles)
    tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(angles)
    latents = set(tr.stochastic_nodes) - {"data"}  # the plate's subsample site
    physics = setting != "nn-only"
    expected = {"y0"} | ({"z_P"} if physics else set()) | ({"z_A2"} if setting != "phys-only" else set())
    assert latents == expected and set(guide_tr.stochastic_nodes) - {"data"} == expected
    assert tr.nodes["y0"]["value"].shape == (6, 6 if physics else 3)
    assert tr.nodes["x"]["fn"].event_shape == (3, T) and tr.nodes["x_mean"]["value"].shape == (6, 3, T)
    assert ("x_P" in tr.nodes) == physics and ("x_PB" in tr.nodes) == (setting in ("phys+nn", "phys+nn+reg"))
    assert "init" not in tr.nodes and "unmixed" not in guide_tr.nodes


def test_predictive_draws_and_generation_without_data(angles):
    model, guide = make_pair("phys+nn")
    post = Predictive(model, guide=guide, num_samples=4, parallel=True)(angles)
    assert post["x"].shape == (4, 6, 3, T) and post["z_P"].shape == (4, 6, 2)
    prior = Predictive(model, num_samples=3)(size=5)
    assert prior["x"].shape == (3, 5, 3, T) and torch.isfinite(prior["x"]).all()
    with pytest.raises(ValueError, match="size="):
        model()
    with pytest.raises(ValueError, match="reads no initial state"):
        model(angles, init=angles[:, 0, 0])
    with pytest.raises(ValueError, match=r"shape \(N, 3, 21\)"):
        model(angles[:, :2])


def test_hamiltonian_field_of_a_known_energy_is_the_harmonic_oscillator():
    """With H = |q|^2/2 + |p|^2/2 the field is (p, -q): q(t) = q0 cos t + p0 sin t, and
    the energy is conserved."""
    model = LocomotionModel("phys-only", n_steps=T, dt=0.05, method="rk4", substeps=4)
    y0 = torch.tensor([[1.0, 0.0, -0.5, 0.0, 2.0, 0.3]], dtype=torch.float64)
    field = model.hamiltonian_field(lambda y: 0.5 * y.pow(2).sum(-1))
    ys = model.solve(field, y0, model.t.double())
    t = model.t.double()[:, None]
    exact = y0[:, :3] * torch.cos(t) + y0[:, 3:] * torch.sin(t)
    assert torch.allclose(ys[0, :, :3], exact, atol=1e-7)
    energy = 0.5 * ys.pow(2).sum(-1)
    assert (energy - energy[:, :1]).abs().max() < 1e-7


def test_default_energy_starts_as_an_oscillator_with_the_window_as_period():
    model = LocomotionModel("phys-only", n_steps=101, hidden_energy=(8,))
    assert model.harmonic_period == pytest.approx(2.0)
    y0 = torch.tensor([[0.3, -0.2, 0.1, 0.5, 0.0, -0.4]])
    q = model.trajectory(y0, torch.zeros(1, 2))[0, :, :3]
    assert torch.allclose(q[-1], q[0], atol=2e-2)  # back after one window
    assert torch.allclose(q[50], -q[0], atol=2e-2)  # opposite after half of it
    with pytest.raises(ValueError, match="harmonic_period"):
        LocomotionModel("phys-only", harmonic_period=-1.0)


def test_learnt_energy_is_conserved_better_by_higher_order_solvers():
    torch.manual_seed(0)
    y0, z = torch.randn(8, 6), torch.randn(8, 2)
    drifts = {}
    for method in ("euler", "midpoint", "rk4"):
        model = LocomotionModel("phys+nn+reg", **{**SMALL_MODEL, "hidden_energy": (32, 32)}, method=method,
                                harmonic_period=None)
        torch.manual_seed(1)
        for lin in model.energy.linears:  # the same lively energy for every solver
            torch.nn.init.normal_(lin.weight, std=0.7)
        result = model.energy_drift(y0, z)
        assert result["energy"].shape == (8, T) and result["relative"].shape == (8,)
        drifts[method] = float(result["relative"].median())
    assert drifts["rk4"] < 0.5 * drifts["midpoint"] and drifts["midpoint"] < 0.1 * drifts["euler"]
    assert drifts["midpoint"] < 0.01
    with pytest.raises(ValueError, match="two sequences"):
        relative_energy_drift(torch.ones(1), torch.ones(1))


def test_ppc_is_the_residual_energy_over_joints_and_time(angles):
    model, guide = make_pair("phys+nn+reg")
    torch.nn.init.normal_(model.aux2.linears[-1].weight)
    reg = phys_vae_regularizers(1.0, 0.0, 0.0)[0]  # event rank from the model
    guide_tr = poutine.trace(guide).get_trace(angles)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(angles)
    sites = {n: s["value"] for n, s in model_tr.nodes.items() if s["type"] == "sample"}
    expected = (sites["x_PB"] - sites["x_P"]).pow(2).sum((-2, -1))
    assert torch.allclose(reg(model, guide, sites), expected) and expected.shape == (6,)


# -- training and evaluation ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    from pyro_physvae.data.io import save_dataset

    root = tmp_path_factory.mktemp("loco")
    config = data.GaitDataConfig(n_train=48, n_valid=16, n_test=16, n_steps=T)
    for split, ds in data.generate(config, seed=0).items():
        save_dataset(ds, root / "data" / f"{split}.nc")
    pyro.clear_param_store()
    history = train("locomotion", "phys+nn+reg", root / "data", root / "run",
                    TrainConfig(epochs=30, batch_size=16, threads=1, lr=3e-3),
                    model_kwargs={k: v for k, v in SMALL_MODEL.items() if k != "n_steps"},
                    guide_kwargs=SMALL_GUIDE, progress=False)
    return root, history


def test_training_lowers_the_loss_and_tracks_ppc(tiny_run):
    _, history = tiny_run
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"] and last["val_mse"] < first["val_mse"]
    assert all("ppc" in r for r in history)


def test_evaluation_reports_latent_correlations_energy_and_physics_share(tiny_run):
    root, _ = tiny_run
    m = evaluate(root / "run", split="test", num_samples=8, iwae_particles=4)
    assert set(m["latent_correlations"]) == {"speed", "cadence", "stride", "step_width"}
    by_latent = m["latent_correlations"]["speed"]["by_latent"]
    assert set(by_latent) == {f"y0[{i}]" for i in range(6)} | {"z_P[0]", "z_P[1]"} | {
        f"z_A2[{i}]" for i in range(3)}
    assert all(-1 <= r <= 1 for r in by_latent.values())
    assert m["energy"]["solver"] == "rk4" and m["energy"]["relative_drift_max"] >= 0
    assert m["physics_only_variance_explained"] <= 1
    refined = evaluate(root / "run", split="test", num_samples=8, iwae_particles=4, refine_steps=20,
                       out_dir=root / "refined")
    assert refined["refine_steps"] == 20
    assert refined["iwae_log_likelihood"]["mean"] > m["iwae_log_likelihood"]["mean"]
    assert (root / "run" / "eval-test" / "reconstructions.png").stat().st_size > 5000


def test_variance_explained_and_latent_correlations_by_hand():
    x = torch.tensor([[[0.0, 2.0]], [[2.0, 4.0]]])  # per-channel mean 2, sum of squares 8
    assert variance_explained(x, x) == 1.0
    assert variance_explained(x, torch.full_like(x, 2.0)) == 0.0
    assert variance_explained(x, x + 1) == pytest.approx(1 - 4 / 8)
    import xarray as xr

    ds = xr.Dataset({"speed": ("sequence", [1.0, 2.0, 3.0])})
    draws = {"z": torch.tensor([[[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]])}
    out = latent_correlations(draws, ds, ("speed", "absent"), ("z",))
    assert out["speed"]["by_latent"] == pytest.approx({"z[0]": 1.0, "z[1]": -1.0})
    assert "absent" not in out and out["speed"]["strongest_r"] == pytest.approx(1.0)


def test_cli_generate_train_evaluate_and_import(tmp_path, capsys):
    d = tmp_path / "data"
    assert main(["generate", "--system", "locomotion", "--out", str(d), "--n-train", "8",
                 "--n-valid", "4", "--n-test", "4", "--n-steps", "11"]) == 0
    assert main(["train", "--system", "locomotion", "--setting", "nn-only", "--data", str(d),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet", "--threads", "1"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--samples", "2", "--out", str(tmp_path / "ev"),
                 "--checkpoint", "last.pt"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["system"] == "locomotion" and "energy" not in metrics
    src = tmp_path / "raw"
    src.mkdir()
    np.save(src / "train.npy", np.zeros((2, 3, 11), dtype=np.float32))
    np.savetxt(src / "props_train.txt", PROPS)
    assert main(["import-reference", str(src), "--system", "locomotion", "--out", str(tmp_path / "nc"),
                 "--splits", "train"]) == 0
    assert load_split(tmp_path / "nc", "train")["speed"].values.tolist() == [1.2, 0.8]


def test_locomotion_example_runs_on_a_synthetic_stand_in(tmp_path):
    import runpy

    path = Path(__file__).parents[1] / "examples" / "locomotion_energy.py"
    module = runpy.run_path(str(path))
    m = module["main"](["--data", str(tmp_path / "none"), "--epochs", "1", "--synthetic-size", "16",
                        "--out", str(tmp_path / "ex")])
    assert m["split"] == "valid" and np.isfinite(m["recon_mse"])
    assert {"speed", "cadence"} <= set(m["latent_correlations"]) and m["energy"]["relative_drift_max"] >= 0
    assert (tmp_path / "ex" / "eval-valid" / "reconstructions.png").is_file()
