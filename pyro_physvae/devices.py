"""Devices: resolving a requested device, and float32 arithmetic that is the same on every one.

``resolve_device`` refuses a CUDA device where there is none; ``full_fp32`` turns off the TF32
arithmetic that cuDNN uses for float32 convolutions on recent GPUs (about 1e-3 relative error),
for comparisons of CPU and GPU results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refused with a clear error if it names CUDA and there is none."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available here")
    return torch.device(name)


@contextmanager
def full_fp32() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 (not TF32) for the duration."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        before = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = before
    else:
        before = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = before
