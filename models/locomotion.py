"""Human locomotion: Hamiltonian dynamics with a learnt energy, the Phys-VAE generative model.

Physics (what is assumed known: the motion conserves an energy)::

    dq/dt = dH/dp,   dp/dt = -dH/dq,   H(q, p, z_P) = |p|^2 / 2 + w^2 |q|^2 / 2 + U(q, p, z_P),

with ``U`` a neural network (zero at the start of training) and ``w = 2 pi / period`` the
angular frequency of the gait cycle (the data show one cycle, so its period is known). The
quadratic part is a harmonic oscillator that repeats once per window: together with the
inferred ``(q0, p0)`` and the linear read-out it already expresses the first harmonic of every
joint angle, and the network learns the anharmonic rest. ``harmonic_period=None`` gives the
reference's purely neural energy, which starts from an almost flat H and needs many more
epochs to produce any motion.

with the generalised coordinates ``q`` in R^3 mapped linearly to the three observed joint
angles, ``x_P = W q(t) + b``. The initial state ``y0 = (q0, p0)`` is a latent variable
(standard Normal prior) inferred by the guide: the data show angles, not momenta. The
right-hand side needs the gradient of H, and training needs derivatives of that gradient.
:mod:`pyro_physvae.hamiltonian` writes the network's input gradient out and, with the native
fixed-grid solvers, runs the whole solve with its exact adjoint as one autograd node (same
values and gradients as autograd's double backward, up to rounding, at about half the cost);
``energy_gradient="autograd"`` takes the gradient with ``torch.autograd.grad`` instead.

What the energy cannot express is left to an out-of-ODE network of ``z_A2``: the observed
angles are ``x ~ Normal(x_P + f_A2(z_A2), sigma)``. ``nn-only`` has no dynamics: its
``x_P`` is the read-out of ``q0``, constant in time, plus the network's curve (as in the
reference). There is no in-ODE network (no ``z_A1``), so R_ppc is ``|x_PB - x_P|^2``.

Sample sites (all inside the ``data`` plate): ``y0`` (event 1: ``2 dim_q``, or ``dim_q`` in
nn-only), ``z_P`` (event 1, settings with physics), ``z_A2`` (event 1, settings with
networks), ``x`` (event 2: joint, time). Deterministic sites: ``x_P`` and ``x_PB`` (with
physics), ``x_mean``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_physvae.arguments import Count, Size, Widths
from pyro_physvae.base import PhysVAEModel
from pyro_physvae.hamiltonian import NeuralHamiltonian, angular_frequency, hamiltonian_vector_field
from pyro_physvae.nets import MLP
from pyro_physvae.physics import PhysicalParameter
from pyro_physvae.settings import Setting

#: The reference's ``x_lnvar = -13.8`` in its loss ``SSE + exp(x_lnvar) KL``, which is the
#: negative ELBO of a Gaussian with variance ``exp(-13.8) / 2``.
X_LNVAR = -13.8 - math.log(2.0)


class LocomotionModel(PhysVAEModel):
    """The Phys-VAE generative model of gait-cycle joint angles.

    Args:
        setting: ``"nn-only"``, ``"phys-only"``, ``"phys+nn"`` or ``"phys+nn+reg"``.
        n_joints: observed angles per time step.
        n_steps: samples per gait cycle T.
        dt: model time between samples (the reference's 0.02: a cycle lasts 2 units).
        dim_q: size of the generalised coordinates q (and momenta p).
        dim_z_phys: size of the energy's latent code z_P (0: one energy for all samples).
        dim_z_aux2: size of the out-of-ODE network's latent z_A2.
        hidden_energy, hidden_aux2: hidden widths of H's network U and of the out-of-ODE
            network.
        harmonic_period: period of the quadratic part of H, in model time; ``"window"``
            (default): the length of the observed window, ``(n_steps - 1) dt``; ``None``: no
            quadratic part (H is the network alone, as in the reference).
        activation: of both networks.
        energy_gradient: how the right-hand side gets dH/dy: ``"explicit"`` (default) writes
            the energy network's backward pass as tensor operations, so that training needs
            one ordinary backward instead of a double backward (an activation without a
            written derivative falls back to autograd); ``"autograd"`` takes it with
            ``torch.autograd.grad``. Both give the same values and gradients up to rounding.
        x_lnvar: log variance of the observation noise (default: the reference objective).
        learn_noise: learn ``x_lnvar`` instead of fixing it.
        method, substeps: ODE solver and sub-steps per dt. The default, ``rk4`` (four
            right-hand sides per step), keeps the learnt energy's drift over a cycle at
            0.075% (median) on the benchmark run; a
            run trained with the explicit midpoint rule, at half the cost, drifted by 1.6%,
            one trained with ``heun3``, at three quarters, by up to 0.85%,
            and Euler does not conserve the energy at all (it drifts by more than the spread
            of energies between recordings) (``benchmarks/RESULTS.md``).
        rtol, atol: tolerances of adaptive solvers.
    """

    x_event_dim = 2
    observation_dims = ("joint", "time")
    init_event_dim = None
    reg_weights = (1e-1, 0.0, 0.0)  # the reference's R_ppc weight; no R_DA terms

    def __init__(
        self,
        setting: str | Setting = Setting.PHYS_NN_REG,
        *,
        n_joints: Size = 3,
        n_steps: Size = 101,
        dt: float = 0.02,
        dim_q: Size = 3,
        dim_z_phys: Count = 2,
        dim_z_aux2: Count = 15,
        hidden_energy: Widths = (128, 128),
        hidden_aux2: Widths = (512, 512),
        harmonic_period: float | str | None = "window",
        activation: str = "elu",
        energy_gradient: Literal["explicit", "autograd"] = "explicit",
        x_lnvar: float = X_LNVAR,
        learn_noise: bool = False,
        method: str = "rk4",
        substeps: Size = 1,
        rtol: float = 1e-5,
        atol: float = 1e-6,
    ) -> None:
        super().__init__(name="locomotion_model")
        self.setting = s = Setting.parse(setting)
        for name, value in (("n_joints", n_joints), ("dim_q", dim_q)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if dim_z_phys < 0 or dim_z_aux2 < 1:
            raise ValueError(f"dim_z_phys must be >= 0 and dim_z_aux2 >= 1, got {dim_z_phys}, {dim_z_aux2}")
        self.setup_time_grid(n_steps, dt, method, substeps, rtol, atol)
        self.setup_noise(x_lnvar, learn_noise)
        self.n_joints, self.dim_q = int(n_joints), int(dim_q)
        self.dim_z_phys = int(dim_z_phys) if s.has_physics else 0
        self.dim_z_aux2 = int(dim_z_aux2)
        self.state_dims = {"y0": 2 * self.dim_q if s.has_physics else self.dim_q}
        if self.dim_z_phys:
            self.state_dims["z_P"] = self.dim_z_phys
        self.aux_dims = {"z_A2": self.dim_z_aux2} if s.has_nn else {}
        if harmonic_period == "window":
            harmonic_period = (self.n_steps - 1) * self.dt
        if harmonic_period is not None and not float(harmonic_period) > 0:
            raise ValueError(f"harmonic_period must be positive, 'window' or None, got {harmonic_period!r}")
        self.harmonic_period = None if harmonic_period is None else float(harmonic_period)
        if energy_gradient not in ("explicit", "autograd"):
            raise ValueError(f"energy_gradient must be 'explicit' or 'autograd', got {energy_gradient!r}")
        self.energy_gradient = energy_gradient
        if s.has_physics:
            self.energy = MLP(2 * self.dim_q + self.dim_z_phys, hidden_energy, 1, activation,
                              zero_last=self.harmonic_period is not None)
        self.readout = PyroModule[nn.Linear](self.dim_q, self.n_joints)
        if s.has_nn:
            self.aux2 = MLP(self.dim_z_aux2, hidden_aux2, self.n_joints * self.n_steps, activation,
                            zero_last=True)

    @property
    def physics_parameters(self) -> tuple[PhysicalParameter, ...]:
        return ()  # the physics latents (y0, z_P) have standard Normal priors: state_dims

    def observation_shape(self) -> tuple[int, ...]:
        return (self.n_joints, self.n_steps)

    # -- the physics ---------------------------------------------------------------------
    def energy_function(self, z_phys: Tensor | None) -> NeuralHamiltonian:
        """``H(y)`` for a fixed code: ``y (..., B, 2 dim_q) -> (..., B)``, a
        :class:`~pyro_physvae.hamiltonian.NeuralHamiltonian` (which also gives ``dH/dy``)."""
        z = z_phys if z_phys is not None else self.t.new_zeros(0)
        return NeuralHamiltonian(self.energy, z, self.dim_q, angular_frequency(self.harmonic_period),
                                 gradient=self.energy_gradient)

    def hamiltonian_field(self, energy: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """The right-hand side ``f(t, y) = (dH/dp, -dH/dq)`` of an energy function.

        The model's own energies give their written gradient (or autograd's, per
        ``energy_gradient``); any other function of ``y (..., 2 dim_q)`` is differentiated by
        autograd. Either way the graph is kept whenever gradients are being recorded
        (training, NUTS), so that derivatives reach H's weights and the latents.
        """
        return hamiltonian_vector_field(energy, self.dim_q)

    def trajectory(self, y0: Tensor, z_phys: Tensor | None, t: Tensor | None = None) -> Tensor:
        """Physics-only states ``(..., B, T, 2 dim_q)`` from ``y0 (..., B, 2 dim_q)``.

        With the written gradient and a native fixed-grid solver the whole solve is one
        autograd node (:meth:`~pyro_physvae.hamiltonian.NeuralHamiltonian.trajectory`); other
        solvers integrate :meth:`hamiltonian_field`. Both give the same states and gradients up
        to float rounding."""
        energy = self.energy_function(z_phys)
        ys = energy.trajectory(y0, self.t if t is None else t, self.method, self.substeps)
        return ys if ys is not None else self.solve(self.hamiltonian_field(energy), y0, t)

    def angles(self, q: Tensor) -> Tensor:
        """Joint angles ``(..., n_joints, T)`` [rad] from coordinates ``q (..., T, dim_q)``."""
        return self.readout(q).transpose(-1, -2)

    def energy_drift(self, y0: Tensor, z_phys: Tensor | None) -> dict[str, Tensor]:
        """The learnt energy along physics-only trajectories with the model's solver.

        Args:
            y0: initial states ``(B, 2 dim_q)``, ``B >= 2``; z_phys: codes ``(B, dim_z_phys)``.

        Returns:
            ``energy (B, T)``, ``drift (B,)`` = ``max_t |H(t) - H(0)|`` and ``relative (B,)``
            (:func:`relative_energy_drift`: H is defined up to a constant, so the drift is
            divided by an energy *difference*).
        """
        with torch.no_grad():
            ys = self.trajectory(y0, z_phys)
            h = self.energy_function(z_phys if z_phys is None else z_phys.unsqueeze(-2))(ys)
        drift = (h - h[..., :1]).abs().amax(-1)
        return {"energy": h, "drift": drift, "relative": relative_energy_drift(drift, h[..., 0])}

    # -- the decoder ---------------------------------------------------------------------
    def decode(self, y0: Tensor, z_phys: Tensor | None, z_aux2: Tensor | None) -> dict[str, Tensor]:
        """Curves ``(..., B, n_joints, T)`` from the latents (shapes ``(..., B, dim)``):
        ``x_mean`` always; ``x_P`` with physics, and ``x_PB`` with physics and networks."""
        s = self.setting
        if s.has_physics:
            x_p = self.angles(self.trajectory(y0, z_phys)[..., : self.dim_q])
        else:
            x_p = self.readout(y0).unsqueeze(-1).expand(*y0.shape[:-1], self.n_joints, self.n_steps)
        if not s.has_nn:
            return {"x_P": x_p, "x_mean": x_p}
        residual = self.aux2(z_aux2).unflatten(-1, (self.n_joints, self.n_steps))
        if not s.has_physics:
            return {"x_mean": x_p + residual}
        x_pb = x_p + residual
        return {"x_P": x_p, "x_PB": x_pb, "x_mean": x_pb}

    def decode_sites(self, init: Tensor | None, latents: Mapping[str, Tensor], *,
                     clamp: bool = True) -> dict[str, Tensor]:
        # ``clamp`` has nothing to act on: this model's latents have no feasible ranges.
        return self.decode(latents["y0"], latents.get("z_P"), latents.get("z_A2"))


def relative_energy_drift(drift: Tensor, energy0: Tensor) -> Tensor:
    """Per-sequence ``drift / std(H(0))``: the drift along a trajectory as a fraction of how
    much the energy differs between sequences (an energy difference, so that the arbitrary
    constant in H cancels). ``drift (B,)``, ``energy0 (B,)`` with ``B >= 2``."""
    if energy0.numel() < 2:
        raise ValueError("the relative energy drift needs at least two sequences")
    return drift / energy0.std().clamp_min(torch.finfo(energy0.dtype).tiny)
