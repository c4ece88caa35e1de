"""SVI training end to end on a tiny data set: convergence, files, resume and divergence."""

from __future__ import annotations

import json
import math
import shutil

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

import pyro_physvae.base as base_module
from pyro_physvae.checkpoint import load_checkpoint
from pyro_physvae.devices import full_fp32, resolve_device
from pyro_physvae.ode import IntegrationError
from pyro_physvae.regularizers import (
    PhysicsAugmentation,
    PhysVAELoss,
    PosteriorPredictiveCheck,
    Unmixing,
    model_precision,
)
from pyro_physvae.settings import SETTINGS, Setting
from pyro_physvae.systems import get_system
from pyro_physvae.train import (
    TrainConfig,
    TrainingDiverged,
    make_loss,
    read_history,
    train,
)

RUN = {"batch_size": 16, "checkpoint_every": 10, "threads": 1, "seed": 0}
FILES = {"best.pt", "last.pt", "last.prev.pt", "config.json", "history.jsonl"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_data_dir):
    """A 30-epoch phys+nn+reg run shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("run30")
    history = train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=30, **RUN),
                    progress=False)
    return run_dir, history


# --------------------------------------------------------------------------------------
# A short run
# --------------------------------------------------------------------------------------
def test_short_run_learns(reference_run):
    _, history = reference_run
    assert [r["epoch"] for r in history] == list(range(1, 31))
    keys = {"loss", "ppc", "augment", "unmix", "val_loss", "val_mse", "time_train", "time_epoch"}
    for r in history:
        assert keys <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "val_loss", "val_mse", "ppc"))
        assert 0 < r["time_train"] <= r["time_epoch"]
    first = history[0]
    last5 = history[-5:]
    assert sum(r["loss"] for r in last5) / 5 < 0.5 * first["loss"]
    assert min(r["val_loss"] for r in history[-5:]) < 0.5 * first["val_loss"]
    assert min(r["val_mse"] for r in history[-5:]) < 0.5 * first["val_mse"]


def test_run_directory_contents(reference_run, tiny_data_dir):
    run_dir, history = reference_run
    assert FILES <= {p.name for p in run_dir.iterdir()}
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert read_history(run_dir) == history

    config = json.loads((run_dir / "config.json").read_text())
    assert config["system"] == "pendulum" and config["setting"] == "phys+nn+reg"
    assert config["model_kwargs"] == {"n_steps": 20, "dt": pytest.approx(0.05)}
    assert config["train_config"]["epochs"] == 30 and config["train_config"]["batch_size"] == 16
    assert config["n_train"] == 64
    assert config["data_dir"] == str(tiny_data_dir.resolve())
    # The regularizer weights in use are recorded, not left as "the default".
    weights = [config["train_config"][k] for k in ("alpha", "beta", "gamma")]
    assert weights == list(get_system("pendulum").reg_weights)

    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 30 and last["history"] == history
    best = load_checkpoint(run_dir / "best.pt")
    val = [r["val_loss"] for r in history]
    best_epoch = val.index(min(val)) + 1
    assert best["epoch"] == best_epoch
    assert best["best_val"] == pytest.approx(min(val))
    assert best["history"] == history[:best_epoch]


def test_best_checkpoint_reproduces_its_model(reference_run, tiny_datasets):
    run_dir, _ = reference_run
    state = load_checkpoint(run_dir / "best.pt")
    system = get_system("pendulum")
    model, guide = system.build(state["setting"], state["model_kwargs"], state["guide_kwargs"])
    model.load_state_dict(state["model_state"])
    guide.load_state_dict(state["guide_state"])
    x = system.observations(tiny_datasets["valid"])
    # The restored guide's physics encoder gives finite, positive (softplus) omegas.
    with torch.no_grad():
        omega = guide.omega_posterior(x)[0]
    assert omega.shape == (32,) and torch.isfinite(omega).all() and (omega > 0).all()
    untrained, _ = system.build("phys+nn+reg", state["model_kwargs"])
    assert not torch.equal(model.aux2.linears[-1].weight, untrained.aux2.linears[-1].weight)


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------
def test_resume_continues_the_run(reference_run, tiny_data_dir, tmp_path):
    run_dir, history = reference_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    more = train("pendulum", "phys+nn+reg", tiny_data_dir, resumed_dir, TrainConfig(epochs=36, **RUN),
                 resume=True, progress=False)
    assert [r["epoch"] for r in more] == list(range(1, 37))
    assert more[:30] == history
    assert load_checkpoint(resumed_dir / "last.pt")["epoch"] == 36
    assert read_history(resumed_dir) == more

    # Resuming is the same as never stopping: same data order, optimiser state and draws.
    straight = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "straight",
                     TrainConfig(epochs=36, **RUN), progress=False)
    for a, b in zip(more[30:], straight[30:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_resume_errors(reference_run, tiny_data_dir, tmp_path):
    run_dir, _ = reference_run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "empty", TrainConfig(epochs=2, **RUN),
              resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "empty", TrainConfig(epochs=2, **RUN),
              resume=True, progress=False)
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with pytest.raises(ValueError, match="run is pendulum phys\\+nn\\+reg, not pendulum phys-only"):
        train("pendulum", "phys-only", tiny_data_dir, other, TrainConfig(epochs=40, **RUN),
              resume=True, progress=False)


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------
def test_ode_blow_up_stops_training_and_keeps_best_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "diverging"
    real_integrate = base_module.integrate
    calls = {"n": 0}
    seen = {}

    def failing_integrate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:  # a few epochs in (about 10 solves per epoch)
            seen["best"] = (run_dir / "best.pt").read_bytes()
            seen["files"] = sorted(p.name for p in run_dir.iterdir())
            raise IntegrationError("the ODE solution became non-finite (test)")
        return real_integrate(*args, **kwargs)

    monkeypatch.setattr(base_module, "integrate", failing_integrate)
    with pytest.raises(TrainingDiverged, match=r"training stopped at epoch 3: .*non-finite.*kept unchanged"):
        train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=20, **RUN),
              progress=False)
    assert (run_dir / "best.pt").read_bytes() == seen["best"]
    assert sorted(p.name for p in run_dir.iterdir()) == seen["files"]
    assert load_checkpoint(run_dir / "best.pt")["epoch"] in (1, 2)


def test_huge_learning_rate_blows_up_the_ode(tiny_data_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match="epoch 1: the ODE solution became non-finite.*none yet"):
        train("pendulum", "nn-only", tiny_data_dir, tmp_path / "r", TrainConfig(epochs=3, lr=10.0, **RUN),
              progress=False)


def test_huge_learning_rate_raises_training_diverged(tiny_data_dir, tmp_path):
    with pytest.raises(TrainingDiverged):
        train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "r",
              TrainConfig(epochs=2, lr=1e3, **RUN), progress=False)


# --------------------------------------------------------------------------------------
# Other settings and ELBOs, briefly
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "elbo", "particles"),
    [("nn-only", "meanfield", 1), ("phys-only", "trace", 1), ("phys+nn", "meanfield", 1),
     ("phys+nn+reg", "renyi", 2)],
)
def test_every_setting_trains(setting, elbo, particles, tiny_data_dir, tmp_path):
    history = train("pendulum", setting, tiny_data_dir, tmp_path, TrainConfig(
        epochs=3, elbo=elbo, num_particles=particles, **RUN), progress=False)
    assert len(history) == 3
    terms = {"ppc", "augment", "unmix"} & set(history[0])
    assert terms == ({"ppc", "augment", "unmix"} if setting == "phys+nn+reg" else set())
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_mse"]) for r in history)
    assert FILES <= {p.name for p in tmp_path.iterdir()}
    assert load_checkpoint(tmp_path / "last.pt")["setting"] == setting


# --------------------------------------------------------------------------------------
# Configuration and loss construction
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -3}, "batch_size"),
        ({"num_particles": 1.5}, "num_particles"),
        ({"epochs": True}, "epochs"),
        ({"elbo": "iwae"}, "unknown ELBO 'iwae'; choose one of: trace, meanfield, renyi"),
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"lr": 0.0}, "lr must be a finite positive number"),
        ({"lr": float("inf")}, "lr must be a finite positive number, got inf"),
        ({"grad_scale": float("nan")}, "grad_scale"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"clip_value": -1.0}, "clip_value"),
        ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
        ({"alpha": float("inf")}, "alpha must be a finite number >= 0, got inf"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"threads": 0}, "threads"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_accepts_cuda_names_and_from_dict():
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    c = TrainConfig.from_dict({"epochs": 7, "lr": 0.01, "not_a_field": 1})
    assert c.epochs == 7 and c.lr == 0.01 and c.batch_size == 200


def test_full_fp32_sets_ieee_float32_and_restores_the_setting():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        before = conv.fp32_precision
        with full_fp32():
            assert conv.fp32_precision == "ieee"
        assert conv.fp32_precision == before
    else:
        before = torch.backends.cudnn.allow_tf32
        with full_fp32():
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 == before


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_setting_or_system_in_train(tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        train("pendulum", "physics", tiny_data_dir, tmp_path, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="unknown system"):
        train("spring", "phys-only", tiny_data_dir, tmp_path, TrainConfig(epochs=1), progress=False)
    with pytest.raises(FileNotFoundError, match="train.nc"):
        train("pendulum", "phys-only", tmp_path, tmp_path / "r", TrainConfig(epochs=1), progress=False)


@pytest.mark.parametrize("setting", SETTINGS)
def test_make_loss_type(setting):
    system = get_system("pendulum")
    model, _ = system.build(setting, {"n_steps": 10})
    loss = make_loss(Setting.parse(setting), system, TrainConfig(elbo="trace"), model)
    if setting == "phys+nn+reg":
        assert isinstance(loss, PhysVAELoss)
        assert isinstance(loss.elbo, Trace_ELBO)
    else:
        assert not isinstance(loss, PhysVAELoss)
        assert isinstance(loss, Trace_ELBO)


def test_make_loss_keeps_reference_weights_and_converts_with_the_noise_precision():
    system = get_system("pendulum")
    model, _ = system.build("phys+nn+reg", {"n_steps": 10})
    precision = 0.5 / math.exp(-9.0 - math.log(2.0))  # 1 / (2 sigma^2), default noise
    assert precision == pytest.approx(8103.08, rel=1e-5)
    assert model_precision(model) == pytest.approx(precision, rel=1e-5)
    loss = make_loss(Setting.PHYS_NN_REG, system, TrainConfig(), model)
    by_type = {type(r): r.weight for r in loss.regularizers}
    alpha, beta, gamma = system.reg_weights
    assert by_type[PosteriorPredictiveCheck] == pytest.approx(alpha)
    assert by_type[PhysicsAugmentation] == pytest.approx(beta)
    assert by_type[Unmixing] == pytest.approx(gamma)
    assert isinstance(loss.elbo, TraceMeanField_ELBO)  # the default ELBO
    assert loss.kl_weight == pytest.approx(1.0 + alpha)

    # Explicit weights are kept as given; zero weights drop the term.
    loss = make_loss(Setting.PHYS_NN_REG, system, TrainConfig(alpha=2.0, beta=0.0, gamma=0.5), model)
    assert {r.name: r.weight for r in loss.regularizers} == {"ppc": 2.0, "unmix": 0.5}

    # A different noise level changes the scaling.
    noisy, _ = system.build("phys+nn+reg", {"n_steps": 10, "x_lnvar": 0.0})
    assert model_precision(noisy) == pytest.approx(0.5)


def test_make_loss_particles():
    system = get_system("pendulum")
    loss = make_loss(Setting.PHYS_NN, system, TrainConfig(elbo="renyi", num_particles=4))
    assert isinstance(loss, RenyiELBO)
    assert loss.num_particles == 4 and loss.vectorize_particles
    loss = make_loss(Setting.PHYS_NN_REG, system, TrainConfig(num_particles=1))
    assert loss.num_particles == 1 and not loss.vectorize_particles


def test_reference_grad_scale_and_its_use_in_the_trainer():
    """Gradients are multiplied by 2 sigma^2 / N before clipping: with a clip far above
    them, one Adam step equals a step on the scaled gradient."""
    from pyro_physvae.train import SVITrainer, reference_grad_scale

    model, _ = get_system("pendulum").build("phys-only", {"n_steps": 5, "dt": 0.1})
    sigma2 = float(model.noise_scale()) ** 2
    assert reference_grad_scale(model, 100) == pytest.approx(2 * sigma2 / 100)
    assert reference_grad_scale(torch.nn.Linear(1, 1), 4) == 0.25

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def model_fn():
        pyro.param("w", w)
        pyro.factor("f", -(w * torch.tensor([3.0, 0.5])).sum())

    def guide_fn():
        pass

    config = TrainConfig(clip_value=1e6, adam_eps=1.0, weight_decay=0.0)
    trainer = SVITrainer(model_fn, guide_fn, Trace_ELBO(), config, grad_scale=0.1)
    trainer.step()
    # Adam's first step is lr * g / (|g| + eps) with g the scaled gradient (0.3, 0.05).
    g = torch.tensor([0.3, 0.05])
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) - 1e-3 * g / (g.abs() + 1.0), atol=1e-7)
    with pytest.raises(ValueError, match="grad_scale"):
        TrainConfig(grad_scale=0.0)
