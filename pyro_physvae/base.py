"""The Pyro skeleton that every Phys-VAE model and amortized guide of the zoo shares.

A system supplies the physics and the networks (``decode`` for a model, the encoders for a
guide); these base classes supply the probabilistic program around them, so that all systems
have the same sites, plates and hooks:

* model: ``data`` plate (dim -1, minibatch through ``subsample``); deterministic ``init``
  (the initial state read off the data, for systems that have one); latent states (e.g. an
  unobserved initial state) and auxiliary latents ``z_A1``/``z_A2`` with standard Normal
  priors; the physics latents with their :class:`~pyro_physvae.physics.PhysicalParameter`
  priors (replaceable per call, for hierarchical programs); the curves returned by ``decode``
  as deterministic sites; the observation ``x`` with the system's event rank.
* guide: the same plate; ``q(state | x)`` and ``q(z_A | x)`` from their encoders; in settings with both
  physics and networks, an ``unmixed`` signal (recorded for R_DA,1) from which the physics
  encoder gives ``q(z_P | x)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from pyro_physvae.arguments import check_keyword_arguments
from pyro_physvae.ode import check_method, integrate, time_grid
from pyro_physvae.physics import PhysicalParameter
from pyro_physvae.regularizers import ComponentCall
from pyro_physvae.settings import Setting
from pyro_physvae.validation import check_positive_int, check_sequences


def _checked_constructor(cls: type) -> None:
    """Make ``cls(...)`` check its arguments against ``cls.__init__``'s annotations (see
    :func:`~pyro_physvae.arguments.check_keyword_arguments`) before the constructor runs, so
    that a bad size is refused by name instead of failing inside torch. Only the class being
    built checks: a subclass's constructor calling its parent's does not check twice."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_checks_arguments", False):
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        if type(self) is cls:
            bound = signature.bind_partial(self, *args, **kwargs).arguments
            given = {k: v for k, v in list(bound.items())[1:]
                     if signature.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                             inspect.Parameter.VAR_KEYWORD)}
            check_keyword_arguments(cls, given)
        init(self, *args, **kwargs)

    checked_init._checks_arguments = True
    cls.__init__ = checked_init


def check_input_tensor(x: object, dtype: torch.dtype, name: str = "x") -> None:
    """Refuse observations that are not a floating-point tensor of ``dtype`` (the module's
    parameter dtype), naming the conversion that fixes it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}; "
                        f"convert it with torch.as_tensor({name}, dtype={dtype})")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the parameters are {dtype}; "
                        f"convert it with {name}.to({dtype})")


class _InputCheck:
    """Checks a module's input once per tensor: a tensor seen before, unchanged (same
    storage, shape and version counter), is not checked again at every minibatch step."""

    def __init__(self) -> None:
        self._seen: tuple | None = None

    def needed(self, x: object) -> bool:
        if not isinstance(x, Tensor):
            return True
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)
        return key != self._seen

    def passed(self, x: Tensor) -> None:
        self._seen = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


def _input_check(module: torch.nn.Module) -> _InputCheck:
    return module.__dict__.setdefault("_physvae_input_check", _InputCheck())


def check_observation_values(x: Tensor, event_dim: int, shape: tuple[int, ...] | None,
                             name: str = "x", *, n_steps: int | None = None) -> None:
    """Refuse observations ``x (N, *event)`` of the wrong rank (``1 + event_dim``), with no
    rows, of another length than ``n_steps`` on the last (time) axis or another shape than
    ``shape`` per observation (each if given), or with NaN or infinite values."""
    check_sequences(x, name, rank=1 + event_dim, n_steps=n_steps)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        want = ", ".join(map(str, shape))
        raise ValueError(f"{name} must have shape (N, {want}), got {tuple(x.shape)}")


def data_plate_size(x: Tensor, size: int | None, subsample: Tensor | None) -> int:
    """The size N of the ``data`` plate for observations ``x``: its rows, or ``size`` where
    ``x`` holds just the rows ``subsample`` of an ``N = size``-row data set (a minibatch
    read from a data set left on disk, see :class:`~pyro_physvae.data.lazy.LazyRows`).

    Raises:
        ValueError: ``size`` disagrees with ``x`` in both readings.
    """
    rows = x.shape[0]
    if size is None or size == rows:
        return rows
    size = check_positive_int(size, "size")
    if subsample is not None and subsample.dim() == 1 and subsample.shape[0] == rows and size > rows:
        return size
    raise ValueError(f"size={size} disagrees with the {rows} rows given: pass all N = size rows, "
                     f"or just the rows of subsample= (a minibatch of indices below size)")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter or buffer (default dtype if none)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def standard_normal(dim: int, like: Tensor) -> dist.Distribution:
    """``Normal(0, I)`` over a vector of size ``dim`` (the prior of an auxiliary latent)."""
    zero = torch.zeros(dim, dtype=like.dtype, device=like.device)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


class PhysVAEModel(PyroModule):
    """Base of the generative models. Subclasses set in ``__init__``:

    * ``setting`` (:class:`Setting`), ``n_steps`` (length of the time axis, last in ``x``);
    * ``aux_dims``: ``{"z_A1": dim, ...}`` for the settings with networks (empty otherwise);
    * ``state_dims``: ``{"y0": dim, ...}`` for other latents with standard Normal priors,
      such as an initial state that the data do not show or the code of a learnt energy,
      for the settings that have them (default: none);
    * ``physics_parameters``: the physics latents, as a property (empty for ``nn-only``);

    and implement :meth:`decode_sites`. The building blocks :meth:`setup_time_grid` (time
    grid and ODE solver options), :meth:`setup_noise` (observation noise) and :meth:`solve`
    (integration with those options) are public, for models outside this package.

    Class attributes:

    * ``x_event_dim``: rank of one observation (1 for a series ``(T,)``, 2 for a field
      ``(X, T)`` or channels ``(C, T)``, 3 for an image ``(C, H, W)``);
    * ``observation_dims``: the names of those dimensions, as in the data sets
      (``("time",)``, ``("space", "time")``, ...); ArviZ output and NUTS use them;
    * ``init_event_dim``: rank of the initial state read off ``x`` (``None`` for a system
      that reads none: static physics, or a latent initial state);
    * ``reg_weights``: the default regularizer weights ``(alpha, beta, gamma)`` of
      phys+nn+reg (R_ppc, R_DA,2, R_DA,1), in the reference's units (relative to the sum of
      squared errors; see :mod:`pyro_physvae.regularizers`);
    * ``supports_rollout``: ``decode_sites`` takes ``n_steps=`` and can run past the window.

    Static systems need no time grid: they skip :meth:`setup_time_grid` and leave
    ``n_steps`` unset.
    """

    x_event_dim: int = 1
    observation_dims: tuple[str, ...] = ("time",)
    init_event_dim: int | None = 0
    state_dims: Mapping[str, int] = {}
    #: The paper's pendulum weights; systems set their own.
    reg_weights: tuple[float, float, float] = (1e-2, 1e-1, 1e-3)
    #: ``decode_sites`` takes ``n_steps=`` and can run past the training window.
    supports_rollout: bool = False
    setting: Setting
    n_steps: int
    aux_dims: dict[str, int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if len(cls.observation_dims) != cls.x_event_dim:
            raise TypeError(f"{cls.__name__}.observation_dims {cls.observation_dims} must name "
                            f"x_event_dim = {cls.x_event_dim} dimension(s)")
        _checked_constructor(cls)

    @property
    def physics_parameters(self) -> tuple[PhysicalParameter, ...]:
        raise NotImplementedError

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Names of the latent sample sites, physics parameters first."""
        return (tuple(p.name for p in self.physics_parameters) + tuple(self.state_dims)
                + tuple(self.aux_dims))

    def latent_event_shapes(self) -> dict[str, tuple[int, ...]]:
        """The event shape of each latent site: ``()`` for a physics parameter, ``(dim,)``
        for a state or auxiliary latent."""
        return {**{p.name: () for p in self.physics_parameters},
                **{k: (int(v),) for k, v in {**self.state_dims, **self.aux_dims}.items()}}

    def observation_coords(self) -> dict[str, Tensor]:
        """Coordinates of the observation dimensions that the model knows: ``time`` (the
        observation times [s]) for a model with a time grid."""
        t = getattr(self, "t", None)
        return {"time": t} if t is not None and "time" in self.observation_dims else {}

    def decode_sites(self, init: Tensor | None, latents: Mapping[str, Tensor], *,
                     clamp: bool = True) -> dict[str, Tensor]:
        """Curves (at least ``x_mean``) from the observed initial state (``None`` for a
        system that reads none) and the latents named by site. ``clamp``: clamp the physics
        parameters to their feasible ranges, as the generative program does; ``False``
        decodes values beyond them (counterfactuals)."""
        raise NotImplementedError

    def simulate_augmentation(self, init: Tensor | None, size: int | None = None
                              ) -> tuple[dict[str, Tensor], Tensor]:
        """Physics-only data for R_DA,2 (:class:`~pyro_physvae.regularizers.PhysicsAugmentation`):
        each physics parameter uniform over its range, the auxiliary and state latents at
        zero, decoded from the initial states ``init (..., B, *init_event)`` (or, for a system
        that reads none, for ``size`` rows).

        Returns ``({name: (..., B)}, x_P (..., B, *event))``. This default decodes with
        :meth:`decode_sites` and keeps its ``x_P``; override it where a physics-only solve
        is cheaper.
        """
        if init is None:
            if size is None:
                raise ValueError("give the initial states init or the number of rows size")
            batch, like = (int(size),), self._dtype_probe()
        else:
            batch, like = init.shape[:init.dim() - (self.init_event_dim or 0)], init
        truth = {p.name: p.sample_uniform(batch, dtype=like.dtype, device=like.device)
                 for p in self.physics_parameters}
        rest = {k: like.new_zeros(*batch, d) for k, d in {**self.state_dims, **self.aux_dims}.items()}
        curves = self.decode_sites(init, {**truth, **rest})
        if "x_P" not in curves:
            raise ValueError(f"{type(self).__name__}.decode_sites records no physics-only x_P")
        return truth, curves["x_P"]

    def noise_scale(self) -> Tensor:
        """Standard deviation of the Gaussian observation noise."""
        return torch.exp(0.5 * self.x_lnvar)

    def setup_time_grid(self, n_steps: int, dt: float, method: str = "euler", substeps: int = 1,
                        rtol: float = 1e-5, atol: float = 1e-6) -> None:
        """Check and keep the time grid and the ODE solver options (call in ``__init__``).

        Args:
            n_steps: observed time steps T (at least 2), the last axis of ``x``.
            dt: their interval [s].
            method: a solver of :data:`pyro_physvae.ode.METHODS` (native fixed-step
                ``euler``, ``midpoint``, ``heun3``, ``rk4``, or any torchdiffeq method).
            substeps: fixed-step solver steps per observation interval.
            rtol, atol: tolerances of adaptive solvers.

        Sets ``n_steps``, ``dt``, ``method``, ``substeps``, ``rtol``, ``atol`` and registers
        the buffer ``t (T,)`` of observation times ``0, dt, ..., (T - 1) dt``.
        """
        if n_steps < 2:
            raise ValueError(f"n_steps must be at least 2, got {n_steps}")
        for name, value in (("dt", dt), ("rtol", rtol), ("atol", atol)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if substeps < 1:
            raise ValueError(f"substeps must be a positive integer, got {substeps}")
        self.n_steps, self.dt = int(n_steps), float(dt)
        self.method, self.substeps = check_method(method), int(substeps)
        self.rtol, self.atol = float(rtol), float(atol)
        self.register_buffer("t", time_grid(self.n_steps, self.dt))

    def setup_noise(self, x_lnvar: float, learn_noise: bool = False) -> None:
        """The observation noise ``x ~ Normal(x_mean, exp(x_lnvar / 2))``: its log variance
        as a learnt parameter (``learn_noise``) or a fixed buffer ``x_lnvar``."""
        lnvar = torch.tensor(float(x_lnvar))
        if learn_noise:
            self.x_lnvar = PyroParam(lnvar)
        else:
            self.register_buffer("x_lnvar", lnvar)

    def solve(self, rhs, y0: Tensor, t: Tensor | None = None) -> Tensor:
        """Solve ``dy/dt = rhs(t, y)`` from ``y0 (..., D)`` with the model's solver options
        on ``t`` (default: the observation times); returns ``(..., T, D)``, time before the
        state (see :func:`pyro_physvae.ode.integrate`)."""
        return integrate(rhs, y0, self.t if t is None else t, method=self.method,
                         substeps=self.substeps, rtol=self.rtol, atol=self.atol,
                         uniform=True if t is None else None)  # self.t is evenly spaced

    def observation_shape(self) -> tuple[int, ...] | None:
        """Expected shape of one observation: ``(n_steps,)`` for a series; systems with
        more event dimensions override this (``None``: not checked beyond the rank)."""
        n_steps = getattr(self, "n_steps", None)
        return (n_steps,) if self.x_event_dim == 1 and n_steps is not None else None

    def initial_condition(self, x: Tensor) -> Tensor | None:
        """The initial state read off the observations: their first time step (``None``
        for a system with ``init_event_dim = None``)."""
        return None if self.init_event_dim is None else x[..., 0]

    def check_observations(self, x: Tensor) -> None:
        """Refuse observations of the wrong rank or shape, with no rows, or with NaN or
        infinite values (systems may add checks, e.g. a value range)."""
        check_observation_values(x, self.x_event_dim, self.observation_shape(),
                                 n_steps=getattr(self, "n_steps", None))

    def forward(
        self,
        x: Tensor | None = None,
        *,
        init: Tensor | None = None,
        size: int | None = None,
        subsample: Tensor | None = None,
        priors: Mapping[str, dist.Distribution] | None = None,
    ) -> Tensor:
        """Run the generative program.

        Args:
            x: observations ``(N, *event)``, time last, or ``None`` to generate.
            init: initial states ``(N, *init_event)``; default: read off ``x``. Systems
                with ``init_event_dim = None`` take none.
            size: number N of rows to generate when neither ``x`` nor ``init`` gives it.
            subsample: indices of the minibatch within the N rows (the ``data`` plate
                scales the likelihood by ``N / B``).
            priors: replacements for the priors of physics parameters by name, e.g. a
                population distribution sampled by an outer hierarchical program; each must
                broadcast to the plate shape.

        Returns:
            The decoder mean ``x_mean``, shape ``(..., B, *event)``.
        """
        if x is not None and _input_check(self).needed(x):
            check_input_tensor(x, module_dtype(self))
            self.check_observations(x)
            _input_check(self).passed(x)
        init = self._checked_init(x, init)
        n = self._plate_size(x, init, size, subsample)
        # A minibatch read from a larger data set: x (and init) hold just the rows `subsample`.
        rows_given = x is not None and x.shape[0] != n
        like = next(t for t in (x, init, self._dtype_probe()) if t is not None)
        priors = dict(priors or {})
        unknown = set(priors) - {p.name for p in self.physics_parameters}
        if unknown:
            raise ValueError(f"priors given for {sorted(unknown)}, which are not physics "
                             f"parameters of this model ({list(self.latent_sites)})")
        latents: dict[str, Tensor] = {}
        call = ComponentCall(self, "model")
        # The plate's own indices (no subsample given) on the data's device, not the CPU.
        with pyro.plate("data", n, subsample=subsample, device=like.device) as idx:
            init_b = None
            if init is not None:
                init_b = call.record("init", init if rows_given else init[idx],
                                     event_dim=self.init_event_dim)
            for name, dim in {**self.state_dims, **self.aux_dims}.items():
                latents[name] = pyro.sample(name, standard_normal(dim, like))
            for p in self.physics_parameters:
                prior = priors[p.name] if p.name in priors else p.prior(like.device)
                latents[p.name] = pyro.sample(p.name, prior)
            curves = self.decode_sites(init_b, latents)
            for name, value in curves.items():
                call.record(name, value, event_dim=self.x_event_dim)
            x_b = None if x is None else x if rows_given else x[idx]
            obs = dist.Normal(curves["x_mean"], self.noise_scale()).to_event(self.x_event_dim)
            pyro.sample("x", obs, obs=x_b)
        return curves["x_mean"]

    def _checked_init(self, x: Tensor | None, init: Tensor | None) -> Tensor | None:
        """The initial states given or read off ``x``, checked against ``x``."""
        if self.init_event_dim is None:
            if init is not None:
                raise ValueError(f"{type(self).__name__} reads no initial state; do not pass init")
            return None
        if init is None:
            if x is None:
                raise ValueError("give the observations x or the initial states init")
            init = self.initial_condition(x)
        if init.dim() != 1 + self.init_event_dim:
            raise ValueError(f"init must have {1 + self.init_event_dim} dimension(s) (N, ...), "
                             f"got shape {tuple(init.shape)}")
        if x is not None and init.shape[0] != x.shape[0]:
            raise ValueError(f"init has {init.shape[0]} entries but x has {x.shape[0]} rows")
        return init

    @staticmethod
    def _plate_size(x: Tensor | None, init: Tensor | None, size: int | None,
                    subsample: Tensor | None = None) -> int:
        given = x if x is not None else init
        if given is not None:
            return data_plate_size(given, size, subsample)
        if size is None:
            raise ValueError("give the observations x, or size= (the number of rows to generate)")
        return check_positive_int(size, "size")

    def _dtype_probe(self) -> Tensor:
        """An empty tensor with the model's dtype and device (for priors without data)."""
        ref = next(iter(self.buffers()), None)
        if ref is None:
            ref = next(iter(self.parameters()), torch.zeros(()))
        return ref.new_zeros(())


class PhysVAEGuide(PyroModule):
    """Base of the amortized encoder guides. Subclasses set ``setting``, ``x_event_dim``,
    ``aux_encoders`` (``{"z_A1": attribute name}``; each attribute maps ``x_b (B, *event)``
    to ``(loc, scale)`` of shape ``(B, dim)``) and, for a model with ``state_dims``,
    ``state_encoders`` of the same form (the encoders read :meth:`features` of ``x_b``), and
    implement :meth:`unmix` and :meth:`physics_posterior`.
    """

    x_event_dim: int = 1
    #: Shape of one observation, set from ``model.observation_shape()`` in ``__init__``;
    #: inputs of another shape are refused (``None``: only the rank is checked).
    event_shape: tuple[int, ...] | None = None
    setting: Setting
    aux_encoders: dict[str, str]
    state_encoders: Mapping[str, str] = {}
    #: In settings with physics and networks, the physics encoder reads the unmixed signal
    #: (set ``False`` for a guide whose physics latents are all in ``state_encoders``).
    unmixes: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _checked_constructor(cls)

    def unmix(self, x: Tensor, aux_locs: Mapping[str, Tensor]) -> Tensor:
        """The physics-like signal ``(B, *event)`` from ``x`` and the posterior means of the
        auxiliary and state latents, by site (means, as in the reference, so that the
        physics encoder does not see their sampling noise)."""
        raise NotImplementedError

    def physics_posterior(self, signal: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """``q(z_P | signal)``: ``{name: (loc, scale)}``, each ``(...)`` for ``(..., *event)``."""
        raise NotImplementedError

    def check_observations(self, x: Tensor) -> None:
        """Refuse what the model refuses: not a tensor of the guide's dtype, the wrong rank
        or shape, no rows, NaN or infinite values."""
        check_input_tensor(x, module_dtype(self))
        check_observation_values(x, self.x_event_dim, self.event_shape)

    def features(self, x: Tensor) -> Tensor:
        """What the latent encoders read: ``x (B, *event)`` itself by default; a guide with
        one feature extractor shared by all encoders returns its features here."""
        return x

    def physics_mean(self, x: Tensor) -> dict[str, Tensor]:
        """Posterior means of the physics parameters from a physics-only signal (R_DA,2)."""
        return {name: loc for name, (loc, _) in self.physics_posterior(x).items()}

    def forward(self, x: Tensor | None = None, *, subsample: Tensor | None = None,
                **model_kwargs) -> dict[str, Tensor]:
        """Sample the latents of the rows ``subsample`` of ``x (N, *event)``.

        Takes the model's arguments (those other than ``x`` and ``subsample`` are not used).
        Returns the sampled latents by site name.
        """
        if x is None:
            raise ValueError("the amortized guide needs the observations x")
        if _input_check(self).needed(x):
            self.check_observations(x)
            _input_check(self).passed(x)
        s = self.setting
        out: dict[str, Tensor] = {}
        call = ComponentCall(self, "guide")
        n = data_plate_size(x, model_kwargs.get("size"), subsample)
        with pyro.plate("data", n, subsample=subsample, device=x.device) as idx:
            x_b = x if x.shape[0] != n else x[idx]
            signal, locs, h = x_b, {}, self.features(x_b)
            for site, attr in {**self.state_encoders, **self.aux_encoders}.items():
                loc, scale = getattr(self, attr)(h)
                locs[site] = loc
                out[site] = pyro.sample(site, dist.Normal(loc, scale).to_event(1))
            if s.has_physics:
                if s.has_nn and self.unmixes:
                    signal = call.record("unmixed", self.unmix(x_b, locs), event_dim=self.x_event_dim)
                for name, (loc, scale) in self.physics_posterior(signal).items():
                    out[name] = pyro.sample(name, dist.Normal(loc, scale))
        return out
