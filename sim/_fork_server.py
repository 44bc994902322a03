"""The local workers' fork server: how it is started (``worker_context``, ``start_fork_server``)
and whether a command line will want it (``wanted_by``), without importing torch or numba, so that
sim.entry can start it before the command line's own imports: its imports (torch, numba, the engine
and the cached kernels, about 2.7 s on one CPU) then run beside the sweep process's (about 2.5 s)
instead of after them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kernel_cache_dir() -> Path:
    """Where the compiled kernels are cached: NUMBA_CACHE_DIR when set, else the user's cache dir."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grpo-sim" / "numba"


def _option(argv: list[str], name: str) -> str | None:
    """The last value of option ``name`` in ``argv`` (``--name V`` or ``--name=V``), None if absent."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def wanted_by(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program name) is a ``sim sweep`` / ``sim run``
    with more than one local worker whose kernels are cached: the fork server may start now. A
    guess from the text (the command validates its options later; a fork server started for a
    command that is then refused ends with it). Not before a first compile: the fork server would
    look for the kernels while they are written."""
    if not argv or argv[0] not in ("sweep", "run") or _option(argv, "--backend") not in (None, "local"):
        return False
    workers = _option(argv, "--workers")
    if workers is None or not workers.isascii() or not workers.isdigit() or int(workers) < 2:
        return False
    if _option(argv, "--engine") == "torch":
        return True
    return kernels_indexed(kernel_cache_dir())


def kernels_indexed(cache: Path) -> bool:
    """Whether numba's index files of the kernels lie in ``cache`` (not whether they match the
    source: sim.kernels.is_cached checks that, with numba)."""
    return all(any(cache.rglob(f"kernels.{name}-*.nbi")) for name in ("advance", "gain_changes"))


#: The environment variable by which the fork server learns its parent's pid before it runs any code.
SWEEP_PID_VAR = "GRPO_SIM_SWEEP_PID"


def worker_context():
    """Start method of the local workers: a fork server that has imported the engine and loaded the
    cached kernels once (sim._worker_preload; each worker is then a fork of it: no second torch
    import or kernel load, no OpenMP state from this process), or spawn where fork servers do not
    exist."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sim._forkserver_guard", "sim._worker_preload"])  # the guard first: dies with us
    return ctx


def start_fork_server() -> None:
    """Make sure the workers' fork server runs (it imports the engine, then loads the kernels when
    they are cached: sim._worker_preload), started now rather than when the pool's first worker
    starts, with SIGINT blocked from its first instruction.

    A Ctrl-C to the process group in the fork server's first ~100 ms, before sim._forkserver_guard
    ignores it, printed a KeyboardInterrupt traceback or "Fatal Python error: init_import_site" from
    it (CI, stop 23). A blocked signal mask is inherited across fork and exec: the fork server
    starts with SIGINT blocked, a Ctrl-C stays pending there until the guard ignores it (which
    discards it) and unblocks it. Here only this thread blocks it for the spawn; a Ctrl-C to this
    process is taken by another of its threads meanwhile, or waits for this one (either way it
    reaches the handler). The resource tracker starts first: its own start unblocks SIGINT.
    This process's pid goes to the fork server in its environment (SWEEP_PID_VAR): its guard checks
    its parent against it, so a sweep killed before the guard ran is seen as gone."""
    from multiprocessing import forkserver, resource_tracker

    if worker_context().get_start_method() != "forkserver":
        return
    os.environ[SWEEP_PID_VAR] = str(os.getpid())  # the parent the fork server must have (sim._forkserver_guard)
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()  # (a running one: a WNOHANG wait; a dead one is started again)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
