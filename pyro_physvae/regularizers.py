"""The Phys-VAE regularizers as weighted terms that compose with any Pyro ELBO.

Phys-VAE models record their intermediate curves as deterministic sites: ``x_P`` (physics
only), ``x_PA`` (physics + in-ODE net), ``x_PB`` (physics + out-of-ODE net), ``x_mean`` (the
full decoder mean) and ``init`` (the initial state fed to the physics); the amortized guide
records ``unmixed``. Each run of a model or guide is a :class:`ComponentCall`: its sites carry
the Phys-VAE module itself in their ``infer`` dict, so the regularizers find the model and the
encoder *in the traces*, wherever the outer program calls them (under ``pyro.contrib.autoname``
scopes, several times for several data sets, inside a hierarchical program). Nothing is looked
up on the callables handed to ``SVI``.

:class:`PhysVAELoss` wraps an ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``RenyiELBO``, ...).
While the ELBO traces the guide and then the model for each particle, it pairs the k-th model
call with the k-th guide call, evaluates every :class:`Regularizer` on their sites and adds
``-sum(weight * R)`` to the model as one ``pyro.factor`` site, so the ELBO's own gradient
estimator sees the penalty and no second forward pass is needed. Where the guide that ran has
no Phys-VAE encoder (an AutoGuide, a hand-written guide), the terms that act through the
encoder (R_DA,1 and R_DA,2) are left out with a warning.

**Units.** Weights are given in the reference's units: relative to the *sum of squared errors*
of the reconstruction, as in the reference loss ``|x - x_mean|^2 + alpha R_ppc + ...``. The
Gaussian likelihood of a model weighs squared errors by its precision ``1 / (2 sigma^2)`` (about
8103 for the pendulum), so inside the ELBO each term is multiplied by that precision of the
model it acts on. A weight left ``None`` is the model's default (``model.reg_weights``).

Each regularizer returns one value per data point, shape ``(..., B)``; the factor is scaled
like the model's curves (the data plate's subsample scale ``N / B`` and any outer
``poutine.scale``), so that, like the likelihood, it estimates the sum over the data set. The
factor lives only inside :class:`PhysVAELoss`: models and guides used on their own
(``Predictive``, ArviZ, MCMC) contain no regularizer sites.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

REGULARIZER_SITE = "physvae_regularizer"
#: Key of the ``infer`` entry that ties a recorded site to its :class:`ComponentCall`.
_CALL_KEY = "physvae_call"
_call_numbers = itertools.count()
#: The site recorders active now, innermost last (see ``ComponentCall``).
_ACTIVE_RECORDERS: list[_SiteRecorder] = []


class ComponentCall:
    """One run of a Phys-VAE model or guide: records its sites where regularizers find them.

    :meth:`record` is ``pyro.deterministic`` with the component and the call attached to the
    site, so that :class:`PhysVAELoss` finds the model (``role="model"``; it reads the
    model's ``noise_scale``, ``reg_weights``, ``x_event_dim``, ``simulate_augmentation``) and
    the encoder (``role="guide"``; ``physics_mean``) in a trace, whatever the outer program.
    :class:`~pyro_physvae.base.PhysVAEModel` and ``PhysVAEGuide`` do this in their ``forward``;
    a model or guide written from scratch can too. Guide sites are marked auxiliary, as ELBOs
    require of guide-only observed sites.
    """

    def __init__(self, component: Any, role: str) -> None:
        if role not in ("model", "guide"):
            raise ValueError(f"role must be 'model' or 'guide', got {role!r}")
        self.component, self.role = component, role
        self.number = next(_call_numbers)
        self.is_guide = role == "guide"
        for recorder in _ACTIVE_RECORDERS:  # known to them even if it records no site
            recorder.add_call(self)

    def record(self, name: str, value: Tensor, event_dim: int | None = None) -> Tensor:
        """Record ``value`` as the deterministic site ``name`` (``event_dim``: its event
        rank, by default all of its dimensions); returns ``value``."""
        event_dim = value.dim() if event_dim is None else event_dim
        fn = dist.Delta(value, event_dim=event_dim).mask(False)
        infer: dict[str, Any] = {"_deterministic": True, _CALL_KEY: (self, name)}
        if self.is_guide:
            infer["is_auxiliary"] = True
        return pyro.sample(name, fn, obs=value, infer=infer)


@dataclass
class RecordedCall:
    """The sites (by their local names) and the plate scale of one :class:`ComponentCall`."""

    component: Any
    role: str
    sites: dict[str, Tensor] = field(default_factory=dict)
    scale: Any = 1.0


class _SiteRecorder(Messenger):
    """Keep the deterministic sites seen while active: ``values`` by site
    name, and ``calls``, the runs of Phys-VAE models and guides in order."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Tensor] = {}
        self._calls: dict[int, RecordedCall] = {}

    def __enter__(self):
        _ACTIVE_RECORDERS.append(self)
        return super().__enter__()

    def __exit__(self, *args):
        _ACTIVE_RECORDERS.remove(self)
        return super().__exit__(*args)

    def add_call(self, call: ComponentCall) -> RecordedCall:
        return self._calls.setdefault(call.number, RecordedCall(call.component, call.role))

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["infer"].get("_deterministic"):
            self.values[msg["name"]] = msg["value"]
            tag = msg["infer"].get(_CALL_KEY)
            if tag is not None:
                call, local = tag
                rec = self.add_call(call)
                rec.sites[local] = msg["value"]
                rec.scale = msg["scale"]

    @property
    def calls(self) -> list[RecordedCall]:
        return [self._calls[k] for k in sorted(self._calls)]

    def model_calls(self) -> list[RecordedCall]:
        """The Phys-VAE model calls seen, in order; ``ValueError`` if there was none."""
        found = [c for c in self.calls if c.role == "model"]
        if not found:
            raise ValueError("PhysVAELoss found no Phys-VAE model call in the model's trace; "
                             "its regularizers act on models derived from PhysVAEModel")
        return found


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


class Regularizer(Protocol):
    """A weighted penalty evaluated on the recorded sites of one model call and the guide
    call paired with it.

    ``weight`` is in the reference's units (see the module docstring), ``None`` for the
    model's default, whose position in ``model.reg_weights`` is ``default_index``.
    ``needs_encoder``: the term acts through the amortized guide and is left out where the
    guide has none.
    """

    name: str
    weight: float | None
    default_index: ClassVar[int]
    needs_encoder: ClassVar[bool]

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        """Return the penalty per data point, shape ``(..., B)``."""
        ...


def resolved_weight(reg: Regularizer, model: Any) -> float:
    """The weight of ``reg`` for ``model``: its own, or the model's default."""
    if reg.weight is not None:
        return float(reg.weight)
    defaults = getattr(model, "reg_weights", None)
    if defaults is None:
        raise ValueError(f"regularizer {reg.name!r} has no weight and {type(model).__name__} "
                         "has no reg_weights default; give the weight")
    return float(defaults[reg.default_index])


def model_precision(model: Any) -> float:
    """``1 / (2 sigma^2)``, the factor of squared errors in the model's Gaussian likelihood
    (with a noise scale per channel, the mean of the variances); 1 for a model without
    ``noise_scale``."""
    if not callable(getattr(model, "noise_scale", None)):
        return 1.0
    return float(0.5 / model.noise_scale().detach().pow(2).mean())


def _require(sites: Mapping[str, Tensor], names: Iterable[str], who: str) -> None:
    missing = [n for n in names if n not in sites]
    if missing:
        raise ValueError(
            f"{who} needs the sites {missing}, which this model/guide pair does not record; "
            "it applies to the phys+nn settings with the amortized guide"
        )


def _event_dim(model: Any, given: int | None) -> int:
    return int(getattr(model, "x_event_dim", 1)) if given is None else given


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

    weight: float | None = None
    event_dim: int | None = None  #: default: the model's ``x_event_dim``
    name: str = "ppc"
    default_index: ClassVar[int] = 0
    needs_encoder: ClassVar[bool] = False

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        _require(sites, ("x_P", "x_PB", "x_mean"), "R_ppc")
        x_p, x_pb, x_pab = sites["x_P"], sites["x_PB"], sites["x_mean"]
        event_dim = _event_dim(model, self.event_dim)
        sq = lambda a, b: squared_distance(a, b, event_dim)  # noqa: E731
        if "x_PA" not in sites:
            return sq(x_pb, x_p)
        x_pa = sites["x_PA"]
        return 0.25 * (sq(x_pa, x_p) + sq(x_pb, x_p) + sq(x_pab, x_pa) + sq(x_pab, x_pb))


@dataclass
class Unmixing:
    """R_DA,1: the guide's unmixed signal should look like the physics-only output,
    ``|unmixed - stopgrad(x_P)|^2``."""

    weight: float | None = None
    event_dim: int | None = None  #: default: the model's ``x_event_dim``
    name: str = "unmix"
    default_index: ClassVar[int] = 2
    needs_encoder: ClassVar[bool] = True

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        _require(sites, ("unmixed", "x_P"), "R_DA,1")
        return squared_distance(sites["unmixed"], sites["x_P"].detach(), _event_dim(model, self.event_dim))


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

    weight: float | None = None
    name: str = "augment"
    default_index: ClassVar[int] = 1
    needs_encoder: ClassVar[bool] = True

    def __call__(self, model: Any, guide: Any, sites: Mapping[str, Tensor]) -> Tensor:
        static = getattr(model, "init_event_dim", 0) is None
        _require(sites, ("x_mean",) if static else ("init",), "R_DA,2")
        for obj, method in ((model, "simulate_augmentation"), (guide, "physics_mean")):
            if not callable(getattr(obj, method, None)):
                raise TypeError(f"R_DA,2 needs {type(obj).__name__}.{method}() (see "
                                "PhysVAEModel.simulate_augmentation and PhysVAEGuide.physics_mean)")
        with torch.no_grad():
            if static:
                batch = sites["x_mean"].shape[-(getattr(model, "x_event_dim", 1) + 1)]
                truth, x_sim = model.simulate_augmentation(None, batch)
            else:
                truth, x_sim = model.simulate_augmentation(sites["init"])
        if not truth:
            raise ValueError(f"R_DA,2 needs physics parameters to simulate, and {type(model).__name__} "
                             "has none; leave it out (beta=0)")
        estimate = guide.physics_mean(x_sim)
        periods = {p.name: getattr(p, "period", None) for p in getattr(model, "physics_parameters", ())}
        return sum(wrapped_error(estimate[k] - truth[k], periods.get(k)).pow(2) for k in truth)


def wrapped_error(error: Tensor, period: float | None) -> Tensor:
    """``error`` itself, or for an angle with ``period`` its representative in
    ``[-period / 2, period / 2]``."""
    if period is None:
        return error
    return torch.remainder(error + 0.5 * period, period) - 0.5 * period


class NonFiniteStep(FloatingPointError):
    """A loss or gradient that is not finite; the step that produced it must not be applied."""


def refuse_non_finite_step(loss: float, params: list[Tensor]) -> None:
    """Raise :class:`NonFiniteStep`, with the gradients of ``params`` cleared so that no
    optimiser can apply them, if ``loss`` or any of those gradients is not finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if math.isfinite(loss) and all_finite(grads):
        return
    for p in params:
        p.grad = None
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"a gradient is not finite (loss {loss:.6g})"
    raise NonFiniteStep(f"{what}; the step is refused and the parameters keep their values (check "
                        "the data's scale and the learning rate)")


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device synchronisation)."""
    if not tensors:
        return True
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.device == device and t.dtype == dtype for t in tensors):
        # The gradient scaler's fused check, with a scale of exactly 1 (x * 1.0 == x): one pass
        # over all tensors, about 13 times faster on the CPU than the maximum |value| below
        # (0.16 against 2.1 ms for the pendulum's 72 gradients).
        found = torch.zeros(1, dtype=torch.float32, device=device)
        try:
            with torch.no_grad():
                torch._amp_foreach_non_finite_check_and_unscale_(
                    tensors, found, torch.ones(1, dtype=torch.float32, device=device))
            return not bool(found)
        except (RuntimeError, NotImplementedError):  # a torch without the CPU kernel, or a dtype
            pass
    # The largest |value| of each tensor cannot overflow, unlike a 2-norm.
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all())


class PhysVAELoss(ELBO):
    """An ELBO plus weighted regularizers, usable wherever Pyro's ``SVI`` takes a loss.

    Example::

        loss = PhysVAELoss(Trace_ELBO())                       # the model's default weights
        loss = PhysVAELoss(Trace_ELBO(), alpha=1e-2, beta=10.0, gamma=1e-3)
        loss = PhysVAELoss(Trace_ELBO(), [PosteriorPredictiveCheck(1e-2), Unmixing(1e-3)])
        svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=loss)

    ``model`` and ``guide`` of ``SVI`` may be any programs that call Phys-VAE models and
    guides: the regularizers act on the calls they find in the traces (module docstring).

    Args:
        elbo: any Pyro ELBO; particles, vectorisation and plate nesting are its own.
            Default: ``Trace_ELBO()``.
        regularizers: terms with a ``name``, a ``weight`` (reference units, ``None``: the
            model's default) and a per-datum value. Default: :func:`phys_vae_regularizers`
            of ``alpha``, ``beta``, ``gamma``.
        alpha, beta, gamma: weights of R_ppc, R_DA,2 and R_DA,1 when ``regularizers`` is not
            given (``None``: the model's default; 0 leaves a term out).
        kl_weight: weight of the latents' terms ``log p(z) - log q(z)``. Default: as in the
            reference, ``1 + `` the R_ppc weight (0 without an R_ppc term). With a weight
            other than 1 the objective is no longer the ELBO itself.

    After each call, :attr:`last_terms` holds the mean per-datum value of every regularizer
    (unweighted) for logging, and :attr:`skipped` the names of terms left out for want of an
    encoder.
    """

    def __init__(self, elbo: ELBO | None = None, regularizers: Iterable[Regularizer] | None = None,
                 *, alpha: float | None = None, beta: float | None = None, gamma: float | None = None,
                 kl_weight: float | None = None) -> None:
        self.elbo = elbo if elbo is not None else Trace_ELBO()
        super().__init__(num_particles=self.elbo.num_particles,
                         max_plate_nesting=self.elbo.max_plate_nesting,
                         vectorize_particles=self.elbo.vectorize_particles)
        if regularizers is None:
            regularizers = phys_vae_regularizers(alpha, beta, gamma)
        elif (alpha, beta, gamma) != (None, None, None):
            raise ValueError("give either regularizers or alpha/beta/gamma, not both")
        self.regularizers = list(regularizers)
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}")
        for r in self.regularizers:
            if r.weight is not None and not (r.weight >= 0 and r.weight < float("inf")):
                raise ValueError(f"regularizer {r.name!r} needs a finite weight >= 0, got {r.weight}")
        if kl_weight is not None and not (kl_weight > 0 and kl_weight < float("inf")):
            raise ValueError(f"kl_weight must be positive and finite, got {kl_weight}")
        self._kl_weight = kl_weight
        self.last_terms: dict[str, float] = {}
        self.skipped: set[str] = set()
        self._found_kl: float | None = None

    def __repr__(self) -> str:
        terms = ", ".join(f"{r.name}={'default' if r.weight is None else format(r.weight, 'g')}"
                          for r in self.regularizers)
        kl = "1 + alpha" if self._kl_weight is None else format(self._kl_weight, "g")
        return f"PhysVAELoss({type(self.elbo).__name__}, [{terms}], kl_weight={kl})"

    def kl_weight_for(self, model: Any | None) -> float:
        """The KL weight: as given, or ``1 +`` the R_ppc weight resolved for ``model``."""
        if self._kl_weight is not None:
            return self._kl_weight
        ppc = [r for r in self.regularizers if isinstance(r, PosteriorPredictiveCheck)]
        if not ppc:
            return 1.0
        if ppc[0].weight is None and model is None:
            raise ValueError("the R_ppc weight is the model's default, but no Phys-VAE model "
                             "was found; give alpha or kl_weight")
        return 1.0 + resolved_weight(ppc[0], model)

    @property
    def kl_weight(self) -> float:
        """The KL weight where it does not depend on the model (else see :meth:`kl_weight_for`)."""
        return self.kl_weight_for(None)

    def _penalty(self, model_call: RecordedCall, guide_call: RecordedCall | None) -> Tensor | None:
        """``sum_r weight_r * precision * R_r``, summed over the call's batch, ``(..., 1)``."""
        model = model_call.component
        encoder = None
        if guide_call is not None and callable(getattr(guide_call.component, "physics_mean", None)):
            encoder = guide_call.component
        sites = {**(guide_call.sites if guide_call is not None else {}), **model_call.sites}
        precision = model_precision(model)
        total = None
        for reg in self.regularizers:
            weight = resolved_weight(reg, model)
            if weight == 0:
                continue
            if reg.needs_encoder and encoder is None:
                self._skip(reg, guide_call)
                continue
            value = reg(model, encoder, sites)
            self.last_terms[reg.name] = float(value.detach().mean())
            term = (model_call.scale * precision * weight * value).sum(-1, keepdim=True)
            total = term if total is None else total + term
        return total

    def _skip(self, reg: Regularizer, guide_call: RecordedCall | None) -> None:
        if reg.name in self.skipped:
            return
        self.skipped.add(reg.name)
        what = "no Phys-VAE guide ran" if guide_call is None else \
            f"the guide {type(guide_call.component).__name__} has no encoder (physics_mean)"
        warnings.warn(f"regularizer {reg.name!r} acts through the amortized encoder and is left "
                      f"out: {what} (an AutoGuide, for example)", UserWarning, stacklevel=4)

    def _wrap(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
              ) -> tuple[Callable, Callable]:
        guide_calls: list[RecordedCall] = []
        kl_weight = self._resolved_kl_weight(model, args, kwargs)
        run_model, run_guide = model, guide
        if kl_weight != 1.0:
            run_model, run_guide = _ScaleLatents(kl_weight)(model), _ScaleLatents(kl_weight)(guide)

        def recorded_guide(*args, **kwargs):
            with _SiteRecorder() as rec:
                out = run_guide(*args, **kwargs)
            guide_calls[:] = [c for c in rec.calls if c.role == "guide"]
            return out

        def regularized_model(*args, **kwargs):
            with _SiteRecorder() as rec:
                out = run_model(*args, **kwargs)
            if not self.regularizers:
                return out
            models = rec.model_calls()
            guides = list(guide_calls)
            if guides and len(guides) != len(models):
                raise ValueError(f"the model ran {len(models)} Phys-VAE model(s) but the guide "
                                 f"{len(guides)} Phys-VAE guide(s); they are paired in order")
            total = None
            for k, m in enumerate(models):
                term = self._penalty(m, guides[k] if guides else None)
                if term is not None:
                    total = term if total is None else total + term
            if total is not None:
                # One factor per draw, keeping a trailing singleton so that it broadcasts
                # against any particle or sample plates on the left.
                pyro.factor(REGULARIZER_SITE, -total)
            return out

        return regularized_model, recorded_guide

    def _resolved_kl_weight(self, model: Callable, args: tuple, kwargs: dict) -> float:
        """The KL weight. Where it is ``1 +`` the model's default R_ppc weight, the guide
        (which runs first) needs it before the model has run: the first call finds the
        Phys-VAE model by one prior run of the program, outside any trace, and keeps it."""
        needs_model = self._kl_weight is None and any(
            isinstance(r, PosteriorPredictiveCheck) and r.weight is None for r in self.regularizers)
        if not needs_model:
            return self.kl_weight_for(None)
        if self._found_kl is None:
            with torch.no_grad(), pyro.poutine.block(), _SiteRecorder() as rec:
                model(*args, **kwargs)
            self._found_kl = self.kl_weight_for(rec.model_calls()[0].component)
        return self._found_kl

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        m, g = self._wrap(model, guide, args, kwargs)
        return self.elbo.loss(m, g, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss and its gradients, as the wrapped ELBO gives them. A non-finite loss or
        gradient raises :class:`NonFiniteStep` with the gradients cleared, so that an
        optimiser (``SVI.step`` included) leaves every parameter as it was."""
        m, g = self._wrap(model, guide, args, kwargs)
        with pyro.poutine.trace(param_only=True) as tr:
            value = self.elbo.loss_and_grads(m, g, *args, **kwargs)
        refuse_non_finite_step(value, [site["value"].unconstrained() for site in tr.trace.nodes.values()])
        return value

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        m, g = self._wrap(model, guide, args, kwargs)
        return self.elbo.differentiable_loss(m, g, *args, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        m, g = self._wrap(model, guide, args, kwargs)
        return self.elbo._get_trace(m, g, args, kwargs)


def phys_vae_regularizers(alpha: float | None = None, beta: float | None = None,
                          gamma: float | None = None) -> list[Regularizer]:
    """The paper's three terms with weights alpha (R_ppc), beta (R_DA,2), gamma (R_DA,1) in
    the reference's units; ``None`` takes the model's default (``model.reg_weights``), and
    a weight of 0 leaves the term out. Event ranks come from the model."""
    terms: list[Regularizer] = [PosteriorPredictiveCheck(alpha), PhysicsAugmentation(beta),
                                Unmixing(gamma)]
    return [t for t in terms if t.weight is None or t.weight > 0]
