"""Engine benchmarks (not part of the test suite). Run: python bench/engine_bench.py

Prints, measured in this one run:
  1. time per step vs number of prompts m = 16, 64, 256 (cost must grow ~linearly: ratio per 4x < 6);
  2. speedup of the vectorized engine over a per-run numpy loop (sim.reference.train_one,
     vectorized over prompts) on the same workload (target >= 30x), with torch on 1 thread
     (like for like) and on the default thread count.
"""

from __future__ import annotations

import argparse
import time

import torch

from sim.config import RunConfig, TrainConfig
from sim.engine import train_batch
from sim.problems import ProblemConfig
from sim.reference import train_one


def workload(m: int, runs: int, steps: int, mode: str, estimator: str = "grpo") -> list[RunConfig]:
    """R runs (4 step sizes x seeds) on one problem. Metrics are logged only at the first and last
    step (log_points = 2): the loop it is compared with records J and sigma per step but computes
    none of the per-step diagnostics (Hessians, rho, per-step gain) that logged steps carry."""
    p = ProblemConfig(num_prompts=m, num_responses=8, orthogonality=0.5)
    return [RunConfig(p, TrainConfig(estimator=estimator, mode=mode, group_size=8, steps=steps,
                                     lr=m / 4 * (1 + r % 4), seed=r // 4, log_points=2)) for r in range(runs)]


def time_engine(runs: list[RunConfig], repeats: int = 3, device: str = "cpu", engine: str = "auto") -> float:
    """Best-of-repeats seconds per step for the whole batch (its results end on the CPU, so a GPU
    run is complete when the clock stops)."""
    train_batch(runs[:2], device=device, engine=engine)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_batch(runs, device=device, engine=engine)
        best = min(best, time.perf_counter() - t0)
    return best / runs[0].train.steps


def time_loop(runs: list[RunConfig]) -> float:
    """Seconds per step for all runs, one after another, in the numpy reference loop."""
    t0 = time.perf_counter()
    for r in runs:
        train_one(r)
    return (time.perf_counter() - t0) / runs[0].train.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--device", default="cpu", help="where the engine runs (cuda: a GPU); the loop stays numpy")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} threads; R = {args.runs} runs, K = 8, G = 8, "
          f"k = s = 8, float64, engine on {args.device}")

    print("\n1. scaling in prompts (time per step of the whole batch, default threads)")
    for mode in ("exact", "sampled"):
        prev = None
        for m in (16, 64, 256):
            t = time_engine(workload(m, args.runs, args.steps, mode), device=args.device)
            ratio = f"  x{t / prev:.2f} per 4x prompts" if prev else ""
            print(f"  {mode:7s} m = {m:4d}: {t * 1e3:8.3f} ms/step{ratio}")
            prev = t

    print("\n2. engine vs per-run numpy loop (same workload: R runs, m = 16; the loop is timed on "
          "32 of the R runs and scaled by R/32, its cost being linear in runs)")
    for R in (64, 256, 1024):
        for mode in ("sampled", "exact"):
            runs = workload(16, R, args.steps, mode)
            loop = time_loop(runs[:32]) * R / 32
            for threads in sorted({1, default_threads}) if args.device == "cpu" else [default_threads]:
                torch.set_num_threads(threads)
                eng = time_engine(runs, repeats=2, device=args.device)
                print(f"  R = {R:4d} {mode:7s} torch threads {threads}: engine {eng * 1e3:7.3f} ms/step, "
                      f"numpy loop {loop * 1e3:8.2f} ms/step -> speedup x{loop / eng:.1f}")
            torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
