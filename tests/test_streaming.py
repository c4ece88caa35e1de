"""Data larger than memory: rows read from the file, streamed training, evaluation and
refinement give what the in-memory paths give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import SMALL_GUIDE, SMALL_MODEL

from pyro_physvae.autoguides import amortized_posterior, refine_amortized_guide
from pyro_physvae.cli import main
from pyro_physvae.data.io import SPLITS, load_dataset, save_dataset
from pyro_physvae.data.lazy import (
    LazyRows,
    in_memory,
    is_lazy,
    lazy_rows,
    open_lazy_dataset,
    row_chunks,
    write_rows_in_parts,
)
from pyro_physvae.evaluate import evaluate, load_run
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, train


def _dataset(n: int, seed: int = 0, start: int = 0) -> xr.Dataset:
    """``n`` rows of 2 x 5 observations numbered from ``start`` (row i holds i + ...), a
    truth per row and a time coordinate."""
    g = np.random.default_rng(seed)
    x = np.arange(start, start + n)[:, None, None] + g.random((n, 2, 5))
    return xr.Dataset({"x": (("sequence", "channel", "time"), x),
                       "omega": (("sequence",), np.arange(start, start + n) * 0.5)},
                      coords={"time": np.arange(5) * 0.1}, attrs={"system": "toy", "dt": 0.1})


@pytest.fixture
def toy_file(tmp_path) -> tuple[Path, xr.Dataset]:
    ds = _dataset(23)
    return save_dataset(ds, tmp_path / "toy.nc"), ds


# -- LazyRows ---------------------------------------------------------------------------------
def test_rows_read_from_the_file_are_those_of_the_tensor(toy_file):
    path, ds = toy_file
    full = torch.as_tensor(ds["x"].values, dtype=torch.float32)
    with LazyRows(path) as rows:
        assert rows.shape == full.shape and len(rows) == 23 and rows.dim() == 3
        assert rows.nbytes == full.numel() * 4
        assert torch.equal(rows[4], full[4]) and torch.equal(rows[-1], full[-1])
        assert torch.equal(rows[3:11], full[3:11]) and torch.equal(rows[:], full)
        empty = torch.tensor([], dtype=torch.long)
        for idx in (torch.tensor([9, 2, 2, 20, 0]), np.array([5, -1]), [7], empty):
            assert torch.equal(rows[idx], full[torch.as_tensor(idx, dtype=torch.long)]), idx
        assert torch.equal(torch.cat([c for _, c in rows.chunks(10)]), full)
        assert [start for start, _ in rows.chunks(10)] == [0, 10, 20]
        assert torch.equal(torch.cat(list(row_chunks(rows, 7))), torch.cat(list(row_chunks(full, 7))))
        assert torch.equal(in_memory(rows), full) and in_memory(full) is full


def test_bad_row_selections_are_refused(toy_file):
    path, _ = toy_file
    with LazyRows(path) as rows:
        with pytest.raises(IndexError, match="row 23 is out of range for 23 rows"):
            rows[23]
        with pytest.raises(IndexError, match="out of range"):
            rows[torch.tensor([0, 30])]
        with pytest.raises(IndexError, match="1-d integer indices"):
            rows[torch.tensor([0.5, 1.0])]
        with pytest.raises(TypeError, match="open file"):
            import pickle
            pickle.dumps(rows)
    with pytest.raises(ValueError, match="no observation variable 'y'"):
        LazyRows(path, variable="y")
    bad = path.with_name("bad.nc")
    bad.write_bytes(b"not a netCDF file")
    with pytest.raises(ValueError, match="cannot read .*bad.nc"):
        LazyRows(bad)


def test_a_lazy_data_set_holds_its_small_variables_and_leaves_x_in_the_file(toy_file):
    path, ds = toy_file
    lazy = open_lazy_dataset(path, system="toy")
    assert is_lazy(lazy) and not lazy["x"].variable._in_memory
    assert lazy["omega"].variable._in_memory and np.array_equal(lazy["omega"].values, ds["omega"].values)
    assert lazy.attrs["dt"] == 0.1 and lazy.encoding["source"] == str(path)
    assert torch.equal(lazy_rows(lazy)[2], torch.as_tensor(ds["x"].values[2], dtype=torch.float32))
    assert not is_lazy(load_dataset(path))
    with pytest.raises(ValueError, match="holds 'toy' data, expected 'pendulum'"):
        open_lazy_dataset(path, system="pendulum")
    with pytest.raises(ValueError, match="read into memory, not opened lazily"):
        lazy_rows(load_dataset(path))


def test_non_finite_values_are_found_by_the_scan_and_named_by_rows(tmp_path):
    ds = _dataset(2500)
    ds["x"].values[1234, 1, 3] = np.nan
    path = save_dataset(ds, tmp_path / "nan.nc")
    with pytest.raises(ValueError, match=r"nan.nc.*in rows 1024-1279"):
        open_lazy_dataset(path)


# -- writing a data set part by part ----------------------------------------------------------
def test_parts_written_one_at_a_time_make_the_concatenated_data_set(tmp_path):
    parts = [_dataset(7, seed=1), _dataset(5, seed=2, start=7), _dataset(9, seed=3, start=12)]
    path = write_rows_in_parts(tmp_path / "big.nc", iter(parts), n_rows=21, chunk_rows=4)
    written = load_dataset(path)
    expected = xr.concat(parts, dim="sequence")
    np.testing.assert_array_equal(written["x"].values, expected["x"].values)
    np.testing.assert_array_equal(written["omega"].values, expected["omega"].values)
    np.testing.assert_array_equal(written["time"].values, parts[0]["time"].values)
    np.testing.assert_array_equal(written["sequence"].values, np.arange(21))
    assert written.attrs["system"] == "toy" and written.attrs["dt"] == 0.1
    with LazyRows(path) as rows:
        assert torch.equal(rows[torch.tensor([20, 0, 7])],
                           torch.as_tensor(expected["x"].values[[20, 0, 7]], dtype=torch.float32))


def test_parts_that_do_not_add_up_leave_no_file(tmp_path):
    target = tmp_path / "big.nc"
    with pytest.raises(ValueError, match="hold 12 rows along 'sequence', expected 13"):
        write_rows_in_parts(target, [_dataset(7), _dataset(5, start=7)], n_rows=13)
    with pytest.raises(ValueError, match="more than the 10 rows"):
        write_rows_in_parts(target, [_dataset(7), _dataset(5, start=7)], n_rows=10)
    extra = _dataset(5, start=7).assign(extra=(("sequence",), np.zeros(5)))
    with pytest.raises(ValueError, match="variable 'extra', which the first part lacks"):
        write_rows_in_parts(target, [_dataset(7), extra], n_rows=12)
    assert list(tmp_path.iterdir()) == []


# -- training ---------------------------------------------------------------------------------
def _train(data: Path, out: Path, **config) -> list[dict[str, float]]:
    return train("pendulum", "phys+nn+reg", data, out,
                 TrainConfig(**{"epochs": 3, "batch_size": 32, "seed": 0, **config}),
                 model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, progress=False)


def test_streamed_training_follows_the_in_memory_trajectory(tiny_data_dir, tmp_path):
    """Same minibatches, same draws: with the validation split in one chunk (batch 32 = all
    of it), reading the rows from the file changes nothing."""
    loaded = _train(tiny_data_dir, tmp_path / "loaded")
    streamed = _train(tiny_data_dir, tmp_path / "streamed", stream=True)
    for a, b in zip(loaded, streamed, strict=True):
        for key in ("loss", "val_loss", "val_mse"):
            assert a[key] == b[key], key
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["train_config"]["stream"] is True


def test_streamed_validation_in_chunks_estimates_the_same_loss(tiny_data_dir, tmp_path):
    """With batches of 8, the 32 validation sequences are scored in 4 chunks: a different
    draw of the same sum, so over epochs the losses stay close to the in-memory run's."""
    loaded = _train(tiny_data_dir, tmp_path / "loaded", batch_size=8, epochs=2)
    streamed = _train(tiny_data_dir, tmp_path / "streamed", batch_size=8, epochs=2, stream=True)
    assert loaded[0]["loss"] == streamed[0]["loss"]  # the first epoch's steps are the same
    for a, b in zip(loaded, streamed, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=0.5)
        assert b["val_mse"] == pytest.approx(a["val_mse"], rel=0.5)


def test_streaming_is_refused_where_it_cannot_work(tiny_data_dir, tmp_path):
    with pytest.raises(ValueError, match="needs the amortized guide"):
        TrainConfig(stream=True, guide="auto-normal")
    with pytest.raises(ValueError, match="stream must be True or False"):
        TrainConfig(stream="yes")
    from pyro_physvae.distributed import train_lightning

    with pytest.raises(ValueError, match="trains in one process only"):
        train_lightning("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "run",
                        TrainConfig(epochs=1, stream=True))


def test_a_run_resumes_with_or_without_streaming(tiny_data_dir, tmp_path):
    _train(tiny_data_dir, tmp_path / "run", epochs=1, stream=True)
    history = train("pendulum", "phys+nn+reg", tiny_data_dir, tmp_path / "run",
                    TrainConfig(epochs=2, batch_size=32, seed=0, stream=False),
                    model_kwargs=SMALL_MODEL, guide_kwargs=SMALL_GUIDE, progress=False, resume=True)
    assert len(history) == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resumes"][-1]["changed"] == {"epochs": [1, 2], "stream": [True, False]}


# -- evaluation and refinement ----------------------------------------------------------------
@pytest.fixture(scope="module")
def galaxy_run(tmp_path_factory) -> tuple[Path, Path]:
    """A galaxy run trained 2 epochs by streaming, and its data with a test split larger than
    the evaluation's chunks (12 images at 4 draws)."""
    system = get_system("galaxy")
    root = tmp_path_factory.mktemp("galaxy-stream")
    sizes = {**system.test_sizes["data"], "n_valid": 12, "n_test": 30}
    for split, ds in system.generate(seed=0, **sizes).items():
        save_dataset(ds, root / "data" / f"{split}.nc")
    train(system, "phys+nn+reg", root / "data", root / "run",
          TrainConfig(epochs=2, batch_size=8, stream=True),
          model_kwargs=system.test_sizes["model"], guide_kwargs=system.test_sizes["guide"], progress=False)
    return root / "data", root / "run"


def test_streamed_image_evaluation_gives_the_in_memory_metrics(galaxy_run, tmp_path):
    data, run = galaxy_run
    kwargs = {"num_samples": 6, "iwae_particles": 3}
    loaded = evaluate(run, data, out_dir=tmp_path / "loaded", **kwargs)
    streamed = evaluate(run, data, out_dir=tmp_path / "streamed", stream=True, **kwargs)
    assert loaded["n_sequences"] == streamed["n_sequences"] == 30
    for key in ("recon_mse", "physics_only_mse", "predictive_coverage90", "predictive_coverage90_raw",
                "iwae_log_likelihood"):
        assert streamed[key] == loaded[key], key
    drop = ("seconds",)  # the fit's wall time
    assert ({k: v for k, v in streamed["calibration_fit"].items() if k not in drop}
            == {k: v for k, v in loaded["calibration_fit"].items() if k not in drop})
    assert (tmp_path / "streamed" / "reconstructions.png").stat().st_size > 0


def test_refined_evaluation_of_more_images_than_a_chunk(galaxy_run, tmp_path):
    """A guide refined on all 30 images serves the chunks of 12 (it once drew 30 images'
    latents for a chunk); streamed, the refinement itself runs in chunks."""
    data, run = galaxy_run
    kwargs = {"num_samples": 4, "iwae_particles": 2, "refine_steps": 2}
    for stream in (False, True):
        metrics = evaluate(run, data, out_dir=tmp_path / str(stream), stream=stream, **kwargs)
        assert metrics["refine_steps"] == 2 and np.isfinite(metrics["recon_mse"])
        assert np.isfinite(metrics["iwae_log_likelihood"]["mean"])


def test_refinement_in_chunks_starts_every_row_at_its_encoder_posterior(galaxy_run):
    data, run_dir = galaxy_run
    run = load_run(run_dir)
    with LazyRows(data / "test.nc") as rows:
        start = amortized_posterior(run.guide, rows[:])
        refined = refine_amortized_guide(run.model, run.guide, rows, steps=1, lr=1e-12, chunk=7)
        for name, (mean, sd) in start.items():
            assert torch.allclose(getattr(refined.locs, name), mean, atol=1e-6), name
            assert torch.allclose(getattr(refined.scales, name), sd, rtol=1e-5), name
        idx = torch.tensor([29, 3])
        draws = refined(rows[idx], size=len(rows), subsample=idx)
        for name, value in draws.items():
            assert value.shape[0] == 2, name


def test_cli_streams_training_and_evaluation(galaxy_run, tmp_path, capsys):
    data, _ = galaxy_run
    system = get_system("galaxy")
    options = [f"--model-option={k}={json.dumps(v)}" for k, v in system.test_sizes["model"].items()]
    options += [f"--guide-option={k}={json.dumps(v)}" for k, v in system.test_sizes["guide"].items()]
    main(["train", "--system", "galaxy", "--data", str(data), "--out", str(tmp_path / "run"),
          "--epochs", "1", "--batch-size", "8", "--stream", "--quiet", *options])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]["stream"]
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "run"), "--stream", "--samples", "3"])
    assert json.loads(capsys.readouterr().out)["n_sequences"] == 30


def test_streamed_series_evaluation_gives_the_in_memory_metrics(tiny_data_dir, tmp_path):
    _train(tiny_data_dir, tmp_path / "run", epochs=1, stream=True)
    kwargs = {"num_samples": 5, "iwae_particles": 2}
    streamed = evaluate(tmp_path / "run", stream=True, out_dir=tmp_path / "a", **kwargs)
    loaded = evaluate(tmp_path / "run", out_dir=tmp_path / "b", **kwargs)
    for key in ("n_sequences", "recon_mse", "physics_only_mse", "physics_only_variance_explained",
                "predictive_coverage90", "predictive_coverage90_raw", "iwae_log_likelihood", "omega"):
        assert streamed[key] == loaded[key], key
    assert streamed["omega"]["calibrated"] and 0 <= streamed["omega"]["coverage90"] <= 1
    assert (tmp_path / "a" / "reconstructions.png").stat().st_size > 0


def test_streamed_diagnose_keeps_all_latent_draws_and_the_first_sequences_replicates(tiny_data_dir,
                                                                                    tmp_path):
    import arviz as az

    from pyro_physvae.evaluate import diagnose

    _train(tiny_data_dir, tmp_path / "run", epochs=1)
    kwargs = {"num_samples": 8, "iwae_particles": 2}
    full = diagnose(tmp_path / "run", out_dir=tmp_path / "full", **kwargs)
    streamed = diagnose(tmp_path / "run", out_dir=tmp_path / "streamed", stream=True,
                        predictive_sequences=3, **kwargs)
    n = full["n_sequences"]
    assert full["predictive_sequences"] == n and streamed["predictive_sequences"] == 3
    for key in ("recon_mse", "omega", "iwae_log_likelihood", "loo", "predictive_coverage90"):
        assert streamed[key] == full[key], key  # the same draws: only what is written differs
    whole = az.from_netcdf(tmp_path / "full" / "inference_data.nc")
    part = az.from_netcdf(tmp_path / "streamed" / "inference_data.nc")
    assert whole.posterior["x_mean"].sizes["sequence"] == n
    assert whole.posterior_predictive["x"].sizes["sequence"] == n
    assert whole.observed_data["x"].sizes["sequence"] == n
    assert part.posterior["omega"].sizes["sequence"] == part.log_likelihood["x"].sizes["sequence"] == n
    assert "x_mean" not in part.posterior
    for name in ("x", "x_mean", "x_P"):
        assert part.posterior_predictive[name].sizes["sequence"] == 3, name
    assert part.observed_data["x"].sizes["sequence"] == 3
    assert "first 3 of the" in part.posterior_predictive.attrs["predictive_sequences"]
    assert np.isfinite(az.loo(part).elpd_loo)


def test_diagnose_cli_streams_and_refuses_no_predictive_sequences(tiny_data_dir, tmp_path, capsys):
    _train(tiny_data_dir, tmp_path / "run", epochs=1)
    main(["diagnose", str(tmp_path / "run"), "--stream", "--samples", "4", "--iwae-particles", "2",
          "--predictive-sequences", "2"])
    assert '"predictive_sequences": 2' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["diagnose", str(tmp_path / "run"), "--predictive-sequences", "0"])
    assert "--predictive-sequences" in capsys.readouterr().err


def test_series_summaries_in_chunks_keep_latents_and_the_figure_draws(tiny_data_dir, tmp_path):
    from pyro_physvae.summaries import posterior_summaries

    system = get_system("pendulum")
    ds = system.load_split(tiny_data_dir, "test", lazy=True)
    _train(tiny_data_dir, tmp_path / "run", epochs=1)
    run = load_run(tmp_path / "run")
    x = system.observations(ds)
    n, t = x.shape
    summary = posterior_summaries(run.model, run.guide, x, 7, chunk=3, keep_means=0, keep_draws=4,
                                  channel_moments=True)
    assert summary["omega"].shape == summary["z_A1"].shape[:2] == (7, n)
    for key in ("mse", "mse_P", "predictive_coverage", "predictive_coverage_raw"):
        assert summary[key].shape == (n,), key
    assert summary["x_mean"].shape == (0, t)  # no posterior-mean curve is kept
    assert set(summary["draws"]) == {"x", "x_mean", "x_P"}
    assert all(v.shape == (7, 4, t) for v in summary["draws"].values())
    # The figure's draws are those the rows' errors come from.
    assert torch.allclose(summary["mse"][:4], (summary["draws"]["x_mean"].mean(0) - x[:4]).pow(2).mean(1))


def test_row_summaries_by_hand():
    """Nearest-rank 90% interval of 21 draws 0..20: [1, 19]; errors of the draws' mean."""
    from pyro_physvae.summaries import row_summaries

    replicates = torch.arange(21.0)[:, None, None].expand(21, 2, 4)
    x = torch.tensor([[0.0, 1.0, 19.0, 20.0], [5.0, 5.0, 5.0, 5.0]])
    draws = {"x": replicates, "x_mean": torch.full((21, 2, 4), 5.0), "x_P": torch.zeros(21, 2, 4)}
    out = row_summaries(x, draws, channel_axes=())
    assert out["predictive_coverage"].tolist() == [0.5, 1.0] == out["predictive_coverage_raw"].tolist()
    assert out["mse"].tolist() == [(25 + 16 + 196 + 225) / 4, 0.0]
    assert out["mse_P"].tolist() == [(1 + 361 + 400) / 4, 25.0]
    assert out["resid_ml"].shape == out["resid_plugin"].shape == (2, 1)


@pytest.mark.parametrize("shape", [(6, 9), (6, 3, 9), (5, 2, 3, 7)])
def test_variance_explained_from_row_moments_is_the_direct_one(shape):
    from pyro_physvae.evaluate import variance_explained
    from pyro_physvae.summaries import row_summaries, variance_explained_from_moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) + torch.arange(shape[-1]) * 0.3
    curve = x + 0.4 * torch.randn(shape, generator=g)
    draws = {"x": x[None], "x_mean": x[None], "x_P": curve[None]}
    moments = row_summaries(x, draws, channel_axes=(), channel_moments=True)
    assert variance_explained_from_moments(moments) == pytest.approx(variance_explained(x, curve), rel=1e-6)


def test_every_split_of_the_tiny_data_opens_lazily(tiny_data_dir):
    system = get_system("pendulum")
    for split in SPLITS:
        ds = system.load_split(tiny_data_dir, split, lazy=True)
        x = system.observations(ds)
        assert isinstance(x, LazyRows)
        assert torch.equal(x[:], system.observations(system.load_split(tiny_data_dir, split)))


_FREED = """
import os, sys
import numpy as np
from pyro_physvae.data.lazy import return_freed_memory
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = np.ones(16 << 20, dtype=np.uint8); del big  # glibc raises its mmap threshold to 16 MB
if sys.argv[1] == "fix": assert return_freed_memory()
blocks = [np.ones(4 << 20, dtype=np.uint8) for _ in range(3)]
before = rss(); del blocks
print((before - rss()) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the RSS from /proc")
def test_freed_chunks_go_back_to_the_system():
    """Three 4 MB blocks freed after glibc's threshold has grown: kept by the heap by default,
    returned at once after return_freed_memory (what --stream does)."""
    import subprocess
    import sys

    def freed(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", _FREED, mode], check=True,
                                    capture_output=True, text=True).stdout)

    assert freed("fix") >= 11.5
    assert freed("default") < 4


def test_image_summaries_keep_only_the_figure_images(galaxy_run):
    """With ``keep_means``, the summaries hold the posterior-mean images of the first images
    only, and per-image errors for all."""
    from pyro_physvae.summaries import posterior_summaries

    data, run_dir = galaxy_run
    run = load_run(run_dir)
    with LazyRows(data / "test.nc") as rows:
        summary = posterior_summaries(run.model, run.guide, rows, 4, keep_means=3)
    assert summary["x_mean"].shape == (3, *rows.shape[1:])
    assert summary["mse"].shape == summary["predictive_coverage"].shape == (30,)


def test_evaluate_and_diagnose_hand_freed_chunks_back_without_stream(tiny_data_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """Chunked summaries free a chunk's draws after each chunk; the CLI has glibc return them
    (evaluating 8000 fields peaked at 2.7 GB without, 0.8 GB with) also when not streaming."""
    import pyro_physvae.cli as cli

    calls = []
    monkeypatch.setattr(cli, "return_freed_memory", lambda: calls.append(1) or True)
    _train(tiny_data_dir, tmp_path / "run", epochs=1)
    for command in ("evaluate", "diagnose"):
        main([command, str(tmp_path / "run"), "--samples", "4", "--iwae-particles", "1"])
        assert len(calls) == 1, command
        calls.clear()
    capsys.readouterr()
