"""A run directory survives faults: damaged checkpoints are found, resume is honest and loses
at most one epoch, one trainer at a time, bad input to the model/guide pair is refused before a
step is applied, and ``kill -9`` at any moment (during a checkpoint write included) resumes to
the same result as a run never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pyro
import pytest
import torch
from conftest import SMALL_GUIDE, SMALL_MODEL
from hypothesis import HealthCheck, given, settings
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_physvae.checkpoint import CheckpointError, encode_checkpoint, load_checkpoint
from pyro_physvae.files import DirectoryInUse, DirectoryLock
from pyro_physvae.regularizers import NonFiniteStep, PhysVAELoss
from pyro_physvae.train import TrainConfig, latest_checkpoint, read_history, scheduled_lr, train

RUN = {"batch_size": 16, "threads": 1, "seed": 0}
SMALL = {"model_kwargs": SMALL_MODEL, "guide_kwargs": SMALL_GUIDE, "progress": False}


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def flip(path: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run6(tmp_path_factory, tiny_data_dir):
    """A 6-epoch phys+nn+reg run with small networks, checkpointed every epoch."""
    run_dir = tmp_path_factory.mktemp("run6")
    history = train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=6, **RUN), **SMALL)
    return run_dir, history


def copy_run(run6, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run6[0], target)
    return target


# -- checkpoints ------------------------------------------------------------------------------
STATE = {"system": "s", "setting": "phys-only", "model_kwargs": {}, "guide_kwargs": {},
         "train_config": {}, "epoch": 1, "model_state": {"w": torch.arange(40.0)},
         "guide_state": {"v": torch.ones(3)}}
ENCODED = encode_checkpoint(STATE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, len(ENCODED) - 1), mask=st.integers(1, 255))
def test_any_changed_byte_is_found(tmp_path, position, mask):
    path = tmp_path / "c.pt"
    path.write_bytes(ENCODED)
    flip(path, position, mask)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(0, len(ENCODED) - 1))
def test_any_truncation_is_found(tmp_path, length):
    path = tmp_path / "c.pt"
    path.write_bytes(ENCODED[:length])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_intact_checkpoint_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(ENCODED)
    state = load_checkpoint(path)
    assert torch.equal(state["model_state"]["w"], STATE["model_state"]["w"])


@pytest.mark.parametrize(("change", "match"), [
    (lambda s: s.pop("model_state"), "incomplete: it lacks model_state"),
    (lambda s: s["model_state"].update(w=torch.tensor([1.0, float("nan")])), r"model_state\['w'\] holds NaN"),
    (lambda s: s["guide_state"].update(v=[1, 2]), r"guide_state\['v'\] is not a tensor"),
])
def test_incomplete_or_non_finite_checkpoint_is_refused(tmp_path, change, match):
    state = {**STATE, "model_state": dict(STATE["model_state"]), "guide_state": dict(STATE["guide_state"])}
    change(state)
    path = tmp_path / "c.pt"
    path.write_bytes(encode_checkpoint(state))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a pyro-physvae checkpoint"):
        load_checkpoint(path)


# -- what a run directory holds ---------------------------------------------------------------
def test_history_and_checkpoints_every_epoch(run6):
    run_dir, history = run6
    assert read_history(run_dir) == history
    assert [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()] \
        == list(range(1, 7))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 6
    assert load_checkpoint(run_dir / "last.prev.pt")["epoch"] == 5
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_first_checkpoint_after_epoch_one(tiny_data_dir, tmp_path, monkeypatch):
    """With checkpoints every 10 epochs, a run stopped in epoch 4 still resumes from epoch 3."""
    import pyro_physvae.train as train_module

    real_epoch = train_module._epoch

    def stop_in_epoch_4(*args, **kwargs):
        if args[10] == 3:  # the 0-based epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "_epoch", stop_in_epoch_4)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("pendulum", "phys-only", tiny_data_dir, run_dir,
              TrainConfig(epochs=20, checkpoint_every=10, **RUN), **SMALL)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1  # written after the first epoch
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2, 3]
    best, _ = latest_checkpoint(run_dir)
    assert best["epoch"] == 3  # best.pt: validation improves each epoch this early


def test_damaged_last_checkpoint_resumes_from_the_previous(run6, tiny_data_dir, tmp_path):
    run_dir = copy_run(run6, tmp_path)
    flip(run_dir / "last.pt", 5000)
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"partial")  # left by a kill during a write
    with pytest.warns(UserWarning, match=r"last\.pt is damaged.*Resuming from last\.prev\.pt \(epoch 5\)"):
        more = train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=7, **RUN),
                     resume=True, **SMALL)
    assert [r["epoch"] for r in more] == list(range(1, 8))
    assert more[:5] == run6[1][:5]  # one epoch of work lost, and only that
    assert not (run_dir / ".last.pt.abc123.tmp").exists()
    assert [r["epoch"] for r in read_history(run_dir)] == list(range(1, 8))
    resumes = json.loads((run_dir / "config.json").read_text())["resumes"]
    assert resumes == [{"epoch": 5, "from": "last.prev.pt", "changed": {"epochs": [6, 7]}}]


def test_every_checkpoint_damaged(run6, tiny_data_dir, tmp_path):
    run_dir = copy_run(run6, tmp_path)
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        flip(run_dir / name, 3000)
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=8, **RUN),
              resume=True, **SMALL)
    assert snapshot(run_dir) == before


# -- honest resume --------------------------------------------------------------------------
def test_resume_applies_and_records_a_new_learning_rate(run6, tiny_data_dir, tmp_path):
    run_dir = copy_run(run6, tmp_path)
    more = train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=8, lr=5e-4, **RUN),
                 resume=True, **SMALL)
    assert [r["lr"] for r in more] == [1e-3] * 6 + [5e-4] * 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train_config"]["lr"] == 5e-4
    assert config["resumes"][-1]["changed"] == {"epochs": [6, 8], "lr": [1e-3, 5e-4]}
    assert load_checkpoint(run_dir / "last.pt")["optimizer_state"]["param_groups"][0]["lr"] == 5e-4


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    ({"batch_size": 8}, {}, r"batch_size \(run: 16, asked: 8\)"),
    ({"elbo": "trace"}, {}, r"elbo \(run: 'meanfield', asked: 'trace'\)"),
    ({"alpha": 0.5}, {}, r"alpha \(run: 0\.01, asked: 0\.5\)"),
    ({}, {"model_kwargs": {**SMALL_MODEL, "method": "rk4"}},
     r"model option method \(run: 'euler', asked: 'rk4'\)"),
    ({}, {"guide_kwargs": {**SMALL_GUIDE, "feat_dim": 8}}, r"guide option feat_dim \(run: 16, asked: 8\)"),
])
def test_resume_refuses_a_fixed_option(run6, tiny_data_dir, tmp_path, config, kwargs, match):
    run_dir = copy_run(run6, tmp_path)
    before = snapshot(run_dir)
    only = (".*Only epochs, lr, lr_schedule, lr_final_ratio, threads, device, checkpoint_every, "
            "stream may change")
    with pytest.raises(ValueError, match=match + only):
        train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=8, **{**RUN, **config}),
              resume=True, **{**SMALL, **kwargs})
    assert snapshot(run_dir) == before


def test_resume_refuses_other_data(run6, tmp_path):
    from pyro_physvae.data.io import save_dataset
    from pyro_physvae.systems import get_system

    run_dir = copy_run(run6, tmp_path)
    before = snapshot(run_dir)
    sizes = {"n_train": 64, "n_valid": 8, "n_test": 8, "n_steps": 24}
    for split, ds in get_system("pendulum").generate(seed=1, **sizes).items():
        save_dataset(ds, tmp_path / "longer" / f"{split}.nc")
    with pytest.raises(ValueError, match=r"model option n_steps \(run: 20, asked: 24\)"):
        train("pendulum", "phys+nn+reg", tmp_path / "longer", run_dir, TrainConfig(epochs=8, **RUN),
              resume=True, **SMALL)
    assert snapshot(run_dir) == before


def test_fresh_run_refuses_a_directory_with_a_run(run6, tiny_data_dir, tmp_path):
    run_dir = copy_run(run6, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"already holds a run \(config\.json.*--resume.*--overwrite"):
        train("pendulum", "phys-only", tiny_data_dir, run_dir, TrainConfig(epochs=2, **RUN), **SMALL)
    assert snapshot(run_dir) == before
    history = train("pendulum", "phys-only", tiny_data_dir, run_dir, TrainConfig(epochs=2, **RUN),
                    overwrite=True, **SMALL)
    assert read_history(run_dir) == history and len(history) == 2
    assert load_checkpoint(run_dir / "last.pt")["setting"] == "phys-only"
    assert load_checkpoint(run_dir / "last.prev.pt")["setting"] == "phys-only"


def test_run_directory_that_is_a_file(tiny_data_dir, tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match="is a file, expected a directory"):
        train("pendulum", "phys-only", tiny_data_dir, tmp_path / "f", TrainConfig(epochs=1, **RUN), **SMALL)
    assert (tmp_path / "f").read_text() == "keep"


def test_bad_data_fail_before_anything_is_written(tiny_datasets, tmp_path):
    """A validation split of another length is found before the first epoch, not after it."""
    from pyro_physvae.data.io import save_dataset

    save_dataset(tiny_datasets["train"], tmp_path / "data" / "train.nc")
    save_dataset(tiny_datasets["valid"].isel(time=slice(0, 15)), tmp_path / "data" / "valid.nc")
    with pytest.raises(ValueError, match=r"valid\.nc does not fit the pendulum model: the data have "
                                         r"n_steps=15 \(the model's: 20\)"):
        train("pendulum", "phys+nn+reg", tmp_path / "data", tmp_path / "run", TrainConfig(epochs=2, **RUN),
              **SMALL)
    assert not (tmp_path / "run").exists()


# -- one trainer per directory ----------------------------------------------------------------
def test_a_second_trainer_is_refused(run6, tiny_data_dir, tmp_path):
    run_dir = copy_run(run6, tmp_path)
    before = snapshot(run_dir)
    with DirectoryLock(run_dir):
        for resume in (True, False):
            with pytest.raises(DirectoryInUse, match="in use by another trainer"):
                train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=8, **RUN),
                      resume=resume, overwrite=True, **SMALL)
    assert snapshot(run_dir) == before
    # Released with its holder: now the run resumes.
    assert len(train("pendulum", "phys+nn+reg", tiny_data_dir, run_dir, TrainConfig(epochs=7, **RUN),
                     resume=True, **SMALL)) == 7


def test_lock_is_released_when_its_process_dies(tmp_path):
    code = (f"from pyro_physvae.files import DirectoryLock; import time; "
            f"DirectoryLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUse):
            DirectoryLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    DirectoryLock(tmp_path).acquire().release()


# -- the model/guide pair refuses bad input before a step is applied ----------------------------
@pytest.fixture
def svi_pair(pair_factory, small_data):
    model, guide = pair_factory("phys+nn+reg")
    return model, guide, small_data


@pytest.mark.parametrize(("make_x", "error", "match"), [
    (lambda x: x.numpy(), TypeError,
     r"x must be a torch.Tensor, got numpy.ndarray; convert it with torch.as_tensor"),
    (lambda x: x.double(), TypeError, r"x has dtype torch.float64 but the parameters are torch.float32"),
    (lambda x: x[:, :10], ValueError,
     r"x has 10 time steps per sequence, the model expects 12|x must have shape \(N, 12\), got \(8, 10\)"),
    (lambda x: x[0], ValueError, r"x must have 2 dimensions"),
    (lambda x: x[:, None], ValueError, r"x must have 2 dimensions"),
    (lambda x: x[:0], ValueError, r"x holds no sequences"),
    (lambda x: x.index_put((torch.tensor([3]), torch.tensor([4])), torch.tensor(float("nan"))), ValueError,
     r"x contains NaN or infinite values \(first bad sequences: \[3\]\)"),
])
@pytest.mark.parametrize("entry", ["svi.step", "Predictive", "guide"])
def test_guide_refuses_what_the_model_refuses(svi_pair, make_x, error, match, entry):
    model, guide, x = svi_pair
    bad = make_x(x)
    with pytest.raises(error, match=match):
        if entry == "svi.step":
            SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), PhysVAELoss(Trace_ELBO())).step(bad)
        elif entry == "Predictive":
            Predictive(model, guide=guide, num_samples=2)(bad)
        else:
            guide(bad)
    with pytest.raises(error, match=match):
        model(bad)


def test_non_finite_step_is_refused_and_parameters_stay(svi_pair):
    model, guide, x = svi_pair
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), PhysVAELoss(Trace_ELBO()))
    svi.step(x)  # creates the optimiser state
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(NonFiniteStep, match="the loss is inf; the step is refused"):
        svi.step(x * 1e30)
    after = dict(pyro.get_param_store().items())
    assert before.keys() == after.keys()
    for k, v in after.items():
        assert torch.equal(v.detach(), before[k]), k
        assert v.grad is None or not v.grad.abs().sum(), k
    assert np.isfinite(svi.step(x))  # and training goes on from there


# -- kill -9 at any moment ---------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pyro_physvae.checkpoint as checkpoint
    import pyro_physvae.files as files
    from pyro_physvae.train import TrainConfig, train
    from conftest import SMALL_GUIDE, SMALL_MODEL

    data, run, pause_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    writes = 0
    def paused(path, data):  # the checkpoint write number pause_at stops half-way, for a kill
        global writes
        writes += 1
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                if writes == pause_at:
                    print("WRITING", path, flush=True)
                    time.sleep(60)
                f.write(data[len(data) // 2:])
        return files.atomic_write(path, write)
    checkpoint.atomic_write_bytes = paused
    resume = any(run.glob("*.pt"))  # else a fresh start, replacing what a kill left
    train("pendulum", "phys+nn+reg", data, run, TrainConfig(epochs=8, batch_size=16, threads=1, seed=0),
          model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, resume=resume, overwrite=True,
          progress=False)
    print("DONE", flush=True)
""")


def run_child(data: Path, run: Path, pause_at: int = 0) -> subprocess.Popen:
    """A training process; it pauses in the middle of its ``pause_at``-th checkpoint write
    (0: never) after printing ``WRITING <path>``."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(run), str(pause_at)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_kill_during_checkpoint_writes_then_resume_is_bitwise_identical(tiny_data_dir, tmp_path):
    straight = tmp_path / "straight"
    child = run_child(tiny_data_dir, straight)
    assert child.communicate(timeout=300)[0].strip().endswith("DONE")

    run = tmp_path / "killed"
    # Kill in the middle of a process's 1st checkpoint write (before any checkpoint exists),
    # then its 4th and its 3rd (each epoch writes best.pt when validation improves, then
    # last.pt), resuming each time.
    epochs = []
    for nth in (1, 4, 3):
        child = run_child(tiny_data_dir, run, pause_at=nth)
        line = child.stdout.readline()
        assert line.startswith("WRITING"), line
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert list(run.glob(".*.tmp")), "the kill landed during a write"
        epochs.append(len(read_history(run)))
    child = run_child(tiny_data_dir, run)
    assert child.communicate(timeout=300)[0].strip().endswith("DONE")
    assert not list(run.glob(".*.tmp"))
    assert epochs[0] == 1 and epochs[1] > epochs[0] and epochs[2] > epochs[1], epochs

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == 8
    for key in ("model_state", "guide_state"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
    assert [r["val_loss"] for r in read_history(run)] == [r["val_loss"] for r in a["history"]]


@pytest.mark.parametrize("command", ["evaluate", "diagnose", "counterfactual", "load_run"])
def test_run_functions_refuse_data_or_weights_that_do_not_fit(run6, tmp_path, command):
    """Through the Python API too: data of another length, and a checkpoint whose tensors do
    not fit the model, are refused by name before anything is computed."""
    import pyro_physvae.evaluate as ev
    from pyro_physvae.data.io import save_dataset
    from pyro_physvae.systems import get_system

    run_dir = copy_run(run6, tmp_path)
    sizes = {"n_train": 8, "n_valid": 8, "n_test": 8, "n_steps": 30}
    for split, ds in get_system("pendulum").generate(seed=2, **sizes).items():
        save_dataset(ds, tmp_path / "d30" / f"{split}.nc")
    before = snapshot(run_dir)
    if command == "load_run":
        state = load_checkpoint(run_dir / "best.pt")
        state["guide_state"] = {k: v[..., :1] if v.dim() else v for k, v in state["guide_state"].items()}
        state.pop("format_version")
        (run_dir / "best.pt").write_bytes(encode_checkpoint(state))
        with pytest.raises(CheckpointError, match=r"guide_state does not fit PendulumGuide: size mismatch"):
            ev.load_run(run_dir)
        return
    with pytest.raises(ValueError, match=r"d30/test\.nc does not fit the pendulum model: "
                                         r"the data have n_steps=30 \(the model's: 20\)"):
        getattr(ev, command)(run_dir, tmp_path / "d30")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(("change", "match"), [
    (lambda ds: ds.assign_attrs(dt=0.1), r"valid\.nc does not fit the pendulum model: the data have dt=0\.1"),
    (lambda ds: ds.drop_attrs(), r"valid\.nc lacks the attribute 'dt'"),
])
def test_validation_split_must_match_the_training_split(tiny_datasets, tmp_path, change, match):
    """The model is built from the training split; a validation split with another time step
    (or none) is refused before training, not used silently."""
    from pyro_physvae.data.io import save_dataset

    save_dataset(tiny_datasets["train"], tmp_path / "data" / "train.nc")
    save_dataset(change(tiny_datasets["valid"]), tmp_path / "data" / "valid.nc")
    with pytest.raises(ValueError, match=match):
        train("pendulum", "phys-only", tmp_path / "data", tmp_path / "run", TrainConfig(epochs=1, **RUN),
              **SMALL)
    assert not (tmp_path / "run").exists()


# -- learning-rate schedule ---------------------------------------------------------------------
def test_cosine_schedule_falls_from_lr_to_its_final_ratio():
    config = TrainConfig(epochs=11, lr=1e-3, lr_schedule="cosine", lr_final_ratio=0.1)
    lrs = [scheduled_lr(config, e) for e in range(11)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(0.5 * (1e-3 + 1e-4))  # half way along the half cosine
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    # Symmetric about the middle: the cosine's fall is as steep at both ends.
    assert lrs[1] - lrs[2] == pytest.approx(lrs[8] - lrs[9])
    constant = TrainConfig(epochs=11, lr=3e-4)
    assert [scheduled_lr(constant, e) for e in range(11)] == [3e-4] * 11
    assert scheduled_lr(TrainConfig(epochs=1, lr_schedule="cosine"), 0) == 1e-3


@pytest.mark.parametrize(("options", "match"), [
    ({"lr_schedule": "linear"}, r"unknown lr_schedule 'linear'; choose one of: constant, cosine"),
    ({"lr_final_ratio": 0.0}, r"lr_final_ratio must be a number in \(0, 1\], got 0\.0"),
    ({"lr_final_ratio": 1.5}, r"lr_final_ratio must be a number in \(0, 1\], got 1\.5"),
    ({"lr_final_ratio": float("nan")}, r"lr_final_ratio must be a number in \(0, 1\], got nan"),
])
def test_bad_schedule_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_cosine_schedule_is_applied_recorded_and_resumed_exactly(tiny_data_dir, tmp_path, monkeypatch):
    """Each epoch trains at its scheduled rate, the history records it, and a run stopped after
    epoch 2 and resumed continues as the run that never stopped."""
    config = TrainConfig(epochs=4, lr=1e-2, lr_schedule="cosine", lr_final_ratio=0.05,
                         checkpoint_every=1, **RUN)
    straight = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "straight", config, **SMALL)
    expected = [scheduled_lr(config, e) for e in range(4)]
    assert [r["lr"] for r in straight] == pytest.approx(expected)
    assert expected[-1] == pytest.approx(5e-4)
    saved = load_checkpoint(tmp_path / "straight" / "last.pt")["optimizer_state"]["param_groups"][0]["lr"]
    assert saved == pytest.approx(expected[-1])

    import pyro_physvae.train as train_module

    def stop_at_epoch_3(config, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return scheduled_lr(config, epoch)

    monkeypatch.setattr(train_module, "scheduled_lr", stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "stopped", config, **SMALL)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["epoch"] == 2
    resumed = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "stopped", config,
                    resume=True, **SMALL)
    for a, b in zip(resumed, straight, strict=True):
        assert a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    # A constant-rate run differs from epoch 2 on: the schedule is not a no-op.
    constant = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "constant",
                     TrainConfig(epochs=4, lr=1e-2, checkpoint_every=1, **RUN), **SMALL)
    assert constant[0]["loss"] == pytest.approx(straight[0]["loss"], rel=1e-6)
    assert constant[3]["val_loss"] != pytest.approx(straight[3]["val_loss"], rel=1e-3)
