"""The ``physvae`` command: generate data, train, evaluate, diagnose, NUTS, counterfactuals,
extrapolation, quick start."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pyro_physvae.settings import SETTINGS
from pyro_physvae.systems import describe_source, get_system, load_plugin, registered_systems

QUICKSTART_SIZES = {"n_train": 500, "n_valid": 200, "n_test": 200}
QUICKSTART_EPOCHS = 150


def _number(kind: type, what: str, ok: Callable[[float], bool]):
    """An argparse type: a number of ``kind`` (int or float) for which ``ok`` holds, described
    as ``what`` in the error message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _number(int, "a positive integer", lambda v: v > 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)


def _factors(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"factors must be positive, got {text!r}")
    return values


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
    system = get_system(args.system)
    if system.generate is None:
        raise ValueError(f"system {system.name!r} has no data generator (System.generate)")
    for split, ds in system.generate(seed=args.seed, **sizes).items():
        path = save_dataset(ds, Path(args.out) / f"{split}.nc")
        print(f"wrote {path} ({ds.sizes['sequence']} sequences)")


def cmd_import_reference(args: argparse.Namespace) -> None:
    from pyro_physvae.data.io import save_dataset

    if args.system == "pendulum":
        from pyro_physvae.data.pendulum import load_reference_text

        def load(split: str):
            return load_reference_text(args.source, split, dt=args.dt or 0.05)
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
    for split in args.splits:
        print(f"wrote {save_dataset(load(split), Path(args.out) / f'{split}.nc')}")


def cmd_import_galaxy10(args: argparse.Namespace) -> None:
    from pyro_physvae.data.galaxy import load_galaxy10
    from pyro_physvae.data.io import save_dataset

    splits = load_galaxy10(args.source, class_label=args.class_label, n_train=args.n_train,
                           n_valid=args.n_valid, n_test=args.n_test, seed=args.seed,
                           image_size=args.image_size)
    for split, ds in splits.items():
        path = save_dataset(ds, Path(args.out) / f"{split}.nc")
        print(f"wrote {path} ({ds.sizes['sequence']} images of class {args.class_label})")


def _train_config(args: argparse.Namespace, defaults: dict):
    from pyro_physvae.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs or defaults["epochs"], batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr, seed=args.seed, elbo=args.elbo, num_particles=args.num_particles,
        renyi_alpha=args.renyi_alpha, guide=args.guide, alpha=args.alpha, beta=args.beta,
        gamma=args.gamma, grad_scale=args.grad_scale, device=args.device,
        threads=args.threads, checkpoint_every=args.checkpoint_every,
    )


def model_option_arg(text: str) -> tuple[str, object]:
    """An argparse type: ``KEY=VALUE``, the value read as JSON when it is JSON (numbers,
    lists, ``true``), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_train(args: argparse.Namespace) -> None:
    from pyro_physvae.train import train

    system = get_system(args.system)
    # Solver options left out take the model's own defaults (e.g. 2 sub-steps for advdif).
    # Unknown --model-option keys are refused when the model is built, before anything is written.
    model_kwargs = dict(args.model_option)
    model_kwargs.update({k: v for k, v in (("method", args.solver), ("substeps", args.substeps),
                                           ("rtol", args.rtol), ("atol", args.atol)) if v is not None})
    history = train(system, args.setting, args.data, args.out,
                    _train_config(args, system.train_defaults), model_kwargs=model_kwargs,
                    guide_kwargs=dict(args.guide_option), resume=args.resume, progress=not args.quiet)
    best = min(history, key=lambda r: r["val_loss"])
    print(f"done: {len(history)} epochs; best validation loss {best['val_loss']:.4g} at epoch "
          f"{best['epoch']}; checkpoints in {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import evaluate

    metrics = evaluate(args.run, args.data, split=args.split,
                       num_samples=args.samples, out_dir=args.out, device=args.device,
                       guide_steps=args.guide_steps, checkpoint=args.checkpoint,
                       refine_steps=args.refine_steps)
    print(json.dumps(metrics, indent=2))


def cmd_diagnose(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import diagnose

    out = args.out or str(Path(args.run) / f"diagnose-{args.split}")
    report = diagnose(args.run, args.data, split=args.split, num_samples=args.samples,
                      iwae_particles=args.iwae_particles,
                      calibrate_on=None if args.calibrate_on == "none" else args.calibrate_on,
                      out_dir=out, guide_steps=args.guide_steps, refine_steps=args.refine_steps)
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


def cmd_nuts(args: argparse.Namespace) -> None:
    from pyro_physvae.diagnostics import markdown_table
    from pyro_physvae.mcmc import nuts_report

    report = nuts_report(args.run, args.data, split=args.split, sequences=args.sequences,
                         num_samples=args.samples, warmup_steps=args.warmup, num_chains=args.chains,
                         seed=args.seed, out_dir=args.out, chain_method=args.chain_method,
                         mass_matrix=args.mass_matrix, max_tree_depth=args.max_tree_depth,
                         amortized_draws=args.amortized_draws)
    if len(report["gap"]):
        print(markdown_table(report["gap"]))
    else:
        print(f"{report['system']} {report['setting']}: no physics parameters, no amortization-gap rows")
    print(f"max R-hat {report['max_r_hat']:.4f}, min bulk ESS {report['min_ess_bulk']:.0f}, "
          f"divergences {report['divergences']}; files in {Path(report['files']['nuts.nc']).parent}")


def cmd_counterfactual(args: argparse.Namespace) -> None:
    from pyro_physvae.evaluate import counterfactual

    report = counterfactual(args.run, args.data, split=args.split, factors=args.factors,
                            parameter=args.parameter, n_sequences=args.sequences, out_dir=args.out)
    name = report["parameter"]
    for r in report["results"]:
        physics = f"  (physics part {r['physics_only_mse']:.4g})" if "physics_only_mse" in r else ""
        print(f"{name} x {r['factor']:<4g}  MSE {r['mse']:.4g}{physics}")


def cmd_extrapolate(args: argparse.Namespace) -> None:
    from pyro_physvae.extrapolation import extrapolate

    report = extrapolate(args.run, args.data, split=args.split, n_steps=args.steps,
                         n_sequences=args.sequences, num_samples=args.samples, out_dir=args.out)
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

    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    system = get_system("pendulum")
    print(f"[1/4] generating pendulum data in {data_dir}")
    for split, ds in system.generate(seed=args.seed, **QUICKSTART_SIZES).items():
        save_dataset(ds, data_dir / f"{split}.nc")
    print(f"[2/4] training phys+nn+reg for {args.epochs} epochs in {run_dir}")
    train(system, "phys+nn+reg", data_dir, run_dir,
          TrainConfig(epochs=args.epochs, batch_size=100, seed=args.seed, device=args.device,
                      threads=args.threads),
          progress=not args.quiet)
    print("[3/4] evaluating on the test split")
    metrics = evaluate(run_dir, data_dir, split="test", num_samples=100, out_dir=out / "eval")
    print("[4/4] counterfactual: the physics parameter scaled past its training range")
    cf = counterfactual(run_dir, data_dir, split="test", n_sequences=100, out_dir=out / "eval")
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
    return f"""# pyro-physvae quick start: forced damped pendulum, phys+nn+reg

Short run ({epochs} epochs on {QUICKSTART_SIZES['n_train']} sequences; the reference budget is
5000 epochs on 1000). Test split, {metrics['n_sequences']} sequences, {metrics['num_samples']}
posterior samples each.

| metric | value |
| --- | --- |
| reconstruction MSE | {metrics['recon_mse']:.4g} |
| physics-only part MSE | {metrics['physics_only_mse']:.4g} |
| {name} MAE | {par['mae']:.3f} |
| {name} correlation | {par['corr']:.3f} |
| {name} 90% interval coverage | {par['coverage90']:.3f} |

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
    from pyro_physvae.train import ELBOS

    p = argparse.ArgumentParser(prog="physvae", description="Physics-integrated VAEs in Pyro.")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="a Python file or module that registers systems (register_system); "
                   "repeatable. Runs trained on such a system reload it by themselves.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("systems", help="list the available systems (built in and from --plugin)")
    ls.set_defaults(func=cmd_systems)

    g = sub.add_parser("generate", help="generate a synthetic data set (train/valid/test .nc)")
    g.add_argument("--system", default="pendulum", help=_SYSTEM_HELP)
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--seed", type=int, default=0)
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
    it.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    it.add_argument("--dt", type=_positive_float, default=None,
                    help="time step (default: pendulum 0.05, advdif from args_<split>.json)")
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
    gx.add_argument("--seed", type=int, default=0, help="seed of the split's permutation")
    gx.add_argument("--image-size", type=_positive_int, default=None,
                    help="resample the images to this size (default: keep)")
    gx.set_defaults(func=cmd_import_galaxy10)

    t = sub.add_parser("train", help="train a model/guide pair with SVI")
    t.add_argument("--system", default="pendulum", help=_SYSTEM_HELP)
    t.add_argument("--setting", choices=SETTINGS, default="phys+nn+reg")
    t.add_argument("--data", required=True, help="directory with train.nc and valid.nc")
    t.add_argument("--out", required=True, help="run directory for checkpoints")
    t.add_argument("--epochs", type=_positive_int, default=None, help="default: the reference")
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--elbo", choices=list(ELBOS), default="meanfield")
    t.add_argument("--num-particles", type=_positive_int, default=1)
    t.add_argument("--renyi-alpha", type=float, default=0.0,
                   help="order of --elbo renyi (0: importance-weighted bound, IWAE)")
    t.add_argument("--guide", choices=GUIDES, default="amortized",
                   help="the amortized encoder or an AutoGuide with per-sequence latents")
    t.add_argument("--alpha", type=float, default=None, help="R_ppc weight")
    t.add_argument("--beta", type=float, default=None, help="R_DA,2 weight")
    t.add_argument("--gamma", type=float, default=None, help="R_DA,1 weight")
    t.add_argument("--grad-scale", type=_positive_float, default=None,
                   help="gradient factor before clipping and Adam (default: the reference "
                   "loss scale, 2 sigma^2 / N_train)")
    t.add_argument("--solver", choices=METHODS, default=None,
                   help="ODE solver (default: the model's, euler)")
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
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--checkpoint-every", type=_positive_int, default=10)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics and figures of a run on a split")
    _add_run_arguments(e)
    e.add_argument("--samples", type=_positive_int, default=100)
    e.add_argument("--checkpoint", default="best.pt", choices=["best.pt", "last.pt"],
                   help="the best-validation checkpoint or the last one")
    e.add_argument("--out", default=None)
    e.add_argument("--device", default="cpu")
    _add_guide_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("diagnose", help="ArviZ InferenceData, summaries, IWAE, calibration, figures")
    _add_run_arguments(d)
    d.add_argument("--samples", type=_positive_int, default=200, help="posterior draws per sequence")
    d.add_argument("--iwae-particles", type=_positive_int, default=100)
    d.add_argument("--calibrate-on", default="valid", choices=["train", "valid", "test", "none"],
                   help="split on which to fit the interval widening ('none': raw intervals only)")
    _add_guide_arguments(d)
    d.add_argument("--out", default=None, help="default: RUN/diagnose-SPLIT")
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
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--out", default=None, help="default: RUN/nuts-SPLIT")
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
    c.set_defaults(func=cmd_counterfactual)

    x = sub.add_parser("extrapolate", help="roll a run out far past its training window and "
                       "compare with the truth (advdif)")
    _add_run_arguments(x)
    x.add_argument("--steps", type=_positive_int, default=1000, help="roll-out length in time steps")
    x.add_argument("--sequences", type=_positive_int, default=200)
    x.add_argument("--samples", type=_positive_int, default=50,
                   help="posterior draws averaged for each sequence's latents")
    x.add_argument("--out", default=None, help="default: RUN/extrapolate-SPLIT")
    x.set_defaults(func=cmd_extrapolate)

    q = sub.add_parser("quickstart", help="generate, train briefly, evaluate, write a report")
    q.add_argument("--out", default="physvae-quickstart")
    q.add_argument("--epochs", type=_positive_int, default=QUICKSTART_EPOCHS)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (these small networks run fastest on one)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"physvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
