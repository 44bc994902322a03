"""All performance numbers in one run (not part of the test suite): python bench/run.py

(a) engine steps/s on the standard workload and its ratio to a per-run numpy loop (sim.reference);
(b) engine time per step / time of the step's unavoidable matrix products: the blockwise logits
    and the policy-gradient contraction, 4 batched products, timed where the engine's loop calls
    them (and, beside it, the same products timed alone on the same tensors);
    (a) and (b) are measured back to back in 3 rounds (median and range), as this machine's
    speed drifts by tens of percent between separate measurements;
(c) scaling in prompts, group size and runs;
(d) local-backend parallel efficiency: one worker vs two on the same sweep, and the machine's
    ceiling for it (one batch alone vs the same batch in both workers at once);
(e) Ray backend overhead versus local on the same sweep (skipped without the ray extra).
Standard workload: R = 256 runs, P = 16 prompts, K = 8 responses, G = 8, k = s = 8, float64,
sampled GRPO (and exact mode beside it).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import time_engine, time_loop, workload  # noqa: E402

import theory  # noqa: E402
from sim import sweep  # noqa: E402
from sim.problems import make_problem, stack_problems  # noqa: E402


def matmul_floor(runs, reps: int = 50) -> float:
    """Seconds per step of the 4 products every step needs: z = phi_private theta_p,
    phi_shared theta_s, and the gradient blocks w^T phi_private, sum_i w_i^T phi_shared."""
    prob = stack_problems([make_problem(r.problem) for r in runs])
    R, P, K = prob.bias.shape
    tp = torch.randn(R, P, prob.phi_private.shape[-1], dtype=torch.float64)
    ts = torch.randn(R, prob.phi_shared.shape[-1], dtype=torch.float64)
    w = torch.randn(R, P, K, dtype=torch.float64)

    def products():
        theory.logits(torch.zeros_like(prob.bias), prob.phi_private, prob.phi_shared, tp, ts)
        theory.summed_gradient(w, prob.phi_private, prob.phi_shared)

    products()
    t0 = time.perf_counter()
    for _ in range(reps):
        products()
    return (time.perf_counter() - t0) / reps


def engine_with_product_time(runs) -> tuple[float, float]:
    """(engine seconds per step, seconds per step spent inside its matrix products) from one run:
    theory.logits and theory.summed_gradient (the step's 4 products) are timed where the training
    loop calls them, so both numbers see the same machine speed."""
    from sim.engine import train_batch

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[0] += time.perf_counter() - t0
            return out
        return wrapper

    original = theory.logits, theory.summed_gradient
    theory.logits, theory.summed_gradient = timed(original[0]), timed(original[1])
    try:
        train_batch(runs[:2])  # warm-up
        spent[0] = 0.0
        t0 = time.perf_counter()
        train_batch(runs)
        total = time.perf_counter() - t0
    finally:
        theory.logits, theory.summed_gradient = original
    steps = runs[0].train.steps
    return total / steps, spent[0] / steps


def paired_rounds(runs, rounds: int = 3, loop_runs: int = 32) -> list[tuple[float, float, float, float]]:
    """(engine, numpy loop, products inside the engine's loop, the same products alone) seconds per
    step of the whole batch, measured back to back in each round, so that each round's ratios see
    the same machine speed (it drifts here)."""
    out = []
    for _ in range(rounds):
        eng, inside = engine_with_product_time(runs)
        loop = time_loop(runs[:loop_runs]) * len(runs) / loop_runs
        out.append((eng, loop, inside, matmul_floor(runs)))
    return out


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed_batch(rows: list[dict]) -> float:
    """Seconds one local-backend worker spends on one batch (sim.sweep's own worker function)."""
    t0 = time.perf_counter()
    sweep._run_batch_in_worker(rows)
    return time.perf_counter() - t0


def cold_worker_startup() -> float:
    """Seconds from creating the sweep's 2-worker pool to both workers having imported the
    engine, in a fresh interpreter (as a `sim sweep --workers 2` pays it once)."""
    import subprocess

    code = ("import time\nfrom concurrent.futures import ProcessPoolExecutor\nfrom sim import sweep\n"
            "if __name__ == '__main__':\n    t0 = time.perf_counter()\n"
            "    with ProcessPoolExecutor(2, mp_context=sweep.worker_context()) as pool:\n"
            "        [f.result() for f in [pool.submit(sweep._warm_worker) for _ in range(2)]]\n"
            "        print(time.perf_counter() - t0)\n")
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "startup.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def concurrency_ceiling(batch) -> tuple[float, float]:
    """The same batch alone in one worker, then in both workers at once: (alone s, together s).
    2 * alone / together is the best 2-worker efficiency this machine allows for this work
    (shared caches, memory bandwidth, clock), whatever the scheduler does."""
    import concurrent.futures

    rows = [r.as_flat_dict() for r in batch]
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=sweep.worker_context()) as pool:
        [f.result() for f in [pool.submit(sweep._warm_worker) for _ in range(2)]]
        pool.submit(_timed_batch, rows).result()  # warm-up
        alone = min(pool.submit(_timed_batch, rows).result() for _ in range(2))
        together = min(max(f.result() for f in [pool.submit(_timed_batch, rows) for _ in range(2)])
                       for _ in range(2))
    return alone, together


def sweep_time(spec, **kw) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        sweep.run_sweep(spec, Path(d) / "r", **kw)
        return time.perf_counter() - t0


def main() -> None:
    steps = 300
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    std, ex = workload(16, 256, steps, "sampled"), workload(16, 256, steps, "exact")
    measured = {"sampled": paired_rounds(std), "exact": paired_rounds(ex)}
    print("\n(a) standard workload: R = 256, P = 16, K = 8, G = 8, sampled GRPO (and exact mode); "
          "median of 3 back-to-back rounds [min, max]")
    for mode, rounds in measured.items():
        eng, loop = _median([r[0] for r in rounds]), _median([r[1] for r in rounds])
        ratios = [r[1] / r[0] for r in rounds]
        print(f"  {mode:7s}: engine {1 / eng:7.1f} steps/s ({eng * 1e3:.2f} ms/step), numpy loop "
              f"{loop * 1e3:6.2f} ms/step -> engine x{_median(ratios):.1f} [{min(ratios):.1f}, {max(ratios):.1f}]")

    print("\n(b) engine time per step / time of its matrix products (timed inside the same runs; "
          "the same products timed alone beside them)")
    for mode, rounds in measured.items():
        ratios = [r[0] / r[2] for r in rounds]
        alone = [r[0] / r[3] for r in rounds]
        print(f"  {mode:7s}: products {_median([r[2] for r in rounds]) * 1e3:.3f} ms/step -> engine / products = "
              f"{_median(ratios):.1f}x [{min(ratios):.1f}, {max(ratios):.1f}]; products alone "
              f"{_median([r[3] for r in rounds]) * 1e3:.3f} ms/step -> {_median(alone):.1f}x "
              f"[{min(alone):.1f}, {max(alone):.1f}]")

    print("\n(c) scaling (ms per step of the whole batch)")
    base = None
    for m in (16, 64, 256):
        t = time_engine(workload(m, 64, steps, "sampled"), repeats=2)
        print(f"  prompts m = {m:4d} (R = 64): {t * 1e3:7.2f}" + (f"  x{t / base:.2f} per 4x" if base else ""))
        base = t
    from sim.config import RunConfig, TrainConfig
    import dataclasses

    for G in (4, 16, 64):
        runs = [RunConfig(r.problem, dataclasses.replace(r.train, group_size=G)) for r in workload(16, 64, steps,
                                                                                                   "sampled")]
        print(f"  group size G = {G:3d} (R = 64): {time_engine(runs, repeats=2) * 1e3:7.2f}")
    for R in (16, 256, 1024):
        t = time_engine(workload(16, R, steps, "sampled"), repeats=1)
        print(f"  runs R = {R:5d}: {t * 1e3:7.2f} ms/step, {t / R * 1e6:6.1f} us per run-step")

    print("\n(d) local backend parallel efficiency (24 batches of 32 runs, 3000 steps)")
    spec = sweep.SweepSpec.build({"num_prompts": [8, 10, 12, 14, 16, 18], "estimator": ["reinforce", "grpo"],
                                  "orthogonality": [0.2, 0.5, 0.8], "steps": [3000], "log_points": [8]},
                                 seeds=21)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t1 = sweep_time(spec, workers=1, max_batch=32)
    torch.set_num_threads(threads)
    t2 = sweep_time(spec, workers=2, max_batch=32)  # the first pool of this process: a cold start
    startup = cold_worker_startup()
    print(f"  1 worker (1 thread) {t1:.1f} s, 2 workers {t2:.1f} s -> efficiency x{t1 / t2:.2f} "
          f"(the 2 workers' time includes starting them: {startup:.1f} s in a fresh process)")
    alone, together = concurrency_ceiling(sweep.make_batches(list(sweep.expand(spec)), 32)[0])
    print(f"  ceiling: one batch alone {alone:.2f} s, the same batch in both workers at once {together:.2f} s "
          f"-> at most x{2 * alone / together:.2f} from 2 workers on this machine")

    print("\n(e) Ray backend vs local, same sweep, 2 CPUs")
    if importlib.util.find_spec("ray") is None:
        print("  skipped: ray is not installed (pip install -e '.[ray]')")
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tr = sweep_time(spec, backend="ray", max_batch=32)
    finally:
        ray.shutdown()
    print(f"  ray {tr:.1f} s vs local 2 workers {t2:.1f} s -> overhead {tr / t2 - 1:+.0%}")


if __name__ == "__main__":
    main()
