"""Every system on a GPU: time per training epoch, evaluation and diagnosis, and agreement with the CPU.

    python benchmarks/gpu.py                       # CUDA, benchmark sizes (below), all five systems
    python benchmarks/gpu.py --device cpu --tiny   # the same script on the CPU at test sizes (dry run)
        [--systems pendulum advdif ...] [--epochs 5] [--warmup 1] [--out benchmarks/gpu_results]

For each system (the four built-in ones and the Lotka-Volterra plugin of ``examples/``), with
``phys+nn+reg`` and the reference networks:

* **training**: ``--warmup`` + ``--epochs`` epochs on ``--device`` at the benchmark size (the
  system's reference batch size; data sizes in ``SIZES``); seconds per epoch (training and
  validation) and per training pass, medians over the epochs after the warm-up;
* **evaluate** and **diagnose** of that run on ``--device`` (wall time; ``EVAL`` draws);
* **agreement with the CPU**, on a small comparison run (``COMPARE``: 64 training sequences,
  batch 32, 16 vectorised ELBO particles, 2 epochs, the same seed, reference networks) trained on
  both devices: the epoch losses within ``LOSS_RTOL`` (the devices draw from different random
  generators, so the losses differ by Monte Carlo noise, not by arithmetic), and the model's log
  joint density ``log p(x_k, z_k)`` of one fixed trace (the CPU run's weights, latents drawn from
  its guide on the CPU) on both devices: float64 within ``rtol 1e-8``, float32 within ``rtol 1e-4``
  with cuDNN convolutions in IEEE float32 (by default they use TF32 on Ampere and later GPUs).

Writes ``<out>/gpu_<device>[_tiny]_<date>.json`` and prints one summary line per system (also in
``<out>/gpu_<device>[_tiny]_<date>.txt``). The benchmark sizes are chosen to finish in a few minutes
on an H200-class GPU; ``--tiny`` takes each system's ``test_sizes`` (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from pyro_physvae.data.io import SPLITS, save_dataset
from pyro_physvae.devices import full_fp32
from pyro_physvae.evaluate import diagnose, evaluate, load_run
from pyro_physvae.mcmc import log_joint
from pyro_physvae.systems import SYSTEMS, System, get_system, load_plugin
from pyro_physvae.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
LOTKA_VOLTERRA = ROOT / "examples" / "lotka_volterra" / "lotka_volterra_guide.py"
ALL_SYSTEMS = (*SYSTEMS, "lotka-volterra")
#: Benchmark data sizes per system (the generators' other arguments at their defaults).
SIZES: dict[str, dict[str, int]] = {
    "pendulum": {"n_train": 1000, "n_valid": 200, "n_test": 200},
    "advdif": {"n_train": 1000, "n_valid": 200, "n_test": 200},
    "locomotion": {"n_train": 400, "n_valid": 100, "n_test": 100},
    "galaxy": {"n_train": 400, "n_valid": 64, "n_test": 32},
    "lotka-volterra": {"n_train": 1000, "n_valid": 200, "n_test": 200},
}
#: Posterior draws of the evaluation and the diagnosis (and IWAE particles).
EVAL = {"num_samples": 100, "iwae_particles": 50}
DIAGNOSE = {"num_samples": 100, "iwae_particles": 50}
#: The galaxy's diagnosis writes every draw of every pixel to inference_data.nc: fewer draws.
DIAGNOSE_GALAXY = {"num_samples": 40, "iwae_particles": 20}
#: The CPU/device comparison run.
COMPARE = {"n_train": 64, "n_valid": 16, "n_test": 8, "batch_size": 32, "num_particles": 16, "epochs": 2}
LOSS_RTOL = 0.1
DENSITY_TOL = {"float64": (1e-8, 1e-6), "float32": (1e-4, 1e-2)}  # rtol, atol


def system_named(name: str) -> System:
    if name == "lotka-volterra":
        load_plugin(LOTKA_VOLTERRA)
    return get_system(name)


def write_data(system: System, path: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    for split, ds in system.generate(seed=seed, **sizes).items():
        if split in SPLITS:
            save_dataset(ds, path / f"{split}.nc")
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(on: str, fn, *args, **kwargs) -> tuple[Any, float]:
    sync(on)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(on)
    return out, time.perf_counter() - t0


def attempt(on: str, fn, *args, **kwargs) -> dict[str, Any]:
    """``fn``'s wall time (``on`` a device, synchronised) and result, or the error it raised
    (the benchmark goes on)."""
    try:
        out, seconds = timed(on, fn, *args, **kwargs)
        return {"seconds": seconds, "result": out}
    except Exception as e:  # noqa: BLE001 - recorded, and the other systems still run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "traceback": traceback.format_exc(limit=4)}


def log_density(run_dir: Path, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """``log p(x_k, z_k)`` of the test sequences on the CPU and on ``device`` in ``dtype``: the
    run's weights, latents drawn once from its guide on the CPU."""
    values = []
    for where in ("cpu", device):
        run = load_run(run_dir, "last.pt", device=where)
        x = run.system.observations(run.load("test"), "cpu")
        if where == "cpu":
            pyro.set_rng_seed(seed)
            with torch.no_grad():
                trace = prune_subsample_sites(poutine.trace(run.guide_for(x, steps=20)).get_trace(x))
            latents = {n: s["value"].detach() for n, s in trace.iter_stochastic_nodes()}
        model = run.model.to(dtype)
        with torch.no_grad(), full_fp32():
            lp = log_joint(model, x.to(where, dtype), {k: v.to(where, dtype) for k, v in latents.items()})
        values.append(lp.double().cpu())
    cpu, dev = values
    rtol, atol = DENSITY_TOL[str(dtype).removeprefix("torch.")]
    diff = (dev - cpu).abs()
    rel = diff / cpu.abs().clamp_min(1e-30)
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
            "rtol": rtol, "atol": atol, "agree": bool(torch.allclose(dev, cpu, rtol=rtol, atol=atol)),
            "mean_log_density_cpu": float(cpu.mean())}


def compare_with_cpu(system: System, device: str, model_kwargs: dict, guide_kwargs: dict,
                     tmp: Path) -> dict[str, Any]:
    """The comparison run on the CPU and on ``device``: losses and the fixed-trace density."""
    sizes = {k: COMPARE[k] for k in ("n_train", "n_valid", "n_test")}
    data = write_data(system, tmp / "compare-data", sizes if not TINY else system.test_sizes["data"])
    histories = []
    for where, folder in (("cpu", "compare-cpu"), (device, "compare-device")):
        config = TrainConfig(device=where, epochs=COMPARE["epochs"], batch_size=COMPARE["batch_size"],
                             num_particles=COMPARE["num_particles"], seed=0)
        histories.append(train(system, "phys+nn+reg", data, tmp / folder, config,
                               model_kwargs=model_kwargs, guide_kwargs=guide_kwargs, progress=False))
    rows = []
    for a, b in zip(*histories, strict=True):
        rows.append({k: {"cpu": a[k], device: b[k], "rel_diff": abs(b[k] - a[k]) / max(abs(a[k]), 1e-30)}
                     for k in ("loss", "val_loss")})
    losses_agree = all(r[k]["rel_diff"] <= LOSS_RTOL for r in rows for k in r)
    return {"losses": rows, "loss_rtol": LOSS_RTOL, "losses_agree": losses_agree,
            "log_density": {name: log_density(tmp / "compare-cpu", device, dtype)
                            for name, dtype in (("float64", torch.float64), ("float32", torch.float32))}}


def bench_system(name: str, device: str, epochs: int, warmup: int, tmp: Path) -> dict[str, Any]:
    system = system_named(name)
    sizes = system.test_sizes["data"] if TINY else SIZES[name]
    model_kwargs = dict(system.test_sizes.get("model", {})) if TINY else {}
    guide_kwargs = dict(system.test_sizes.get("guide", {})) if TINY else {}
    batch_size = 16 if TINY else system.train_defaults["batch_size"]
    out: dict[str, Any] = {"system": name, "setting": "phys+nn+reg", "data_sizes": sizes,
                           "batch_size": batch_size, "networks": "test_sizes" if TINY else "reference"}
    t0 = time.perf_counter()
    data = write_data(system, tmp / "data", sizes)
    out["data_seconds"] = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = tmp / "run"
    config = TrainConfig(device=device, epochs=warmup + epochs, batch_size=batch_size, seed=0,
                         checkpoint_every=warmup + epochs)
    trained = attempt(device, train, system, "phys+nn+reg", data, run, config, model_kwargs=model_kwargs,
                      guide_kwargs=guide_kwargs, progress=False)
    if "error" in trained:
        out["train"] = trained
        return out
    history = trained.pop("result")[warmup:]
    out["train"] = {"epochs_timed": len(history), "warmup_epochs": warmup,
                    "seconds_total": trained["seconds"],
                    "seconds_per_epoch": statistics.median(r["time_epoch"] for r in history),
                    "seconds_per_training_pass": statistics.median(r["time_train"] for r in history),
                    "final_loss": history[-1]["loss"], "final_val_loss": history[-1]["val_loss"],
                    "finite": all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) for r in history)}
    extra = {} if not TINY else {"num_samples": 8, "iwae_particles": 4}
    ev = attempt(device, evaluate, run, split="test", out_dir=tmp / "eval", device=device,
                 guide_steps=20 if TINY else 1000, **{**EVAL, **extra})
    out["evaluate"] = {k: v for k, v in ev.items() if k != "result"}
    if "result" in ev:
        out["evaluate"]["recon_mse"] = ev["result"].get("recon_mse")
        out["evaluate"]["iwae_mean"] = ev["result"]["iwae_log_likelihood"]["mean"]
    diag_sizes = {**(DIAGNOSE_GALAXY if name == "galaxy" else DIAGNOSE), **extra}
    dg = attempt(device, diagnose, run, split="test", out_dir=tmp / "diagnose", device=device,
                 guide_steps=20 if TINY else 1000, **diag_sizes)
    out["diagnose"] = {k: v for k, v in dg.items() if k != "result"}
    if "result" in dg:
        out["diagnose"]["recon_mse"] = dg["result"].get("recon_mse")
        out["diagnose"]["num_samples"] = diag_sizes["num_samples"]
    if device.startswith("cuda"):
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    cmp = attempt(device, compare_with_cpu, system, device, model_kwargs, guide_kwargs, tmp)
    out["cpu_agreement"] = cmp.get("result", {k: v for k, v in cmp.items()})
    return out


def summary_line(r: dict[str, Any]) -> str:
    def part(key: str) -> str:
        entry = r.get(key, {})
        if "error" in entry:
            return f"{key} FAILED ({entry['error'][:80]})"
        return f"{key} {entry.get('seconds', 0):.1f} s"

    if "error" in r.get("train", {}):
        return f"{r['system']:>15}: train FAILED ({r['train']['error'][:100]})"
    t = r["train"]
    cmp = r.get("cpu_agreement", {})
    if "error" in cmp:
        agree = f"CPU comparison FAILED ({cmp['error'][:80]})"
    else:
        dens = cmp["log_density"]
        agree = (f"losses {'agree' if cmp['losses_agree'] else 'DIFFER'} (max rel "
                 f"{max(v['rel_diff'] for row in cmp['losses'] for v in row.values()):.2g}), log p "
                 + ", ".join(f"{k} {'ok' if v['agree'] else 'DIFFERS'} (rel {v['max_rel_diff']:.1g})"
                             for k, v in dens.items()))
    return (f"{r['system']:>15}: {t['seconds_per_epoch']:.3g} s/epoch "
            f"({t['seconds_per_training_pass']:.3g} s training) at batch {r['batch_size']}, "
            f"n_train {r['data_sizes']['n_train']}; "
            f"{part('evaluate')}, {part('diagnose')}; {agree}")


TINY = False


def main() -> None:
    global TINY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--systems", nargs="+", default=list(ALL_SYSTEMS), choices=ALL_SYSTEMS)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="epochs trained before the timed ones")
    p.add_argument("--tiny", action="store_true", help="the systems' test sizes (a dry run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results"))
    args = p.parse_args()
    TINY = args.tiny
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("CUDA is not available here; run with --device cpu (and --tiny for a dry run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{args.device.replace(':', '')}{'_tiny' if TINY else ''}_{date.today().isoformat()}"
    meta = {"date": date.today().isoformat(), "device": args.device, "tiny": TINY,
            "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "epochs": args.epochs, "warmup": args.warmup,
            "sizes": {s: (system_named(s).test_sizes["data"] if TINY else SIZES[s]) for s in args.systems},
            "eval": EVAL, "diagnose": DIAGNOSE, "diagnose_galaxy": DIAGNOSE_GALAXY, "compare": COMPARE}
    results, lines = [], []
    start = time.perf_counter()
    for name in args.systems:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_system(name, args.device, args.epochs, args.warmup, Path(tmp))
        r["seconds_total"] = time.perf_counter() - start
        results.append(r)
        lines.append(summary_line(r))
        print(lines[-1], flush=True)
        (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=2, default=str))
    lines.append(f"total {time.perf_counter() - start:.0f} s on {meta['device_name']} ({args.device})")
    print(lines[-1])
    (out_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    print(f"written: {out_dir / (stem + '.json')}")


if __name__ == "__main__":
    main()
