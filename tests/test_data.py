"""Data generation, netCDF storage and the reference text format, with their error cases."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import xarray as xr

from pyro_physvae.data.io import SPLITS, load_dataset, load_split, save_dataset, to_tensor
from pyro_physvae.data.pendulum import (
    PARAMS,
    PendulumDataConfig,
    forced_damped_pendulum,
    generate,
    load_reference_text,
    make_dataset,
)
from pyro_physvae.systems import SYSTEMS, get_system

SMALL = PendulumDataConfig(n_train=6, n_valid=4, n_test=3, n_steps=15)


@pytest.fixture(scope="module")
def small_generated():
    return generate(SMALL, seed=3)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------
def test_generate_shapes_and_attributes(small_generated):
    assert set(small_generated) == set(SPLITS)
    sizes = {"train": 6, "valid": 4, "test": 3}
    for split, ds in small_generated.items():
        assert ds["x"].dims == ("sequence", "time")
        assert ds["x"].shape == (sizes[split], 15)
        assert ds.attrs["system"] == "pendulum" and ds.attrs["split"] == split
        assert ds.attrs["dt"] == pytest.approx(0.05) and ds.attrs["seed"] == 3
        np.testing.assert_allclose(ds["time"].values, np.arange(15) * 0.05)
        for name in PARAMS:
            assert ds[name].dims == ("sequence",)


def test_generate_is_reproducible(small_generated):
    again = generate(SMALL, seed=3)
    other = generate(SMALL, seed=4)
    for split in SPLITS:
        for name in ("x", *PARAMS):
            np.testing.assert_array_equal(again[split][name].values, small_generated[split][name].values)
        assert not np.allclose(other[split]["x"].values, small_generated[split]["x"].values)
    # Splits are different draws, not copies.
    assert not np.allclose(small_generated["train"]["omega"].values[:3],
                           small_generated["test"]["omega"].values[:3])


def test_parameters_lie_in_their_ranges():
    config = PendulumDataConfig(n_train=200, n_valid=1, n_test=1, n_steps=2)
    ds = generate(config, seed=0)["train"]
    for name in PARAMS:
        lo, hi = getattr(config, name)
        values = ds[name].values
        assert values.min() >= lo and values.max() <= hi, name
        # Uniform over the range: both halves are used.
        assert values.min() < lo + 0.25 * (hi - lo) and values.max() > hi - 0.25 * (hi - lo), name
    np.testing.assert_allclose(ds["x"].values[:, 0], ds["init"].values, atol=0.05)


def test_noise_level_and_clean_trajectory():
    config = PendulumDataConfig(n_train=16, n_valid=1, n_test=1, n_steps=20, noise_std=0.0)
    clean = generate(config, seed=5)["train"]
    noisy = generate(PendulumDataConfig(n_train=16, n_valid=1, n_test=1, n_steps=20, noise_std=0.01),
                     seed=5)["train"]
    params = [torch.tensor(clean[k].values) for k in PARAMS]
    t = torch.tensor(clean["time"].values)
    np.testing.assert_allclose(clean["x"].values, forced_damped_pendulum(*params, t).numpy(), atol=1e-6)
    # Same parameters from the same seed; only the noise differs.
    np.testing.assert_array_equal(noisy["omega"].values, clean["omega"].values)
    resid = noisy["x"].values - clean["x"].values
    assert 0.008 < resid.std() < 0.012 and abs(resid.mean()) < 0.002


def test_forced_damped_pendulum_small_angle_limit():
    t = torch.linspace(0.0, 5.0, 101, dtype=torch.float64)
    theta0 = torch.tensor([0.01, -0.005], dtype=torch.float64)
    omega = torch.tensor([2.0, 3.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    x = forced_damped_pendulum(theta0, omega, zero, zero, zero + 1.0, t)
    assert x.shape == (2, 101) and x.dtype == torch.float64
    expected = theta0[:, None] * torch.cos(omega[:, None] * t)
    # The nonlinearity shifts the frequency by a relative theta0^2 / 16 only: ~5e-7 rad here.
    torch.testing.assert_close(x, expected, atol=2e-6, rtol=0)


def test_forced_damped_pendulum_damping():
    # Linear damped oscillator: theta0 e^{-xi t/2} (cos(wd t) + xi / (2 wd) sin(wd t)).
    t = torch.linspace(0.0, 5.0, 51, dtype=torch.float64)
    th0, w, xi = 1e-3, 2.0, 0.6
    wd = math.sqrt(w**2 - xi**2 / 4)
    one = torch.ones(1, dtype=torch.float64)
    x = forced_damped_pendulum(th0 * one, w * one, xi * one, 0 * one, one, t)[0]
    expected = th0 * torch.exp(-xi * t / 2) * (torch.cos(wd * t) + xi / (2 * wd) * torch.sin(wd * t))
    torch.testing.assert_close(x, expected, atol=1e-8, rtol=0)


def test_forced_damped_pendulum_forcing():
    # From rest, small forcing A w^2 cos(2 pi f t): A w^2 / (w^2 - W^2) (cos(W t) - cos(w t)).
    t = torch.linspace(0.0, 5.0, 51, dtype=torch.float64)
    amp, w, f = 1e-4, 2.0, 0.5
    big_w = 2 * math.pi * f
    one = torch.ones(1, dtype=torch.float64)
    x = forced_damped_pendulum(0 * one, w * one, 0 * one, amp * one, f * one, t)[0]
    expected = amp * w**2 / (w**2 - big_w**2) * (torch.cos(big_w * t) - torch.cos(w * t))
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=0)
    assert x.abs().max() > 1e-5  # the forcing does move the pendulum


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_steps": 0}, {"dt": 0.0}, {"noise_std": -0.1}, {"omega": (3.0, 1.0)},
     {"n_valid": 1.5}],
)
def test_data_config_validation(kwargs):
    with pytest.raises(ValueError):
        PendulumDataConfig(**kwargs)


def test_make_dataset_checks():
    with pytest.raises(ValueError, match="true parameter 'omega' must have shape"):
        make_dataset(np.zeros((3, 4)), 0.1, {"omega": np.zeros(2)})
    with pytest.raises(ValueError, match="NaN"):
        make_dataset(np.array([[0.0, np.nan]]), 0.1)
    with pytest.raises(ValueError, match="2 dimensions"):
        make_dataset(np.zeros(4), 0.1)
    ds = make_dataset(np.ones((2, 3)), 0.5, {"omega": np.array([1.0, 2.0])}, split="valid")
    assert ds["x"].dtype == np.float32 and ds.attrs["split"] == "valid"
    np.testing.assert_allclose(ds["time"].values, [0.0, 0.5, 1.0])


def test_system_registry():
    assert SYSTEMS == ("pendulum", "advdif", "locomotion", "galaxy")
    advdif = get_system("advdif")
    model, _ = advdif.build("phys+nn", {"n_grid": 6, "n_steps": 4})
    assert [p.name for p in model.physics_parameters] == ["diffusion"] and model.x_event_dim == 2
    assert advdif.true_observations is not None
    system = get_system("pendulum")
    model, guide = system.build("phys-only", {"n_steps": 7, "dt": 0.2})
    assert [p.name for p in model.physics_parameters] == ["omega"]
    assert guide.setting == model.setting
    with pytest.raises(ValueError, match="unknown system 'spring'.*pendulum"):
        get_system("spring")
    ds = make_dataset(np.ones((2, 7)), 0.2)
    assert system.model_kwargs_from_data(ds) == {"n_steps": 7, "dt": 0.2}
    x = system.observations(ds)
    assert x.shape == (2, 7) and x.dtype == torch.get_default_dtype()


# --------------------------------------------------------------------------------------
# netCDF storage
# --------------------------------------------------------------------------------------
def test_netcdf_round_trip(tmp_path, small_generated):
    ds = small_generated["train"]
    path = save_dataset(ds, tmp_path / "sub" / "train.nc")
    assert path == tmp_path / "sub" / "train.nc" and path.is_file()
    back = load_dataset(path, system="pendulum")
    np.testing.assert_array_equal(back["x"].values, ds["x"].values)
    for name in PARAMS:
        assert name in back.data_vars
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    np.testing.assert_allclose(back["time"].values, ds["time"].values)
    assert back.attrs["system"] == "pendulum" and back.attrs["dt"] == pytest.approx(0.05)
    assert back["x"].attrs["units"] == "rad"
    torch.testing.assert_close(to_tensor(back["x"]), torch.as_tensor(ds["x"].values))
    assert [p.name for p in path.parent.iterdir()] == ["train.nc"]


def test_load_split(tiny_data_dir, tiny_datasets):
    for split in SPLITS:
        ds = load_split(tiny_data_dir, split, system="pendulum")
        np.testing.assert_array_equal(ds["x"].values, tiny_datasets[split]["x"].values)
    with pytest.raises(ValueError, match="unknown split 'training'"):
        load_split(tiny_data_dir, "training")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nc"):
        load_dataset(tmp_path / "nope.nc")


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.nc"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match="cannot read .*corrupt.nc"):
        load_dataset(path)


def test_load_wrong_system(tmp_path, small_generated):
    path = save_dataset(small_generated["test"], tmp_path / "test.nc")
    with pytest.raises(ValueError, match="holds 'pendulum' data, expected 'lorenz'"):
        load_dataset(path, system="lorenz")


def test_load_nan_values_and_missing_x(tmp_path):
    x = np.zeros((3, 4), dtype=np.float32)
    x[1, 2] = np.nan
    bad = xr.Dataset({"x": (("sequence", "time"), x)})
    path = save_dataset(bad, tmp_path / "nan.nc")
    with pytest.raises(ValueError, match=r"NaN.*\[1\]"):
        load_dataset(path)
    no_x = xr.Dataset({"y": (("sequence", "time"), np.zeros((2, 2)))})
    with pytest.raises(ValueError, match="no observation variable 'x'"):
        load_dataset(save_dataset(no_x, tmp_path / "nox.nc"))
    transposed = xr.Dataset({"x": (("time", "sequence"), np.zeros((2, 2)))})
    with pytest.raises(ValueError, match="first dimension"):
        load_dataset(save_dataset(transposed, tmp_path / "t.nc"))


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, small_generated):
    path = save_dataset(small_generated["valid"], tmp_path / "valid.nc")
    before = path.read_bytes()

    def broken_to_netcdf(self, target, *args, **kwargs):
        with open(target, "wb") as f:  # a partial write, then a failure
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken_to_netcdf)
    with pytest.raises(OSError, match="disk full"):
        save_dataset(small_generated["train"], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["valid.nc"]
    monkeypatch.undo()
    np.testing.assert_array_equal(load_dataset(path)["x"].values, small_generated["valid"]["x"].values)


# --------------------------------------------------------------------------------------
# The reference implementation's text format
# --------------------------------------------------------------------------------------
HEADER = "init omega gamma A f"


def write_reference(directory, split="train", n=3, t=5, params=True):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, t))
    np.savetxt(directory / f"data_{split}.txt", x)
    table = rng.uniform(size=(n, 5))
    if params:
        np.savetxt(directory / f"true_params_{split}.txt", table, header=HEADER, comments="")
    return x, table


def test_reference_text_round_trip(tmp_path):
    x, table = write_reference(tmp_path, "valid")
    ds = load_reference_text(tmp_path, "valid", dt=0.1)
    np.testing.assert_allclose(ds["x"].values, x.astype(np.float32))
    for i, name in enumerate(PARAMS):
        np.testing.assert_allclose(ds[name].values, table[:, i])
    assert ds.attrs["split"] == "valid" and ds.attrs["dt"] == pytest.approx(0.1)
    np.testing.assert_allclose(ds["time"].values, np.arange(5) * 0.1)
    # It can be stored like any generated data set.
    back = load_dataset(save_dataset(ds, tmp_path / "valid.nc"), system="pendulum")
    np.testing.assert_array_equal(back["damping"].values, ds["damping"].values)


def test_reference_text_without_params_and_single_row(tmp_path):
    x, _ = write_reference(tmp_path, "test", n=1, t=6, params=False)
    ds = load_reference_text(tmp_path, "test")
    assert ds["x"].shape == (1, 6)
    assert not any(name in ds for name in PARAMS)


def test_reference_text_single_row_with_params(tmp_path):
    _, table = write_reference(tmp_path, "train", n=1, t=4)
    ds = load_reference_text(tmp_path, "train")
    np.testing.assert_allclose(ds["forcing_frequency"].values, table[:, 4])


def test_reference_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_train.txt"):
        load_reference_text(tmp_path, "train")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("0.1 0.2 nan\n0.3 0.4 0.5\n", "data_train.txt.*NaN"),
        ("0.1 0.2 0.3\n0.3 0.4\n", "data_train.txt: not a whitespace-separated table"),
        ("a b c\n", "data_train.txt"),
    ],
    ids=["nan", "ragged-rows", "not-numbers"],
)
def test_reference_text_bad_data_file(tmp_path, content, match):
    (tmp_path / "data_train.txt").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_reference_text(tmp_path, "train")


@pytest.mark.parametrize(
    ("n", "params_shape", "header", "match"),
    [
        (3, (3, 5), "init omega xi A f",
         "header must be 'init omega gamma A f', got 'init omega xi A f'"),
        (3, (2, 5), HEADER, "expected 3 rows of 5 values"),
        (3, (3, 4), HEADER, "true_params_train.txt"),
        # 5 rows of 4 values reshape to 4 rows of 5: the row-count check must still catch it.
        (5, (5, 4), HEADER, "true_params_train.txt: expected 5 rows"),
    ],
    ids=["wrong-header", "row-count-mismatch", "wrong-column-count", "reshapeable-size"],
)
def test_reference_text_bad_params_file(tmp_path, n, params_shape, header, match):
    write_reference(tmp_path, n=n, params=False)
    np.savetxt(tmp_path / "true_params_train.txt", np.zeros(params_shape), header=header, comments="")
    with pytest.raises(ValueError, match=match):
        load_reference_text(tmp_path, "train")


@pytest.mark.filterwarnings("ignore:loadtxt")
def test_reference_text_empty_file(tmp_path):
    (tmp_path / "data_train.txt").write_text("")
    with pytest.raises(ValueError, match="data_train.txt"):
        load_reference_text(tmp_path, "train")
