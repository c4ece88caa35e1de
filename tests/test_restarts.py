"""Restarts chosen on validation: several seeds trained, the best kept as an ordinary run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pyro_physvae.cli import main
from pyro_physvae.evaluate import evaluate
from pyro_physvae.restarts import read_restarts, restart_dir, train_restarts
from pyro_physvae.train import TrainConfig, read_history, train


def tiny_config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "threads": 1, "seed": 3, **kw})


@pytest.fixture(scope="module")
def restarted(tiny_data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("restarts") / "run"
    torch.set_num_threads(1)
    train_restarts("pendulum", "phys+nn+reg", tiny_data_dir, run, tiny_config(), restarts=3, progress=False)
    return run


def test_the_restart_with_the_lowest_validation_loss_is_kept(restarted):
    record = read_restarts(restarted)
    assert record["seeds"] == [3, 4, 5] and record["trainings"] == 3
    best = {s: min(r["val_loss"] for r in read_history(restart_dir(restarted, s))) for s in (3, 4, 5)}
    assert {r["seed"]: r["best_val_loss"] for r in record["restarts"]} == best
    assert len(set(best.values())) == 3  # the seeds differ, so the choice means something
    chosen = record["chosen"]
    assert chosen == min(best, key=best.get)
    kept = restart_dir(restarted, chosen)
    for name in ("config.json", "history.jsonl", "best.pt", "last.pt"):
        assert (restarted / name).read_bytes() == (kept / name).read_bytes()
    assert json.loads((restarted / "config.json").read_text())["train_config"]["seed"] == chosen


def test_the_kept_run_evaluates_as_an_ordinary_run(restarted, tmp_path):
    m = evaluate(restarted, num_samples=4, iwae_particles=2, out_dir=tmp_path / "eval", calibrate_on=None)
    assert m["checkpoint_epoch"] == min(read_history(restarted), key=lambda r: r["val_loss"])["epoch"]
    assert m["recon_mse"] > 0


def test_resume_continues_every_restart_and_chooses_again(restarted, tiny_data_dir, tmp_path):

    run = Path(shutil.copytree(restarted, tmp_path / "run"))
    history = train_restarts("pendulum", "phys+nn+reg", tiny_data_dir, run, tiny_config(epochs=3), restarts=3,
                             resume=True, progress=False)
    record = read_restarts(run)
    assert [r["epochs"] for r in record["restarts"]] == [3, 3, 3]
    assert len(history) == 3 and history == read_history(restart_dir(run, record["chosen"]))


def test_restarts_interrupted_before_the_choice_resume_from_the_cli(restarted, tiny_data_dir, tmp_path):

    run = Path(shutil.copytree(restarted, tmp_path / "run"))
    for name in ("config.json", "history.jsonl", "best.pt", "last.pt", "last.prev.pt", "restarts.json"):
        (run / name).unlink(missing_ok=True)
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--resume", "--restarts", "3",
                 "--epochs", "3", "--quiet"]) == 0
    record = read_restarts(run)
    assert record["seeds"] == [3, 4, 5] and [r["epochs"] for r in record["restarts"]] == [3, 3, 3]


def test_bad_restarts_and_an_occupied_directory_are_refused(restarted, tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="restarts must be a positive integer"):
        train_restarts("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "r", tiny_config(), restarts=0)
    with pytest.raises(ValueError, match="already holds a run"):
        train_restarts("pendulum", "phys+nn+reg", tiny_data_dir, restarted, tiny_config(), restarts=2)
    plain = tmp_path / "plain"
    train("pendulum", "phys+nn+reg", tiny_data_dir, plain, tiny_config(epochs=1), progress=False)
    with pytest.raises(ValueError, match="trained without restarts"):
        train_restarts("pendulum", "phys+nn+reg", tiny_data_dir, plain, tiny_config(), restarts=2,
                       resume=True)


def test_the_cli_trains_restarts_and_refuses_them_with_lightning(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--threads", "1", "--restarts", "2", "--quiet"]) == 0
    assert read_restarts(out)["seeds"] == [0, 1]
    assert "kept seed" in capsys.readouterr().out
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(out), "--epochs", "2", "--resume",
                 "--quiet"]) == 0
    assert [r["epochs"] for r in read_restarts(out)["restarts"]] == [2, 2]
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(tmp_path / "l"), "--restarts", "2",
                 "--devices", "1"]) != 0
    assert "--restarts trains its seeds one after the other" in capsys.readouterr().err
    # A plain --overwrite would leave the restarts' record behind for a later --resume: refused.
    before = (out / "restarts.json").read_bytes()
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(out), "--epochs", "1", "--overwrite",
                 "--quiet"]) != 0
    assert "holds restarts" in capsys.readouterr().err and (out / "restarts.json").read_bytes() == before
