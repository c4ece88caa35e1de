"""Constructor arguments checked against their type annotations, with size constraints.

Models and guides annotate their size arguments with :data:`Size` (an int >= 1),
:data:`Count` (an int >= 0) or :data:`Widths` (hidden-layer widths, each >= 1); other
arguments with ordinary types. :func:`check_keyword_arguments` refuses a value that does not
fit, naming the argument and what was expected, before any network is built. Every
:class:`~pyro_physvae.base.PhysVAEModel` and :class:`~pyro_physvae.base.PhysVAEGuide`
subclass checks its constructor's arguments this way (see ``__init_subclass__`` there), and
the CLI checks ``--model-option`` / ``--guide-option`` with it.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


@dataclass(frozen=True)
class AtLeast:
    """A constraint for ``Annotated[int | float, AtLeast(low)]``: the value is >= ``low``."""

    low: float

    def __call__(self, value: Any) -> bool:
        return value >= self.low

    def __str__(self) -> str:
        return f">= {self.low:g}"


#: A size: an int >= 1 (a feature dimension, a number of channels or layers).
Size = Annotated[int, AtLeast(1)]
#: A count that may be zero: an int >= 0 (e.g. the dimension of an optional latent).
Count = Annotated[int, AtLeast(0)]
#: Hidden-layer widths: a sequence of sizes (empty: no hidden layer).
Widths = Sequence[Size]


def check_keyword_arguments(cls: Callable[..., Any], kwargs: Mapping[str, Any],
                            bound: tuple[str, ...] = (), *, label: str | None = None) -> None:
    """Check keyword arguments for ``cls(...)`` (a class, or a function) against its
    signature and type annotations.

    Refused, with a ``ValueError``: keys that ``cls`` does not take (unless it takes
    ``**kwargs``), naming the ones it takes, and values that do not match a parameter's
    annotation (see :func:`matches_annotation`: ``int``, ``float``, ``bool``, ``str``,
    ``None``/``Optional``, unions, ``Literal``, sequences, tuples, mappings and classes;
    ``bool`` is no number, numbers must be finite). Annotations given as strings (``from
    __future__ import annotations``) are resolved in the defining module; one that cannot be
    resolved is not checked.

    Args:
        bound: parameters given positionally (e.g. a model's ``setting``), not in ``kwargs``.
        label: how the arguments are called in messages, e.g. ``"--model-option"``
            (default: ``"<cls name> argument"``).
    """
    name = getattr(cls, "__name__", repr(cls))
    params = inspect.signature(cls).parameters
    accepted = [k for k, p in params.items() if k not in bound
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"{label + ': ' if label else ''}{name} has no argument(s) {unknown}; "
                             f"it takes: {', '.join(sorted(accepted))}")
    hints = constructor_annotations(cls)
    for key, value in kwargs.items():
        if key in hints and not matches_annotation(hints[key], value):
            raise ValueError(f"{label or name + ' argument'} {key}: expected "
                             f"{describe_annotation(hints[key])}, got {value!r}")


def constructor_annotations(cls: Callable[..., Any]) -> dict[str, Any]:
    """The resolved type annotations of the parameters of ``cls.__init__`` (of ``cls``
    itself for a function), by parameter name; those that cannot be resolved are left out."""
    target = cls.__init__ if isinstance(cls, type) else cls
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # one unresolvable name spoils get_type_hints: resolve one by one
        hints = {}
        module_globals = getattr(inspect.unwrap(target), "__globals__", {})
        for key, p in inspect.signature(target).parameters.items():
            ann = p.annotation
            if isinstance(ann, str):
                try:
                    ann = eval(ann, dict(module_globals))  # the module's own annotation text
                except Exception:
                    continue
            if ann is not inspect.Parameter.empty:
                hints[key] = ann
    hints.pop("return", None)
    return hints


def _plain(value: Any) -> Any:
    """A NumPy array or tensor as a Python number (0 dimensions) or list (more); anything
    else unchanged."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):
        return value.tolist()
    return value


_SEQUENCE_ORIGINS = (collections.abc.Sequence, collections.abc.MutableSequence, list,
                     collections.abc.Collection, collections.abc.Iterable, set, frozenset,
                     collections.abc.Set, collections.abc.MutableSet)


def matches_annotation(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits the type ``annotation``: ``int`` (not ``bool``), ``float`` (a
    finite real number, ints included), ``bool``, ``str``, ``None``, unions and ``Optional``,
    ``Literal``, ``tuple[...]``, sequences and sets (a list or tuple, not a string, of
    matching items), mappings (matching keys and values) and classes (``isinstance``).
    Annotations it does not know (type variables, callables' signatures, ...) match
    anything."""
    if annotation in (Any, inspect.Parameter.empty) or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a type with constraints: the type first, then each constraint
        base, *constraints = args
        return matches_annotation(base, value) and all(
            c(_plain(value)) for c in constraints if callable(c))
    if origin is Union or origin is types.UnionType:
        return any(matches_annotation(a, value) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    value = _plain(value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches_annotation(args[0], v) for v in value)
        if not args:
            return True
        if args == ((),):
            return len(value) == 0
        return len(value) == len(args) and all(matches_annotation(a, v)
                                                for a, v in zip(args, value, strict=True))
    if origin in _SEQUENCE_ORIGINS or annotation in _SEQUENCE_ORIGINS:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
            return False
        item = args[0] if args else Any
        return all(matches_annotation(item, v) for v in value)
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or \
            annotation in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if not isinstance(value, collections.abc.Mapping):
            return False
        key_t, value_t = args if len(args) == 2 else (Any, Any)
        return all(matches_annotation(key_t, k) and matches_annotation(value_t, v) for k, v in value.items())
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value)
    if isinstance(origin, type):  # another generic: check the container only
        try:
            return isinstance(value, origin)
        except TypeError:
            return True
    if isinstance(annotation, type):
        try:
            return isinstance(value, annotation)
        except TypeError:  # e.g. a Protocol that is not runtime-checkable
            return True
    return True


def describe_annotation(annotation: Any) -> str:
    """``annotation`` in a few words for messages: ``int``, ``a list of int``, ``float or
    None``, ``one of 'a', 'b'``, ..."""
    if annotation is None or annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, *constraints = args
        return " ".join([describe_annotation(base), *(str(c) for c in constraints if callable(c))])
    if origin is Union or origin is types.UnionType:
        return " or ".join(describe_annotation(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe_annotation(args[0])}"
        return f"a list of {len(args)} ({', '.join(describe_annotation(a) for a in args)})"
    if origin in _SEQUENCE_ORIGINS or annotation in _SEQUENCE_ORIGINS:
        return f"a list of {describe_annotation(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return (f"a mapping of {describe_annotation(args[0])} to {describe_annotation(args[1])}"
                if len(args) == 2 else "a mapping")
    if annotation is float:
        return "finite float"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)
