"""The Phys-VAE regularizers as weighted terms that compose with any Pyro ELBO.

Models record their intermediate curves as ``pyro.deterministic`` sites: ``x_P`` (physics
only), ``x_PA`` (physics + in-ODE net), ``x_PB`` (physics + out-of-ODE net), ``x_mean`` (the
full decoder mean) and ``init`` (the initial state fed to the physics); the amortized guide
records ``unmixed``. :class:`PhysVAELoss` wraps an ELBO (``Trace_ELBO``,
``TraceMeanField_ELBO``, ``RenyiELBO``, ...). While the ELBO traces the guide and then the
model for each particle, it reads those sites, evaluates every :class:`Regularizer` on them
and adds ``-sum(weight * R)`` to the model as one ``pyro.factor`` site, so the ELBO's own
gradient estimator sees the penalty and no second forward pass is needed.

Each regularizer returns one value per data point, shape ``(..., B)``; the factor is scaled by
the data plate's subsample scale ``N / B`` so that, like the likelihood, it is an estimate of
the sum over the whole data set. The factor lives only inside :class:`PhysVAELoss`: models
and guides used on their own (``Predictive``, ArviZ, MCMC) contain no regularizer sites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

REGULARIZER_SITE = "physvae_regularizer"


class _SiteRecorder(Messenger):
    """Keep the values (and plate scales) of the deterministic sites seen while active."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Tensor] = {}
        self.scales: dict[str, Any] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["infer"].get("_deterministic"):
            self.values[msg["name"]] = msg["value"]
            self.scales[msg["name"]] = msg["scale"]


class _ScaleLatents(Messenger):
    """Multiply the scale of every unobserved sample site (the latents) by ``weight``.

    Applied to both model and guide it weighs ``log p(z) - log q(z)``, i.e. the KL part of
    the ELBO, by ``weight`` (Pyro's mean-field ELBO reads the guide site's scale for its
    analytic KL); observations and recorded curves are untouched.
    """

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


def guide_deterministic(name: str, value: Tensor, event_dim: int | None = None) -> Tensor:
    """Record an intermediate value of a *guide* as a deterministic site.

    Like ``pyro.deterministic`` but marked auxiliary, as ELBOs require of guide-only observed
    sites; regularizers (e.g. :class:`Unmixing`) read it by name.
    """
    event_dim = value.dim() if event_dim is None else event_dim
    fn = dist.Delta(value, event_dim=event_dim).mask(False)
    return pyro.sample(name, fn, obs=value, infer={"_deterministic": True, "is_auxiliary": True})


class Regularizer(Protocol):
    """A weighted penalty evaluated on recorded sites. ``weight`` multiplies the value."""

    name: str
    weight: float

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        """Return the penalty per data point, shape ``(..., B)``."""
        ...


def _require(sites: Mapping[str, Tensor], names: Iterable[str], who: str) -> None:
    missing = [n for n in names if n not in sites]
    if missing:
        raise ValueError(
            f"{who} needs the sites {missing}, which this model/guide pair does not record; "
            "it applies to the phys+nn settings with the amortized guide"
        )


def squared_distance(a: Tensor, b: Tensor, event_dim: int = 1) -> Tensor:
    """Sum of squared differences over the rightmost ``event_dim`` dimensions."""
    d = (a - b).pow(2)
    return d.sum(tuple(range(-event_dim, 0))) if event_dim else d


@dataclass
class PosteriorPredictiveCheck:
    """R_ppc, the "least action" check on the decoder: the neural parts should change the
    physics-only output as little as needed.

    ``0.25 * (|x_PA - x_P|^2 + |x_PB - x_P|^2 + |x_PAB - x_PA|^2 + |x_PAB - x_PB|^2)``, or
    ``|x_PB - x_P|^2`` for a model without an in-ODE net (no ``x_PA`` site).
    """

    weight: float
    event_dim: int = 1
    name: str = "ppc"

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        _require(sites, ("x_P", "x_PB", "x_mean"), "R_ppc")
        x_p, x_pb, x_pab = sites["x_P"], sites["x_PB"], sites["x_mean"]
        sq = lambda a, b: squared_distance(a, b, self.event_dim)  # noqa: E731
        if "x_PA" not in sites:
            return sq(x_pb, x_p)
        x_pa = sites["x_PA"]
        return 0.25 * (sq(x_pa, x_p) + sq(x_pb, x_p) + sq(x_pab, x_pa) + sq(x_pab, x_pb))


@dataclass
class Unmixing:
    """R_DA,1: the guide's unmixed signal should look like the physics-only output,
    ``|unmixed - stopgrad(x_P)|^2``."""

    weight: float
    event_dim: int = 1
    name: str = "unmix"

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        _require(sites, ("unmixed", "x_P"), "R_DA,1")
        return squared_distance(sites["unmixed"], sites["x_P"].detach(), self.event_dim)


@dataclass
class PhysicsAugmentation:
    """R_DA,2, physics-based data augmentation: draw z_P uniformly over its range, simulate
    physics-only data from the observed initial state, and penalise the squared error of the
    guide's physics-encoder mean on that data, ``sum_k (encoder_k(x_sim) - z_k)^2``.

    The model must offer ``simulate_augmentation(init) -> (truth: dict, x_sim)`` and the
    guide ``physics_mean(x) -> dict`` with the same keys. A model that reads no initial state
    (``init_event_dim = None``, e.g. static physics such as a galaxy renderer) records no
    ``init`` site; it is called as ``simulate_augmentation(None, B)`` for the batch size ``B``
    of its ``x_mean`` site. A physics parameter with a ``period`` (an angle that the physics
    sees modulo ``period``) has its error wrapped into ``[-period / 2, period / 2]``.
    """

    weight: float
    name: str = "augment"

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        static = getattr(model, "init_event_dim", 0) is None
        _require(sites, ("x_mean",) if static else ("init",), "R_DA,2")
        for obj, method in ((model, "simulate_augmentation"), (guide, "physics_mean")):
            if not callable(getattr(obj, method, None)):
                raise TypeError(
                    f"R_DA,2 needs {type(obj).__name__}.{method}(); use it with the "
                    "amortized Phys-VAE guide, not an AutoGuide"
                )
        with torch.no_grad():
            if static:
                batch = sites["x_mean"].shape[-(getattr(model, "x_event_dim", 1) + 1)]
                truth, x_sim = model.simulate_augmentation(None, batch)
            else:
                truth, x_sim = model.simulate_augmentation(sites["init"])
        estimate = guide.physics_mean(x_sim)
        periods = {p.name: getattr(p, "period", None) for p in getattr(model, "physics_parameters", ())}
        return sum(wrapped_error(estimate[k] - truth[k], periods.get(k)).pow(2) for k in truth)


def wrapped_error(error: Tensor, period: float | None) -> Tensor:
    """``error`` itself, or for an angle with ``period`` its representative in
    ``[-period / 2, period / 2]``."""
    if period is None:
        return error
    return torch.remainder(error + 0.5 * period, period) - 0.5 * period


class PhysVAELoss(ELBO):
    """An ELBO plus weighted regularizers, usable wherever Pyro's ``SVI`` takes a loss.

    Example::

        loss = PhysVAELoss(Trace_ELBO(), [PosteriorPredictiveCheck(1e-2), Unmixing(1e-3)])
        svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=loss)

    Args:
        elbo: any Pyro ELBO; particles, vectorisation and plate nesting are its own.
        regularizers: terms with a ``name``, a ``weight`` and a per-datum value.
        kl_weight: weight of the latents' terms ``log p(z) - log q(z)``; the reference adds
            the R_ppc weight alpha to the KL weight, ``kl_weight = 1 + alpha``. With a weight
            other than 1 the objective is no longer the ELBO itself.

    After each call, :attr:`last_terms` holds the mean per-datum value of every regularizer
    (unweighted) for logging.
    """

    def __init__(self, elbo: ELBO | None = None, regularizers: Iterable[Regularizer] = (),
                 kl_weight: float = 1.0) -> None:
        if not kl_weight > 0:
            raise ValueError(f"kl_weight must be positive, got {kl_weight}")
        self.elbo = elbo if elbo is not None else Trace_ELBO()
        self.kl_weight = float(kl_weight)
        super().__init__(num_particles=self.elbo.num_particles,
                         max_plate_nesting=self.elbo.max_plate_nesting,
                         vectorize_particles=self.elbo.vectorize_particles)
        self.regularizers = list(regularizers)
        self.last_terms: dict[str, float] = {}
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}")
        for r in self.regularizers:
            if not r.weight >= 0:
                raise ValueError(f"regularizer {r.name!r} needs a weight >= 0, got {r.weight}")

    def __repr__(self) -> str:
        terms = ", ".join(f"{r.name}={r.weight:g}" for r in self.regularizers)
        return f"PhysVAELoss({type(self.elbo).__name__}, [{terms}], kl_weight={self.kl_weight:g})"

    def _wrap(self, model: Callable, guide: Callable) -> tuple[Callable, Callable]:
        run_model, run_guide = model, guide
        if self.kl_weight != 1.0:
            run_model, run_guide = _ScaleLatents(self.kl_weight)(model), _ScaleLatents(self.kl_weight)(guide)
        if not self.regularizers:
            return run_model, run_guide
        guide_sites: dict[str, Tensor] = {}

        def recorded_guide(*args, **kwargs):
            with _SiteRecorder() as rec:
                out = run_guide(*args, **kwargs)
            guide_sites.clear()
            guide_sites.update(rec.values)
            return out

        def regularized_model(*args, **kwargs):
            with _SiteRecorder() as rec:
                out = run_model(*args, **kwargs)
            sites = {**guide_sites, **rec.values}
            total = 0.0
            for reg in self.regularizers:
                value = reg(model, guide, sites)
                self.last_terms[reg.name] = float(value.detach().mean())
                total = total + reg.weight * value
            scale = next(iter(rec.scales.values()), 1.0)
            # One factor per draw, keeping a trailing singleton so that it broadcasts
            # against any particle or sample plates on the left.
            pyro.factor(REGULARIZER_SITE, -(scale * total).sum(-1, keepdim=True))
            return out

        return regularized_model, recorded_guide

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        m, g = self._wrap(model, guide)
        return self.elbo.loss(m, g, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        m, g = self._wrap(model, guide)
        return self.elbo.loss_and_grads(m, g, *args, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        m, g = self._wrap(model, guide)
        return self.elbo.differentiable_loss(m, g, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        m, g = self._wrap(model, guide)
        return self.elbo._get_trace(m, g, args, kwargs)


def phys_vae_regularizers(alpha: float, beta: float, gamma: float,
                          event_dim: int = 1) -> list[Regularizer]:
    """The paper's three terms with weights alpha (R_ppc), beta (R_DA,2), gamma (R_DA,1);
    zero weights are left out. ``event_dim`` is the rank of one observation (1 for a time
    series, 2 for a space-time field): the curve distances sum over it."""
    terms: list[Regularizer] = [
        PosteriorPredictiveCheck(alpha, event_dim=event_dim),
        PhysicsAugmentation(beta),
        Unmixing(gamma, event_dim=event_dim),
    ]
    return [t for t in terms if t.weight > 0]
