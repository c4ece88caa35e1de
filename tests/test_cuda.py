"""Every system on CUDA: training, evaluation, diagnosis, NUTS, counterfactuals, roll-outs and the
Lightning engine's ``accelerator="gpu"``, and the model's log-density of a fixed trace against the CPU.

Skipped where CUDA is not available. ``PHYSVAE_TEST_DEVICE=cpu`` runs the same checks on the CPU
(a dry run of this file's plumbing on a machine without a GPU; the CPU is then compared with itself).

Tolerances of the CPU/CUDA comparison of ``log p(x, z)`` (per sequence, a fixed trace: the trained
weights and one set of latents drawn from the guide on the CPU): float64 ``rtol=1e-8``, float32
``rtol=1e-4`` (``atol`` 1e-6 and 1e-2) with cuDNN's convolutions at full float32 precision (by
default they use TF32 on Ampere and later GPUs, whose 10-bit mantissa moves the galaxy model's
log-density by about 1e-3 relative).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import prune_subsample_sites

from pyro_physvae.checkpoint import load_checkpoint
from pyro_physvae.data.io import SPLITS, save_dataset
from pyro_physvae.devices import full_fp32
from pyro_physvae.evaluate import counterfactual, diagnose, evaluate, load_run
from pyro_physvae.extrapolation import extrapolate
from pyro_physvae.mcmc import log_joint, nuts_report
from pyro_physvae.systems import System, get_system
from pyro_physvae.train import TrainConfig, train

DEVICE = os.environ.get("PHYSVAE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device (PHYSVAE_TEST_DEVICE=cpu dry-runs it on the CPU)")

#: rtol, atol of the per-sequence log joint density, CPU against the device.
TOLERANCE = {torch.float64: (1e-8, 1e-6), torch.float32: (1e-4, 1e-2)}




def write_test_data(system: System, path: Path) -> Path:
    """The system's tiny generated splits, written to ``path``."""
    for split, ds in system.generate(seed=0, **system.test_sizes["data"]).items():
        if split in SPLITS:
            save_dataset(ds, path / f"{split}.nc")
    return path


@pytest.fixture(scope="module")
def data_dir(system: System, tmp_path_factory) -> Path:
    return write_test_data(system, tmp_path_factory.mktemp(f"data-{system.name}"))


def tiny_train(system: System, data_dir: Path, run_dir: Path, device: str = DEVICE, epochs: int = 2,
               resume: bool = False) -> list[dict[str, float]]:
    return train(system, "phys+nn+reg", data_dir, run_dir,
                 TrainConfig(device=device, epochs=epochs, batch_size=16, seed=0),
                 model_kwargs=system.test_sizes.get("model", {}),
                 guide_kwargs=system.test_sizes.get("guide", {}), resume=resume, progress=False)


@pytest.fixture(scope="module")
def run_dir(system: System, data_dir: Path, tmp_path_factory) -> Path:
    """A phys+nn+reg run trained for two epochs on the device."""
    path = tmp_path_factory.mktemp(f"run-{system.name}") / "run"
    tiny_train(system, data_dir, path)
    return path


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


# -- train, evaluate, diagnose -------------------------------------------------------------------
def test_train_on_device(system, run_dir):
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 2 and state["train_config"]["device"] == DEVICE
    assert all(finite(r["loss"]) and finite(r["val_loss"]) for r in state["history"])
    # On CUDA the GPU's generator is checkpointed too, so that a resume continues its draws.
    assert ("cuda_rng_state" in state) == DEVICE.startswith("cuda")
    run = load_run(run_dir, "last.pt", device=DEVICE)
    for module in (run.model, run.guide):
        tensors = (*module.parameters(), *module.buffers())
        assert {t.device.type for t in tensors} == {torch.device(DEVICE).type}


def test_evaluate_on_device(system, run_dir, tmp_path):
    metrics = evaluate(run_dir, split="test", num_samples=4, iwae_particles=4, guide_steps=5,
                       out_dir=tmp_path / "eval", device=DEVICE)
    assert metrics["system"] == system.name and finite(metrics["recon_mse"])
    assert finite(metrics["iwae_log_likelihood"]["mean"])
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_diagnose_on_device(system, run_dir, tmp_path):
    report = diagnose(run_dir, split="test", num_samples=8, iwae_particles=4, guide_steps=5,
                      out_dir=tmp_path / "diag", device=DEVICE)
    assert finite(report["recon_mse"]) and finite(report["iwae_log_likelihood"]["mean"])
    assert (tmp_path / "diag" / "inference_data.nc").is_file()


# -- the same density on both devices ------------------------------------------------------------
def fixed_trace_log_density(run_dir: Path, device: str, dtype: torch.dtype, seed: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x_k, z_k)`` per test sequence on ``device`` in ``dtype``, with the trained weights
    and latents ``z`` drawn once from the guide on the CPU (in float32, then cast), and the same
    on the CPU: ``(cpu, device)`` as float64 CPU tensors."""
    out = []
    for where in ("cpu", device):
        run = load_run(run_dir, "last.pt", device=where)
        ds = run.load("test")
        x = run.system.observations(ds, "cpu")
        if where == "cpu":
            pyro.set_rng_seed(seed)
            guide = run.guide_for(x, steps=5, seed=seed)
            with torch.no_grad():
                trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
            latents = {n: s["value"].detach() for n, s in trace.iter_stochastic_nodes()}
        model = run.model.to(dtype)
        with torch.no_grad(), full_fp32():
            lp = log_joint(model, x.to(where, dtype), {k: v.to(where, dtype) for k, v in latents.items()})
        out.append(lp.double().cpu())
    return out[0], out[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_log_density_agrees_with_cpu(system, run_dir, dtype):
    cpu, dev = fixed_trace_log_density(run_dir, DEVICE, dtype)
    assert torch.isfinite(cpu).all() and cpu.shape == dev.shape
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(dev, cpu, rtol=rtol, atol=atol)


# -- resume, Lightning, the other analyses (one system each) --------------------------------------
def test_resume_continues_the_device_random_stream(tmp_path):
    """Two epochs, or one and a resume for the second: the same history (the GPU's generator
    is restored from the checkpoint, not re-seeded)."""
    system = get_system("pendulum")
    data = write_test_data(system, tmp_path / "data")
    straight = tiny_train(system, data, tmp_path / "straight", epochs=2)
    tiny_train(system, data, tmp_path / "resumed", epochs=1)
    resumed = tiny_train(system, data, tmp_path / "resumed", epochs=2, resume=True)
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


def test_lightning_gpu_engine_matches_single_process(tmp_path):
    pytest.importorskip("lightning")
    from pyro_physvae.distributed import train_lightning

    system = get_system("pendulum")
    data = write_test_data(system, tmp_path / "data")
    single = tiny_train(system, data, tmp_path / "single", epochs=2)
    lit = train_lightning(system, "phys+nn+reg", data, tmp_path / "lightning",
                          TrainConfig(device=DEVICE, epochs=2, batch_size=16, seed=0),
                          accelerator="gpu" if DEVICE.startswith("cuda") else "cpu", devices=1,
                          model_kwargs=system.test_sizes.get("model", {}),
                          guide_kwargs=system.test_sizes.get("guide", {}), progress=False)
    for a, b in zip(single, lit, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert load_run(tmp_path / "lightning", "last.pt", device=DEVICE).model.t.device.type \
        == torch.device(DEVICE).type


def test_nuts_and_counterfactual_on_device(tmp_path):
    system = get_system("pendulum")
    data = write_test_data(system, tmp_path / "data")
    run = tmp_path / "run"
    tiny_train(system, data, run)
    report = nuts_report(run, sequences=(0,), num_samples=10, warmup_steps=10, num_chains=2,
                         max_tree_depth=3, amortized_draws=50, out_dir=tmp_path / "nuts", device=DEVICE)
    assert math.isfinite(report["max_r_hat"]) or math.isnan(report["max_r_hat"])
    assert (tmp_path / "nuts" / "nuts.nc").is_file()
    cf = counterfactual(run, factors=(0.5, 2.0), n_sequences=4, num_samples=4, out_dir=tmp_path / "cf",
                        device=DEVICE)
    assert all(finite(r["mse"]) for r in cf["results"])


def test_extrapolate_on_device(tmp_path):
    system = get_system("advdif")
    data = write_test_data(system, tmp_path / "data")
    run = tmp_path / "run"
    tiny_train(system, data, run)
    report = extrapolate(run, n_steps=30, n_sequences=4, num_samples=4, horizons=(10, 30),
                         out_dir=tmp_path / "ex", device=DEVICE)
    assert report["n_steps"] == 30 and set(report["horizons"]["x_mean"]) == {"10", "30"}
