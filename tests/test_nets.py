"""The MLP and its bound (parameter-fetching-free) forms used in ODE right-hand sides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyro_physvae.nets import ACTIVATIONS, MLP

#: Out-of-place forms, independent of the in-place ones that MLP applies.
REFERENCE_ACTIVATIONS = {"elu": F.elu, "relu": F.relu, "tanh": torch.tanh, "softplus": F.softplus}


def randomise(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def reference_mlp(net: MLP, x: torch.Tensor) -> torch.Tensor:
    """The network written out with torch.nn.functional, independently of MLP.bind."""
    act = REFERENCE_ACTIVATIONS[net.activation]
    n = len(net.linears)
    for i, lin in enumerate(net.linears):
        x = torch.nn.functional.linear(x, lin.weight, lin.bias)
        if i < n - 1 or net.final_activation:
            x = act(x)
    return x


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_matches_reference(activation):
    net = MLP(3, (5, 4), 2, activation)
    randomise(net)
    x = torch.randn(6, 7, 3)
    y = net(x)
    assert y.shape == (6, 7, 2)
    torch.testing.assert_close(y, reference_mlp(net, x))


def test_reference_covers_every_activation():
    assert set(REFERENCE_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("final_activation", [False, True])
def test_in_place_activations_give_the_reference_gradients(activation, final_activation):
    """The activations act in place on fresh layer outputs; the gradients with respect to the
    input, the conditioning input and every weight must be those of the out-of-place network."""
    net = MLP(2 + 3, (5, 4), 2, activation, final_activation=final_activation).double()
    randomise(net, seed=4)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, dtype=torch.float64)
    wrt = [x, z, *net.parameters()]
    outputs = {"forward": lambda: net(torch.cat((x, z), -1)),
               "bound": lambda: net.bind_conditioned(z)(x),
               "reference": lambda: reference_mlp(net, torch.cat((x, z), -1))}
    grads = {k: torch.autograd.grad((f() * w).sum(), wrt) for k, f in outputs.items()}
    for k in ("forward", "bound"):
        for got, want in zip(grads[k], grads["reference"], strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_in_place_activations_give_correct_second_derivatives(activation):
    """Hamiltonian models differentiate the network twice (the gradient of an energy enters
    the loss); the double backward through the in-place activations must stay exact."""
    net = MLP(3, (5, 4), 1, activation).double()
    randomise(net, seed=5)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(net, (x,))


def test_zero_last_starts_as_the_zero_function_but_learns():
    net = MLP(3, (8,), 2, zero_last=True)
    x = torch.randn(5, 3)
    assert torch.equal(net(x), torch.zeros(5, 2))
    net(x).sum().backward()
    assert net.linears[-1].weight.grad.abs().sum() > 0


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(2, (), 1, "swish")


@pytest.mark.parametrize("hidden", [(), (6,), (6, 5)])
@pytest.mark.parametrize("maps", [False, True])
def test_bind_conditioned_equals_network_of_concatenation(hidden, maps):
    net = MLP(2 + 3, hidden, 1)
    randomise(net, seed=1)
    z = torch.randn(4, 3)
    y = torch.randn(4, 4)
    if maps:
        input_map = torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]])
        output_map = torch.tensor([[0.0], [0], [0], [1]])
        f = net.bind_conditioned(z, input_map, output_map)
        expected = net(torch.cat((y @ input_map.T, z), -1)) @ output_map.T
    else:
        f = net.bind_conditioned(z)
        y = y[:, :2]
        expected = net(torch.cat((y, z), -1))
    torch.testing.assert_close(f(y), expected)


def test_bind_conditioned_output_map_with_final_activation():
    net = MLP(2 + 1, (4,), 1, "softplus", final_activation=True)
    randomise(net, seed=2)
    z = torch.randn(3, 1)
    y = torch.randn(3, 2)
    output_map = torch.tensor([[0.0], [1.0]])
    f = net.bind_conditioned(z, output_map=output_map)
    torch.testing.assert_close(f(y), net(torch.cat((y, z), -1)) @ output_map.T)


@pytest.mark.parametrize("hidden", [(), (6, 5)])
def test_bind_conditioned_with_time_input_equals_network_of_concatenation(hidden):
    net = MLP(2 + 1 + 3, hidden, 1)
    randomise(net, seed=3)
    z = torch.randn(4, 3)
    y = torch.randn(4, 4)
    input_map = torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]])
    output_map = torch.tensor([[0.0], [0], [0], [1]])
    f = net.bind_conditioned(z, input_map, output_map, time_input=True)
    for t in (0.0, 0.7):
        t_col = torch.full((4, 1), t)
        expected = net(torch.cat((y @ input_map.T, t_col, z), -1)) @ output_map.T
        torch.testing.assert_close(f(torch.tensor(t), y), expected)
