"""A longer fault-injection campaign: the hypothesis suite of ``tests/test_fuzz.py`` with many
cases per family and random (not fixed) generation, counting the cases tried and how each
ended.

    python benchmarks/fuzz.py --examples 150

writes ``benchmarks/fuzz_results/counts.json`` (cases per family: tried, clear errors, resumes
from an intact checkpoint) and ``fuzz.log`` (pytest's output). Every case must end as a clear
error (nonzero exit, one line naming the problem, no traceback, run directory unchanged) or,
for a damaged ``last.pt`` under ``--resume``, as a resume from the previous intact checkpoint;
any other outcome fails the test and is in the log with its falsifying example.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=150, help="cases per test (family)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "fuzz_results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = out / "counts.json"
    env = {**os.environ, "PHYSVAE_FUZZ_EXAMPLES": str(args.examples), "PHYSVAE_FUZZ_REPORT": str(counts)}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_fuzz.py")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / "fuzz.log").write_text(result.stdout + result.stderr)
    summary = json.loads(counts.read_text()) if counts.exists() else {}
    summary = {"command": f"python benchmarks/fuzz.py --examples {args.examples}",
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
               "seconds": round(seconds, 1), "pytest_exit": result.returncode, "families": summary,
               "tried": sum(f.get("tried", 0) for f in summary.values()),
               "clear_errors": sum(f.get("clear error", 0) for f in summary.values()),
               "resumed": sum(f.get("resumed from an intact checkpoint", 0) for f in summary.values())}
    counts.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:])
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
