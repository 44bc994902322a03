"""Imported only as the first preload of the sweep's fork server (sim.sweep.worker_context): the fork
server ends when the sweep process does, however it ends (kill -9 included), and its workers
(PR_SET_PDEATHSIG on their parent, sim.sweep._die_with_parent) with it.

Without this the fork server outlives a killed sweep: every worker it forks holds the sweep's
"alive" pipe, by which the fork server would notice that the sweep is gone, so it never sees the
pipe close while a worker runs, and a worker never sees its parent go."""

import os
import signal

_parent = os.getppid()
try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG (Linux)
except (OSError, AttributeError):
    pass
if os.getppid() != _parent or _parent == 1:  # the sweep died before the request took effect
    os._exit(1)
