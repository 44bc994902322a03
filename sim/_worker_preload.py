"""Imported as the last preload of the sweep's fork server (sim.sweep.worker_context): what every
batch needs (the engine, the parquet writer a worker commits its part with) and the compiled
kernels, loaded once there, so that each worker, a fork of the fork server, starts with them
instead of loading them itself (about 0.7 s per process)."""

import pyarrow.parquet  # noqa: F401

import sim.engine  # noqa: F401

try:
    from sim import kernels
except ImportError:  # no numba: the torch engine needs nothing more
    kernels = None

if kernels is not None and kernels.is_cached():  # never compile here: the driver compiles first
    try:
        kernels.warm_up()
    except Exception:  # noqa: BLE001 -- a worker then loads them itself (sim.sweep._warm_worker)
        pass
