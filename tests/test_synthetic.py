"""The public synthetic-data helper: ODE data sets against closed forms, their layout,
reproducibility, error messages, re-simulation and the netCDF round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_physvae.data import load_dataset, ode_dataset, save_dataset, simulate_dataset
from pyro_physvae.data.io import SPLITS

SIZES = {"n_train": 5, "n_valid": 3, "n_test": 4}


def oscillator(t: torch.Tensor, y: torch.Tensor, p: dict) -> torch.Tensor:
    """Harmonic oscillator: ``theta'' = -omega^2 theta``; ``y (..., 2)`` = (angle, velocity)."""
    return torch.stack((y[..., 1], -p["omega"].pow(2) * y[..., 0]), -1)


def decay(t: torch.Tensor, y: torch.Tensor, p: dict) -> torch.Tensor:
    """Two independent exponential decays with rates ``k1``, ``k2``."""
    return torch.stack((-p["k1"] * y[..., 0], -p["k2"] * y[..., 1]), -1)


def oscillator_data(**kw):
    args = dict(n_steps=40, dt=0.05, seed=1, system="toy", observe=["angle"], **SIZES)
    args.update(kw)
    return ode_dataset(oscillator, {"omega": (1.0, 3.0)}, {"angle": (-1.0, 1.0), "velocity": (0.0, 0.0)},
                       **args)


def closed_form(ds, omega_factor: float = 1.0, n_steps: int | None = None) -> np.ndarray:
    """``theta0 cos(omega t)`` from rest, ``(N, T)``."""
    t = np.arange(n_steps or ds.sizes["time"]) * ds.attrs["dt"]
    theta0 = ds["initial_state"].sel(state="angle").values
    return theta0[:, None] * np.cos(omega_factor * ds["omega"].values[:, None] * t)


def test_oscillator_matches_closed_form():
    data = oscillator_data()
    for ds in data.values():
        np.testing.assert_allclose(ds["x"].values, closed_form(ds), atol=1e-6)


def test_decay_matches_closed_form_with_two_observed_components():
    data = ode_dataset(decay, {"k1": (0.5, 2.0), "k2": (0.1, 0.3)}, {"u": (1.0, 2.0), "v": (1.0, 2.0)},
                       n_steps=30, dt=0.1, dims=("channel", "time"), coords={"channel": ["U", "V"]},
                       observe=["v", "u"], **SIZES)
    ds = data["valid"]
    t = ds["time"].values
    y0 = ds["initial_state"].values
    expected_v = y0[:, 1, None] * np.exp(-ds["k2"].values[:, None] * t)
    expected_u = y0[:, 0, None] * np.exp(-ds["k1"].values[:, None] * t)
    np.testing.assert_allclose(ds["x"].values[:, 0], expected_v, rtol=1e-6)
    np.testing.assert_allclose(ds["x"].values[:, 1], expected_u, rtol=1e-6)
    assert list(ds["channel"].values) == ["U", "V"]


def test_layout_dims_attrs():
    data = oscillator_data(noise_std=0.01, units={"x": "rad", "omega": "rad/s"})
    assert set(data) == set(SPLITS)
    for split, ds in data.items():
        n = SIZES[f"n_{split}"]
        assert ds["x"].dims == ("sequence", "time") and ds["x"].shape == (n, 40)
        assert ds["x"].dtype == np.float32
        assert ds["initial_state"].dims == ("sequence", "state") and ds["initial_state"].shape == (n, 2)
        assert ds["omega"].dims == ("sequence",) and ((ds["omega"] >= 1) & (ds["omega"] <= 3)).all()
        np.testing.assert_allclose(ds["time"].values, np.arange(40) * 0.05)
        assert ds["time"].attrs["units"] == "s" and ds["omega"].attrs["units"] == "rad/s"
        assert ds.attrs["system"] == "toy" and ds.attrs["split"] == split and ds.attrs["seed"] == 1
        assert ds.attrs["dt"] == 0.05 and ds.attrs["noise_std"] == 0.01
    residual = data["train"]["x"].values - closed_form(data["train"])
    assert 0.005 < residual.std() < 0.015  # the noise level asked for


def test_default_dims_for_several_components():
    ds = ode_dataset(decay, {"k1": (1.0, 1.0), "k2": (1.0, 1.0)}, {"u": (1.0, 1.0), "v": (2.0, 2.0)},
                     n_steps=3, dt=0.1, **SIZES)["test"]
    assert ds["x"].dims == ("sequence", "component", "time")
    assert list(ds["component"].values) == ["u", "v"]
    assert (ds["k1"].values == 1.0).all()  # low == high: a constant


def test_reproducible_from_the_seed():
    a, b, c = oscillator_data(noise_std=0.1), oscillator_data(noise_std=0.1), oscillator_data(noise_std=0.1,
                                                                                              seed=2)
    for split in SPLITS:
        np.testing.assert_array_equal(a[split]["x"].values, b[split]["x"].values)
        assert not np.allclose(a[split]["x"].values, c[split]["x"].values)
    assert not np.allclose(a["train"]["omega"].values[:3], a["valid"]["omega"].values[:3])


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"omega": (3.0, 1.0)}}, "range of 'omega'"),
    ({"parameters": {"omega": (1.0, float("inf"))}}, "range of 'omega'"),
    ({"initial_state": {}}, "initial_state must name"),
    ({"n_train": 0}, "n_train must be a positive integer"),
    ({"n_steps": 0}, "n_steps must be a positive integer"),
    ({"dt": 0.0}, "dt must be positive"),
    ({"noise_std": -1.0}, "noise_std must be >= 0"),
    ({"observe": ["speed"]}, "observe must name"),
    ({"observe": ["angle", "velocity"], "dims": ("time",)}, "dims must be"),
    ({"dims": ("time", "x")}, "dims must be"),
    ({"method": "leapfrog"}, "unknown ODE solver"),
    ({"substeps": 0}, "substeps must be a positive integer"),
    ({"observe": ["angle", "velocity"], "dims": ("c", "time"), "coords": {"c": ["a"]}}, "has 1 entries"),
])
def test_invalid_arguments_are_named(change, message):
    args = {"parameters": {"omega": (1.0, 3.0)},
            "initial_state": {"angle": (-1.0, 1.0), "velocity": (0.0, 0.0)}, "n_steps": 5, "dt": 0.1,
            "observe": ["angle"], **SIZES}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ode_dataset(oscillator, **args)


def test_blow_up_names_the_split_and_sequence():
    def explosive(t, y, p):
        return p["r"][..., None] * y.pow(2)

    with pytest.raises(ValueError, match=r"rhs returned shape \(5, 5\) for states of shape \(5, 1\)"):
        ode_dataset(lambda t, y, p: p["r"] * y, {"r": (1.0, 2.0)}, {"y": (5.0, 6.0)}, n_steps=3, dt=0.5,
                    **SIZES)
    with pytest.raises(ValueError, match=r"train solution is not finite .* first sequence \d+ \(r="):
        ode_dataset(explosive, {"r": (1.0, 2.0)}, {"y": (5.0, 6.0)}, n_steps=20, dt=0.5, **SIZES)


def test_simulate_dataset_changes_parameters_and_extends(tmp_path):
    ds = oscillator_data(noise_std=0.05)["test"]
    clean = simulate_dataset(ds, oscillator)
    assert clean.shape == ds["x"].shape and clean.dtype == torch.float64
    np.testing.assert_allclose(clean.numpy(), closed_form(ds), atol=1e-6)
    longer = simulate_dataset(ds, oscillator, n_steps=200, factors={"omega": 2.0})
    np.testing.assert_allclose(longer.numpy(), closed_form(ds, 2.0, 200), atol=1e-5)
    fixed = simulate_dataset(ds, oscillator, values={"omega": 1.5})
    t = ds["time"].values
    np.testing.assert_allclose(fixed.numpy(), ds["initial_state"].values[:, :1] * np.cos(1.5 * t), atol=1e-6)
    with pytest.raises(ValueError, match=r"\['damping'\] are not parameters"):
        simulate_dataset(ds, oscillator, factors={"damping": 2.0})
    with pytest.raises(ValueError, match="not made by ode_dataset"):
        simulate_dataset(ds.drop_vars("initial_state"), oscillator)


def test_netcdf_round_trip(tmp_path):
    data = ode_dataset(decay, {"k1": (0.5, 2.0), "k2": (0.1, 0.3)}, {"u": (1.0, 2.0), "v": (1.0, 2.0)},
                       n_steps=10, dt=0.1, noise_std=0.01, dims=("species", "time"), system="toy", **SIZES)
    path = save_dataset(data["train"], tmp_path / "train.nc")
    back = load_dataset(path, system="toy")
    for name in ("x", "initial_state", "k1", "k2"):
        np.testing.assert_array_equal(back[name].values, data["train"][name].values)
    assert back["x"].dims == ("sequence", "species", "time")
    assert {k: back.attrs[k] for k in data["train"].attrs} == data["train"].attrs
    np.testing.assert_allclose(simulate_dataset(back, decay).numpy(),
                               simulate_dataset(data["train"], decay).numpy())
