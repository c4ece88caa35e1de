"""Every bad input to the physvae command gives one clear line on stderr and a nonzero exit,
never a traceback (unless --debug), and leaves existing run directories as they were."""

from __future__ import annotations

import collections.abc
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import xarray as xr

from pyro_physvae.arguments import check_keyword_arguments
from pyro_physvae.cli import main
from pyro_physvae.data.io import SPLITS, load_dataset, save_dataset, to_tensor
from pyro_physvae.systems import get_system
from pyro_physvae.train import read_history

SMALL = ["--model-option", "hidden_aux1=[8]", "--model-option", "hidden_aux2=[8]",
         "--guide-option", "hidden_feat=[8]", "--guide-option", "feat_dim=8",
         "--guide-option", "hidden_aux=[8]", "--guide-option", "hidden_unmixer=[8]",
         "--guide-option", "hidden_phys=[8]"]
TRAIN_FAST = ["--epochs", "1", "--batch-size", "32", "--quiet", "--threads", "1", *SMALL]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's too) and its stderr, checked to be free of
    tracebacks."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def error_line(err: str, command: str) -> str:
    """The one ``physvae <command>: error: ...`` line of ``err``."""
    lines = [line for line in err.splitlines() if line.startswith(f"physvae {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``directory`` with its size, mtime and digest."""
    found = {}
    for path in sorted(directory.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return found


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory) -> Path:
    """A pendulum run of one epoch on the tiny data (20 steps). Read-only for tests."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(out), *TRAIN_FAST]) == 0
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> dict[str, Path]:
    """Pendulum data of another length (30 steps) and advection-diffusion data."""
    root = tmp_path_factory.mktemp("other_data")
    sizes = ["--n-train", "8", "--n-valid", "8", "--n-test", "8"]
    assert main(["generate", "--out", str(root / "long"), *sizes, "--n-steps", "30"]) == 0
    assert main(["generate", "--system", "advdif", "--out", str(root / "advdif"), *sizes,
                 "--n-steps", "20"]) == 0
    return {"long": root / "long", "advdif": root / "advdif"}


# -- options, checked where they enter ------------------------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "inf", "argument --lr: expected a finite number, got 'inf'"),
    ("--lr", "0", "argument --lr: expected a positive number"),
    ("--alpha", "nan", "argument --alpha: expected a finite number, got 'nan'"),
    ("--beta", "-1", "argument --beta: expected a number >= 0"),
    ("--renyi-alpha", "inf", "argument --renyi-alpha: expected a finite number"),
    ("--renyi-alpha", "1", "argument --renyi-alpha: expected a number >= 0 other than 1"),
    ("--grad-scale", "inf", "argument --grad-scale: expected a finite number"),
    ("--rtol", "nan", "argument --rtol: expected a finite number"),
    ("--seed", "-1", "argument --seed: expected an integer from 0 to 4294967295"),
    ("--device", "gpu", "argument --device: expected cpu, cuda or cuda:N"),
    ("--lr-schedule", "linear", "argument --lr-schedule: invalid choice: 'linear'"),
    ("--lr-final-ratio", "0", "argument --lr-final-ratio: expected a number in (0, 1], got 0.0"),
    ("--lr-final-ratio", "2", "argument --lr-final-ratio: expected a number in (0, 1], got 2.0"),
])
def test_bad_option_values_are_refused_by_name(option, value, message, tmp_path, capsys) -> None:
    code, err = run_cli(["train", "--data", tmp_path, "--out", tmp_path / "r", option, value], capsys)
    assert code == 2
    assert message in err and "usage: physvae train" in err
    assert not (tmp_path / "r").exists()


def test_counterfactual_factors_must_be_finite(capsys) -> None:
    code, err = run_cli(["counterfactual", "run", "--factors", "1,inf"], capsys)
    assert code == 2 and "factors must be positive and finite, got '1,inf'" in err


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys) -> None:
    code, err = run_cli(["train", "--data", tmp_path, "--out", tmp_path, "--resume", "--overwrite"], capsys)
    assert code == 2 and "not allowed with argument --resume" in err


@pytest.mark.parametrize("option, message", [
    ("dim_z_aux1=abc", "--model-option dim_z_aux1: expected int >= 0, got 'abc'"),
    ("dim_z_aux1=true", "--model-option dim_z_aux1: expected int >= 0, got True"),
    ("dim_z_aux1=1.5", "--model-option dim_z_aux1: expected int >= 0, got 1.5"),
    ("dt=NaN", "--model-option dt: expected finite float, got nan"),
    ("aux1_state_inputs=velocity", "--model-option aux1_state_inputs: expected a list of str, "
                                   "got 'velocity'"),
    ("hidden_aux1=[16, \"a\"]", "--model-option hidden_aux1: expected a list of int"),
    ("time_input=1", "--model-option time_input: expected bool, got 1"),
    ("dim_z_aux=2", "PendulumModel has no argument(s) ['dim_z_aux']; it takes: activation, atol"),
])
def test_model_options_are_checked_against_the_constructor(option, message, tiny_data_dir, tmp_path,
                                                          capsys) -> None:
    out = tmp_path / "r"
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", out, "--epochs", "1",
                         "--model-option", option], capsys)
    assert code == 2
    assert message in error_line(err, "train")
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (["--guide-option", "feat_dim=[1]"], "--guide-option feat_dim: expected int >= 1, got [1]"),
    (["--guide-option", "nope=1"], "PendulumGuide has no argument(s) ['nope']; it takes: activation"),
    (["--guide", "auto-normal", "--guide-option", "feat_dim=8"],
     "--guide-option (--guide auto-normal): make_autoguide has no argument(s) ['feat_dim']; "
     "it takes: init_loc_fn, init_scale, rank"),
    (["--guide", "auto-normal", "--guide-option", "init_scale=\"big\""],
     "--guide-option (--guide auto-normal) init_scale: expected finite float, got 'big'"),
])
def test_guide_options_are_checked(options, message, tiny_data_dir, tmp_path, capsys) -> None:
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", tmp_path / "r", "--epochs", "1",
                         *options], capsys)
    assert code == 2 and message in error_line(err, "train")
    assert not (tmp_path / "r").exists()


class _Annotated:
    def __init__(self, setting: str, *, n: int = 1, scale: float = 1.0, flag: bool = False,
                 names: collections.abc.Sequence[str] = (), pair: tuple[int, int] = (1, 2),
                 period: float | str | None = None, mode: Literal["a", "b"] = "a",
                 ranges: collections.abc.Mapping[str, collections.abc.Sequence[float]] | None = None) -> None:
        pass


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 1, "scale": 2, "flag": True, "names": ["x"], "pair": [3, 4], "period": "window",
      "mode": "b", "ranges": {"a": [0.0, 1]}}, None),
    ({"n": np.int64(3), "scale": np.float32(0.5), "period": None, "names": ("x", "y")}, None),
    ({"n": True}, "_Annotated argument n: expected int, got True"),
    ({"scale": float("inf")}, "scale: expected finite float, got inf"),
    ({"flag": 0}, "flag: expected bool, got 0"),
    ({"names": "xy"}, "names: expected a list of str, got 'xy'"),
    ({"pair": [1]}, "pair: expected a list of 2 (int, int), got [1]"),
    ({"period": [1]}, "period: expected finite float or str or None, got [1]"),
    ({"mode": "c"}, "mode: expected one of 'a', 'b', got 'c'"),
    ({"ranges": {"a": ["x"]}}, "ranges: expected a mapping of str to a list of finite float or None"),
    ({"other": 1}, "_Annotated has no argument(s) ['other']; it takes: flag, mode, n, names, pair, "
                   "period, ranges, scale"),
])
def test_check_keyword_arguments_in_python(kwargs, message) -> None:
    if message is None:
        check_keyword_arguments(_Annotated, kwargs, bound=("setting",))
        return
    with pytest.raises(ValueError) as e:
        check_keyword_arguments(_Annotated, kwargs, bound=("setting",))
    assert message in str(e.value)


def test_system_build_checks_types() -> None:
    with pytest.raises(ValueError, match="PendulumModel argument dim_z_aux1: expected int >= 0, got '2'"):
        get_system("pendulum").build("phys+nn+reg", {"dim_z_aux1": "2"})


# -- output directories ---------------------------------------------------------------------
def _writing_commands(run: Path, data: Path, out: Path) -> dict[str, list]:
    return {
        "train": ["train", "--data", data, "--out", out, "--epochs", "1"],
        "evaluate": ["evaluate", run, "--out", out],
        "diagnose": ["diagnose", run, "--out", out],
        "nuts": ["nuts", run, "--out", out],
        "counterfactual": ["counterfactual", run, "--out", out],
        "extrapolate": ["extrapolate", run, "--out", out],
        "quickstart": ["quickstart", "--out", out],
        "generate": ["generate", "--out", out],
        "import-reference": ["import-reference", data, "--out", out],
        "import-galaxy10": ["import-galaxy10", data / "train.nc", "--out", out],
    }


@pytest.mark.parametrize("command", ["train", "evaluate", "diagnose", "nuts", "counterfactual",
                                     "extrapolate", "quickstart", "generate", "import-reference",
                                     "import-galaxy10"])
def test_out_that_is_a_file_is_refused(command, run_dir, tiny_data_dir, tmp_path, capsys) -> None:
    out = tmp_path / "a-file"
    out.write_text("keep me")
    before = snapshot(run_dir)
    code, err = run_cli(_writing_commands(run_dir, tiny_data_dir, out)[command], capsys)
    assert code == 2
    assert error_line(err, command).endswith(f"--out {out} is a file, expected a directory")
    assert out.read_text() == "keep me"
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "generate"])
def test_out_below_a_file_is_refused(command, run_dir, tiny_data_dir, tmp_path, capsys) -> None:
    parent = tmp_path / "a-file"
    parent.write_text("x")
    out = parent / "sub"
    code, err = run_cli(_writing_commands(run_dir, tiny_data_dir, out)[command], capsys)
    assert code == 2
    assert f"cannot create --out {out}: {parent} is a file, not a directory" in error_line(err, command)


def test_out_in_a_read_only_directory_is_refused(tiny_data_dir, tmp_path, capsys, monkeypatch) -> None:
    import pyro_physvae.cli as cli

    # os.access answers for the user; as root every directory is writable, so ask it to say no.
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    out = tmp_path / "new" / "run"
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", out, "--epochs", "1"], capsys)
    assert code == 2
    assert f"cannot write --out {out}: {tmp_path} is not writable" in error_line(err, "train")


# -- input directories ----------------------------------------------------------------------
def test_missing_or_wrong_directories(run_dir, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r"],
         f"data directory not found: {tmp_path / 'nowhere'}"),
        (["train", "--data", tmp_path / "file", "--out", tmp_path / "r"],
         f"data directory {tmp_path / 'file'} is a file, expected a directory"),
        (["train", "--data", tmp_path / "empty", "--out", tmp_path / "r"],
         f"data directory {tmp_path / 'empty'} has no train.nc"),
        (["evaluate", run_dir, "--data", tmp_path / "empty", "--out", tmp_path / "e"],
         f"--data directory {tmp_path / 'empty'} has no test.nc"),
        (["evaluate", tmp_path / "nowhere"], f"run directory not found: {tmp_path / 'nowhere'}"),
        (["evaluate", tmp_path / "file"], f"run directory {tmp_path / 'file'} is a file"),
        (["import-reference", tmp_path / "nowhere", "--out", tmp_path / "i"],
         f"reference data not found: {tmp_path / 'nowhere'}"),
    ]
    for argv, message in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2 and message in error_line(err, argv[0]), (argv, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


# -- data sets, checked where they enter ----------------------------------------------------
def _drop_dt(ds):
    del ds.attrs["dt"]
    return ds


def _with_x(values):
    return lambda ds: ds.assign(x=(ds["x"].dims, values(ds["x"].values)))


def _set_attr(name, value):
    def edit(ds):
        ds.attrs[name] = value
        return ds
    return edit


def _overflow(ds):
    x = ds["x"].values.astype(np.float64)
    x[1, 2] = 1e39
    return ds.assign(x=(ds["x"].dims, x))


def _time_back(ds):
    t = ds["time"].values.copy()
    t[3] = t[2]
    return ds.assign_coords(time=t)


BAD_DATA = {
    "no dt": (_drop_dt, "{train} lacks the attribute 'dt' (the time step)"),
    "dt nan": (_set_attr("dt", float("nan")), "the attribute 'dt' (the time step) of {train} must be a "
                                               "finite positive number, got nan"),
    "dt negative": (_set_attr("dt", -0.05), "must be a finite positive number, got -0.05"),
    "dt text": (_set_attr("dt", "abc"), "the attribute 'dt' (the time step) of {train} must be a "
                                        "positive number, got 'abc'"),
    "x strings": (_with_x(lambda x: x.astype("U5")), "'x' in {train} has dtype <U5, expected real numbers"),
    "x bool": (_with_x(lambda x: x > 0), "'x' in {train} has dtype bool, expected real numbers"),
    "x complex": (_with_x(lambda x: x.astype(np.complex64)), "has dtype complex64, expected real numbers"),
    "x overflows float32": (_overflow, "values in 'x' of {train} overflow float32 (largest |x| = 1e+39)"),
    "x nan": (_with_x(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x)),
              "'x' in {train} contains NaN or infinite values (first bad sequences: [0])"),
    "no sequences": (lambda ds: ds.isel(sequence=slice(0, 0)), "'x' in {train} has no sequences"),
    "no time steps": (lambda ds: ds.isel(time=slice(0, 0)), "'x' in {train} has no time steps"),
    "rank": (lambda ds: ds.assign(x=ds["x"].expand_dims(component=2, axis=1).copy()),
             "'x' of {train} has the dimensions ('sequence', 'component', 'time'); pendulum data "
             "have (sequence, time)"),
    "no time dimension": (lambda ds: ds.rename({"time": "t"}),
                          "{train} has no dimension 'time' (its 'x' has ('sequence', 't'))"),
    "time not increasing": (_time_back, "the 'time' coordinate of {train} must be finite and strictly "
                                        "increasing; it is not at index 3"),
    "x missing": (lambda ds: ds.rename({"x": "y"}), "{train} has no observation variable 'x'"),
}


def _write_bad_data(tiny_data_dir: Path, directory: Path, edit) -> Path:
    directory.mkdir()
    for split in ("train", "valid"):
        ds = edit(xr.load_dataset(tiny_data_dir / f"{split}.nc", engine="h5netcdf"))
        ds.to_netcdf(directory / f"{split}.nc", engine="h5netcdf")
    return directory


@pytest.mark.parametrize("problem", list(BAD_DATA))
def test_bad_data_sets_are_refused_before_training(problem, tiny_data_dir, tmp_path, capsys) -> None:
    edit, message = BAD_DATA[problem]
    data = _write_bad_data(tiny_data_dir, tmp_path / "data", edit)
    out = tmp_path / "run"
    code, err = run_cli(["train", "--data", data, "--out", out, *TRAIN_FAST], capsys)
    assert code == 2
    assert message.format(train=data / "train.nc") in error_line(err, "train")
    assert not out.exists()


@pytest.mark.parametrize("content", ["empty", "truncated", "garbage"])
def test_unreadable_netcdf_files(content, tiny_data_dir, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    whole = (data / "train.nc").read_bytes()
    (data / "train.nc").write_bytes({"empty": b"", "truncated": whole[: len(whole) // 3],
                                     "garbage": b"not netCDF " * 50}[content])
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TRAIN_FAST], capsys)
    assert code == 2
    assert f"cannot read {data / 'train.nc'} as a netCDF data set" in error_line(err, "train")
    assert not (tmp_path / "run").exists()


def test_nan_true_parameters_are_kept(tiny_data_dir, tmp_path) -> None:
    """Per-sequence true parameters are only metrics: NaN there is no reason to refuse."""
    ds = xr.load_dataset(tiny_data_dir / "train.nc", engine="h5netcdf")
    ds["omega"][0] = np.nan
    save_dataset(ds, tmp_path / "train.nc")
    system = get_system("pendulum")
    loaded = system.load_split(tmp_path, "train")
    assert system.observations(loaded).shape == (64, 20)
    assert torch.isnan(to_tensor(loaded["omega"], name="omega")[0])
    assert system.model_kwargs_from_data(loaded) == {"n_steps": 20, "dt": pytest.approx(0.05)}


def test_data_sets_remember_their_file(tiny_data_dir) -> None:
    ds = load_dataset(tiny_data_dir / "train.nc")
    subset = ds.isel(sequence=slice(0, 2))
    del subset.attrs["dt"]
    with pytest.raises(ValueError, match=f"{tiny_data_dir / 'train.nc'} lacks the attribute 'dt'"):
        get_system("pendulum").model_kwargs_from_data(subset)


def test_overflow_is_checked_after_the_cast() -> None:
    x = np.zeros((2, 3))
    x[1, 1] = -4e38
    with pytest.raises(ValueError, match=r"values in x64 overflow float32 \(largest \|x\| = 4e\+38\)"):
        to_tensor(x, name="x64")
    x[1, 1] = 3e38  # within float32's range
    assert torch.isfinite(to_tensor(x)).all()


# -- the data of a run command must fit the trained model -----------------------------------
@pytest.mark.parametrize("command", ["evaluate", "diagnose", "nuts", "counterfactual", "extrapolate"])
@pytest.mark.parametrize("which, message", [
    ("long", "{data}/test.nc does not fit the pendulum model: the data have n_steps=30 "
             "(the model's: 20)"),
    ("advdif", "{data}/test.nc holds 'advdif' data, expected 'pendulum'"),
])
def test_run_commands_refuse_data_that_do_not_fit(command, which, message, run_dir, other_data,
                                                  capsys) -> None:
    before = snapshot(run_dir)
    data = other_data[which]
    code, err = run_cli([command, run_dir, "--data", data], capsys)
    assert code == 2
    assert message.format(data=data) in error_line(err, command)
    assert snapshot(run_dir) == before


# -- resuming from the command line ---------------------------------------------------------
def _train_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["train_config"]


def test_resume_keeps_the_options_not_given(tiny_data_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--lr", "0.002",
                 "--seed", "3", "--elbo", "trace", "--alpha", "0.5", *TRAIN_FAST]) == 0
    # Only --epochs and --lr given: everything else is the run's own (a seed of 0, the default
    # of a new run, would be refused as a change).
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--resume", "--epochs", "2",
                 "--lr", "0.001", "--quiet"]) == 0
    config = _train_config(run)
    assert (config["epochs"], config["lr"], config["seed"], config["elbo"], config["alpha"],
            config["batch_size"]) == (2, 0.001, 3, "trace", 0.5, 32)
    capsys.readouterr()
    before = snapshot(run)
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", run, "--resume", "--epochs", "3",
                         "--seed", "4", "--quiet"], capsys)
    assert code == 2 and "seed (run: 3, asked: 4)" in error_line(err, "train")
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", run, "--resume", "--epochs", "3",
                         "--model-option", "dim_z_aux1=abc"], capsys)
    assert code == 2 and "--model-option dim_z_aux1: expected int >= 0, got 'abc'" in err
    assert snapshot(run) == before


def test_cosine_schedule_from_the_command_line_is_kept_on_resume(tiny_data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    fast = [a if a != "1" else "2" for a in TRAIN_FAST]  # two epochs
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--lr-schedule", "cosine",
                 "--lr-final-ratio", "0.25", *fast]) == 0
    config = _train_config(run)
    assert (config["lr_schedule"], config["lr_final_ratio"]) == ("cosine", 0.25)
    assert [r["lr"] for r in read_history(run)] == pytest.approx([1e-3, 2.5e-4])
    # Resumed with more epochs and nothing else given: the same schedule, now over 3 epochs.
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--resume", "--epochs", "3",
                 "--quiet"]) == 0
    assert _train_config(run)["lr_schedule"] == "cosine"
    assert read_history(run)[-1]["lr"] == pytest.approx(2.5e-4)


def test_resume_needs_a_recorded_run(tiny_data_dir, tmp_path, capsys) -> None:
    for run in (tmp_path / "nowhere", tmp_path):
        code, err = run_cli(["train", "--data", tiny_data_dir, "--out", run, "--resume"], capsys)
        assert code == 2
        assert f"cannot resume: {run} has no readable config.json" in error_line(err, "train")
    (tmp_path / "config.json").write_text("{not json")
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", tmp_path, "--resume"], capsys)
    assert f"cannot resume: {tmp_path} has no readable config.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_fresh_run_needs_overwrite_to_replace_one(run_dir, tiny_data_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    code, err = run_cli(["train", "--data", tiny_data_dir, "--out", run, *TRAIN_FAST], capsys)
    assert code == 2 and "already holds a run" in error_line(err, "train")
    assert snapshot(run) == before
    assert main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--overwrite", "--seed", "5",
                 *TRAIN_FAST]) == 0
    assert _train_config(run)["seed"] == 5


# -- the error boundary ---------------------------------------------------------------------
def _failing_save(error: BaseException):
    def save(ds, path):
        raise error
    return save


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "cannot write {out}: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/train.nc"),
     "cannot write /mnt/ro/train.nc: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x.nc"),
     "cannot access /root/x.nc: Permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240"),
     "cannot write {out} (disk full or write error)"),
    (KeyError("dt"), "KeyError: 'dt' (run with --debug for the traceback)"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x30 and 20x8)\n  Trace Shapes:\n  x 8 30"),
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x30 and 20x8) "
     "(run with --debug for the traceback)"),
    (ZeroDivisionError(), "ZeroDivisionError (run with --debug for the traceback)"),
])
def test_unexpected_errors_become_one_line(error, message, tmp_path, capsys, monkeypatch) -> None:
    import pyro_physvae.data.io as io

    monkeypatch.setattr(io, "save_dataset", _failing_save(error))
    out = tmp_path / "data"
    code, err = run_cli(["generate", "--out", out, "--n-train", "4", "--n-valid", "4", "--n-test", "4",
                         "--n-steps", "5"], capsys)
    assert code == 2
    assert err.strip() == f"physvae generate: error: {message.format(out=out)}"


def test_interrupt_exits_130(tmp_path, capsys, monkeypatch) -> None:
    import pyro_physvae.data.io as io

    monkeypatch.setattr(io, "save_dataset", _failing_save(KeyboardInterrupt()))
    code, err = run_cli(["generate", "--out", tmp_path / "d", "--n-train", "4", "--n-valid", "4",
                         "--n-test", "4", "--n-steps", "5"], capsys)
    assert code == 130 and err.strip() == "physvae generate: interrupted"


def test_debug_prints_the_traceback(tmp_path) -> None:
    out = tmp_path / "a-file"
    out.write_text("x")
    argv = [sys.executable, "-m", "pyro_physvae.cli", "generate", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, env=env,
                           timeout=300)
    line = f"physvae generate: error: --out {out} is a file, expected a directory"
    assert plain.returncode == 2 and plain.stderr.strip() == line
    assert debug.returncode == 2
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "check_output_dir" in debug.stderr and debug.stderr.strip().endswith(line)


def test_debug_after_the_command(tmp_path, capsys) -> None:
    out = tmp_path / "a-file"
    out.write_text("x")
    assert main(["generate", "--debug", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ValueError: --out" in err
    assert main(["generate", "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_every_split_file_is_named(tiny_data_dir, tmp_path, capsys) -> None:
    """A damaged valid.nc (not only train.nc) is named."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    ds = xr.load_dataset(data / "valid.nc", engine="h5netcdf")
    ds.attrs["dt"] = 0.0
    ds.to_netcdf(data / "valid.nc", engine="h5netcdf")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "r", *TRAIN_FAST], capsys)
    assert code == 2
    assert f"of {data / 'valid.nc'} must be a finite positive number, got 0.0" in error_line(err, "train")
    assert set(SPLITS) == {p.stem for p in data.glob("*.nc")}
