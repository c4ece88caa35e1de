"""The Lotka-Volterra system of examples/lotka_volterra, written outside the package with the
public API only: its line budget and imports, its physics against the synthetic-data helper,
its hooks, its shapes under extra leading dimensions, and a tiny CLI run reloaded by the run
directory alone."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from pyro.infer import Predictive

from pyro_physvae.cli import main as cli
from pyro_physvae.data import ode_dataset
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import get_system, load_plugin, unregister_system

FOLDER = Path(__file__).resolve().parent.parent / "examples" / "lotka_volterra"
FILES = (FOLDER / "lotka_volterra_model.py", FOLDER / "lotka_volterra_guide.py")
GUIDE_FILE = FILES[1]


@pytest.fixture(scope="module")
def system():
    assert load_plugin(GUIDE_FILE) == ("lotka-volterra",)
    return get_system("lotka-volterra")


@pytest.fixture(scope="module")
def lv(system):
    """The model module, as the plugin imported it (by its file name)."""
    return sys.modules["lotka_volterra_model"]


def test_two_files_within_160_lines():
    lines = sum(len(f.read_text().splitlines()) for f in FILES)
    assert lines <= 160, f"model + guide have {lines} lines"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_public_names_only(path):
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyro_physvae"):
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            private += [node.module] if any(p.startswith("_") for p in node.module.split(".")) else []
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names if a.name.startswith("pyro_physvae")
                        and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            private.append(node.attr)
    assert not private, f"{path.name} uses private names {private}"


def test_physics_is_the_truth_without_self_limitation(lv):
    """The phys-only model from the true a, c and initial state follows data generated with
    K -> infinity (up to its RK4 step), and misses the truth with finite K by far more."""
    data = {}
    for label, k in (("no_limit", (1e12, 1e12)), ("truth", lv.TRUTH["K"])):
        data[label] = ode_dataset(lv.lotka_volterra, {**lv.TRUTH, "K": k}, lv.INITIAL, n_steps=50, dt=lv.DT,
                                  n_train=40, n_valid=1, n_test=1, seed=3, dims=("species", "time"))["train"]
    ds = data["no_limit"]
    model = lv.LotkaVolterraModel("phys-only")
    latents = {p: torch.as_tensor(ds[p].values, dtype=torch.float32) for p in ("a", "c")}
    init = torch.as_tensor(ds["initial_state"].values, dtype=torch.float32)
    curves = model.decode_sites(init, latents)
    x_no_limit = torch.as_tensor(data["no_limit"]["x"].values)
    x_truth = torch.as_tensor(data["truth"]["x"].values)
    assert curves["x_P"].shape == (40, 2, 50) and curves["x_P"].min() > 0
    assert (curves["x_P"] - x_no_limit).abs().max() < 1e-2
    assert (curves["x_P"] - x_truth).pow(2).mean() > 100 * (curves["x_P"] - x_no_limit).pow(2).mean()


@pytest.mark.parametrize("setting", SETTINGS)
def test_sites_broadcast_over_parallel_draws(system, setting):
    sizes = system.test_sizes
    ds = system.generate(seed=0, **sizes["data"])["test"]
    x = system.observations(ds)
    model, guide = system.build(setting, dict(sizes["model"], n_steps=x.shape[-1]), sizes["guide"])
    draws = Predictive(model, guide=guide, num_samples=3, parallel=True)(x)
    n, steps = x.shape[0], x.shape[-1]
    expected = {"nn-only": {"x_mean"}, "phys-only": {"x_P", "x_mean"}}.get(setting, {"x_P", "x_PA", "x_PB",
                                                                                      "x_mean"})
    assert expected <= set(draws) and not {"x_P", "x_PA", "x_PB"} - expected & set(draws)
    for name in expected | {"x"}:
        assert draws[name].shape == (3, n, 2, steps), name
    for name in ("a", "c"):
        if name in draws:
            assert draws[name].shape == (3, n)


def test_hooks_give_the_noise_free_truth(system):
    ds = system.generate(seed=1, n_train=4, n_valid=2, n_test=6)["test"]
    truth = system.true_observations(ds, 50)
    x = torch.as_tensor(ds["x"].values, dtype=torch.float64)
    assert truth.shape == x.shape == (6, 2, 50)
    noise = (x - truth).std().item()
    assert 0.01 < noise < 0.03  # the data's noise level, 0.02
    longer = system.true_observations(ds, 80)
    torch.testing.assert_close(longer[..., :50], truth)
    faster = system.counterfactual_truth(ds, "a", 1.5)
    assert faster.shape == truth.shape and (faster - truth).abs().max() > 0.1
    torch.testing.assert_close(system.counterfactual_truth(ds, "c", 1.0), truth)


def _options(flag: str, options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (flag, f"{k}={json.dumps(v)}")]


def test_tiny_cli_run_reloads_without_the_plugin(system, tmp_path, capsys):
    sizes = system.test_sizes
    data, run = tmp_path / "data", tmp_path / "run"
    counts = [a for k, v in sizes["data"].items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert cli(["--plugin", str(GUIDE_FILE), "generate", "--system", "lotka-volterra", "--out", str(data),
                *counts]) == 0
    options = _options("--model-option", sizes["model"]) + _options("--guide-option", sizes["guide"])
    assert cli(["--plugin", str(GUIDE_FILE), "train", "--system", "lotka-volterra", "--data", str(data),
                "--out", str(run), "--epochs", "2", "--batch-size", "16", "--quiet", *options]) == 0
    # A later process knows nothing of the plugin: forget it here too.
    unregister_system("lotka-volterra")
    sys.modules.pop("lotka_volterra_guide", None)
    assert cli(["evaluate", str(run), "--samples", "5"]) == 0
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert metrics["system"] == "lotka-volterra" and metrics["setting"] == "phys+nn+reg"
    assert metrics["n_sequences"] == sizes["data"]["n_test"]
    for name in ("a", "c"):
        assert 0 <= metrics[name]["mae"] < 2.0
    assert metrics["recon_mse"] < 1.0
