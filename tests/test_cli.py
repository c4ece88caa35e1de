"""The physvae command end to end with tiny settings, and its errors on bad input."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pyro_physvae.checkpoint import load_checkpoint
from pyro_physvae.cli import main
from pyro_physvae.evaluate import load_run
from pyro_physvae.train import read_history

TINY = ["--n-train", "32", "--n-valid", "16", "--n-test", "16", "--n-steps", "20"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    assert main(["generate", "--out", str(out), "--seed", "3", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir: Path) -> Path:
    out = data_dir.parent / "run"
    code = main(["train", "--data", str(data_dir), "--out", str(out), "--epochs", "3",
                 "--batch-size", "16", "--quiet", "--threads", "1"])
    assert code == 0
    return out


def test_generate_writes_three_splits(data_dir: Path) -> None:
    assert sorted(p.name for p in data_dir.glob("*.nc")) == ["test.nc", "train.nc", "valid.nc"]


def test_train_writes_checkpoints_and_history(run_dir: Path) -> None:
    for name in ("best.pt", "last.pt", "config.json", "history.jsonl"):
        assert (run_dir / name).is_file(), name
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["setting"] == "phys+nn+reg"


def test_train_resume_continues(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--epochs", "5",
                 "--batch-size", "16", "--quiet", "--resume"]) == 0
    history = read_history(run)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]


def test_evaluate_writes_metrics_and_figures(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(run_dir), "--samples", "8", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_sequences"] == 16 and metrics["recon_mse"] > 0
    assert set(metrics["omega"]) >= {"mae", "corr", "coverage90"}
    iwae = metrics["iwae_log_likelihood"]
    assert iwae["stderr"] > 0 and np.isfinite(iwae["mean"]) and np.isfinite(iwae["median"])
    assert (out / "reconstructions.png").stat().st_size > 1000
    assert (out / "omega.png").stat().st_size > 1000
    assert '"recon_mse"' in capsys.readouterr().out


def test_counterfactual(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cf"
    assert main(["counterfactual", str(run_dir), "--factors", "0.5,3", "--sequences", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "counterfactual.json").read_text())
    assert [r["factor"] for r in report["results"]] == [0.5, 3.0]
    assert all(np.isfinite(r["mse"]) for r in report["results"])


def test_import_text(tmp_path: Path) -> None:
    src = tmp_path / "ref"
    src.mkdir()
    x = np.random.default_rng(0).normal(size=(4, 20)) * 0.1
    np.savetxt(src / "data_train.txt", x)
    params = np.column_stack([x[:, 0], np.full(4, 1.5), np.zeros(4), np.zeros(4), np.full(4, 4.0)])
    np.savetxt(src / "true_params_train.txt", params, header="init omega gamma A f", comments="")
    assert main(["import-text", str(src), "--out", str(tmp_path / "nc"), "--splits", "train"]) == 0
    from pyro_physvae.data import load_dataset

    ds = load_dataset(tmp_path / "nc" / "train.nc")
    np.testing.assert_allclose(ds["x"].values, x, rtol=1e-6)
    np.testing.assert_allclose(ds["omega"].values, 1.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{missing}", "--out", "{tmp}/r", "--epochs", "1"], "data directory not found"),
        (["evaluate", "{tmp}/nowhere"], "run directory not found"),
        (["evaluate", "{corrupt}", "--data", "{bad}"], "is not a pyro-physvae checkpoint"),
        (["train", "--data", "{bad}", "--out", "{tmp}/r", "--epochs", "1"], "NaN"),
    ],
)
def test_bad_input_gives_clear_error(argv, message, tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "best.pt").write_bytes(b"not a checkpoint at all")
    bad = tmp_path / "bad"
    assert main(["generate", "--out", str(bad), *TINY]) == 0
    import xarray as xr

    ds = xr.load_dataset(bad / "train.nc")
    ds["x"][2, 5] = np.nan
    ds.to_netcdf(bad / "train.nc")
    fill = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "corrupt": str(corrupt),
            "bad": str(bad)}
    assert main([a.format(**fill) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_argument_errors_exit_nonzero(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "d", "--out", "o", "--setting", "physics-only"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["counterfactual", "run", "--factors", "1,-2"])


def test_quickstart_end_to_end(tmp_path: Path, monkeypatch) -> None:
    import pyro_physvae.cli as cli

    monkeypatch.setattr(cli, "QUICKSTART_SIZES", {"n_train": 40, "n_valid": 20, "n_test": 20})
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    report = (out / "REPORT.md").read_text()
    assert "omega MAE" in report and "counterfactual" in report.lower()
    # Calibrated and raw coverage side by side, with the sentence that says why raw is narrow.
    assert "omega 90% interval coverage, calibrated |" in report and "coverage, raw |" in report
    assert "Raw posterior intervals and the raw predictive are narrow because" in report
    assert "omega MAE, debiased by the bias measured on valid |" in report
    for fig in ("reconstructions.png", "omega.png", "counterfactual.png"):
        assert (out / "eval" / fig).is_file()


def test_evaluations_of_best_and_last_go_to_separate_folders(run_dir: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))
    for checkpoint, folder in (("best.pt", "eval-test"), ("last.pt", "eval-test-last")):
        assert main(["evaluate", str(run_dir), "--checkpoint", checkpoint, "--samples", "4",
                     "--calibrate-on", "none"]) == 0
        metrics = json.loads((run_dir / folder / "metrics.json").read_text())
        assert metrics["checkpoint_epoch"] == load_checkpoint(run_dir / checkpoint)["epoch"]
        assert "coverage90_raw" in metrics["omega"]


def test_example_script_runs(monkeypatch) -> None:
    path = Path(__file__).parents[1] / "examples" / "pendulum_svi.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--steps", "30", "--n", "64", "--batch", "32"])
    result = runpy.run_path(str(path), run_name="not_main")["main"]([
        "--steps", "30", "--n", "64", "--batch", "32"])
    assert result["last_loss"] < result["first_loss"]
    assert np.isfinite(result["omega_mae"])


def test_swap_inference_example_runs() -> None:
    path = Path(__file__).parents[1] / "examples" / "swap_inference.py"
    results = runpy.run_path(str(path), run_name="not_main")["main"](
        ["--n", "40", "--steps", "40", "--batch", "20"])
    assert len(results) == 3
    for name, r in results.items():
        assert r["last_loss"] < r["first_loss"], name
        assert np.isfinite(r["omega_mae"]) and np.isfinite(r["iwae"]), name
        assert 0.0 <= r["coverage90"] <= 1.0


def test_nuts_command(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nuts"
    main(["nuts", str(run_dir), "--sequences", "0,2", "--samples", "30", "--warmup", "30",
          "--chains", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "max R-hat" in printed and "omega" in printed
    assert {"nuts.nc", "summary.csv", "amortization_gap.csv", "amortization_gap.md"} <= \
        {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit):
        main(["nuts", str(run_dir), "--sequences", "0,x"])
    assert "comma-separated integers" in capsys.readouterr().err


ADVDIF_TINY = ["--system", "advdif", "--n-train", "24", "--n-valid", "8", "--n-test", "8",
               "--n-steps", "12"]


@pytest.fixture(scope="module")
def advdif_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("advdif_cli")
    data, run = root / "data", root / "run"
    assert main(["generate", "--out", str(data), *ADVDIF_TINY]) == 0
    assert main(["train", "--system", "advdif", "--data", str(data), "--out", str(run),
                 "--epochs", "2", "--batch-size", "12", "--quiet", "--threads", "1"]) == 0
    return data, run


def test_advdif_train_evaluate_extrapolate(advdif_run, tmp_path: Path, capsys) -> None:
    data, run = advdif_run
    config = json.loads((run / "config.json").read_text())
    assert config["system"] == "advdif" and config["model_kwargs"]["n_grid"] == 20
    # advdif's measured default: cosine decay over the run's epochs (here 2).
    assert config["train_config"]["lr_schedule"] == "cosine"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-5])
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--samples", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["diffusion"]) >= {"mae", "corr", "coverage90"}
    assert (out / "reconstructions.png").stat().st_size > 1000
    ext = tmp_path / "ext"
    assert main(["extrapolate", str(run), "--steps", "60", "--sequences", "4", "--samples", "2",
                 "--out", str(ext)]) == 0
    report = json.loads((ext / "extrapolation.json").read_text())
    assert report["n_steps"] == 60 and report["train_steps"] == 12
    assert set(report["horizons"]["x_mean"]) == {"50"}
    assert len(report["by_step"]["x_mean"]["mse"]) == 60
    assert (ext / "space_time.png").stat().st_size > 1000
    assert "step    50" in capsys.readouterr().out


def test_advdif_solver_options_and_extrapolation_errors(advdif_run, tmp_path: Path, capsys) -> None:
    data, run = advdif_run
    out = tmp_path / "run"
    assert main(["train", "--system", "advdif", "--setting", "phys-only", "--data", str(data),
                 "--out", str(out), "--epochs", "1", "--quiet", "--solver", "dopri5",
                 "--rtol", "1e-4", "--atol", "1e-5"]) == 0
    kwargs = json.loads((out / "config.json").read_text())["model_kwargs"]
    assert kwargs["method"] == "dopri5" and kwargs["rtol"] == 1e-4 and "substeps" not in kwargs
    with pytest.raises(SystemExit):
        main(["train", "--system", "advdif", "--data", str(data), "--out", str(tmp_path / "x"),
              "--rtol", "-1"])
    assert "expected a positive number" in capsys.readouterr().err


def test_train_model_options(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--epochs", "1", "--quiet",
                 "--model-option", 'aux1_state_inputs=["velocity"]',
                 "--model-option", "dim_z_aux1=2"]) == 0
    kwargs = json.loads((out / "config.json").read_text())["model_kwargs"]
    assert kwargs["aux1_state_inputs"] == ["velocity"] and kwargs["dim_z_aux1"] == 2
    run = load_run(out, "last.pt")
    assert run.model.aux1_state_inputs == ("velocity",) and run.model.dim_z_aux1 == 2
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "x"), "--epochs", "1",
                 "--quiet", "--model-option", "dim_z_aux=2"]) == 2
    assert "PendulumModel has no argument(s) ['dim_z_aux']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data_dir), "--out", str(tmp_path / "y"), "--model-option", "3"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_extrapolate_refuses_the_pendulum(run_dir: Path, capsys) -> None:
    assert main(["extrapolate", str(run_dir), "--steps", "30"]) == 2
    assert "no known truth to extrapolate against" in capsys.readouterr().err


def test_import_reference_advdif(tmp_path: Path) -> None:
    src = tmp_path / "ref"
    src.mkdir()
    x = np.random.default_rng(0).normal(size=(3, 20, 50))
    np.save(src / "data_train.npy", x)
    (src / "args_train.json").write_text(json.dumps({"dx": 0.1, "dt": 0.02}))
    np.savetxt(src / "true_params_train.txt", np.full((3, 3), 0.05), header="init_mag dcoeff ccoeff")
    out = tmp_path / "nc"
    assert main(["import-reference", str(src), "--system", "advdif", "--out", str(out),
                 "--splits", "train"]) == 0
    import xarray as xr

    with xr.open_dataset(out / "train.nc", engine="h5netcdf") as ds:
        assert ds["x"].dims == ("sequence", "space", "time") and ds["x"].shape == (3, 20, 50)
        assert float(ds["diffusion"][0]) == 0.05


def test_advdif_extrapolation_example(tmp_path: Path) -> None:
    path = Path(__file__).parents[1] / "examples" / "advdif_extrapolation.py"
    module = runpy.run_path(str(path))
    results = module["main"](["--epochs", "2", "--n", "16", "--steps", "60", "--sequences", "4",
                              "--out", str(tmp_path)])
    assert set(results) == {"phys+nn+reg", "nn-only"}
    assert results["nn-only"]["diffusion"] is None
    assert np.isfinite(results["phys+nn+reg"]["horizons"]["50"]["mse"])
    assert (tmp_path / "extrapolation_error.png").stat().st_size > 1000
