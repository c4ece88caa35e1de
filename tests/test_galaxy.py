"""Galaxy images: geometry, synthetic data, the Galaxy10 loader, model/guide semantics,
R_DA,2 without an initial state, training with augmentation, image evaluation, the example."""

from __future__ import annotations

import dataclasses
import math
import runpy
from pathlib import Path

import h5py
import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_physvae.cli import main as cli_main
from pyro_physvae.data import galaxy as data
from pyro_physvae.data.io import load_split, save_dataset
from pyro_physvae.evaluate import evaluate
from pyro_physvae.guides.galaxy import GalaxyGuide, band_statistics
from pyro_physvae.images import angle_metrics, circular_mean, image_moments, rotation_check
from pyro_physvae.models.galaxy import ANGLE, GalaxyModel, ImageParameter, soft_unit_clip
from pyro_physvae.regularizers import PhysicsAugmentation, wrapped_error
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import get_system
from pyro_physvae.train import train

S = 16
SMALL_MODEL = {"image_size": S, "unet_width": 4, "unet_depth": 2, "neural_channels": (8, 4),
               "neural_hidden": (8,), "nn_channels": (8, 4), "nn_hidden": (8,)}
SMALL_GUIDE = {"channels": (4, 8), "feat_dim": 16, "hidden_aux": (8,), "hidden_phys": (8,),
               "hidden_unmixer": (4,)}
TINY_DATA = {"n_train": 24, "n_valid": 8, "n_test": 8, "image_size": S}


def make_pair(setting: str, **model_kwargs) -> tuple[GalaxyModel, GalaxyGuide]:
    model = GalaxyModel(setting, **{**SMALL_MODEL, **model_kwargs})
    return model, GalaxyGuide(model, **SMALL_GUIDE)


@pytest.fixture(scope="module")
def tiny_splits():
    return data.generate(data.GalaxyDataConfig(**TINY_DATA), seed=1)


@pytest.fixture
def images(tiny_splits) -> torch.Tensor:
    return torch.as_tensor(tiny_splits["train"]["x"].values[:6])


def params(**kw: float) -> dict[str, torch.Tensor]:
    base = {"I0": 0.8, "A": 0.4, "e": 0.6, "theta": 0.3}
    return {k: torch.tensor([float(v)]) for k, v in {**base, **kw}.items()}


# -- geometry and physics ----------------------------------------------------------------------
def test_pixel_grid_orientation():
    x, y = data.pixel_grid(5)
    assert x[0, 0] == -1 and x[0, -1] == 1 and y[0, 0] == 1 and y[-1, 0] == -1  # y up, row 0 on top
    with pytest.raises(ValueError, match="at least 2 pixels"):
        data.pixel_grid(1)


def test_exponential_disk_closed_form_values():
    """``I0`` at the centre, ``I0 / e`` at distance A along the major axis and A (1 - e) across."""
    x = torch.tensor([[0.0, 0.4 * math.cos(0.5), -0.24 * math.sin(0.5), 0.4]])
    y = torch.tensor([[0.0, 0.4 * math.sin(0.5), 0.24 * math.cos(0.5), 0.0]])
    img = data.exponential_disk(torch.tensor(0.8), torch.tensor(0.4), torch.tensor(0.4),
                                torch.tensor(0.5), x, y)
    expected = torch.tensor([[0.8, 0.8 / math.e, 0.8 / math.e]])
    torch.testing.assert_close(img[:, :3], expected, atol=1e-5, rtol=0)
    assert img[0, 3] < 0.8 / math.e  # off the major axis at the same distance: dimmer


def test_rotate_images_turns_counter_clockwise():
    x, y = data.pixel_grid(33)
    one = torch.tensor(1.0)
    img0 = data.exponential_disk(one, torch.tensor(0.4), torch.tensor(0.6), torch.tensor(0.0), x, y)
    for a in (0.4, 2.0):
        rot = data.rotate_images(img0[None, None], a)[0, 0]
        right = data.exponential_disk(one, torch.tensor(0.4), torch.tensor(0.6), torch.tensor(a), x, y)
        wrong = data.exponential_disk(one, torch.tensor(0.4), torch.tensor(0.6), torch.tensor(-a), x, y)
        assert (rot - right).pow(2).mean() < 0.05 * (rot - wrong).pow(2).mean()


# -- synthetic data ----------------------------------------------------------------------------
def test_generator_layout_ranges_and_reproducibility(tiny_splits):
    ds = tiny_splits["train"]
    assert ds["x"].dims == ("sequence", "band", "row", "col") and ds["x"].shape == (24, 3, S, S)
    assert ds.attrs["system"] == "galaxy" and list(ds["band"].values) == list(data.BANDS)
    x = ds["x"].values
    assert x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x * 255, np.round(x * 255), atol=1e-4)  # 8-bit levels
    config = data.GalaxyDataConfig(**TINY_DATA)
    for name in data.PARAMS:
        lo, hi = getattr(config, name)
        assert lo <= ds[name].min() and ds[name].max() <= hi
    for name in data.NUISANCE:
        assert name in ds
    again = data.generate(config, seed=1)["train"]
    np.testing.assert_array_equal(again["x"].values, x)
    assert not np.array_equal(data.generate(config, seed=2)["train"]["x"].values, x)


def test_truth_reduces_to_the_models_physics_without_its_extras():
    """With index 1, no bulge, dust, colour gradient, offset or pixel integration, the red band
    of the truth is exactly the model's ``I0 exp(-r)``; the defaults are richer than that."""
    g = torch.Generator().manual_seed(0)
    p = data._draw_parameters(4, data.GalaxyDataConfig(), g)
    zero = torch.zeros(4, dtype=torch.float64)
    plain = dict(p, sersic_index=zero + 1, bulge_fraction=zero, dust_depth=zero, colour_gradient=zero,
                 dx=zero, dy=zero)
    x, y = data.pixel_grid(21, dtype=torch.float64)
    physics = data.exponential_disk(p["I0"], p["A"], p["e"], p["theta"], x, y)
    # (the physics adds 1e-12 under the square root for a finite gradient at the centre)
    torch.testing.assert_close(data.render_truth(plain, 21, supersample=1)[:, 0], physics, rtol=1e-5, atol=0)
    rich = data.render_truth(p, 21, supersample=1)[:, 0]
    assert (rich - physics).abs().amax((-2, -1)).min() > 1e-3


def test_synthetic_galaxies_point_along_their_true_angle():
    ds = data.generate(data.GalaxyDataConfig(n_train=40, n_valid=1, n_test=1, image_size=33,
                                             sky_noise=(0.0, 0.0), shot_noise=0.0, quantize=False))["train"]
    angle = image_moments(torch.as_tensor(ds["x"].values, dtype=torch.float64))["angle"]
    err = wrapped_error(angle - torch.as_tensor(ds["theta"].values), math.pi).abs()
    assert float(err.median()) < math.radians(3)


def test_config_checks():
    with pytest.raises(ValueError, match="range of e"):
        data.GalaxyDataConfig(e=(0.5, 0.2))
    with pytest.raises(ValueError, match="range of I0 must lie in"):
        data.GalaxyDataConfig(I0=(0.5, 1.5))
    with pytest.raises(ValueError, match="n_steps does not apply"):
        get_system("galaxy").generate(n_steps=10)


def test_check_images_names_the_problem():
    good = torch.rand(2, 3, 8, 8)
    data.check_images(good)
    with pytest.raises(ValueError, match="4 dimensions"):
        data.check_images(good[0])
    with pytest.raises(ValueError, match="3 bands"):
        data.check_images(good[:, :2])
    with pytest.raises(ValueError, match="square"):
        data.check_images(good[..., :7])
    bad = good.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN .*first bad images: \[1\]"):
        data.check_images(bad)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        data.check_images(good * 255)


def test_augmentation_flips_and_rotates_reproducibly(images):
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a, b = data.augment_images(images, g()), data.augment_images(images, g())
    torch.testing.assert_close(a, b)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, images)
    # A rotation or a flip keeps the light inside the inscribed disk (corners are reflected in).
    flux = lambda v: image_moments(v.double(), mask_radius=0.9)["flux"]  # noqa: E731
    torch.testing.assert_close(flux(a), flux(images), rtol=0.05, atol=0)
    angle_in = image_moments(images.double())["angle"]
    angle_out = image_moments(a.double())["angle"]
    assert float(wrapped_error(angle_out - angle_in, math.pi).abs().max()) > 0.2


# -- Galaxy10 ----------------------------------------------------------------------------------
def write_galaxy10(path: Path, n: int = 30, size: int = 12, labels: np.ndarray | None = None,
                   images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8) if images is None else images
    labels = np.tile(np.arange(10), n // 10 + 1)[:n].astype(np.uint8) if labels is None else labels
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["ans"] = labels
    return images, labels


def test_galaxy10_loader_selects_scales_and_splits(tmp_path):
    labels = np.array([6] * 20 + [1] * 10, dtype=np.uint8)
    images, _ = write_galaxy10(tmp_path / "g.h5", labels=labels)
    splits = data.load_galaxy10(tmp_path / "g.h5", n_train=10, n_valid=4, seed=3)
    assert {k: v.sizes["sequence"] for k, v in splits.items()} == {"train": 10, "valid": 4, "test": 6}
    idx = np.concatenate([splits[s]["source_index"].values for s in ("train", "valid", "test")])
    assert sorted(idx.tolist()) == list(range(20))  # class 6 only, each image once
    tr = splits["train"]
    i = int(tr["source_index"][0])
    np.testing.assert_allclose(tr["x"].values[0], images[i].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    again = data.load_galaxy10(tmp_path / "g.h5", n_train=10, n_valid=4, seed=3)
    np.testing.assert_array_equal(again["valid"]["source_index"], splits["valid"]["source_index"])
    other = data.load_galaxy10(tmp_path / "g.h5", n_train=10, n_valid=4, seed=4)
    assert not np.array_equal(other["train"]["source_index"], tr["source_index"])
    small = data.load_galaxy10(tmp_path / "g.h5", n_train=10, n_valid=4, image_size=6)["test"]
    assert small["x"].shape == (6, 3, 6, 6)


def test_galaxy10_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Galaxy10 file not found"):
        data.load_galaxy10(tmp_path / "missing.h5")
    write_galaxy10(tmp_path / "g.h5")
    with pytest.raises(ValueError, match="no images of class 11"):
        data.load_galaxy10(tmp_path / "g.h5", class_label=11)
    with pytest.raises(ValueError, match="class 6 has 3 images, too few"):
        data.load_galaxy10(tmp_path / "g.h5", n_train=2, n_valid=2)
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f["images"] = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"lacks the keys \['ans'\]"):
        data.load_galaxy10(tmp_path / "nokey.h5")
    write_galaxy10(tmp_path / "shape.h5", n=10, images=np.zeros((10, 4, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, S, S, 3\)"):
        data.load_galaxy10(tmp_path / "shape.h5")
    write_galaxy10(tmp_path / "range.h5", images=np.full((30, 4, 4, 3), 300.0))
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]"):
        data.load_galaxy10(tmp_path / "range.h5", n_train=1, n_valid=1)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="cannot read .* as HDF5"):
        data.load_galaxy10(tmp_path / "text.h5")


def test_cli_import_galaxy10(tmp_path, capsys):
    write_galaxy10(tmp_path / "g.h5", labels=np.array([6] * 12 + [0] * 18, dtype=np.uint8))
    out = tmp_path / "nc"
    assert cli_main(["import-galaxy10", str(tmp_path / "g.h5"), "--out", str(out), "--n-train", "6",
                     "--n-valid", "3"]) == 0
    ds = load_split(out, "test", system="galaxy")
    assert ds["x"].shape == (3, 3, 12, 12) and ds.attrs["class_label"] == 6
    assert cli_main(["import-galaxy10", str(tmp_path / "none.h5"), "--out", str(out)]) == 2
    assert "Galaxy10 file not found" in capsys.readouterr().err


# -- model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS)
def test_model_sites_shapes_and_range(setting, images):
    model, guide = make_pair(setting)
    guide_tr = poutine.trace(guide).get_trace(images)
    tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(images)
    assert "init" not in tr.nodes
    assert tr.nodes["x"]["fn"].event_shape == (3, S, S)
    x_mean = tr.nodes["x_mean"]["value"].detach()
    assert x_mean.shape == images.shape and 0 <= float(x_mean.min()) and float(x_mean.max()) <= 1
    physics = {p.name for p in model.physics_parameters}
    assert physics == (set() if setting == "nn-only" else {"I0", "A", "e", "theta"})
    for name in physics:
        assert tr.nodes[name]["value"].shape == (6,)
    if setting == "nn-only":
        assert model.aux_dims == {"z_A2": 6} and "x_P" not in tr.nodes
    elif setting == "phys-only":
        assert model.aux_dims == {} and torch.equal(tr.nodes["x_P"]["value"], x_mean)
    else:
        assert model.aux_dims == {"z_A2": 2} and "x_PB" in tr.nodes
        assert guide_tr.nodes["unmixed"]["value"].shape == (6, 1, S, S)
    generated = model(size=5)
    assert generated.shape == (5, 3, S, S)


def test_untrained_refiner_returns_the_physics_image():
    model = GalaxyModel("phys+nn", **SMALL_MODEL)
    out = model.decode(params(), torch.randn(1, 2))
    torch.testing.assert_close(out["x_PB"], soft_unit_clip(out["x_P"]))
    bright = out["x_P"] > 0.02
    torch.testing.assert_close(out["x_PB"][bright], out["x_P"][bright], atol=2e-3, rtol=0)


def test_soft_unit_clip():
    y = torch.tensor([-1.0, 0.0, 0.02, 0.5, 0.98, 1.0, 2.0], requires_grad=True)
    out = soft_unit_clip(y)
    assert (out >= 0).all() and (out <= 1).all() and (out[1:-1] > 0).all() and (out[1:-1] < 1).all()
    torch.testing.assert_close(out[2:5], y[2:5], atol=1e-3, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(y.grad[2:5], torch.ones(3), atol=0.02, rtol=0)
    assert y.grad[0] < 1e-6 and y.grad[1] == pytest.approx(0.5, abs=1e-3)


def test_clamping_and_the_periodic_angle():
    model = GalaxyModel("phys-only", **SMALL_MODEL)
    outside = params(I0=5.0, e=1.5)
    for v in outside.values():
        v.requires_grad_(True)
    high = model.physics_image(outside)
    torch.testing.assert_close(high, model.physics_image(params(I0=1.0, e=0.999)))
    high.sum().backward()  # straight through the clamp: a draw outside still has a gradient
    assert outside["I0"].grad > 0 and outside["e"].grad < 0
    turned = model.physics_image(params(theta=0.3 + math.pi))
    torch.testing.assert_close(turned, model.physics_image(params()), atol=1e-6, rtol=0)
    assert ANGLE.clamp(torch.tensor(7.0)) == 7.0  # angles are not clamped
    with pytest.raises(ValueError, match="period must be positive"):
        ImageParameter("a", 0.0, 1.0, period=-1.0)
    with pytest.raises(ValueError, match="feasible range"):
        ImageParameter("a", 0.0, 1.0, feasible=(1.0, 0.0))


def test_neural_image_turns_with_theta():
    model = GalaxyModel("phys+nn", **{**SMALL_MODEL, "image_size": 33})
    z = torch.randn(1, 2)
    a = model.neural_image(params(theta=0.2), z).detach()
    b = model.neural_image(params(theta=0.2 + 1.1), z).detach()
    x, y = data.pixel_grid(33)
    inner = (x**2 + y**2) < 0.6**2  # away from the corners that rotations cut off
    moved = (b - a)[..., inner].pow(2).mean()
    assert (b - data.rotate_images(a, 1.1))[..., inner].pow(2).mean() < 0.1 * moved


def test_prior_ranges_are_configurable():
    model = GalaxyModel("phys-only", ranges={"A": [0.1, 1.5]}, **SMALL_MODEL)
    assert {p.name: (p.low, p.high) for p in model.physics_parameters}["A"] == (0.1, 1.5)
    with pytest.raises(ValueError, match=r"ranges given for \['omega'\]"):
        GalaxyModel("phys-only", ranges={"omega": [0, 1]}, **SMALL_MODEL)


def test_model_rejects_bad_input(images):
    model, _ = make_pair("phys+nn")
    with pytest.raises(ValueError, match=f"must hold {S}x{S} images"):
        model(torch.rand(2, 3, S + 1, S + 1))
    with pytest.raises(ValueError, match="must lie in"):
        model(images * 2 + 0.1)
    with pytest.raises(ValueError, match="reads no initial state"):
        model(images, init=images[:, 0])
    with pytest.raises(ValueError, match="init=None"):
        model.simulate_augmentation(images, 2)


# -- guide -------------------------------------------------------------------------------------
def test_guide_physics_posterior_is_positive_and_angles_on_the_circle(images):
    _, guide = make_pair("phys+nn+reg")
    post = guide.physics_posterior(images[:, :1])
    for name in ("I0", "A", "e"):
        assert (post[name][0] > 0).all()
    theta = post["theta"][0]
    assert theta.shape == (6,) and (theta.abs() <= math.pi).all()
    _, phys_only = make_pair("phys-only")
    torch.testing.assert_close(phys_only.physics_posterior(images)["A"][0],
                               phys_only.physics_posterior(images.mean(1, keepdim=True))["A"][0])
    assert band_statistics(images).shape == (6, 12)


# -- R_DA,2 without an initial state -------------------------------------------------------------
def test_wrapped_error():
    err = wrapped_error(torch.tensor([math.pi - 0.05, 0.1, -3.0]) - torch.tensor([0.05, 0.0, 0.0]), math.pi)
    torch.testing.assert_close(err, torch.tensor([-0.1, 0.1, math.pi - 3.0]))
    assert wrapped_error(torch.tensor(5.0), None) == 5.0


def test_physics_augmentation_for_a_static_model(images):
    model, guide = make_pair("phys+nn+reg")
    sites = {"x_mean": torch.zeros(7, 6, 3, S, S)}  # a draw dim on the left of the batch of 6
    value = PhysicsAugmentation(1.0)(model, guide, sites)
    assert value.shape == (6,) and torch.isfinite(value).all()
    value.sum().backward()
    assert guide.phys_features.linear.weight.grad.abs().sum() > 0

    class Exact:
        """A guide that reads the truth back, off by pi in the angle."""

        def physics_mean(self, x):
            return {k: v + (math.pi if k == "theta" else 0.0) for k, v in self.truth.items()}

    exact = Exact()
    original = model.simulate_augmentation

    def remember(init, size):
        truth, sim = original(init, size)
        exact.truth = truth
        return truth, sim

    model.simulate_augmentation = remember
    value = PhysicsAugmentation(1.0)(model, exact, sites)
    torch.testing.assert_close(value, torch.zeros(6), atol=1e-10, rtol=0)


# -- training, evaluation, example -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory, tiny_splits) -> Path:
    path = tmp_path_factory.mktemp("galaxy_data")
    for split, ds in tiny_splits.items():
        save_dataset(ds, path / f"{split}.nc")
    return path


def test_training_augments_each_epoch_and_evaluation_writes_image_reports(tiny_data_dir, tmp_path):
    from pyro_physvae.train import TrainConfig

    seen: list[torch.Tensor] = []
    system = get_system("galaxy")

    def augment(x, generator):
        out = system.augment(x, generator)
        seen.append(out)
        return out

    history = train(dataclasses.replace(system, augment=augment), "phys+nn+reg", tiny_data_dir,
                    tmp_path / "run", TrainConfig(epochs=2, batch_size=12, threads=1),
                    model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, progress=False)
    assert len(history) == 2 and len(seen) == 2 and not torch.allclose(seen[0], seen[1])
    assert {"ppc", "augment", "unmix"} <= set(history[-1])
    m = evaluate(tmp_path / "run", split="test", num_samples=4, iwae_particles=2)
    assert m["n_sequences"] == 8 and np.isfinite(m["recon_mse"]) and np.isfinite(m["physics_only_mse"])
    assert m["theta"]["period"] == pytest.approx(math.pi) and 0 <= m["theta"]["median_abs_error_deg"] <= 90
    assert 0 <= m["e"]["coverage90"] <= 1 and np.isfinite(m["iwae_log_likelihood"]["mean"])
    check = m["theta_traversal"]
    assert check["n_galaxies"] == 8 and 0 <= check["rotation_residual_fraction_physics"] < 0.5
    out = tmp_path / "run" / "eval-test"
    for fig in ("reconstructions.png", "generations.png", "traversals.png", "theta.png", "e.png"):
        assert (out / fig).stat().st_size > 1000, fig
    refined = evaluate(tmp_path / "run", split="test", num_samples=4, iwae_particles=2,
                       refine_steps=3, out_dir=tmp_path / "refined")
    assert refined["refine_steps"] == 3 and np.isfinite(refined["recon_mse"])


def test_nn_only_evaluation_reports_images_without_physics(tiny_data_dir, tmp_path):
    from pyro_physvae.train import TrainConfig

    train("galaxy", "nn-only", tiny_data_dir, tmp_path / "run",
          TrainConfig(epochs=1, batch_size=24, threads=1), model_kwargs=SMALL_MODEL,
          guide_kwargs=SMALL_GUIDE, progress=False)
    m = evaluate(tmp_path / "run", split="test", num_samples=3, iwae_particles=2)
    assert np.isfinite(m["recon_mse"]) and 0 <= m["predictive_coverage90"] <= 1
    assert not {"theta", "physics_only_mse", "theta_traversal"} & set(m)
    out = tmp_path / "run" / "eval-test"
    assert (out / "generations.png").is_file() and not (out / "traversals.png").exists()


def test_phys_only_training_lowers_the_loss(tiny_data_dir, tmp_path):
    from pyro_physvae.train import TrainConfig

    history = train("galaxy", "phys-only", tiny_data_dir, tmp_path / "run",
                    TrainConfig(epochs=8, batch_size=24, threads=1, lr=3e-3), model_kwargs=SMALL_MODEL,
                    guide_kwargs=SMALL_GUIDE, progress=False)
    assert history[-1]["val_loss"] < 0.5 * history[0]["val_loss"]


def test_angle_metrics_respect_the_period():
    truth = np.array([0.02, math.pi - 0.02, 1.0])
    samples = torch.tensor([[math.pi - 0.01, 0.01, 1.1], [math.pi - 0.03, 0.03, 0.9]])
    torch.testing.assert_close(circular_mean(samples, math.pi)[2], torch.tensor(1.0))
    m = angle_metrics(samples, truth, math.pi)
    # errors 0.04, 0.04 (across the wrap) and 0
    assert m["mae"] == pytest.approx(0.08 / 3, abs=1e-5)
    assert m["median_abs_error_deg"] == pytest.approx(math.degrees(0.04), abs=1e-3)
    assert m["error_concentration"] > 0.99
    rng = np.random.default_rng(0)
    draws = torch.as_tensor(rng.uniform(0, math.pi, (2, 400)))
    unrelated = angle_metrics(draws, rng.uniform(0, math.pi, 400), math.pi)
    assert unrelated["error_concentration"] < 0.15 and unrelated["median_abs_error_deg"] > 30


def test_rotation_check_passes_a_rotation_and_fails_a_dimmer():
    model = GalaxyModel("phys-only", **{**SMALL_MODEL, "image_size": 33})
    base = {"I0": torch.tensor([0.8, 0.6]), "A": torch.tensor([0.4, 0.3]), "e": torch.tensor([0.6, 0.5]),
            "theta": torch.tensor([0.2, 1.3])}
    good = rotation_check(model, base)
    assert good["orientation_error_deg"] < 2 and good["flux_rel_std"] < 0.02
    assert good["rotation_residual_fraction"] == good["rotation_residual_fraction_physics"] < 0.2

    class Dimmer(GalaxyModel):
        """theta dims the galaxy instead of turning it."""

        def decode(self, params, z_aux2, *, clamp=True):
            theta = params["theta"]
            p = dict(params, I0=params["I0"] * (0.5 + 0.5 * torch.cos(theta)), theta=torch.zeros_like(theta))
            return super().decode(p, z_aux2, clamp=clamp)

    bad = rotation_check(Dimmer("phys-only", **{**SMALL_MODEL, "image_size": 33}), base)
    assert bad["rotation_residual_fraction"] > 0.5 and bad["flux_rel_std"] > 0.1


def test_traversal_example_runs(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "galaxy_traversal.py"
    result = runpy.run_path(str(path), run_name="not_main")["main"](
        ["--epochs", "1", "--n", "12", "--size", "16", "--out", str(tmp_path), "--small"])
    assert np.isfinite(result["theta_median_error_deg"])
    assert set(result["traversal"]) >= {"rotation_residual_fraction", "orientation_error_deg"}
    assert (tmp_path / "theta_traversal.png").stat().st_size > 1000
    pyro.clear_param_store()
    again = runpy.run_path(str(path), run_name="not_main")["main"](
        ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--size", "16"])
    assert again["theta_median_error_deg"] == pytest.approx(result["theta_median_error_deg"])
