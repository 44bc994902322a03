"""End this process when its parent does, however the parent ends (kill -9 included)."""

import os
import signal


def die_with_parent() -> int:
    """PR_SET_PDEATHSIG = SIGKILL for this process (Linux; a no-op where prctl is missing), then
    os._exit(1) if the parent died before the request took effect. Returns the parent's pid."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # reparented already: the parent is gone
        os._exit(1)
    return parent
