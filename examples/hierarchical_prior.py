"""A hierarchical prior over omega: the pendulum model inside a scientist's own Pyro program.

    python examples/hierarchical_prior.py [--n 300] [--steps 3000] [--batch 100] [--seed 0]

Many pendulums are drawn from one population: each sequence has its own angular frequency
``omega_i``, and the ``omega_i`` scatter around a population mean ``mu`` with spread ``tau``.
The pendulums are damped, which the model's physics (a frictionless pendulum) does not know:
the Phys-VAE model in its proposed setting, ``phys+nn+reg``, completes the physics with neural
parts. The outer program samples the two global latents and hands the per-sequence prior to
the model through its ``priors`` hook::

    omega_mu  ~ Normal(centre of omega's range, its prior scale)      (global)
    omega_tau ~ HalfNormal(1)                                          (global)
    omega_i   ~ Normal(omega_mu, omega_tau)        inside the model's "data" plate
    z_A1_i, z_A2_i ~ Normal(0, I)                  (the neural parts' latents)
    x_i       ~ Normal(decoder(x_i[0], omega_i, z_A1_i, z_A2_i), sigma)

The guide is the product of an ``AutoNormal`` guide over only the two global sites
(``poutine.block(expose=...)`` hides the model's own sites from it) and the amortized encoder
:class:`~pyro_physvae.guides.PendulumGuide` for the per-sequence latents. Training is plain
Pyro ``SVI`` with :class:`~pyro_physvae.PhysVAELoss` around ``TraceMeanField_ELBO`` (or
``Trace_ELBO``): the three regularizers (R_ppc, R_DA,1, R_DA,2) find the Phys-VAE model and
encoder inside the two programs' traces, with the model's default weights. The optimiser is
``pyro.optim.ClippedAdam`` (Adam with gradient clipping and a learning-rate decay) on
minibatches: the indices go to both model and guide through ``subsample=``; the globals are
sampled outside the plate, so Pyro scales only the per-sequence terms by ``N / B``.

The data are synthetic (a damped pendulum with the model's noise level), so the truth of
``mu``, ``tau`` and every ``omega_i`` is known. The script prints the posterior of ``(mu,
tau)`` (mean and central 90% interval from ``Predictive`` on the global guide) next to the
truth, and the error of the per-sequence posterior means of ``omega``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from torch import Tensor

from pyro_physvae import PhysVAELoss, Setting
from pyro_physvae.autoguides import amortized_posterior
from pyro_physvae.data.pendulum import forced_damped_pendulum
from pyro_physvae.guides import PendulumGuide
from pyro_physvae.models import PendulumModel

#: Names of the global (population) sites, sampled outside the ``data`` plate.
GLOBAL_SITES = ("omega_mu", "omega_tau")
#: Scale of the HalfNormal prior of the population spread ``omega_tau`` [rad/s].
TAU_PRIOR_SCALE = 1.0


@dataclass
class Simulation:
    """Synthetic population data and its truth.

    Attributes:
        x: noisy angle sequences ``(N, T)`` [rad].
        omega: the true per-sequence angular frequencies ``(N,)`` [rad/s].
        init: the true initial angles ``(N,)`` [rad].
        damping: the true per-sequence damping coefficients ``(N,)`` [1/s].
        mu, tau: the population mean and spread that ``omega`` was drawn from.
    """

    x: Tensor
    omega: Tensor
    init: Tensor
    damping: Tensor
    mu: float
    tau: float


def simulate(
    pendulum: PendulumModel,
    n: int,
    *,
    mu: float = 1.8,
    tau: float = 0.3,
    max_angle: float = 1.2,
    max_damping: float = 0.1,
    generator: torch.Generator | None = None,
) -> Simulation:
    """Draw ``n`` damped pendulum sequences from the population, with the model's noise.

    ``omega_i ~ Normal(mu, tau)`` clipped into the model's omega range, initial angles uniform
    in ``[-max_angle, max_angle]``, zero initial velocity, damping ``xi_i`` uniform in ``[0,
    max_damping]`` (``theta'' = -omega^2 sin(theta) - xi theta'``, solved accurately on the
    model's time grid), plus Gaussian noise with the model's noise std.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    rng = generator if generator is not None else torch.Generator().manual_seed(0)
    if not max_damping >= 0:
        raise ValueError(f"max_damping must be >= 0, got {max_damping}")
    omega = pendulum.omega.clamp(mu + tau * torch.randn(n, generator=rng))
    init = max_angle * (2.0 * torch.rand(n, generator=rng) - 1.0)
    damping = max_damping * torch.rand(n, generator=rng)
    zero = torch.zeros(n)
    clean = forced_damped_pendulum(init, omega, damping, zero, zero, pendulum.t).to(init.dtype)
    x = clean + pendulum.noise_scale() * torch.randn(clean.shape, generator=rng)
    return Simulation(x=x, omega=omega, init=init, damping=damping, mu=mu, tau=tau)


def population_model(pendulum: PendulumModel, x: Tensor, subsample: Tensor | None = None) -> Tensor:
    """The scientist's hierarchical program around the Phys-VAE pendulum model.

    Args:
        pendulum: the Phys-VAE model whose ``omega`` prior is replaced.
        x: all observed sequences ``(N, T)``.
        subsample: minibatch row indices, passed on to the model's ``data`` plate.

    Returns:
        The decoder mean of the minibatch, ``(B, T)``.
    """
    loc = torch.tensor(pendulum.omega.prior_loc, dtype=x.dtype, device=x.device)
    scale = torch.tensor(pendulum.omega.prior_scale, dtype=x.dtype, device=x.device)
    # Global population mean and spread of omega [rad/s]: outside any plate.
    mu = pyro.sample("omega_mu", dist.Normal(loc, scale))
    tau = pyro.sample("omega_tau", dist.HalfNormal(torch.full_like(loc, TAU_PRIOR_SCALE)))
    # Per-sequence omega_i ~ Normal(mu, tau), sampled inside the model's "data" plate.
    return pendulum(x, subsample=subsample, priors={"omega": dist.Normal(mu, tau)})


def make_guide(
    model: Callable[..., Tensor], encoder: PendulumGuide, init_mu: float, init_tau: float = 0.5
) -> tuple[Callable[..., None], AutoNormal]:
    """The guide of :func:`population_model`: globals by ``AutoNormal``, locals amortized.

    Returns ``(guide, global_guide)``; the global guide sees only :data:`GLOBAL_SITES`.
    """
    global_guide = AutoNormal(
        poutine.block(model, expose=list(GLOBAL_SITES)),
        init_loc_fn=init_to_value(values={"omega_mu": torch.tensor(init_mu),
                                          "omega_tau": torch.tensor(init_tau)}),
        init_scale=0.02,
    )

    def guide(x: Tensor, subsample: Tensor | None = None) -> None:
        global_guide(x, subsample=subsample)
        encoder(x, subsample=subsample)

    return guide, global_guide


@dataclass
class Fit:
    """A trained population model: its parts, the loss history (per sequence) and the names
    of the regularizers that acted in the last step."""

    pendulum: PendulumModel
    encoder: PendulumGuide
    model: Callable[..., Tensor]
    guide: Callable[..., None]
    global_guide: AutoNormal
    losses: list[float]
    regularizers: list[str]


def train(
    x: Tensor,
    *,
    n_steps: int,
    dt: float,
    steps: int = 3000,
    batch: int = 100,
    lr: float = 3e-3,
    lr_globals: float | None = None,
    lr_final: float = 0.03,
    elbo: str = "meanfield",
    setting: str = "phys+nn+reg",
    aux1_inputs: Sequence[str] = ("velocity",),
    hidden: Sequence[int] = (64, 64),
    seed: int = 0,
    log_every: int = 0,
) -> Fit:
    """Fit the hierarchical model to ``x (N, T)`` by minibatch SVI.

    Args:
        x: observed sequences ``(N, T)``.
        n_steps, dt: the pendulum model's time grid (must match ``x``).
        steps: SVI steps; batch: minibatch size (rows drawn without replacement per step).
        lr: Adam learning rate of the encoder; lr_globals: that of the global guide's
            parameters (default: ``10 * lr``, so that they keep up in short runs). Both decay
            geometrically to ``lr_final`` times their start value by the last step: the
            likelihood is so sharp (noise std ~0.008 rad) that at a constant rate the encoder,
            and with it the globals, keep jittering.
        elbo: ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KLs where available) or
            ``"trace"`` (``Trace_ELBO``).
        setting: the pendulum model's setting; ``phys+nn+reg`` trains with the three
            regularizers (:class:`~pyro_physvae.PhysVAELoss` with the model's weights).
        aux1_inputs: what the in-ODE net reads besides the time: the missing physics here
            is friction, a function of the velocity, so by default the velocity alone (an
            in-ODE net that also reads the angle can act as a restoring force and take over
            part of ``omega``; see ``PendulumModel``'s ``aux1_state_inputs``).
        hidden: hidden widths of the networks (model and encoder).
        seed: Pyro seed (initialisation and minibatches).
        log_every: print the loss every this many steps (0: never).
    """
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    pendulum = PendulumModel(setting, n_steps=n_steps, dt=dt, hidden_aux1=hidden, hidden_aux2=hidden,
                             aux1_state_inputs=aux1_inputs)
    encoder = PendulumGuide(pendulum, hidden_feat=hidden, feat_dim=hidden[-1], hidden_aux=hidden,
                            hidden_unmixer=hidden, hidden_phys=hidden)
    model = partial(population_model, pendulum)
    guide, global_guide = make_guide(model, encoder, init_mu=pendulum.omega.prior_loc)

    def optim_args(name: str) -> dict[str, float]:
        is_global = any(site in name for site in GLOBAL_SITES)
        start = (10.0 * lr if lr_globals is None else lr_globals) if is_global else lr
        return {"lr": start, "lrd": lr_final ** (1.0 / max(1, steps)), "clip_norm": 10.0}

    loss_fn = {"meanfield": TraceMeanField_ELBO, "trace": Trace_ELBO}[elbo]()
    if Setting.parse(setting).regularized:
        loss_fn = PhysVAELoss(loss_fn)  # R_ppc, R_DA,2, R_DA,1 with the model's weights
    svi = SVI(model, guide, pyro.optim.ClippedAdam(optim_args), loss=loss_fn)
    n = x.shape[0]
    b = min(batch, n)
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randperm(n)[:b]
        losses.append(svi.step(x, subsample=idx) / n)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss per sequence {losses[-1]:12.2f}")
    acted = sorted(getattr(loss_fn, "last_terms", {}))
    return Fit(pendulum, encoder, model, guide, global_guide, losses, acted)


def summarize(fit: Fit, sim: Simulation, num_samples: int = 2000) -> dict[str, float]:
    """Posterior of ``(mu, tau)`` (mean, 5% and 95% quantiles) and per-sequence omega MAE."""
    draws = Predictive(fit.global_guide, num_samples=num_samples, return_sites=list(GLOBAL_SITES))(
        sim.x)
    out: dict[str, float] = {}
    for site, key in (("omega_mu", "mu"), ("omega_tau", "tau")):
        d = draws[site].reshape(-1)
        lo, hi = torch.quantile(d, torch.tensor([0.05, 0.95], dtype=d.dtype)).tolist()
        out.update({f"{key}_mean": float(d.mean()), f"{key}_q05": lo, f"{key}_q95": hi})
    omega_hat = amortized_posterior(fit.encoder, sim.x)["omega"][0]
    out["omega_mae"] = float((omega_hat - sim.omega).abs().mean())
    out["omega_hat_std"] = float(omega_hat.std())
    out["mu_true"], out["tau_true"] = sim.mu, sim.tau
    out["first_loss"], out["last_loss"] = fit.losses[0], fit.losses[-1]
    out["regularizers"] = fit.regularizers
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Simulate a population, fit the hierarchical model, print and return the recovery."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="number of sequences")
    p.add_argument("--n-steps", type=int, default=50, help="time steps per sequence")
    p.add_argument("--dt", type=float, default=0.05, help="sampling interval [s]")
    p.add_argument("--steps", type=int, default=3000, help="SVI steps")
    p.add_argument("--batch", type=int, default=100, help="minibatch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--elbo", choices=("meanfield", "trace"), default="meanfield")
    p.add_argument("--setting", choices=("phys-only", "phys+nn", "phys+nn+reg"), default="phys+nn+reg")
    p.add_argument("--max-damping", type=float, default=0.1, help="damping xi ~ U[0, this] [1/s]")
    p.add_argument("--aux1-inputs", nargs="+", choices=("angle", "velocity"), default=["velocity"],
                   help="what the in-ODE net reads besides the time")
    p.add_argument("--mu", type=float, default=1.8, help="true population mean of omega")
    p.add_argument("--tau", type=float, default=0.3, help="true population spread of omega")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true", help="do not print the training loss")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    physics = PendulumModel("phys-only", n_steps=args.n_steps, dt=args.dt)
    sim = simulate(physics, args.n, mu=args.mu, tau=args.tau, max_damping=args.max_damping,
                   generator=torch.Generator().manual_seed(args.seed))
    fit = train(sim.x, n_steps=args.n_steps, dt=args.dt, steps=args.steps, batch=args.batch,
                lr=args.lr, elbo=args.elbo, setting=args.setting, aux1_inputs=args.aux1_inputs,
                seed=args.seed,
                log_every=0 if args.quiet else max(1, args.steps // 10))
    res = summarize(fit, sim)
    res["seconds"] = time.perf_counter() - start
    # "drawn": mean and std of the omegas actually drawn, which the data can tell at best.
    emp_mu, emp_tau = float(sim.omega.mean()), float(sim.omega.std())
    print(f"population of {args.n} damped pendulums, {args.setting}, {args.steps} SVI steps, "
          f"batch {args.batch}, {res['seconds']:.1f} s")
    print("posterior of the population parameters [rad/s]:")
    print(f"{'':8s}{'truth':>8s}{'drawn':>8s}{'mean':>8s}   90% interval")
    for key, emp in (("mu", emp_mu), ("tau", emp_tau)):
        print(f"{key:8s}{res[key + '_true']:8.3f}{emp:8.3f}{res[key + '_mean']:8.3f}   "
              f"[{res[key + '_q05']:.3f}, {res[key + '_q95']:.3f}]")
    print(f"per-sequence omega: MAE of the posterior means {res['omega_mae']:.4f} rad/s")
    if res["regularizers"]:
        print(f"regularizers acting: {', '.join(res['regularizers'])}")
    return res


if __name__ == "__main__":
    main()
