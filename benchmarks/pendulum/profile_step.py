"""Where the time of one pendulum training step goes.

    python benchmarks/pendulum/profile_step.py [--setting phys+nn+reg] [--steps 20] [--beta B]

Builds the setting's model, guide and loss as ``physvae train`` does, on the benchmark's
training data (``benchmarks/pendulum/out/data``, made by ``benchmarks/pendulum/run.py`` or
``train_all.py``), takes 10 warm-up steps of batch 200 on one thread, times 50 steps, then
prints a ``torch.profiler`` table of ``--steps`` steps, operators sorted by their own time,
and the time of the parameter update alone (gradient scale, clipping and Adam) with Adam's
fused kernel, which the trainer uses, against its multi-tensor one. Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_physvae.data.io import load_split
from pyro_physvae.settings import Setting
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, make_trainer, module_parameters

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="phys+nn+reg")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", default=str(HERE / "out" / "data"))
    p.add_argument("--beta", type=float, default=None,
                   help="R_DA,2 weight (default: the system's; 0 leaves the term out)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    system, setting = get_system("pendulum"), Setting.parse(args.setting)
    ds = load_split(args.data, "train", system="pendulum")
    x = system.observations(ds)
    model, guide = system.build(setting, system.model_kwargs_from_data(ds), {})
    trainer = make_trainer(system, setting, model, guide, TrainConfig(beta=args.beta), x.shape[0])
    trainer.init_optimizer(module_parameters(model, guide))
    batches = [torch.randperm(x.shape[0])[:200] for _ in range(60 + args.steps)]
    for b in batches[:10]:
        trainer.step(x, subsample=b)
    t0 = time.perf_counter()
    for b in batches[10:60]:
        trainer.step(x, subsample=b)
    print(f"{args.setting}: {(time.perf_counter() - t0) / 50 * 1e3:.1f} ms per step of batch 200 (50 steps)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[60:]:
            trainer.step(x, subsample=b)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    params = module_parameters(model, guide)
    for kind in ("fused", "foreach", "fused", "foreach"):
        print(f"parameter update, Adam {kind}: {update_time(params, kind) * 1e3:.2f} ms")


def update_time(params: list[torch.Tensor], kind: str, steps: int = 200) -> float:
    """Seconds per update of ``params`` (gradients set at random): scale, clip, Adam."""
    for p in params:
        p.grad = torch.randn_like(p)
    c = TrainConfig()
    opt = torch.optim.Adam(params, lr=c.lr, eps=c.adam_eps, weight_decay=c.weight_decay,
                           **({"fused": True} if kind == "fused" else {"foreach": True}))
    grads = [p.grad for p in params]

    def update() -> None:
        torch._foreach_mul_(grads, 1.0)
        torch.nn.utils.clip_grad_value_(params, c.clip_value)
        opt.step()

    for _ in range(20):
        update()
    t0 = time.perf_counter()
    for _ in range(steps):
        update()
    return (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    main()
