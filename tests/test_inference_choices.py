"""Swapping the inference: ELBOs with particles, AutoGuides with per-sequence latents."""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from conftest import SMALL_GUIDE, SMALL_MODEL
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal

from pyro_physvae.autoguides import (
    GUIDES,
    amortized_posterior,
    fit_local_guide,
    make_autoguide,
    refine_amortized_guide,
    supports_subsampling,
)
from pyro_physvae.cli import main as cli_main
from pyro_physvae.data.io import load_split
from pyro_physvae.evaluate import diagnose, evaluate, load_run
from pyro_physvae.models.pendulum import PendulumModel
from pyro_physvae.train import TrainConfig, train

RUN = {"batch_size": 16, "checkpoint_every": 50, "threads": 1, "seed": 0}


def _improved(history: list[dict], key: str, factor: float) -> bool:
    first, last = history[0][key], min(r[key] for r in history[-3:])
    return last < factor * first


@pytest.mark.parametrize(
    ("elbo", "particles", "renyi_alpha"),
    [("trace", 1, 0.0), ("meanfield", 2, 0.0), ("renyi", 4, 0.0), ("renyi", 3, 0.5)],
    ids=["trace", "meanfield-2", "iwae-4", "renyi0.5-3"],
)
def test_each_elbo_trains_the_regularized_model(elbo, particles, renyi_alpha, tiny_data_dir, tmp_path):
    history = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path,
                    TrainConfig(epochs=12, lr=1e-2, elbo=elbo, num_particles=particles,
                                renyi_alpha=renyi_alpha, **RUN),
                    model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, progress=False)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert _improved(history, "loss", 0.5)
    assert _improved(history, "val_mse", 0.7)


@pytest.mark.parametrize("kind", ["auto-normal", "auto-diagonal", "auto-lowrank"])
def test_each_autoguide_trains_and_evaluates(kind, tiny_data_dir, tmp_path):
    history = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path,
                    TrainConfig(epochs=25, guide=kind, lr=3e-2, **RUN), model_kwargs=SMALL_MODEL,
                    progress=False)
    # Only R_ppc applies without the encoder.
    assert "ppc" in history[0] and "augment" not in history[0] and "unmix" not in history[0]
    assert _improved(history, "loss", 0.6)
    assert _improved(history, "val_mse", 0.6)  # validated on the training sequences
    run = load_run(tmp_path)
    assert run.guide is None and run.guide_kind == kind
    metrics = evaluate(tmp_path, tiny_data_dir, split="test", num_samples=20, guide_steps=100)
    assert math.isfinite(metrics["recon_mse"]) and math.isfinite(metrics["omega"]["mae"])


def test_autoguide_choice_from_the_cli(tiny_data_dir, tmp_path, capsys):
    cli_main(["train", "--data", str(tiny_data_dir), "--out", str(tmp_path), "--epochs", "2",
              "--batch-size", "16", "--guide", "auto-normal", "--elbo", "renyi", "--num-particles", "2",
              "--renyi-alpha", "0", "--threads", "1", "--quiet"])
    config = load_run(tmp_path).checkpoint["train_config"]
    assert (config["guide"], config["elbo"], config["num_particles"], config["renyi_alpha"]) == \
        ("auto-normal", "renyi", 2, 0.0)
    with pytest.raises(SystemExit):
        cli_main(["train", "--data", str(tiny_data_dir), "--out", str(tmp_path), "--guide", "auto-flow"])
    assert "invalid choice: 'auto-flow'" in capsys.readouterr().err


def test_diagnose_fits_separate_autoguides_for_test_and_calibration_splits(tiny_data_dir, tmp_path):
    """The test (16 sequences) and validation (32) splits each get a guide of their own;
    they used to share Pyro parameter-store names and clash over their shapes."""
    train("pendulum", "phys-only", tiny_data_dir, tmp_path,
          TrainConfig(epochs=2, guide="auto-normal", **RUN), progress=False)
    report = diagnose(tmp_path, tiny_data_dir, num_samples=10, iwae_particles=4, guide_steps=5,
                      out_dir=tmp_path / "diag")
    assert "widening_factor" in report["calibration"]["omega"]
    model = PendulumModel("phys-only")
    assert make_autoguide("auto-normal", model)._pyro_name != make_autoguide("auto-normal", model)._pyro_name


def test_auto_normal_minibatch_updates_only_the_batch_rows(small_data):
    model = PendulumModel("phys-only", n_steps=12, dt=0.1)
    guide = make_autoguide("auto-normal", model)
    batch = torch.tensor([1, 5])
    guide(small_data, subsample=batch)
    before = guide.locs.omega.detach().clone()
    assert before.shape == (small_data.shape[0],)
    loss = Trace_ELBO().differentiable_loss(model, guide, small_data, subsample=batch)
    loss.backward()
    grad = guide.locs.omega_unconstrained.grad if hasattr(guide.locs, "omega_unconstrained") \
        else guide.locs.omega.grad
    assert (grad[batch] != 0).all()
    others = torch.ones(small_data.shape[0], dtype=torch.bool)
    others[batch] = False
    assert (grad[others] == 0).all()


def test_guide_kinds_and_subsampling_support():
    model = PendulumModel("phys-only", n_steps=12, dt=0.1)
    assert set(GUIDES) == {"amortized", "auto-normal", "auto-diagonal", "auto-lowrank"}
    assert isinstance(make_autoguide("auto-normal", model), AutoNormal)
    assert isinstance(make_autoguide("auto-diagonal", model), AutoDiagonalNormal)
    assert isinstance(make_autoguide("auto-lowrank", model, rank=2), AutoLowRankMultivariateNormal)
    assert supports_subsampling(make_autoguide("auto-normal", model))
    assert not supports_subsampling(make_autoguide("auto-diagonal", model))
    with pytest.raises(ValueError, match="unknown guide 'flow'"):
        make_autoguide("flow", model)
    with pytest.raises(ValueError, match="unknown guide"):
        TrainConfig(guide="flow")


def test_fit_local_guide_recovers_omega_and_keeps_the_model(tiny_datasets):
    """On noisy physics-only curves the per-sequence guide finds omega; the model's weights
    (here: its learnt noise) stay as they were."""
    model = PendulumModel("phys-only", n_steps=20, dt=0.05, learn_noise=True, x_lnvar=-9.0)
    init = torch.linspace(-1.0, 1.0, 6)
    omega = torch.linspace(1.2, 2.6, 6)
    with torch.no_grad():
        x = model.physics_only(init, omega) + 0.01 * torch.randn(6, 20)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pyro.set_rng_seed(0)
    guide = fit_local_guide(model, "auto-normal", x, steps=300, lr=0.05)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    est = guide.median(x)["omega"]
    assert (est - omega).abs().max() < 0.1, (est, omega)


def test_evaluate_refits_autoguide_on_the_split(tiny_data_dir, tmp_path):
    train("pendulum", "phys-only", tiny_data_dir, tmp_path,
          TrainConfig(epochs=2, guide="auto-diagonal", **RUN), progress=False)
    ds = load_split(tiny_data_dir, "test")
    run = load_run(tmp_path)
    x = run.system.observations(ds)
    guide = run.guide_for(x, steps=5)
    assert isinstance(guide, AutoDiagonalNormal)
    assert run.applied_refine_steps(7) == 0  # its guide is fitted to the split, never refined
    assert guide(x)["omega"].shape == (x.shape[0],)


def _trained_amortized_run(data_dir, run_dir) -> None:
    train("pendulum", "phys+nn+reg", data_dir, run_dir, TrainConfig(epochs=8, lr=1e-2, **RUN),
          model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, progress=False)


def test_refined_guide_starts_at_the_encoder_posterior(tiny_data_dir, tmp_path):
    _trained_amortized_run(tiny_data_dir, tmp_path)
    run = load_run(tmp_path)
    x = run.system.observations(load_split(tiny_data_dir, "test"))
    start = amortized_posterior(run.guide, x)
    assert set(start) == {"omega", "z_A1", "z_A2"}
    assert start["omega"][0].shape == (x.shape[0],) and start["z_A2"][1].shape == (x.shape[0], 2)
    # One step of a vanishing learning rate leaves the starting point as it was.
    guide = refine_amortized_guide(run.model, run.guide, x, steps=1, lr=1e-12)
    assert isinstance(guide, AutoNormal)
    for name, (loc, scale) in start.items():
        q_loc, q_scale = guide._get_loc_and_scale(name)
        torch.testing.assert_close(q_loc, loc, atol=1e-6, rtol=0)
        torch.testing.assert_close(q_scale, scale, atol=1e-6, rtol=1e-5)


def test_refinement_raises_the_elbo_and_leaves_the_networks(tiny_data_dir, tmp_path):
    """On held-out sequences, refining the encoder's posterior per sequence gives a better
    ELBO of the same model; model and encoder weights are untouched."""
    _trained_amortized_run(tiny_data_dir, tmp_path)
    run = load_run(tmp_path)
    x = run.system.observations(load_split(tiny_data_dir, "test"))
    before = {k: v.clone() for m in (run.model, run.guide) for k, v in m.state_dict().items()}
    refined = refine_amortized_guide(run.model, run.guide, x, steps=150)
    after = {k: v for m in (run.model, run.guide) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    elbo = Trace_ELBO(num_particles=64, vectorize_particles=True)
    with torch.no_grad():
        loss_encoder = elbo.loss(run.model, run.guide, x)
        loss_refined = elbo.loss(run.model, refined, x)
    assert loss_refined < loss_encoder - 0.05 * abs(loss_encoder), (loss_refined, loss_encoder)


def test_refine_steps_in_evaluate_and_the_cli(tiny_data_dir, tmp_path, capsys):
    _trained_amortized_run(tiny_data_dir, tmp_path)
    plain = evaluate(tmp_path, tiny_data_dir, num_samples=20, out_dir=tmp_path / "plain")
    refined = evaluate(tmp_path, tiny_data_dir, num_samples=20, out_dir=tmp_path / "refined",
                       refine_steps=150)
    assert plain["refine_steps"] == 0 and refined["refine_steps"] == 150
    assert refined["iwae_log_likelihood"]["mean"] > plain["iwae_log_likelihood"]["mean"]
    cli_main(["evaluate", str(tmp_path), "--samples", "10", "--refine-steps", "3",
              "--out", str(tmp_path / "cli")])
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["refine_steps"] == 3
    cli_main(["diagnose", str(tmp_path), "--samples", "10", "--iwae-particles", "4",
              "--refine-steps", "3", "--out", str(tmp_path / "diag")])
    report = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert report["refine_steps"] == 3 and "widening_factor" in report["calibration"]["omega"]
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):
        load_run(tmp_path).guide_for(torch.zeros(2, 20), refine_steps=-1)
    assert load_run(tmp_path).applied_refine_steps(7) == 7


def test_refinement_refuses_latents_off_the_real_line():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", pyro.distributions.LogNormal(torch.zeros(x.shape[0]), 1.0))

    with pytest.raises(ValueError, match="cannot refine latent 'rate'"):
        amortized_posterior(guide, torch.zeros(3, 4))
