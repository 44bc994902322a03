"""Imported only as the first preload of the sweep's fork server (sim.sweep.worker_context): the fork
server ends when the sweep process does, however it ends (kill -9 included), and its workers
(PR_SET_PDEATHSIG on their parent, sim.sweep._die_with_parent) with it.

Without this the fork server outlives a killed sweep: every worker it forks holds the sweep's
"alive" pipe, by which the fork server would notice that the sweep is gone, so it never sees the
pipe close while a worker runs, and a worker never sees its parent go.

It also ignores SIGINT from here on, as multiprocessing's fork server does only once its preloads
are imported: a Ctrl-C to the terminal's process group reaches the fork server too, and while it
imported the engine it printed a KeyboardInterrupt traceback beside the sweep's one line. The
sweep process alone acts on Ctrl-C; the workers it forks start with SIGINT ignored. (Before this
runs, SIGINT is blocked: the sweep started the fork server so.)"""

import os
import signal

from sim._fork_server import SWEEP_PID_VAR  # (light: os, signal, pathlib)
from sim._parent_death import die_with_parent

SERVER_PID = os.getpid()  # inherited by every worker forked from here: the parent it must have (sim.sweep._die_with_parent)

signal.signal(signal.SIGINT, signal.SIG_IGN)  # (discards a Ctrl-C pending since the start)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by sim.sweep._start_fork_server
# the sweep's pid as it started us (sim._fork_server.start_fork_server): a sweep killed before this line
# ran has left us to init, and os.getppid() read now would name init; the guard would not see the death
_sweep = os.environ.get(SWEEP_PID_VAR, "")
die_with_parent(int(_sweep) if _sweep.isdigit() else None)
