"""The shortcuts taken for speed give what the plain computations give."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_physvae.nets import MLP
from pyro_physvae.regularizers import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_all_finite_finds_any_non_finite_value_and_leaves_tensors_unchanged(dtype, bad):
    tensors = [torch.randn(7, dtype=dtype), torch.randn(3, 4, dtype=dtype), torch.randn(0, dtype=dtype)]
    if bad is not None:
        tensors[1][2, 1] = bad
    before = [t.clone() for t in tensors]
    assert all_finite(tensors) == (bad is None)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t.nan_to_num(), b.nan_to_num())


def test_all_finite_with_mixed_dtypes_and_leaf_tensors():
    assert all_finite([torch.randn(3), torch.randn(2, dtype=torch.float64)])
    assert not all_finite([torch.randn(3), torch.tensor([math.inf], dtype=torch.float64)])
    leaf = torch.randn(4, requires_grad=True)
    assert all_finite([leaf]) and leaf.grad is None
    assert all_finite([])


def test_single_output_network_with_output_map_is_not_folded_but_equal():
    net = MLP(3 + 1, (8, 8), 1)
    for lin in net.linears:
        torch.nn.init.normal_(lin.weight)
    z, y = torch.randn(5, 1), torch.randn(5, 6)
    input_map = torch.eye(6)[[1, 3, 4]]
    output_map = torch.zeros(6, 1)
    output_map[3, 0] = 1.0
    f = net.bind_conditioned(z, input_map, output_map)
    expected = net(torch.cat((y @ input_map.T, z), -1)) @ output_map.T
    torch.testing.assert_close(f(y), expected)
    assert torch.count_nonzero(f(y)[:, [0, 1, 2, 4, 5]]) == 0
