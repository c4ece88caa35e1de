"""Constructor arguments checked against annotations: sizes, counts and widths, and the check
that every Phys-VAE model and guide class runs on construction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from pyro_physvae import Count, Size, Widths
from pyro_physvae.arguments import check_keyword_arguments, describe_annotation, matches_annotation
from pyro_physvae.base import PhysVAEGuide, PhysVAEModel


@pytest.mark.parametrize(("annotation", "value", "ok"), [
    (Size, 1, True), (Size, 0, False), (Size, -3, False), (Size, np.int64(4), True), (Size, 2.0, False),
    (Size, True, False), (Size, "3", False),
    (Count, 0, True), (Count, -1, False),
    (Widths, (), True), (Widths, [8, 16], True), (Widths, (8, 0), False), (Widths, "88", False),
    (Widths, 8, False), (Widths, [8.0], False),
    (Size | None, None, True), (Size | None, 0, False),
])
def test_constraints(annotation, value, ok):
    assert matches_annotation(annotation, value) is ok


def test_descriptions():
    assert describe_annotation(Size) == "int >= 1"
    assert describe_annotation(Count) == "int >= 0"
    assert describe_annotation(Widths) == "a list of int >= 1"


class _Model(PhysVAEModel):
    def __init__(self, setting: str = "nn-only", *, width: Size = 4, hidden: Widths = (8,),
                 extra: Count = 0, scale: float = 1.0) -> None:
        super().__init__()
        self.width, self.hidden = width, hidden


class _Child(_Model):
    """A subclass whose constructor calls its parent's: its own arguments are checked once."""

    def __init__(self, depth: Size = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.depth = depth


def test_a_model_class_checks_its_arguments_when_built():
    assert _Model(width=3).width == 3
    assert _Model("phys-only", hidden=[]).hidden == []
    with pytest.raises(ValueError, match="_Model argument width: expected int >= 1, got 0"):
        _Model(width=0)
    with pytest.raises(ValueError, match=r"argument hidden: expected a list of int >= 1, got \(8, -1\)"):
        _Model(hidden=(8, -1))
    with pytest.raises(ValueError, match="_Model argument scale: expected finite float, got nan"):
        _Model(scale=float("nan"))
    with pytest.raises(ValueError, match="_Model argument setting: expected str, got 3"):
        _Model(3)
    assert _Child(depth=1, width=2).depth == 1
    with pytest.raises(ValueError, match="_Child argument depth: expected int >= 1, got 0"):
        _Child(depth=0)


def test_guides_check_too():
    class Guide(PhysVAEGuide):
        def __init__(self, model: torch.nn.Module, *, feat_dim: Size = 8) -> None:
            super().__init__()

    Guide(_Model(), feat_dim=2)
    with pytest.raises(ValueError, match="Guide argument feat_dim: expected int >= 1, got -1"):
        Guide(_Model(), feat_dim=-1)
    with pytest.raises(ValueError, match="Guide argument model: expected Module, got None"):
        Guide(None)


def test_unknown_and_variadic_arguments():
    def f(a: Sequence[int], **rest) -> None: ...

    check_keyword_arguments(f, {"a": [1], "anything": "goes"})
    with pytest.raises(ValueError, match="_Model has no argument\\(s\\) \\['widht'\\]; it takes: .*width"):
        check_keyword_arguments(_Model, {"widht": 3}, bound=("setting",))
