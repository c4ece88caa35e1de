"""The written gradient of a neural energy and the one-node Runge-Kutta solve against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_physvae.hamiltonian import (
    ACTIVATION_DERIVATIVES,
    NeuralHamiltonian,
    autograd_gradient,
    hamiltonian_vector_field,
    has_written_gradient,
)
from pyro_physvae.models.locomotion import LocomotionModel
from pyro_physvae.nets import ACTIVATIONS, MLP
from pyro_physvae.ode import integrate, time_grid

D_Q, D_Z = 2, 2


def lively_net(activation: str, hidden=(8, 6), seed: int = 0, dtype=torch.float64) -> MLP:
    """An energy network with non-zero weights (the model's starts as zero)."""
    torch.manual_seed(seed)
    net = MLP(2 * D_Q + D_Z, hidden, 1, activation).to(dtype)
    for lin in net.linears:
        torch.nn.init.normal_(lin.weight, std=0.8)
        torch.nn.init.normal_(lin.bias, std=0.3)
    return net


def hamiltonians(net: MLP, z: torch.Tensor, omega: float | None = 1.3):
    return (NeuralHamiltonian(net, z, D_Q, omega, gradient="explicit"),
            NeuralHamiltonian(net, z, D_Q, omega, gradient="autograd"))


def test_every_activation_of_the_networks_has_written_derivatives():
    assert set(ACTIVATION_DERIVATIVES) == set(ACTIVATIONS)
    for name, (first, curvature) in ACTIVATION_DERIVATIVES.items():
        a = torch.linspace(-4, 4, 81, dtype=torch.float64).requires_grad_()
        a = a[a != 0].detach().requires_grad_()  # elu'' and relu' jump at 0
        h = ACTIVATIONS[name](a.clone())
        (d_ref,) = torch.autograd.grad(h.sum(), a, create_graph=True)
        (dd_ref,) = torch.autograd.grad(d_ref.sum(), a)
        d = first(h.detach())
        assert torch.allclose(d, d_ref, atol=1e-12), name
        assert torch.allclose(curvature(h.detach()) * d, dd_ref, atol=1e-12), name


@pytest.mark.parametrize("activation", ["elu", "tanh", "softplus", "relu"])
@pytest.mark.parametrize("lead", [(5,), (3, 4)])
@pytest.mark.parametrize("omega", [1.3, None])
def test_gradient_and_field_equal_autograds_with_their_derivatives(activation, lead, omega):
    """Values and the gradients of a loss through them (weights, state and code)."""
    net = lively_net(activation)
    z = torch.randn(*lead, D_Z, dtype=torch.float64, requires_grad=True)
    y = torch.randn(*lead, 2 * D_Q, dtype=torch.float64, requires_grad=True)
    results = []
    for energy in hamiltonians(net, z, omega):
        grad, field = energy.gradient(y), energy.vector_field(torch.zeros(()), y)
        loss = (grad.sin() * torch.arange(1.0, 2 * D_Q + 1, dtype=torch.float64)).sum() + field.pow(2).sum()
        params = [y, z, *net.parameters()]
        derivs = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((grad, field, [torch.zeros_like(p) if g is None else g for p, g in zip(params, derivs,
                                                                                            strict=True)]))
    (g1, f1, d1), (g2, f2, d2) = results
    assert torch.allclose(g1, g2, atol=1e-12) and torch.allclose(f1, f2, atol=1e-12)
    for a, b in zip(d1, d2, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_written_gradient_passes_gradcheck():
    net = lively_net("elu", hidden=(5, 4))
    y = torch.randn(3, 2 * D_Q, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, D_Z, dtype=torch.float64, requires_grad=True)
    w = net.linears[1].weight
    assert torch.autograd.gradcheck(lambda y, z, w: NeuralHamiltonian(net, z, D_Q, 1.0).gradient(y),
                                    (y, z, w))


def test_unsupported_networks_fall_back_to_autograd():
    for net in (MLP(6, (), 1), MLP(6, (4,), 2), MLP(6, (4,), 1, final_activation=True)):
        assert not has_written_gradient(net)
        energy = NeuralHamiltonian(net, torch.zeros(0), 3, 1.0)
        assert energy.written is None
        y = torch.randn(2, 6)
        if net.linears[-1].out_features == 1:
            assert torch.allclose(energy.gradient(y), autograd_gradient(energy)(y))
        assert energy.trajectory(torch.randn(2, 6), time_grid(5, 0.1), "rk4") is None


def test_no_grad_gives_plain_tensors_and_the_same_values():
    net = lively_net("tanh")
    z, y = torch.randn(4, D_Z, dtype=torch.float64), torch.randn(4, 2 * D_Q, dtype=torch.float64)
    explicit, reference = hamiltonians(net, z)
    with torch.no_grad():
        grad = explicit.gradient(y)
        ys = explicit.trajectory(y, time_grid(6, 0.1).double(), "rk4")
    assert grad.grad_fn is None and ys.grad_fn is None
    assert torch.allclose(grad, reference.gradient(y), atol=1e-12)


@pytest.mark.parametrize(("method", "substeps"),
                         [("rk4", 1), ("rk4", 2), ("heun3", 1), ("heun3", 2), ("midpoint", 1), ("euler", 3)])
@pytest.mark.parametrize("activation", ["elu", "softplus"])
def test_one_node_solve_matches_autograd_through_the_native_loop(method, substeps, activation):
    """States and the gradients of a loss on them, for leading (particle, batch) dims and a
    code shared over the particles."""
    net = lively_net(activation, hidden=(8, 6, 5))
    z = torch.randn(3, D_Z, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, 3, 2 * D_Q, dtype=torch.float64, requires_grad=True)
    t = time_grid(8, 0.05).double()
    results = []
    for energy in hamiltonians(net, z):
        if energy.written is not None:
            ys = energy.trajectory(y0, t, method, substeps)
        else:
            ys = integrate(energy.vector_field, y0, t, method=method, substeps=substeps)
        loss = (ys.cos() * torch.linspace(0.5, 1.5, ys.shape[-2], dtype=torch.float64)[:, None]).sum()
        params = [y0, z, *net.parameters()]
        derivs = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((ys, [torch.zeros_like(p) if g is None else g
                             for p, g in zip(params, derivs, strict=True)]))
    (ys1, d1), (ys2, d2) = results
    assert ys1.shape == (2, 3, 8, 2 * D_Q)
    assert torch.allclose(ys1, ys2, atol=1e-12)
    for a, b in zip(d1, d2, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_one_node_solve_passes_gradcheck():
    net = lively_net("elu", hidden=(4, 3))
    t = time_grid(4, 0.1).double()
    y0 = torch.randn(2, 2 * D_Q, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, D_Z, dtype=torch.float64, requires_grad=True)
    w0, w1, w2 = (lin.weight for lin in net.linears)
    assert torch.autograd.gradcheck(
        lambda y0, z, w0, w1, w2: NeuralHamiltonian(net, z, D_Q, 2.0).trajectory(y0, t, "rk4"),
        (y0, z, w0, w1, w2))


def test_rk4_conserves_the_energy_as_the_autograd_path_does():
    net = lively_net("elu", hidden=(16, 16), dtype=torch.float32)
    for lin in net.linears:
        lin.weight.data.mul_(0.3)
    z, y0 = torch.randn(6, D_Z), torch.randn(6, 2 * D_Q)
    t = time_grid(101, 0.02)
    explicit, reference = hamiltonians(net, z, omega=math.pi)
    with torch.no_grad():
        ys = explicit.trajectory(y0, t, "rk4")
        ys_ref = integrate(reference.vector_field, y0, t, method="rk4")
    along_time = NeuralHamiltonian(net, z.unsqueeze(-2), D_Q, math.pi)
    energy, energy_ref = along_time(ys).detach(), along_time(ys_ref).detach()
    assert torch.allclose(ys, ys_ref, atol=1e-4)
    drift = (energy - energy[..., :1]).abs().amax(-1)
    drift_ref = (energy_ref - energy_ref[..., :1]).abs().amax(-1)
    assert torch.allclose(drift, drift_ref, atol=1e-5)
    assert float(drift.max()) < 1e-3 * float(energy[:, 0].std())


def test_other_energies_take_autograds_field():
    field = hamiltonian_vector_field(lambda y: 0.5 * y.pow(2).sum(-1), 1)
    assert torch.allclose(field(torch.zeros(()), torch.tensor([[1.0, 2.0]])), torch.tensor([[2.0, -1.0]]))


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_model_trajectories_and_gradients_agree_between_the_two_paths(method):
    """The locomotion model's decoder (training, the one-node solve or the written field under
    an adaptive solver) and its gradients with respect to the weights and latents."""
    kwargs = {"n_steps": 11, "hidden_energy": (16, 16), "hidden_aux2": (8,), "dim_z_aux2": 2,
              "method": method}
    torch.manual_seed(3)
    y0, z = torch.randn(4, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    results = []
    for gradient in ("explicit", "autograd"):
        torch.manual_seed(0)
        model = LocomotionModel("phys+nn+reg", energy_gradient=gradient, **kwargs)
        for lin in model.energy.linears:
            torch.nn.init.normal_(lin.weight, std=0.3)
        x_p = model.decode(y0, z, torch.zeros(4, 2))["x_P"]
        derivs = torch.autograd.grad(x_p.pow(2).sum(), [y0, z, *model.energy.parameters()], allow_unused=True)
        results.append((x_p, derivs))
    (x1, d1), (x2, d2) = results
    assert torch.allclose(x1, x2, atol=1e-5)
    for a, b in zip(d1, d2, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_latent_gradients_flow_with_frozen_weights_as_under_nuts():
    from pyro_physvae.nets import frozen_parameters

    model = LocomotionModel("phys-only", n_steps=11, hidden_energy=(8, 8))
    for lin in model.energy.linears:
        torch.nn.init.normal_(lin.weight, std=0.3)
    y0, z = torch.randn(1, 6, requires_grad=True), torch.randn(1, 2, requires_grad=True)
    with frozen_parameters(model):
        g = torch.autograd.grad(model.trajectory(y0, z).sum(), [y0, z])
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in g)
