"""Imported as the last preload of the sweep's fork server (sim.sweep.worker_context): what every
batch needs (the engine, the parquet writer a worker commits its part with) and the compiled
kernels, loaded once there (``load``), so that each worker, a fork of the fork server, starts with
them instead of loading them itself (about 0.7 s per process)."""


def load() -> None:
    """Import the engine and the parquet writer and load the compiled kernels when they are cached
    (never compile here: the driver compiles first, sim.sweep.prepare_engine). Also a worker's own
    start-up (sim.sweep._warm_worker): where the fork server preloaded before the kernels were cached,
    or where there is no fork server (spawn)."""
    import pyarrow.parquet  # noqa: F401

    import sim.engine  # noqa: F401

    try:
        from sim import kernels
    except ImportError:  # no numba: the torch engine needs nothing more
        return
    if kernels.is_cached():
        try:
            kernels.warm_up()
        except Exception:  # noqa: BLE001 -- the kernels then load at a batch's first call
            pass


load()
