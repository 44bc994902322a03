"""Ctrl-C (SIGINT) and SIGTERM held over start-up, then acted on.

While Python imports modules or numba loads its kernels, a KeyboardInterrupt can be raised inside
a weakref or ctypes callback (an import lock's, LLVM's object-cache hook), where Python swallows
it ("Exception ignored in ..."; the sweep then ran to its end) or marks the interpreter to die by
SIGINT with nothing said. Held, the signals are only recorded; on release the handlers that were
in place run, in order, at a point where the caller's clean-up (stop the workers, print the resume
command) is in place. Holds nest: an inner release hands its signals to the outer hold.

Where: sim.entry holds over the command line's imports, released when ``sim.cli.main`` starts;
``sim.sweep.run_sweep`` holds over its lazy imports and the kernels' loading; numba's warm-up
holds on its own (``sim.kernels.warm_up``).
"""

from __future__ import annotations

import contextlib
import signal
import threading

HELD = (signal.SIGINT, signal.SIGTERM)


class Hold:
    """Record HELD signals until ``release`` (idempotent). Released, it puts back the handlers it
    replaced (where nobody replaced it since) and raises each recorded signal again, so that the
    handler in place then acts on it; a recorder put back later by someone else's clean-up acts
    as the handler it had replaced."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.previous: dict[int, object] = {}
        self.released = False
        if threading.current_thread() is threading.main_thread():  # signals are the main thread's
            self.previous = {sig: signal.signal(sig, self._record) for sig in HELD}

    def _record(self, signum: int, frame) -> None:
        if not self.released:
            self.got.append(signum)
            return
        handler = self.previous.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def restore(self) -> list[int]:
        """Put back the replaced handlers; return the recorded signals (once)."""
        if self.released:
            return []
        self.released = True
        for sig, handler in self.previous.items():
            # else a later handler is in place: keep it (None: one set outside Python, not restorable)
            if handler is not None and signal.getsignal(sig) == self._record:
                signal.signal(sig, handler)
        got, self.got = list(dict.fromkeys(self.got)), []
        return got

    def release(self) -> None:
        deliver(self.restore())


def deliver(signals: list[int]) -> None:
    """Raise ``signals`` again, for the handlers now in place (KeyboardInterrupt for SIGINT)."""
    for sig in dict.fromkeys(signals):
        signal.raise_signal(sig)


_HOLDS: list[Hold] = []


@contextlib.contextmanager
def held():
    """Hold HELD signals for the block (or until ``release()`` inside it)."""
    hold = Hold()
    _HOLDS.append(hold)
    try:
        yield hold
    finally:
        if _HOLDS and _HOLDS[-1] is hold:
            _HOLDS.pop()
        hold.release()


def hold() -> None:
    """Hold HELD signals until ``release()`` (sim.entry: from the first import on)."""
    _HOLDS.append(Hold())


def release() -> None:
    """Release every hold now, innermost first (no-op when none): their signals take effect here."""
    got: list[int] = []
    while _HOLDS:
        got += _HOLDS.pop().restore()
    deliver(got)
