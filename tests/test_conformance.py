"""The conformance suite: one set of checks that every system passes.

Parametrised over the registry (the four built-in systems) and the user-defined
Lotka-Volterra system of ``examples/lotka_volterra``, loaded as a plugin exactly as a user's
would be. Each system's ``test_sizes`` make its data and networks tiny. What stays in the
per-system test files is what is specific to a system (its physics, data format, figures).

Checked for every system:

* sites and plates of model and guide, for every setting;
* ``Predictive`` with parallel draws, and vectorised ELBO particles;
* each ELBO inside ``PhysVAELoss``, and each AutoGuide in place of the encoder;
* gradients reaching every network of model and guide;
* the regularizers against a hand computation on the traced curves;
* a checkpoint round trip through ``train`` and ``load_run``;
* the CLI: ``train``, ``evaluate``, ``diagnose`` and ``nuts`` end to end at tiny size.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from conftest import LOTKA_VOLTERRA
from pyro.infer import Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_physvae import PhysVAELoss, Widths
from pyro_physvae.arguments import constructor_annotations
from pyro_physvae.autoguides import AUTOGUIDES, make_autoguide
from pyro_physvae.checkpoint import CheckpointError, load_checkpoint
from pyro_physvae.cli import main
from pyro_physvae.data.io import SPLITS, save_dataset
from pyro_physvae.evaluate import load_run
from pyro_physvae.regularizers import REGULARIZER_SITE, model_precision, wrapped_error
from pyro_physvae.settings import SETTINGS, Setting
from pyro_physvae.systems import System
from pyro_physvae.train import TrainConfig, train


@pytest.fixture(scope="module")
def splits(system: System) -> dict[str, Any]:
    """Tiny generated train/valid/test data sets of the system."""
    return system.generate(seed=0, **system.test_sizes["data"])


@pytest.fixture(scope="module")
def data_dir(system: System, splits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"data-{system.name}")
    for split in SPLITS:
        save_dataset(splits[split], path / f"{split}.nc")
    return path


def model_sites(system: System) -> tuple[str, ...]:
    """The latent sites of the system's phys+nn+reg model at its test sizes."""
    ds = system.generate(seed=0, **system.test_sizes["data"])["train"]
    return system.build("phys+nn+reg", model_kwargs(system, {"train": ds}))[0].latent_sites


def model_kwargs(system: System, splits) -> dict[str, Any]:
    return {**system.model_kwargs_from_data(splits["train"]), **system.test_sizes.get("model", {})}


def build(system: System, splits, setting: str):
    """A tiny model of ``setting``, its amortized guide, and 6 training observations."""
    model, guide = system.build(setting, model_kwargs(system, splits), system.test_sizes.get("guide", {}))
    x = system.observations(splits["train"])[:6]
    return model, guide, x


def wake_up(*modules: torch.nn.Module) -> None:
    """Give every all-zero parameter (the nets' last layers start at zero) small random values,
    so that every neural part changes the curves."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if not p.abs().sum() > 0:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))


# -- constructor arguments --------------------------------------------------------------------
def integer_parameters(cls: type) -> dict[str, Any]:
    """The constructor parameters of ``cls`` whose annotation holds an int (a size, a count,
    widths), by name."""
    return {k: a for k, a in constructor_annotations(cls).items() if "int" in str(a) and k != "return"}


def test_every_size_argument_is_constrained(system):
    """Every integer argument of the model and the guide is a size: annotated with Size, Count
    or Widths, so that a bad value is refused by name before torch sees it."""
    for cls in (system.model_cls, system.guide_cls):
        loose = {k: a for k, a in integer_parameters(cls).items()
                 if typing.get_origin(a) is not typing.Annotated and a != Widths and "None" not in str(a)}
        assert not loose, f"{cls.__name__}: unconstrained integer arguments {loose}"


@pytest.mark.parametrize("bad", ["x", -1, 2.5, True, [-1], [0], None])
def test_bad_size_arguments_are_refused_by_name(system, splits, bad):
    for role, cls in (("model", system.model_cls), ("guide", system.guide_cls)):
        for name, annotation in integer_parameters(cls).items():
            if "None" in str(annotation) and bad is None:
                continue
            sizes = {**system.test_sizes.get("model", {})}, {**system.test_sizes.get("guide", {})}
            sizes[role == "guide"][name] = bad
            with pytest.raises(ValueError, match=f"{cls.__name__} argument {name}: expected"):
                system.build("phys+nn+reg", {**model_kwargs(system, splits), **sizes[0]}, sizes[1])
            if role == "model":  # direct construction checks too, not only System.build
                with pytest.raises(ValueError, match=f"argument {name}: expected"):
                    cls("phys+nn+reg", **{**model_kwargs(system, splits), **sizes[0]})


# -- sites and plates ---------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS)
def test_sites_and_plates(system, splits, setting):
    model, guide, x = build(system, splits, setting)
    idx = torch.tensor([1, 4, 5])
    model_tr = poutine.trace(model).get_trace(x, subsample=idx)
    guide_tr = poutine.trace(guide).get_trace(x, subsample=idx)
    shapes = model.latent_event_shapes()
    assert tuple(shapes) == model.latent_sites
    for name, event in shapes.items():
        for tr in (model_tr, guide_tr):
            site = tr.nodes[name]
            assert site["type"] == "sample" and not site["is_observed"], name
            frames = [(f.name, f.dim, f.size, f.full_size) for f in site["cond_indep_stack"]]
            assert frames == [("data", -1, len(idx), x.shape[0])], name
            assert site["value"].shape == (len(idx), *event), name
            assert site["fn"].event_shape == event, name
    obs = model_tr.nodes["x"]
    assert obs["is_observed"] and obs["fn"].event_shape == x.shape[1:]
    assert len(model.observation_dims) == model.x_event_dim == x.dim() - 1
    assert obs["scale"] == pytest.approx(x.shape[0] / len(idx))  # the minibatch estimates the sum
    s = Setting.parse(setting)
    curves = {"x_mean"} | ({"x_P"} if s.has_physics else set()) | (
        {"x_PB"} if s.has_physics and s.has_nn else set())
    for name in curves:
        assert model_tr.nodes[name]["value"].shape == (len(idx), *x.shape[1:]), name
    assert ("unmixed" in guide_tr.nodes) == (s.has_physics and s.has_nn and guide.unmixes)
    assert set(p.name for p in model.physics_parameters) == (
        set() if not s.has_physics else set(model.latent_sites) - set(model.aux_dims) - set(model.state_dims))


def test_a_minibatch_of_rows_is_the_same_as_its_indices(system, splits, setting):
    """``(x[idx], size=N, subsample=idx)``, the rows of a minibatch read from a file, gives
    model and guide the same traces, scales and log-densities as ``(x, subsample=idx)``."""
    model, guide, x = build(system, splits, setting)
    wake_up(model, guide)
    idx = torch.tensor([5, 0, 3])
    traces = []
    for args, kwargs in (((x,), {"subsample": idx}), ((x[idx],), {"size": x.shape[0], "subsample": idx})):
        pyro.set_rng_seed(7)
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        traces.append((guide_tr, model_tr))
    for full, rows in zip(traces[0], traces[1], strict=True):
        full.compute_log_prob()
        rows.compute_log_prob()
        for name, site in full.nodes.items():
            if site["type"] != "sample" or name.startswith("_") or name == "data":
                continue
            other = rows.nodes[name]
            assert torch.equal(site["value"], other["value"]), name
            assert site["scale"] == other["scale"], name
            assert torch.allclose(site["log_prob"], other["log_prob"]), name
    with pytest.raises(ValueError, match="size=4 disagrees with the 6 rows"):
        model(x, size=4)


# -- Predictive and vectorised particles ------------------------------------------------------
def test_predictive_parallel_draws(system, splits):
    model, guide, x = build(system, splits, "phys+nn+reg")
    draws = Predictive(model, guide=guide, num_samples=3, parallel=True)(x)
    for name, event in model.latent_event_shapes().items():
        assert draws[name].shape == (3, x.shape[0], *event), name
    assert draws["x"].shape == (3, *x.shape)
    assert torch.isfinite(draws["x_mean"]).all()
    prior = Predictive(model, num_samples=2, parallel=True, return_sites=["x"])(x)
    assert prior["x"].shape == (2, *x.shape)


@pytest.mark.parametrize("elbo", [
    Trace_ELBO(num_particles=3, vectorize_particles=True),
    TraceMeanField_ELBO(num_particles=3, vectorize_particles=True),
    TraceMeanField_ELBO(),
    RenyiELBO(alpha=0.0, num_particles=3, vectorize_particles=True),
], ids=["trace-vec3", "meanfield-vec3", "meanfield", "iwae-vec3"])
def test_each_elbo_with_the_regularizers(system, splits, elbo):
    model, guide, x = build(system, splits, "phys+nn+reg")
    loss = PhysVAELoss(elbo)
    value = loss.loss_and_grads(model, guide, x, subsample=torch.arange(4))
    assert math.isfinite(value)
    names = ("ppc", "augment", "unmix")
    expected = {name for name, w in zip(names, system.reg_weights, strict=True) if w > 0}
    assert set(loss.last_terms) == expected
    assert not loss.skipped


@pytest.mark.parametrize("kind", list(AUTOGUIDES))
def test_each_autoguide_in_place_of_the_encoder(system, splits, kind):
    model, _, x = build(system, splits, "phys+nn+reg")
    guide = make_autoguide(kind, model)
    loss = PhysVAELoss(Trace_ELBO(), beta=0.0, gamma=0.0)  # no encoder: only R_ppc applies
    value = loss.loss_and_grads(model, guide, x)
    assert math.isfinite(value) and set(loss.last_terms) == ({"ppc"} if system.reg_weights[0] > 0 else set())
    draws = Predictive(model, guide=guide, num_samples=2, parallel=True)(x)
    assert draws["x"].shape == (2, *x.shape)


# -- gradients ------------------------------------------------------------------------------
def test_gradients_reach_every_network(system, splits):
    """After a few SVI steps (the nets' last layers start at zero, which blocks the
    gradient of the layers below at the start), every network of model and guide (each
    child module with parameters) gets a non-zero gradient from the regularized loss."""
    model, guide, x = build(system, splits, "phys+nn+reg")
    loss = PhysVAELoss(TraceMeanField_ELBO())
    params = list(model.parameters()) + list(guide.parameters())
    optim = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        optim.zero_grad()
        loss.differentiable_loss(model, guide, x).backward()
        optim.step()
    optim.zero_grad()
    loss.differentiable_loss(model, guide, x).backward()
    nets = [(f"{who}.{name}", net) for who, module in (("model", model), ("guide", guide))
            for name, net in module.named_children() if any(True for _ in net.parameters())]
    assert nets
    dead = [name for name, net in nets
            if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())]
    assert not dead, f"no gradient reaches {dead}"


# -- the regularizers against a hand computation ----------------------------------------------
def test_regularizers_match_a_hand_computation(system, splits):
    model, guide, x = build(system, splits, "phys+nn+reg")
    wake_up(model, guide)
    # R_DA,2 needs physics parameters to simulate, R_DA,1 an unmixing encoder.
    alpha = 0.3
    beta = 0.2 if model.physics_parameters else 0.0
    gamma = 0.7 if guide.unmixes else 0.0
    recorded: dict[str, Any] = {}
    simulate = model.simulate_augmentation

    def recording(*args, **kwargs):
        recorded["truth"], recorded["x_sim"] = simulate(*args, **kwargs)
        return recorded["truth"], recorded["x_sim"]

    model.simulate_augmentation = recording
    loss = PhysVAELoss(Trace_ELBO(), alpha=alpha, beta=beta, gamma=gamma)
    idx = torch.tensor([0, 2, 3])
    model_tr, guide_tr = loss._get_trace(model, guide, (x,), {"subsample": idx})
    c = {k: model_tr.nodes[k]["value"] for k in ("x_P", "x_PB", "x_mean")}
    dims = tuple(range(-model.x_event_dim, 0))

    def sq(a, b):
        return (a - b).pow(2).sum(dims)

    if "x_PA" in model_tr.nodes:
        c["x_PA"] = model_tr.nodes["x_PA"]["value"]
        ppc = 0.25 * (sq(c["x_PA"], c["x_P"]) + sq(c["x_PB"], c["x_P"]) + sq(c["x_mean"], c["x_PA"])
                      + sq(c["x_mean"], c["x_PB"]))
    else:
        ppc = sq(c["x_PB"], c["x_P"])
    unmix = sq(guide_tr.nodes["unmixed"]["value"], c["x_P"]) if "unmixed" in guide_tr.nodes else 0.0
    with torch.no_grad():
        estimate = guide.physics_mean(recorded["x_sim"]) if beta else {}
    periods = {p.name: getattr(p, "period", None) for p in model.physics_parameters}
    augment = sum(wrapped_error(estimate[k] - v, periods[k]).pow(2)
                  for k, v in recorded.get("truth", {}).items())
    total = alpha * ppc + beta * augment + gamma * unmix
    expected = x.shape[0] / len(idx) * model_precision(model) * total.sum().detach()
    site = model_tr.nodes[REGULARIZER_SITE]
    got = float(site["fn"].log_prob(site["value"]).sum().detach())
    assert got == pytest.approx(-float(expected), rel=1e-4)
    assert float(expected) > 0


# -- checkpoints ------------------------------------------------------------------------------
def tiny_train(system: System, splits, data_dir: Path, run_dir: Path, setting: str = "phys+nn+reg",
               epochs: int = 2) -> list[dict[str, float]]:
    return train(system, setting, data_dir, run_dir, TrainConfig(epochs=epochs, batch_size=16, seed=0),
                 model_kwargs=system.test_sizes.get("model", {}),
                 guide_kwargs=system.test_sizes.get("guide", {}), progress=False)


def test_checkpoint_round_trip(system, splits, data_dir, tmp_path):
    history = tiny_train(system, splits, data_dir, tmp_path / "run")
    assert len(history) == 2 and all(math.isfinite(r["val_loss"]) for r in history)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["system"] == system.name and config["system_source"] == dict(system.source)
    run = load_run(tmp_path / "run", "last.pt")
    assert run.system.name == system.name
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    for module, key in ((run.model, "model_state"), (run.guide, "guide_state")):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(value, state[key][name], msg=name)
    x = system.observations(splits["test"])
    pyro.set_rng_seed(3)
    a = Predictive(run.model, guide=run.guide, num_samples=2, return_sites=["x_mean"])(x)["x_mean"]
    again = load_run(tmp_path / "run", "last.pt")
    pyro.set_rng_seed(3)
    b = Predictive(again.model, guide=again.guide, num_samples=2, return_sites=["x_mean"])(x)["x_mean"]
    torch.testing.assert_close(a, b)

    # One flipped bit anywhere in the file is found, and the error names the file.
    data = bytearray((tmp_path / "run" / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "run" / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt is damaged"):
        load_run(tmp_path / "run", "last.pt")


# -- the command line -------------------------------------------------------------------------
def test_cli_train_evaluate_diagnose_nuts(system, data_dir, tmp_path, capsys):
    """The whole command line on a tiny run. A user's system needs ``--plugin`` for
    training only: the run directory records where the system came from."""
    run = tmp_path / "run"
    plugin = ["--plugin", str(LOTKA_VOLTERRA)] if system.source.get("kind") != "builtin" else []
    options = [f"--{kind}-option={k}={json.dumps(v)}" for kind in ("model", "guide")
               for k, v in system.test_sizes.get(kind, {}).items()]
    assert main([*plugin, "train", "--system", system.name, "--data", str(data_dir), "--out", str(run),
                 "--epochs", "2", "--batch-size", "16", "--quiet", *options]) == 0
    assert main(["evaluate", str(run), "--samples", "4"]) == 0
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert metrics["system"] == system.name and math.isfinite(metrics["recon_mse"])
    assert main(["diagnose", str(run), "--samples", "6", "--iwae-particles", "4"]) == 0
    assert (run / "diagnose-test" / "inference_data.nc").is_file()
    # A short run that checks the plumbing; NUTS's convergence is checked by tests/test_mcmc.py
    # and measured by benchmarks/nuts_systems.py.
    assert main(["nuts", str(run), "--sequences", "0", "--chains", "2", "--samples", "10",
                 "--warmup", "10", "--max-tree-depth", "3", "--amortized-draws", "50"]) == 0
    out = capsys.readouterr().out
    assert "max R-hat" in out
    idata = az.from_netcdf(run / "nuts-test" / "nuts.nc")
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 10
    assert set(model_sites(system)) <= set(idata.posterior.data_vars)
    assert np.isfinite(idata.log_likelihood["x"].values).all()
