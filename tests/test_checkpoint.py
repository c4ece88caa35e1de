"""Checkpoint files: round trip, atomic writes and refusal of foreign or damaged files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pyro_physvae.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from pyro_physvae.files import atomic_write


def test_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    state = {"model_state": net.state_dict(), "epoch": 7, "history": [{"loss": 1.5}], "name": "x",
             "rng_state": torch.get_rng_state()}
    path = save_checkpoint(state, tmp_path / "deep" / "dir" / "run.pt")
    assert path.is_file()
    back = load_checkpoint(path)
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
    assert load_checkpoint(path)["epoch"] == 2


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    save_checkpoint({"epoch": 1}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.pt"):
        load_checkpoint(path)
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [{"epoch": 1}, torch.zeros(3), {"format_version": 999}])
def test_foreign_torch_file(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not a pyro-physvae checkpoint"):
        load_checkpoint(path)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1}, tmp_path / "c.pt")
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]
    assert load_checkpoint(path)["epoch"] == 1


class Custom:
    """An arbitrary class: weights_only loading must refuse to build it."""


def test_unsafe_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"format_version": FORMAT_VERSION, "obj": Custom()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path)


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
