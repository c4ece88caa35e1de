"""Numbers and files of the evaluation reports, shared by every system's evaluation.

The lowest layer of the evaluation: it imports nothing of the package but
:mod:`pyro_physvae.diagnostics`, so that :mod:`pyro_physvae.evaluate`, the image evaluation
(:mod:`pyro_physvae.images`) and a user's own evaluator can all use it without importing one
another.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from pyro_physvae.diagnostics import central_interval

#: Central posterior interval used for coverage and bands.
INTERVAL = 0.90


def parameter_metrics(samples: Tensor, truth: np.ndarray, level: float = INTERVAL) -> dict[str, float]:
    """Errors of the posterior mean of one scalar parameter against its truth.

    Args:
        samples: posterior draws ``(S, N)``.
        truth: true values ``(N,)``, in the parameter's units.
        level: probability of the central interval whose coverage and width are reported.

    Returns:
        ``mae``, ``rmse`` (parameter units), ``corr`` (Pearson correlation of the posterior
        mean with the truth; NaN for one sequence or a constant mean), ``coverage<level%>``
        (fraction of truths inside the central interval) and ``interval_width`` (its mean
        width, parameter units).
    """
    mean = samples.mean(0).cpu().numpy()
    lo, hi = (v.cpu().numpy() for v in central_interval(samples, level))
    err = mean - truth
    corr = float(np.corrcoef(mean, truth)[0, 1]) if len(truth) > 1 and mean.std() > 0 else math.nan
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "corr": corr, f"coverage{int(level * 100)}": float(((truth >= lo) & (truth <= hi)).mean()),
            "interval_width": float((hi - lo).mean())}


def iwae_summary(iwae: Tensor) -> dict[str, float]:
    """Mean (with its standard error) and median of per-sequence IWAE log-likelihoods
    ``(N,)`` [nats per sequence]."""
    return {"mean": float(iwae.mean()), "stderr": float(iwae.std() / math.sqrt(iwae.numel())),
            "median": float(iwae.median())}


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` to ``path`` as indented JSON, non-finite floats as ``null``; creates the
    parent directory. Returns ``path``."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(u) for k, u in v.items()}
        if isinstance(v, list | tuple):
            return [clean(u) for u in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2))
    return path
