"""All performance numbers in one run (not part of the test suite): python bench/run.py

(a) both engines (torch, numba) at 1 and 2 threads on the standard workload, and their ratio to a
    per-run numpy loop (sim.reference), measured in 5 alternating rounds in one process (medians),
    as this machine's speed drifts by tens of percent between separate measurements; "kernel": the
    numba engine's training loop alone (no logged diagnostics, no summary: what the loop computes);
(b) engine time per step / the step's unavoidable arithmetic: the logits and gradient products
    (4 P K (k + s) flops per run-step) in a plain compiled loop, with its flop rate on these shapes;
(c) scaling of the numba engine in prompts P, group size G, responses K and runs R;
(d) local-backend parallel efficiency: one worker vs two on a sweep of 756 runs, and the
    machine's ceiling for it (one batch alone vs the same batch in both workers at once);
(f) the kernels' first compile and load from the cache, and the default sweep end to end;
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

import numba
import numpy as np
import torch
from numba import njit

sys.path.insert(0, str(Path(__file__).parent))
from engine_bench import time_engine, time_loop, workload  # noqa: E402

from sim import kernels, sweep  # noqa: E402
from sim.engine import train_batch  # noqa: E402
from sim.problems import make_problem, stack_problems  # noqa: E402


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed_batch(rows: list[dict]) -> float:
    """Seconds one local-backend worker spends on one batch (sim.sweep's own worker function)."""
    t0 = time.perf_counter()
    sweep._run_batch_in_worker(rows, "cpu", "numba")
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


ENGINE_CASES = (("torch", 1), ("torch", 2), ("numba", 1), ("numba", 2))


def set_engine_threads(engine: str, threads: int) -> None:
    """torch's intra-op threads for the torch engine, the kernel's run blocks for numba (torch then 1)."""
    torch.set_num_threads(threads if engine == "torch" else 1)
    kernels.set_threads(threads if engine == "numba" else 1)


def kernel_alone(runs) -> None:
    """The numba engine's training loop alone on ``runs``: init_state and one advance over all T steps
    (sim.engine.advance_numba: the kernel, the history, the statistics at T), no logged diagnostics
    or summary; what the per-run numpy loop computes, so its ratio is like for like."""
    from sim.engine import StepHistory, advance_numba, init_state

    with torch.no_grad():
        state = init_state(runs)
        prob, T = state.batch.problem, runs[0].train.steps
        R, P, _ = prob.bias.shape
        advance_numba(state, StepHistory(R, P, T, prob.bias.dtype, 1e-9 * prob.sigma_bound.unsqueeze(-1)), T)


KERNEL_CASES = (("kernel", 1), ("kernel", 2))


def time_engines(runs, rounds: int = 5, loop_runs: int = 32) -> dict:
    """Seconds per step of the whole batch for every (engine, threads) and the numpy loop, measured
    in alternating rounds (each round times every case back to back, so that the ratios of one
    round see one machine speed; it drifts here). -> {case: [seconds per round]}."""
    out: dict = {}
    steps = runs[0].train.steps
    for engine, threads in ENGINE_CASES:  # warm-up (the numba kernels load from the cache)
        set_engine_threads(engine, threads)
        train_batch(runs[:2], engine=engine)
    for _ in range(rounds):
        for engine, threads in ENGINE_CASES:
            set_engine_threads(engine, threads)
            t0 = time.perf_counter()
            train_batch(runs, engine=engine)
            out.setdefault((engine, threads), []).append((time.perf_counter() - t0) / steps)
        for case in KERNEL_CASES:
            set_engine_threads("numba", case[1])
            t0 = time.perf_counter()
            kernel_alone(runs)
            out.setdefault(case, []).append((time.perf_counter() - t0) / steps)
        out.setdefault("loop", []).append(time_loop(runs[:loop_runs]) * len(runs) / loop_runs)
    set_engine_threads("torch", 2)
    return out


@njit(fastmath=kernels.FASTMATH)  # the kernels' flags: their inlined loops compile in this function
def _products(thT, theta_s, phi, phiS, w, bias, z, gpT, gs):  # pragma: no cover - benchmark
    """The step's unavoidable arithmetic alone: the logits z = phi . theta and the gradient blocks
    sum_y w_iy phi(x_i, y), 4 P K (k + s) flops per run, by the kernels' own loops
    (sim.kernels._logits, _grad_blocks, lane layout) and nothing else."""
    for r in range(z.shape[0]):
        kernels._logits(bias[r], phi[r], phiS[r], thT[r], theta_s[r], z[r])
        kernels._grad_blocks(w[r], phi[r], phiS[r], gpT[r], gs[r])


def product_floor(runs, reps: int = 200) -> tuple[float, float]:
    """(seconds per step of the step's products for the whole batch in a plain compiled loop, flops)."""
    prob = stack_problems([make_problem(r.problem) for r in runs[:1]] * len(runs))
    R, P, K = prob.bias.shape
    k, s = prob.phi_private.shape[-1], prob.phi_shared.shape[-1]
    rng = np.random.default_rng(0)
    phi_p, phi_s = prob.phi_private.numpy(), prob.phi_shared.numpy()
    args = (rng.standard_normal((R, k, P)), rng.standard_normal((R, s)),
            np.ascontiguousarray(phi_p.transpose(0, 3, 2, 1)),  # sim.engine.lane_layout
            np.ascontiguousarray(phi_s.transpose(0, 3, 2, 1)).reshape(R, s, K * P),
            rng.standard_normal((R, K, P)), np.zeros((R, K, P)), np.empty((R, K, P)), np.empty((R, k, P)),
            np.empty((R, s)))
    _products(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        _products(*args)
    return (time.perf_counter() - t0) / reps, 4.0 * R * P * K * (k + s)


def first_compile_seconds() -> tuple[float, float]:
    """(first compile, load from the cache) of the kernels, each in a fresh interpreter with an
    empty cache directory of its own."""
    import subprocess

    code = "import time; t = time.perf_counter(); from sim import kernels; kernels.warm_up(); print(time.perf_counter() - t)"
    with tempfile.TemporaryDirectory() as d:
        env = {**__import__("os").environ, "NUMBA_CACHE_DIR": d}
        first = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
        cached = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
    return first, cached


def default_sweep_seconds(engine: str) -> float:
    """`sim sweep --orthogonality 0.2,0.8` end to end (a fresh process, the kernels cached)."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sim.cli", "sweep", "--orthogonality", "0.2,0.8", "--engine", engine,
                        "--out", str(Path(d) / "r")], capture_output=True, check=True)
        return time.perf_counter() - t0


def main() -> None:
    steps = 300
    print(f"torch {torch.__version__}, numba {numba.__version__}, float64")
    kernels.warm_up()
    std, ex = workload(16, 256, steps, "sampled"), workload(16, 256, steps, "exact")
    measured = {"sampled": time_engines(std), "exact": time_engines(ex)}
    print("\n(a) standard workload: R = 256, P = 16, K = 8, G = 8, k = s = 8, GRPO, T = 300 (logged at 3 steps);"
          " ms per step of the whole batch and x the per-run numpy loop (sim.reference), medians of 5 alternating"
          " rounds [min, max of the per-round ratio]")
    for mode, m in measured.items():
        loop = _median(m["loop"])
        print(f"  {mode}: numpy loop {loop * 1e3:.1f} ms/step")
        for case in ENGINE_CASES + KERNEL_CASES:  # kernel: the training loop alone, no diagnostics
            ratios = [lp / e for lp, e in zip(m["loop"], m[case])]
            print(f"    {case[0]:6s} {case[1]} thread{'s' if case[1] > 1 else ' '}: {_median(m[case]) * 1e3:6.3f} ms/step"
                  f" -> x{_median(ratios):6.1f} [{min(ratios):.1f}, {max(ratios):.1f}]")

    print("\n(b) engine time per step / the step's unavoidable arithmetic (the logits and gradient products,"
          " 4 P K (k + s) flops per run-step, in a plain compiled loop on 1 thread)")
    floor, flops = product_floor(std)
    print(f"  products alone: {floor * 1e3:.3f} ms/step = {flops / floor / 1e9:.1f} Gflop/s on these shapes")
    for mode, m in measured.items():
        for case in ENGINE_CASES:
            print(f"    {mode:7s} {case[0]:5s} {case[1]} thread{'s' if case[1] > 1 else ' '}: "
                  f"x{_median(m[case]) / floor:5.1f} the product floor")

    print("\n(c) scaling, numba engine (2 threads): ms per step of the whole batch and us per run-step")
    set_engine_threads("numba", 2)

    def per_step(runs):
        return time_engine(runs, repeats=2, engine="numba")

    import dataclasses

    from sim.config import ProblemConfig, RunConfig

    for name, values, make in (
            ("prompts P", (16, 64, 256), lambda v: workload(v, 64, steps, "sampled")),
            ("group G", (4, 16, 64), lambda v: [RunConfig(r.problem, dataclasses.replace(r.train, group_size=v))
                                                for r in workload(16, 64, steps, "sampled")]),
            ("responses K", (4, 16, 64), lambda v: [RunConfig(ProblemConfig(num_prompts=16, num_responses=v,
                                                                            orthogonality=0.5), r.train)
                                                    for r in workload(16, 64, steps, "sampled")]),
            ("runs R", (16, 256, 1024), lambda v: workload(16, v, steps, "sampled"))):
        prev = None
        for v in values:
            runs = make(v)
            t = per_step(runs)
            grow = f"  x{t / prev:.2f} per {values[1] // values[0]}x" if prev else ""
            print(f"  {name} = {v:5d}: {t * 1e3:7.2f} ms/step, {t / len(runs) * 1e6:7.2f} us per run-step{grow}")
            prev = t

    print("\n(d) local backend parallel efficiency, numba engine (756 runs: 24 batches of 32 and 12 of 31, 3000 steps)")
    spec = sweep.SweepSpec.build({"num_prompts": [8, 10, 12, 14, 16, 18], "estimator": ["reinforce", "grpo"],
                                  "orthogonality": [0.2, 0.5, 0.8], "steps": [3000], "log_points": [8]},
                                 seeds=21)
    t1 = sweep_time(spec, workers=1, max_batch=32, engine="numba", threads=1)
    t1b = sweep_time(spec, workers=1, max_batch=32, engine="numba", threads=2)
    # the first pool of this process: a cold start (the fork server's imports), during which the sweep
    # process trains batches itself; the second: the fork server is up, its workers fork in ms
    t2 = sweep_time(spec, workers=2, max_batch=32, engine="numba")
    t2w = sweep_time(spec, workers=2, max_batch=32, engine="numba")
    startup = cold_worker_startup()
    print(f"  1 worker, 1 thread {t1:.1f} s; 2 workers (1 thread each) {t2:.1f} s cold -> x{t1 / t2:.2f} "
          f"(starting them: {startup:.1f} s in a fresh process, the sweep process training meanwhile), "
          f"{t2w:.1f} s with the fork server up -> x{t1 / t2w:.2f}; "
          f"1 worker, 2 kernel threads {t1b:.1f} s -> x{t1 / t1b:.2f}")
    alone, together = concurrency_ceiling(sweep.make_batches(list(sweep.expand(spec)), 32)[0])
    print(f"  ceiling: one batch alone {alone:.2f} s, the same batch in both workers at once {together:.2f} s "
          f"-> at most x{2 * alone / together:.2f} from 2 workers on this machine")

    print("\n(f) compile and end to end")
    first, cached = first_compile_seconds()
    print(f"  kernels: first compile {first:.1f} s, from the cache {cached:.2f} s (each in a fresh interpreter)")
    ts = {e: default_sweep_seconds(e) for e in ("torch", "numba")}
    print(f"  `sim sweep --orthogonality 0.2,0.8`: --engine torch {ts['torch']:.1f} s, numba {ts['numba']:.1f} s "
          f"-> x{ts['torch'] / ts['numba']:.2f} end to end (kernels cached)")

    print("\n(e) Ray backend vs local, same sweep, 2 CPUs")
    if importlib.util.find_spec("ray") is None:
        print("  skipped: ray is not installed (pip install -e '.[ray]')")
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tr = sweep_time(spec, backend="ray", max_batch=32, engine="numba")
    finally:
        ray.shutdown()
    print(f"  ray {tr:.1f} s vs local 2 workers {t2w:.1f} s (both started before) -> overhead {tr / t2w - 1:+.0%}")


if __name__ == "__main__":
    main()
