"""Fault injection through the command line, generated with hypothesis.

Three families of bad input: damaged data files, bad options, damaged checkpoints. For each
generated case the command must exit nonzero with one error line that names the problem (the
file, field or option), print no traceback, and leave the run directory as it was. A damaged
``last.pt`` under ``train --resume`` is the one case that may succeed: the run resumes from the
previous intact checkpoint and says so in a warning.

``PHYSVAE_FUZZ_EXAMPLES`` sets the number of cases per family (default 15);
``PHYSVAE_FUZZ_REPORT=path.json`` writes the counts of cases tried and of their outcomes
(``python benchmarks/fuzz.py`` runs a longer campaign that way).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import ALL_SYSTEMS, system_named
from hypothesis import HealthCheck, given, settings

from pyro_physvae.checkpoint import encode_checkpoint, load_checkpoint
from pyro_physvae.cli import main
from pyro_physvae.data.io import save_dataset

EXAMPLES = int(os.environ.get("PHYSVAE_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="PHYSVAE_FUZZ_REPORT" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
#: family -> outcome -> count, over the whole session.
COUNTS: dict[str, Counter] = defaultdict(Counter)
TRAIN = ["--epochs", "1", "--batch-size", "16", "--threads", "1", "--quiet",
         "--model-option", "hidden_aux1=[8]", "--model-option", "hidden_aux2=[8]",
         "--guide-option", "hidden_feat=[8]", "--guide-option", "feat_dim=8"]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("PHYSVAE_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in COUNTS.items()}, indent=2))


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``physvae argv`` in this process: its exit status and what it wrote to stderr, with
    the warnings it gave first (pytest would otherwise keep them from stderr)."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    shown = "".join(f"warning: {w.message}\n" for w in caught)
    return code, shown + err.getvalue()


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def check_clear_error(family: str, code: int, stderr: str, names: tuple[str, ...]) -> None:
    """Nonzero exit, no traceback, and a last line ``physvae ...: error: ...`` (or argparse's
    ``physvae ...: error: ...``) that mentions one of ``names``."""
    COUNTS[family]["tried"] += 1
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code != 0, f"exit 0 for a bad input; stderr: {stderr[-500:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert lines, "no message"
    last = lines[-1]
    assert last.startswith("physvae") and "error:" in last, last
    assert any(n.lower() in last.lower() for n in names), f"message names none of {names}: {last}"
    COUNTS[family]["clear error"] += 1


@pytest.fixture(scope="module")
def world(tiny_data_dir):
    """A data directory and a trained 2-epoch run on it, both copied for each case."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-world-"))
    data = root / "data"
    shutil.copytree(tiny_data_dir, data)
    run = root / "run"
    code, stderr = run_cli(["train", "--data", str(data), "--out", str(run), *TRAIN[:1], "2", *TRAIN[2:]])
    assert code == 0, stderr
    yield data, run
    shutil.rmtree(root, ignore_errors=True)


def fresh_copy(path: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="fuzz-")) / path.name
    shutil.copytree(path, target)
    return target


# -- damaged data files -------------------------------------------------------------------------
def _edit(path: Path, change: Callable[[xr.Dataset], xr.Dataset]) -> None:
    with xr.open_dataset(path, engine="h5netcdf") as f:
        ds = f.load()
    save_dataset(change(ds), path)


def _set_x(ds: xr.Dataset, values: np.ndarray, dims: tuple[str, ...] | None = None) -> xr.Dataset:
    ds = ds.drop_vars("x")
    ds["x"] = (dims or ("sequence", "time")), values
    return ds


def data_mutations(rng: np.random.Generator) -> dict[str, tuple[Callable[[Path], None], tuple[str, ...]]]:
    """Each mutation of one split file, with the words of which the message must hold one."""
    def nc(change):
        return lambda path: _edit(path, change)

    def put(value):
        def change(ds):
            x = ds["x"].values.astype(np.float64)
            x[rng.integers(x.shape[0]), rng.integers(x.shape[1])] = value
            return _set_x(ds, x)
        return change

    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, len(data)))])

    def noise(path: Path) -> None:
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        for i in rng.integers(0, len(data), 64):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))

    return {
        "no dt": (nc(lambda ds: _drop_attr(ds, "dt")), ("dt",)),
        "dt nan": (nc(lambda ds: ds.assign_attrs(dt=float("nan"))), ("dt",)),
        "dt negative": (nc(lambda ds: ds.assign_attrs(dt=-0.05)), ("dt",)),
        "dt text": (nc(lambda ds: ds.assign_attrs(dt="fast")), ("dt",)),
        "x strings": (nc(lambda ds: _set_x(ds, ds["x"].values.astype(str))), ("dtype", "number")),
        "x complex": (nc(lambda ds: _set_x(ds, ds["x"].values.astype(np.complex64))), ("dtype", "real")),
        "x bool": (nc(lambda ds: _set_x(ds, ds["x"].values > 0)), ("dtype", "bool")),
        "x nan": (nc(put(np.nan)), ("nan",)),
        "x inf": (nc(put(-np.inf)), ("infinite", "inf")),
        "x overflows float32": (nc(put(float(rng.choice([1e39, -3e40, 1e300])))), ("overflow", "float32")),
        "no sequences": (nc(lambda ds: ds.isel(sequence=slice(0, 0))), ("no sequences", "empty", "holds no")),
        "shorter": (nc(lambda ds: ds.isel(time=slice(0, int(rng.integers(1, 19))))),
                    ("time steps", "n_steps", "does not fit")),
        "extra axis": (nc(lambda ds: _set_x(ds, ds["x"].values[:, None, :], ("sequence", "channel", "time"))),
                       ("dimensions", "rank", "shape")),
        "x renamed": (nc(lambda ds: ds.rename_vars(x="theta")), ("'x'",)),
        "other system": (nc(lambda ds: ds.assign_attrs(system="advdif")), ("advdif", "system")),
        "truncated": (cut, ("cannot read",)),
        "random bytes": (noise, ("cannot read",)),
        "flipped bytes": (flip, ("cannot read", "nan", "infinite", "overflow", "dt", "'x'", "dtype")),
        "empty file": (lambda path: path.write_bytes(b""), ("cannot read",)),
        "missing": (lambda path: path.unlink(), ("not found", "no such", "does not exist", ".nc")),
        "a directory": (lambda path: (path.unlink(), path.mkdir()), ("cannot read", "not a file", ".nc")),
    }


def _drop_attr(ds: xr.Dataset, name: str) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k != name}
    return ds


MUTATIONS = sorted(data_mutations(np.random.default_rng(0)))


@FUZZ
@given(mutation=st.sampled_from(MUTATIONS), split=st.sampled_from(["train", "valid"]),
       resume=st.booleans(), seed=st.integers(0, 2**16))
def test_damaged_data_file(world, mutation, split, resume, seed):
    data, run = fresh_copy(world[0]), fresh_copy(world[1])
    change, names = data_mutations(np.random.default_rng(seed))[mutation]
    change(data / f"{split}.nc")
    out = run if resume else run.parent / "new-run"
    before = snapshot(out)
    code, stderr = run_cli(["train", "--data", str(data), "--out", str(out), *TRAIN[:1], "3", *TRAIN[2:],
                            *(["--resume"] if resume else [])])
    check_clear_error("data files", code, stderr, names)
    assert snapshot(out) == before
    if not resume:
        assert not out.exists(), "a failed fresh run created its directory"
    # The other commands read the data too; evaluate the intact run on the damaged split.
    if split == "valid" and mutation not in ("other system",):
        before = snapshot(run)
        code, stderr = run_cli(["evaluate", str(run), "--data", str(data), "--split", "valid",
                                "--samples", "2", "--out", str(run.parent / "eval")])
        check_clear_error("data files", code, stderr, names)
        assert snapshot(run) == before


# -- bad options --------------------------------------------------------------------------------
BAD_NUMBERS = ["inf", "-inf", "nan", "-1", "0", "abc", "1e999", "", "1,5", "0x10"]
OPTIONS = {
    "--lr": (BAD_NUMBERS, ("--lr",)),
    "--alpha": (["inf", "nan", "-1", "abc", "1e999"], ("--alpha",)),
    "--beta": (["inf", "nan", "-0.5", "x"], ("--beta",)),
    "--gamma": (["inf", "nan", "-2"], ("--gamma",)),
    "--epochs": (["0", "-3", "1.5", "abc", "inf", ""], ("--epochs",)),
    "--batch-size": (["0", "-1", "2.5", "many"], ("--batch-size",)),
    "--num-particles": (["0", "-1", "x"], ("--num-particles",)),
    "--renyi-alpha": (["inf", "nan", "-1"], ("--renyi-alpha",)),
    "--grad-scale": (["0", "-1", "inf", "nan"], ("--grad-scale",)),
    "--threads": (["0", "-2", "a"], ("--threads",)),
    "--checkpoint-every": (["0", "-1", "x"], ("--checkpoint-every",)),
    "--substeps": (["0", "-1", "1.5"], ("--substeps",)),
    "--rtol": (["0", "-1e-3", "nan", "inf"], ("--rtol",)),
    "--solver": (["eulerr", "RK4", "", "magic"], ("--solver",)),
    "--setting": (["physics", "nn", ""], ("--setting",)),
    "--system": (["spring", "pendulum2", "os:system", "no.such.module:thing"], ("spring", "pendulum2", "os",
                                                                                "no.such.module", "system")),
    "--elbo": (["iwae", ""], ("--elbo",)),
    "--guide": (["auto-magic", ""], ("--guide",)),
    "--device": (["tpu", "cuda:x", "gpu"], ("device", "cuda")),
}
MODEL_OPTIONS = [  # (KEY=VALUE, what the message must name)
    ("dim_z_aux1=abc", "dim_z_aux1"), ("dim_z_aux1=1.5", "dim_z_aux1"), ("dim_z_aux1=true", "dim_z_aux1"),
    ("dim_z_aux1=-1", "dim_z_aux1"), ("dim_z_aux1=[1]", "dim_z_aux1"), ("hidden_aux1=abc", "hidden_aux1"),
    ("hidden_aux1={\"a\": 1}", "hidden_aux1"), ("x_lnvar=nan", "x_lnvar"), ("x_lnvar=\"big\"", "x_lnvar"),
    ("no_such_option=1", "no_such_option"), ("method=\"sideways\"", "method"), ("dt=-1", "dt"),
    ("n_steps=0", "n_steps"), ("aux1_state_inputs=[\"mass\"]", "aux1_state_inputs"), ("1abc=2", "1abc"),
    ("=3", "KEY=VALUE"), ("justtext", "KEY=VALUE"),
]


@FUZZ
@given(option=st.sampled_from(sorted(OPTIONS)), data=st.data())
def test_bad_option(world, option, data):
    values, names = OPTIONS[option]
    value = data.draw(st.sampled_from(values))
    out = Path(tempfile.mkdtemp(prefix="fuzz-opt-")) / "run"
    code, stderr = run_cli(["train", "--data", str(world[0]), "--out", str(out), *TRAIN, option, value])
    check_clear_error("options", code, stderr, names)
    assert not out.exists()


@FUZZ
@given(entry=st.sampled_from(MODEL_OPTIONS), kind=st.sampled_from(["--model-option", "--guide-option"]))
def test_bad_constructor_option(world, entry, kind):
    text, name = entry
    if kind == "--guide-option" and name not in ("KEY=VALUE", "1abc", "no_such_option"):
        text, name = text.replace("dim_z_aux1", "feat_dim").replace("hidden_aux1", "hidden_feat"), \
            name.replace("dim_z_aux1", "feat_dim").replace("hidden_aux1", "hidden_feat")
        if name not in ("feat_dim", "hidden_feat"):
            return  # the model's other arguments are not the guide's
    out = Path(tempfile.mkdtemp(prefix="fuzz-opt-")) / "run"
    code, stderr = run_cli(["train", "--data", str(world[0]), "--out", str(out), *TRAIN, kind, text])
    check_clear_error("options", code, stderr, (name,))
    assert not out.exists()


@FUZZ
@given(where=st.sampled_from(["file", "inside a file", "read-only"]),
       command=st.sampled_from(["train", "evaluate", "generate"]))
def test_bad_output_path(world, where, command):
    root = Path(tempfile.mkdtemp(prefix="fuzz-out-"))
    (root / "f").write_text("keep me")
    out = {"file": root / "f", "inside a file": root / "f" / "sub", "read-only": root / "ro" / "run"}[where]
    if where == "read-only":
        (root / "ro").mkdir()
        os.chmod(root / "ro", 0o500)
        if os.access(root / "ro", os.W_OK):  # root ignores permissions
            os.chmod(root / "ro", 0o700)
            return
    argv = {"train": ["train", "--data", str(world[0]), "--out", str(out), *TRAIN],
            "evaluate": ["evaluate", str(world[1]), "--samples", "2", "--out", str(out)],
            "generate": ["generate", "--out", str(out), "--n-train", "4", "--n-valid", "2", "--n-test", "2"]}
    before = snapshot(world[1])
    code, stderr = run_cli(argv[command])
    check_clear_error("output paths", code, stderr, (str(root),))
    assert (root / "f").read_text() == "keep me"
    assert snapshot(world[1]) == before
    os.chmod(root, 0o700)


# -- damaged checkpoints ------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/physvae-fuzz-pwned",))


def checkpoint_mutations(rng: np.random.Generator):
    """Each mutation of a checkpoint file, with the words of which the message must hold one."""
    def reencode(change):
        def apply(path: Path) -> None:
            state = load_checkpoint(path)
            state.pop("format_version")
            change(state)
            path.write_bytes(encode_checkpoint(state))
        return apply

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        for i in rng.integers(0, len(data), int(rng.integers(1, 17))):
            data[i] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))

    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, len(data)))])

    def nan_weight(state):
        name = sorted(state["model_state"])[int(rng.integers(len(state["model_state"])))]
        if state["model_state"][name].is_floating_point():
            state["model_state"][name] = state["model_state"][name].clone().fill_(float("nan"))
        else:
            state["model_state"].pop(name)

    def reshape_weight(state):
        name = sorted(k for k, v in state["guide_state"].items() if v.dim() >= 1)[0]
        state["guide_state"][name] = torch.zeros(3, 3, 3)

    def evil(path: Path) -> None:
        buffer = io.BytesIO()
        torch.save({"format_version": 1, "model_state": _Evil()}, buffer,
                   pickle_protocol=pickle.HIGHEST_PROTOCOL)
        path.write_bytes(buffer.getvalue())

    return {
        "flipped bytes": (flip, ("damaged",)),
        "truncated": (cut, ("damaged", "not a pyro-physvae checkpoint", "header")),
        "random bytes": (lambda p: p.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),
                         ("not a pyro-physvae checkpoint",)),
        "empty": (lambda p: p.write_bytes(b""), ("not a pyro-physvae checkpoint",)),
        "no model_state": (reencode(lambda s: s.pop("model_state")), ("model_state",)),
        "no system": (reencode(lambda s: s.pop("system")), ("system",)),
        "nan weight": (reencode(nan_weight), ("nan", "lacks", "missing")),
        "wrong weight shape": (reencode(reshape_weight), ("size mismatch", "shape")),
        "unknown system": (reencode(lambda s: s.update(system="spring")), ("spring",)),
        "unknown setting": (reencode(lambda s: s.update(setting="physics")), ("physics", "setting")),
        "bad model kwargs": (reencode(lambda s: s["model_kwargs"].update(n_steps="many")), ("n_steps",)),
        "code in a pickle": (evil, ("damaged", "not a pyro-physvae checkpoint", "weights")),
        "missing": (lambda p: p.unlink(), ("not found",)),
    }


CHECKPOINT_MUTATIONS = sorted(checkpoint_mutations(np.random.default_rng(0)))


@FUZZ
@given(mutation=st.sampled_from(CHECKPOINT_MUTATIONS), seed=st.integers(0, 2**16),
       command=st.sampled_from(["evaluate", "diagnose", "nuts", "counterfactual"]))
def test_damaged_checkpoint_is_refused(world, mutation, seed, command):
    run = fresh_copy(world[1])
    change, names = checkpoint_mutations(np.random.default_rng(seed))[mutation]
    change(run / "best.pt")
    before = snapshot(run)
    extra = {"evaluate": ["--samples", "2"], "diagnose": ["--samples", "2", "--iwae-particles", "2"],
             "nuts": ["--samples", "2", "--warmup", "2", "--chains", "1", "--sequences", "0"],
             "counterfactual": ["--sequences", "2"]}[command]
    code, stderr = run_cli([command, str(run), *extra])
    check_clear_error("checkpoints", code, stderr, names)
    assert snapshot(run) == before
    assert not Path("/tmp/physvae-fuzz-pwned").exists()


@FUZZ
@given(mutation=st.sampled_from(CHECKPOINT_MUTATIONS), seed=st.integers(0, 2**16),
       which=st.sampled_from(["last.pt", "all"]))
def test_resume_from_damaged_checkpoints(world, mutation, seed, which):
    """A damaged last.pt resumes from last.prev.pt with a warning; with every checkpoint
    damaged, resume is refused and nothing changes."""
    run = fresh_copy(world[1])
    for name in ("last.pt",) if which == "last.pt" else ("last.pt", "last.prev.pt", "best.pt"):
        change, names = checkpoint_mutations(np.random.default_rng(seed))[mutation]
        change(run / name)
    before = snapshot(run)
    code, stderr = run_cli(["train", "--data", str(world[0]), "--out", str(run), "--resume", "--epochs", "3",
                            "--quiet"])
    if which == "last.pt" and code == 0:
        COUNTS["resume"]["tried"] += 1
        COUNTS["resume"]["resumed from an intact checkpoint"] += 1
        assert "Traceback" not in stderr
        assert mutation == "missing" or "Resuming from" in stderr, stderr
        assert load_checkpoint(run / "last.pt")["epoch"] == 3
        return
    damaged_only = ("flipped bytes", "truncated", "random bytes", "empty", "missing")
    assert which == "all" or mutation not in damaged_only, "a damaged last.pt must not stop a resume"
    check_clear_error("resume", code, stderr, (*names, "no intact checkpoint", "no checkpoint"))
    assert snapshot(run) == before


# -- bad observations through the Python API -----------------------------------------------------
@pytest.fixture(scope="module")
def pairs():
    """Each system's tiny phys+nn+reg model, guide and 4 valid observations."""
    out = {}
    for name in ALL_SYSTEMS:
        system = system_named(name)
        ds = system.generate(seed=0, **system.test_sizes["data"])["train"]
        kwargs = {**system.model_kwargs_from_data(ds), **system.test_sizes.get("model", {})}
        model, guide = system.build("phys+nn+reg", kwargs, system.test_sizes.get("guide", {}))
        out[name] = (model, guide, system.observations(ds)[:4])
    return out


def _bad_observations(x: torch.Tensor, kind: str, axis: int, position: int) -> object:
    """``x`` spoilt in one way; ``axis`` and ``position`` pick where."""
    axis = axis % x.dim()
    if kind == "numpy":
        return x.numpy()
    if kind == "list":
        return x.tolist()
    if kind in ("float64", "int64", "bool", "complex64"):
        return x.to(getattr(torch, kind))
    if kind == "shorter":
        return x.narrow(max(axis, 1), 0, x.shape[max(axis, 1)] - 1)
    if kind == "longer":
        return torch.cat([x, x.narrow(max(axis, 1), 0, 1)], max(axis, 1))
    if kind == "extra axis":
        return x.unsqueeze(axis)
    if kind == "missing axis":
        return x.select(axis, 0)
    if kind == "no rows":
        return x[:0]
    bad = x.clone().flatten()
    bad[position % bad.numel()] = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}[kind]
    return bad.reshape(x.shape)


@FUZZ
@given(system=st.sampled_from(ALL_SYSTEMS),
       kind=st.sampled_from(["numpy", "list", "float64", "int64", "bool", "complex64", "shorter", "longer",
                             "extra axis", "missing axis", "no rows", "nan", "inf", "-inf"]),
       entry=st.sampled_from(["svi.step", "Predictive", "model", "guide"]),
       axis=st.integers(0, 3), position=st.integers(0, 10**6))
def test_bad_observations_through_the_api(pairs, system, kind, entry, axis, position):
    import pyro
    from pyro.infer import SVI, Predictive, Trace_ELBO

    from pyro_physvae import PhysVAELoss

    model, guide, x = pairs[system]
    bad = _bad_observations(x, kind, axis, position)
    pyro.clear_param_store()
    before = {k: v.detach().clone() for k, v in (*model.state_dict().items(), *guide.state_dict().items())}
    COUNTS["python api"]["tried"] += 1
    with pytest.raises((ValueError, TypeError)) as error:
        if entry == "svi.step":
            SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), PhysVAELoss(Trace_ELBO())).step(bad)
        elif entry == "Predictive":
            Predictive(model, guide=guide, num_samples=2)(bad)
        else:
            (model if entry == "model" else guide)(bad)
    message = str(error.value).splitlines()[0]
    assert message.startswith(("x ", "x:", "'x'")) or " x " in message, message
    for k, v in (*model.state_dict().items(), *guide.state_dict().items()):
        assert torch.equal(v, before[k]), k
    COUNTS["python api"]["clear error"] += 1
