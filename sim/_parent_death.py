"""End this process when its parent does, however the parent ends (kill -9 included)."""

from __future__ import annotations

import os
import signal


def die_with_parent(parent: int | None = None) -> int:
    """PR_SET_PDEATHSIG = SIGKILL for this process (Linux; a no-op where prctl is missing), then
    os._exit(1) if the parent died before the request took effect. ``parent``: the pid the parent
    had, where the caller knows it from before this process ran any code (a fork server's own pid,
    inherited by its forks): a parent that died before this call has left the process to init or a
    subreaper, so ``os.getppid()`` read here would name that one and the death would go unseen.
    None: os.getppid() now. Returns the parent's pid."""
    parent = os.getppid() if parent is None else parent
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # reparented already: the parent is gone
        os._exit(1)
    return parent
