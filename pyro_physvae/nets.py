"""Neural building blocks. They are ``PyroModule``s so that Pyro registers their parameters
(and a user can turn any weight into a ``PyroSample`` for a Bayesian network)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import Tensor, nn

#: The activations an :class:`MLP` applies between layers. They act in place where PyTorch has an
#: in-place form: an MLP applies them only to the fresh output of a linear layer, which
#: nothing else reads, and autograd then computes the backward pass from the result. For
#: ELU that is about twice as fast as from the input (``exp(x) = elu(x) + 1`` for ``x <= 0``).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": F.elu_,
    "relu": F.relu_,
    "tanh": torch.tanh_,
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
        # A linear output map folds into the last layer unless an activation follows it or
        # the network has a single output: a one-column last layer is several times cheaper
        # than a wide one, and placing its column costs one outer product.
        fold = output_map is not None and not final and self.linears[-1].weight.shape[0] > 1
        post_map = None if fold else output_map
        if fold:
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
        if offset.dim() == 2:
            w_x_t = w_x.t()
            # One fused op (and one autograd node) where the state is a matrix, as in a
            # flattened ODE solve; other shapes broadcast.
            return lambda x: rest(torch.addmm(offset, x, w_x_t) if x.dim() == 2
                                  else F.linear(x, w_x) + offset)
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


# -- image networks ------------------------------------------------------------------------------
def _as_image_batch(x: Tensor, event_dim: int = 3) -> tuple[Tensor, torch.Size]:
    """Flatten the leading dims of ``(..., C, H, W)`` into one batch dim for ``conv2d``;
    returns the batch and the leading shape to restore."""
    lead = x.shape[:-event_dim]
    return x.reshape(-1, *x.shape[-event_dim:]), lead


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest divisor of ``channels`` up to ``max_groups`` (GroupNorm groups)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def conv_block(c_in: int, c_out: int, kernel_size: int = 3, activation: str = "relu",
               n_convs: int = 1) -> nn.Module:
    """``n_convs`` x (conv with "same" padding, GroupNorm, activation) as a PyroModule.

    GroupNorm rather than the reference's BatchNorm: it normalises each image on its own, so
    that the density of one image does not depend on the other images of its minibatch and the
    networks behave the same in training and evaluation.
    """
    acts = {"relu": lambda: PyroModule[nn.ReLU](), "leaky_relu": lambda: PyroModule[nn.LeakyReLU](0.2)}
    if activation not in acts:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(acts)}")
    layers: list[nn.Module] = []
    for i in range(n_convs):
        c = c_in if i == 0 else c_out
        layers += [PyroModule[nn.Conv2d](c, c_out, kernel_size, padding=kernel_size // 2),
                   PyroModule[nn.GroupNorm](_groups(c_out), c_out), acts[activation]()]
    return PyroModule[nn.Sequential](*layers)


class ConvFeatures(PyroModule):
    """CNN feature extractor: images ``(..., C, H, W)`` -> features ``(..., out_features)``.

    One stage per entry of ``channels``: a ``kernel_size`` convolution, GroupNorm, LeakyReLU and
    2x2 max pooling (the reference's galaxy encoder: 16-32-64-128 channels, 5x5 kernels,
    69 -> 34 -> 17 -> 8 -> 4 pixels), then a linear map of the flattened last stage.

    Args:
        in_channels: bands C of the input.
        image_size: height and width of the input (square images).
        channels: output channels of each stage.
        out_features: size of the feature vector.
        kernel_size: odd kernel size of the convolutions.
    """

    def __init__(self, in_channels: int, image_size: int, channels: Sequence[int] = (16, 32, 64, 128),
                 out_features: int = 512, kernel_size: int = 5) -> None:
        super().__init__()
        if not channels:
            raise ValueError("ConvFeatures needs at least one stage")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        size = int(image_size)
        stages: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels, strict=True):
            if size < 2:
                raise ValueError(f"images of {image_size} pixels are too small for {len(channels)} "
                                 "pooling stages")
            stages += [conv_block(c_in, c_out, kernel_size, "leaky_relu"), PyroModule[nn.MaxPool2d](2)]
            size //= 2
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.convs = PyroModule[nn.Sequential](*stages)
        self.linear = PyroModule[nn.Linear](channels[-1] * size * size, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-3:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"expected images (..., {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got shape {tuple(x.shape)}")
        flat, lead = _as_image_batch(x)
        h = self.convs(flat).flatten(1)
        return self.linear(h).reshape(*lead, -1)


class UNet(PyroModule):
    """A U-Net: images ``(..., C_in, H, W)`` -> ``(..., C_out, H, W)`` for any ``H, W``.

    ``depth`` pooling levels with two 3x3 convolutions (GroupNorm, ReLU) each, widths
    ``width * 2**level``, bilinear upsampling and skip connections, and a 1x1 output
    convolution. Inputs are zero-padded to a multiple of ``2**depth`` and the output is cropped
    back, so odd sizes such as 69 work. ``zero_last`` starts the network as the zero map (for
    residual refinements).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 8, depth: int = 3,
                 zero_last: bool = False) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"UNet needs depth >= 1 and width >= 1, got {depth}, {width}")
        widths = [width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = PyroModule[nn.ModuleList](
            [conv_block(c_in, c_out, n_convs=2) for c_in, c_out in zip((in_channels, *widths[:-1]), widths,
                                                                         strict=True)])
        self.up = PyroModule[nn.ModuleList](
            [conv_block(widths[i + 1] + widths[i], widths[i], n_convs=2) for i in reversed(range(depth))])
        self.last = PyroModule[nn.Conv2d](widths[0], out_channels, 1)
        if zero_last:
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)

    def forward(self, x: Tensor) -> Tensor:
        flat, lead = _as_image_batch(x)
        h, w = flat.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        y = F.pad(flat, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        skips = []
        for i, block in enumerate(self.down):
            y = block(y)
            if i < self.depth:
                skips.append(y)
                y = F.max_pool2d(y, 2)
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat((y, skip), 1))
        y = self.last(y)[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
        return y.reshape(*lead, *y.shape[1:])


class ConvDecoder(PyroModule):
    """A vector ``(..., in_features)`` -> an image ``(..., out_channels, H, W)``.

    An MLP maps the vector to ``channels[0]`` maps of ``s0 x s0`` pixels, ``s0 = ceil(H /
    2**n)`` for ``n = len(channels) - 1``; each further stage doubles the size (nearest
    upsampling, 3x3 convolution, GroupNorm, ReLU), a last 3x3 convolution gives the output
    channels, and the centre ``H x W`` is kept. (Upsampling plus convolution instead of the
    reference's transposed convolutions: no checkerboard artefacts, and any output size.)
    """

    def __init__(self, in_features: int, image_size: int, out_channels: int,
                 channels: Sequence[int] = (64, 32, 16, 8), hidden: Sequence[int] = (32, 64),
                 activation: str = "elu") -> None:
        super().__init__()
        if not channels:
            raise ValueError("ConvDecoder needs at least one stage")
        n_up = len(channels) - 1
        self.image_size = int(image_size)
        self.start = -(-self.image_size // 2**n_up)
        self.channels = tuple(channels)
        self.mlp = MLP(in_features, hidden, channels[0] * self.start**2, activation, final_activation=True)
        self.ups = PyroModule[nn.ModuleList](
            [conv_block(c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)])
        self.last = PyroModule[nn.Conv2d](channels[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        y = self.mlp(z.reshape(-1, z.shape[-1])).reshape(-1, self.channels[0], self.start, self.start)
        for block in self.ups:
            y = block(F.interpolate(y, scale_factor=2, mode="nearest"))
        y = self.last(y)
        off = (y.shape[-1] - self.image_size) // 2
        y = y[..., off:off + self.image_size, off:off + self.image_size]
        return y.reshape(*lead, *y.shape[1:])
