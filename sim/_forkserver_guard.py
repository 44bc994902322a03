"""Imported only as the first preload of the sweep's fork server (sim.sweep.worker_context): the fork
server ends when the sweep process does, however it ends (kill -9 included), and its workers
(PR_SET_PDEATHSIG on their parent, sim.sweep._die_with_parent) with it.

Without this the fork server outlives a killed sweep: every worker it forks holds the sweep's
"alive" pipe, by which the fork server would notice that the sweep is gone, so it never sees the
pipe close while a worker runs, and a worker never sees its parent go."""

from sim._parent_death import die_with_parent

die_with_parent()
