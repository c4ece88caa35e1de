"""The readers of the reference implementation's data files (n-takeishi/phys-vae), as its
generators write them, and one clear error for every kind of bad file.

The writers below follow the reference's scripts: data/pendulum/generate.py and
data/advdif/generate.py (``json.dump(vars(args), sort_keys=True, indent=4)``, ``np.savetxt``
with ``fmt='%.9e'`` and ``header=...``, ``np.save``), data/locomotion/makedata.m (``save`` of
``data`` (N, 3, 101) and ``writetable(..., 'Delimiter', ' ')`` of the properties, with its
header line) and data/galaxy/makedata.py (``Galaxy10.h5`` in, ``data_all.npy`` out).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.io import savemat

from pyro_physvae.cli import main
from pyro_physvae.data.advdif import load_reference_npy
from pyro_physvae.data.galaxy import load_galaxy10
from pyro_physvae.data.io import load_dataset
from pyro_physvae.data.locomotion import read_split
from pyro_physvae.data.pendulum import load_reference_text

N, T = 4, 6  # pendulum and advdif sequences per split and time steps
N_GRIDS = 5
N_GAIT, T_GAIT = 3, 11
GALAXY_SIZE, GALAXY_EDGE_ON = 6, 510  # the CLI splits 400 + 100 + the rest

SHARED_GAIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomotion"


# -- writers, as the reference's scripts write ---------------------------------------------------
def write_pendulum(d: Path, split: str = "train", *, n: int = N, t: int = T, dt: float = 0.05
                   ) -> tuple[np.ndarray, np.ndarray]:
    """data/pendulum/generate.py's three files for ``split``."""
    rng = np.random.default_rng(0)
    args = {"dt": dt, "len_episode": t, "n_samples": n, "name": split, "noise_std": 0.01,
            "outdir": "./", "range_A": [0.0, 40.0], "range_f": [3.14, 6.28],
            "range_gamma": [0.0, 0.8], "range_init": [-1.57, 1.57], "range_omega": [0.785, 3.14],
            "seed": 1234}
    with open(d / f"args_{split}.json", "w") as f:
        json.dump(args, f, sort_keys=True, indent=4)
    x = rng.normal(size=(n, t))
    np.savetxt(d / f"data_{split}.txt", x, fmt="%.9e")
    truth = np.stack([rng.uniform(-1.57, 1.57, n), rng.uniform(0.785, 3.14, n),
                      rng.uniform(0, 0.8, n), rng.uniform(0, 40, n), rng.uniform(3.14, 6.28, n)], 1)
    np.savetxt(d / f"true_params_{split}.txt", truth, fmt="%.9e", header="init omega gamma A f")
    return x, truth


def write_advdif(d: Path, split: str = "train", *, n: int = N, dx: float = 0.1, dt: float = 0.02
                 ) -> tuple[np.ndarray, np.ndarray]:
    """data/advdif/generate.py's three files for ``split``."""
    rng = np.random.default_rng(1)
    args = {"dt": dt, "dx": dx, "len_episode": T, "n_grids": N_GRIDS, "n_samples": n, "name": split,
            "noise_std": 0.001, "outdir": "./", "range_ccoeff": [0.01, 0.1],
            "range_dcoeff": [0.01, 0.1], "range_init_mag": [0.5, 1.5], "seed": 1234}
    with open(d / f"args_{split}.json", "w") as f:
        json.dump(args, f, sort_keys=True, indent=4)
    x = rng.normal(size=(n, N_GRIDS, T))
    np.save(d / f"data_{split}.npy", x)
    truth = np.stack([rng.uniform(0.5, 1.5, n), rng.uniform(0.01, 0.1, n),
                      rng.uniform(0.01, 0.1, n)], 1)
    np.savetxt(d / f"true_params_{split}.txt", truth, fmt="%.9e", header="init_mag dcoeff ccoeff")
    return x, truth


def gait_props(n: int = N_GAIT) -> np.ndarray:
    rng = np.random.default_rng(2)
    return np.stack([np.arange(n) % 2, rng.uniform(0.4, 2, n), rng.uniform(0.8, 1.9, n),
                     rng.uniform(0.03, 0.18, n), rng.uniform(45, 160, n)], 1)


def matlab_number(v: float) -> str:
    """A number as MATLAB's writetable prints it (15 significant digits, integers bare)."""
    return f"{v:.15g}"


def write_locomotion(d: Path, split: str = "train", *, header: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """data/locomotion/makedata.m's files: ``data_<split>.mat`` and ``prop_<split>.txt``
    (``header=False``: the Octave port's ``dlmwrite``, no header line)."""
    x = np.random.default_rng(3).normal(size=(N_GAIT, 3, T_GAIT)) * 0.5
    savemat(d / f"data_{split}.mat", {"data": x})
    props = gait_props()
    lines = ["foot speed stride_length step_width cadence"] if header else []
    lines += [" ".join(matlab_number(v) for v in row) for row in props]
    (d / f"prop_{split}.txt").write_text("\n".join(lines) + "\n")
    return x, props


def write_galaxy10(d: Path) -> np.ndarray:
    """A small Galaxy10.h5 (uint8 images (N, S, S, 3), labels 'ans'); returns the images."""
    rng = np.random.default_rng(4)
    labels = np.array([6] * GALAXY_EDGE_ON + [1] * 20, dtype=np.uint8)
    images = rng.integers(0, 256, size=(labels.size, GALAXY_SIZE, GALAXY_SIZE, 3), dtype=np.uint8)
    with h5py.File(d / "Galaxy10.h5", "w") as f:
        f["images"] = images
        f["ans"] = labels
    return images


def write_galaxy_npy(d: Path) -> np.ndarray:
    """data/galaxy/makedata.py's output: the class-6 images, float32 (N, 3, S, S) in [0, 1]."""
    images = np.random.default_rng(5).integers(0, 256, (GALAXY_EDGE_ON, GALAXY_SIZE, GALAXY_SIZE, 3))
    data = np.transpose(images.astype(np.float32) / 255.0, (0, 3, 1, 2))
    np.save(d / "data_all.npy", data)
    return data


WRITERS: dict[str, Callable[[Path], object]] = {
    "pendulum": write_pendulum, "advdif": write_advdif, "locomotion": write_locomotion,
    "galaxy": write_galaxy10}


def read(system: str, src: Path, split: str = "train", **kwargs):
    """The Python reader of ``system`` on ``src``."""
    if system == "pendulum":
        return load_reference_text(src, split, **kwargs)
    if system == "advdif":
        return load_reference_npy(src, split, **kwargs)
    if system == "locomotion":
        return read_split(src, split, **kwargs)
    return load_galaxy10(src, **kwargs)[split]


def run_cli(src: Path, system: str, out: Path, *splits: str) -> int:
    return main(["import-reference", str(src), "--system", system, "--out", str(out),
                 "--splits", *(splits or ("train",))])


# -- round trips -------------------------------------------------------------------------------
def test_pendulum_files_as_the_generator_writes_them(tmp_path):
    x, truth = write_pendulum(tmp_path, "valid", dt=0.1)
    assert (tmp_path / "true_params_valid.txt").read_text().startswith("# init omega gamma A f\n")
    ds = load_reference_text(tmp_path, "valid")
    np.testing.assert_allclose(ds["x"].values, x.astype(np.float32))
    for j, name in enumerate(("init", "omega", "damping", "forcing_amplitude", "forcing_frequency")):
        np.testing.assert_allclose(ds[name].values, truth[:, j], rtol=1e-8)
    assert ds.attrs["dt"] == 0.1  # from args_valid.json
    assert load_reference_text(tmp_path, "valid", dt=0.05).attrs["dt"] == 0.05  # given: wins


def test_pendulum_cli_round_trip(tmp_path):
    src, out = tmp_path / "ref", tmp_path / "nc"
    src.mkdir()
    for split in ("train", "valid", "test"):
        write_pendulum(src, split)
    x, truth = write_pendulum(src, "test", n=3)
    assert run_cli(src, "pendulum", out, "train", "valid", "test") == 0
    ds = load_dataset(out / "test.nc", system="pendulum")
    np.testing.assert_allclose(ds["x"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["forcing_frequency"].values, truth[:, 4], rtol=1e-8)


def test_pendulum_cli_takes_dt_from_the_args_file(tmp_path):
    src, out = tmp_path / "ref", tmp_path / "nc"
    src.mkdir()
    write_pendulum(src, "valid", dt=0.1)
    assert run_cli(src, "pendulum", out, "valid") == 0
    assert load_dataset(out / "valid.nc", system="pendulum").attrs["dt"] == 0.1


def test_cli_reads_every_split_before_writing_any(tmp_path, capsys):
    """A bad later split must not leave the earlier ones half replaced in --out."""
    src, out = tmp_path / "ref", tmp_path / "nc"
    src.mkdir()
    for split in ("train", "valid"):
        write_pendulum(src, split)
    assert run_cli(src, "pendulum", out, "train") == 0
    before = (out / "train.nc").read_bytes()
    write_pendulum(src, "train", n=5)  # a new train split, and a ragged valid one
    (src / "data_valid.txt").write_text("1 2 3\n4 5\n")
    assert run_cli(src, "pendulum", out, "train", "valid") != 0
    assert "data_valid.txt" in capsys.readouterr().err
    assert (out / "train.nc").read_bytes() == before
    assert not (out / "valid.nc").exists()


@pytest.mark.parametrize("variant", ["hash-space", "hash", "bare", "none", "our-names", "reordered",
                                     "extra-column", "tabs-crlf", "comments"])
def test_pendulum_parameter_file_variants(tmp_path, variant):
    x, truth = write_pendulum(tmp_path)
    names = "init omega gamma A f"
    table = truth
    if variant == "our-names":
        names = "init omega damping forcing_amplitude forcing_frequency"
    if variant == "reordered":
        names, table = "f A gamma omega init", truth[:, ::-1]
    if variant == "extra-column":
        names, table = "init omega gamma A f energy", np.column_stack([truth, np.ones(N)])
    header = {"hash": "#" + names, "bare": names, "none": None}.get(variant, "# " + names)
    body = [" ".join(f"{v:.9e}" for v in row) for row in table]
    if variant == "tabs-crlf":
        body = ["\t".join(f"{v:.6E}" for v in row) for row in table]
    lines = ([header] if header else []) + body
    if variant == "comments":
        lines = ["# written by hand", header, "", body[0] + "  # first", "# note", *body[1:]]
    sep = "\r\n" if variant == "tabs-crlf" else "\n"
    (tmp_path / "true_params_train.txt").write_text(sep.join(lines) + sep)
    ds = load_reference_text(tmp_path, "train")
    rtol = 1e-6 if variant == "tabs-crlf" else 1e-8
    np.testing.assert_allclose(ds["omega"].values, truth[:, 1], rtol=rtol)
    np.testing.assert_allclose(ds["forcing_frequency"].values, truth[:, 4], rtol=rtol)
    if variant == "extra-column":
        assert ds.attrs["ignored_columns"] == "energy"


def test_pendulum_data_without_companions_and_with_tabs(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 5))
    (tmp_path / "data_test.txt").write_text(
        "\n".join("\t".join(f"{v:.3e}" for v in row) for row in x) + "\n")
    ds = load_reference_text(tmp_path, "test")  # no args: dt 0.05; no truth: not required
    assert ds.attrs["dt"] == 0.05 and "omega" not in ds
    np.testing.assert_allclose(ds["x"].values, x, rtol=1e-3)


def test_advdif_files_as_the_generator_writes_them(tmp_path):
    x, truth = write_advdif(tmp_path, "valid", dx=0.15, dt=0.12)
    ds = load_reference_npy(tmp_path, "valid")
    assert ds.attrs["dx"] == 0.15 and ds.attrs["dt"] == 0.12
    np.testing.assert_allclose(ds["x"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["advection"].values, truth[:, 2], rtol=1e-8)
    # dx and dt given: the args file is then not needed.
    (tmp_path / "args_valid.json").unlink()
    ds = load_reference_npy(tmp_path, "valid", dx=0.1, dt=0.02)
    assert ds.attrs["dx"] == 0.1 and "diffusion" in ds


def test_advdif_cli_round_trip(tmp_path):
    src, out = tmp_path / "ref", tmp_path / "nc"
    src.mkdir()
    x, truth = write_advdif(src)
    assert run_cli(src, "advdif", out) == 0
    ds = load_dataset(out / "train.nc", system="advdif")
    assert ds["x"].dims == ("sequence", "space", "time") and ds.attrs["dx"] == 0.1
    np.testing.assert_allclose(ds["diffusion"].values, truth[:, 1], rtol=1e-8)


@pytest.mark.parametrize("header", [True, False], ids=["writetable", "dlmwrite"])
def test_locomotion_matlab_layout_as_makedata_writes_it(tmp_path, header):
    x, props = write_locomotion(tmp_path, "valid", header=header)
    ds = read_split(tmp_path, "valid", require_props=True)
    np.testing.assert_allclose(ds["x"].values, x.astype(np.float32))
    np.testing.assert_allclose(ds["stride"].values, props[:, 2])
    np.testing.assert_allclose(ds["cadence"].values, props[:, 4])
    assert ds["foot"].values.tolist() == [0.0, 1.0, 0.0]


def test_locomotion_cli_round_trip(tmp_path):
    src, out = tmp_path / "ref", tmp_path / "nc"
    src.mkdir()
    _, props = write_locomotion(src)
    assert run_cli(src, "locomotion", out) == 0
    np.testing.assert_allclose(load_dataset(out / "train.nc")["speed"].values, props[:, 1])


@pytest.mark.skipif(not SHARED_GAIT.is_dir(), reason="the real gait data are not here")
def test_the_real_gait_recordings(tmp_path):
    for split, n in (("train", 400), ("valid", 100)):
        ds = read_split(SHARED_GAIT, split, require_props=True)
        assert ds["x"].shape == (n, 3, 101)
        assert set(np.unique(ds["foot"].values)) <= {0.0, 1.0}
        assert 0.2 < float(ds["speed"].mean()) < 2.5
    assert run_cli(SHARED_GAIT, "locomotion", tmp_path, "valid") == 0
    assert load_dataset(tmp_path / "valid.nc")["x"].shape == (100, 3, 101)


def test_galaxy10_and_the_reference_npy(tmp_path):
    images = write_galaxy10(tmp_path)
    splits = load_galaxy10(tmp_path)  # the directory: Galaxy10.h5 found in it
    tr = splits["train"]
    i = int(tr["source_index"][0])
    np.testing.assert_allclose(tr["x"].values[0], images[i].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert {k: v.sizes["sequence"] for k, v in splits.items()} == {"train": 400, "valid": 100,
                                                                   "test": 10}
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    data = write_galaxy_npy(npy_dir)
    splits = load_galaxy10(npy_dir / "data_all.npy")
    te = splits["test"]
    np.testing.assert_array_equal(te["x"].values, data[te["source_index"].values])
    with pytest.raises(ValueError, match="class-6 images only"):
        load_galaxy10(npy_dir / "data_all.npy", class_label=2)
    with pytest.raises(ValueError, match=r"unknown split 'training' for .*data_all.npy") as info:
        splits["training"]
    assert isinstance(info.value, KeyError)


def test_galaxy_cli_round_trip(tmp_path):
    write_galaxy10(tmp_path)
    assert run_cli(tmp_path / "Galaxy10.h5", "galaxy", tmp_path / "nc", "valid") == 0
    assert load_dataset(tmp_path / "nc" / "valid.nc")["x"].shape == (100, 3, GALAXY_SIZE,
                                                                      GALAXY_SIZE)


# -- bad files ---------------------------------------------------------------------------------
def _rewrite(name: str, content: str | bytes) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return corrupt


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        raw = (d / name).read_bytes()
        (d / name).write_bytes(raw[:int(len(raw) * keep)])
    return corrupt


def _remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        args = json.loads((d / name).read_text())
        for key, value in changes.items():
            if value is _DROP:
                del args[key]
            else:
                args[key] = value
        (d / name).write_text(json.dumps(args))
    return corrupt


_DROP = object()


def _save(name: str, array: np.ndarray, **kwargs) -> Callable[[Path], None]:
    return lambda d: np.save(d / name, array, **kwargs)


def _savemat(name: str, content: dict) -> Callable[[Path], None]:
    return lambda d: savemat(d / name, content)


def _galaxy_h5(**arrays) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        with h5py.File(d / "Galaxy10.h5", "w") as f:
            for key, value in arrays.items():
                f[key] = value
    return corrupt


def _galaxy_npy(array: np.ndarray) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        (d / "Galaxy10.h5").unlink()
        np.save(d / "data_all.npy", array)
    return corrupt


def _chain(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        for step in steps:
            step(d)
    return corrupt


@dataclass(frozen=True)
class Bad:
    """A good set of ``system`` files, spoilt by ``corrupt``; the error must be ``error``,
    name ``file`` (in the source directory) and match ``problem``."""

    system: str
    corrupt: Callable[[Path], None]
    file: str
    problem: str
    error: type[Exception] = ValueError
    split: str = "train"


OBJECTS = np.array([{"a": 1}, None], dtype=object)
CELLS = np.empty(2, dtype=object)  # a MATLAB cell array
CELLS[0], CELLS[1] = np.ones(2), np.ones(3)
NAN_FIELDS = np.zeros((N, N_GRIDS, T))
NAN_FIELDS[1, 2, 3] = np.nan
NAN_GAIT = np.zeros((N_GAIT, 3, T_GAIT))
NAN_GAIT[2, 1, 0] = np.inf
GOOD_PROPS = "\n".join(" ".join(map(matlab_number, row)) for row in gait_props())

BAD = {
    # pendulum: data_<split>.txt
    "pendulum-no-data": Bad("pendulum", _remove("data_train.txt"), "data_train.txt", "not found",
                            FileNotFoundError),
    "pendulum-empty-data": Bad("pendulum", _rewrite("data_train.txt", ""), "data_train.txt",
                               r"empty \(0 bytes\)"),
    "pendulum-blank-data": Bad("pendulum", _rewrite("data_train.txt", "\n  \n"), "data_train.txt",
                               "holds no numbers"),
    "pendulum-word": Bad("pendulum", _rewrite("data_train.txt", "1 2 3 4 5 6\n1 2 x 4 5 6\n"),
                         "data_train.txt", "line 2 holds 'x'"),
    "pendulum-comma": Bad("pendulum", _rewrite("data_train.txt", "1,2,3,4,5,6\n"), "data_train.txt",
                          "line 1 holds '1,2,3,4,5,6'"),
    "pendulum-ragged": Bad("pendulum", _rewrite("data_train.txt", "1 2 3 4 5 6\n1 2 3 4 5\n"),
                           "data_train.txt", "rows of different length"),
    "pendulum-nan": Bad("pendulum", _rewrite("data_train.txt", "1 2 3 4 5 6\n" * 3 + "1 nan 3 4 5 6\n"),
                        "data_train.txt", "line 4 contains NaN or infinite"),
    "pendulum-inf": Bad("pendulum", _rewrite("data_train.txt", "1 2 3 4 5 -Inf\n" * 4),
                        "data_train.txt", "NaN or infinite"),
    "pendulum-binary": Bad("pendulum", _rewrite("data_train.txt", b"\x93NUMPY\xff\xfe\x00\x01"),
                           "data_train.txt", "not a text file"),
    "pendulum-float32": Bad("pendulum", _rewrite("data_train.txt", "1 2 3 4 5 6\n1 2 3 4 5 4e38\n"),
                            "data_train.txt", "exceed the float32 range"),
    "pendulum-one-column": Bad("pendulum", _rewrite("data_train.txt", "1\n2\n3\n4\n"),
                               "data_train.txt", "at least 2 time steps"),
    # pendulum: true_params_<split>.txt
    "pendulum-params-rows": Bad("pendulum", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N - 1, 5)), header="init omega gamma A f"),
        "true_params_train.txt", "expected 4 rows of 5 values .*data_train.txt.*got 3 rows"),
    "pendulum-params-columns": Bad("pendulum", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N, 4)), header="init omega gamma A f"),
        "true_params_train.txt", "expected 4 rows of 5 values.* got 4 rows of 4"),
    "pendulum-params-header": Bad("pendulum", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N, 5)), header="init omega xi A f"),
        "true_params_train.txt",
        "header must be 'init omega gamma A f', got 'init omega xi A f' .no column for gamma"),
    "pendulum-params-twice": Bad("pendulum", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N, 5)), header="init omega gamma damping f"),
        "true_params_train.txt", "names the column of 'damping' twice"),
    "pendulum-params-word": Bad("pendulum", _rewrite(
        "true_params_train.txt", "# init omega gamma A f\n1 2 3 4 five\n"),
        "true_params_train.txt", "line 2 holds 'five'"),
    "pendulum-params-nan": Bad("pendulum", lambda d: np.savetxt(
        d / "true_params_train.txt", np.full((N, 5), np.nan), header="init omega gamma A f"),
        "true_params_train.txt", "NaN or infinite"),
    "pendulum-params-missing": Bad("pendulum", _remove("true_params_train.txt"),
                                   "true_params_train.txt", "not found.*args_train.json",
                                   FileNotFoundError),
    # pendulum: args_<split>.json
    "pendulum-args-bad-json": Bad("pendulum", _rewrite("args_train.json", '{"dt": 0.05,'),
                                  "args_train.json", "not valid JSON"),
    "pendulum-args-empty": Bad("pendulum", _rewrite("args_train.json", ""), "args_train.json",
                               r"not valid JSON \(empty file\)"),
    "pendulum-args-list": Bad("pendulum", _rewrite("args_train.json", "[0.05]"), "args_train.json",
                              "got a JSON list"),
    "pendulum-args-dt-zero": Bad("pendulum", _edit_json("args_train.json", dt=0), "args_train.json",
                                 "'dt' must be a positive number, got 0"),
    "pendulum-args-dt-text": Bad("pendulum", _edit_json("args_train.json", dt="0.05"),
                                 "args_train.json", "'dt' must be a positive number, got '0.05'"),
    "pendulum-args-length": Bad("pendulum", _edit_json("args_train.json", len_episode=50),
                                "args_train.json", "'len_episode' is 50, but data_train.txt has "
                                "rows of 6"),
    "pendulum-split": Bad("pendulum", lambda d: None, "", "unknown split 'training'",
                          split="training"),
    # advdif: data_<split>.npy
    "advdif-no-data": Bad("advdif", _remove("data_train.npy"), "data_train.npy", "not found",
                          FileNotFoundError),
    "advdif-empty-npy": Bad("advdif", _rewrite("data_train.npy", b""), "data_train.npy",
                            r"empty \(0 bytes\)"),
    "advdif-truncated-npy": Bad("advdif", _truncate("data_train.npy", 0.6), "data_train.npy",
                                "truncated"),
    "advdif-truncated-header": Bad("advdif", _truncate("data_train.npy", 0.02), "data_train.npy",
                                   "cannot read"),
    "advdif-object-npy": Bad("advdif", _save("data_train.npy", OBJECTS, allow_pickle=True),
                             "data_train.npy", "Python objects"),
    "advdif-npz": Bad("advdif", lambda d: np.savez(d / "data_train.npy.npz", x=np.ones(3))
                      or (d / "data_train.npy.npz").replace(d / "data_train.npy"),
                      "data_train.npy", r"zip \(.npz\) archive"),
    "advdif-text-npy": Bad("advdif", _rewrite("data_train.npy", "1 2 3\n"), "data_train.npy",
                           "not a .npy file"),
    "advdif-complex": Bad("advdif", _save("data_train.npy", np.ones((N, N_GRIDS, T), complex)),
                          "data_train.npy", "complex numbers"),
    "advdif-strings": Bad("advdif", _save("data_train.npy", np.array([["a", "b"]])),
                          "data_train.npy", "dtype <U1"),
    "advdif-rank": Bad("advdif", _save("data_train.npy", np.ones((N, T))), "data_train.npy",
                       r"expected an array \(N, n_grid, T\), got shape \(4, 6\)"),
    "advdif-float32": Bad("advdif", _save("data_train.npy", np.full((N, N_GRIDS, T), -1e300)),
                          "data_train.npy", "values up to 1e[+]300 in magnitude exceed the float32"),
    "advdif-nan": Bad("advdif", _save("data_train.npy", NAN_FIELDS), "data_train.npy",
                      r"NaN or infinite values \(first bad sequences: \[1\]\)"),
    # advdif: args_<split>.json
    "advdif-no-args": Bad("advdif", _remove("args_train.json"), "args_train.json",
                          "not found: it holds the grid spacing", FileNotFoundError),
    "advdif-args-no-dx": Bad("advdif", _edit_json("args_train.json", dx=_DROP), "args_train.json",
                             "has no 'dx'"),
    "advdif-args-negative": Bad("advdif", _edit_json("args_train.json", dx=-0.1), "args_train.json",
                                "'dx' must be a positive number, got -0.1"),
    "advdif-args-nan": Bad("advdif", _rewrite("args_train.json", '{"dx": NaN, "dt": 0.02}'),
                           "args_train.json", "'dx' must be a positive number, got nan"),
    "advdif-args-bool": Bad("advdif", _edit_json("args_train.json", dt=True), "args_train.json",
                            "'dt' must be a positive number, got True"),
    "advdif-args-grid": Bad("advdif", _edit_json("args_train.json", n_grids=20), "args_train.json",
                            "'n_grids' is 20, but data_train.npy has grids of 5"),
    "advdif-args-binary": Bad("advdif", _rewrite("args_train.json", b"\xff\xfe\x00"),
                              "args_train.json", "not valid JSON"),
    # advdif: true_params_<split>.txt
    "advdif-params-missing": Bad("advdif", _remove("true_params_train.txt"), "true_params_train.txt",
                                 "not found", FileNotFoundError),
    "advdif-params-rows": Bad("advdif", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N + 2, 3)), header="init_mag dcoeff ccoeff"),
        "true_params_train.txt", "expected 4 rows of 3 values"),
    "advdif-params-header": Bad("advdif", lambda d: np.savetxt(
        d / "true_params_train.txt", np.ones((N, 3)), header="a b c"),
        "true_params_train.txt", "header must be 'init_mag dcoeff ccoeff', got 'a b c'"),
    "advdif-params-ragged": Bad("advdif", _rewrite(
        "true_params_train.txt", "# init_mag dcoeff ccoeff\n1 2 3\n1 2\n1 2 3\n1 2 3\n"),
        "true_params_train.txt", "line 3 has 2 values, line 2 has 3"),
    "advdif-split": Bad("advdif", lambda d: None, "", "unknown split 'Train'", split="Train"),
    # locomotion: data_<split>.mat (or <split>.npy)
    "locomotion-no-data": Bad("locomotion", _remove("data_train.mat"), "", "expected train.npy or "
                              "data_train.mat", FileNotFoundError),
    "locomotion-empty-mat": Bad("locomotion", _rewrite("data_train.mat", b""), "data_train.mat",
                                r"empty \(0 bytes\)"),
    "locomotion-truncated-mat": Bad("locomotion", _truncate("data_train.mat", 0.5), "data_train.mat",
                                    "cannot read .*expected a MATLAB file"),
    "locomotion-text-mat": Bad("locomotion", _rewrite("data_train.mat", "hello"), "data_train.mat",
                               "cannot read"),
    "locomotion-mat-key": Bad("locomotion", _savemat("data_train.mat", {"angles": np.ones((3, 3))}),
                              "data_train.mat", r"has no 'data' array \(variables: \['angles'\]\)"),
    "locomotion-mat-cell": Bad("locomotion", _savemat("data_train.mat", {"data": CELLS}),
                               "data_train.mat", "not real numbers"),
    "locomotion-truncated-v73": Bad("locomotion", _chain(
        _remove("data_train.mat"),
        lambda d: h5py.File(d / "data_train.mat", "w").create_dataset("data", data=np.ones((50, 3, 400)))
        .file.close(),
        _truncate("data_train.mat", 0.3)), "data_train.mat", "cannot read"),
    "locomotion-v73-group": Bad("locomotion", _chain(
        _remove("data_train.mat"),
        lambda d: h5py.File(d / "data_train.mat", "w").create_group("data").file.close()),
        "data_train.mat", "has a group 'data', not an array"),
    "locomotion-rank": Bad("locomotion", _savemat("data_train.mat", {"data": np.ones((N_GAIT, 5))}),
                           "data_train.mat", r"shape \(N, 3, T\), got \(3, 5\)"),
    "locomotion-nan": Bad("locomotion", _savemat("data_train.mat", {"data": NAN_GAIT}),
                          "data_train.mat", "NaN or infinite"),
    "locomotion-empty-npy": Bad("locomotion", _rewrite("train.npy", b""), "train.npy",
                                r"empty \(0 bytes\)"),
    "locomotion-object-npy": Bad("locomotion", _save("train.npy", OBJECTS, allow_pickle=True),
                                 "train.npy", "Python objects"),
    "locomotion-truncated-npy": Bad("locomotion", _chain(_save("train.npy", NAN_GAIT),
                                                         _truncate("train.npy", 0.7)),
                                    "train.npy", "truncated"),
    # locomotion: prop_<split>.txt / props_<split>.txt
    "locomotion-props-rows": Bad("locomotion", _rewrite("prop_train.txt", GOOD_PROPS.split("\n")[0]),
                                 "prop_train.txt", "must have 3 rows .*data_train.mat.*got 1"),
    "locomotion-props-word": Bad("locomotion", _rewrite("prop_train.txt", "foot speed x y z\n"
                                                        + GOOD_PROPS.replace("0 ", "R ", 1)),
                                 "prop_train.txt", "line 2 holds 'R'"),
    "locomotion-props-header": Bad("locomotion", _rewrite(
        "prop_train.txt", "# foot speed stride width cadence\n" + GOOD_PROPS),
        "prop_train.txt", "header must be 'foot speed stride_length step_width cadence'"),
    "locomotion-props-ragged": Bad("locomotion", _rewrite("prop_train.txt", GOOD_PROPS + " 7\n"),
                                   "prop_train.txt", "rows of different length"),
    "locomotion-props-foot": Bad("locomotion", _rewrite("prop_train.txt", GOOD_PROPS.replace(
        "0 ", "2 ", 1)), "prop_train.txt", "foot column must hold 0 .right. or 1 .left., row 1"),
    "locomotion-props-nan": Bad("locomotion", _rewrite("prop_train.txt", GOOD_PROPS.replace(
        "1 ", "NaN ", 1)), "prop_train.txt", "NaN or infinite"),
    "locomotion-props-both": Bad("locomotion", _rewrite("props_train.txt", GOOD_PROPS),
                                 "props_train.txt", "keep one properties file"),
    "locomotion-split": Bad("locomotion", lambda d: None, "", "unknown split 'all'", split="all"),
    # galaxy: Galaxy10.h5 (or the reference's data_all.npy)
    "galaxy-empty-h5": Bad("galaxy", _rewrite("Galaxy10.h5", b""), "Galaxy10.h5",
                           "cannot read .* as HDF5"),
    "galaxy-truncated-h5": Bad("galaxy", _truncate("Galaxy10.h5", 0.5), "Galaxy10.h5",
                               "cannot read .* as HDF5"),
    "galaxy-no-labels": Bad("galaxy", _galaxy_h5(images=np.zeros((3, 4, 4, 3), np.uint8)),
                            "Galaxy10.h5", r"lacks the keys \['ans'\]"),
    "galaxy-rank": Bad("galaxy", _galaxy_h5(images=np.zeros((3, 4, 4), np.uint8),
                                            ans=np.full(3, 6)),
                       "Galaxy10.h5", r"'images' must have shape \(N, S, S, 3\), got \(3, 4, 4\)"),
    "galaxy-group": Bad("galaxy", lambda d: h5py.File(d / "Galaxy10.h5", "w").create_group("images")
                        .file.create_dataset("ans", data=[6]).file.close(),
                        "Galaxy10.h5", "'images' is a group"),
    "galaxy-text-labels": Bad("galaxy", _galaxy_h5(images=np.zeros((2, 4, 4, 3), np.uint8),
                                                   ans=np.array([b"six", b"six"])),
                              "Galaxy10.h5", "integer class labels"),
    "galaxy-npy-rank": Bad("galaxy", _galaxy_npy(np.zeros((3, 4, 4), np.float32)), "data_all.npy",
                           r"shape \(N, 3, S, S\)"),
    "galaxy-npy-range": Bad("galaxy", _galaxy_npy(np.full((3, 3, 4, 4), 255.0, np.float32)),
                            "data_all.npy", r"must lie in \[0, 1\]"),
    "galaxy-npy-objects": Bad("galaxy", _chain(_remove("Galaxy10.h5"),
                                               _save("data_all.npy", OBJECTS, allow_pickle=True)),
                              "data_all.npy", "Python objects"),
    "galaxy-split": Bad("galaxy", lambda d: None, "Galaxy10.h5", "unknown split 'training'",
                        split="training"),
}


def _spoilt(tmp: Path, case: Bad) -> Path:
    src = tmp / "ref"
    src.mkdir()
    WRITERS[case.system](src)
    case.corrupt(src)
    return src


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_reader_names_the_file_and_the_problem(tmp_path, case):
    src = _spoilt(tmp_path, case)
    with pytest.raises(case.error) as info:
        read(case.system, src, case.split)
    message = str(info.value)
    assert "\n" not in message
    assert str(src / case.file) in message if case.file else str(src) in message
    assert re.search(case.problem, message), message


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_cli_reports_a_bad_file_without_a_traceback(tmp_path, case, capsys):
    src, out = _spoilt(tmp_path, case), tmp_path / "nc"
    out.mkdir()
    before = b"the previous conversion\n"
    (out / f"{case.split}.nc").write_bytes(before)
    source = src / "Galaxy10.h5" if case.system == "galaxy" and case.file == "Galaxy10.h5" else src
    try:
        code = run_cli(source, case.system, out, case.split)
    except SystemExit as e:  # argparse refusing a split name that is not a choice
        code = e.code
        assert case.split not in ("train", "valid", "test")
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err, err
    if "invalid choice" in err:  # the parser's usage line and its one-line error
        assert repr(case.split) in err.splitlines()[-1]
    else:
        assert err.count("\n") == 1 and case.file in err and re.search(case.problem, err), err
    assert (out / f"{case.split}.nc").read_bytes() == before


def test_missing_companions_when_required(tmp_path):
    x = np.zeros((2, 3, 5))
    np.save(tmp_path / "train.npy", x)
    assert "speed" not in read_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"no properties file for split 'train': expected "
                       r".*props_train.txt or prop_train.txt"):
        read_split(tmp_path, "train", require_props=True)
    write_pendulum(tmp_path)
    (tmp_path / "true_params_train.txt").unlink()
    ds = load_reference_text(tmp_path, "train", require_params=False)
    assert "omega" not in ds
    (tmp_path / "args_train.json").unlink()
    with pytest.raises(FileNotFoundError, match="true_params_train.txt"):
        load_reference_text(tmp_path, "train", require_params=True)
    np.save(tmp_path / "data_test.npy", np.zeros((2, 4, 3)))
    with pytest.raises(FileNotFoundError, match="true_params_test.txt"):
        load_reference_npy(tmp_path, "test", dx=0.1, dt=0.1, require_params=True)


def test_given_grid_must_be_positive(tmp_path):
    write_advdif(tmp_path)
    with pytest.raises(ValueError, match="'dx' must be a positive number, got 0"):
        load_reference_npy(tmp_path, "train", dx=0.0)
    write_pendulum(tmp_path)
    with pytest.raises(ValueError, match="'dt' must be a positive number, got -1"):
        load_reference_text(tmp_path, "train", dt=-1)


# -- properties over malformed content ---------------------------------------------------------
TOKENS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: f"{v:.6e}"),
    st.integers(-10, 10).map(str),
    st.sampled_from(["nan", "inf", "-Inf", "1e", "#", "# init omega gamma A f", "x", "1,2", "",
                     "init", "omega gamma A f", "\x00", "é"]),
)
ROWS = st.lists(st.lists(TOKENS, min_size=0, max_size=7), min_size=0, max_size=6)
SEPARATORS = st.sampled_from([" ", "\t", "  ", " \t"])


def _check_outcome(read_it: Callable[[], object], path: Path) -> None:
    try:
        ds = read_it()
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
    else:
        assert np.isfinite(ds["x"].values).all() and ds["x"].ndim == 2


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ROWS, sep=SEPARATORS, in_params=st.booleans())
def test_malformed_text_is_read_or_refused_naming_the_file(rows, sep, in_params):
    content = "\n".join(sep.join(row) for row in rows)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if in_params:
            np.savetxt(d / "data_train.txt", np.zeros((2, 5)))
            target = d / "true_params_train.txt"
        else:
            target = d / "data_train.txt"
        target.write_text(content, encoding="utf-8")
        _check_outcome(lambda: load_reference_text(d, "train"), target)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=200))
def test_random_bytes_are_read_or_refused_naming_the_file(content):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "data_train.txt").write_bytes(content)
        _check_outcome(lambda: load_reference_text(d, "train"), d / "data_train.txt")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                max_size=3))
def test_damaged_npy_is_read_or_refused_naming_the_file(cut, flips):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        np.save(d / "data_train.npy", np.ones((2, 3, 4)))
        raw = bytearray((d / "data_train.npy").read_bytes())
        for at, value in flips:
            if at < len(raw):
                raw[at] = value
        (d / "data_train.npy").write_bytes(bytes(raw[:cut]))
        try:
            ds = load_reference_npy(d, "train", dx=0.1, dt=0.1)
        except (ValueError, FileNotFoundError) as e:
            assert str(d / "data_train.npy") in str(e) and "\n" not in str(e), str(e)
        else:
            assert ds["x"].ndim == 3 and np.isfinite(ds["x"].values).all()
