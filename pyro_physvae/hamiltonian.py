"""Hamiltonian dynamics of energies with a neural part, with the energy's gradient written out.

An ODE right-hand side ``f(y) = (dH/dp, -dH/dq)`` of a learnt energy ``H`` needs the gradient of
``H`` at every solver stage, and training needs derivatives of that gradient (with respect to
H's weights and to the latents). Taken with ``torch.autograd.grad(..., create_graph=True)``,
every stage runs autograd's engine in the forward pass and the loss then takes a *double*
backward through the recorded backward graph. For an MLP ``u = w_out . h_L + b_out`` with
``h_1 = act(a_1)``, ``a_1 = W_x x + c`` and ``h_{k+1} = act(a_{k+1})``,
``a_{k+1} = W_k h_k + b_k``, the input gradient is a backward pass that a few tensor
operations express:

    g_L = act'(a_L) w_out,   g_k = act'(a_k) (W_k^T g_{k+1}),   du/dx = W_x^T g_1,

with ``act'`` computed from the activations ``h_k``. :class:`NeuralHamiltonian` gives ``H``,
``dH/dy`` and the vector field this way, as ordinary differentiable operations (training then
takes one ordinary backward through them).

Most of the remaining cost is bookkeeping: a dozen small operations and autograd nodes per
stage, 400 stages per trajectory. :func:`hamiltonian_rk_trajectory` therefore runs a whole
fixed-grid Runge-Kutta solve (the tableaus of :mod:`pyro_physvae.ode`'s native loop) as one
autograd node: the forward pass keeps each stage's activations, and the backward pass is the
exact discrete adjoint of the solver's steps (what autograd would compute, up to float
rounding), with the gradients of the weights summed over all stages by a few large matrix
products at the end.

Units: energies are those of the model (dimensionless for locomotion), time is model time,
and ``omega`` is an angular frequency in radians per model time unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyro_physvae.nets import ACTIVATIONS, MLP
from pyro_physvae.ode import TABLEAUS, IntegrationError, is_uniform

Energy = Callable[[Tensor], Tensor]
Gradient = Callable[[Tensor], Tensor]
RightHandSide = Callable[[Tensor, Tensor], Tensor]


# -- derivatives of the activations --------------------------------------------------------------
# Each activation has ``first``, giving act'(a) from the output h = act(a) alone (into ``out`` if
# given), and ``curvature``, giving act''(a) / act'(a) from h: the adjoint of a written gradient
# multiplies a stored ``act'(a) * (...)`` by it, which is cheaper than forming act''(a).
def _elu_first(h: Tensor, out: Tensor | None = None) -> Tensor:
    # elu'(a) = 1 for a > 0 and exp(a) = elu(a) + 1 otherwise: 1 + min(h, 0) in both cases.
    return torch.clamp(h, max=0.0, out=out).add_(1.0)


def _elu_curvature(h: Tensor) -> Tensor:
    # elu''(a) = exp(a) = elu'(a) for a < 0, else 0; -sign(min(h, 0)) is the indicator of a < 0.
    return h.clamp(max=0.0).sign_().neg_()


def _tanh_first(h: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.mul(h, h, out=out).neg_().add_(1.0)


def _tanh_curvature(h: Tensor) -> Tensor:
    return -2.0 * h  # tanh'' = -2 tanh tanh'


def _relu_first(h: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.clamp(h, min=0.0, out=out).sign_()


def _relu_curvature(h: Tensor) -> Tensor:
    return torch.zeros_like(h)


def _softplus_first(h: Tensor, out: Tensor | None = None) -> Tensor:
    # sigmoid(a) = 1 - exp(-softplus(a)); expm1 keeps it accurate where h is small.
    return torch.neg(torch.expm1(-h), out=out)


def _softplus_curvature(h: Tensor) -> Tensor:
    return torch.exp(-h)  # sigmoid' = sigmoid (1 - sigmoid), and 1 - sigmoid(a) = exp(-h)


#: ``(first, curvature)`` with ``act'(a) = first(h)`` and ``act''(a) = curvature(h) * act'(a)``
#: from an activation's output ``h = act(a)``, for the activations of
#: :data:`pyro_physvae.nets.ACTIVATIONS` whose derivatives are written here (``softplus`` is
#: PyTorch's with ``beta=1``: above its threshold of 20 the written derivative differs from
#: PyTorch's by less than 3e-9; at ``a = 0`` exactly ``elu''`` is taken as 0, PyTorch's as 1).
#: An MLP with another activation falls back to autograd.
ACTIVATION_DERIVATIVES: dict[str, tuple[Callable[..., Tensor], Callable[[Tensor], Tensor]]] = {
    "elu": (_elu_first, _elu_curvature),
    "tanh": (_tanh_first, _tanh_curvature),
    "relu": (_relu_first, _relu_curvature),
    "softplus": (_softplus_first, _softplus_curvature),
}


# -- gradients ----------------------------------------------------------------------------------
def autograd_gradient(energy: Energy) -> Gradient:
    """``y -> dH/dy`` of any energy ``H: (..., D) -> (...)`` by autograd.

    The graph of the gradient is kept whenever gradients are being recorded (training, NUTS),
    so that derivatives of the gradient reach H's weights and the state; under
    ``torch.no_grad`` it is dropped. Returns ``(..., D)``.
    """

    def gradient(y: Tensor) -> Tensor:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            y_in = y if y.requires_grad else y.detach().requires_grad_()
            (grad,) = torch.autograd.grad(energy(y_in).sum(), y_in, create_graph=keep_graph)
        return grad

    return gradient


def symplectic(grad: Tensor, dim_q: int) -> Tensor:
    """``(dH/dp, -dH/dq)`` from ``grad = (dH/dq, dH/dp)``, both ``(..., 2 dim_q)``."""
    return torch.cat((grad[..., dim_q:], -grad[..., :dim_q]), -1)


def has_written_gradient(net: MLP) -> bool:
    """Whether :class:`NetworkGradient` handles ``net``: at least one hidden layer, a scalar
    output, no activation after the last layer, and an activation listed in
    :data:`ACTIVATION_DERIVATIVES`."""
    return (len(net.linears) > 1 and net.linears[-1].out_features == 1 and not net.final_activation
            and net.activation in ACTIVATION_DERIVATIVES)


@dataclass
class NetworkGradient:
    """The weights of a scalar MLP ``u = net(cat(x, z))`` for a fixed ``z``, fetched once (inside
    a Pyro trace each access of a ``PyroModule`` weight is a ``pyro.param`` call), and its
    input gradient as differentiable tensor operations.

    Shapes: ``w_x (H_1, D)`` (the first layer's columns for ``x``), ``offset (..., H_1)`` (its
    bias plus the columns for ``z`` applied to ``z``), ``hidden``: ``(W_k (H_{k+1}, H_k),
    b_k (H_{k+1},))`` for the further hidden layers, ``w_out (H_L,)``.
    """

    w_x: Tensor
    offset: Tensor
    hidden: list[tuple[Tensor, Tensor]]
    w_out: Tensor
    activation: str

    @classmethod
    def of(cls, net: MLP, z: Tensor, dim_x: int) -> NetworkGradient:
        """The network ``net`` of ``cat(x (..., dim_x), z (..., dim_z))`` (``dim_z`` may be 0)."""
        if not has_written_gradient(net):
            raise ValueError("a written gradient needs a scalar-output MLP with a hidden layer, no final "
                             f"activation and an activation in {list(ACTIVATION_DERIVATIVES)}")
        first = net.linears[0]
        return cls(w_x=first.weight[:, :dim_x], offset=F.linear(z, first.weight[:, dim_x:], first.bias),
                   hidden=[(lin.weight, lin.bias) for lin in net.linears[1:-1]],
                   w_out=net.linears[-1].weight[0], activation=net.activation)

    def first_adjoint(self, x: Tensor) -> Tensor:
        """``g_1 = du/da_1 (..., H_1)`` at ``x (..., D)``; ``du/dx = g_1 @ w_x``."""
        act, (first, _) = ACTIVATIONS[self.activation], ACTIVATION_DERIVATIVES[self.activation]
        pre = (torch.addmm(self.offset, x, self.w_x.t()) if x.dim() == 2 and self.offset.dim() == 2
               else torch.matmul(x, self.w_x.t()) + self.offset)
        hs = [act(pre)]
        for w, b in self.hidden:
            hs.append(act(F.linear(hs[-1], w, b)))
        g = first(hs[-1]) * self.w_out
        for (w, _), h in zip(reversed(self.hidden), reversed(hs[:-1]), strict=True):
            g = first(h) * torch.matmul(g, w)
        return g


# -- the energy ----------------------------------------------------------------------------------
class NeuralHamiltonian:
    """``H(q, p) = |p|^2 / 2 + omega^2 |q|^2 / 2 + U(cat(q, p, z))`` with ``U`` a scalar MLP and
    a fixed code ``z``; ``omega=None`` leaves out the quadratic part (``H = U``).

    Args:
        net: the network ``U``, reading ``2 dim_q + dim_z`` inputs and giving one output.
        z: its code, ``(..., dim_z)`` (``dim_z`` may be 0), broadcasting against the states.
        dim_q: size of the coordinates ``q`` and of the momenta ``p``.
        omega: angular frequency of the quadratic part [rad per time unit], or ``None``.
        gradient: ``"explicit"``: the network's backward pass written out
            (:class:`NetworkGradient`, :func:`hamiltonian_rk_trajectory`) where the network
            allows it, else autograd; ``"autograd"``: ``torch.autograd.grad`` (with
            ``create_graph`` when gradients are recorded) for every right-hand side.

    Calling it gives ``H`` of states ``y = (q, p)``, ``(..., 2 dim_q) -> (...)``;
    :meth:`gradient` gives ``dH/dy``, :meth:`vector_field` the ODE right-hand side and
    :meth:`trajectory` a fixed-grid solve.
    """

    def __init__(self, net: MLP, z: Tensor, dim_q: int, omega: float | None = None,
                 gradient: str = "explicit") -> None:
        if gradient not in ("explicit", "autograd"):
            raise ValueError(f"gradient must be 'explicit' or 'autograd', got {gradient!r}")
        self.dim_q = int(dim_q)
        self.omega2 = None if omega is None else float(omega) ** 2
        self.network = net.bind_conditioned(z)
        self._autograd = autograd_gradient(self)
        self.written = (NetworkGradient.of(net, z, 2 * self.dim_q)
                        if gradient == "explicit" and has_written_gradient(net) else None)

    def __call__(self, y: Tensor) -> Tensor:
        u = self.network(y).squeeze(-1)
        if self.omega2 is None:
            return u
        q, p = y[..., : self.dim_q], y[..., self.dim_q:]
        return 0.5 * (p.pow(2).sum(-1) + self.omega2 * q.pow(2).sum(-1)) + u

    def gradient(self, y: Tensor) -> Tensor:
        """``dH/dy = (dH/dq, dH/dp)`` at states ``y (..., 2 dim_q)``; ``(..., 2 dim_q)``."""
        if self.written is None:
            return self._autograd(y)
        grad = torch.matmul(self.written.first_adjoint(y), self.written.w_x)
        if self.omega2 is None:
            return grad
        q, p = y[..., : self.dim_q], y[..., self.dim_q:]
        return grad + torch.cat((self.omega2 * q, p), -1)

    def vector_field(self, t: Tensor, y: Tensor) -> Tensor:
        """The right-hand side ``dy/dt = (dH/dp, -dH/dq)`` at states ``y (..., 2 dim_q)``
        (``t`` is unused: H does not depend on time); ``(..., 2 dim_q)``."""
        return symplectic(self.gradient(y), self.dim_q)

    def trajectory(self, y0: Tensor, t: Tensor, method: str, substeps: int = 1) -> Tensor | None:
        """``y (..., T, 2 dim_q)`` at the times ``t (T,)`` from ``y0 (..., 2 dim_q)`` by
        :func:`hamiltonian_rk_trajectory`, or ``None`` where that does not apply (the gradient
        is autograd's, or the solver or time grid is not one of the native loop's), and the
        caller should integrate :meth:`vector_field` instead."""
        if self.written is None or method not in TABLEAUS or t.numel() < 2 or not is_uniform(t):
            return None
        d = self.dim_q
        linear = None
        if self.omega2 is not None:  # the quadratic part's field, y @ linear = (p, -omega^2 q)
            eye = torch.eye(d, dtype=y0.dtype, device=y0.device)
            zero = torch.zeros_like(eye)
            linear = torch.cat((torch.cat((zero, -self.omega2 * eye), 1), torch.cat((eye, zero), 1)), 0)
        w_field = symplectic(self.written.w_x, d)  # g_1 @ w_field = (dU/dp, -dU/dq)
        return hamiltonian_rk_trajectory(self.written, w_field, linear, y0, t, method, substeps)


def hamiltonian_vector_field(energy: Energy, dim_q: int) -> RightHandSide:
    """The right-hand side ``f(t, y) = (dH/dp, -dH/dq)`` of an energy ``H: (..., 2 dim_q) ->
    (...)``: a :class:`NeuralHamiltonian`'s own, else by autograd (:func:`autograd_gradient`)."""
    if isinstance(energy, NeuralHamiltonian):
        return energy.vector_field
    gradient = autograd_gradient(energy)
    return lambda t, y: symplectic(gradient(y), dim_q)


def angular_frequency(period: float | None) -> float | None:
    """``2 pi / period`` [rad per time unit], or ``None`` for no period."""
    return None if period is None else 2 * math.pi / float(period)


# -- a fixed-grid solve as one autograd node ------------------------------------------------------
def hamiltonian_rk_trajectory(net: NetworkGradient, w_field: Tensor, linear: Tensor | None, y0: Tensor,
                              t: Tensor, method: str, substeps: int = 1) -> Tensor:
    """Solve ``dy/dt = f(y) = y @ linear + g_1(y) @ w_field`` (``g_1 = du/da_1`` of ``net``)
    with the explicit Runge-Kutta method ``method`` (``euler``, ``midpoint``, ``heun3`` or
    ``rk4``, as :func:`pyro_physvae.ode.integrate` computes them on a uniform grid) and return
    the states at the times ``t``.

    Differentiable once with respect to ``y0``, the network's weights and offset and
    ``w_field`` (by the exact adjoint of the solver's steps); ``linear`` is a constant.

    Args:
        net: the network's weights (:meth:`NetworkGradient.of`).
        w_field: ``(H_1, D)``, e.g. ``symplectic(net.w_x, dim_q)`` for a Hamiltonian field.
        linear: ``(D, D)`` or ``None`` (no linear part).
        y0: initial states ``(..., D)``, broadcasting against ``net.offset (..., H_1)``.
        t: uniformly spaced times ``(T,)``, ``T >= 2``.
        method, substeps: solver and steps per interval of ``t``.

    Returns:
        ``(..., T, D)``. Raises :class:`~pyro_physvae.ode.IntegrationError` if the solution
        is not finite.
    """
    lead = torch.broadcast_shapes(y0.shape[:-1], net.offset.shape[:-1])
    x0 = y0.expand(*lead, y0.shape[-1]).reshape(-1, y0.shape[-1])
    offset = net.offset.expand(*lead, net.offset.shape[-1]).reshape(-1, net.offset.shape[-1])
    steps = (t.diff() / substeps).tolist()
    solver = _Solver(net.activation, TABLEAUS[method], steps, substeps, len(net.hidden))
    tensors = (x0, offset, net.w_x, w_field, linear, net.w_out,
               *(p for layer in net.hidden for p in layer))
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in tensors):
        ys = _SolveFunction.apply(solver, *tensors)
    else:
        ys = solver.solve(*tensors, record=False)[0]
    if not torch.isfinite(ys[:, -1]).all():
        raise IntegrationError(
            f"the ODE solution became non-finite (solver {method!r}, {substeps} substep(s)); "
            "the dynamics blew up: lower the learning rate, add substeps or use an adaptive solver")
    return ys.reshape(*lead, *ys.shape[-2:])


@dataclass
class _Stage:
    """One stage's rows of a :class:`_Workspace` (views): written by the forward pass, the
    state ``y (B, D)`` and, per hidden layer ``k``, the activations ``h[k]``, their
    derivatives ``d[k]`` and the adjoints ``g[k]`` (all ``(B, H_k)``); ``u[k] = g[k+1] @ W_k``
    is scratch space, shared by all stages (the backward pass does not need it); written by the
    backward pass, the cotangents of the field ``v (B, D_out)``, of the pre-activations
    (``grad_pre[k]``), of ``u[k]`` (``grad_u[k]``) and of the top adjoint's input
    (``grad_top``)."""

    y: Tensor
    h: list[Tensor]
    d: list[Tensor]
    g: list[Tensor]
    u: list[Tensor]
    v: Tensor
    grad_pre: list[Tensor]
    grad_u: list[Tensor]
    grad_top: Tensor


class _Workspace:
    """The tensors of every stage of one solve, stacked with the stage first (``(S, B, ...)``,
    fields named as in :class:`_Stage`), and their per-stage views ``stages``."""

    def __init__(self, like: Tensor, n: int, batch: int, dim: int, dim_out: int, widths: Sequence[int]):
        self.key = _Workspace.key_of(like, n, batch, dim, dim_out, widths)
        new = lambda width: like.new_empty(n, batch, width)  # noqa: E731
        self.y, self.v, self.grad_top = new(dim), new(dim_out), new(widths[-1])
        self.h, self.d, self.g, self.grad_pre = ([new(w) for w in widths] for _ in range(4))
        self.grad_u = [new(w) for w in widths[:-1]]
        self.u = [like.new_empty(batch, w) for w in widths[:-1]]
        rows = lambda bufs: list(zip(*(b.unbind(0) for b in bufs), strict=True)) if bufs else [()] * n  # noqa: E731
        self.stages = [_Stage(y, list(h), list(d), list(g), self.u, v, list(gp), list(gu), gt)
                       for y, h, d, g, v, gp, gu, gt in zip(
                           self.y.unbind(0), rows(self.h), rows(self.d), rows(self.g), self.v.unbind(0),
                           rows(self.grad_pre), rows(self.grad_u), self.grad_top.unbind(0), strict=True)]

    @staticmethod
    def key_of(like: Tensor, *shapes) -> tuple:
        return (like.dtype, like.device, *shapes[:-1], tuple(shapes[-1]))

    @classmethod
    def take(cls, like: Tensor, n: int, batch: int, dim: int, dim_out: int,
             widths: Sequence[int]) -> _Workspace:
        """A released workspace of these shapes, or a new one."""
        ws = _WORKSPACES.pop(cls.key_of(like, n, batch, dim, dim_out, widths), None)
        ws = ws if ws is not None else cls(like, n, batch, dim, dim_out, widths)
        ws.owner = object()
        return ws

    def release(self) -> None:
        """Keep the tensors for the next solve of the same shapes (one per shape): a fresh
        allocation of this size costs a page fault per 4 KiB. Until then the owner may still
        read them (a second backward pass through a retained graph)."""
        _WORKSPACES[self.key] = self


#: Released workspaces by dtype, device and shapes.
_WORKSPACES: dict[tuple, _Workspace] = {}


class _Solver:
    """A fixed-grid explicit Runge-Kutta solve of ``f(y) = y @ A + g_1(y) @ M`` and its adjoint;
    the weights are passed to :meth:`solve` and :meth:`adjoint` as in
    :func:`hamiltonian_rk_trajectory`."""

    def __init__(self, activation: str, tableau, steps: Sequence[float], substeps: int, n_hidden: int):
        self.act = ACTIVATIONS[activation]
        self.first, self.curvature = ACTIVATION_DERIVATIVES[activation]
        self.stages, self.weights = tableau
        self.steps, self.substeps, self.n_hidden = list(steps), substeps, n_hidden

    def field(self, y, offset, w_x, m_t, a, w_out, hidden, row: _Stage | None) -> Tensor:
        """The field at one stage's state ``y (B, D)`` (``m_t = m^T``, contiguous: a product
        with few output columns is several times faster in this layout); with ``row``, the
        stage's activations are written there."""
        if row is None:
            hs = [self.act(torch.addmm(offset, y, w_x.t()))]
            for w, b in hidden:
                hs.append(self.act(torch.addmm(b, hs[-1], w.t())))
            ds = [self.first(h) for h in hs]
            g = ds[-1] * w_out
            for k in range(len(hidden) - 1, -1, -1):
                g = ds[k] * (g @ hidden[k][0])
        else:
            row.y.copy_(y)
            hs = [self._activate(torch.addmm(offset, y, w_x.t(), out=row.h[0]))]
            for k, (w, b) in enumerate(hidden):
                hs.append(self._activate(torch.addmm(b, hs[-1], w.t(), out=row.h[k + 1])))
            ds = [self.first(h, out=d) for h, d in zip(hs, row.d, strict=True)]
            g = torch.mul(ds[-1], w_out, out=row.g[-1])
            for k in range(len(hidden) - 1, -1, -1):
                g = torch.mul(ds[k], torch.mm(g, hidden[k][0], out=row.u[k]), out=row.g[k])
        return F.linear(g, m_t) if a is None else torch.addmm(y @ a, g, m_t.t())

    def _activate(self, pre: Tensor) -> Tensor:
        """``act(pre)``, in ``pre``'s memory (activations without an in-place form are copied
        back)."""
        h = self.act(pre)
        return h if h.data_ptr() == pre.data_ptr() else pre.copy_(h)

    def solve(self, y0, offset, w_x, m, a, w_out, *hidden_flat,
              record: bool) -> tuple[Tensor, _Workspace | None]:
        """States ``(B, T, D)`` and, with ``record``, every stage's activations."""
        hidden = list(zip(hidden_flat[0::2], hidden_flat[1::2], strict=True))
        ws = None
        if record:
            n = len(self.steps) * self.substeps * len(self.stages)
            ws = _Workspace.take(y0, n, y0.shape[0], y0.shape[1], m.shape[1],
                                 [w_x.shape[0]] + [w.shape[0] for w, _ in hidden])
        rows = iter(ws.stages) if ws is not None else None
        m_t = m.t().contiguous()
        y, ys = y0, [y0]
        for h in self.steps:
            for _ in range(self.substeps):
                ks: list[Tensor] = []
                for _, a_i in self.stages:
                    y_stage = y
                    for a_ij, k_j in zip(a_i, ks, strict=False):
                        if a_ij:
                            y_stage = y_stage.add(k_j, alpha=a_ij * h)
                    ks.append(self.field(y_stage, offset, w_x, m_t, a, w_out, hidden,
                                         next(rows) if rows is not None else None))
                for b_j, k_j in zip(self.weights, ks, strict=True):
                    if b_j:
                        y = y.add(k_j, alpha=b_j * h)
            ys.append(y)
        return torch.stack(ys, -2), ws

    def field_adjoint(self, v: Tensor, row: _Stage, w_x_t, m_t, a, weights) -> Tensor:
        """The cotangent of a stage's state from that of its field, ``v (B, D_out)``
        (``w_x_t`` and ``m_t`` are the transposes of ``w_x`` and ``m``, contiguous); the
        cotangents that the weights' gradients need are written to the stage's ``row``."""
        n_hidden = self.n_hidden
        row.v.copy_(v)
        grad_g = torch.mm(v, m_t, out=row.grad_top if n_hidden == 0 else None)
        # d(act'(a_k) u_k)/da_k = act''(a_k) u_k = curvature(h_k) g_k, with g_k = act'(a_k) u_k stored
        for k in range(n_hidden):
            torch.mul(grad_g, row.g[k], out=row.grad_pre[k]).mul_(self.curvature(row.h[k]))
            grad_u = torch.mul(grad_g, row.d[k], out=row.grad_u[k])
            grad_g = torch.mm(grad_u, weights[k].t(), out=row.grad_top if k == n_hidden - 1 else None)
        torch.mul(grad_g, row.g[-1], out=row.grad_pre[-1]).mul_(self.curvature(row.h[-1]))
        for k in range(n_hidden - 1, -1, -1):
            row.grad_pre[k].addcmul_(row.grad_pre[k + 1] @ weights[k], row.d[k])
        grad_y = F.linear(row.grad_pre[0], w_x_t)
        return grad_y if a is None else torch.addmm(grad_y, v, a.t())

    def adjoint(self, ws: _Workspace, grad_ys, offset, w_x, m, a, w_out, *hidden_flat,
                needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
        """Gradients of ``sum(grad_ys * ys)`` with respect to ``(y0, offset, w_x, m, a, w_out,
        *hidden_flat)`` (``None`` where ``needs`` is false, and for the constant ``a``)."""
        weights = hidden_flat[0::2]
        w_x_t, m_t = w_x.t().contiguous(), m.t().contiguous()
        n_stages = len(self.stages)
        grad_y = grad_ys[:, -1].clone()
        s = len(ws.stages)
        for i_obs in range(len(self.steps) - 1, -1, -1):
            h = self.steps[i_obs]
            for _ in range(self.substeps):
                s -= n_stages
                # y_next = y + h sum_j b_j k_j,  k_i = f(y + h sum_j a_ij k_j)
                grad_k = [grad_y * (b_j * h) if b_j else None for b_j in self.weights]
                for i in range(n_stages - 1, -1, -1):
                    if grad_k[i] is None:
                        continue
                    grad_stage = self.field_adjoint(grad_k[i], ws.stages[s + i], w_x_t, m_t, a, weights)
                    grad_y = grad_y + grad_stage
                    for j, a_ij in enumerate(self.stages[i][1]):
                        if a_ij:
                            grad_k[j] = (grad_stage * (a_ij * h) if grad_k[j] is None
                                         else grad_k[j].add(grad_stage, alpha=a_ij * h))
            grad_y = grad_y + grad_ys[:, i_obs]
        return (grad_y if needs[0] else None, *self._weight_gradients(ws, needs))

    def _weight_gradients(self, ws: _Workspace, needs: Sequence[bool]) -> list[Tensor | None]:
        """The weights' gradients: the per-stage products summed by a few large ones (written
        so that the long dimension, stages times batch, is the inner one of each product)."""
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        grad_pre = [flat(g) for g in ws.grad_pre]
        out: list[Tensor | None] = [
            ws.grad_pre[0].sum(0) if needs[1] else None,
            (flat(ws.y).t() @ grad_pre[0]).t() if needs[2] else None,
            (flat(ws.v).t() @ flat(ws.g[0])).t() if needs[3] else None,
            None,
            flat(ws.grad_top.mul_(ws.d[-1])).sum(0) if needs[5] else None]
        for k in range(self.n_hidden):
            grad_w = None
            if needs[6 + 2 * k]:
                grad_w = torch.addmm(flat(ws.g[k + 1]).t() @ flat(ws.grad_u[k]), grad_pre[k + 1].t(),
                                     flat(ws.h[k]))
            out += [grad_w, grad_pre[k + 1].sum(0) if needs[7 + 2 * k] else None]
        return out


class _SolveFunction(torch.autograd.Function):
    """:meth:`_Solver.solve` with :meth:`_Solver.adjoint` as its backward pass (inputs:
    ``solver, y0, offset, w_x, m, a, w_out, *hidden_flat``)."""

    @staticmethod
    def forward(ctx, solver: _Solver, *tensors):
        ys, ws = solver.solve(*tensors, record=True)
        ctx.solver, ctx.workspace, ctx.owner = solver, ws, ws.owner
        ctx.save_for_backward(*tensors[1:])
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        ws = ctx.workspace
        if ws.owner is not ctx.owner:
            raise RuntimeError("a later solve has reused this solve's stored stages: take the backward "
                               "pass through a retained graph before solving again")
        grads = ctx.solver.adjoint(ws, grad_ys, *ctx.saved_tensors, needs=ctx.needs_input_grad[1:])
        ws.release()
        return (None, *grads)
