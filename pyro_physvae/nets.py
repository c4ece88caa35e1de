"""Neural building blocks. They are ``PyroModule``s so that Pyro registers their parameters
(and a user can turn any weight into a ``PyroSample`` for a Bayesian network)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": F.elu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
}


class MLP(PyroModule):
    """A fully connected network applied to the last dimension: ``(..., in) -> (..., out)``.

    Args:
        in_features, out_features: input and output sizes.
        hidden: widths of the hidden layers (may be empty: an affine map).
        activation: ``"elu"``, ``"relu"``, ``"tanh"`` or ``"softplus"``, between layers.
        zero_last: start as the zero function (for residual corrections).
        final_activation: also apply the activation to the output.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "elu",
        zero_last: bool = False,
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        self.activation = activation
        self.final_activation = final_activation
        sizes = [in_features, *hidden, out_features]
        self.linears = PyroModule[nn.ModuleList](
            [PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        if zero_last:
            nn.init.zeros_(self.linears[-1].weight)
            nn.init.zeros_(self.linears[-1].bias)

    def bind(self) -> Callable[[Tensor], Tensor]:
        """The network as a plain function with its weights fetched once.

        Inside a Pyro trace every attribute access of a ``PyroModule`` parameter is a
        ``pyro.param`` call; an ODE right-hand side evaluated at every solver step should
        call the bound function instead.
        """
        weights = [(lin.weight, lin.bias) for lin in self.linears]
        act = ACTIVATIONS[self.activation]
        last = len(weights) - 1
        final = self.final_activation

        def apply(x: Tensor) -> Tensor:
            for i, (w, b) in enumerate(weights):
                x = F.linear(x, w, b)
                if i < last or final:
                    x = act(x)
            return x

        return apply

    def bind_conditioned(
        self,
        z: Tensor,
        input_map: Tensor | None = None,
        output_map: Tensor | None = None,
        *,
        time_input: bool = False,
    ) -> Callable[..., Tensor]:
        """The network of ``cat(x, z)`` as a function of ``x`` alone, for a fixed ``z``.

        Built for ODE right-hand sides, where the function is called at every solver step
        and PyTorch's per-operation overhead dominates: the ``z`` part of the first layer is
        computed once here, and optional linear maps on the input and output are folded
        into the first and last weight matrices, so that a call costs one linear layer and
        one activation per layer and nothing more.

        Args:
            z: conditioning input, ``(..., dim_z)``.
            input_map: ``(in_features - dim_z, D)``; the function then takes ``y (..., D)``
                and feeds ``y @ input_map.T`` to the network (e.g. to select state entries).
            output_map: ``(D_out, out_features)``; the function returns ``net @ output_map.T``
                (e.g. to place the output in some state entries and zeros elsewhere).
            time_input: the network reads ``cat(x, t, z)`` with a scalar time ``t``; the
                function is then ``f(t, x)``, as an ODE right-hand side is called.

        Returns:
            ``f`` with ``f(x) == output_map @ self(cat(input_map @ x, z))`` (maps omitted
            when ``None``), or ``f(t, x) == output_map @ self(cat(input_map @ x, t, z))``.
        """
        first = self.linears[0]
        dim_x = first.weight.shape[1] - z.shape[-1] - int(time_input)
        w_x, w_z = first.weight[:, :dim_x], first.weight[:, dim_x + int(time_input):]
        w_t = first.weight[:, dim_x] if time_input else None
        if input_map is not None:
            w_x = w_x @ input_map
        offset = F.linear(z, w_z, first.bias)
        layers = [(lin.weight, lin.bias) for lin in self.linears[1:]]
        act = ACTIVATIONS[self.activation]
        final = self.final_activation
        # A linear output map folds into the last layer unless an activation follows it.
        post_map = output_map if final else None
        if output_map is not None and not final:
            if layers:
                w_last, b_last = layers[-1]
                layers[-1] = (output_map @ w_last, output_map @ b_last)
            else:
                w_x, offset = output_map @ w_x, F.linear(offset, output_map)
                w_t = None if w_t is None else output_map @ w_t

        def rest(x: Tensor) -> Tensor:
            for w_i, b_i in layers:
                x = F.linear(act(x), w_i, b_i)
            if final:
                x = act(x)
            return x if post_map is None else F.linear(x, post_map)

        if time_input:
            return lambda t, x: rest(F.linear(x, w_x) + torch.addcmul(offset, t, w_t))
        return lambda x: rest(F.linear(x, w_x) + offset)

    def forward(self, x: Tensor) -> Tensor:
        return self.bind()(x)


LNVAR_MIN, LNVAR_MAX = -16.0, 6.0


class GaussianHead(PyroModule):
    """Features ``(..., F)`` -> ``(loc, scale)`` of a diagonal Normal ``(..., dim)``, each
    from its own MLP; ``positive`` passes the loc through a Softplus (positive physics
    parameters), and the log variance is clamped to ``[LNVAR_MIN, LNVAR_MAX]``."""

    def __init__(self, in_features: int, hidden: Sequence[int], dim: int, activation: str,
                 positive: bool = False) -> None:
        super().__init__()
        self.loc = MLP(in_features, hidden, dim, activation)
        self.lnvar = MLP(in_features, hidden, dim, activation)
        self.positive = positive

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        loc = self.loc(h)
        if self.positive:
            loc = nn.functional.softplus(loc)
        scale = torch.exp(0.5 * self.lnvar(h).clamp(LNVAR_MIN, LNVAR_MAX))
        return loc, scale


@contextmanager
def frozen_parameters(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``modules`` (``None`` entries are
    skipped) and restore each parameter's own flag on exit, also after an exception.

    Inside, autograd records no operation on the weights, so a gradient of the model's log
    density with respect to its latents costs no weight-gradient bookkeeping.
    """
    params = {id(p): p for m in modules if m is not None for p in m.parameters()}
    before = {k: p.requires_grad for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(before[k])
