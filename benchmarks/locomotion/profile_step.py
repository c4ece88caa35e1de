"""Profile one locomotion phys+nn+reg training step (batch 100, one thread, real recordings).

    python benchmarks/locomotion/profile_step.py [--gradient explicit|autograd] [--data DIR]

Times a few steps after warm-up, then prints torch.profiler's operator table (self CPU time)
and cProfile's cumulative Python profile of one step.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_physvae.settings import Setting
from pyro_physvae.systems import get_system
from pyro_physvae.train import TrainConfig, make_trainer

DEFAULT_DATA = Path(__file__).parents[2].parent / "shared" / "data" / "locomotion"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gradient", default="explicit", choices=("explicit", "autograd"))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    system = get_system("locomotion")
    ds = system.load_split(args.data, "train")
    x = system.observations(ds)
    model, guide = system.build("phys+nn+reg", {**system.model_kwargs_from_data(ds),
                                                "energy_gradient": args.gradient})
    trainer = make_trainer(system, Setting.parse("phys+nn+reg"), model, guide,
                           TrainConfig(epochs=1, batch_size=100, threads=1), x.shape[0])
    batch = torch.arange(100)
    for _ in range(3):
        trainer.step(x, subsample=batch)
    start = time.perf_counter()
    for _ in range(4):
        trainer.step(x, subsample=batch)
    print(f"{args.gradient}: {(time.perf_counter() - start) / 4:.3f} s per step (4 steps per epoch)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(x, subsample=batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    profiler = cProfile.Profile()
    profiler.enable()
    trainer.step(x, subsample=batch)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
