"""The kernels of one locomotion solve stage, timed alone: what the one-node solve can still gain.

    python benchmarks/locomotion/solve_kernels.py [--compile] [--out FILE]

One torch thread, float32, the shapes of phys+nn+reg at the reference batch: 100 rows, an
energy network with hidden widths (128, 128) reading a 6-dimensional state. Prints the time per
call (mean over a few thousand calls after a warm-up) of:

* the matrix products of a stage at this core's rate (GMAC/s), against larger products, MKL's
  pre-packed weights and oneDNN's linear;
* a product with six output columns in both memory layouts;
* the long products that sum the weights' gradients over 400 stages, against accumulating them
  stage by stage;
* ELU and its derivative, as PyTorch's ELU plus ``1 + min(h, 0)`` and from one exponential;
* with ``--compile``: one forward stage eager and compiled by ``torch.compile`` (needs a C++
  compiler; about 10 s to compile).

Writes the lines also to ``--out`` (default ``benchmarks/locomotion/results/solve_kernels.log``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
B, H, D, STAGES = 100, 128, 6, 400


def per_call(f: Callable[[], object], seconds: float = 0.3) -> float:
    """Mean seconds per call of ``f`` over about ``seconds``, after a warm-up."""
    for _ in range(20):
        f()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            f()
        n += 10
    return (time.perf_counter() - start) / n


def stage(y, off, w_x, w, b, w_out, m_t, a):
    """One forward stage of the solve: activations, derivatives, adjoints and the field."""
    h0 = F.elu(torch.addmm(off, y, w_x.t()))
    h1 = F.elu(torch.addmm(b, h0, w.t()))
    d0, d1 = h0.clamp(max=0) + 1, h1.clamp(max=0) + 1
    g0 = d0 * ((d1 * w_out) @ w)
    return torch.addmm(y @ a, g0, m_t.t()), h0, h1, d0, d1, g0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd stage")
    p.add_argument("--out", default=str(HERE / "results" / "solve_kernels.log"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flag = " --compile" if args.compile else ""
    lines: list[str] = [f"# python benchmarks/locomotion/solve_kernels.py{flag}; "
                        f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%MZ}, {platform.platform()}, "
                        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"]

    def say(name: str, seconds: float, macs: float | None = None) -> None:
        rate = f"  {macs / seconds / 1e9:5.1f} GMAC/s" if macs else ""
        lines.append(f"{name:58s} {seconds * 1e6:9.1f} us{rate}")
        print(lines[-1], flush=True)

    for m, k, n in ((B, H, H), (1000, H, H), (512, 512, 512)):
        x, w = torch.randn(m, k), torch.randn(k, n)
        say(f"product ({m}, {k}) x ({k}, {n})", per_call(lambda x=x, w=w: x @ w), m * k * n)
    x, w, b = torch.randn(B, H), torch.randn(H, H), torch.randn(H)
    say("linear (100, 128) -> 128", per_call(lambda: F.linear(x, w, b)), B * H * H)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, B)
    say("  MKL pre-packed weights", per_call(lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, B)),
        B * H * H)
    onednn = torch.ops.mkldnn._reorder_linear_weight(w, B)
    say("  oneDNN linear", per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, b, "none", [], "")),
        B * H * H)

    m_narrow = torch.randn(H, D)
    m_t = m_narrow.t().contiguous()
    say("six output columns: g @ M, M (128, 6) contiguous", per_call(lambda: x @ m_narrow))
    say("six output columns: F.linear(g, M^T), M^T contiguous", per_call(lambda: F.linear(x, m_t)))

    long_a, long_b = torch.randn(STAGES * B, H), torch.randn(STAGES * B, H)
    say("weights' gradient: one product (128, 40000) x (40000, 128)",
        per_call(lambda: long_a.t() @ long_b, 1.0), STAGES * B * H * H)
    acc, ga, gb = torch.zeros(H, H), torch.randn(B, H), torch.randn(B, H)
    say("  per stage instead: acc += (128, 100) x (100, 128)", per_call(lambda: acc.addmm_(ga.t(), gb)),
        B * H * H)

    a = torch.randn(B, H)
    say("ELU", per_call(lambda: F.elu(a)))
    say("ELU, then its derivative 1 + min(h, 0)", per_call(lambda: F.elu(a).clamp_(max=0).add_(1)))

    def elu_from_one_exp():
        d = a.clamp(max=0).exp_()
        return a.clamp(min=0).add_(d - 1), d

    say("ELU and derivative: d = exp(min(a, 0)), h = relu(a) + (d - 1)", per_call(elu_from_one_exp))
    say("exp", per_call(lambda: torch.exp(a)))

    if args.compile:
        inputs = (torch.randn(B, D), torch.randn(B, H), torch.randn(H, D), torch.randn(H, H) * 0.1,
                  torch.randn(H), torch.randn(H), m_t, torch.randn(D, D))
        say("one forward stage, eager", per_call(lambda: stage(*inputs)))
        start = time.perf_counter()
        compiled = torch.compile(stage, dynamic=False)
        compiled(*inputs)
        lines.append(f"torch.compile of the stage: {time.perf_counter() - start:.1f} s")
        print(lines[-1])
        say("one forward stage, compiled", per_call(lambda: compiled(*inputs)))
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
