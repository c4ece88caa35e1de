"""The ``physvae`` command: generate data, train, evaluate, diagnose, NUTS, counterfactuals,
extrapolation, quick start."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyro_physvae.arguments import check_keyword_arguments
from pyro_physvae.data.lazy import return_freed_memory
from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import describe_source, get_system, load_plugin, registered_systems

QUICKSTART_SIZES = {"n_train": 500, "n_valid": 200, "n_test": 200}
QUICKSTART_EPOCHS = 150


def _number(kind: type, what: str, ok: Callable[[float], bool]):
    """An argparse type: a number of ``kind`` (int or float) for which ``ok`` holds, described
    as ``what`` in the error message. Floats must be finite (``inf`` and ``nan`` are
    refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _number(int, "a positive integer", lambda v: v > 0)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0)
_unit_ratio = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
_non_negative_float = _number(float, "a number >= 0", lambda v: v >= 0)
_renyi_order = _number(float, "a number >= 0 other than 1", lambda v: v >= 0 and v != 1)
#: Seeds feed NumPy's generator too (through pyro.set_rng_seed), which takes 0 to 2**32 - 1.
_seed = _number(int, "an integer from 0 to 4294967295", lambda v: 0 <= v < 2**32)


def _device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _factors(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"factors must be positive and finite, got {text!r}")
    return values


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, before anything runs, that ``path`` can be the output directory named by
    ``option``: not an existing file, and creatable and writable (its nearest existing
    ancestor is a writable directory). Nothing is created.

    Raises:
        ValueError: naming the option, the path and the problem.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, expected a directory")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create {option} {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {option} {out}: {ancestor} is not writable")
    return out


def _read_run_config(run: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a run directory, or ``None`` where it is missing or unreadable."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _check_run_inputs(args: argparse.Namespace, splits: tuple[str, ...], out_default: str) -> None:
    """Before a command that reads a trained run (``args.run``) runs: the run directory
    exists, the output directory (``args.out``, else ``RUN/out_default``) can be written,
    and each split of the data (``args.data``, else the run's own) loads and fits the
    run's model (same system, sizes such as ``n_steps`` and ``dt``)."""
    from pyro_physvae.data.io import check_data_dir

    run = Path(args.run)
    if not run.exists():
        raise FileNotFoundError(f"run directory not found: {run}")
    if not run.is_dir():
        raise ValueError(f"run directory {run} is a file, expected a directory")
    args.output_dir = check_output_dir(args.out or run / out_default)  # named by write errors
    config = _read_run_config(run)
    if config is None or "system" not in config:  # loading the run will say what is wrong
        if args.data is not None:
            check_data_dir(args.data, (), what="--data directory")
        return
    system = get_system(config["system"], source=config.get("system_source"))
    data = args.data if args.data is not None else config.get("data_dir")
    if data is None:
        return
    check_data_dir(data, splits, own_layout=system.read_split is not None,
                   what="--data directory" if args.data is not None else "the run's data directory")
    for split in splits:  # left in its file with --stream
        ds = system.load_split(data, split, lazy=bool(getattr(args, "stream", False)))
        system.check_data_fits(ds, config.get("model_kwargs") or {})
        system.observations(ds)


def cmd_systems(args: argparse.Namespace) -> None:
    """List the systems available now, with where each comes from."""
    for name in registered_systems():
        system = get_system(name)
        where = describe_source(system.source)
        model = system.model_cls
        print(f"{name:<16} {model.__module__}.{model.__name__}  ({where})")


def cmd_generate(args: argparse.Namespace) -> None:
    from pyro_physvae.data.io import save_dataset

    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_valid", args.n_valid),
                               ("n_test", args.n_test), ("n_steps", args.n_steps))
             if v is not None}
    check_output_dir(args.out)
    system = get_system(args.system)
    if system.generate is None:
        raise ValueError(f"system {system.name!r} has no data generator (System.generate)")
    for split, ds in system.generate(seed=args.seed, **sizes).items():
        path = save_dataset(ds, Path(args.out) / f"{split}.nc")
        print(f"wrote {path} ({ds.sizes['sequence']} sequences)")


def cmd_import_reference(args: argparse.Namespace) -> None:
    from pyro_physvae.data.io import save_dataset

    check_output_dir(args.out)
    if not Path(args.source).exists():
        raise FileNotFoundError(f"reference data not found: {args.source}")
    if args.system == "pendulum":
        from pyro_physvae.data.pendulum import load_reference_text

        def load(split: str):
            return load_reference_text(args.source, split, dt=args.dt)  # else args_<split>.json's
    elif args.system == "advdif":
        from pyro_physvae.data.advdif import load_reference_npy

        def load(split: str):
            return load_reference_npy(args.source, split, dx=args.dx, dt=args.dt)
    elif args.system == "locomotion":
        from pyro_physvae.data.locomotion import read_split

        def load(split: str):
            return read_split(args.source, split)
    elif args.system == "galaxy":
        from pyro_physvae.data.galaxy import load_galaxy10

        load = load_galaxy10(args.source).__getitem__  # the paper's class and split sizes
    else:
        raise ValueError(f"no reference file format is known for the {args.system} system")
    # Every split is read (and checked) before any is written: a bad later split leaves the
    # files already in --out as they were.
    loaded = {split: load(split) for split in args.splits}
    for split, ds in loaded.items():
        print(f"wrote {save_dataset(ds, Path(args.out) / f'{split}.nc')}")


def cmd_import_galaxy10(args: argparse.Namespace) -> None:
    from pyro_physvae.data.galaxy import load_galaxy10
    from pyro_physvae.data.io import save_dataset

    check_output_dir(args.out)
    splits = load_galaxy10(args.source, class_label=args.class_label, n_train=args.n_train,
                           n_valid=args.n_valid, n_test=args.n_test, seed=args.seed,
                           image_size=args.image_size)
    for split, ds in splits.items():
        path = save_dataset(ds, Path(args.out) / f"{split}.nc")
        print(f"wrote {path} ({ds.sizes['sequence']} images of class {args.class_label})")


#: The ``train`` options that are fields of ``TrainConfig``. Left out (``None``), they take
#: the reference defaults in a new run and the run's recorded values on ``--resume``.
TRAIN_CONFIG_OPTIONS = ("epochs", "batch_size", "lr", "lr_schedule", "lr_final_ratio", "seed", "elbo",
                        "num_particles", "renyi_alpha", "guide", "alpha", "beta", "gamma", "grad_scale",
                        "device", "threads", "checkpoint_every", "stream")
#: ``physvae train``'s system and setting where neither is given nor resumed.
TRAIN_DEFAULTS = {"system": "pendulum", "setting": "phys+nn+reg"}


def _given_train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields that the command line gives (those not left ``None``)."""
    return {k: getattr(args, k) for k in TRAIN_CONFIG_OPTIONS if getattr(args, k) is not None}


def _recorded_run(out: Path) -> dict[str, Any]:
    """The options a run directory recorded (its ``config.json``: ``system``, ``setting``,
    ``train_config``, ``model_kwargs``, ``guide_kwargs``), for ``--resume``."""
    config = _read_run_config(out)
    if config is None or not {"system", "setting"} <= set(config) \
            or not isinstance(config.get("train_config", {}), dict):
        raise ValueError(f"cannot resume: {out} has no readable config.json")
    return config


def model_option_arg(text: str) -> tuple[str, object]:
    """An argparse type: ``KEY=VALUE``, the value read as JSON when it is JSON (numbers,
    lists, ``true``), else kept as a string. ``physvae train`` checks the values against
    the constructor's annotations (:func:`~pyro_physvae.arguments.check_keyword_arguments`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_train(args: argparse.Namespace) -> None:
    """Train a new run, or with ``--resume`` continue one: the options given replace the
    run's recorded ones (``train`` refuses the changes that are not safe), those left out
    keep them."""
    from pyro_physvae.data.io import check_data_dir
    from pyro_physvae.restarts import read_restarts, recorded_run_dir, train_restarts
    from pyro_physvae.train import TrainConfig, train

    out = check_output_dir(args.out)
    given = _given_train_options(args)
    restarted = read_restarts(out) if args.resume else None
    restarts = args.restarts or (len(restarted["seeds"]) if restarted else None)
    lightning = not (args.accelerator is None and args.devices is None and args.strategy is None)
    if restarts is not None and lightning:
        raise ValueError("--restarts trains its seeds one after the other in one process; leave out "
                         "--accelerator, --devices and --strategy")
    if args.overwrite and restarts is None and read_restarts(out) is not None:
        raise ValueError(f"{out} holds restarts ({out / 'restarts.json'}); replace them with --overwrite "
                         "--restarts K, or choose another directory")
    if args.resume:
        recorded = _recorded_run(recorded_run_dir(out) if restarts is not None else out)
        name = args.system or recorded["system"]
        source = recorded.get("system_source") if name == recorded["system"] else None
        system = get_system(name, source=source)
        setting = args.setting or recorded["setting"]
        config = TrainConfig.from_dict({**(recorded.get("train_config") or {}), **given})
    else:
        system = get_system(args.system or TRAIN_DEFAULTS["system"])
        setting = args.setting or TRAIN_DEFAULTS["setting"]
        config = TrainConfig(**{**system.train_defaults, **given})
    check_data_dir(args.data, ("train", "valid"), own_layout=system.read_split is not None)
    # Solver options left out take the model's own defaults (e.g. 2 sub-steps for advdif).
    model_kwargs = dict(args.model_option)
    model_kwargs.update({k: v for k, v in (("method", args.solver), ("substeps", args.substeps),
                                           ("rtol", args.rtol), ("atol", args.atol)) if v is not None})
    guide_kwargs = dict(args.guide_option)
    check_keyword_arguments(system.model_cls, model_kwargs, bound=("setting",), label="--model-option")
    if config.guide == "amortized":
        check_keyword_arguments(system.guide_cls, guide_kwargs, bound=("model",), label="--guide-option")
    else:  # an AutoGuide's options are make_autoguide's (init_scale, rank)
        from pyro_physvae.autoguides import make_autoguide

        check_keyword_arguments(make_autoguide, guide_kwargs, bound=("kind", "model"),
                                label=f"--guide-option (--guide {config.guide})")
    if config.stream:
        return_freed_memory()
    if restarts is not None:
        history = train_restarts(system, setting, args.data, out, config, restarts=restarts,
                                 model_kwargs=model_kwargs, guide_kwargs=guide_kwargs, resume=args.resume,
                                 overwrite=args.overwrite, progress=not args.quiet)
        record = read_restarts(out)
        losses = ", ".join(f"seed {r['seed']}: {r['best_val_loss']:.4g}" for r in record["restarts"])
        print(f"restarts: best validation losses {losses}; kept seed {record['chosen']}")
    elif not lightning:
        history = train(system, setting, args.data, out, config, model_kwargs=model_kwargs,
                        guide_kwargs=guide_kwargs, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.quiet)
    else:  # Lightning as the engine; rank 0 prints, the other processes only train
        from pyro_physvae.distributed import launched_rank, train_lightning

        devices = args.devices or 1
        try:
            history = train_lightning(system, setting, args.data, out, config,
                                      accelerator=args.accelerator or "cpu", devices=devices,
                                      strategy=args.strategy or ("ddp" if devices > 1 else "auto"),
                                      model_kwargs=model_kwargs, guide_kwargs=guide_kwargs,
                                      resume=args.resume, overwrite=args.overwrite,
                                      progress=not args.quiet)
        except Exception:
            if launched_rank() != 0:  # rank 0 reports the same failure
                raise SystemExit(2) from None
            raise
        if launched_rank() != 0:
            return
    if not history:
        print(f"done: no epochs to run; checkpoints in {out}")
        return
    best = min(history, key=lambda r: r["val_loss"])
    print(f"done: {len(history)} epochs; best validation loss {best['val_loss']:.4g} at epoch "
          f"{best['epoch']}; checkpoints in {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import evaluate, evaluation_folder

    calibrate_on = None if args.calibrate_on == "none" else args.calibrate_on
    return_freed_memory()  # each chunk's draws go back to the system: 0.8 GB instead of 2.7 for 8000 fields
    _check_run_inputs(args, tuple(dict.fromkeys(s for s in (args.split, calibrate_on) if s)),
                      evaluation_folder(args.split, args.checkpoint))
    metrics = evaluate(args.run, args.data, split=args.split,
                       num_samples=args.samples, out_dir=args.out, device=args.device,
                       guide_steps=args.guide_steps, checkpoint=args.checkpoint,
                       refine_steps=args.refine_steps, calibrate_on=calibrate_on,
                       iwae_particles=args.iwae_particles, stream=args.stream)
    print(json.dumps(metrics, indent=2))


def cmd_diagnose(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import diagnose

    calibrate_on = None if args.calibrate_on == "none" else args.calibrate_on
    return_freed_memory()
    _check_run_inputs(args, tuple(dict.fromkeys(s for s in (args.split, calibrate_on) if s)),
                      f"diagnose-{args.split}")
    out = args.out or str(Path(args.run) / f"diagnose-{args.split}")
    report = diagnose(args.run, args.data, split=args.split, num_samples=args.samples,
                      iwae_particles=args.iwae_particles,
                      calibrate_on=calibrate_on,
                      out_dir=out, guide_steps=args.guide_steps, refine_steps=args.refine_steps,
                      device=args.device, stream=args.stream,
                      predictive_sequences=args.predictive_sequences)
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


def cmd_nuts(args: argparse.Namespace) -> None:
    from pyro_physvae.diagnostics import markdown_table
    from pyro_physvae.mcmc import nuts_report

    _check_run_inputs(args, (args.split,), f"nuts-{args.split}")
    report = nuts_report(args.run, args.data, split=args.split, sequences=args.sequences,
                         num_samples=args.samples, warmup_steps=args.warmup, num_chains=args.chains,
                         seed=args.seed, out_dir=args.out, chain_method=args.chain_method,
                         mass_matrix=args.mass_matrix, max_tree_depth=args.max_tree_depth,
                         amortized_draws=args.amortized_draws, device=args.device)
    if len(report["gap"]):
        print(markdown_table(report["gap"]))
    else:
        print(f"{report['system']} {report['setting']}: no physics parameters, no amortization-gap rows")
    print(f"max R-hat {report['max_r_hat']:.4f}, min bulk ESS {report['min_ess_bulk']:.0f}, "
          f"divergences {report['divergences']}; files in {Path(report['files']['nuts.nc']).parent}")


def cmd_counterfactual(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import counterfactual

    _check_run_inputs(args, (args.split,), f"counterfactual-{args.split}")
    report = counterfactual(args.run, args.data, split=args.split, factors=args.factors,
                            parameter=args.parameter, n_sequences=args.sequences, out_dir=args.out,
                            device=args.device)
    name = report["parameter"]
    for r in report["results"]:
        physics = f"  (physics part {r['physics_only_mse']:.4g})" if "physics_only_mse" in r else ""
        print(f"{name} x {r['factor']:<4g}  MSE {r['mse']:.4g}{physics}")


def cmd_extrapolate(args: argparse.Namespace) -> None:
    from pyro_physvae.extrapolation import extrapolate

    _check_run_inputs(args, (args.split,), f"extrapolate-{args.split}")
    report = extrapolate(args.run, args.data, split=args.split, n_steps=args.steps,
                         n_sequences=args.sequences, num_samples=args.samples, out_dir=args.out,
                         device=args.device)
    print(f"{report['system']} {report['setting']}: rolled out {report['n_steps']} steps from a "
          f"{report['train_steps']}-step window, {report['n_sequences']} sequences"
          f"{' (BLOW-UP: the field norm grew)' if report['blowup'] else ''}")
    for h, row in report["horizons"]["x_mean"].items():
        print(f"step {h:>5}: MSE {row['mse']:.3g}  relative RMSE {row['relative_rmse']:.3g}  "
              f"max norm ratio {row['max_norm_ratio']:.3f}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """Generate pendulum data, train phys+nn+reg briefly, evaluate, write a report."""
    from pyro_physvae.data.io import save_dataset
    from pyro_physvae.evaluate import counterfactual, evaluate
    from pyro_physvae.train import TrainConfig, train

    out = check_output_dir(args.out)
    data_dir, run_dir = out / "data", out / "run"
    system = get_system("pendulum")
    print(f"[1/4] generating pendulum data in {data_dir}")
    for split, ds in system.generate(seed=args.seed, **QUICKSTART_SIZES).items():
        save_dataset(ds, data_dir / f"{split}.nc")
    print(f"[2/4] training phys+nn+reg for {args.epochs} epochs in {run_dir}")
    train(system, "phys+nn+reg", data_dir, run_dir,
          TrainConfig(epochs=args.epochs, batch_size=100, seed=args.seed, device=args.device,
                      threads=args.threads),
          overwrite=True, progress=not args.quiet)  # the quick start's own directory: redone
    print("[3/4] evaluating on the test split")
    metrics = evaluate(run_dir, data_dir, split="test", num_samples=100, out_dir=out / "eval",
                       device=args.device)
    print("[4/4] counterfactual: the physics parameter scaled past its training range")
    cf = counterfactual(run_dir, data_dir, split="test", n_sequences=100, out_dir=out / "eval",
                        device=args.device)
    report = _report(metrics, cf, args.epochs)
    (out / "REPORT.md").write_text(report)
    print(report)
    print(f"report: {out / 'REPORT.md'}")


def _report(metrics: dict, cf: dict, epochs: int) -> str:
    """The quick start's REPORT.md: the evaluation ``metrics`` and the counterfactual report
    ``cf`` (its scaled parameter's recovery, and its errors per factor)."""
    name = cf["parameter"]
    par = metrics[name]
    rows = "\n".join(f"| {r['factor']:g} | {r['mse']:.4g} | {r.get('physics_only_mse', float('nan')):.4g} |"
                     for r in cf["results"])
    debiased = (f"| {name} MAE, debiased by the bias measured on {par['debiased_by']['fitted_on']} | "
                f"{par['mae_debiased']:.3f} |\n" if "mae_debiased" in par else "")
    return f"""# pyro-physvae quick start: forced damped pendulum, phys+nn+reg

Short run ({epochs} epochs on {QUICKSTART_SIZES['n_train']} sequences; the reference budget is
5000 epochs on 1000). Test split, {metrics['n_sequences']} sequences, {metrics['num_samples']}
posterior samples each.

| metric | value |
| --- | --- |
| reconstruction MSE | {metrics['recon_mse']:.4g} |
| physics-only part MSE | {metrics['physics_only_mse']:.4g} |
| {name} MAE | {par['mae']:.3f} |
{debiased}| {name} correlation | {par['corr']:.3f} |
| {name} 90% interval coverage, calibrated | {par['coverage90']:.3f} |
| {name} 90% interval coverage, raw | {par.get('coverage90_raw', float('nan')):.3f} |
| predictive 90% coverage, calibrated | {metrics['predictive_coverage90']:.3f} |
| predictive 90% coverage, raw | {metrics.get('predictive_coverage90_raw', float('nan')):.3f} |

{metrics.get('notes', '')}

![reconstructions](eval/reconstructions.png)

![{name}](eval/{name}.png)

## Counterfactual: {name} scaled beyond the training range

| factor | MSE vs the true system | physics part alone |
| --- | --- | --- |
{rows}

![counterfactual](eval/counterfactual.png)
"""


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that reads a trained run: RUN, --data, --split."""
    parser.add_argument("run", help="run directory")
    parser.add_argument("--data", default=None, help="default: the run's training data directory")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])


def _add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibrate-on", default="valid", choices=["train", "valid", "test", "none"],
                        help="split on which the observation noise and the intervals of the physics "
                        "parameters are calibrated (default valid; 'none': raw figures only)")


def _add_guide_arguments(parser: argparse.ArgumentParser) -> None:
    """How ``evaluate`` and ``diagnose`` get the posterior of a split's sequences."""
    parser.add_argument("--guide-steps", type=_positive_int, default=1000,
                        help="steps to fit an AutoGuide run's guide on the split")
    parser.add_argument("--refine-steps", type=_non_negative_int, default=0,
                        help="refine an amortized run's posterior per sequence for this many SVI "
                        "steps, started from the encoder (semi-amortized inference; 0: off)")


_SYSTEM_HELP = ("a built-in system (pendulum, advdif, locomotion, galaxy), one registered by a "
                "--plugin, one offered by an installed package, or module:attribute")


def build_parser() -> argparse.ArgumentParser:
    from pyro_physvae.autoguides import GUIDES
    from pyro_physvae.ode import METHODS
    from pyro_physvae.train import ELBOS, LR_SCHEDULES

    p = argparse.ArgumentParser(prog="physvae", description="Physics-integrated VAEs in Pyro.")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="a Python file or module that registers systems (register_system); "
                   "repeatable. Runs trained on such a system reload it by themselves.")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error (by default: one line saying what is wrong)")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("systems", help="list the available systems (built in and from --plugin)")
    ls.set_defaults(func=cmd_systems)

    g = sub.add_parser("generate", help="generate a synthetic data set (train/valid/test .nc)")
    g.add_argument("--system", default="pendulum", help=_SYSTEM_HELP)
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--seed", type=_seed, default=0)
    for name in ("n-train", "n-valid", "n-test", "n-steps"):
        g.add_argument(f"--{name}", type=_positive_int, default=None)
    g.set_defaults(func=cmd_generate)

    it = sub.add_parser("import-reference", aliases=["import-text"],
                        help="convert the reference implementation's data files to netCDF")
    it.add_argument("source", help="pendulum: data_<split>.txt and true_params_<split>.txt; "
                    "advdif: data_<split>.npy, args_<split>.json and true_params_<split>.txt; "
                    "locomotion: <split>.npy or data_<split>.mat, and props_<split>.txt")
    it.add_argument("--system", default="pendulum", help=_SYSTEM_HELP)
    it.add_argument("--out", required=True)
    it.add_argument("--splits", nargs="+", default=["train", "valid", "test"],
                    choices=["train", "valid", "test"])
    it.add_argument("--dt", type=_positive_float, default=None,
                    help="time step (default: from args_<split>.json; pendulum without one: 0.05)")
    it.add_argument("--dx", type=_positive_float, default=None,
                    help="advdif grid spacing (default: from args_<split>.json)")
    it.set_defaults(func=cmd_import_reference)

    gx = sub.add_parser("import-galaxy10", help="select one class of the Galaxy10 HDF5 file, "
                        "scale it to [0, 1] and split it reproducibly (train/valid/test .nc)")
    gx.add_argument("source", help="Galaxy10.h5 with the keys 'images' (N, S, S, 3) and 'ans' (N,)")
    gx.add_argument("--out", required=True, help="output directory")
    gx.add_argument("--class", dest="class_label", type=int, default=6,
                    help="class to keep (default 6: disk, edge-on, no bulge)")
    gx.add_argument("--n-train", type=_positive_int, default=400)
    gx.add_argument("--n-valid", type=_positive_int, default=100)
    gx.add_argument("--n-test", type=_positive_int, default=None, help="default: all the rest")
    gx.add_argument("--seed", type=_seed, default=0, help="seed of the split's permutation")
    gx.add_argument("--image-size", type=_positive_int, default=None,
                    help="resample the images to this size (default: keep)")
    gx.set_defaults(func=cmd_import_galaxy10)

    # Options left out (None) take the reference defaults, or with --resume the run's own.
    t = sub.add_parser("train", help="train a model/guide pair with SVI",
                       description="Train a model/guide pair with SVI. With --resume, the options "
                       "left out keep the run's recorded values.")
    t.add_argument("--system", default=None, help=_SYSTEM_HELP + " (default: pendulum)")
    t.add_argument("--setting", choices=SETTINGS, default=None, help="default: phys+nn+reg")
    t.add_argument("--data", required=True, help="directory with train.nc and valid.nc")
    t.add_argument("--out", required=True, help="run directory for checkpoints")
    t.add_argument("--epochs", type=_positive_int, default=None, help="default: the reference")
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--lr", type=_positive_float, default=None, help="default: 1e-3")
    t.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=None,
                   help="learning rate over the epochs: constant (the reference's) or cosine (from "
                   "--lr down to --lr times --lr-final-ratio in the last epoch); default: the "
                   "system's own (its System.train_defaults; see the README), else constant")
    t.add_argument("--lr-final-ratio", type=_unit_ratio, default=None,
                   help="last epoch's learning rate over --lr with --lr-schedule cosine "
                   "(in (0, 1]; default 0.01)")
    t.add_argument("--seed", type=_seed, default=None, help="default: 0")
    t.add_argument("--elbo", choices=list(ELBOS), default=None, help="default: meanfield")
    t.add_argument("--num-particles", type=_positive_int, default=None, help="default: 1")
    t.add_argument("--renyi-alpha", type=_renyi_order, default=None,
                   help="order of --elbo renyi (default 0: importance-weighted bound, IWAE)")
    t.add_argument("--guide", choices=GUIDES, default=None,
                   help="the amortized encoder (default) or an AutoGuide with per-sequence latents")
    t.add_argument("--alpha", type=_non_negative_float, default=None, help="R_ppc weight")
    t.add_argument("--beta", type=_non_negative_float, default=None, help="R_DA,2 weight")
    t.add_argument("--gamma", type=_non_negative_float, default=None, help="R_DA,1 weight")
    t.add_argument("--grad-scale", type=_positive_float, default=None,
                   help="gradient factor before clipping and Adam (default: the reference "
                   "loss scale, 2 sigma^2 / N_train)")
    t.add_argument("--solver", choices=METHODS, default=None,
                   help="ODE solver (default: the model's: euler, rk4 for locomotion)")
    t.add_argument("--substeps", type=_positive_int, default=None,
                   help="fixed-step solver steps per observation interval (default: the model's)")
    t.add_argument("--rtol", type=_positive_float, default=None, help="adaptive solvers' tolerance")
    t.add_argument("--atol", type=_positive_float, default=None, help="adaptive solvers' tolerance")
    t.add_argument("--model-option", type=model_option_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="a model constructor argument, VALUE as JSON, e.g. "
                   "dim_z_aux1=3 or aux1_state_inputs='[\"velocity\"]' (repeatable)")
    t.add_argument("--guide-option", type=model_option_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="an amortized guide constructor argument, VALUE as JSON, "
                   "e.g. hidden_feat='[64, 64]' (repeatable)")
    t.add_argument("--device", type=_device, default=None, help="cpu (default) or cuda")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="epochs between checkpoints (default: the trainer's)")
    t.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read minibatches from the data files instead of loading them (data larger "
                   "than memory; netCDF splits, amortized guide; default: load)")
    fresh = t.add_mutually_exclusive_group()
    fresh.add_argument("--resume", action="store_true",
                       help="continue the run in OUT; options left out keep the run's values")
    fresh.add_argument("--overwrite", action="store_true",
                       help="start afresh in an OUT that already holds a run, replacing it")
    t.add_argument("--restarts", type=_positive_int, default=None,
                   help="train this many seeds (--seed, --seed + 1, ...) in OUT/restarts/ and keep the "
                   "one with the lowest validation loss in OUT (K trainings; on --resume: the run's own)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    lt = t.add_argument_group(
        "Lightning (many devices)", "Any of these trains through Lightning: one process per device, "
        "gradients averaged over processes; --batch-size is the global batch, shared among them")
    lt.add_argument("--accelerator", choices=["cpu", "gpu"], default=None, help="default: cpu")
    lt.add_argument("--devices", type=_positive_int, default=None,
                    help="CPU processes or GPUs (default: 1)")
    lt.add_argument("--strategy", choices=["auto", "ddp"], default=None,
                    help="ddp: one process per device (default with --devices > 1; gloo on CPU)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics and figures of a run on a split")
    _add_run_arguments(e)
    e.add_argument("--samples", type=_positive_int, default=100)
    e.add_argument("--iwae-particles", type=_positive_int, default=50,
                   help="importance samples per sequence of the IWAE log-likelihood")
    e.add_argument("--checkpoint", default="best.pt", choices=["best.pt", "last.pt"],
                   help="the best-validation checkpoint or the last one")
    e.add_argument("--out", default=None,
                   help="default: RUN/eval-SPLIT (best.pt) or RUN/eval-SPLIT-last (last.pt)")
    e.add_argument("--device", type=_device, default="cpu")
    e.add_argument("--stream", action="store_true",
                   help="read the observations from their files in chunks (data larger than memory; "
                   "evaluation and refinement stream, an AutoGuide run's guide is fitted on the "
                   "split read into memory)")
    _add_calibration_argument(e)
    _add_guide_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("diagnose", help="ArviZ InferenceData, summaries, IWAE, calibration, figures")
    _add_run_arguments(d)
    d.add_argument("--samples", type=_positive_int, default=200, help="posterior draws per sequence")
    d.add_argument("--iwae-particles", type=_positive_int, default=100)
    _add_calibration_argument(d)
    _add_guide_arguments(d)
    d.add_argument("--out", default=None, help="default: RUN/diagnose-SPLIT")
    d.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    d.add_argument("--stream", action="store_true",
                   help="read the observations from their files in chunks (data larger than memory); "
                   "the replicates and curves of the first --predictive-sequences are written")
    d.add_argument("--predictive-sequences", type=_positive_int, default=None,
                   help="sequences whose replicates and curves go into inference_data.nc (default: "
                   "all; 1000 with --stream); the metrics, LOO and calibration cover all")
    d.set_defaults(func=cmd_diagnose)

    n = sub.add_parser("nuts", help="NUTS over a few sequences' latents (nets fixed), amortization gap")
    _add_run_arguments(n)
    n.add_argument("--sequences", type=_indices, default=(0, 1, 2),
                   help="comma-separated positions in the split, e.g. 0,1,2")
    n.add_argument("--samples", type=_positive_int, default=500, help="draws per chain")
    n.add_argument("--warmup", type=_positive_int, default=500)
    n.add_argument("--chains", type=_positive_int, default=4)
    n.add_argument("--chain-method", choices=["sequential", "parallel"], default="sequential")
    n.add_argument("--mass-matrix", choices=["laplace", "laplace+adapt", "diagonal"], default="laplace",
                   help="inverse mass matrix of the standardized latents (see run_nuts)")
    n.add_argument("--max-tree-depth", type=_positive_int, default=8)
    n.add_argument("--amortized-draws", type=_positive_int, default=1000,
                   help="draws of the amortized guide compared with NUTS")
    n.add_argument("--seed", type=_seed, default=0)
    n.add_argument("--out", default=None, help="default: RUN/nuts-SPLIT")
    n.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    n.set_defaults(func=cmd_nuts)

    c = sub.add_parser("counterfactual", help="decode with a physics parameter scaled (e.g. the "
                       "pendulum's omega) and compare with the system's truth scaled alike")
    _add_run_arguments(c)
    c.add_argument("--factors", type=_factors, default=(0.2, 0.5, 1.0, 2.0, 3.0),
                   help="comma-separated positive factors of the parameter")
    c.add_argument("--parameter", default=None,
                   help="the physics parameter to scale (default: the model's first)")
    c.add_argument("--sequences", type=_positive_int, default=100)
    c.add_argument("--out", default=None)
    c.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    c.set_defaults(func=cmd_counterfactual)

    x = sub.add_parser("extrapolate", help="roll a run out far past its training window and "
                       "compare with the truth (advdif)")
    _add_run_arguments(x)
    x.add_argument("--steps", type=_positive_int, default=1000, help="roll-out length in time steps")
    x.add_argument("--sequences", type=_positive_int, default=200)
    x.add_argument("--samples", type=_positive_int, default=50,
                   help="posterior draws averaged for each sequence's latents")
    x.add_argument("--out", default=None, help="default: RUN/extrapolate-SPLIT")
    x.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    x.set_defaults(func=cmd_extrapolate)

    q = sub.add_parser("quickstart", help="generate, train briefly, evaluate, write a report")
    q.add_argument("--out", default="physvae-quickstart")
    q.add_argument("--epochs", type=_positive_int, default=QUICKSTART_EPOCHS)
    q.add_argument("--seed", type=_seed, default=0)
    q.add_argument("--device", type=_device, default="cpu")
    q.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (these small networks run fastest on one)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)
    for command in {id(c): c for c in sub.choices.values()}.values():  # --debug also after the name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error")
    return p


#: Errors that mean "the disk is full or cannot be written": reported as "cannot write".
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO}
#: How torch reports a failed write of a checkpoint (e.g. on a full disk), which carries no
#: errno: "[enforce fail at inline_container.cc:672] . unexpected pos ...", "PytorchStreamWriter
#: failed writing file ...", "... file write failed".
_TORCH_WRITE_FAILURE = re.compile(
    r"inline_container\.cc|PytorchStreamWriter|file write failed|unexpected pos")


def _raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` was raised by this package's code (its innermost frame is in
    ``pyro_physvae``, the models or the guides), whose messages are written for the user,
    rather than inside a library."""
    import pyro_physvae.guides
    import pyro_physvae.models

    roots = [str(Path(__file__).resolve().parent)]
    roots += [str(Path(p).resolve()) for m in (pyro_physvae.models, pyro_physvae.guides) for p in m.__path__]
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    return any(filename.startswith(root + os.sep) for root in roots)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_message(error: BaseException, out: str | os.PathLike | None = None) -> str:
    """One line that says what went wrong, for ``physvae <command>: error: <message>``.

    Errors that this package raises (``ValueError``, ``OSError``, ``RuntimeError`` with a
    message written for the user) are shown as they are; a failed write (a full or read-only
    disk, torch's failed checkpoint write) as ``cannot write <path>: <reason>``, where ``out``
    (the command's output directory) stands in for a path the error does not name; anything
    else as ``<ExceptionType>: <first line>`` with a pointer to ``--debug``.
    """
    where = error.filename if isinstance(error, OSError) and error.filename else out
    if isinstance(error, OSError) and error.errno is not None:
        reason = error.strerror or os.strerror(error.errno)
        if error.errno in _WRITE_ERRNOS:
            return f"cannot write {where or 'the output'}: {reason}"
        if error.filename:
            if error.errno in (errno.EACCES, errno.EPERM):
                return f"cannot access {error.filename}: {reason}"
            if error.errno == errno.ENOENT:
                return f"not found: {error.filename}"
            return f"{error.filename}: {reason}"
    if isinstance(error, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(error)):
        return f"cannot write {where or 'the output'} (disk full or write error)"
    text = _one_line(str(error))
    if isinstance(error, (ValueError, OSError, RuntimeError)) and text and _raised_by_us(error):
        return text
    first = str(error).strip().splitlines()[0].strip() if str(error).strip() else ""
    return f"{type(error).__name__}{': ' + first if first else ''} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the ``physvae`` command line. Returns the exit status: 0, 2 for an error (one
    line on stderr, ``physvae <command>: error: <message>``; with ``--debug`` the traceback
    first), 130 when interrupted. Bad arguments exit with argparse's usage line (status 2)."""
    args = build_parser().parse_args(argv)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"physvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one error boundary: every failure ends as one line
        if args.debug:
            traceback.print_exc()
        out = getattr(args, "output_dir", None) or getattr(args, "out", None)
        print(f"physvae {args.command}: error: {error_message(e, out)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
