"""Checkpoint files: round trip, atomic writes and refusal of foreign or damaged files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pyro_physvae.checkpoint import FORMAT_VERSION, encode_checkpoint, load_checkpoint, save_checkpoint
from pyro_physvae.files import atomic_write


def test_history_is_stored_as_a_table_and_given_back_as_records(tmp_path):
    history = [{"epoch": i, "loss": 1.0 / i, "val_mse": float("nan") if i == 2 else 0.5} for i in range(1, 4)]
    path = save_checkpoint({"history": history}, tmp_path / "c.pt")
    back = load_checkpoint(path, required=())["history"]
    assert [r["epoch"] for r in back] == [1, 2, 3] and all(type(r["epoch"]) is int for r in back)
    assert back[0] == history[0] and back[2] == history[2] and back[1]["loss"] == 0.5
    ragged = [{"epoch": 1}, {"epoch": 2, "loss": 1.0}]  # kept as it is
    path = save_checkpoint({"history": ragged}, tmp_path / "r.pt")
    assert load_checkpoint(path, required=())["history"] == ragged


def test_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    state = {"model_state": net.state_dict(), "epoch": 7, "history": [{"loss": 1.5}], "name": "x",
             "rng_state": torch.get_rng_state()}
    path = save_checkpoint(state, tmp_path / "deep" / "dir" / "run.pt")
    assert path.is_file()
    back = load_checkpoint(path, required=())
    assert back["format_version"] == FORMAT_VERSION
    assert back["epoch"] == 7 and back["history"] == [{"loss": 1.5}] and back["name"] == "x"
    assert torch.equal(back["rng_state"], state["rng_state"])
    other = torch.nn.Linear(3, 2)
    other.load_state_dict(back["model_state"])
    torch.testing.assert_close(other.weight, net.weight)
    assert os.listdir(path.parent) == ["run.pt"]  # no temporary files left behind


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert load_checkpoint(path, required=())["epoch"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    save_checkpoint({"epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="bad.pt is damaged: its contents do not match the digest"):
        load_checkpoint(path, required=())
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="not a pyro-physvae checkpoint"):
        load_checkpoint(path, required=())


@pytest.mark.parametrize("content", [{"epoch": 1}, torch.zeros(3), {"format_version": 999}])
def test_foreign_torch_file(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a pyro-physvae checkpoint"):
        load_checkpoint(path)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1}, tmp_path / "c.pt")
    before = path.read_bytes()

    def full_disk(fd):  # the new file is written, but cannot be made durable
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]
    assert load_checkpoint(path, required=())["epoch"] == 1


class Custom:
    """An arbitrary class: weights_only loading must refuse to build it."""


def test_unsafe_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"format_version": 1, "obj": Custom()}, path)  # format 1: no digest to stop it first
    with pytest.warns(UserWarning, match="read without verification"), \
            pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path)
    # A file with an intact digest is no safer: its payload is still read with weights_only.
    path.write_bytes(encode_checkpoint({"obj": Custom()}))
    with pytest.raises(ValueError, match="objects other than weights, which are never built: Unsupported"):
        load_checkpoint(path, required=())


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "inference_data.nc"
    path.write_text("old")

    def failing(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["inference_data.nc"]
    atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new"
